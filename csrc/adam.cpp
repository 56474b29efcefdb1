// modelbatch::adam_step on the CPU: Adam / AdamW for N models in one call, each
// model with its own lr, betas, eps, weight decay, amsgrad flag and step count.
//
// Per element it follows torch.optim.Adam's single-tensor path (csrc/adam_math.h),
// so a batched run reproduces N separate torch.optim runs to float rounding.
//
// Mixed precision (optional inv_scale, found_inf, [N] float32): with inv_scale
// every grad element of model i (skipped or not) is unscaled in place first,
// g = scalar_t(opmath(g) * inv_scale[i]), and the update uses that stored value;
// a model with found_inf[i] != 0 is skipped (state and step count untouched).
// Without them the kernel is the plain one (UNSCALE=false, no skip test).
#include "adam_math.h"
#include "multi_tensor.h"

#include <torch/library.h>

#include <cmath>

namespace modelbatch {
namespace {

// float32 is the hot path: compiled once per vector ISA, chosen at load time.
MB_CLONES void adam_f32(float* p, float* g, float* m, float* v, float* vmax, int64_t n,
                        const AdamScalars<float>& s) {
  adam_dispatch<float, float>(p, g, m, v, vmax, n, s);
}

template <typename scalar_t, typename opmath_t>
void adam_segment(scalar_t* p, scalar_t* g, scalar_t* m, scalar_t* v, scalar_t* vmax,
                  int64_t n, const AdamScalars<opmath_t>& s) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    adam_f32(p, g, m, v, vmax, n, s);
  } else {
    adam_dispatch<scalar_t, opmath_t>(p, g, m, v, vmax, n, s);
  }
}

void adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                   const at::Tensor& steps, const at::Tensor& lr, const at::Tensor& beta1,
                   const at::Tensor& beta2, const at::Tensor& eps,
                   const at::Tensor& weight_decay, const at::Tensor& amsgrad,
                   bool decoupled_weight_decay, const std::optional<at::Tensor>& inv_scale,
                   const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "modelbatch::adam_step";
  const int64_t n = check_params(params, steps, op);
  check_like(params, grads, op, "grads", n);
  check_like(params, exp_avgs, op, "exp_avgs", n);
  check_like(params, exp_avg_sqs, op, "exp_avg_sqs", n);
  const auto lr_v = hparam(lr, n, op, "lr");
  const auto b1_v = hparam(beta1, n, op, "beta1");
  const auto b2_v = hparam(beta2, n, op, "beta2");
  const auto eps_v = hparam(eps, n, op, "eps");
  const auto wd_v = hparam(weight_decay, n, op, "weight_decay");
  const auto ams_v = hparam(amsgrad, n, op, "amsgrad");
  bool any_ams = false;
  for (double a : ams_v) any_ams = any_ams || (a != 0.0);
  if (any_ams) {
    check_like(params, max_exp_avg_sqs, op, "max_exp_avg_sqs", n);
  }
  TORCH_CHECK(steps.device().is_cpu() && steps.scalar_type() == at::kDouble &&
                  steps.is_contiguous(),
              op, ": steps must be a contiguous float64 CPU tensor");
  const auto inv_v = amp_vector(inv_scale, n, op, "inv_scale");
  const auto found_v = amp_vector(found_inf, n, op, "found_inf");
  const bool unscale = inv_scale.has_value();
  bool any_skip = false;
  const std::vector<char> skip = skip_mask(found_v, n, &any_skip);

  // The step counter advances first, as torch.optim's does; bias corrections use
  // the new count, computed in double per model.
  double* step_ptr = steps.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) step_ptr[i] += skip[i] ? 0.0 : 1.0;
  if (params.empty()) return;

  std::vector<int64_t> numels;
  for (const auto& p : params) numels.push_back(p.numel());

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "adam_step_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        std::vector<AdamScalars<opmath_t>> sc(n);
        for (int64_t i = 0; i < n; ++i) {
          sc[i] = adam_scalars<opmath_t>(step_ptr[i], lr_v[i], b1_v[i], b2_v[i], eps_v[i],
                                         wd_v[i], ams_v[i] != 0.0, decoupled_weight_decay,
                                         unscale, unscale ? inv_v[i] : 1.0f);
        }
        std::vector<scalar_t*> P, G, M, V, VM;
        for (size_t t = 0; t < params.size(); ++t) {
          P.push_back(params[t].data_ptr<scalar_t>());
          G.push_back(grads[t].data_ptr<scalar_t>());
          M.push_back(exp_avgs[t].data_ptr<scalar_t>());
          V.push_back(exp_avg_sqs[t].data_ptr<scalar_t>());
          VM.push_back(any_ams ? max_exp_avg_sqs[t].data_ptr<scalar_t>() : nullptr);
        }
        for_each_segment(numels, n, [&](const Segment& s) {
          const int64_t t = s.tensor, o = s.begin;
          if (any_skip && skip[s.model]) {
            if (unscale) unscale_inplace(G[t] + o, s.length, sc[s.model].inv_scale);
            return;
          }
          adam_segment<scalar_t, opmath_t>(P[t] + o, G[t] + o, M[t] + o, V[t] + o,
                                           VM[t] ? VM[t] + o : nullptr, s.length, sc[s.model]);
        });
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(modelbatch, CPU, m) { m.impl("adam_step", &adam_step_cpu); }

}  // namespace modelbatch
