// The CPU kernels of modelbatch::rnn_layer / rnn_layer_backward for one vector
// instruction set. csrc/rnn.cpp includes this file once per instruction set, each
// time inside its own namespace and `#pragma GCC target` region, so that every
// function here (the vector helpers included) is compiled for that instruction set
// (so there is no include guard, on purpose). Before including it, rnn.cpp
// defines:
//
//   MB_RNN_VBYTES  bytes of a vector register (64 AVX-512, 32 AVX2, 16 generic)
//   MB_RNN_MR      rows of a GEMM register tile
//   MB_RNN_NV      vectors (of columns) of a GEMM register tile
//   MB_RNN_STREAM  512 / 256: non-temporal stores with AVX-512 / AVX intrinsics;
//                  0: none
//
// and the types Step, Dims, FwdArgs, BwdArgs, the constants kLstm..., kPad and
// round_up (see there for the design).

template <typename T>
struct VecOf {
  typedef T type __attribute__((vector_size(MB_RNN_VBYTES)));
};
template <typename T>
using Vec = typename VecOf<T>::type;
template <typename T>
constexpr int kLanes = MB_RNN_VBYTES / sizeof(T);

// ---------------------------------------------------------------------------
// Loads and stores of the first n lanes (n may exceed L; the rest of a load is 0).

template <typename T>
MB_INLINE Vec<T> load(const T* p, int64_t n) {
  constexpr int L = kLanes<T>;
  Vec<T> v;
  if (n >= L) {
    std::memcpy(&v, p, sizeof(v));
  } else {
    T t[L] = {};
    for (int64_t l = 0; l < n; ++l) t[l] = p[l];
    std::memcpy(&v, t, sizeof(v));
  }
  return v;
}

template <typename T>
MB_INLINE void store(T* p, Vec<T> v, int64_t n) {
  constexpr int L = kLanes<T>;
  if (n >= L) {
    std::memcpy(p, &v, sizeof(v));
  } else {
    T t[L];
    std::memcpy(t, &v, sizeof(v));
    for (int64_t l = 0; l < n; ++l) p[l] = t[l];
  }
}

// A store to memory that is not read again soon (the workspace and the output of
// the forward): when nt, a full vector at an aligned address, written around the
// caches (no read of the line first, no eviction of the weights and the state).
template <typename T>
MB_INLINE void store_out(T* p, Vec<T> v, int64_t n, bool nt) {
#if MB_RNN_STREAM == 512
  if (nt) {
    if constexpr (sizeof(T) == 4) _mm512_stream_ps(p, (__m512)v);
    else _mm512_stream_pd(p, (__m512d)v);
    return;
  }
#elif MB_RNN_STREAM == 256
  if (nt) {
    if constexpr (sizeof(T) == 4) _mm256_stream_ps(p, (__m256)v);
    else _mm256_stream_pd(p, (__m256d)v);
    return;
  }
#else
  (void)nt;
#endif
  store<T>(p, v, n);
}

// Whether rows of `cols` columns (a multiple of the vector length), starting at p
// and ld elements apart, can be written with aligned non-temporal stores.
template <typename T>
inline bool streamable(const T* p, int64_t ld, int64_t cols) {
#if MB_RNN_STREAM
  return reinterpret_cast<uintptr_t>(p) % MB_RNN_VBYTES == 0 &&
         (ld * int64_t(sizeof(T))) % MB_RNN_VBYTES == 0 && cols % kLanes<T> == 0;
#else
  (void)p, (void)ld, (void)cols;
  return false;
#endif
}

inline void stream_fence() {
#if MB_RNN_STREAM
  _mm_sfence();  // the non-temporal stores are weakly ordered
#endif
}

// f(j, m, nt) for the vectors of columns [j, j + m) of a row of H: the full ones
// with m = L and nt known at compile time (no branches in their loads and
// stores), then the partial one, if any, with nt false.
template <typename T, typename F>
MB_INLINE void for_chunks(int64_t H, bool nt, F&& f) {
  constexpr int64_t L = kLanes<T>;
  using Full = std::integral_constant<int64_t, L>;
  int64_t j = 0;
  if (nt) {
    for (; j + L <= H; j += L) f(j, Full{}, std::true_type{});
  } else {
    for (; j + L <= H; j += L) f(j, Full{}, std::false_type{});
  }
  if (j < H) f(j, H - j, std::false_type{});
}

