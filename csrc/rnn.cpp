// modelbatch::rnn_layer / rnn_layer_backward on the CPU: the time loop of one
// recurrent layer (LSTM, GRU, RNN_TANH, RNN_RELU; one direction) of N models. The
// semantics (shapes, packed batch_sizes, the workspace layout) and the pure-torch
// oracle are in python/modelbatch/ops/rnn.py.
//
// Work is split over the threads by model, and each thread runs the whole time
// loop of its models one after the other: a model's recurrent weights (packed once
// per model into thread-local scratch) stay in the cache over all T steps, and the
// threads never synchronise between steps. Per model and step:
//
//   forward:  pre = gx[t] + h @ W_hh^T (GRU: b_hh + h @ W_hh^T) into scratch, by a
//             register-blocked GEMM: MR x NV vectors of the output stay in
//             registers over the whole K loop, broadcasting elements of h against
//             rows of the packed W_hh^T, the accumulators starting from gx[t]. Then
//             one fused, vectorised gate loop over the active rows writes ws and
//             out, and the state (h_n and c_n are the state buffers).
//   backward: the gate backward writes d_pre to scratch and d_gx; from the
//             scratch, dh_prev = d_pre @ W_hh and d_w_hh += d_pre^T @ h_prev (and
//             d_w_hr += dh^T @ h_raw) by the same GEMM kernel, the weight
//             gradients accumulating in the output, which stays in the cache.
//
// The big per-step tensors (gx, ws, out, grad_out, d_gx) are touched once each, so
// the loop is as much about memory as about arithmetic: ws, out (forward) and d_gx
// (backward) are written with non-temporal stores (no read of their lines first,
// no eviction of the weights); each GEMM tile prefetches the next tile's rows of
// gx, and the GEMM's K loops fetch the next step's inputs into L2; the pages of
// the freshly allocated outputs are mapped in one madvise call per thread rather
// than faulted in one at a time.
//
// float32 activations are vector polynomials (exp: Cephes; tanh: a rational
// approximation), within a few ulp of torch's; float64 calls libm per element.
// The kernels (csrc/rnn_kernels.h) are compiled three times, for AVX-512, AVX2 and
// the baseline instruction set, and picked at run time. float16 / bfloat16 are
// computed in float32 (inputs converted, outputs converted back), as the oracle
// does.
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
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__linux__)
#include <sys/mman.h>
#endif

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MB_HAVE_X86 1
#include <immintrin.h>
#else
#define MB_HAVE_X86 0
#endif

#pragma GCC diagnostic ignored "-Wpsabi"

#define MB_INLINE inline __attribute__((always_inline))
// A vector of x in every lane (x - 0 is x, -0 included).
#define MB_SPLAT(V, x) ((x) - V{})

namespace modelbatch {
namespace {

constexpr const char* kFwd = "modelbatch::rnn_layer";
constexpr const char* kBwd = "modelbatch::rnn_layer_backward";
constexpr int64_t kLstm = 0, kGru = 1, kRnnTanh = 2, kRnnRelu = 3;
constexpr int64_t kGates[4] = {4, 3, 1, 1};
constexpr int64_t kWsWidth[4] = {5, 4, 0, 0};
// Row strides of packed scratch matrices are multiples of kPad elements (a
// multiple of every vector length), zero padded.
constexpr int64_t kPad = 16;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// dst[c * ldd + r] = src[r * lds + c] for r < R, c < C (a weight's transpose into
// its packed copy; once per model).
template <typename T>
inline void transpose_into(const T* src, int64_t lds, int64_t R, int64_t C, T* dst,
                           int64_t ldd) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) dst[c * ldd + r] = src[r * lds + c];
}

template <typename T>
inline void copy_rows(const T* src, int64_t lds, int64_t R, int64_t C, T* dst, int64_t ldd) {
  for (int64_t r = 0; r < R; ++r) std::memcpy(dst + r * ldd, src + r * lds, C * sizeof(T));
}

// ---------------------------------------------------------------------------
// The problem

// One step of the loop, in forward processing order: time index t, bt active rows;
// the previously processed step (-1 for the first) and its active rows bp.
struct Step {
  int64_t t, bt, prev_t, bp;
};

struct Dims {
  int64_t mode, N, T, B, H, P, G, GH, W;  // W: workspace row width
  bool proj;
  std::vector<Step> steps;
};

