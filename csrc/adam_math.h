// The per-element Adam / AdamW update of one model's parameters, shared by the
// optimizer kernel (csrc/adam.cpp) and the fused MLP step (csrc/fused_mlp.cpp).
//
// Per element it follows torch.optim.Adam's single-tensor path operation by
// operation (lerp for the first moment, mul + addcmul for the second, bias
// corrections per model in double), so a batched run reproduces N separate
// torch.optim runs to float rounding.
#pragma once

#include <cmath>
#include <cstdint>

#include "multi_tensor.h"

namespace modelbatch {
namespace {

template <typename opmath_t>
struct AdamScalars {
  opmath_t step_size;        // lr / (1 - beta1^t)
  opmath_t bc2_sqrt;         // sqrt(1 - beta2^t)
  opmath_t lerp_w;           // 1 - beta1
  opmath_t beta2;
  opmath_t one_minus_beta2;  // 1 - beta2
  opmath_t eps;
  opmath_t weight_decay;     // coupled (Adam) L2 term
  opmath_t decay_mul;        // decoupled (AdamW): 1 - lr * weight_decay
  opmath_t inv_scale;        // mixed precision: grads are unscaled by this first
  bool amsgrad;
  bool decoupled;
  bool unscale;
};

// RECIP: s.bc2_sqrt holds 1 / sqrt(1 - beta2^t) and multiplies instead of dividing
// (the fused MLP step, where the two divisions per element bound the update; the
// denominator then differs from torch's by at most an ulp).
template <typename scalar_t, typename opmath_t, bool AMSGRAD, bool DECOUPLED, bool UNSCALE,
          bool RECIP = false>
inline __attribute__((always_inline)) void adam_body(scalar_t* __restrict p,
                                                     scalar_t* __restrict g,
                                                     scalar_t* __restrict m,
                                                     scalar_t* __restrict v,
                                                     scalar_t* __restrict vmax, int64_t n,
                                                     const AdamScalars<opmath_t>& s) {
  const opmath_t w = s.lerp_w;
  for (int64_t j = 0; j < n; ++j) {
    opmath_t pj = static_cast<opmath_t>(p[j]);
    opmath_t gj = read_grad<UNSCALE, scalar_t, opmath_t>(g[j], s.inv_scale);
    if (DECOUPLED) {
      pj = pj * s.decay_mul;
    } else {
      gj = gj + s.weight_decay * pj;
    }
    opmath_t mj = static_cast<opmath_t>(m[j]);
    // torch.lerp's two-branch formula, so the first moment rounds as torch's does.
    mj = (w < opmath_t(0.5)) ? mj + w * (gj - mj) : gj - (gj - mj) * (opmath_t(1) - w);
    opmath_t vj = static_cast<opmath_t>(v[j]) * s.beta2;
    vj = vj + s.one_minus_beta2 * gj * gj;
    opmath_t denom_src = vj;
    if (AMSGRAD) {
      opmath_t vm = static_cast<opmath_t>(vmax[j]);
      vm = (vm > vj || vm != vm) ? vm : vj;  // torch.maximum: NaN wins
      vmax[j] = static_cast<scalar_t>(vm);
      denom_src = vm;
    }
    const opmath_t root = std::sqrt(denom_src);
    const opmath_t denom = (RECIP ? root * s.bc2_sqrt : root / s.bc2_sqrt) + s.eps;
    pj = pj + (-s.step_size) * (mj / denom);
    p[j] = static_cast<scalar_t>(pj);
    m[j] = static_cast<scalar_t>(mj);
    v[j] = static_cast<scalar_t>(vj);
  }
}

template <typename scalar_t, typename opmath_t, bool UNSCALE, bool RECIP = false>
inline __attribute__((always_inline)) void adam_dispatch2(scalar_t* p, scalar_t* g, scalar_t* m,
                                                          scalar_t* v, scalar_t* vmax, int64_t n,
                                                          const AdamScalars<opmath_t>& s) {
  if (s.amsgrad) {
    if (s.decoupled) adam_body<scalar_t, opmath_t, true, true, UNSCALE, RECIP>(p, g, m, v, vmax, n, s);
    else adam_body<scalar_t, opmath_t, true, false, UNSCALE, RECIP>(p, g, m, v, vmax, n, s);
  } else {
    if (s.decoupled) adam_body<scalar_t, opmath_t, false, true, UNSCALE, RECIP>(p, g, m, v, vmax, n, s);
    else adam_body<scalar_t, opmath_t, false, false, UNSCALE, RECIP>(p, g, m, v, vmax, n, s);
  }
}

template <typename scalar_t, typename opmath_t, bool RECIP = false>
inline __attribute__((always_inline)) void adam_dispatch(scalar_t* p, scalar_t* g, scalar_t* m,
                                                         scalar_t* v, scalar_t* vmax, int64_t n,
                                                         const AdamScalars<opmath_t>& s) {
  if (s.unscale) adam_dispatch2<scalar_t, opmath_t, true, RECIP>(p, g, m, v, vmax, n, s);
  else adam_dispatch2<scalar_t, opmath_t, false, RECIP>(p, g, m, v, vmax, n, s);
}

// One model's scalars at step count t (already advanced); recip: bc2_sqrt holds
// the reciprocal, for adam_body<..., RECIP = true>.
template <typename opmath_t>
inline AdamScalars<opmath_t> adam_scalars(double t, double lr, double beta1, double beta2,
                                          double eps, double weight_decay, bool amsgrad,
                                          bool decoupled, bool unscale, float inv_scale,
                                          bool recip = false) {
  const double bc1 = 1.0 - std::pow(beta1, t);
  const double bc2 = 1.0 - std::pow(beta2, t);
  return {static_cast<opmath_t>(lr / bc1),
          static_cast<opmath_t>(recip ? 1.0 / std::sqrt(bc2) : std::sqrt(bc2)),
          static_cast<opmath_t>(1.0 - beta1),
          static_cast<opmath_t>(beta2),
          static_cast<opmath_t>(1.0 - beta2),
          static_cast<opmath_t>(eps),
          static_cast<opmath_t>(decoupled ? 0.0 : weight_decay),
          static_cast<opmath_t>(1.0 - lr * weight_decay),
          // The float32 inv_scale in opmath, as unscale_grads computes it.
          static_cast<opmath_t>(unscale ? inv_scale : 1.0f),
          amsgrad,
          decoupled,
          unscale};
}

}  // namespace
}  // namespace modelbatch
