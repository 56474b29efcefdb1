// modelbatch::batched_dropout on the CPU: dropout / alpha dropout of N models in
// one call, model n drawing its keep decisions from its own Philox4x32-10 stream
// (key seeds[n], starting at block offsets[n]). The semantics, and the pure-torch
// oracle this kernel is bit-identical to (same kept elements, same values), are in
// python/modelbatch/ops/dropout.py; the stream layout is in ops/philox.py.
//
// Model n draws F = x[n].numel() / repeat decisions; decision j is word j % 4 of
// the block with counter (lo32(o + j / 4), hi32(o + j / 4), 0, 0), o = offsets[n],
// and keeps the elements x[n].flat[j * repeat, (j + 1) * repeat) iff
// (word >> 8) >= threshold = floor(p * 2**24 + 0.5).
//
// Work items are (model, chunk of decisions) with chunks starting at multiples of
// kTile decisions (so at exact block indices); each item walks its chunk tile by
// tile: the Philox words of a tile come from philox::stream_words (AVX-512 / AVX2
// intrinsics, vectorised across blocks, in stream order), and a second loop
// (compiled per ISA by MB_CLONES) compares them with the threshold and applies the
// decisions to the tile's elements.
// Outputs depend only on (seed, offset, index), never on N, on a model's position
// in the batch or on the thread count.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "multi_tensor.h"  // MB_CLONES
#include "philox.h"

// The reference computes x * m and then + b in two roundings; a fused multiply-add
// (which GCC would contract them to in the AVX-512 clones) rounds once.
#pragma GCC optimize("fp-contract=off")

#define MB_INLINE inline __attribute__((always_inline))

