// modelbatch::fused_mlp_loss_grad on the CPU: the loss and every parameter gradient
// of N multi-layer perceptrons (Linear layers, each followed by an elementwise
// activation) in one pass, model by model, with each model's activations kept in
// the core's caches.
//
// A vectorised step of small MLPs is memory-bound, not compute-bound: every layer's
// [N, B, H] activation is written by one kernel and read back by the next (bias,
// activation, their backward, the loss), and at N = 1024, B = 32, H = 32 each such
// pass streams 4 MB. Here one thread runs the whole forward, loss and backward of one
// model before moving to the next, so the activations (B x H floats per layer: 4 KB
// at B = H = 32, 64 KB at B = H = 128) never leave L1/L2; what reaches memory is the
// weights (read once) and the gradients (written once). The same idea as fully fused
// MLPs on GPUs (tiny-cuda-nn), for CPU caches.
//
// Layout: activations are feature-major, A^T [F, Bp] with the batch in the vector
// lanes (Bp = B rounded up to the lanes; padding lanes hold finite values and get
// zero gradient). Then, with the register tile C[R, cols] = X[R, K] @ Y[K, cols] of
// gemm_tile.h (X broadcast with any strides, Y rows contiguous):
//   forward   Z^T [O, Bp]  = W [O, I] @ A^T [I, Bp] + b     (X = W)
//   backward  dA^T [I, Bp] = W^T [I, O] @ dZ^T [O, Bp]      (X = W read transposed)
//             dW [O, I]    = dZ^T [O, B] @ A [B, I]         (A: one in-register
//                                                            transpose of A^T)
//             db [O]       = row sums of dZ^T
// The loss (cross-entropy over the classes of each sample, or mean squared error)
// is vectorised over the batch lanes, with a polynomial exp.
//
// Activations: identity, relu, tanh, sigmoid, silu, gelu (erf) and gelu (tanh), each
// with torch's derivative formula. Gradients are written to fresh [N, ...] tensors
// in the parameters' order (w0, b0, w1, b1, ...); losses come back [N], each model's
// mean over its samples as F.cross_entropy / F.mse_loss compute it. An optional
// per-model grad_scale multiplies each model's gradients (a loss scaler's scale).
//
// float32, contiguous, on x86-64 (AVX-512 or AVX2 + FMA chosen at run time) or any
// CPU with 128-bit vectors (the generic kernels). Models are spread over the threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "adam_math.h"
#include "gemm_tile.h"

namespace modelbatch {
namespace {

constexpr const char* kOp = "modelbatch::fused_mlp_loss_grad";

enum Act : int64_t {
  kIdentity = 0,
  kRelu = 1,
  kTanh = 2,
  kSigmoid = 3,
  kSilu = 4,
  kGelu = 5,
  kGeluTanh = 6,
  kNumActs = 7,
};
enum LossKind : int64_t { kCrossEntropy = 0, kMse = 1 };

// ---------------------------------------------------------------------------
// Vector math on L float lanes (GCC vector extensions).

template <int L>
struct VMath {
  using V = typename VecOf<float, L>::type;
  using VI = typename VecOf<int32_t, L>::type;

  static MB_INLINE V splat(float x) { return V{} + x; }
  // NaN in a propagates (as through torch's clamp / maximum).
  static MB_INLINE V vmin(V a, V b) { return a > b ? b : a; }
  static MB_INLINE V vmax(V a, V b) { return a < b ? b : a; }
  static MB_INLINE V vabs(V x) { return x < 0 ? -x : x; }

  // exp(x): x = n ln2 + r, |r| <= ln2 / 2, a degree-6 polynomial in r (Cephes'
  // expf, relative error ~1e-7) times 2^n built in the exponent bits. The argument
  // is clamped to [-87.34, 88.03] so that 2^n stays a normal number; NaN stays NaN.
  static MB_INLINE V exp(V x) {
    x = vmin(vmax(x, splat(-87.3365478515625f)), splat(88.0296919311130f));
    const V fx = x * 1.44269504088896341f + 0.5f;
    VI n = __builtin_convertvector(fx, VI);              // truncation
    n += (VI)(__builtin_convertvector(n, V) > fx);       // ... to floor (mask is -1)
    const V nf = __builtin_convertvector(n, V);
    const V r = x - nf * 0.693359375f - nf * -2.12194440e-4f;
    V y = splat(1.9875691500e-4f);
    y = y * r + 1.3981999507e-3f;
    y = y * r + 8.3334519073e-3f;
    y = y * r + 4.1665795894e-2f;
    y = y * r + 1.6666665459e-1f;
    y = y * r + 5.0000001201e-1f;
    y = y * (r * r) + r + 1.0f;
    const VI bits = (n + 127) << 23;
    V scale;
    std::memcpy(&scale, &bits, sizeof(V));
    return y * scale;
  }

