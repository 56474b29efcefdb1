// modelbatch::small_bmm on the CPU: out[n] = op(a[n]) @ op(b[n]) (+ bias[n]) for N
// small matrices at once, op = transpose of the last two dims when its flag is set.
//
// torch.bmm hands each of the N products to MKL/oneDNN, whose per-product overhead
// and blocking are made for large matrices: at 32 x 32 x 32 it reaches about half of
// the machine's GEMM rate, far less for narrow products. This kernel is a register-
// blocked GEMM per model, near the FMA peak at those sizes (benchmarks/
// bench_small_bmm.py):
//
//   C[R, C] = X[R, K] @ Y[K, C]. MR x NV vectors of C stay in registers over the
//   whole K loop; each step broadcasts MR elements of X (so X is read in place,
//   with any strides) against NV vectors of a row of Y. Y is read in place when it
//   has unit column stride and is small; otherwise it is packed into column panels
//   [K, NV * lanes] in thread-local scratch (a vectorised in-register transpose when
//   its rows are strided, e.g. W of x @ W^T), once per call when it is shared by all
//   models (batch stride 0).
//
// Per call a small cost model picks one of three ways: normal (X = op(a), Y = op(b),
// C written straight into the output), transposed (X = op(b)^T, Y = op(a)^T; C^T
// goes to scratch and is transposed into the output), which keeps the vector lanes
// full when P is small and M is not, or, when op(a) and op(b)^T are both contiguous
// along K (x @ W^T), a dot-product kernel (TM x TP accumulator vectors along K,
// summed across lanes at the end) for narrow products such as a layer with 1 to 10
// outputs, where packing or transposing would cost more than the multiply-adds.
//
// Work is spread over the threads by model (by model and row chunk when there are
// fewer models than threads); while one model computes, the next one's operands
// are prefetched, one cache line per K step.
//
// float32 and float64 on x86-64 CPUs with AVX2 + FMA (AVX-512 kernels when the CPU
// has it, chosen at run time). Everything else goes to at::bmm / at::baddbmm with
// the same semantics: other dtypes, other CPUs, and per-model products past
// kMaxWork / kMaxK, where cache blocking (which this kernel does not do) matters.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <new>
#include <numeric>
#include <string>
#include <type_traits>
#include <utility>

#include "gemm_tile.h"