// The lines the next step reads that are not in the cache yet (the next step's
// gx in the forward; its grad_out and out, and the workspace of the step after it
// in the backward), fetched into L2 while this step computes: each GEMM tile takes the next 2K lines, two per iteration of
// its K loop, from up to four byte ranges.
struct Prefetch {
  const char* seg[4] = {nullptr, nullptr, nullptr, nullptr};
  int64_t len[4] = {0, 0, 0, 0};
  int nseg = 0, cur = 0;
  int64_t pos = 0;
  void add(const void* p, int64_t bytes) {
    if (bytes <= 0) return;
    seg[nseg] = static_cast<const char*>(p);
    len[nseg++] = bytes;
  }
  // The start of the next `bytes` to fetch, or null when all are handed out.
  const char* take(int64_t bytes) {
    while (cur < nseg && pos >= len[cur]) ++cur, pos = 0;
    if (cur >= nseg) return nullptr;
    const char* q = seg[cur] + std::max<int64_t>(0, std::min(pos, len[cur] - bytes));
    pos += bytes;
    return q;
  }
};

// ---------------------------------------------------------------------------
// Activations. float: exp from the Cephes expf polynomial, sigmoid = 1 / (1 +
// exp(-x)), tanh a rational approximation (the one of Eigen's fast tanh); each
// within a few ulp. double: libm per lane (float64 is for exactness, not speed).

inline Vec<float> exp_f(Vec<float> x) {
  using V = Vec<float>;
  using IV = typename VecOf<int32_t>::type;
  x = x > 88.3f ? MB_SPLAT(V, 88.3f) : x;
  x = x < -87.3f ? MB_SPLAT(V, -87.3f) : x;
  // n = round(x / ln 2) with the 1.5 * 2^23 trick: the integer lands in the low
  // mantissa bits of the sum.
  const V magic = MB_SPLAT(V, 12582912.0f);
  const V sum = x * 1.44269504088896341f + magic;
  const V fx = sum - magic;
  const IV n = (IV)sum - (IV)magic;
  V r = x - fx * 0.693359375f;
  r = r - fx * -2.12194440e-4f;
  const V z = r * r;
  V y = MB_SPLAT(V, 1.9875691500E-4f);
  y = y * r + 1.3981999507E-3f;
  y = y * r + 8.3334519073E-3f;
  y = y * r + 4.1665795894E-2f;
  y = y * r + 1.6666665459E-1f;
  y = y * r + 5.0000001201E-1f;
  y = y * z + r + 1.0f;
  return y * (V)((n + 127) << 23);
}

inline Vec<float> tanh_f(Vec<float> x) {
  using V = Vec<float>;
  // tanh(x) rounds to +-1 in float past this.
  constexpr float kClamp = 7.90531110763549805f;
  x = x > kClamp ? MB_SPLAT(V, kClamp) : x;
  x = x < -kClamp ? MB_SPLAT(V, -kClamp) : x;
  const V x2 = x * x;
  V p = MB_SPLAT(V, -2.76076847742355e-16f);
  p = p * x2 + 2.00018790482477e-13f;
  p = p * x2 + -8.60467152213735e-11f;
  p = p * x2 + 5.12229709037114e-08f;
  p = p * x2 + 1.48572235717979e-05f;
  p = p * x2 + 6.37261928875436e-04f;
  p = p * x2 + 4.89352455891786e-03f;
  V q = MB_SPLAT(V, 1.19825839466702e-06f);
  q = q * x2 + 1.18534705686654e-04f;
  q = q * x2 + 2.26843463243900e-03f;
  q = q * x2 + 4.89352518554385e-03f;
  return x * p / q;
}

template <typename T>
MB_INLINE Vec<T> sigmoid_v(Vec<T> x) {
  if constexpr (std::is_same_v<T, float>) {
    return 1.0f / (1.0f + exp_f(-x));
  } else {
    for (int l = 0; l < kLanes<T>; ++l) x[l] = 1.0 / (1.0 + std::exp(-x[l]));
    return x;
  }
}

template <typename T>
MB_INLINE Vec<T> tanh_v(Vec<T> x) {
  if constexpr (std::is_same_v<T, float>) {
    return tanh_f(x);
  } else {
    for (int l = 0; l < kLanes<T>; ++l) x[l] = std::tanh(x[l]);
    return x;
  }
}

