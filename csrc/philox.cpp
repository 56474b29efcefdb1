// modelbatch::philox4x32 on the CPU: Philox4x32-10 of counter [..., 4] under
// key [..., 2] (int64 tensors holding uint32 words; leading dims broadcast) ->
// int64 [..., 4]. Bit-identical to python/modelbatch/ops/philox.py's reference for
// words in [0, 2**32); only the low 32 bits of each input word are used.
#include <ATen/ATen.h>
#include <ATen/ExpandUtils.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "philox.h"

namespace modelbatch {
namespace {

at::Tensor philox4x32_cpu(const at::Tensor& counter, const at::Tensor& key) {
  TORCH_CHECK_VALUE(counter.scalar_type() == at::kLong && key.scalar_type() == at::kLong,
                    "philox4x32: counter and key must be int64, got ", counter.scalar_type(),
                    " and ", key.scalar_type());
  TORCH_CHECK_VALUE(counter.dim() >= 1 && counter.size(-1) == 4 && key.dim() >= 1 &&
                        key.size(-1) == 2,
                    "philox4x32: expected counter [..., 4] and key [..., 2], got ",
                    counter.sizes(), " and ", key.sizes());
  TORCH_CHECK(counter.device().is_cpu() && key.device().is_cpu(),
              "philox4x32: the C++ kernel takes CPU tensors, got counter on ", counter.device(),
              " and key on ", key.device());
  const auto lead = at::infer_size(counter.sizes().slice(0, counter.dim() - 1),
                                   key.sizes().slice(0, key.dim() - 1));
  std::vector<int64_t> cshape(lead.begin(), lead.end()), kshape(lead.begin(), lead.end());
  cshape.push_back(4);
  kshape.push_back(2);
  const auto c = counter.expand(cshape).contiguous();
  const auto k = key.expand(kshape).contiguous();
  auto out = at::empty(cshape, counter.options());
  const int64_t n = out.numel() / 4;
  const int64_t* cp = c.data_ptr<int64_t>();
  const int64_t* kp = k.data_ptr<int64_t>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, n, 1 << 12, [&](int64_t lo, int64_t hi) {
    for (int64_t i = lo; i < hi; ++i) {
      uint32_t w[4];
      for (int j = 0; j < 4; ++j) w[j] = static_cast<uint32_t>(cp[4 * i + j]);
      philox::philox4x32_10(w, static_cast<uint32_t>(kp[2 * i]),
                            static_cast<uint32_t>(kp[2 * i + 1]));
      for (int j = 0; j < 4; ++j) op[4 * i + j] = static_cast<int64_t>(w[j]);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(modelbatch, CPU, m) { m.impl("philox4x32", &philox4x32_cpu); }

}  // namespace modelbatch