namespace modelbatch {
namespace {

constexpr const char* kOp = "modelbatch::small_bmm";

// Products with more than kMaxWork multiply-adds per model, or a longer K than
// kMaxK, go to at::bmm. This kernel does not block for the caches (a column panel
// of Y, K x 32 floats, should stay in L2), which MKL does; on the AMD EPYC (Zen 4)
// this was tuned on the kernel still beat at::bmm at 512 x 512 x 512 and at
// K = 65536, so the limits are where matrices stop being small rather than where
// the kernel was seen to lose (benchmarks/bench_small_bmm.py --threshold times the
// sizes around them).
constexpr int64_t kMaxWork = int64_t(1) << 24;  // 256 x 256 x 256
constexpr int64_t kMaxK = 8192;
// Below kMinWork multiply-adds per model (e.g. 4 x 4 x 4), the per-model overhead
// of this kernel (~30 ns) exceeds at::bmm's.
constexpr int64_t kMinWork = 128;
// Y with unit column stride is read in place (not packed) if its K rows span at most
// this many bytes, or if only one row tile reads it.
constexpr int64_t kMaxDirectBytes = 16 << 10;

// ---------------------------------------------------------------------------
// The dot-product kernel, for x @ W^T shapes (op(a) and op(b)^T both contiguous
// along K) with a narrow side: few outputs (a regression or classifier head) or
// few rows. C[m, p] = x_m . w_p with TM x TP accumulator vectors along K, summed
// across their lanes at the end: no packing, no transposes, which would otherwise
// cost more than the multiply-adds.

template <typename T>
struct DotArgs {
  int64_t M, P, K;   // rows [m0, M) of this unit; all P columns
  const T* a;        // row m: a + m * am, contiguous along K
  int64_t am;
  const T* b;        // row p of op(b)^T: b + p * bp, contiguous along K
  int64_t bp;
  T* out;            // C(m, p) = out[m * ldo + p]
  int64_t ldo;
  const T* bias;     // bias[p * bs], or null
  int64_t bs;
  int64_t m0;
};

// One stage of the lane sums of L accumulators: pairs (r[i], r[i + H]), i < H, each
// fold half of their 2H-lane groups into the other half. After the stages H = L/2,
// ..., 1, lane e of r[0] holds the sum of all lanes of accumulator e.
template <int L, int H, typename V, int... I>
MB_INLINE void fold_stage(V* r, std::integer_sequence<int, I...>) {
#pragma GCC unroll 16
  for (int i = 0; i < H; ++i) {
    const V x = r[i], y = r[i + H];
    r[i] = __builtin_shufflevector(x, y, ((I % (2 * H) < H) ? I : L + I - H)...) +
           __builtin_shufflevector(x, y, ((I % (2 * H) < H) ? I + H : L + I)...);
  }
}

template <typename T, int L, typename V>
MB_INLINE void fold(V* r) {
  using Seq = std::make_integer_sequence<int, L>;
  if constexpr (L >= 16) fold_stage<L, 8>(r, Seq{});
  if constexpr (L >= 8) fold_stage<L, 4>(r, Seq{});
  if constexpr (L >= 4) fold_stage<L, 2>(r, Seq{});
  fold_stage<L, 1>(r, Seq{});
}

template <typename T, int L, int... I>
MB_INLINE auto lane_ids(std::integer_sequence<int, I...>) {
  using IT = std::conditional_t<sizeof(T) == 4, int32_t, int64_t>;
  typedef IT IV __attribute__((vector_size(L * sizeof(T))));
  return IV{IT(I)...};
}

template <typename T, int L, int TM, int TP>
MB_INLINE void dot_tile(const DotArgs<T>& d, int64_t m0, int64_t p0) {
  using V = typename VecOf<T, L>::type;
  using IV = decltype(lane_ids<T, L>(std::make_integer_sequence<int, L>{}));
  constexpr int NA = TM * TP, NG = (NA + L - 1) / L;
  const T* ap[TM];
  const T* bq[TP];
  // Rows / columns past the end repeat the last one (computed, never stored).
#pragma GCC unroll 16
  for (int i = 0; i < TM; ++i) ap[i] = d.a + std::min<int64_t>(m0 + i, d.M - 1) * d.am;
#pragma GCC unroll 16
  for (int j = 0; j < TP; ++j) bq[j] = d.b + std::min<int64_t>(p0 + j, d.P - 1) * d.bp;
  V acc[NG * L];
#pragma GCC unroll 16
  for (int t = 0; t < NG * L; ++t) acc[t] = V{};
  const int64_t K = d.K, K0 = K - K % L;
  const int64_t mi = std::min<int64_t>(TM, d.M - m0), pj = std::min<int64_t>(TP, d.P - p0);
  if constexpr (TP <= 2) {
    // One or two outputs (memory-bound, like a matrix-vector product): row by row,
    // the K loop inside, so x is read in its memory order, a stream the hardware
    // prefetchers follow; the rows' K loops are independent, so they overlap.
#pragma GCC unroll 16
    for (int i = 0; i < TM; ++i) {
      if (i >= mi) break;
      for (int64_t k = 0; k < K0; k += L) {
        V av;
        // 8 lines ahead in the stream: the hardware prefetchers alone fall behind.
        __builtin_prefetch(reinterpret_cast<const char*>(ap[i] + k) + 512, 0, 3);
        std::memcpy(&av, ap[i] + k, sizeof(V));
#pragma GCC unroll 16
        for (int j = 0; j < TP; ++j) {
          V bv;
          std::memcpy(&bv, bq[j] + k, sizeof(V));
          acc[i * TP + j] += av * bv;
        }
      }
    }
  } else {
    // TM + TP loads feed TM * TP multiply-adds per K vector.
    for (int64_t k = 0; k < K0; k += L) {
      V av[TM], bv[TP];
#pragma GCC unroll 16
      for (int i = 0; i < TM; ++i) std::memcpy(&av[i], ap[i] + k, sizeof(V));
#pragma GCC unroll 16
      for (int j = 0; j < TP; ++j) std::memcpy(&bv[j], bq[j] + k, sizeof(V));
#pragma GCC unroll 16
      for (int i = 0; i < TM; ++i)
#pragma GCC unroll 16
        for (int j = 0; j < TP; ++j) acc[i * TP + j] += av[i] * bv[j];
    }
  }
  if (K0 < K) {
    // The last K % L elements: a vector ending at K with the lanes already summed
    // zeroed (in both operands: 0 * inf would be NaN), or zero-padded copies.
    V av[TM], bv[TP];
    if (K >= L) {
      using IT = std::remove_reference_t<decltype(IV{}[0])>;
      const IV keep = lane_ids<T, L>(std::make_integer_sequence<int, L>{}) >=
                      IV{} + static_cast<IT>(K0 + L - K);
#pragma GCC unroll 16
      for (int i = 0; i < TM; ++i) {
        std::memcpy(&av[i], ap[i] + K - L, sizeof(V));
        av[i] = (V)((IV)av[i] & keep);
      }
#pragma GCC unroll 16
      for (int j = 0; j < TP; ++j) {
        std::memcpy(&bv[j], bq[j] + K - L, sizeof(V));
        bv[j] = (V)((IV)bv[j] & keep);
      }
    } else {
      T t[L];
#pragma GCC unroll 16
      for (int i = 0; i < TM; ++i) {
        std::memset(t, 0, sizeof(t));
        std::memcpy(t, ap[i], K * sizeof(T));
        std::memcpy(&av[i], t, sizeof(V));
      }
#pragma GCC unroll 16
      for (int j = 0; j < TP; ++j) {
        std::memset(t, 0, sizeof(t));
        std::memcpy(t, bq[j], K * sizeof(T));
        std::memcpy(&bv[j], t, sizeof(V));
      }
    }
#pragma GCC unroll 16
    for (int i = 0; i < TM; ++i)
#pragma GCC unroll 16
      for (int j = 0; j < TP; ++j) acc[i * TP + j] += av[i] * bv[j];
  }
  // Lane sums: accumulator t = i * TP + j ends in lane t % L of acc[t - t % L].
#pragma GCC unroll 4
  for (int g = 0; g < NG; ++g) fold<T, L>(acc + g * L);
  T sums[NG * L];
#pragma GCC unroll 4
  for (int g = 0; g < NG; ++g) std::memcpy(sums + g * L, &acc[g * L], sizeof(V));
  for (int64_t i = 0; i < mi; ++i) {
    T* o = d.out + (m0 + i) * d.ldo + p0;
    for (int64_t j = 0; j < pj; ++j)
      o[j] = d.bias ? sums[i * TP + j] + d.bias[(p0 + j) * d.bs] : sums[i * TP + j];
  }
}

// All tiles of rows [m0, M), in tiles of one of five shapes (see dot_shape).
template <typename T, int L, int TM, int TP>
MB_INLINE void dot_rows(const DotArgs<T>& d) {
  for (int64_t m = d.m0; m < d.M; m += TM)
    for (int64_t p = 0; p < d.P; p += TP) dot_tile<T, L, TM, TP>(d, m, p);
}

template <typename T, int L, int NA>
MB_INLINE void dot_block(const DotArgs<T>& d, int shape) {
  if constexpr (NA == 16) {
    switch (shape) {
      case 1: dot_rows<T, L, 8, 2>(d); break;
      case 2: dot_rows<T, L, 16, 1>(d); break;
      case 3: dot_rows<T, L, 2, 8>(d); break;
      case 4: dot_rows<T, L, 1, 16>(d); break;
      default: dot_rows<T, L, 4, 4>(d); break;
    }
  } else {
    switch (shape) {
      case 2: dot_rows<T, L, 8, 1>(d); break;
      case 3: dot_rows<T, L, 2, 4>(d); break;
      case 4: dot_rows<T, L, 1, 8>(d); break;
      default: dot_rows<T, L, 4, 2>(d); break;
    }
  }
}

// The tile shapes of dot_block, (TM, TP) for NA accumulators.
inline void dot_shape(int na, int shape, int64_t* tm, int64_t* tp) {
  static const int s16[5][2] = {{4, 4}, {8, 2}, {16, 1}, {2, 8}, {1, 16}};
  static const int s8[5][2] = {{4, 2}, {4, 2}, {8, 1}, {2, 4}, {1, 8}};
  const int(*t)[2] = na == 16 ? s16 : s8;
  *tm = t[shape][0];
  *tp = t[shape][1];
}

// ---------------------------------------------------------------------------
// Kernel sets, one per vector ISA and dtype. Each member is its own (not inlined)
// function compiled for its ISA: the tiles get all the vector registers to
// themselves (one big function would keep transpose constants live across them
// and spill the accumulators).

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MB_HAVE_X86_KERNELS 1

#define MB_KERNEL_SET(NAME, TARGET, TYPE, LANES, MR, NV, MR1, NA)                          \
  struct NAME {                                                                            \
    using T = TYPE;                                                                        \
    static constexpr int kDotAcc = NA;     /* accumulators of a dot tile */                \
    __attribute__((target(TARGET), noinline)) static void dot(const DotArgs<T>& d,         \
                                                              int shape) {                 \
      dot_block<T, LANES, NA>(d, shape);                                                   \
    }                                                                                      \
    static constexpr int kL = LANES;       /* vector lanes */                              \
    static constexpr int kW = LANES * NV;  /* columns of a wide block */                   \
    static constexpr int kGrain = std::lcm(MR, MR1); /* rows of a work unit: a multiple */ \
    __attribute__((target(TARGET), noinline)) static void wide(const Block<T>& b) {        \
      column_block_any<T, LANES, MR, NV>(b);                                               \
    }                                                                                      \
    __attribute__((target(TARGET), noinline)) static void narrow(const Block<T>& b) {      \
      column_block_any<T, LANES, MR1, 1>(b);                                               \
    }                                                                                      \
    __attribute__((target(TARGET), noinline)) static void pack_block(                      \
        const T* src, int64_t sk, int64_t sc, int64_t K, int64_t C, int64_t Cpad, T* dst) {\
      pack<T, LANES>(src, sk, sc, K, C, Cpad, dst);                                        \
    }                                                                                      \
    __attribute__((target(TARGET), noinline)) static void transpose(                       \
        const T* src, int64_t lds, int64_t R, int64_t C, T* dst, int64_t ldd) {            \
      transpose_copy<T, LANES>(src, lds, R, C, dst, ldd);                                  \
    }                                                                                      \
  };

// Tiles (rows x vectors): zmm has 32 registers, ymm 16.
MB_KERNEL_SET(Avx512F32, "avx512f,fma", float, 16, 8, 2, 8, 16)
MB_KERNEL_SET(Avx512F64, "avx512f,fma", double, 8, 4, 2, 8, 16)
MB_KERNEL_SET(Avx2F32, "avx2,fma", float, 8, 4, 2, 6, 8)
MB_KERNEL_SET(Avx2F64, "avx2,fma", double, 4, 4, 2, 6, 8)
#undef MB_KERNEL_SET
#else
#define MB_HAVE_X86_KERNELS 0
#endif

// ---------------------------------------------------------------------------
// One call's plan: the orientation, the operands as (pointer, strides) per model.

template <typename T>
struct Plan {
  int64_t N, R, C, K;          // computed product C[R, C] = X[R, K] @ Y[K, C]
  bool transposed;             // C is out[n]^T (R = P, C = M)
  int dot = -1;                // >= 0: the dot-product kernel, tiles of this shape
  const T* x;                  // X(n, r, k) = x[n * xn + r * xr + k * xk]
  int64_t xn, xr, xk;
  const T* y;                  // Y(n, k, c) = y[n * yn + k * yk + c * yc]
  int64_t yn, yk, yc;
  const T* bias;               // bias(n, p) = bias[n * bn + p * bp], or null
  int64_t bn, bp;
  T* out;                      // [N, M, P] contiguous
  int64_t M, P;
  int64_t Cpad;                // C rounded up to the vector length
  int64_t S;                   // row chunks per model (work units: N * S)
  bool pack_y;                 // Y is packed (in column panels), else read in place
  const T* shared_y;           // Y packed once (batch stride 0), or null
};

struct AlignedFree {
  void operator()(void* p) const { ::operator delete(p, std::align_val_t(64)); }
};

template <typename T>
std::unique_ptr<T, AlignedFree> scratch(int64_t n) {
  return std::unique_ptr<T, AlignedFree>(
      static_cast<T*>(::operator new(std::max<int64_t>(n, 1) * sizeof(T), std::align_val_t(64))));
}

template <typename T>
int64_t scratch_size(const Plan<T>& p, int L) {
  int64_t s = 0;
  if (p.pack_y && !p.shared_y) s += p.K * p.Cpad;  // packed Y
  if (!p.pack_y && p.C % L) s += p.K * L;          // padded tail columns of Y
  s += p.Cpad;                                     // packed bias
  if (p.transposed) s += p.R * p.Cpad;             // C^T before its transpose
  return s;
}

constexpr int64_t kPrefetchMax = 256 << 10;

// Elements spanned by an [R, C] matrix with strides (sr, sc), and the offset of
// its lowest element from its first (strides may be negative or zero).
inline int64_t span(int64_t R, int64_t sr, int64_t C, int64_t sc) {
  return (R - 1) * std::abs(sr) + (C - 1) * std::abs(sc) + 1;
}
inline int64_t low(int64_t R, int64_t sr, int64_t C, int64_t sc) {
  return std::min<int64_t>(0, (R - 1) * sr) + std::min<int64_t>(0, (C - 1) * sc);
}

// Y packed in column panels of kW columns (the last one narrower, a multiple of
// kL), each a contiguous [K, width] block, so a panel's rows never collide in the
// cache; zero beyond column C.
template <typename KS, typename T = typename KS::T>
void pack_panels(const T* src, int64_t sk, int64_t sc, int64_t K, int64_t C, int64_t Cpad,
                 T* dst) {
  for (int64_t c0 = 0; c0 < Cpad; c0 += KS::kW) {
    const int64_t w = std::min<int64_t>(KS::kW, Cpad - c0);
    KS::pack_block(src + c0 * sc, sk, sc, K, std::min<int64_t>(w, C - c0), w, dst + c0 * K);
  }
}

// Work units [u0, u1): unit u is rows [r0, r1) of model u / S (S = p.S row chunks
// per model; S > 1 only when there are too few models to keep every thread busy).
template <typename KS, typename T = typename KS::T>
void run_units(const Plan<T>& p, int64_t u0, int64_t u1, T* buf) {
  constexpr int64_t L = KS::kL, W = KS::kW;
  const int64_t R = p.R, C = p.C, K = p.K, Cpad = p.Cpad, S = p.S;
  T* ybuf = buf;
  if (p.pack_y && !p.shared_y) buf += K * Cpad;
  T* tailbuf = buf;
  if (!p.pack_y && C % L) buf += K * L;
  T* bbuf = buf;
  buf += Cpad;
  T* cbuf = buf;
  Block<T> b{};
  b.K = K;
  b.xr = p.xr;
  b.xk = p.xk;
  // Where C goes: straight to out[n] (normal), or to scratch then transposed.
  b.ldo = p.transposed ? Cpad : p.P;
  b.rbs = p.bp;
  const int64_t ncols = p.transposed ? Cpad : C;  // columns worth writing
  // The next model's X and Y, where each is a compact block (a dense matrix in
  // any layout) of at most kPrefetchMax bytes.
  const int64_t x_ext = span(R, p.xr, K, p.xk), y_ext = span(K, p.yk, C, p.yc);
  const bool pf_x = S == 1 && p.xn != 0 && x_ext <= 2 * R * K &&
                    x_ext * int64_t(sizeof(T)) <= kPrefetchMax;
  const bool pf_y = S == 1 && p.yn != 0 && !p.shared_y && y_ext <= 2 * K * C &&
                    y_ext * int64_t(sizeof(T)) <= kPrefetchMax;
  Prefetch pf;
  int64_t packed = -1;  // the model whose Y (or Y tail) is in ybuf (tailbuf)
  for (int64_t u = u0; u < u1; ++u) {
    const int64_t n = u / S, s = u % S;
    const int64_t r0 = s == 0 ? 0 : R * s / S / KS::kGrain * KS::kGrain;
    const int64_t r1 = s + 1 == S ? R : R * (s + 1) / S / KS::kGrain * KS::kGrain;
    if (r0 >= r1) continue;
    if (p.dot >= 0) {
      // x (X, rows of op(a)) and W (Y, rows of op(b)^T), both contiguous along K.
      DotArgs<T> d{};
      d.M = r1, d.P = C, d.K = K;
      d.a = p.x + n * p.xn, d.am = p.xr;
      d.b = p.y + n * p.yn, d.bp = p.yc;
      d.out = p.out + n * p.M * p.P, d.ldo = p.P;
      d.bias = p.bias ? p.bias + n * p.bn : nullptr, d.bs = p.bp;
      d.m0 = r0;
      KS::dot(d, p.dot);
      continue;
    }
    b.R = r1 - r0;
    b.x = p.x + n * p.xn + r0 * p.xr;
    pf = Prefetch{};
    if (n + 1 < u1) {
      if (pf_x) pf.add(p.x + (n + 1) * p.xn + low(R, p.xr, K, p.xk), x_ext * sizeof(T));
      if (pf_y) pf.add(p.y + (n + 1) * p.yn + low(K, p.yk, C, p.yc), y_ext * sizeof(T));
    }
    b.pf = pf.nseg ? &pf : nullptr;
    T* out = p.out + n * p.M * p.P;
    T* c_dst = p.transposed ? cbuf : out + r0 * p.P;
    const T* cbias = nullptr;
    b.rbias = nullptr;
    if (p.bias) {
      const T* bsrc = p.bias + n * p.bn;
      if (p.transposed) {
        b.rbias = bsrc + r0 * p.bp;
      } else {
        for (int64_t c = 0; c < C; ++c) bbuf[c] = bsrc[c * p.bp];
        for (int64_t c = C; c < Cpad; ++c) bbuf[c] = T(0);
        cbias = bbuf;
      }
    }
    // Column c of C: its block's Y pointer and row stride.
    auto run = [&](bool wide, int64_t c, const T* y, int64_t ldy) {
      b.y = y;
      b.ldy = ldy;
      b.out = c_dst + c;
      b.ncols = ncols - c;
      b.cbias = cbias ? cbias + c : nullptr;
      if (wide) KS::wide(b);
      else KS::narrow(b);
    };
    if (p.pack_y) {
      // Y in panels: full ones of W columns, then one of the remaining multiple of L.
      const T* yb = p.shared_y;
      if (!yb) {
        if (packed != n) pack_panels<KS>(p.y + n * p.yn, p.yk, p.yc, K, C, Cpad, ybuf);
        packed = n;
        yb = ybuf;
      }
      int64_t c = 0;
      for (; c + W <= Cpad; c += W) run(true, c, yb + c * K, W);
      const int64_t w = Cpad - c;
      for (int64_t j = 0; j < w; j += L) run(false, c + j, yb + c * K + j, w);
    } else {
      // Y read in place (unit column stride, small enough for L1): blocks of W
      // then L columns; the last < L columns from a zero-padded copy.
      const T* y = p.y + n * p.yn;
      const int64_t Cfull = C - C % L;
      if (Cfull < C && packed != n)
        KS::pack_block(y + Cfull, p.yk, 1, K, C - Cfull, L, tailbuf);
      packed = n;
      int64_t c = 0;
      for (; c + W <= Cfull; c += W) run(true, c, y + c, p.yk);
      for (; c < Cfull; c += L) run(false, c, y + c, p.yk);
      if (Cfull < C) run(false, c, tailbuf, L);
    }
    if (p.transposed) KS::transpose(cbuf, Cpad, r1 - r0, C, out + r0, p.P);
  }
}

#if MB_HAVE_X86_KERNELS
enum class Isa { kNone, kAvx2, kAvx512 };

// The widest kernels the CPU runs; MODELBATCH_SMALL_BMM_ISA=avx2 caps them at AVX2
// and =none sends every call to at::bmm (for tests and benchmarks; read per call).
Isa detect_isa() {
  static const Isa cpu = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("fma")) return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kNone;
  }();
  const char* cap = std::getenv("MODELBATCH_SMALL_BMM_ISA");
  if (cap && std::strcmp(cap, "none") == 0) return Isa::kNone;
  if (cap && std::strcmp(cap, "avx2") == 0 && cpu == Isa::kAvx512) return Isa::kAvx2;
  return cpu;
}