std::vector<Step> make_steps(int64_t T, int64_t B, at::IntArrayRef batch_sizes, bool reverse) {
  std::vector<Step> s;
  s.reserve(T);
  int64_t prev_t = -1, bp = 0;
  for (int64_t k = 0; k < T; ++k) {
    const int64_t t = reverse ? T - 1 - k : k;
    const int64_t bt = batch_sizes.empty() ? B : batch_sizes[t];
    s.push_back({t, bt, prev_t, bp});
    prev_t = t;
    bp = bt;
  }
  return s;
}

template <typename T>
struct FwdArgs {
  const Dims* d;
  const T *gx, *w_hh, *b_hh, *w_hr, *h0, *c0;
  T *out, *hn, *cn, *ws;
};

template <typename T>
struct BwdArgs {
  const Dims* d;
  const T *grad_out, *grad_hn, *grad_cn, *w_hh, *b_hh, *w_hr, *h0, *c0, *out, *ws;
  int64_t go_n, go_t;  // grad_out's model and time strides (its [B, P] blocks are dense)
  T *d_gx, *d_w_hh, *d_b_hh, *d_w_hr, *d_h0, *d_c0;
};

// Thread-local scratch sizes (elements); the layouts are in forward_models and
// backward_models (rnn_kernels.h).
int64_t fwd_scratch(const Dims& d) {
  return d.P * round_up(d.GH, kPad)                 // W_hh^T
         + (d.proj ? d.H * round_up(d.P, kPad) : 0)  // W_hr^T
         + (d.proj ? d.B * d.H : 0)                  // h_raw of a step
         + d.B * d.GH;                               // pre-activations of a step
}

int64_t bwd_scratch(const Dims& d) {
  return d.GH * round_up(d.P, kPad)                   // W_hh
         + (d.proj ? d.P * round_up(d.H, kPad) : 0)   // W_hr
         + d.B * d.P                                  // dh
         + (d.proj ? d.B * d.H : 0)                   // dh_raw
         + d.B * round_up(d.P, kPad)                  // h_prev
         + d.B * d.GH                                 // d_pre (GRU: d_gh)
         + (d.proj ? d.B * round_up(d.H, kPad) : 0);  // h_raw
}

// ---------------------------------------------------------------------------
// The kernels, once per instruction set (MR x NV: zmm has 32 registers for the
// MR * NV accumulators, NV row vectors and a broadcast; ymm and xmm 16).

#if MB_HAVE_X86
namespace avx512 {
#pragma GCC push_options
#pragma GCC target("avx512f,fma")
#define MB_RNN_VBYTES 64
#define MB_RNN_MR 8
#define MB_RNN_NV 2
#define MB_RNN_STREAM 512
#include "rnn_kernels.h"
#undef MB_RNN_VBYTES
#undef MB_RNN_MR
#undef MB_RNN_NV
#undef MB_RNN_STREAM
#pragma GCC pop_options
}  // namespace avx512

namespace avx2 {
#pragma GCC push_options
#pragma GCC target("avx2,fma")
#define MB_RNN_VBYTES 32
#define MB_RNN_MR 4
#define MB_RNN_NV 2
#define MB_RNN_STREAM 256
#include "rnn_kernels.h"
#undef MB_RNN_VBYTES
#undef MB_RNN_MR
#undef MB_RNN_NV
#undef MB_RNN_STREAM
#pragma GCC pop_options
}  // namespace avx2
#endif

namespace baseline {
#define MB_RNN_VBYTES 16
#define MB_RNN_MR 4
#define MB_RNN_NV 2
#define MB_RNN_STREAM 0
#include "rnn_kernels.h"
#undef MB_RNN_VBYTES
#undef MB_RNN_MR
#undef MB_RNN_NV
#undef MB_RNN_STREAM
}  // namespace baseline

enum class Isa { kBaseline, kAvx2, kAvx512 };

// The widest kernels the CPU runs; MODELBATCH_RNN_ISA=avx2 or =baseline caps them
// (for tests and benchmarks; read per call).
Isa detect_isa() {
#if MB_HAVE_X86
  static const Isa cpu = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kBaseline;
  }();
  const char* cap = std::getenv("MODELBATCH_RNN_ISA");
  if (cap && std::strcmp(cap, "baseline") == 0) return Isa::kBaseline;
  if (cap && std::strcmp(cap, "avx2") == 0 && cpu == Isa::kAvx512) return Isa::kAvx2;
  return cpu;