  // tanh: an odd polynomial below |x| = 0.625 (Cephes' tanhf), 1 - 2 / (e^2|x| + 1)
  // with the sign of x above.
  static MB_INLINE V tanh(V x) {
    const V ax = vabs(x);
    const V x2 = x * x;
    V p = splat(-5.70498872745e-3f);
    p = p * x2 + 2.06390887954e-2f;
    p = p * x2 - 5.37397155531e-2f;
    p = p * x2 + 1.33314422036e-1f;
    p = p * x2 - 3.33332819422e-1f;
    const V small = x + x * x2 * p;
    V large = 1.0f - 2.0f / (exp(ax + ax) + 1.0f);
    large = x < 0 ? -large : large;
    return ax < 0.625f ? small : large;
  }

  static MB_INLINE V sigmoid(V x) { return 1.0f / (1.0f + exp(-x)); }

  // The standard normal CDF through erfc (a Chebyshev fit with relative error below
  // 1.2e-7 everywhere, Numerical Recipes' erfcc), so that the left tail keeps its
  // relative precision.
  static MB_INLINE V normal_cdf(V x) {
    const V z = vabs(x) * 0.70710678118654752f;
    const V t = 1.0f / (1.0f + 0.5f * z);
    V p = splat(0.17087277f);
    p = p * t - 0.82215223f;
    p = p * t + 1.48851587f;
    p = p * t - 1.13520398f;
    p = p * t + 0.27886807f;
    p = p * t - 0.18628806f;
    p = p * t + 0.09678418f;
    p = p * t + 0.37409196f;
    p = p * t + 1.00002368f;
    p = p * t - 1.26551223f;
    const V erfc_z = t * exp(p - z * z);  // erfc(|x| / sqrt 2)
    return x < 0 ? 0.5f * erfc_z : 1.0f - 0.5f * erfc_z;
  }
};

// h = act(z) for n floats (n a multiple of L).
template <int L>
MB_INLINE void act_forward(int64_t act, const float* z, float* h, int64_t n) {
  using M = VMath<L>;
  using V = typename M::V;
  for (int64_t i = 0; i < n; i += L) {
    V x, y;
    std::memcpy(&x, z + i, sizeof(V));
    switch (act) {
      case kRelu:
        y = x < 0 ? V{} : x;  // NaN passes, as in torch.relu
        break;
      case kTanh:
        y = M::tanh(x);
        break;
      case kSigmoid:
        y = M::sigmoid(x);
        break;
      case kSilu:
        y = x * M::sigmoid(x);
        break;
      case kGelu:
        y = x * M::normal_cdf(x);
        break;
      case kGeluTanh: {
        const V u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
        y = 0.5f * x * (1.0f + M::tanh(u));
        break;
      }
      default:
        y = x;
    }
    std::memcpy(h + i, &y, sizeof(V));
  }
}

// g *= act'(z) (h = act(z)) for n floats, torch's derivative formulas.
template <int L>
MB_INLINE void act_backward(int64_t act, const float* z, const float* h, float* g, int64_t n) {
  using M = VMath<L>;
  using V = typename M::V;
  for (int64_t i = 0; i < n; i += L) {
    V x, y, d;
    std::memcpy(&x, z + i, sizeof(V));
    std::memcpy(&y, h + i, sizeof(V));
    std::memcpy(&d, g + i, sizeof(V));
    switch (act) {
      case kRelu:
        d = y > 0 ? d : V{};
        break;
      case kTanh:
        d = d * (1.0f - y * y);
        break;
      case kSigmoid:
        d = d * ((1.0f - y) * y);
        break;
      case kSilu: {
        const V s = M::sigmoid(x);
        d = d * (s * (1.0f + x * (1.0f - s)));
        break;
      }
      case kGelu: {
        const V pdf = 0.3989422804014327f * M::exp(-0.5f * x * x);
        d = d * (M::normal_cdf(x) + x * pdf);
        break;
      }
      case kGeluTanh: {
        const V x2 = x * x;
        const V u = 0.7978845608028654f * (x + 0.044715f * x2 * x);
        const V t = M::tanh(u);
        const V du = 0.7978845608028654f * (1.0f + 3.0f * 0.044715f * x2);
        d = d * (0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * du);
        break;
      }
      default:
        break;
    }
    std::memcpy(g + i, &d, sizeof(V));
  }
}

// out[r] = sum over the Bp columns of rows r < R of a [R, Bp] block (Bp a multiple of
// L, padding zero): L rows at a time, their partial-sum vectors transposed in
// registers so that the row sums come out as one vector.
template <int L>
MB_INLINE void row_sums(const float* a, int64_t R, int64_t Bp, float* out) {
  using V = typename VecOf<float, L>::type;
  alignas(64) float tmp[L * L];
  alignas(64) float tr[L * L];
  for (int64_t r0 = 0; r0 < R; r0 += L) {
    const int64_t rows = std::min<int64_t>(L, R - r0);
    for (int64_t i = 0; i < L; ++i) {
      V acc = V{};
      if (i < rows) {
        const float* p = a + (r0 + i) * Bp;
        for (int64_t j = 0; j < Bp; j += L) {
          V v;
          std::memcpy(&v, p + j, sizeof(V));
          acc += v;
        }
      }
      std::memcpy(tmp + i * L, &acc, sizeof(V));
    }
    transpose_tile<float, L>(tmp, L, tr, L);
    V s = V{};
    for (int64_t i = 0; i < L; ++i) {
      V v;
      std::memcpy(&v, tr + i * L, sizeof(V));
      s += v;
    }
    alignas(64) float sv[L];
    std::memcpy(sv, &s, sizeof(V));
    for (int64_t i = 0; i < rows; ++i) out[r0 + i] = sv[i];
  }
}

// ---------------------------------------------------------------------------
// GEMM driver: C[R, ncols] = X[R, K] @ Y[K, ncols] (+ bias per row), column blocks
// of up to NVMAX vectors (Y and C readable / writable up to ncols rounded to L;
// only ncols columns are written).

template <int L, int NV>
constexpr int rows_for() {
  if constexpr (L == 16) return NV == 4 ? 4 : NV == 3 ? 6 : 8;  // 32 zmm registers
  else return NV == 3 ? 3 : NV == 2 ? 5 : 8;                    // 16 ymm / xmm
}

// The register tiles, one non-inlined function per width (see MB_FUSED_SET: inlined
// into one large function, GCC spills their accumulators).
template <int L, int NV>
MB_INLINE void block_nv(const Block<float>& b) {
  column_block_any<float, L, rows_for<L, NV>(), NV>(b);
}

template <typename KS>
MB_INLINE void gemm(int64_t R, int64_t K, const float* x, int64_t xr, int64_t xk,
                    const float* y, int64_t ldy, float* out, int64_t ldo, int64_t ncols,
                    const float* rbias) {
  constexpr int64_t L = KS::kL, kMaxNV = KS::kMaxNV;
  const int64_t nvec = (ncols + L - 1) / L;
  for (int64_t v = 0; v < nvec;) {
    const int64_t take = std::min(nvec - v, kMaxNV);
    const Block<float> b{R,   K,   x,   xr,         xk,   y + v * L, ldy,
                         out + v * L, ldo, ncols - v * L, nullptr, rbias, 1, nullptr};
    switch (take) {
      case 4:
        KS::b4(b);
        break;
      case 3:
        KS::b3(b);
        break;
      case 2:
        KS::b2(b);
        break;
      default:
        KS::b1(b);
    }
    v += take;
  }
}

// ---------------------------------------------------------------------------
// The problem

struct Layer {
  int64_t in, out, act;
  const float* w;  // [N, out, in]
  const float* b;  // [N, out] or null
  float* gw;
  float* gb;
};

struct Problem {
  int64_t N, B, Bp, loss, ignore_index;
  bool shared_x, shared_t;
  const float* x;         // [B, I0] or [N, B, I0]
  const int64_t* t_cls;   // cross-entropy targets [B] or [N, B]
  const float* t_reg;     // mse targets [B, O] or [N, B, O]
  const float* scale;     // [N] or null
  float* losses;          // [N]
  std::vector<Layer> layers;
  // Shared input, prepared once: x^T [I0, Bp] and x padded [B, Ip0].
  const float* xt_shared = nullptr;
  const float* xp_shared = nullptr;
  // fused_mlp_adam_step: the update that follows each model's backward, or null.
  const struct AdamArgs* adam = nullptr;
};

// The Adam / AdamW update of fused_mlp_adam_step: per parameter (in the gradient
// order w0, b0, w1, ...) its [N, ...] param and state pointers and per-model size;
// per model the hyper-parameters, step count and optional max norm.
struct AdamArgs {
  std::vector<float*> p, m, v, vmax;
  std::vector<int64_t> numel;
  int64_t per_model = 0;
  double* steps = nullptr;
  std::vector<double> lr, beta1, beta2, eps, weight_decay, amsgrad;
  bool decoupled = false;
  const float* max_norm = nullptr;
};

inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};
inline std::unique_ptr<float, AlignedFree> zeroed(int64_t n) {
  const size_t bytes = size_t(round_up(std::max<int64_t>(n, 1) * sizeof(float), 64));
  float* p = static_cast<float*>(std::aligned_alloc(64, bytes));
  if (!p) throw std::bad_alloc();
  std::memset(p, 0, bytes);
  return std::unique_ptr<float, AlignedFree>(p);
}

// The per-thread scratch: activations of every layer and two gradient buffers.
struct Scratch {
  std::unique_ptr<float, AlignedFree> mem;
  std::vector<float*> z, h;
  float *xt, *xp, *g0, *g1, *ta, *stat_m, *stat_s;
  float* grad;  // one model's gradients (fused_mlp_adam_step), else unused
};

template <int L>
Scratch make_scratch(const Problem& p) {
  const int64_t Bp = p.Bp, nl = int64_t(p.layers.size());
  const int64_t I0 = p.layers[0].in, Ip0 = round_up(I0, L);
  int64_t gmax = 0, ipmax = 0, total = 0;
  for (const auto& l : p.layers) {
    gmax = std::max({gmax, l.in, l.out});
    ipmax = std::max(ipmax, round_up(l.in, L));
    total += l.out * Bp * (l.act == kIdentity ? 1 : 2);
  }
  const int64_t nxt = p.shared_x ? 0 : I0 * Bp, nxp = p.shared_x ? 0 : p.B * Ip0;
  const int64_t ngrad = p.adam ? p.adam->per_model : 0;
  total += nxt + nxp + 2 * gmax * Bp + p.B * ipmax + 2 * Bp + ngrad;
  Scratch s;
  s.mem = zeroed(total + 16 * (2 * nl + 9));
  float* q = s.mem.get();
  auto take = [&](int64_t n) {
    float* r = q;
    q += round_up(n, 16);  // 64-byte aligned pieces
    return r;
  };
  for (const auto& l : p.layers) {
    float* z = take(l.out * Bp);
    s.z.push_back(z);
    s.h.push_back(l.act == kIdentity ? z : take(l.out * Bp));
  }
  s.xt = take(nxt);
  s.xp = take(nxp);
  s.g0 = take(gmax * Bp);
  s.g1 = take(gmax * Bp);
  s.ta = take(p.B * ipmax);
  s.stat_m = take(Bp);
  s.stat_s = take(Bp);
  s.grad = take(ngrad);
  return s;
}

// The loss of model n on its output out^T [C, Bp]; writes dOut^T (padding zero) into
// g and returns the loss.
template <int L>
MB_INLINE float loss_and_grad(const Problem& p, int64_t n, const float* out, int64_t C,
                              float* g, Scratch& s) {
  using M = VMath<L>;
  using V = typename M::V;
  const int64_t B = p.B, Bp = p.Bp;
  const float seed = p.scale ? p.scale[n] : 1.0f;
  if (p.loss == kCrossEntropy) {
    const int64_t* t = p.t_cls + (p.shared_t ? 0 : n * B);
    float* m = s.stat_m;
    float* sum = s.stat_s;
    // Per sample: max over the classes, exp(z - max) into g, and their sum.
    for (int64_t j = 0; j < Bp; j += L) {
      V mx;  // (a NaN logit makes its sample's exp sum, and so the loss, NaN)
      std::memcpy(&mx, out + j, sizeof(V));
      for (int64_t c = 1; c < C; ++c) {
        V v;
        std::memcpy(&v, out + c * Bp + j, sizeof(V));
        mx = M::vmax(mx, v);
      }
      V acc = V{};
      for (int64_t c = 0; c < C; ++c) {
        V v;
        std::memcpy(&v, out + c * Bp + j, sizeof(V));
        const V e = M::exp(v - mx);
        std::memcpy(g + c * Bp + j, &e, sizeof(V));
        acc += e;
      }
      std::memcpy(m + j, &mx, sizeof(V));
      std::memcpy(sum + j, &acc, sizeof(V));
    }
    double total = 0.0;
    int64_t count = 0;
    for (int64_t b = 0; b < B; ++b) {
      if (t[b] == p.ignore_index) continue;
      total += double(m[b]) + std::log(double(sum[b])) - double(out[t[b] * Bp + b]);
      ++count;
    }
    // softmax * seed / count - seed / count at the target; zero for ignored samples
    // and padding lanes (the per-lane factor, built in place of the sums).
    const float w = count > 0 ? seed / float(count) : 0.0f;
    for (int64_t b = 0; b < Bp; ++b) {
      const bool valid = b < B && t[b] != p.ignore_index;
      sum[b] = valid ? w / sum[b] : 0.0f;
    }
    for (int64_t c = 0; c < C; ++c) {
      for (int64_t j = 0; j < Bp; j += L) {
        V e, f;
        std::memcpy(&e, g + c * Bp + j, sizeof(V));
        std::memcpy(&f, sum + j, sizeof(V));
        e *= f;
        std::memcpy(g + c * Bp + j, &e, sizeof(V));
      }
    }
    for (int64_t b = 0; b < B; ++b)
      if (t[b] != p.ignore_index) g[t[b] * Bp + b] -= w;
    return count > 0 ? float(total / double(count)) : std::nanf("");
  }
  // Mean squared error over the B x C outputs.
  const float* t = p.t_reg + (p.shared_t ? 0 : n * B * C);
  const float w = 2.0f * seed / float(B * C);
  double total = 0.0;
  std::memset(g, 0, sizeof(float) * C * Bp);
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t c = 0; c < C; ++c) {
      const float d = out[c * Bp + b] - t[b * C + c];
      total += double(d) * double(d);
      g[c * Bp + b] = w * d;
    }
  }
  return float(total / double(B * C));
}