#endif

// ---------------------------------------------------------------------------
// The op

at::Tensor fallback(const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b,
                    const c10::optional<at::Tensor>& bias) {
  const auto A = trans_a ? a.transpose(1, 2) : a;
  const auto B = trans_b ? b.transpose(1, 2) : b;
  if (bias.has_value()) {
    return at::baddbmm(bias->unsqueeze(1), A, B).contiguous();
  }
  return at::bmm(A, B).contiguous();
}

void check_args(const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b,
                const c10::optional<at::Tensor>& bias) {
  TORCH_CHECK(a.dim() == 3, kOp, ": a must be 3-D, [N, M, K]", trans_a ? " (trans_a: [N, K, M])" : "",
              ", got shape ", a.sizes());
  TORCH_CHECK(b.dim() == 3, kOp, ": b must be 3-D, [N, K, P]", trans_b ? " (trans_b: [N, P, K])" : "",
              ", got shape ", b.sizes());
  const int64_t N = a.size(0), K = a.size(trans_a ? 1 : 2);
  const int64_t Kb = b.size(trans_b ? 2 : 1), P = b.size(trans_b ? 1 : 2);
  TORCH_CHECK(b.size(0) == N && Kb == K, kOp, ": a has shape ", a.sizes(),
              trans_a ? " ([N, K, M] with trans_a)" : " ([N, M, K])", ", so b must be ",
              trans_b ? "[N, P, K] = [" : "[N, K, P] = [", N, ", ", trans_b ? "P" : std::to_string(K),
              ", ", trans_b ? std::to_string(K) : "P", "], got shape ", b.sizes());
  TORCH_CHECK(b.scalar_type() == a.scalar_type(), kOp, ": a and b must have the same dtype, got ",
              a.scalar_type(), " and ", b.scalar_type());
  TORCH_CHECK(b.device() == a.device(), kOp, ": a and b must be on the same device, got ",
              a.device(), " and ", b.device());
  if (bias.has_value()) {
    const auto& c = *bias;
    TORCH_CHECK(c.dim() == 2 && c.size(0) == N && c.size(1) == P, kOp,
                ": bias must be [N, P] = [", N, ", ", P, "], got shape ", c.sizes());
    TORCH_CHECK(c.scalar_type() == a.scalar_type(), kOp, ": bias must have the dtype of a (",
                a.scalar_type(), "), got ", c.scalar_type());
    TORCH_CHECK(c.device() == a.device(), kOp, ": bias must be on the device of a (", a.device(),
                "), got ", c.device());
  }
}

