// modelbatch._C: the op schemas of the modelbatch:: namespace and the Python
// module entry point. Kernels register themselves per backend in their own
// files (csrc/<op>.cpp), one file per op.
#include <Python.h>
#include <torch/library.h>
#include <torch/version.h>

#include <string>

#define MB_STR_(x) #x
#define MB_STR(x) MB_STR_(x)

namespace modelbatch {

std::string build_info() {
  std::string s = "modelbatch._C built with torch " MB_STR(TORCH_VERSION_MAJOR) "." MB_STR(
      TORCH_VERSION_MINOR) "." MB_STR(TORCH_VERSION_PATCH);
#if defined(__GNUC__) && !defined(__clang__)
  s += ", gcc " __VERSION__;
#endif
#if defined(_OPENMP)
  s += ", openmp";
#endif
#if defined(__x86_64__) && defined(__GNUC__)
  s += ", x86-64 target_clones(avx512f, avx2, default)";
#endif
  return s;
}

}  // namespace modelbatch

// Keep in sync with python/modelbatch/ops/_schemas.py (tests/test_backend.py checks).
TORCH_LIBRARY(modelbatch, m) {
  m.def("build_info() -> str", &modelbatch::build_info);
  m.def(
      "adam_step(Tensor(a!)[] params, Tensor(f!)[] grads, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!) steps, "
      "Tensor lr, Tensor beta1, Tensor beta2, Tensor eps, Tensor weight_decay, "
      "Tensor amsgrad, bool decoupled_weight_decay, Tensor? inv_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def(
      "sgd_step(Tensor(a!)[] params, Tensor(f!)[] grads, Tensor(b!)[] momentum_buffers, "
      "Tensor(c!) steps, Tensor lr, Tensor momentum, Tensor dampening, "
      "Tensor weight_decay, Tensor nesterov, Tensor? inv_scale=None, "
      "Tensor? found_inf=None) -> ()");
  m.def(
      "amp_unscale_(Tensor(a!)[] grads, Tensor(b!) found_inf, Tensor inv_scale, "
      "bool write=True) -> ()");
  m.def(
      "batched_cross_entropy(Tensor logits, Tensor target, bool shared, int reduction, "
      "int ignore_index) -> (Tensor, Tensor)");
  m.def(
      "batched_cross_entropy_backward(Tensor grad, Tensor logits, Tensor lse, Tensor target, "
      "bool shared, int reduction, int ignore_index) -> Tensor");
  m.def(
      "small_bmm(Tensor a, Tensor b, bool trans_a, bool trans_b, Tensor? bias) -> Tensor");
  m.def("philox4x32(Tensor counter, Tensor key) -> Tensor");
  m.def(
      "batched_dropout(Tensor x, Tensor seeds, Tensor offsets, float p, int repeat, int kind, "
      "bool grad) -> Tensor");
  m.def(
      "rnn_layer(int mode, Tensor gx, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, Tensor h0, "
      "Tensor? c0, bool reverse, int[] batch_sizes) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "rnn_layer_backward(int mode, Tensor grad_out, Tensor grad_hn, Tensor? grad_cn, "
      "Tensor w_hh, Tensor? b_hh, Tensor? w_hr, Tensor h0, Tensor? c0, Tensor out, Tensor ws, "
      "bool reverse, int[] batch_sizes) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "fused_mlp_loss_grad(Tensor x, Tensor target, Tensor[] weights, Tensor?[] biases, "
      "int[] activations, int loss, int ignore_index, Tensor? grad_scale) -> "
      "(Tensor, Tensor[])");
  m.def(
      "fused_mlp_adam_step(Tensor x, Tensor target, Tensor(a!)[] params, int[] biased, "
      "int[] activations, int loss, int ignore_index, Tensor(b!)[] exp_avgs, "
      "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!) steps, Tensor lr, "
      "Tensor beta1, Tensor beta2, Tensor eps, Tensor weight_decay, Tensor amsgrad, "
      "bool decoupled_weight_decay, Tensor? max_norm) -> Tensor");
}

extern "C" {
// A plain extension module: importing it runs the static registrations above.
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "modelbatch C++ CPU kernels (ops live in torch.ops.modelbatch)",
      -1, nullptr};
  return PyModule_Create(&module_def);
}
}