// Forward, loss and backward of model n.
template <typename KS, int L = KS::kL>
MB_INLINE void one_model(const Problem& p, int64_t n, Scratch& s, float* const* gw,
                         float* const* gb) {
  const int64_t B = p.B, Bp = p.Bp, nl = int64_t(p.layers.size());
  const Layer& first = p.layers[0];
  const int64_t I0 = first.in, Ip0 = round_up(I0, L);
  // The input in both layouts: x^T [I0, Bp] for the forward, x [B, I0 (padded)] for
  // the first layer's weight gradient.
  const float* xt = p.xt_shared;
  const float* xp = p.xp_shared;
  int64_t ldxp = Ip0;
  if (!p.shared_x) {
    const float* xn = p.x + n * B * I0;
    transpose_copy<float, L>(xn, I0, B, I0, s.xt, Bp);
    xt = s.xt;
    if (I0 % L == 0) {
      xp = xn;
      ldxp = I0;
    } else {
      for (int64_t b = 0; b < B; ++b) std::memcpy(s.xp + b * Ip0, xn + b * I0, I0 * 4);
      xp = s.xp;
    }
  }
  // Forward.
  const float* a = xt;
  for (int64_t l = 0; l < nl; ++l) {
    const Layer& ly = p.layers[l];
    const float* w = ly.w + n * ly.out * ly.in;
    const float* b = ly.b ? ly.b + n * ly.out : nullptr;
    gemm<KS>(ly.out, ly.in, w, ly.in, 1, a, Bp, s.z[l], Bp, Bp, b);
    if (ly.act != kIdentity) act_forward<L>(ly.act, s.z[l], s.h[l], ly.out * Bp);
    a = s.h[l];
  }
  // Loss and its gradient.
  float* g = s.g0;
  float* g_next = s.g1;
  p.losses[n] = loss_and_grad<L>(p, n, a, p.layers[nl - 1].out, g, s);
  // Backward.
  for (int64_t l = nl - 1; l >= 0; --l) {
    const Layer& ly = p.layers[l];
    const int64_t O = ly.out, I = ly.in;
    if (ly.act != kIdentity) act_backward<L>(ly.act, s.z[l], s.h[l], g, O * Bp);
    if (gb[l]) row_sums<L>(g, O, Bp, gb[l]);
    const float* ab = xp;  // this layer's input, batch-major
    int64_t ldab = ldxp;
    if (l > 0) {
      const int64_t Ip = round_up(I, L);
      transpose_copy<float, L>(s.h[l - 1], Bp, I, B, s.ta, Ip);
      ab = s.ta;
      ldab = Ip;
    }
    gemm<KS>(O, B, g, Bp, 1, ab, ldab, gw[l], I, I, nullptr);
    if (l > 0) {
      const float* w = ly.w + n * O * I;
      gemm<KS>(I, O, w, 1, I, g, Bp, g_next, Bp, Bp, nullptr);
      std::swap(g, g_next);
    }
  }
}