#else
  return Isa::kBaseline;
#endif
}

// Map the pages of a freshly allocated output slice in one system call rather than
// one page fault at a time as the kernels first write them (large outputs come
// from mmap, so every call pays for their pages; populating them is up to twice
// cheaper than faulting them in). Best effort: Linux >= 5.14, else nothing.
void populate(void* p, int64_t bytes) {
#if defined(__linux__)
  constexpr int64_t kMin = int64_t(1) << 20;
  constexpr uintptr_t kPage = 4096;
  if (bytes < kMin) return;
  const uintptr_t b = (reinterpret_cast<uintptr_t>(p) + kPage - 1) & ~(kPage - 1);
  const uintptr_t e = (reinterpret_cast<uintptr_t>(p) + bytes) & ~(kPage - 1);
#ifndef MADV_POPULATE_WRITE
#define MADV_POPULATE_WRITE 23
#endif
  if (e > b) madvise(reinterpret_cast<void*>(b), e - b, MADV_POPULATE_WRITE);
#else
  (void)p, (void)bytes;
#endif
}

template <typename T>
void populate_outputs(const FwdArgs<T>& a, int64_t n0, int64_t n1) {
  const Dims& d = *a.d;
  const int64_t rows = d.T * d.B, k = int64_t(sizeof(T));
  populate(a.out + n0 * rows * d.P, (n1 - n0) * rows * d.P * k);
  if (d.W) populate(a.ws + n0 * rows * d.W, (n1 - n0) * rows * d.W * k);
}

template <typename T>
void populate_outputs(const BwdArgs<T>& a, int64_t n0, int64_t n1) {
  const Dims& d = *a.d;
  populate(a.d_gx + n0 * d.T * d.B * d.GH, (n1 - n0) * d.T * d.B * d.GH * int64_t(sizeof(T)));
}

struct AlignedFree {
  void operator()(void* p) const { ::operator delete(p, std::align_val_t(64)); }
};

// Runs the kernels of the CPU's instruction set over the models, split by model
// over the threads, each thread with its own zeroed scratch.
template <typename T, bool FWD, typename Args>
void run(const Args& args, const Dims& d) {
  const int64_t size = std::max<int64_t>(1, FWD ? fwd_scratch(d) : bwd_scratch(d));
  const Isa isa = detect_isa();
  at::parallel_for(0, d.N, 1, [&](int64_t n0, int64_t n1) {
    std::unique_ptr<T, AlignedFree> buf(
        static_cast<T*>(::operator new(size * sizeof(T), std::align_val_t(64))));
    std::memset(buf.get(), 0, size * sizeof(T));
    populate_outputs(args, n0, n1);
#if MB_HAVE_X86
    if (isa == Isa::kAvx512) {
      if constexpr (FWD) avx512::forward_models<T>(args, n0, n1, buf.get());
      else avx512::backward_models<T>(args, n0, n1, buf.get());
      return;
    }
    if (isa == Isa::kAvx2) {
      if constexpr (FWD) avx2::forward_models<T>(args, n0, n1, buf.get());
      else avx2::backward_models<T>(args, n0, n1, buf.get());
      return;
    }
#endif
    (void)isa;
    if constexpr (FWD) baseline::forward_models<T>(args, n0, n1, buf.get());
    else baseline::backward_models<T>(args, n0, n1, buf.get());
  });
}

// ---------------------------------------------------------------------------
// Validation

at::ScalarType compute_type(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16) ? at::kFloat : t;
}

void check_like(const char* op, const char* name, const at::Tensor& x, const at::Tensor& ref,
                at::IntArrayRef shape, const char* what) {
  TORCH_CHECK(x.sizes() == shape, op, ": ", name, " must have shape ", shape, " ", what,
              ", got ", x.sizes());
  TORCH_CHECK(x.scalar_type() == ref.scalar_type(), op, ": ", name, " must have dtype ",
              ref.scalar_type(), " (the dtype of the other inputs), got ", x.scalar_type());
  TORCH_CHECK(x.device() == ref.device(), op, ": ", name, " must be on ", ref.device(),
              ", got ", x.device());
}