#if MB_HAVE_X86_KERNELS
// Estimated cost (in vector multiply-adds) of one orientation, per model.
struct Choice {
  double cost;
  bool pack_y;
  bool shared_y;
};

Choice estimate(int64_t N, int64_t R, int64_t C, int64_t K, int64_t yn, int64_t yk, int64_t yc,
                int L, int64_t elem, bool transposed) {
  const int64_t Cpad = (C + L - 1) / L * L;
  double cost = double(R) * double(Cpad / L) * double(K);
  // Row-tile overhead: per tile, the K loop's loads and the write-out.
  cost += double((R + 3) / 4) * double(Cpad / L) * (0.25 * double(K) + 8.0);
  // Y is read in place when it has unit column stride, and either its K rows span
  // few enough bytes to stay in L1 (long strided rows collide in its sets) or it is
  // read by one row tile only.
  const bool pack_y = yc != 1 || (K * std::abs(yk) * elem > kMaxDirectBytes && R > 8);
  const bool shared_y = pack_y && yn == 0 && N > 1;
  if (pack_y) {
    // Per element: a row copy ~0.1 vector op, a transposing pack ~0.4, a gather ~1.5.
    double per = (yc == 1 ? 0.1 : yk == 1 ? 0.4 : 1.5) * double(K) * double(C);
    cost += shared_y ? per / double(N) : per;
  } else if (C % L) {
    cost += double(K);  // the padded tail copy
  }
  if (transposed) cost += double(R) * double(Cpad) / L + 0.4 * double(R) * double(C);
  return {cost, pack_y, shared_y};
}