// Model n's update from its gradients in s.grad: skipped (state and step count
// untouched) when its loss or gradient norm is not finite; with a max norm the
// gradients are scaled by min(max_norm / (norm + 1e-6), 1) first, as
// TrainStep's clipping does.
MB_INLINE void adam_model(const Problem& p, int64_t n, Scratch& s) {
  const AdamArgs& a = *p.adam;
  float* g = s.grad;
  bool skip = !std::isfinite(p.losses[n]);
  if (a.max_norm) {
    double sq = 0.0;
    for (int64_t i = 0; i < a.per_model; ++i) sq += double(g[i]) * double(g[i]);
    const float norm = float(std::sqrt(sq));
    skip = skip || !std::isfinite(norm);
    const float coef = std::min(a.max_norm[n] / (norm + 1e-6f), 1.0f);
    for (int64_t i = 0; i < a.per_model; ++i) g[i] *= coef;
  }
  if (skip) return;
  a.steps[n] += 1.0;
  const AdamScalars<float> sc =
      adam_scalars<float>(a.steps[n], a.lr[n], a.beta1[n], a.beta2[n], a.eps[n],
                          a.weight_decay[n], a.amsgrad[n] != 0.0, a.decoupled, false, 1.0f,
                          /*recip=*/true);
  for (size_t k = 0; k < a.p.size(); ++k) {
    const int64_t e = a.numel[k], o = n * e;
    adam_dispatch<float, float, true>(a.p[k] + o, g, a.m[k] + o, a.v[k] + o,
                                      a.vmax[k] ? a.vmax[k] + o : nullptr, e, sc);
    g += e;
  }
}