void check_mode(const char* op, int64_t mode) {
  TORCH_CHECK(mode >= 0 && mode <= 3, op, ": mode must be 0 (LSTM), 1 (GRU), 2 (RNN_TANH) or ",
              "3 (RNN_RELU), got ", mode);
}

void check_batch_sizes(const char* op, at::IntArrayRef bs, int64_t T, int64_t B) {
  if (bs.empty()) return;
  TORCH_CHECK(static_cast<int64_t>(bs.size()) == T, op,
              ": batch_sizes must be empty or have one entry per time step (T = ", T,
              "), got ", bs.size());
  for (int64_t t = 0; t < T; ++t) {
    TORCH_CHECK(bs[t] >= 0 && bs[t] <= B, op, ": batch_sizes[", t, "] = ", bs[t],
                " is outside [0, B = ", B, "]");
    TORCH_CHECK(t == 0 || bs[t] <= bs[t - 1], op,
                ": batch_sizes must be non-increasing, got batch_sizes[", t - 1, "] = ",
                bs[t - 1], " < batch_sizes[", t, "] = ", bs[t]);
  }
}

// Shapes shared by both ops: mode, w_hh, b_hh, w_hr, h0, c0 against N, B; returns
// the dims (T and batch_sizes filled in by the caller's tensors).
Dims make_dims(const char* op, int64_t mode, int64_t N, int64_t T, int64_t B,
               const at::Tensor& ref, const at::Tensor& w_hh,
               const c10::optional<at::Tensor>& b_hh, const c10::optional<at::Tensor>& w_hr,
               const at::Tensor& h0, const c10::optional<at::Tensor>& c0) {
  Dims d{};
  d.mode = mode;
  d.N = N, d.T = T, d.B = B;
  d.G = kGates[mode];
  TORCH_CHECK(w_hh.dim() == 3 && w_hh.size(0) == N, op, ": w_hh must be [N, G*H, P] with N = ",
              N, ", got shape ", w_hh.sizes());
  d.GH = w_hh.size(1);
  d.P = w_hh.size(2);
  TORCH_CHECK(d.GH % d.G == 0, op, ": w_hh.shape[1] = ", d.GH, " must be ", d.G,
              " * hidden_size for mode ", mode);
  d.H = d.GH / d.G;
  d.proj = w_hr.has_value();
  if (d.proj) {
    TORCH_CHECK(mode == kLstm, op, ": w_hr (a projection) is only for LSTM (mode 0), got mode ",
                mode);
    check_like(op, "w_hr", *w_hr, ref, {N, d.P, d.H}, "([N, P, H])");
  } else {
    TORCH_CHECK(d.P == d.H, op, ": without w_hr, w_hh must be [N, G*H, H], got shape ",
                w_hh.sizes());
  }
  check_like(op, "w_hh", w_hh, ref, {N, d.GH, d.P}, "([N, G*H, P])");
  if (b_hh.has_value() && mode == kGru) check_like(op, "b_hh", *b_hh, ref, {N, d.GH}, "([N, 3H])");
  check_like(op, "h0", h0, ref, {N, B, d.P}, "([N, B, P])");
  if (mode == kLstm) {
    TORCH_CHECK(c0.has_value(), op, ": c0 is required for LSTM (mode 0)");
    check_like(op, "c0", *c0, ref, {N, B, d.H}, "([N, B, H])");
  }
  d.W = kWsWidth[mode] * d.H;
  return d;
}

template <typename T>
const T* ptr_or_null(const at::Tensor& t) {
  return t.defined() ? t.const_data_ptr<T>() : nullptr;
}

// The input in the compute dtype, contiguous (undefined stays undefined).
at::Tensor prep(const c10::optional<at::Tensor>& t, at::ScalarType cd) {
  if (!t.has_value() || !t->defined()) return at::Tensor();
  return t->to(cd).contiguous();
}

