// Register-tiled GEMM pieces shared by the CPU kernels (csrc/small_bmm.cpp,
// csrc/fused_mlp.cpp): GCC vector types, in-register transposes, packing and the
// MR x NV register tile C[R, cols] = X[R, K] @ Y[K, cols] (X broadcast element by
// element with any strides, Y rows contiguous), with its row loop.
//
// Everything is MB_INLINE header code in an anonymous namespace: each kernel file
// instantiates it inside its own functions compiled for a target ISA
// (__attribute__((target("avx512f,fma"))) and the like), so the same source becomes
// AVX-512, AVX2 or baseline code.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>

#pragma GCC diagnostic ignored "-Wpsabi"

#define MB_INLINE inline __attribute__((always_inline))

namespace modelbatch {
namespace {

template <typename T, int L>
struct VecOf {
  typedef T type __attribute__((vector_size(L * sizeof(T))));
};

// ---------------------------------------------------------------------------
// Packing

// One stage of an in-register L x L transpose: rows i and i + H (i & H == 0) swap
// the off-diagonal H-blocks of every 2H-wide column group. Stages H = L/2, ..., 1
// transpose the tile (log2(L) stages of L two-source shuffles each).
template <int L, int H, typename V, int... I>
MB_INLINE void transpose_stage(V (&r)[L], std::integer_sequence<int, I...>) {
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i) {
    if (i & H) continue;
    const V x = r[i], y = r[i + H];
    r[i] = __builtin_shufflevector(x, y, ((I % (2 * H) < H) ? I : L + I - H)...);
    r[i + H] = __builtin_shufflevector(x, y, ((I % (2 * H) < H) ? I + H : L + I)...);
  }
}

// The 16 x 16 float transpose in the shuffles that AVX-512 does in one cheap
// instruction each (unpcklps/unpckhps, shufps, then shuff32x4 twice); the generic
// stages above need the two-source vpermt2ps, which is slower on some CPUs.
typedef float v16f __attribute__((vector_size(64)));
MB_INLINE void transpose16x16(v16f (&r)[16]) {
  v16f t[16];
#pragma GCC unroll 8
  for (int i = 0; i < 16; i += 2) {  // unpacklo / unpackhi of row pairs
    t[i] = __builtin_shufflevector(r[i], r[i + 1], 0, 16, 1, 17, 4, 20, 5, 21, 8, 24, 9, 25, 12,
                                   28, 13, 29);
    t[i + 1] = __builtin_shufflevector(r[i], r[i + 1], 2, 18, 3, 19, 6, 22, 7, 23, 10, 26, 11,
                                       27, 14, 30, 15, 31);
  }
#pragma GCC unroll 4
  for (int i = 0; i < 16; i += 4) {  // shufps 0x44 / 0xee
    r[i] = __builtin_shufflevector(t[i], t[i + 2], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12,
                                   13, 28, 29);
    r[i + 1] = __builtin_shufflevector(t[i], t[i + 2], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26,
                                       27, 14, 15, 30, 31);
    r[i + 2] = __builtin_shufflevector(t[i + 1], t[i + 3], 0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24,
                                       25, 12, 13, 28, 29);
    r[i + 3] = __builtin_shufflevector(t[i + 1], t[i + 3], 2, 3, 18, 19, 6, 7, 22, 23, 10, 11,
                                       26, 27, 14, 15, 30, 31);
  }
  // shuff32x4 0x88 / 0xdd: 128-bit lanes (0, 2) / (1, 3) of a, then of b.
#define MB_SHUF88(a, b) \
  __builtin_shufflevector(a, b, 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
#define MB_SHUFDD(a, b) \
  __builtin_shufflevector(a, b, 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29, 30, 31)
#pragma GCC unroll 2
  for (int h = 0; h < 16; h += 8) {
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) {
      t[h + i] = MB_SHUF88(r[h + i], r[h + i + 4]);
      t[h + i + 4] = MB_SHUFDD(r[h + i], r[h + i + 4]);
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) {
    r[i] = MB_SHUF88(t[i], t[i + 8]);
    r[i + 8] = MB_SHUFDD(t[i], t[i + 8]);
  }
#undef MB_SHUF88
#undef MB_SHUFDD
}

// dst[c * ldd + r] = src[r * lds + c] for one L x L tile.
template <typename T, int L>
MB_INLINE void transpose_tile(const T* src, int64_t lds, T* dst, int64_t ldd) {
  using V = typename VecOf<T, L>::type;
  using Seq = std::make_integer_sequence<int, L>;
  V r[L];
  // Pointer bumps rather than src + i * lds: L row offsets would not fit in the
  // general-purpose registers.
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i, src += lds) std::memcpy(&r[i], src, sizeof(V));
  if constexpr (std::is_same_v<T, float> && L == 16) {
    transpose16x16(r);
  } else {
    if constexpr (L >= 16) transpose_stage<L, 8>(r, Seq{});
    if constexpr (L >= 8) transpose_stage<L, 4>(r, Seq{});
    if constexpr (L >= 4) transpose_stage<L, 2>(r, Seq{});
    transpose_stage<L, 1>(r, Seq{});
  }
#pragma GCC unroll 16
  for (int i = 0; i < L; ++i, dst += ldd) std::memcpy(dst, &r[i], sizeof(V));
}

// dst[c * ldd + r] = src[r * lds + c] for an R x C block: L x L tiles through
// registers, the edges element by element.
template <typename T, int L>
MB_INLINE void transpose_copy(const T* src, int64_t lds, int64_t R, int64_t C, T* dst,
                              int64_t ldd) {
  const int64_t R0 = R - R % L, C0 = C - C % L;
  for (int64_t r = 0; r < R0; r += L) {
    for (int64_t c = 0; c < C0; c += L)
      transpose_tile<T, L>(src + r * lds + c, lds, dst + c * ldd + r, ldd);
    for (int64_t c = C0; c < C; ++c)
      for (int64_t i = r; i < r + L; ++i) dst[c * ldd + i] = src[i * lds + c];
  }
  for (int64_t r = R0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) dst[c * ldd + r] = src[r * lds + c];
}

// dst[k * Cpad + c] = src[k * sk + c * sc] for k < K, c < C. The padding columns
// [C, Cpad) are left alone: the scratch buffers are zeroed once per call.
template <typename T, int L>
MB_INLINE void pack(const T* src, int64_t sk, int64_t sc, int64_t K, int64_t C, int64_t Cpad,
                    T* dst) {
  if (sc == 1 && C * int64_t(sizeof(T)) >= 64) {
    for (int64_t k = 0; k < K; ++k) std::memcpy(dst + k * Cpad, src + k * sk, C * sizeof(T));
  } else if (sc != 1 && sk == 1) {
    transpose_copy<T, L>(src, sc, C, K, dst, Cpad);
  } else {
    for (int64_t k = 0; k < K; ++k)
      for (int64_t c = 0; c < C; ++c) dst[k * Cpad + c] = src[k * sk + c * sc];
  }
}

// ---------------------------------------------------------------------------
// The register tile: MR rows x NV vectors of C, all K. XK1: X rows are contiguous
// (one register fewer in the K loop).

// The next model's operands, fetched into the cache while this one computes: each
// tile's K loop prefetches K lines (one per iteration), handed out in order from
// up to two byte ranges (memory-bound shapes would otherwise wait on every line).
struct Prefetch {
  const char* seg[2] = {nullptr, nullptr};
  int64_t len[2] = {0, 0};
  int nseg = 0, cur = 0;
  int64_t pos = 0;
  void add(const void* p, int64_t bytes) {
    seg[nseg] = static_cast<const char*>(p);
    len[nseg++] = bytes;
  }
  // The start of the next `bytes` to prefetch, or null when all are handed out.
  const char* take(int64_t bytes) {
    while (cur < nseg && pos >= len[cur]) ++cur, pos = 0;
    if (cur >= nseg) return nullptr;
    const char* q = seg[cur] + std::max<int64_t>(0, std::min(pos, len[cur] - bytes));
    pos += bytes;
    return q;
  }
};

template <typename T, int L, int MR, int NV, bool XK1>
MB_INLINE void tile(int64_t K, const T* __restrict x, int64_t xr, int64_t xk_,
                    const T* __restrict y, int64_t ldy, T* __restrict out, int64_t ldo,
                    int64_t ncols, const T* cbias, const T* rbias, int64_t rbs, Prefetch* pf) {
  using V = typename VecOf<T, L>::type;
  const int64_t xk = XK1 ? 1 : xk_;
  const char* pfp = pf ? pf->take(K * 64) : nullptr;
  if (!pfp) pfp = reinterpret_cast<const char*>(y);  // harmless: lines in use
  // U interleaved sets of accumulators when MR * NV alone are too few chains to
  // hide the multiply-add latency (a narrow product with a long K).
  constexpr int U = MR * NV >= 4 ? 1 : (4 + MR * NV - 1) / (MR * NV);
  V acc[U][MR][NV];
#pragma GCC unroll 4
  for (int u = 0; u < U; ++u)
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[u][i][j] = V{};
  const T* xp[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) xp[i] = x + i * xr;
  int64_t off = 0;
  const T* const yend = y + K * ldy;
  if constexpr (U > 1) {
    for (const T* const ymain = y + (K - K % U) * ldy; y != ymain;) {
#pragma GCC unroll 4
      for (int u = 0; u < U; ++u, y += ldy, off += xk) {
        V b[NV];
#pragma GCC unroll 4
        for (int j = 0; j < NV; ++j) std::memcpy(&b[j], y + j * L, sizeof(V));
#pragma GCC unroll 16
        for (int i = 0; i < MR; ++i) {
          const V a = xp[i][off] - V{};
#pragma GCC unroll 4
          for (int j = 0; j < NV; ++j) acc[u][i][j] += a * b[j];
        }
      }
    }
  }
  for (; y != yend; y += ldy, off += xk, pfp += 64) {
    __builtin_prefetch(pfp, 0, 3);
    V b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) std::memcpy(&b[j], y + j * L, sizeof(V));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const V a = xp[i][off] - V{};  // a splat (x - 0 is x, -0 included)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[0][i][j] += a * b[j];
    }
  }
