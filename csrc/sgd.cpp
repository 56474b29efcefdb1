// modelbatch::sgd_step on the CPU: SGD with momentum, dampening, nesterov and
// weight decay for N models in one call, each with its own hyper-parameters.
//
// Follows torch.optim.SGD's single-tensor path: on a model's first step its
// momentum buffer is the gradient itself (no dampening), afterwards
// buf = momentum * buf + (1 - dampening) * grad.
//
// Mixed precision (optional inv_scale, found_inf, [N] float32): with inv_scale
// every grad element of model i (skipped or not) is unscaled in place first,
// g = scalar_t(opmath(g) * inv_scale[i]), and the update uses that stored value;
// a model with found_inf[i] != 0 is skipped (params, buffer and step count
// untouched). Without them the kernel is the plain one.
#include "multi_tensor.h"

#include <torch/library.h>

namespace modelbatch {
namespace {

template <typename opmath_t>
struct SgdScalars {
  opmath_t neg_lr;
  opmath_t momentum;
  opmath_t one_minus_dampening;
  opmath_t weight_decay;
  opmath_t inv_scale;  // mixed precision: grads are unscaled by this first
  bool use_momentum;
  bool first_step;
  bool nesterov;
  bool unscale;
};

template <typename scalar_t, typename opmath_t, bool MOMENTUM, bool FIRST, bool NESTEROV,
          bool UNSCALE>
inline __attribute__((always_inline)) void sgd_body(scalar_t* __restrict p,
                                                    scalar_t* __restrict g,
                                                    scalar_t* __restrict buf, int64_t n,
                                                    const SgdScalars<opmath_t>& s) {
  for (int64_t j = 0; j < n; ++j) {
    opmath_t pj = static_cast<opmath_t>(p[j]);
    opmath_t gj = read_grad<UNSCALE, scalar_t, opmath_t>(g[j], s.inv_scale);
    gj = gj + s.weight_decay * pj;
    if (MOMENTUM) {
      opmath_t bj;
      if (FIRST) {
        bj = gj;
      } else {
        bj = static_cast<opmath_t>(buf[j]) * s.momentum;
        bj = bj + s.one_minus_dampening * gj;
      }
      buf[j] = static_cast<scalar_t>(bj);
      gj = NESTEROV ? gj + s.momentum * bj : bj;
    }
    p[j] = static_cast<scalar_t>(pj + s.neg_lr * gj);
  }
}

template <typename scalar_t, typename opmath_t, bool U>
inline __attribute__((always_inline)) void sgd_dispatch2(scalar_t* p, scalar_t* g, scalar_t* buf,
                                                         int64_t n,
                                                         const SgdScalars<opmath_t>& s) {
  if (!s.use_momentum) return sgd_body<scalar_t, opmath_t, false, false, false, U>(p, g, buf, n, s);
  if (s.first_step) {
    if (s.nesterov) return sgd_body<scalar_t, opmath_t, true, true, true, U>(p, g, buf, n, s);
    return sgd_body<scalar_t, opmath_t, true, true, false, U>(p, g, buf, n, s);
  }
  if (s.nesterov) return sgd_body<scalar_t, opmath_t, true, false, true, U>(p, g, buf, n, s);
  return sgd_body<scalar_t, opmath_t, true, false, false, U>(p, g, buf, n, s);
}

template <typename scalar_t, typename opmath_t>
inline __attribute__((always_inline)) void sgd_dispatch(scalar_t* p, scalar_t* g, scalar_t* buf,
                                                        int64_t n,
                                                        const SgdScalars<opmath_t>& s) {
  if (s.unscale) sgd_dispatch2<scalar_t, opmath_t, true>(p, g, buf, n, s);
  else sgd_dispatch2<scalar_t, opmath_t, false>(p, g, buf, n, s);
}

MB_CLONES void sgd_f32(float* p, float* g, float* buf, int64_t n,
                       const SgdScalars<float>& s) {
  sgd_dispatch<float, float>(p, g, buf, n, s);
}

template <typename scalar_t, typename opmath_t>
void sgd_segment(scalar_t* p, scalar_t* g, scalar_t* buf, int64_t n,
                 const SgdScalars<opmath_t>& s) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    sgd_f32(p, g, buf, n, s);
  } else {
    sgd_dispatch<scalar_t, opmath_t>(p, g, buf, n, s);
  }
}