// ---------------------------------------------------------------------------
// The ops

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> rnn_layer_cpu(
    int64_t mode, const at::Tensor& gx_in, const at::Tensor& w_hh_in,
    const c10::optional<at::Tensor>& b_hh_in, const c10::optional<at::Tensor>& w_hr_in,
    const at::Tensor& h0_in, const c10::optional<at::Tensor>& c0_in, bool reverse,
    at::IntArrayRef batch_sizes) {
  check_mode(kFwd, mode);
  TORCH_CHECK(gx_in.dim() == 4, kFwd, ": gx must be [N, T, B, G*H], got shape ", gx_in.sizes());
  const auto dtype = gx_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              kFwd, ": unsupported dtype ", dtype);
  const int64_t N = gx_in.size(0), T = gx_in.size(1), B = gx_in.size(2);
  Dims d = make_dims(kFwd, mode, N, T, B, gx_in, w_hh_in, b_hh_in, w_hr_in, h0_in, c0_in);
  TORCH_CHECK(gx_in.size(3) == d.GH, kFwd, ": gx must be [N, T, B, G*H] = [", N, ", ", T, ", ",
              B, ", ", d.GH, "] (G*H from w_hh), got shape ", gx_in.sizes());
  check_batch_sizes(kFwd, batch_sizes, T, B);
  d.steps = make_steps(T, B, batch_sizes, reverse);

  const auto cd = compute_type(dtype);
  const auto gx = gx_in.to(cd).contiguous();
  const auto w_hh = w_hh_in.to(cd).contiguous();
  const auto b_hh = mode == kGru ? prep(b_hh_in, cd) : at::Tensor();
  const auto w_hr = prep(w_hr_in, cd);
  const auto h0 = h0_in.to(cd).contiguous();
  const auto c0 = mode == kLstm ? prep(c0_in, cd) : at::Tensor();
  const auto opts = gx.options();
  auto out = at::empty({N, T, B, d.P}, opts);
  auto hn = at::empty({N, B, d.P}, opts);
  auto cn = mode == kLstm ? at::empty({N, B, d.H}, opts) : at::empty({0}, opts);
  auto ws = at::empty({N, T, B, d.W}, opts);
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES(cd, "rnn_layer_cpu", [&] {
      FwdArgs<scalar_t> a{};
      a.d = &d;
      a.gx = gx.const_data_ptr<scalar_t>();
      a.w_hh = w_hh.const_data_ptr<scalar_t>();
      a.b_hh = ptr_or_null<scalar_t>(b_hh);
      a.w_hr = ptr_or_null<scalar_t>(w_hr);
      a.h0 = h0.const_data_ptr<scalar_t>();
      a.c0 = ptr_or_null<scalar_t>(c0);
      a.out = out.data_ptr<scalar_t>();
      a.hn = hn.data_ptr<scalar_t>();
      a.cn = mode == kLstm ? cn.data_ptr<scalar_t>() : nullptr;
      a.ws = ws.data_ptr<scalar_t>();
      run<scalar_t, true>(a, d);
    });
  }
  if (cd != dtype) {
    out = out.to(dtype), hn = hn.to(dtype), cn = cn.to(dtype), ws = ws.to(dtype);
  }
  return {out, hn, cn, ws};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>
