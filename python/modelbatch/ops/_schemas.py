"""The schemas of the ``modelbatch::`` ops.

They are defined in C++ (``csrc/module.cpp``, ``TORCH_LIBRARY(modelbatch, ...)``);
this copy is used only to define the ops from Python when ``modelbatch._C`` could
not be loaded, so the reference kernels still run. ``tests/test_backend.py``
checks that both copies agree.
"""

SCHEMAS = {
    "build_info": "build_info() -> str",
    "adam_step": (
        "adam_step(Tensor(a!)[] params, Tensor(f!)[] grads, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!) steps, "
        "Tensor lr, Tensor beta1, Tensor beta2, Tensor eps, Tensor weight_decay, "
        "Tensor amsgrad, bool decoupled_weight_decay, Tensor? inv_scale=None, "
        "Tensor? found_inf=None) -> ()"
    ),
    "sgd_step": (
        "sgd_step(Tensor(a!)[] params, Tensor(f!)[] grads, Tensor(b!)[] momentum_buffers, "
        "Tensor(c!) steps, Tensor lr, Tensor momentum, Tensor dampening, "
        "Tensor weight_decay, Tensor nesterov, Tensor? inv_scale=None, "
        "Tensor? found_inf=None) -> ()"
    ),
    "amp_unscale_": (
        "amp_unscale_(Tensor(a!)[] grads, Tensor(b!) found_inf, Tensor inv_scale, "
        "bool write=True) -> ()"
    ),
    "batched_cross_entropy": (
        "batched_cross_entropy(Tensor logits, Tensor target, bool shared, int reduction, "
        "int ignore_index) -> (Tensor, Tensor)"
    ),
    "batched_cross_entropy_backward": (
        "batched_cross_entropy_backward(Tensor grad, Tensor logits, Tensor lse, Tensor target, "
        "bool shared, int reduction, int ignore_index) -> Tensor"
    ),
    "small_bmm": (
        "small_bmm(Tensor a, Tensor b, bool trans_a, bool trans_b, Tensor? bias) -> Tensor"
    ),
    "philox4x32": "philox4x32(Tensor counter, Tensor key) -> Tensor",
    "batched_dropout": (
        "batched_dropout(Tensor x, Tensor seeds, Tensor offsets, float p, int repeat, int kind, "
        "bool grad) -> Tensor"
    ),
    "rnn_layer": (
        "rnn_layer(int mode, Tensor gx, Tensor w_hh, Tensor? b_hh, Tensor? w_hr, Tensor h0, "
        "Tensor? c0, bool reverse, int[] batch_sizes) -> (Tensor, Tensor, Tensor, Tensor)"
    ),
    "rnn_layer_backward": (
        "rnn_layer_backward(int mode, Tensor grad_out, Tensor grad_hn, Tensor? grad_cn, "
        "Tensor w_hh, Tensor? b_hh, Tensor? w_hr, Tensor h0, Tensor? c0, Tensor out, Tensor ws, "
        "bool reverse, int[] batch_sizes) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)"
    ),
    "fused_mlp_loss_grad": (
        "fused_mlp_loss_grad(Tensor x, Tensor target, Tensor[] weights, Tensor?[] biases, "
        "int[] activations, int loss, int ignore_index, Tensor? grad_scale) -> "
        "(Tensor, Tensor[])"
    ),
    "fused_mlp_adam_step": (
        "fused_mlp_adam_step(Tensor x, Tensor target, Tensor(a!)[] params, int[] biased, "
        "int[] activations, int loss, int ignore_index, Tensor(b!)[] exp_avgs, "
        "Tensor(c!)[] exp_avg_sqs, Tensor(d!)[] max_exp_avg_sqs, Tensor(e!) steps, Tensor lr, "
        "Tensor beta1, Tensor beta2, Tensor eps, Tensor weight_decay, Tensor amsgrad, "
        "bool decoupled_weight_decay, Tensor? max_norm) -> Tensor"
    ),
}