// ---------------------------------------------------------------------------
// The GEMM: out[r, c] = init[r * ldi + c] (or 0) + sum_k X(r, k) Y(k, c) for
// r < R, c < C, with X(r, k) = x[r * ldx + k * xk] (broadcast element by element,
// any strides) and Y(k, c) = y[k * ldy + c] readable (zero padded) up to C rounded
// up to the vector length. init may be out itself (each tile reads its block
// before writing it), or have ldi = 0 (a bias row). MR x NV accumulator vectors
// stay in registers over the whole K loop. FULL: all NV vectors of columns of the
// tile are valid.

template <typename T, int MR, int NV, bool FULL>
MB_INLINE void tile(int64_t K, const T* __restrict x, int64_t ldx, int64_t xk,
                    const T* __restrict y, int64_t ldy, const T* init, int64_t ldi, T* out,
                    int64_t ldo, int64_t ncols, Prefetch* pf) {
  using V = Vec<T>;
  constexpr int L = kLanes<T>;
  const char* pfp = pf ? pf->take(K * 128) : nullptr;
  if (!pfp) pfp = reinterpret_cast<const char*>(y);  // harmless: lines in use
  V acc[MR][NV];
  if (init) {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) {
        if (FULL) std::memcpy(&acc[i][j], init + i * ldi + j * L, sizeof(V));
        else acc[i][j] = load<T>(init + i * ldi + j * L, ncols - j * L);
      }
  } else {
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] = V{};
  }
  const T* xp[MR];
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i) xp[i] = x + i * ldx;
  int64_t off = 0;
  for (const T* const yend = y + K * ldy; y != yend; y += ldy, off += xk, pfp += 128) {
    __builtin_prefetch(pfp, 0, 2);
    __builtin_prefetch(pfp + 64, 0, 2);
    V b[NV];
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) std::memcpy(&b[j], y + j * L, sizeof(V));
#pragma GCC unroll 16
    for (int i = 0; i < MR; ++i) {
      const V a = MB_SPLAT(V, xp[i][off]);
#pragma GCC unroll 4
      for (int j = 0; j < NV; ++j) acc[i][j] += a * b[j];
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < MR; ++i)
#pragma GCC unroll 4
    for (int j = 0; j < NV; ++j) {
      if (FULL) std::memcpy(out + i * ldo + j * L, &acc[i][j], sizeof(V));
      else if (ncols > j * L) store<T>(out + i * ldo + j * L, acc[i][j], ncols - j * L);
    }
}

// Fetch the init block of a tile (rows x NV vectors, ld apart) into L1.
template <typename T, int NV>
MB_INLINE void prefetch_block(const T* p, int64_t ld, int64_t rows) {
  constexpr int64_t kBytes = NV * kLanes<T> * int64_t(sizeof(T));
  for (int64_t i = 0; i < rows; ++i) {
    const char* c = reinterpret_cast<const char*>(p + i * ld);
    for (int64_t o = 0; o < kBytes; o += 64) __builtin_prefetch(c + o, 0, 3);
    __builtin_prefetch(c + kBytes - 1, 0, 3);
  }
}

