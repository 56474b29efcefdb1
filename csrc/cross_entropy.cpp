// modelbatch::batched_cross_entropy on the CPU: F.cross_entropy (class-index
// targets) of N models at once, one fused pass per row.
//
// logits [N, B, C]; target [B] (shared by all models) or [N, B], int64.
// reduction: 0 = none -> [N, B], 1 = mean -> [N], 2 = sum -> [N]; rows whose target
// is ignore_index count neither in the sum nor in the mean's denominator, as in
// torch. Row losses are max + log(sum(exp(x - max))) - x[target], torch's
// log_softmax formula; the backward recomputes the softmax from the logits.
//
// torch's CPU log_softmax vectorises along the class axis, so a handful of classes
// (the small classifiers this library trains by the thousand) leaves it mostly
// idle; this kernel works row by row and never materialises log-probabilities.
#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>

namespace modelbatch {
namespace {

constexpr int64_t kNone = 0, kMean = 1, kSum = 2;

void check_args(const at::Tensor& logits, const at::Tensor& target, bool shared,
                int64_t reduction) {
  constexpr const char* op = "modelbatch::batched_cross_entropy";
  TORCH_CHECK(logits.dim() == 3, op, ": logits must be [N, B, C], got shape ", logits.sizes());
  TORCH_CHECK(target.scalar_type() == at::kLong, op, ": target must be int64 class indices, got ",
              target.scalar_type());
  const int64_t n = logits.size(0), b = logits.size(1);
  if (shared) {
    TORCH_CHECK(target.dim() == 1 && target.size(0) == b, op, ": a shared target must be [B=", b,
                "], got shape ", target.sizes());
  } else {
    TORCH_CHECK(target.dim() == 2 && target.size(0) == n && target.size(1) == b, op,
                ": per-model targets must be [N=", n, ", B=", b, "], got shape ", target.sizes());
  }
  TORCH_CHECK(reduction >= kNone && reduction <= kSum, op, ": reduction must be 0, 1 or 2");
  TORCH_CHECK(logits.device().is_cpu() && target.device().is_cpu(), op,
              ": the C++ kernel takes CPU tensors");
}

template <typename scalar_t, typename opmath_t>
inline opmath_t row_logsumexp(const scalar_t* x, int64_t c) {
  opmath_t mx = -std::numeric_limits<opmath_t>::infinity();
  for (int64_t k = 0; k < c; ++k) mx = std::max(mx, static_cast<opmath_t>(x[k]));
  if (std::isinf(mx)) return mx;  // all -inf (or a +inf logit): torch gives the same
  opmath_t s = 0;
  for (int64_t k = 0; k < c; ++k) s += std::exp(static_cast<opmath_t>(x[k]) - mx);
  return mx + std::log(s);
}

inline int64_t check_target(int64_t t, int64_t c, int64_t ignore_index) {
  TORCH_CHECK(t == ignore_index || (t >= 0 && t < c), "modelbatch::batched_cross_entropy: target ",
              t, " is out of bounds for ", c, " classes");
  return t;
}

std::tuple<at::Tensor, at::Tensor> ce_forward_cpu(const at::Tensor& logits_in,
                                                  const at::Tensor& target_in, bool shared,
                                                  int64_t reduction, int64_t ignore_index) {
  check_args(logits_in, target_in, shared, reduction);
  const auto logits = logits_in.contiguous();
  const auto target = target_in.contiguous();
  const int64_t n = logits.size(0), b = logits.size(1), c = logits.size(2);
  at::Tensor out, lse_out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "ce_fwd", [&] {
    using opmath_t = at::opmath_type<scalar_t>;
    auto rows = at::empty({n, b}, logits.options().dtype(c10::CppTypeToScalarType<opmath_t>::value));
    lse_out = at::empty({n, b}, rows.options());
    opmath_t* lse = lse_out.data_ptr<opmath_t>();
    auto counted = at::empty({n, b}, logits.options().dtype(at::kBool));
    const scalar_t* x = logits.data_ptr<scalar_t>();
    const int64_t* t = target.data_ptr<int64_t>();
    opmath_t* r = rows.data_ptr<opmath_t>();
    bool* cnt = counted.data_ptr<bool>();
    at::parallel_for(0, n * b, std::max<int64_t>(1, 4096 / std::max<int64_t>(c, 1)),
                     [&](int64_t lo, int64_t hi) {
      for (int64_t row = lo; row < hi; ++row) {
        const int64_t tgt = check_target(t[shared ? row % b : row], c, ignore_index);
        const scalar_t* xr = x + row * c;
        lse[row] = row_logsumexp<scalar_t, opmath_t>(xr, c);
        if (tgt == ignore_index) {
          r[row] = 0;
          cnt[row] = false;
          continue;
        }
        r[row] = lse[row] - static_cast<opmath_t>(xr[tgt]);
        cnt[row] = true;
      }
    });
    if (reduction == kNone) {
      out = rows.to(logits.scalar_type());
    } else {
      auto total = rows.sum(1);
      if (reduction == kMean) total = total / counted.sum(1).to(total.scalar_type());
      out = total.to(logits.scalar_type());
    }
  });
  return {out, lse_out};
}

// The gradient from the saved per-row log-sum-exp: softmax = exp(x - lse), minus 1 at
// the target, times the row's output-gradient scale. Built from ATen's vectorised
// elementwise ops (one exp per element, no second max/sum pass over the row).
at::Tensor ce_backward_cpu(const at::Tensor& grad, const at::Tensor& logits_in,
                           const at::Tensor& lse, const at::Tensor& target_in, bool shared,
                           int64_t reduction, int64_t ignore_index) {
  check_args(logits_in, target_in, shared, reduction);
  const int64_t n = logits_in.size(0), b = logits_in.size(1);
  const auto opmath = lse.scalar_type();
  auto tgt = shared ? target_in.unsqueeze(0).expand({n, b}) : target_in;
  auto keep = tgt.ne(ignore_index);
  auto p = (logits_in.to(opmath) - lse.unsqueeze(-1)).exp_();
  p.scatter_add_(2, tgt.masked_fill(keep.logical_not(), 0).unsqueeze(-1),
                 at::full({n, b, 1}, -1.0, p.options()));
  at::Tensor scale;
  if (reduction == kNone) {
    scale = grad.to(opmath) * keep;
  } else {
    auto g = grad.to(opmath).reshape({n, 1});
    if (reduction == kMean) g = g / keep.sum(1, true).to(opmath);
    scale = g * keep;
  }
  return p.mul_(scale.unsqueeze(-1)).to(logits_in.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(modelbatch, CPU, m) {
  m.impl("batched_cross_entropy", &ce_forward_cpu);
  m.impl("batched_cross_entropy_backward", &ce_backward_cpu);
}

}  // namespace modelbatch