#pragma GCC unroll 4
  for (int u = 1; u < U; ++u)
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[0][i][j] += acc[u][i][j];
  // Write the valid columns; the bias per column (packed, padded) or per row.
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) {
    T* o = out + i * ldo;
    V rb = V{};
    if (rbias) rb = rbias[i * rbs] - V{};
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      V v = acc[0][i][j];
      if (cbias) {
        V cb;
        std::memcpy(&cb, cbias + j * L, sizeof(V));
        v += cb;
      }
      if (rbias) v += rb;
      const int64_t n = ncols - j * L;
      if (n >= L) {
        std::memcpy(o + j * L, &v, sizeof(V));
      } else if (n > 0) {
        T t[L];
        std::memcpy(t, &v, sizeof(V));
        for (int64_t l = 0; l < n; ++l) o[j * L + l] = t[l];
      }
    }
  }
}

// One column block of C: all R rows, NV vectors (or fewer valid columns).
template <typename T>
struct Block {
  int64_t R, K;
  const T* x;       // X(r, k) = x[r * xr + k * xk]
  int64_t xr, xk;
  const T* y;       // Y(k, j) = y[k * ldy + j], readable for all NV * L columns
  int64_t ldy;
  T* out;           // C(r, j) = out[r * ldo + j], j < ncols written
  int64_t ldo, ncols;
  const T* cbias;   // per column, NV * L readable, or null
  const T* rbias;   // per row: rbias[r * rbs], or null
  int64_t rbs;
  Prefetch* pf;     // the next model's lines to prefetch, or null
};