// All row tiles of one column block. Before each tile, the next tile's init block
// (the next column block's first one, next_init, after the last) is fetched: init
// (gx in the forward) is read once, straight from memory.
template <typename T, int MR, int NV, bool FULL>
MB_INLINE void gemm_rows(int64_t R, int64_t K, const T* x, int64_t ldx, int64_t xk, const T* y,
                         int64_t ldy, const T* init, int64_t ldi, T* out, int64_t ldo,
                         int64_t ncols, Prefetch* pf, const T* next_init) {
  const bool fetch = init && ldi != 0;
  auto fetch_after = [&](int64_t r) {
    if (!fetch) return;
    if (r + MR < R) prefetch_block<T, NV>(init + (r + MR) * ldi, ldi, std::min<int64_t>(MR, R - r - MR));
    else if (next_init) prefetch_block<T, NV>(next_init, ldi, std::min<int64_t>(MR, R));
  };
  int64_t r = 0;
  for (; r + MR <= R; r += MR) {
    fetch_after(r);
    tile<T, MR, NV, FULL>(K, x + r * ldx, ldx, xk, y, ldy, init ? init + r * ldi : nullptr, ldi,
                          out + r * ldo, ldo, ncols, pf);
  }
  const int64_t rest = R - r;
  if (rest == 0) return;
  fetch_after(r);
  x += r * ldx;
  out += r * ldo;
  if (init) init += r * ldi;
#define MB_REST(m)                                                                \
  case m:                                                                         \
    if constexpr (m < MR)                                                         \
      tile<T, m, NV, FULL>(K, x, ldx, xk, y, ldy, init, ldi, out, ldo, ncols, pf); \
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

template <typename T>
__attribute__((noinline)) void gemm(int64_t R, int64_t C, int64_t K, const T* x, int64_t ldx,
                                    int64_t xk, const T* y, int64_t ldy, const T* init,
                                    int64_t ldi, T* out, int64_t ldo, Prefetch* pf = nullptr) {
  constexpr int L = kLanes<T>, MR = MB_RNN_MR, NV = MB_RNN_NV;
  if (R <= 0 || C <= 0) return;
  const int64_t Cpad = round_up(C, L);
  // The init block of column c, or null past the last column.
  auto at = [&](int64_t c) -> const T* { return init && c < C ? init + c : nullptr; };
  if (init && ldi != 0) prefetch_block<T, NV>(init, ldi, std::min<int64_t>(MR, R));
  int64_t c = 0;
  for (; c + NV * L <= C; c += NV * L)
    gemm_rows<T, MR, NV, true>(R, K, x, ldx, xk, y + c, ldy, at(c), ldi, out + c, ldo, C - c, pf,
                               at(c + NV * L));
  for (; c + L <= C; c += L)
    gemm_rows<T, MR, 1, true>(R, K, x, ldx, xk, y + c, ldy, at(c), ldi, out + c, ldo, C - c, pf,
                              at(c + L));
  if (c < Cpad)
    gemm_rows<T, MR, 1, false>(R, K, x, ldx, xk, y + c, ldy, at(c), ldi, out + c, ldo, C - c, pf,
                               nullptr);
}

// ---------------------------------------------------------------------------
// The gate loops of one step over its bt active rows, H columns in vectors (the
// last one partial). Row r of an operand p with row stride ldp is p + r * ldp.

// LSTM forward: pre (i, f, g, o pre-activations, row stride 4H) -> the workspace
// row (i, f, g, o activated, then c), the state c, h_raw into hdst (row stride
// ldh) and, if not null, into out (row stride P).
template <typename T>
__attribute__((noinline)) void lstm_fwd_step(int64_t bt, int64_t H, const T* pre, T* wst,
                                             T* c, T* hdst, int64_t ldh, T* outt, int64_t P) {
  using V = Vec<T>;
  const int64_t GH = 4 * H, W = 5 * H;
  const bool nt = streamable(wst, W, H) && (!outt || streamable(outt, P, H));
  for (int64_t r = 0; r < bt; ++r) {
    const T* g = pre + r * GH;
    T* w = wst + r * W;
    T* cr = c + r * H;
    T* hr = hdst + r * ldh;
    T* orow = outt ? outt + r * P : nullptr;
    for_chunks<T>(H, nt, [&](int64_t j, auto m, auto nt_c) {
      const V i = sigmoid_v<T>(load<T>(g + j, m));
      const V f = sigmoid_v<T>(load<T>(g + H + j, m));
      const V gg = tanh_v<T>(load<T>(g + 2 * H + j, m));
      const V o = sigmoid_v<T>(load<T>(g + 3 * H + j, m));
      const V cn = f * load<T>(cr + j, m) + i * gg;
      const V hv = o * tanh_v<T>(cn);
      store_out<T>(w + j, i, m, nt_c);
      store_out<T>(w + H + j, f, m, nt_c);
      store_out<T>(w + 2 * H + j, gg, m, nt_c);
      store_out<T>(w + 3 * H + j, o, m, nt_c);
      store_out<T>(w + 4 * H + j, cn, m, nt_c);
      store<T>(cr + j, cn, m);
      store<T>(hr + j, hv, m);
      if (orow) store_out<T>(orow + j, hv, m, nt_c);
    });
  }
}

// GRU forward (P = H): gh includes b_hh; h is updated in place.
template <typename T>
__attribute__((noinline)) void gru_fwd_step(int64_t bt, int64_t H, const T* gxt, const T* gh,
                                            T* h, T* wst, T* outt) {
  using V = Vec<T>;
  const int64_t GH = 3 * H, W = 4 * H;
  const bool nt = streamable(wst, W, H) && streamable(outt, H, H);
  for (int64_t r = 0; r < bt; ++r) {
    const T* x = gxt + r * GH;
    const T* q = gh + r * GH;
    T* w = wst + r * W;
    T* hr = h + r * H;
    T* orow = outt + r * H;
    for_chunks<T>(H, nt, [&](int64_t j, auto m, auto nt_c) {
      const V rr = sigmoid_v<T>(load<T>(x + j, m) + load<T>(q + j, m));
      const V z = sigmoid_v<T>(load<T>(x + H + j, m) + load<T>(q + H + j, m));
      const V hn = load<T>(q + 2 * H + j, m);
      const V nn = tanh_v<T>(load<T>(x + 2 * H + j, m) + rr * hn);
      const V hv = (load<T>(hr + j, m) - nn) * z + nn;
      store_out<T>(w + j, rr, m, nt_c);
      store_out<T>(w + H + j, z, m, nt_c);
      store_out<T>(w + 2 * H + j, nn, m, nt_c);
      store_out<T>(w + 3 * H + j, hn, m, nt_c);
      store<T>(hr + j, hv, m);
      store_out<T>(orow + j, hv, m, nt_c);
    });
  }
}

// RNN forward: pre -> h (the state) and out.
template <typename T>
__attribute__((noinline)) void rnn_fwd_step(int64_t bt, int64_t H, const T* pre, T* h, T* outt,
                                            bool relu) {
  using V = Vec<T>;
  const bool nt = streamable(outt, H, H);
  for (int64_t r = 0; r < bt; ++r) {
    const T* pr = pre + r * H;
    T* hr = h + r * H;
    T* orow = outt + r * H;
    for_chunks<T>(H, nt, [&](int64_t j, auto m, auto nt_c) {
      V v = load<T>(pr + j, m);
      v = relu ? (v < T(0) ? V{} : v) : tanh_v<T>(v);
      store<T>(hr + j, v, m);
      store_out<T>(orow + j, v, m, nt_c);
    });
  }
}

// LSTM backward: dh_raw (dhr) and the carried dc (dcs, updated) give d_pre, into
// the scratch dpre (row stride 4H) and d_gx (dgxt, written around the caches). c_prev
// of row r is the previous step's workspace c (cprev_ws, rows < keep) or c0. If hrt
// is not null, h_raw = o * tanh(c) is stored there (row stride ldhr).
template <typename T>
__attribute__((noinline)) void lstm_bwd_step(int64_t bt, int64_t H, const T* wst,
                                             const T* cprev_ws, int64_t keep, const T* c0,
                                             const T* dhr, int64_t ldr, T* dcs, T* dpre,
                                             T* dgxt, T* hrt, int64_t ldhr) {
  using V = Vec<T>;
  const int64_t W = 5 * H, GH = 4 * H;
  const bool nt = streamable(dgxt, GH, H);
  for (int64_t r = 0; r < bt; ++r) {
    const T* g = wst + r * W;
    const T* cp = r < keep ? cprev_ws + r * W : c0 + r * H;
    const T* dr = dhr + r * ldr;
    T* dc = dcs + r * H;
    T* dp = dpre + r * GH;
    T* dx = dgxt + r * GH;
    for_chunks<T>(H, nt, [&](int64_t j, auto m, auto nt_c) {
      const V i = load<T>(g + j, m), f = load<T>(g + H + j, m);
      const V gg = load<T>(g + 2 * H + j, m), o = load<T>(g + 3 * H + j, m);
      const V c = load<T>(g + 4 * H + j, m);
      const V dhv = load<T>(dr + j, m);
      const V tc = tanh_v<T>(c);
      const V dcv = load<T>(dc + j, m) + dhv * o * (T(1) - tc * tc);
      const V di = dcv * gg * i * (T(1) - i);
      const V df = dcv * load<T>(cp + j, m) * f * (T(1) - f);
      const V dg = dcv * i * (T(1) - gg * gg);
      const V dO = dhv * tc * o * (T(1) - o);
      store<T>(dp + j, di, m);
      store<T>(dp + H + j, df, m);
      store<T>(dp + 2 * H + j, dg, m);
      store<T>(dp + 3 * H + j, dO, m);
      store_out<T>(dx + j, di, m, nt_c);
      store_out<T>(dx + H + j, df, m, nt_c);
      store_out<T>(dx + 2 * H + j, dg, m, nt_c);
      store_out<T>(dx + 3 * H + j, dO, m, nt_c);
      store<T>(dc + j, dcv * f, m);
      if (hrt) store<T>(hrt + r * ldhr + j, o * tc, m);
    });
  }
}

// GRU backward (P = H): d_gx (dgxt), d_gh (the scratch dgh) and the direct part
// dh * z of dh_prev (dhs).
template <typename T>
__attribute__((noinline)) void gru_bwd_step(int64_t bt, int64_t H, const T* wst, const T* hpt,
                                            int64_t ldhp, const T* dht, T* dgh, T* dgxt,
                                            T* dhs) {
  using V = Vec<T>;
  const int64_t GH = 3 * H, W = 4 * H;
  const bool nt = streamable(dgxt, GH, H);
  for (int64_t r = 0; r < bt; ++r) {
    const T* q = wst + r * W;
    const T* hp = hpt + r * ldhp;
    const T* dr = dht + r * H;
    T* dx = dgxt + r * GH;
    T* dg = dgh + r * GH;
    T* ds = dhs + r * H;
    for_chunks<T>(H, nt, [&](int64_t j, auto m, auto nt_c) {
      const V rr = load<T>(q + j, m), z = load<T>(q + H + j, m);
      const V nn = load<T>(q + 2 * H + j, m), hn = load<T>(q + 3 * H + j, m);
      const V dhv = load<T>(dr + j, m);
      const V dn = dhv * (T(1) - z) * (T(1) - nn * nn);
      const V dz = dhv * (load<T>(hp + j, m) - nn) * z * (T(1) - z);
      const V drr = dn * hn * rr * (T(1) - rr);
      store_out<T>(dx + j, drr, m, nt_c);
      store_out<T>(dx + H + j, dz, m, nt_c);
      store_out<T>(dx + 2 * H + j, dn, m, nt_c);
      store<T>(dg + j, drr, m);
      store<T>(dg + H + j, dz, m);
      store<T>(dg + 2 * H + j, dn * rr, m);
      store<T>(ds + j, dhv * z, m);
    });
  }
}

// RNN backward: d_pre into the scratch dpre and d_gx (dgxt).
template <typename T>
__attribute__((noinline)) void rnn_bwd_step(int64_t bt, int64_t H, const T* outt, const T* dht,
                                            T* dpre, T* dgxt, bool relu) {
  using V = Vec<T>;
  const bool nt = streamable(dgxt, H, H);
  for (int64_t r = 0; r < bt; ++r) {
    const T* hr = outt + r * H;
    const T* dr = dht + r * H;
    T* dp = dpre + r * H;
    T* dx = dgxt + r * H;
    for_chunks<T>(H, nt, [&](int64_t j, auto m, auto nt_c) {
      const V hv = load<T>(hr + j, m), dhv = load<T>(dr + j, m);
      const V d = relu ? (hv > T(0) ? dhv : V{}) : dhv * (T(1) - hv * hv);
      store<T>(dp + j, d, m);
      store_out<T>(dx + j, d, m, nt_c);
    });
  }
}

// ---------------------------------------------------------------------------
// Forward of models [n0, n1); buf: fwd_scratch(d) zeroed elements.

template <typename T>
void forward_models(const FwdArgs<T>& a, int64_t n0, int64_t n1, T* buf) {
  const Dims& d = *a.d;
  const int64_t Tn = d.T, B = d.B, H = d.H, P = d.P, GH = d.GH, W = d.W;
  const int64_t GHp = round_up(GH, kPad), Pp = round_up(P, kPad);
  T* wt = buf;                            // W_hh^T [P, GHp]
  T* wrt = wt + P * GHp;                  // W_hr^T [H, Pp]
  T* hraw = wrt + (d.proj ? H * Pp : 0);  // h_raw of a step [B, H]
  T* pre = hraw + (d.proj ? B * H : 0);   // pre-activations (GRU: gh) of a step [B, GH]
  for (int64_t n = n0; n < n1; ++n) {
    transpose_into(a.w_hh + n * GH * P, P, GH, P, wt, GHp);
    if (d.proj) transpose_into(a.w_hr + n * P * H, H, P, H, wrt, Pp);
    T* h = a.hn + n * B * P;  // the state: h_n and c_n
    std::memcpy(h, a.h0 + n * B * P, B * P * sizeof(T));
    T* c = nullptr;
    if (d.mode == kLstm) {
      c = a.cn + n * B * H;
      std::memcpy(c, a.c0 + n * B * H, B * H * sizeof(T));
    }
    const T* bias = a.b_hh ? a.b_hh + n * GH : nullptr;
    for (size_t k = 0; k < d.steps.size(); ++k) {
      const Step& s = d.steps[k];
      const int64_t t = s.t, bt = s.bt;
      const int64_t row0 = (n * Tn + t) * B;
      const T* gxt = a.gx + row0 * GH;
      // The next step's gx (of this model or the next).
      Prefetch pf;
      {
        const bool last = k + 1 == d.steps.size();
        const Step& s1 = d.steps[last ? 0 : k + 1];
        if (!last || n + 1 < n1)
          pf.add(a.gx + ((n + last) * Tn + s1.t) * B * GH, s1.bt * GH * int64_t(sizeof(T)));
      }
      T* outt = a.out + row0 * P;
      T* wst = a.ws + row0 * W;
      if (bt < B) {
        std::memset(outt + bt * P, 0, (B - bt) * P * sizeof(T));
        if (W) std::memset(wst + bt * W, 0, (B - bt) * W * sizeof(T));
      }
      if (d.mode == kLstm) {
        gemm<T>(bt, GH, P, h, P, 1, wt, GHp, gxt, GH, pre, GH, &pf);
        if (d.proj) {
          lstm_fwd_step<T>(bt, H, pre, wst, c, hraw, H, nullptr, P);
          gemm<T>(bt, P, H, hraw, H, 1, wrt, Pp, nullptr, 0, h, P);
          copy_rows(h, P, bt, P, outt, P);
        } else {
          lstm_fwd_step<T>(bt, H, pre, wst, c, h, P, outt, P);
        }
      } else if (d.mode == kGru) {
        gemm<T>(bt, GH, P, h, P, 1, wt, GHp, bias, 0, pre, GH, &pf);
        gru_fwd_step<T>(bt, H, gxt, pre, h, wst, outt);
      } else {
        gemm<T>(bt, GH, P, h, P, 1, wt, GHp, gxt, GH, pre, GH, &pf);
        rnn_fwd_step<T>(bt, H, pre, h, outt, d.mode == kRnnRelu);
      }
    }
  }
  stream_fence();
}

// ---------------------------------------------------------------------------
// Backward of models [n0, n1); buf: bwd_scratch(d) zeroed elements. Per step, the
// gate backward writes d_pre (GRU: d_gh) to scratch and d_gx around the caches;
// from the scratch, dh_prev = d_pre @ W_hh and d_w_hh += d_pre^T @ h_prev (and
// d_w_hr += dh^T @ h_raw): d_gx is written once and never read back.

template <typename T>
void backward_models(const BwdArgs<T>& a, int64_t n0, int64_t n1, T* buf) {
  const Dims& d = *a.d;
  const int64_t B = d.B, H = d.H, P = d.P, GH = d.GH, W = d.W, TB = d.T * d.B;
  const int64_t Pp = round_up(P, kPad), Hp = round_up(H, kPad), e = int64_t(sizeof(T));
  T* w = buf;                             // W_hh [GH, Pp]
  T* wr = w + GH * Pp;                    // W_hr [P, Hp]
  T* dh = wr + (d.proj ? P * Hp : 0);     // dh of a step [B, P]
  T* dhraw = dh + B * P;                  // dh_raw of a step [B, H]
  T* hprev = dhraw + (d.proj ? B * H : 0);  // h_prev of a step [B, Pp]
  T* dpre = hprev + B * Pp;               // d_pre (GRU: d_gh) of a step [B, GH]
  T* hraw = dpre + B * GH;                // h_raw of a step [B, Hp]
  const bool relu = d.mode == kRnnRelu;
  const int64_t K = static_cast<int64_t>(d.steps.size());
  for (int64_t n = n0; n < n1; ++n) {
    copy_rows(a.w_hh + n * GH * P, P, GH, P, w, Pp);
    if (d.proj) copy_rows(a.w_hr + n * P * H, H, P, H, wr, Hp);
    const T* h0 = a.h0 + n * B * P;
    const T* c0 = d.mode == kLstm ? a.c0 + n * B * H : nullptr;
    const T* outn = a.out + n * TB * P;
    const T* wsn = a.ws + n * TB * W;
    T* dgxn = a.d_gx + n * TB * GH;
    T* dw = a.d_w_hh + n * GH * P;  // accumulated over the steps
    std::fill(dw, dw + GH * P, T(0));
    T* dwr = d.proj ? a.d_w_hr + n * P * H : nullptr;
    if (dwr) std::fill(dwr, dwr + P * H, T(0));
    T* db = a.d_b_hh ? a.d_b_hh + n * GH : nullptr;
    if (db) std::fill(db, db + GH, T(0));
    T* dhs = a.d_h0 + n * B * P;  // the carried gradients: d_h0 and d_c0
    std::memcpy(dhs, a.grad_hn + n * B * P, B * P * e);
    T* dcs = nullptr;
    if (d.mode == kLstm) {
      dcs = a.d_c0 + n * B * H;
      std::memcpy(dcs, a.grad_cn + n * B * H, B * H * e);
    }
    for (int64_t k = K - 1; k >= 0; --k) {
      const Step& s = d.steps[k];
      const int64_t t = s.t, bt = s.bt;
      // The next step's grad_out and out, and the workspace of the step after it
      // (the next step reads that one's c as c_prev; its own is fetched by now).
      Prefetch pf;
      if (k >= 2) {
        pf.add(wsn + d.steps[k - 2].t * B * W, d.steps[k - 2].bt * W * e);
      } else if (n + 1 < n1) {
        // The next model's first two (last in time order) workspace steps.
        const Step& s2 = d.steps[K - 1 - k];
        pf.add(wsn + TB * W + s2.t * B * W, s2.bt * W * e);
      }
      if (k >= 1) {
        const Step& s1 = d.steps[k - 1];
        pf.add(a.grad_out + n * a.go_n + s1.t * a.go_t, s1.bt * P * e);
        if (s1.prev_t >= 0) pf.add(outn + s1.prev_t * B * P, std::min(s1.bt, s1.bp) * P * e);
      }
      T* dgxt = dgxn + t * B * GH;
      if (bt < B) std::memset(dgxt + bt * GH, 0, (B - bt) * GH * e);
      const T* got = a.grad_out + n * a.go_n + t * a.go_t;
      const T* wst = wsn + t * B * W;
      // h_prev of the active rows: the previous step's output, or h0 for rows that
      // had no step before.
      const int64_t keep = s.prev_t < 0 ? 0 : std::min(bt, s.bp);
      if (keep) copy_rows(outn + s.prev_t * B * P, P, keep, P, hprev, Pp);
      copy_rows(h0 + keep * P, P, bt - keep, P, hprev + keep * Pp, Pp);
      // dh = grad_out[t] + dh_state on the active rows.
      for (int64_t i = 0; i < bt * P; ++i) dh[i] = got[i] + dhs[i];
      if (d.mode == kLstm) {
        const T* dhr = dh;
        int64_t ldr = P;
        if (d.proj) {
          gemm<T>(bt, H, P, dh, P, 1, wr, Hp, nullptr, 0, dhraw, H);
          dhr = dhraw;
          ldr = H;
        }
        const T* cprev_ws = s.prev_t < 0 ? c0 : wsn + s.prev_t * B * W + 4 * H;
        lstm_bwd_step<T>(bt, H, wst, cprev_ws, keep, c0, dhr, ldr, dcs, dpre, dgxt,
                         d.proj ? hraw : nullptr, Hp);
        gemm<T>(bt, P, GH, dpre, GH, 1, w, Pp, nullptr, 0, dhs, P, &pf);
        if (d.proj) gemm<T>(P, H, bt, dh, 1, P, hraw, Hp, dwr, H, dwr, H);
      } else if (d.mode == kGru) {
        gru_bwd_step<T>(bt, H, wst, hprev, Pp, dh, dpre, dgxt, dhs);
        gemm<T>(bt, P, GH, dpre, GH, 1, w, Pp, dhs, P, dhs, P, &pf);
        if (db)
          for (int64_t r = 0; r < bt; ++r)
            for (int64_t j = 0; j < GH; ++j) db[j] += dpre[r * GH + j];
      } else {
        rnn_bwd_step<T>(bt, H, outn + t * B * P, dh, dpre, dgxt, relu);
        gemm<T>(bt, P, GH, dpre, GH, 1, w, Pp, nullptr, 0, dhs, P, &pf);
      }
      // d_w_hh += d_gh^T @ h_prev (d_gh: d_pre but for GRU).
      gemm<T>(GH, P, bt, dpre, 1, GH, hprev, Pp, dw, P, dw, P);
    }
  }
  stream_fence();
}
