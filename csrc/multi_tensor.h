// Helpers shared by the fused per-model optimizer kernels.
//
// Every tensor handed to a kernel is a stacked parameter (or its grad or state)
// of shape [N, ...], contiguous, so model i owns the elements
// [i * per_model, (i + 1) * per_model). A kernel call covers every tensor of one
// dtype at once; the work is cut into segments (tensor, model, range) that one
// at::parallel_for spreads over the intra-op threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
// One binary, the widest vector unit the running CPU has (resolved at load time).
#define MB_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define MB_CLONES
#endif

namespace modelbatch {

struct Segment {
  int64_t tensor;  // index into the tensor lists
  int64_t model;   // model index in [0, N)
  int64_t begin;   // element offset into the tensor
  int64_t length;  // number of elements
};

// Run fn(segment) over every (tensor, model) element range of the tensors, in
// parallel. The threads split the concatenated element space evenly (not the
// list of tensors or models), so a few large tensors next to many tiny ones
// still keep every thread equally busy.
template <typename F>
inline void for_each_segment(const std::vector<int64_t>& numels, int64_t n_models, F&& fn) {
  std::vector<int64_t> start(numels.size() + 1, 0);
  for (size_t t = 0; t < numels.size(); ++t) start[t + 1] = start[t] + numels[t];
  const int64_t total = start.back();
  if (total == 0) return;
  constexpr int64_t grain = 1 << 14;
  at::parallel_for(0, total, grain, [&](int64_t b, int64_t e) {
    auto it = std::upper_bound(start.begin(), start.end(), b);
    int64_t t = static_cast<int64_t>(it - start.begin()) - 1;
    while (b < e) {
      while (start[t + 1] <= b) ++t;  // skip empty tensors
      const int64_t per = numels[t] / n_models;
      const int64_t local = b - start[t];
      const int64_t model = local / per;
      const int64_t stop = std::min(std::min((model + 1) * per, numels[t]), e - start[t]);
      fn(Segment{t, model, local, stop - local});
      b += stop - local;
    }
  });
}

// Validate a list of stacked tensors against the parameters: same count, shape,
// dtype and device, contiguous, leading model axis of size n_models.
inline void check_like(const at::TensorList& params, const at::TensorList& other,
                       const char* op, const char* name, int64_t n_models) {
  TORCH_CHECK(other.size() == params.size(), op, ": expected ", params.size(), " ", name,
              " (one per parameter), got ", other.size());
  for (size_t t = 0; t < params.size(); ++t) {
    const auto& p = params[t];
    const auto& o = other[t];
    TORCH_CHECK(o.sizes() == p.sizes(), op, ": ", name, "[", t, "] has shape ", o.sizes(),
                ", expected ", p.sizes(), " (the shape of params[", t, "])");
    TORCH_CHECK(o.scalar_type() == p.scalar_type(), op, ": ", name, "[", t, "] has dtype ",
                o.scalar_type(), ", expected ", p.scalar_type());
    TORCH_CHECK(o.device() == p.device(), op, ": ", name, "[", t, "] is on ", o.device(),
                ", expected ", p.device());
    TORCH_CHECK(o.is_contiguous(), op, ": ", name, "[", t, "] must be contiguous");
  }
  (void)n_models;
}

inline int64_t check_params(const at::TensorList& params, const at::Tensor& steps,
                            const char* op) {
  TORCH_CHECK(steps.dim() == 1, op, ": steps must be a 1-D [N] tensor, got shape ",
              steps.sizes());
  const int64_t n = steps.size(0);
  TORCH_CHECK(n > 0, op, ": steps must have at least one model");
  for (size_t t = 0; t < params.size(); ++t) {
    const auto& p = params[t];
    TORCH_CHECK(p.dim() >= 1 && p.size(0) == n, op, ": params[", t, "] has shape ", p.sizes(),
                ", expected a stacked tensor [N=", n, ", ...]");
    TORCH_CHECK(p.is_contiguous(), op, ": params[", t, "] must be contiguous");
    TORCH_CHECK(p.device().is_cpu(), op, ": the C++ kernel takes CPU tensors, params[", t,
                "] is on ", p.device());
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), op,
                ": all params of one call share a dtype; params[", t, "] is ", p.scalar_type(),
                ", params[0] is ", params[0].scalar_type());
  }
  return n;
}