void sgd_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum_buffers,
                  const at::Tensor& steps, const at::Tensor& lr, const at::Tensor& momentum,
                  const at::Tensor& dampening, const at::Tensor& weight_decay,
                  const at::Tensor& nesterov, const std::optional<at::Tensor>& inv_scale,
                  const std::optional<at::Tensor>& found_inf) {
  constexpr const char* op = "modelbatch::sgd_step";
  const int64_t n = check_params(params, steps, op);
  check_like(params, grads, op, "grads", n);
  const auto lr_v = hparam(lr, n, op, "lr");
  const auto mom_v = hparam(momentum, n, op, "momentum");
  const auto damp_v = hparam(dampening, n, op, "dampening");
  const auto wd_v = hparam(weight_decay, n, op, "weight_decay");
  const auto nest_v = hparam(nesterov, n, op, "nesterov");
  bool any_momentum = false;
  for (double mo : mom_v) any_momentum = any_momentum || (mo != 0.0);
  if (any_momentum) check_like(params, momentum_buffers, op, "momentum_buffers", n);
  TORCH_CHECK(steps.device().is_cpu() && steps.scalar_type() == at::kDouble &&
                  steps.is_contiguous(),
              op, ": steps must be a contiguous float64 CPU tensor");
  const auto inv_v = amp_vector(inv_scale, n, op, "inv_scale");
  const auto found_v = amp_vector(found_inf, n, op, "found_inf");
  const bool unscale = inv_scale.has_value();
  bool any_skip = false;
  const std::vector<char> skip = skip_mask(found_v, n, &any_skip);

  double* step_ptr = steps.data_ptr<double>();
  for (int64_t i = 0; i < n; ++i) step_ptr[i] += skip[i] ? 0.0 : 1.0;
  if (params.empty()) return;

  std::vector<int64_t> numels;
  for (const auto& p : params) numels.push_back(p.numel());

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, params[0].scalar_type(), "sgd_step_cpu", [&] {
        using opmath_t = at::opmath_type<scalar_t>;
        std::vector<SgdScalars<opmath_t>> sc(n);
        for (int64_t i = 0; i < n; ++i) {
          sc[i] = {static_cast<opmath_t>(-lr_v[i]),
                   static_cast<opmath_t>(mom_v[i]),
                   static_cast<opmath_t>(1.0 - damp_v[i]),
                   static_cast<opmath_t>(wd_v[i]),
                   // The float32 inv_scale in opmath, as unscale_grads computes it.
                   static_cast<opmath_t>(unscale ? inv_v[i] : 1.0f),
                   mom_v[i] != 0.0,
                   step_ptr[i] == 1.0,
                   nest_v[i] != 0.0,
                   unscale};
        }
        std::vector<scalar_t*> P, G, B;
        for (size_t t = 0; t < params.size(); ++t) {
          P.push_back(params[t].data_ptr<scalar_t>());
          G.push_back(grads[t].data_ptr<scalar_t>());
          B.push_back(any_momentum ? momentum_buffers[t].data_ptr<scalar_t>() : nullptr);
        }
        for_each_segment(numels, n, [&](const Segment& s) {
          const int64_t t = s.tensor, o = s.begin;
          if (any_skip && skip[s.model]) {
            if (unscale) unscale_inplace(G[t] + o, s.length, sc[s.model].inv_scale);
            return;
          }
          sgd_segment<scalar_t, opmath_t>(P[t] + o, G[t] + o, B[t] ? B[t] + o : nullptr,
                                          s.length, sc[s.model]);
        });
      });
}

}  // namespace

TORCH_LIBRARY_IMPL(modelbatch, CPU, m) { m.impl("sgd_step", &sgd_step_cpu); }

}  // namespace modelbatch