template <typename KS>
void run_kernel(const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b,
                const c10::optional<at::Tensor>& bias, at::Tensor& out) {
  using T = typename KS::T;
  constexpr int L = KS::kL;
  const int64_t N = a.size(0);
  const int64_t M = out.size(1), P = out.size(2), K = a.size(trans_a ? 1 : 2);
  // op(a)(m, k) and op(b)(k, p) as (batch, row, col) strides.
  const int64_t an = a.stride(0), am = a.stride(trans_a ? 2 : 1), ak = a.stride(trans_a ? 1 : 2);
  const int64_t bn = b.stride(0), bk = b.stride(trans_b ? 2 : 1), bp = b.stride(trans_b ? 1 : 2);
  // Normal: X = op(a) [M, K], Y = op(b) [K, P]. Transposed: X = op(b)^T [P, K],
  // Y = op(a)^T [K, M]. Size-1 dims may have any stride: give them unit stride.
  const int64_t bp1 = P == 1 ? 1 : bp, am1 = M == 1 ? 1 : am;
  const int64_t elem = sizeof(T);
  const Choice normal = estimate(N, M, P, K, bn, bk, bp1, L, elem, false);
  const Choice trans = estimate(N, P, M, K, an, ak, am1, L, elem, true);
  // The dot-product kernel needs op(a) rows and op(b) columns contiguous along K.
  double dot_cost = 1e300;
  int dot_shape_id = -1;
  if (K == 1 || (ak == 1 && bk == 1)) {
    for (int sh = 0; sh < 5; ++sh) {
      int64_t tm, tp;
      dot_shape(KS::kDotAcc, sh, &tm, &tp);
      // Per column block: rows x TP multiply-adds per K vector (rows past M are
      // skipped when TP <= 2, computed otherwise), and per tile the lane sums and
      // stores.
      const int64_t tiles_m = (M + tm - 1) / tm, rows = tp <= 2 ? M : tiles_m * tm;
      const double c = double((P + tp - 1) / tp) *
                       (double(rows * tp) * double((K + L - 1) / L) +
                        double(tiles_m) * (40.0 + 2.0 * double(tm + tp)));
      if (c < dot_cost) dot_cost = c, dot_shape_id = sh;
    }
  }
  Plan<T> p{};
  p.N = N;
  p.M = M;
  p.P = P;
  p.K = K;
  p.transposed = trans.cost < normal.cost;
  if (dot_cost < std::min(normal.cost, trans.cost)) {
    p.dot = dot_shape_id;
    p.transposed = false;
    p.R = M, p.C = P;
    p.x = a.data_ptr<T>(), p.xn = an, p.xr = am, p.xk = 1;
    p.y = b.data_ptr<T>(), p.yn = bn, p.yk = 1, p.yc = bp;
    p.pack_y = false;
  } else if (!p.transposed) {
    p.R = M, p.C = P;
    p.x = a.data_ptr<T>(), p.xn = an, p.xr = am, p.xk = ak;
    p.y = b.data_ptr<T>(), p.yn = bn, p.yk = bk, p.yc = bp1;
    p.pack_y = normal.pack_y;
  } else {
    p.R = P, p.C = M;
    p.x = b.data_ptr<T>(), p.xn = bn, p.xr = bp, p.xk = bk;
    p.y = a.data_ptr<T>(), p.yn = an, p.yk = ak, p.yc = am1;
    p.pack_y = trans.pack_y;
  }
  p.Cpad = (p.C + L - 1) / L * L;
  if (bias.has_value()) {
    p.bias = bias->data_ptr<T>();
    p.bn = bias->stride(0);
    p.bp = bias->stride(1);
  }
  p.out = out.data_ptr<T>();
  std::unique_ptr<T, AlignedFree> shared;
  if (p.pack_y && p.yn == 0 && N > 1) {
    shared = scratch<T>(p.K * p.Cpad);
    std::memset(shared.get(), 0, p.K * p.Cpad * sizeof(T));
    pack_panels<KS>(p.y, p.yk, p.yc, p.K, p.C, p.Cpad, shared.get());
    p.shared_y = shared.get();
  }
  // Too few models to keep the threads busy: split each into row chunks as well
  // (N * S a multiple of the thread count), each chunk at least kGrain rows.
  const int64_t per_model = std::max<int64_t>(1, M * P * std::max<int64_t>(K, 1));
  const int64_t threads = at::get_num_threads();
  p.S = 1;
  if (threads > 1 && N % threads != 0 && N < 8 * threads && per_model >= (int64_t(1) << 15)) {
    p.S = std::min<int64_t>(threads / std::gcd(N, threads),
                            std::max<int64_t>(1, p.R / KS::kGrain));
  }
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 16) * p.S / per_model);
  const int64_t buf_size = scratch_size(p, L);
  at::parallel_for(0, N * p.S, grain, [&](int64_t u0, int64_t u1) {
    auto buf = scratch<T>(buf_size);
    std::memset(buf.get(), 0, buf_size * sizeof(T));  // the zero padding of packed Y
    run_units<KS>(p, u0, u1, buf.get());
  });
}
#endif