template <typename KS>
MB_INLINE void run_range(const Problem& p, int64_t n0, int64_t n1) {
  Scratch s = make_scratch<KS::kL>(p);
  const size_t nl = p.layers.size();
  std::vector<float*> gw(nl), gb(nl);
  for (int64_t n = n0; n < n1; ++n) {
    float* g = s.grad;
    for (size_t l = 0; l < nl; ++l) {
      const Layer& ly = p.layers[l];
      if (p.adam) {  // into the scratch, in the gradient order
        gw[l] = g;
        g += ly.out * ly.in;
        gb[l] = ly.b ? g : nullptr;
        g += ly.b ? ly.out : 0;
      } else {
        gw[l] = ly.gw + n * ly.out * ly.in;
        gb[l] = ly.gb ? ly.gb + n * ly.out : nullptr;
      }
    }
    one_model<KS>(p, n, s, gw.data(), gb.data());
    if (p.adam) adam_model(p, n, s);
  }
}

// The kernels of one ISA: the tiles of each width, and the loop over models.
#define MB_FUSED_SET(NAME, ATTR, LANES, MAXNV)                                              \
  struct NAME {                                                                          \
    static constexpr int kL = LANES;                                                     \
    static constexpr int kMaxNV = MAXNV;                                                 \
    ATTR static void b1(const Block<float>& b) { block_nv<LANES, 1>(b); }                \
    ATTR static void b2(const Block<float>& b) { block_nv<LANES, 2>(b); }                \
    ATTR static void b3(const Block<float>& b) { block_nv<LANES, 3>(b); }                \
    ATTR static void b4(const Block<float>& b) {                                         \
      if constexpr (MAXNV >= 4) block_nv<LANES, 4>(b);                                   \
    }                                                                                    \
    ATTR static void run(const Problem& p, int64_t n0, int64_t n1) {                     \
      run_range<NAME>(p, n0, n1);                                                        \
    }                                                                                    \
  };

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MB_FUSED_X86 1
MB_FUSED_SET(Avx512, __attribute__((target("avx512f,fma"), noinline)), 16, 4)
MB_FUSED_SET(Avx2, __attribute__((target("avx2,fma"), noinline)), 8, 3)
#else
#define MB_FUSED_X86 0
#endif
MB_FUSED_SET(Generic, __attribute__((noinline)), 4, 3)
#undef MB_FUSED_SET