// A per-model hyper-parameter vector as doubles on the CPU.
inline std::vector<double> hparam(const at::Tensor& t, int64_t n, const char* op,
                                  const char* name) {
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name,
              " must be a [N] per-model tensor with N=", n, ", got shape ", t.sizes());
  auto c = t.to(at::kCPU, at::kDouble).contiguous();
  const double* d = c.data_ptr<double>();
  return std::vector<double>(d, d + n);
}

// ---------------------------------------------------------------------------
// Mixed precision (modelbatch.amp): per-model loss-scale unscaling and skips.
// ---------------------------------------------------------------------------

// The storage bits of a float type and the mask of its exponent field: a value
// is inf or NaN exactly when all its exponent bits are set. Testing bits keeps
// the check an integer compare + OR that vectorises.
template <typename T>
struct FloatBits;
template <>
struct FloatBits<float> {
  using type = uint32_t;
  static constexpr type exp_mask = 0x7f800000u;
};
template <>
struct FloatBits<double> {
  using type = uint64_t;
  static constexpr type exp_mask = 0x7ff0000000000000ull;
};
template <>
struct FloatBits<at::Half> {
  using type = uint16_t;
  static constexpr type exp_mask = 0x7c00u;
};
template <>
struct FloatBits<at::BFloat16> {
  using type = uint16_t;
  static constexpr type exp_mask = 0x7f80u;
};

// 1 when x is inf or NaN, else 0 (on the stored value, so exact for every dtype).
template <typename scalar_t>
inline __attribute__((always_inline)) typename FloatBits<scalar_t>::type non_finite_bit(
    const scalar_t& x) {
  using U = typename FloatBits<scalar_t>::type;
  constexpr U e = FloatBits<scalar_t>::exp_mask;
  U b;
  std::memcpy(&b, &x, sizeof(U));
  return static_cast<U>((b & e) == e);
}

// g = scalar_t(opmath(g) * inv_scale), the arithmetic of
// torch._amp_foreach_non_finite_check_and_unscale_.
template <typename scalar_t, typename opmath_t>
inline __attribute__((always_inline)) scalar_t unscale_value(scalar_t g, opmath_t inv_scale) {
  return static_cast<scalar_t>(static_cast<opmath_t>(g) * inv_scale);
}

// The gradient an optimizer step reads: with UNSCALE, g * inv_scale stored back
// rounded to scalar_t (as torch's fused optimizers write back the unscaled grads),
// and the update reads the stored value.
template <bool UNSCALE, typename scalar_t, typename opmath_t>
inline __attribute__((always_inline)) opmath_t read_grad(scalar_t& g, opmath_t inv_scale) {
  if constexpr (UNSCALE) g = unscale_value<scalar_t, opmath_t>(g, inv_scale);
  return static_cast<opmath_t>(g);
}

template <typename scalar_t, typename opmath_t>
inline void unscale_inplace(scalar_t* __restrict g, int64_t n, opmath_t inv_scale) {
  for (int64_t j = 0; j < n; ++j) g[j] = unscale_value<scalar_t, opmath_t>(g[j], inv_scale);
}

// An optional per-model amp vector (inv_scale, found_inf) of the optimizer
// steps: a float32 [N] CPU tensor, read as floats. Empty when not given.
inline std::vector<float> amp_vector(const std::optional<at::Tensor>& t, int64_t n,
                                     const char* op, const char* name) {
  if (!t.has_value()) return {};
  const at::Tensor& v = *t;
  TORCH_CHECK(v.dim() == 1 && v.size(0) == n, op, ": ", name,
              " must be a [N] per-model tensor with N=", n, ", got shape ", v.sizes());
  TORCH_CHECK(v.scalar_type() == at::kFloat, op, ": ", name,
              " must be a float32 tensor, got ", v.scalar_type());
  TORCH_CHECK(v.device().is_cpu(), op, ": the C++ kernel takes CPU tensors, ", name, " is on ",
              v.device());
  auto c = v.contiguous();
  const float* d = c.data_ptr<float>();
  return std::vector<float>(d, d + n);
}

// skip[i]: model i found an inf/NaN grad (found_inf[i] != 0) and does not step.
// An empty found_inf (none given) skips nobody.
inline std::vector<char> skip_mask(const std::vector<float>& found, int64_t n, bool* any) {
  std::vector<char> skip(n, 0);
  *any = false;
  for (size_t i = 0; i < found.size(); ++i) {
    skip[i] = found[i] != 0.0f;
    *any = *any || skip[i];
  }
  return skip;
}

}  // namespace modelbatch