at::Tensor small_bmm_cpu(const at::Tensor& a, const at::Tensor& b, bool trans_a, bool trans_b,
                         const c10::optional<at::Tensor>& bias) {
  check_args(a, b, trans_a, trans_b, bias);
  const int64_t N = a.size(0);
  const int64_t M = a.size(trans_a ? 2 : 1), K = a.size(trans_a ? 1 : 2);
  const int64_t P = b.size(trans_b ? 1 : 2);
  const auto dtype = a.scalar_type();
  bool ours = a.device().is_cpu() && (dtype == at::kFloat || dtype == at::kDouble) &&
              K <= kMaxK && M * P * K <= kMaxWork && M * P * K >= kMinWork;
#if MB_HAVE_X86_KERNELS
  const Isa isa = detect_isa();
  ours = ours && isa != Isa::kNone;
#else
  ours = false;
#endif
  if (!ours) return fallback(a, b, trans_a, trans_b, bias);
  auto out = at::empty({N, M, P}, a.options());
  if (out.numel() == 0) return out;
#if MB_HAVE_X86_KERNELS
  const bool avx512 = isa == Isa::kAvx512;
  if (dtype == at::kFloat) {
    if (avx512) run_kernel<Avx512F32>(a, b, trans_a, trans_b, bias, out);
    else run_kernel<Avx2F32>(a, b, trans_a, trans_b, bias, out);
  } else {
    if (avx512) run_kernel<Avx512F64>(a, b, trans_a, trans_b, bias, out);
    else run_kernel<Avx2F64>(a, b, trans_a, trans_b, bias, out);
  }
#endif
  return out;
}

}  // namespace
}  // namespace modelbatch

TORCH_LIBRARY_IMPL(modelbatch, CPU, m) {
  m.impl("small_bmm", &modelbatch::small_bmm_cpu);
}