// Lanes of the widest kernels this CPU runs; MODELBATCH_FUSED_MLP_ISA=avx2 / generic
// caps them (read per call; for tests and benchmarks).
int lanes() {
#if MB_FUSED_X86
  static const int cpu = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return 16;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return 8;
    return 4;
  }();
  const char* cap = std::getenv("MODELBATCH_FUSED_MLP_ISA");
  if (cap && std::strcmp(cap, "generic") == 0) return 4;
  if (cap && std::strcmp(cap, "avx2") == 0) return std::min(cpu, 8);
  return cpu;
#else
  return 4;
#endif
}

void check_float(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat, kOp, ": ", what,
              " must be a float32 CPU tensor, got ", t.scalar_type(), " on ", t.device());
}

// One call's problem and the tensors its pointers refer to.
struct Prepared {
  Problem p;
  std::vector<at::Tensor> keep;   // contiguous inputs the pointers refer to
  std::vector<at::Tensor> grads;  // fused_mlp_loss_grad's outputs
  at::Tensor x, target, scale, losses, xt_shared, xp_shared;
};

// Checks the arguments and fills P. in_place: the weights and biases are updated
// where they are (fused_mlp_adam_step), so they must be contiguous; otherwise
// gradient outputs are allocated.
void prepare(Prepared& P, const char* op, const at::Tensor& x_in, const at::Tensor& target_in,
             const std::vector<at::Tensor>& weights,
             const std::vector<c10::optional<at::Tensor>>& biases,
             at::IntArrayRef activations, int64_t loss, int64_t ignore_index,
             const c10::optional<at::Tensor>& grad_scale, bool in_place) {
  const int64_t nl = int64_t(weights.size());
  TORCH_CHECK(nl >= 1, op, ": needs at least one layer");
  TORCH_CHECK(int64_t(biases.size()) == nl && int64_t(activations.size()) == nl, op,
              ": weights, biases and activations must have one entry per layer, got ", nl,
              ", ", biases.size(), " and ", activations.size());
  TORCH_CHECK(loss == kCrossEntropy || loss == kMse, op, ": loss must be 0 (cross-entropy) ",
              "or 1 (mse), got ", loss);
  check_float(x_in, "x");
  Problem& p = P.p;
  const at::Tensor& w0 = weights[0];
  TORCH_CHECK(w0.dim() == 3, op, ": weights must be [N, out, in], got ", w0.sizes());
  p.N = w0.size(0);
  p.shared_x = x_in.dim() == 2;
  TORCH_CHECK(x_in.dim() == 2 || (x_in.dim() == 3 && x_in.size(0) == p.N), op,
              ": x must be [B, in] (shared) or [N, B, in] with N = ", p.N, ", got ",
              x_in.sizes());
  P.x = x_in.contiguous();
  const at::Tensor& x = P.x;
  p.B = x.size(-2);
  TORCH_CHECK(p.B >= 1, op, ": empty batch");
  TORCH_CHECK(x.size(-1) == w0.size(2), op, ": x has ", x.size(-1), " features, the first ",
              "layer takes ", w0.size(2));
  auto use = [&](const at::Tensor& t, const char* what, int64_t l) -> float* {
    TORCH_CHECK(!in_place || t.is_contiguous(), op, ": ", what, " ", l,
                " must be contiguous (it is updated in place)");
    P.keep.push_back(t.contiguous());
    return P.keep.back().data_ptr<float>();
  };
  int64_t prev = w0.size(2);
  for (int64_t l = 0; l < nl; ++l) {
    const at::Tensor& w = weights[l];
    check_float(w, "every weight");
    TORCH_CHECK(w.dim() == 3 && w.size(0) == p.N && w.size(2) == prev, op, ": weight ", l,
                " must be [", p.N, ", out, ", prev, "], got ", w.sizes());
    const int64_t act = activations[l];
    TORCH_CHECK(act >= 0 && act < kNumActs, op, ": unknown activation code ", act);
    Layer ly{w.size(2), w.size(1), act, nullptr, nullptr, nullptr, nullptr};
    ly.w = use(w, "weight", l);
    if (!in_place) {
      P.grads.push_back(at::empty_like(P.keep.back()));
      ly.gw = P.grads.back().data_ptr<float>();
    }
    const c10::optional<at::Tensor>& b = biases[l];
    if (b.has_value() && b->defined()) {
      check_float(*b, "every bias");
      TORCH_CHECK(b->dim() == 2 && b->size(0) == p.N && b->size(1) == ly.out, op, ": bias ",
                  l, " must be [", p.N, ", ", ly.out, "], got ", b->sizes());
      ly.b = use(*b, "bias", l);
      if (!in_place) {
        P.grads.push_back(at::empty_like(P.keep.back()));
        ly.gb = P.grads.back().data_ptr<float>();
      }
    }
    p.layers.push_back(ly);
    prev = ly.out;
  }
  const int64_t C = prev;
  P.target = target_in.contiguous();
  const at::Tensor& target = P.target;
  if (loss == kCrossEntropy) {
    TORCH_CHECK(target.scalar_type() == at::kLong && target.device().is_cpu(), op,
                ": cross-entropy targets must be int64 class indices on the CPU, got ",
                target.scalar_type());
    TORCH_CHECK((target.dim() == 1 && target.size(0) == p.B) ||
                    (target.dim() == 2 && target.size(0) == p.N && target.size(1) == p.B),
                op, ": cross-entropy targets must be [B] or [N, B] with B = ", p.B, ", N = ",
                p.N, ", got ", target.sizes());
    p.shared_t = target.dim() == 1;
    p.t_cls = target.data_ptr<int64_t>();
    const int64_t* t = p.t_cls;
    for (int64_t i = 0, e = target.numel(); i < e; ++i) {
      TORCH_CHECK(t[i] == ignore_index || (t[i] >= 0 && t[i] < C), op, ": target ", t[i],
                  " is out of bounds for ", C, " classes");
    }
    p.t_reg = nullptr;
  } else {
    check_float(target, "an mse target");
    TORCH_CHECK((target.dim() == 2 && target.size(0) == p.B && target.size(1) == C) ||
                    (target.dim() == 3 && target.size(0) == p.N && target.size(1) == p.B &&
                     target.size(2) == C),
                op, ": mse targets must be [B, ", C, "] or [N, B, ", C, "], got ",
                target.sizes());
    p.shared_t = target.dim() == 2;
    p.t_reg = target.data_ptr<float>();
    p.t_cls = nullptr;
  }
  p.loss = loss;
  p.ignore_index = ignore_index;
  p.scale = nullptr;
  if (grad_scale.has_value() && grad_scale->defined()) {
    P.scale = grad_scale->to(at::kFloat).contiguous();
    TORCH_CHECK(P.scale.device().is_cpu() && P.scale.numel() == p.N, op,
                ": grad_scale must hold N = ", p.N, " values on the CPU, got ",
                P.scale.sizes());
    p.scale = P.scale.data_ptr<float>();
  }
  P.losses = at::empty({p.N}, x.options());
  p.losses = P.losses.data_ptr<float>();
  p.x = x.data_ptr<float>();
}

