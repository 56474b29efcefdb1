// modelbatch::amp_unscale_ on the CPU: the per-model non-finite check and
// loss-scale unscaling of N stacked models' gradients, for modelbatch.amp.
//
// For model i: if any element of its slices of the grads is inf or NaN,
// found_inf[i] = 1 (never reset: calls accumulate, as torch's found_inf does).
// With write, every element becomes scalar_t(opmath(g) * inv_scale[i]), the
// arithmetic of torch._amp_foreach_non_finite_check_and_unscale_. The check is
// on the stored value before unscaling.
#include "multi_tensor.h"

#include <torch/library.h>

namespace modelbatch {
namespace {

// Checks (and with WRITE unscales) n elements; returns whether one was non-finite.
template <typename scalar_t, typename opmath_t, bool WRITE>
inline __attribute__((always_inline)) bool amp_body(scalar_t* __restrict g, int64_t n,
                                                    opmath_t inv_scale) {
  typename FloatBits<scalar_t>::type bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    const scalar_t x = g[j];
    bad |= non_finite_bit(x);
    if (WRITE) g[j] = unscale_value<scalar_t, opmath_t>(x, inv_scale);
  }
  return bad != 0;
}

template <typename scalar_t, typename opmath_t>
inline __attribute__((always_inline)) bool amp_dispatch(scalar_t* g, int64_t n,
                                                        opmath_t inv_scale, bool write) {
  return write ? amp_body<scalar_t, opmath_t, true>(g, n, inv_scale)
               : amp_body<scalar_t, opmath_t, false>(g, n, inv_scale);
}

// Compiled once per vector ISA, chosen at load time: float32 (the hot path) and
// the half types (whose branchless float conversions vectorise there too).
MB_CLONES bool amp_f32(float* g, int64_t n, float inv_scale, bool write) {
  return amp_dispatch<float, float>(g, n, inv_scale, write);
}
MB_CLONES bool amp_f16(at::Half* g, int64_t n, float inv_scale, bool write) {
  return amp_dispatch<at::Half, float>(g, n, inv_scale, write);
}
MB_CLONES bool amp_bf16(at::BFloat16* g, int64_t n, float inv_scale, bool write) {
  return amp_dispatch<at::BFloat16, float>(g, n, inv_scale, write);
}

template <typename scalar_t, typename opmath_t>
bool amp_segment(scalar_t* g, int64_t n, opmath_t inv_scale, bool write) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return amp_f32(g, n, inv_scale, write);
  } else if constexpr (std::is_same_v<scalar_t, at::Half>) {
    return amp_f16(g, n, inv_scale, write);
  } else if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    return amp_bf16(g, n, inv_scale, write);
  } else {
    return amp_dispatch<scalar_t, opmath_t>(g, n, inv_scale, write);
  }
}

void amp_unscale_cpu(at::TensorList grads, const at::Tensor& found_inf,
                     const at::Tensor& inv_scale, bool write) {
  constexpr const char* op = "modelbatch::amp_unscale_";
  // Everything is validated before anything is written.
  TORCH_CHECK(found_inf.dim() == 1, op,
              ": found_inf must be a 1-D [N] per-model tensor, got shape ", found_inf.sizes());
  const int64_t n = found_inf.size(0);
  TORCH_CHECK(inv_scale.dim() == 1 && inv_scale.size(0) == n, op,
              ": found_inf and inv_scale must both be [N] per-model tensors of the same N, "
              "got found_inf of shape ", found_inf.sizes(), " and inv_scale of shape ",
              inv_scale.sizes());
  TORCH_CHECK(found_inf.scalar_type() == at::kFloat, op,
              ": found_inf must be a float32 tensor, got ", found_inf.scalar_type());
  TORCH_CHECK(inv_scale.scalar_type() == at::kFloat, op,
              ": inv_scale must be a float32 tensor, got ", inv_scale.scalar_type());
  TORCH_CHECK(found_inf.device().is_cpu(), op,
              ": the C++ kernel takes CPU tensors, found_inf is on ", found_inf.device());
  TORCH_CHECK(inv_scale.device().is_cpu(), op,
              ": the C++ kernel takes CPU tensors, inv_scale is on ", inv_scale.device());
  TORCH_CHECK(found_inf.is_contiguous(), op, ": found_inf must be contiguous");
  for (size_t t = 0; t < grads.size(); ++t) {
    const auto& g = grads[t];
    TORCH_CHECK(g.device().is_cpu(), op, ": the C++ kernel takes CPU tensors, grads[", t,
                "] is on ", g.device());
    TORCH_CHECK(g.dim() >= 1 && g.size(0) == n, op, ": grads[", t, "] has shape ", g.sizes(),
                ", expected a stacked tensor [N=", n,
                ", ...] (N is the size of found_inf and inv_scale)");
    TORCH_CHECK(g.scalar_type() == grads[0].scalar_type(), op,
                ": all grads of one call share a dtype; grads[", t, "] is ", g.scalar_type(),
                ", grads[0] is ", grads[0].scalar_type());
    TORCH_CHECK(g.is_contiguous(), op, ": grads[", t, "] must be contiguous");
  }
  if (grads.empty()) return;
  const auto dtype = grads[0].scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kDouble || dtype == at::kHalf ||
                  dtype == at::kBFloat16,
              op, ": grads must be float32, float64, float16 or bfloat16, got ", dtype);

  const auto inv_c = inv_scale.contiguous();
  const float* inv = inv_c.data_ptr<float>();
  float* fi = found_inf.data_ptr<float>();
  // Models already at found_inf = 1 need no store; with write=false, no pass at all.
  std::vector<char> flagged(n);
  for (int64_t i = 0; i < n; ++i) flagged[i] = fi[i] == 1.0f;

  std::vector<int64_t> numels;
  for (const auto& g : grads) numels.push_back(g.numel());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "amp_unscale_cpu", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    std::vector<scalar_t*> G;
    for (const auto& g : grads) G.push_back(g.data_ptr<scalar_t>());
    for_each_segment(numels, n, [&](const Segment& s) {
      if (!write && flagged[s.model]) return;
      const opmath_t inv_i = static_cast<opmath_t>(inv[s.model]);
      const bool bad =
          amp_segment<scalar_t, opmath_t>(G[s.tensor] + s.begin, s.length, inv_i, write);
      if (bad && !flagged[s.model]) {
        // Several segments (threads) of one model may store; all store 1.0f.
        const float one = 1.0f;
        __atomic_store(fi + s.model, &one, __ATOMIC_RELAXED);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(modelbatch, CPU, m) { m.impl("amp_unscale_", &amp_unscale_cpu); }

}  // namespace modelbatch