rnn_layer_backward_cpu(int64_t mode, const at::Tensor& grad_out_in, const at::Tensor& grad_hn_in,
                       const c10::optional<at::Tensor>& grad_cn_in, const at::Tensor& w_hh_in,
                       const c10::optional<at::Tensor>& b_hh_in,
                       const c10::optional<at::Tensor>& w_hr_in, const at::Tensor& h0_in,
                       const c10::optional<at::Tensor>& c0_in, const at::Tensor& out_in,
                       const at::Tensor& ws_in, bool reverse, at::IntArrayRef batch_sizes) {
  check_mode(kBwd, mode);
  TORCH_CHECK(out_in.dim() == 4, kBwd, ": out must be [N, T, B, P], got shape ", out_in.sizes());
  const auto dtype = out_in.scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              kBwd, ": unsupported dtype ", dtype);
  const int64_t N = out_in.size(0), T = out_in.size(1), B = out_in.size(2);
  Dims d = make_dims(kBwd, mode, N, T, B, out_in, w_hh_in, b_hh_in, w_hr_in, h0_in, c0_in);
  check_like(kBwd, "out", out_in, out_in, {N, T, B, d.P}, "([N, T, B, P], P from w_hh)");
  check_like(kBwd, "grad_out", grad_out_in, out_in, {N, T, B, d.P}, "(the shape of out)");
  check_like(kBwd, "grad_hn", grad_hn_in, out_in, {N, B, d.P}, "([N, B, P])");
  if (mode == kLstm) {
    TORCH_CHECK(grad_cn_in.has_value(), kBwd, ": grad_cn is required for LSTM (mode 0)");
    check_like(kBwd, "grad_cn", *grad_cn_in, out_in, {N, B, d.H}, "([N, B, H])");
  }
  check_like(kBwd, "ws", ws_in, out_in, {N, T, B, d.W}, "([N, T, B, ws width], from rnn_layer)");
  check_batch_sizes(kBwd, batch_sizes, T, B);
  d.steps = make_steps(T, B, batch_sizes, reverse);

  const auto cd = compute_type(dtype);
  // grad_out is read in place when its [B, P] blocks are dense, whatever its model
  // and time strides (it is often expanded over the models, stride 0).
  auto grad_out = grad_out_in.to(cd);
  const bool dense = (B <= 1 || grad_out.stride(2) == d.P) && (d.P <= 1 || grad_out.stride(3) == 1);
  if (!dense) grad_out = grad_out.contiguous();
  const auto grad_hn = grad_hn_in.to(cd).contiguous();
  const auto grad_cn = mode == kLstm ? prep(grad_cn_in, cd) : at::Tensor();
  const auto w_hh = w_hh_in.to(cd).contiguous();
  const bool has_bias = mode == kGru && b_hh_in.has_value() && b_hh_in->defined();
  const auto w_hr = prep(w_hr_in, cd);
  const auto h0 = h0_in.to(cd).contiguous();
  const auto c0 = mode == kLstm ? prep(c0_in, cd) : at::Tensor();
  const auto out = out_in.to(cd).contiguous();
  const auto ws = ws_in.to(cd).contiguous();
  const auto opts = out.options();
  auto d_gx = at::empty({N, T, B, d.GH}, opts);
  auto d_w_hh = at::empty({N, d.GH, d.P}, opts);
  auto d_b_hh = has_bias ? at::empty({N, d.GH}, opts) : at::empty({0}, opts);
  auto d_w_hr = d.proj ? at::empty({N, d.P, d.H}, opts) : at::empty({0}, opts);
  auto d_h0 = at::empty({N, B, d.P}, opts);
  auto d_c0 = mode == kLstm ? at::empty({N, B, d.H}, opts) : at::empty({0}, opts);
  if (N > 0) {
    AT_DISPATCH_FLOATING_TYPES(cd, "rnn_layer_backward_cpu", [&] {
      BwdArgs<scalar_t> a{};
      a.d = &d;
      a.grad_out = grad_out.const_data_ptr<scalar_t>();
      a.go_n = grad_out.stride(0);
      a.go_t = grad_out.stride(1);
      a.grad_hn = grad_hn.const_data_ptr<scalar_t>();
      a.grad_cn = ptr_or_null<scalar_t>(grad_cn);
      a.w_hh = w_hh.const_data_ptr<scalar_t>();
      a.w_hr = ptr_or_null<scalar_t>(w_hr);
      a.h0 = h0.const_data_ptr<scalar_t>();
      a.c0 = ptr_or_null<scalar_t>(c0);
      a.out = out.const_data_ptr<scalar_t>();
      a.ws = ws.const_data_ptr<scalar_t>();
      a.d_gx = d_gx.data_ptr<scalar_t>();
      a.d_w_hh = d_w_hh.data_ptr<scalar_t>();
      a.d_b_hh = has_bias ? d_b_hh.data_ptr<scalar_t>() : nullptr;
      a.d_w_hr = d.proj ? d_w_hr.data_ptr<scalar_t>() : nullptr;
      a.d_h0 = d_h0.data_ptr<scalar_t>();
      a.d_c0 = mode == kLstm ? d_c0.data_ptr<scalar_t>() : nullptr;
      run<scalar_t, false>(a, d);
    });
  }
  if (cd != dtype) {
    d_gx = d_gx.to(dtype), d_w_hh = d_w_hh.to(dtype), d_b_hh = d_b_hh.to(dtype);
    d_w_hr = d_w_hr.to(dtype), d_h0 = d_h0.to(dtype), d_c0 = d_c0.to(dtype);
  }
  return {d_gx, d_w_hh, d_b_hh, d_w_hr, d_h0, d_c0};
}

}  // namespace
}  // namespace modelbatch

TORCH_LIBRARY_IMPL(modelbatch, CPU, m) {
  m.impl("rnn_layer", &modelbatch::rnn_layer_cpu);
  m.impl("rnn_layer_backward", &modelbatch::rnn_layer_backward_cpu);
}