// Runs every model of a prepared problem over the threads.
void launch(Prepared& P) {
  Problem& p = P.p;
  if (p.N == 0) return;
  const int L = lanes();
  p.Bp = round_up(p.B, L);
  if (p.shared_x) {
    const at::Tensor& x = P.x;
    const int64_t I0 = p.layers[0].in, Ip0 = round_up(I0, L);
    P.xt_shared = at::zeros({I0, p.Bp}, x.options());
    P.xt_shared.narrow(1, 0, p.B).copy_(x.t());
    P.xp_shared = at::zeros({p.B, Ip0}, x.options());
    P.xp_shared.narrow(1, 0, I0).copy_(x);
    p.xt_shared = P.xt_shared.data_ptr<float>();
    p.xp_shared = P.xp_shared.data_ptr<float>();
  }
  at::parallel_for(0, p.N, 1, [&](int64_t n0, int64_t n1) {
#if MB_FUSED_X86
    if (L == 16) return Avx512::run(p, n0, n1);
    if (L == 8) return Avx2::run(p, n0, n1);
#endif
    Generic::run(p, n0, n1);
  });
}

std::tuple<at::Tensor, std::vector<at::Tensor>> fused_mlp_loss_grad_cpu(
    const at::Tensor& x, const at::Tensor& target, at::TensorList weights,
    const c10::List<c10::optional<at::Tensor>>& biases, at::IntArrayRef activations,
    int64_t loss, int64_t ignore_index, const c10::optional<at::Tensor>& grad_scale) {
  Prepared P;
  std::vector<c10::optional<at::Tensor>> bs;
  for (size_t l = 0; l < biases.size(); ++l) bs.push_back(biases.get(l));
  prepare(P, kOp, x, target, weights.vec(), bs, activations, loss, ignore_index, grad_scale,
          false);
  launch(P);
  return {P.losses, P.grads};
}