template <typename T, int L, int MR, int NV, bool XK1>
MB_INLINE void column_block(const Block<T>& b) {
  int64_t r = 0;
  for (; r + MR <= b.R; r += MR)
    tile<T, L, MR, NV, XK1>(b.K, b.x + r * b.xr, b.xr, b.xk, b.y, b.ldy, b.out + r * b.ldo,
                            b.ldo, b.ncols, b.cbias, b.rbias ? b.rbias + r * b.rbs : nullptr,
                            b.rbs, b.pf);
  const int64_t rest = b.R - r;
  if (rest == 0) return;
  const T* x = b.x + r * b.xr;
  T* out = b.out + r * b.ldo;
  const T* rbias = b.rbias ? b.rbias + r * b.rbs : nullptr;
#define MB_REST(m)                                                                          \
  case m:                                                                                   \
    if constexpr (m < MR)                                                                   \
      tile<T, L, m, NV, XK1>(b.K, x, b.xr, b.xk, b.y, b.ldy, out, b.ldo, b.ncols, b.cbias,  \
                             rbias, b.rbs, b.pf);                                           \
    break;
  switch (rest) {
    MB_REST(1)
    MB_REST(2)
    MB_REST(3)
    MB_REST(4)
    MB_REST(5)
    MB_REST(6)
    MB_REST(7)
    MB_REST(8)
    MB_REST(9)
    MB_REST(10)
    MB_REST(11)
    default:
      break;
  }
#undef MB_REST
}

template <typename T, int L, int MR, int NV>
MB_INLINE void column_block_any(const Block<T>& b) {
  if (b.xk == 1) column_block<T, L, MR, NV, true>(b);
  else column_block<T, L, MR, NV, false>(b);
}

}  // namespace
}  // namespace modelbatch