namespace modelbatch {
namespace {

constexpr const char* kOp = "batched_dropout";
constexpr int64_t kDropout = 0, kAlphaDropout = 1;
// The SELU saturation value -scale * alpha that alpha dropout drops to.
constexpr double kAlpha = 1.7580993408473766;

// Philox blocks per tile, and the keep decisions of a tile (four per block).
constexpr int64_t kBlocks = 128;
constexpr int64_t kTile = 4 * kBlocks;
// The vector Philox kernels compute blocks in multiples of 16 (AVX-512) or 8 (AVX2);
// a partial tile computes up to a multiple of 16 of them (kBlocks is one).
constexpr int64_t kBlockRound = 16;
// Elements of x per work item (at least one tile of decisions).
constexpr int64_t kItemElems = int64_t(1) << 15;

template <typename opmath_t>
struct Consts {
  int32_t threshold;  // keep iff (word >> 8) >= threshold, in [0, 2**24]
  opmath_t mul;       // multiplier of kept elements (dropped ones: 0)
  opmath_t b_keep;    // added to kept elements (if bias)
  opmath_t b_drop;    // added to dropped elements (if bias)
  bool bias;          // alpha dropout forward
};

// y = x * m (+ b) for the cnt decisions of a tile (x, y: their first element),
// decision t drawn from words[t].
template <typename scalar_t, typename opmath_t, bool BIAS>
MB_INLINE void apply_tile(const scalar_t* __restrict x, scalar_t* __restrict y,
                          const uint32_t* __restrict words, int64_t cnt, int64_t repeat,
                          const Consts<opmath_t>& c) {
  // Locals: stores to y could alias c as far as the compiler knows.
  const opmath_t zero = 0, mul = c.mul, b_keep = c.b_keep, b_drop = c.b_drop;
  const int32_t threshold = c.threshold;
  if (repeat == 1) {
    for (int64_t e = 0; e < cnt; ++e) {
      const bool k = static_cast<int32_t>(words[e] >> 8) >= threshold;
      opmath_t v = static_cast<opmath_t>(x[e]) * (k ? mul : zero);
      if (BIAS) v = v + (k ? b_keep : b_drop);
      y[e] = static_cast<scalar_t>(v);
    }
  } else {
    for (int64_t t = 0; t < cnt; ++t) {
      const bool k = static_cast<int32_t>(words[t] >> 8) >= threshold;
      const opmath_t m = k ? mul : zero;
      const opmath_t b = k ? b_keep : b_drop;
      const scalar_t* __restrict xs = x + t * repeat;
      scalar_t* __restrict ys = y + t * repeat;
      for (int64_t r = 0; r < repeat; ++r) {
        opmath_t v = static_cast<opmath_t>(xs[r]) * m;
        if (BIAS) v = v + b;
        ys[r] = static_cast<scalar_t>(v);
      }
    }
  }
}

// One entry point per dtype, each compiled for AVX-512, AVX2 and baseline x86-64.
#define MB_APPLY_TILE(T)                                                                    \
  MB_CLONES void apply_tile_dispatch(const T* x, T* y, const uint32_t* words, int64_t cnt,  \
                                     int64_t repeat, const Consts<at::opmath_type<T>>& c) { \
    using O = at::opmath_type<T>;                                                           \
    if (c.bias) return apply_tile<T, O, true>(x, y, words, cnt, repeat, c);                 \
    apply_tile<T, O, false>(x, y, words, cnt, repeat, c);                                   \
  }
MB_APPLY_TILE(float)
MB_APPLY_TILE(double)
MB_APPLY_TILE(c10::Half)
MB_APPLY_TILE(c10::BFloat16)
#undef MB_APPLY_TILE

// Decisions [j0, j1) of one model (x, y: the model's elements; j0 a multiple of 4).
template <typename scalar_t, typename opmath_t>
void dropout_range(philox::Isa isa, const scalar_t* x, scalar_t* y, int64_t j0, int64_t j1,
                   int64_t repeat, uint64_t offset, const philox::Keys& keys,
                   const Consts<opmath_t>& c) {
  alignas(64) uint32_t words[kTile];
  for (int64_t j = j0; j < j1; j += kTile) {
    const int64_t cnt = std::min(kTile, j1 - j);
    const int64_t blocks = (cnt + 3) / 4;
    const int64_t nb = std::min(kBlocks, (blocks + kBlockRound - 1) / kBlockRound * kBlockRound);
    philox::stream_words(isa, offset + static_cast<uint64_t>(j / 4), keys, nb, words);
    apply_tile_dispatch(x + j * repeat, y + j * repeat, words, cnt, repeat, c);
  }
}

// The argument checks of python/modelbatch/ops/dropout.py's check(), same order and
// messages; ValueError in Python.
void check_args(const at::Tensor& x, const at::Tensor& seeds, const at::Tensor& offsets, double p,
                int64_t repeat, int64_t kind) {
  const auto dt = x.scalar_type();
  TORCH_CHECK_VALUE(
      dt == at::kFloat || dt == at::kDouble || dt == at::kHalf || dt == at::kBFloat16, kOp,
      ": x must be float32, float64, float16 or bfloat16, got ", dt);
  TORCH_CHECK_VALUE(x.dim() >= 1, kOp, ": x must have a leading model axis [N, ...]");
  const int64_t n = x.size(0);
  for (const auto& [name, t] : {std::pair<const char*, const at::Tensor&>{"seeds", seeds},
                                std::pair<const char*, const at::Tensor&>{"offsets", offsets}}) {
    TORCH_CHECK_VALUE(t.scalar_type() == at::kLong && t.dim() == 1 && t.size(0) == n, kOp, ": ",
                      name, " must be int64 [N=", n, "], got ", t.scalar_type(), " ", t.sizes());
    TORCH_CHECK_VALUE(t.device() == x.device(), kOp, ": ", name, " is on ", t.device(), ", x on ",
                      x.device());
  }
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0,
                    "dropout probability has to be between 0 and 1, but got ", p);
  const int64_t per_model = n ? x.numel() / n : 0;
  TORCH_CHECK_VALUE(repeat >= 1 && (n == 0 || per_model % repeat == 0), kOp, ": repeat=", repeat,
                    " must be >= 1 and divide the per-model size ", per_model);
  TORCH_CHECK_VALUE(kind == kDropout || kind == kAlphaDropout, kOp,
                    ": kind must be 0 (dropout) or 1 (alpha), got ", kind);
  TORCH_CHECK(x.device().is_cpu(), kOp, ": the C++ kernel takes CPU tensors, x is on ",
              x.device());
}

at::Tensor batched_dropout_cpu(const at::Tensor& x_in, const at::Tensor& seeds_in,
                               const at::Tensor& offsets_in, double p, int64_t repeat,
                               int64_t kind, bool grad) {
  check_args(x_in, seeds_in, offsets_in, p, repeat, kind);
  const auto x = x_in.contiguous();
  if (p == 0.0) return x_in.clone(at::MemoryFormat::Contiguous);
  if (p == 1.0 || x.numel() == 0) return x * 0;

  const auto seeds = seeds_in.contiguous();
  const auto offsets = offsets_in.contiguous();
  const int64_t n = x.size(0);
  const int64_t per_model = x.numel() / n;
  const int64_t f = per_model / repeat;  // decisions per model
  // Decisions per work item: a whole number of tiles, about kItemElems elements.
  const int64_t chunk =
      std::max<int64_t>(1, (kItemElems / repeat + kTile - 1) / kTile) * kTile;
  const int64_t chunks = (f + chunk - 1) / chunk;
  const int64_t item_elems = std::min(chunk, f) * repeat;
  const int64_t grain = std::max<int64_t>(1, kItemElems / std::max<int64_t>(item_elems, 1));

  // constants() of the reference, in float64.
  double mul, b_keep = 0.0, b_drop = 0.0;
  if (kind == kDropout) {
    mul = 1.0 / (1.0 - p);
  } else {
    const double a = 1.0 / std::sqrt((kAlpha * kAlpha * p + 1.0) * (1.0 - p));
    mul = a;
    b_keep = kAlpha * a * p;
    b_drop = kAlpha * a * p - kAlpha * a;
  }
  const auto threshold = static_cast<int32_t>(std::floor(p * 16777216.0 + 0.5));
  const philox::Isa isa = philox::detect_isa();

  auto out = at::empty_like(x, at::MemoryFormat::Contiguous);
  const int64_t* sp = seeds.data_ptr<int64_t>();
  const int64_t* op = offsets.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), kOp, [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    const Consts<opmath_t> c{threshold, static_cast<opmath_t>(mul), static_cast<opmath_t>(b_keep),
                             static_cast<opmath_t>(b_drop), kind == kAlphaDropout && !grad};
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* yp = out.data_ptr<scalar_t>();
    at::parallel_for(0, n * chunks, grain, [&](int64_t lo, int64_t hi) {
      for (int64_t it = lo; it < hi; ++it) {
        const int64_t m = it / chunks, j0 = (it % chunks) * chunk;
        const int64_t j1 = std::min(f, j0 + chunk);
        const philox::Keys keys = philox::seed_keys(sp[m]);
        dropout_range<scalar_t, opmath_t>(isa, xp + m * per_model, yp + m * per_model, j0, j1,
                                          repeat, static_cast<uint64_t>(op[m]), keys, c);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(modelbatch, CPU, m) { m.impl("batched_dropout", &batched_dropout_cpu); }

}  // namespace modelbatch