// modelbatch::fused_mlp_adam_step: fused_mlp_loss_grad followed, model by model while
// its gradients are in the cache, by clipping (optional max_norm [N]) and the
// Adam / AdamW update of modelbatch::adam_step (same hyper-parameter tensors, step
// counts and skip rule: a model whose loss or gradient norm is not finite keeps its
// parameters, state and step count). params are w0, b0, w1, b1, ... with biased[l]
// saying whether layer l has a bias; returns the losses [N].
at::Tensor fused_mlp_adam_step_cpu(
    const at::Tensor& x, const at::Tensor& target, at::TensorList params, at::IntArrayRef biased,
    at::IntArrayRef activations, int64_t loss, int64_t ignore_index, at::TensorList exp_avgs,
    at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs, const at::Tensor& steps,
    const at::Tensor& lr, const at::Tensor& beta1, const at::Tensor& beta2,
    const at::Tensor& eps, const at::Tensor& weight_decay, const at::Tensor& amsgrad,
    bool decoupled_weight_decay, const c10::optional<at::Tensor>& max_norm) {
  constexpr const char* op = "modelbatch::fused_mlp_adam_step";
  std::vector<at::Tensor> ws;
  std::vector<c10::optional<at::Tensor>> bs;
  size_t k = 0;
  for (int64_t has_bias : biased) {
    TORCH_CHECK(k < params.size(), op, ": params has fewer tensors than biased describes");
    ws.push_back(params[k++]);
    if (has_bias) {
      TORCH_CHECK(k < params.size(), op, ": params has fewer tensors than biased describes");
      bs.push_back(params[k++]);
    } else {
      bs.push_back(c10::nullopt);
    }
  }
  TORCH_CHECK(k == params.size(), op, ": params has ", params.size(),
              " tensors, biased describes ", k);
  Prepared P;
  prepare(P, op, x, target, ws, bs, activations, loss, ignore_index, c10::nullopt, true);
  const int64_t n = check_params(params, steps, op);
  check_like(params, exp_avgs, op, "exp_avgs", n);
  check_like(params, exp_avg_sqs, op, "exp_avg_sqs", n);
  AdamArgs a;
  a.lr = hparam(lr, n, op, "lr");
  a.beta1 = hparam(beta1, n, op, "beta1");
  a.beta2 = hparam(beta2, n, op, "beta2");
  a.eps = hparam(eps, n, op, "eps");
  a.weight_decay = hparam(weight_decay, n, op, "weight_decay");
  a.amsgrad = hparam(amsgrad, n, op, "amsgrad");
  bool any_ams = false;
  for (double v : a.amsgrad) any_ams = any_ams || v != 0.0;
  if (any_ams) check_like(params, max_exp_avg_sqs, op, "max_exp_avg_sqs", n);
  TORCH_CHECK(steps.device().is_cpu() && steps.scalar_type() == at::kDouble &&
                  steps.is_contiguous(),
              op, ": steps must be a contiguous float64 CPU tensor");
  a.steps = steps.data_ptr<double>();
  a.decoupled = decoupled_weight_decay;
  at::Tensor mn;
  if (max_norm.has_value() && max_norm->defined()) {
    mn = max_norm->to(at::kFloat).contiguous();
    TORCH_CHECK(mn.device().is_cpu() && mn.numel() == n, op, ": max_norm must hold N = ", n,
                " values on the CPU, got ", mn.sizes());
    a.max_norm = mn.data_ptr<float>();
  }
  for (size_t t = 0; t < params.size(); ++t) {
    TORCH_CHECK(exp_avgs[t].is_contiguous() && exp_avg_sqs[t].is_contiguous() &&
                    (!any_ams || max_exp_avg_sqs[t].is_contiguous()),
                op, ": the optimizer state must be contiguous");
    a.p.push_back(params[t].data_ptr<float>());
    a.m.push_back(exp_avgs[t].data_ptr<float>());
    a.v.push_back(exp_avg_sqs[t].data_ptr<float>());
    a.vmax.push_back(any_ams ? max_exp_avg_sqs[t].data_ptr<float>() : nullptr);
    a.numel.push_back(n ? params[t].numel() / n : 0);
    a.per_model += a.numel.back();
  }
  P.p.adam = &a;
  launch(P);
  return P.losses;
}

}  // namespace

TORCH_LIBRARY_IMPL(modelbatch, CPU, m) {
  m.impl("fused_mlp_loss_grad", &fused_mlp_loss_grad_cpu);
  m.impl("fused_mlp_adam_step", &fused_mlp_adam_step_cpu);
}

}  // namespace modelbatch
