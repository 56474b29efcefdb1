"""Tests of ``modelbatch::linear_act`` (batched linear + bias + activation): the
Triton kernels of ``kernels/linear.py`` (on CUDA, or on CPU under
``TRITON_INTERPRET=1``) and the op's CPU path, against the pure-torch oracle
``modelbatch.ops.linear.reference_linear_act*`` and plain per-model
``F.linear`` + activation.

* Triton forward and backward (grad_x, grad_weight, grad_bias) on odd shapes
  (N in {1, 3}, M in {1, 5, 17}, I in {3, 19}, O in {1, 7, 33}), shared and
  per-model input, with and without bias, every epilogue, float32 (tight);
  float16 / bfloat16 within 2x torch's own error at that dtype; float64.
* Kernel details: several tiles on every axis (shared tiles spanning model
  boundaries), strided inputs, the ``need_*`` subsets, int64 offsets, relu's
  select semantics, launch configuration.
* The op on CPU: against per-model ``F.linear`` + activation forward and
  backward, ``gradcheck`` in float64, ``opcheck``, ``torch.compile``.
* Bad input raises ValueError with a clear message.
* The CUDA op (Triton, eager and compiled) against the reference (needs a GPU).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from modelbatch.kernels import linear as K
from modelbatch.ops import linear as L

ACTS = L.ACTIVATIONS
SHAPES = [(n, m, i, o) for n in (1, 3) for m in (1, 5, 17) for i in (3, 19) for o in (1, 7, 33)]
#: Plain torch, one model: the activation applied after F.linear.
TORCH_ACT = {
    "none": lambda z: z,
    "relu": torch.relu,
    "gelu": F.gelu,
    "gelu_tanh": lambda z: F.gelu(z, approximate="tanh"),
    "silu": F.silu,
    "tanh": torch.tanh,
}
# float32 kernel against the float32 oracle (different summation orders).
TOL32 = dict(rtol=1e-5, atol=1e-5)

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the op's CUDA kernel is Triton)"
)


def _inputs(n, m, i, o, shared, bias, dtype=torch.float32, device="cpu", seed=0):
    """``(x, weight, bias, grad)``: ``x [M, I]`` or ``[N, M, I]``, ``weight [N, O,
    I]`` scaled as ``nn.Linear``'s init would, ``bias [N, O]`` or None, and the
    grad of the output ``[N, M, O]``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*(() if shared else (n,)), m, i, generator=g)
    w = torch.randn(n, o, i, generator=g) / max(i, 1) ** 0.5
    b = torch.randn(n, o, generator=g) if bias else None
    grad = torch.randn(n, m, o, generator=g)
    cast = lambda t: None if t is None else t.to(dtype=dtype, device=device)
    return cast(x), cast(w), cast(b), cast(grad)


def _saved(activation, out, pre):
    """What the backward takes from the forward (see ``SAVES_PRE``)."""
    if activation in L.SAVES_PRE:
        return pre
    return out if activation != "none" else None


def _triton(x, w, b, grad, activation, shared, need=(True, True, True)):
    """``(out, grad_x, grad_weight, grad_bias)`` of the Triton kernels."""
    out, pre = K.linear_act_forward(x, w, b, activation, shared)
    need = (need[0], need[1], need[2] and b is not None)
    saved = _saved(activation, out, pre)
    grads = K.linear_act_backward(grad, x, w, saved, activation, shared, *need)
    return (out, *grads)


def _reference(x, w, b, grad, activation, shared, need=(True, True, True)):
    out, pre = L.reference_linear_act_forward(x, w, b, activation, shared)
    need = (need[0], need[1], need[2] and b is not None)
    saved = _saved(activation, out, pre)
    grads = L.reference_linear_act_backward(grad, x, w, saved, activation, shared, *need)
    return (out, *grads)


def _per_model(x, w, b, grad, activation, shared):
    """``(out, grad_x, grad_weight, grad_bias)`` of N plain models, one at a time:
    ``act(F.linear(x(@n), w[n], b[n]))`` with autograd."""
    x, w = x.detach().requires_grad_(), w.detach().requires_grad_()
    b = b.detach().requires_grad_() if b is not None else None
    outs = [
        TORCH_ACT[activation](F.linear(x if shared else x[k], w[k], None if b is None else b[k]))
        for k in range(w.shape[0])
    ]
    out = torch.stack(outs)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    gb = grads[2] if b is not None else x.new_empty(0)
    return out.detach(), grads[0], grads[1], gb


def _assert_all_close(got, expected, what, **tol):
    names = ("out", "grad_x", "grad_weight", "grad_bias")
    for name, a, e in zip(names, got, expected):
        assert a.shape == e.shape, f"{what} {name}: {tuple(a.shape)} vs {tuple(e.shape)}"
        assert a.dtype == e.dtype, f"{what} {name}"
        msg = lambda m, n=name: f"{what} {n}: {m}"
        torch.testing.assert_close(a.cpu(), e.cpu(), msg=msg, **tol)


def _assert_within_torch_error(got, torch_lowp, truth, what):
    """Every output's max error against the float64 ``truth`` is at most twice
    that of torch's own computation in the same dtype (``torch_lowp``)."""
    for name, a, t, e in zip(("out", "grad_x", "grad_weight", "grad_bias"), got, torch_lowp, truth):
        assert a.dtype == t.dtype and a.shape == t.shape, (what, name)
        ours = (a.cpu().double() - e.cpu()).abs().max().item()
        theirs = (t.cpu().double() - e.cpu()).abs().max().item()
        assert ours <= 2 * theirs + 1e-6, f"{what} {name}: error {ours:.3g}, torch's {theirs:.3g}"


# --------------------------------------------------------------------------
# Triton kernels against the oracle and plain per-model torch
# --------------------------------------------------------------------------


@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_model"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_triton_float32_matches_reference_and_per_model(shape, shared, bias, triton_device):
    """float32, every shape; each case takes a different activation (all six
    cycle through the shapes, each with and without bias, shared and not)."""
    k = SHAPES.index(shape)
    activation = ACTS[(k + 2 * shared + bias) % len(ACTS)]
    x, w, b, grad = _inputs(*shape, shared, bias, device=triton_device, seed=k)
    got = _triton(x, w, b, grad, activation, shared)
    assert got[0].is_contiguous() and got[0].shape == (shape[0], shape[1], shape[3])
    cpu = [None if t is None else t.cpu() for t in (x, w, b, grad)]
    what = f"{activation} {shape}"
    _assert_all_close(got, _reference(*cpu, activation, shared), what + " vs reference", **TOL32)
    _assert_all_close(got, _per_model(*cpu, activation, shared), what + " vs F.linear", **TOL32)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_model"])
@pytest.mark.parametrize("activation", ACTS)
def test_triton_every_epilogue_float32_and_float64(activation, shared, triton_device):
    """Every activation on two shapes (one with several models, odd sizes), float32
    to 1e-5 and float64 to 1e-12."""
    for dtype, tol in ((torch.float32, TOL32), (torch.float64, dict(rtol=1e-12, atol=1e-12))):
        for shape in ((3, 17, 19, 33), (1, 5, 3, 7)):
            x, w, b, grad = _inputs(*shape, shared, True, dtype, triton_device, seed=7)
            got = _triton(x, w, b, grad, activation, shared)
            cpu = [t.cpu() for t in (x, w, b, grad)]
            _assert_all_close(got, _reference(*cpu, activation, shared), f"{dtype} {shape}", **tol)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_model"])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_triton_low_precision_within_torch_error(dtype, activation, shared, triton_device):
    """float16 / bfloat16: the kernels' error against the float64 truth (on the
    same rounded inputs) is at most twice that of torch's own computation at that
    dtype (the reference run in ``dtype``), for every output (flash-attention's
    criterion)."""
    x, w, b, grad = _inputs(3, 17, 19, 33, shared, True, dtype, seed=3)
    truth = _reference(*(t.double() for t in (x, w, b, grad)), activation, shared)
    torch_lowp = _reference(x, w, b, grad, activation, shared)
    dev = [t.to(triton_device) for t in (x, w, b, grad)]
    _assert_within_torch_error(_triton(*dev, activation, shared), torch_lowp, truth, activation)


def _small_config(p, q, k, dtype):
    return {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 4, "num_stages": 2}


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_model"])
def test_triton_many_tiles(shared, triton_device, monkeypatch):
    """16 x 16 x 16 tiles: several programs on both tile axes (grouped ordering
    with more tile rows than GROUP_M), several K steps, partial last tiles; the
    shared forward's column tiles span model boundaries (N*O = 105), and so do
    the shared backward's K steps (grad_x) and row tiles (grad_weight)."""
    monkeypatch.setattr(K, "config", _small_config)
    monkeypatch.setattr(K, "GROUP_M", 2)
    shape = (3, 40, 37, 35)  # M: 3 tile rows, two groups
    x, w, b, grad = _inputs(*shape, shared, True, device=triton_device, seed=11)
    cpu = [t.cpu() for t in (x, w, b, grad)]
    for activation in ("gelu", "relu"):
        got = _triton(x, w, b, grad, activation, shared)
        _assert_all_close(got, _reference(*cpu, activation, shared), activation, **TOL32)
    # grad_bias alone: one column block, every row block.
    need = (False, False, True)
    got = _triton(x, w, b, grad, "tanh", shared, need)
    _assert_all_close(got, _reference(*cpu, "tanh", shared, need), "grad_bias", **TOL32)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_model"])
def test_triton_strided_input(shared, triton_device):
    """``x`` may have any strides (a transposed view, a column slice)."""
    x, w, b, grad = _inputs(3, 5, 19, 7, shared, True, seed=5)
    big = torch.randn(*x.shape[:-2], 2 * x.shape[-1], x.shape[-2] + 3)
    view = big[..., ::2, 1 : 1 + x.shape[-2]].transpose(-1, -2)
    view.copy_(x)
    assert not view.is_contiguous()
    if triton_device != "cpu":  # the same strides on the device
        view = big.to(triton_device)[..., ::2, 1 : 1 + x.shape[-2]].transpose(-1, -2)
    dev = [t.to(triton_device) for t in (w, b, grad)]
    got = _triton(view, *dev, "silu", shared)
    _assert_all_close(got, _reference(x, w, b, grad, "silu", shared), "strided", **TOL32)


@pytest.mark.parametrize("need", [(True, False, False), (False, True, False), (False, False, True),
                                  (False, True, True), (False, False, False)], ids=str)  # fmt: skip
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_model"])
def test_triton_backward_subsets(need, shared, triton_device):
    """Only the grads asked for are computed; the others are empty ``[0]`` tensors
    (grad_bias alone runs the grad_weight kernel without its GEMM)."""
    x, w, b, grad = _inputs(3, 5, 19, 7, shared, True, device=triton_device, seed=2)
    got = _triton(x, w, b, grad, "gelu_tanh", shared, need)
    ref = _reference(*(t.cpu() for t in (x, w, b, grad)), "gelu_tanh", shared, need)
    for flag, a, e in zip(need, got[1:], ref[1:]):
        assert (a.numel() > 0) == flag and a.shape == e.shape
    _assert_all_close(got, ref, str(need), **TOL32)


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_model"])
def test_triton_int64_offsets(shared, triton_device, monkeypatch):
    """The int64-offset variant (used from 2**31 addressed elements on; forced
    here) computes the same values bit for bit."""
    x, w, b, grad = _inputs(3, 17, 19, 7, shared, True, torch.float64, triton_device, seed=4)
    expected = _triton(x, w, b, grad, "tanh", shared)
    monkeypatch.setattr(K, "INT64_INDEX_FROM", 0)
    for a, e in zip(_triton(x, w, b, grad, "tanh", shared), expected):
        assert torch.equal(a, e)


@pytest.mark.filterwarnings("ignore:invalid value encountered")  # the NaN input, in numpy
def test_triton_relu_semantics(triton_device):
    """relu keeps NaN NaN in the forward; its backward selects (as torch's
    threshold_backward): an infinite grad at an inactive unit gives 0."""
    x = torch.tensor([[1.0], [-1.0], [float("nan")]], device=triton_device)
    w = torch.ones(1, 1, 1, device=triton_device)
    out, _ = K.linear_act_forward(x, w, None, "relu", True)
    assert out[0, 0, 0] == 1 and out[0, 1, 0] == 0 and out[0, 2, 0].isnan()
    grad = torch.full((1, 2, 1), float("inf"), device=triton_device)
    gx, _, _ = K.linear_act_backward(grad, x[:2], w, out[:, :2], "relu", True, True, False, False)
    assert gx.tolist() == [[float("inf")], [0.0]]


def test_triton_empty_sizes(triton_device):
    """M = 0 (no rows) and I = 0 (no input features): outputs of the right shapes,
    zeros where a sum is empty (grad_weight, grad_bias of no rows; the forward of
    no features is the bias)."""
    x, w, b, grad = _inputs(2, 0, 3, 4, False, True, device=triton_device)
    out, gx, gw, gb = _triton(x, w, b, grad, "silu", False)
    assert out.shape == (2, 0, 4) and gx.shape == (2, 0, 3)
    assert torch.equal(gw, torch.zeros_like(gw)) and torch.equal(gb, torch.zeros_like(gb))
    x, w, b, grad = _inputs(2, 3, 0, 4, True, True, device=triton_device)
    out, gx, gw, gb = _triton(x, w, b, grad, "none", True)
    torch.testing.assert_close(out, b[:, None, :].expand(2, 3, 4))
    assert gx.shape == (3, 0) and gw.shape == (2, 4, 0)
    torch.testing.assert_close(gb, grad.sum(1))


def test_config():
    for p, q, k in [(1, 1, 1), (5, 7, 3), (17, 99, 19), (1000, 4096, 512), (129, 3, 70)]:
        for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            c = K.config(p, q, k, dtype)
            for key in ("BLOCK_M", "BLOCK_N", "BLOCK_K"):
                v = c[key]
                assert v >= 16 and v & (v - 1) == 0, (key, v)
            cap = 64 if dtype == torch.float64 else 128
            assert c["BLOCK_M"] <= max(16, min(cap, 2 * p)) and c["BLOCK_N"] <= cap
    assert K.config(5, 99, 19, torch.float32)["BLOCK_M"] == 16  # shrinks to the problem
    big = K.config(4096, 4096, 4096, torch.float16)
    assert (big["BLOCK_M"], big["BLOCK_N"], big["BLOCK_K"], big["num_warps"]) == (128, 128, 64, 8)


# --------------------------------------------------------------------------
# The op on CPU (the reference path)
# --------------------------------------------------------------------------


def _leaves(shape, shared, bias, dtype, seed=0):
    x, w, b, grad = _inputs(*shape, shared, bias, dtype, seed=seed)
    return x.requires_grad_(), w.requires_grad_(), b.requires_grad_() if b is not None else b, grad


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_model"])
@pytest.mark.parametrize("activation", ACTS)
def test_op_cpu_matches_per_model_f_linear(activation, shared):
    """``torch.ops.modelbatch.linear_act`` with autograd against N plain models."""
    for k, shape in enumerate([(1, 1, 3, 1), (3, 5, 19, 7), (3, 17, 3, 33)]):
        for bias in (True, False):
            x, w, b, grad = _leaves(shape, shared, bias, torch.float64, seed=k)
            out = L.linear_act(x, w, b, activation, shared)
            leaves = [t for t in (x, w, b) if t is not None]
            grads = torch.autograd.grad(out, leaves, grad)
            got = (out.detach(), grads[0], grads[1], grads[2] if bias else x.new_empty(0))
            _assert_all_close(got, _per_model(x, w, b, grad, activation, shared), str(shape))


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_model"])
@pytest.mark.parametrize("activation", ACTS)
def test_op_gradcheck(activation, shared):
    x, w, b, _ = _leaves((2, 3, 4, 5), shared, True, torch.float64, seed=1)
    fn = lambda x, w, b: L.linear_act(x, w, b, activation, shared)
    assert torch.autograd.gradcheck(fn, (x, w, b))
    fn = lambda x, w: L.linear_act(x, w, None, activation, shared)
    assert torch.autograd.gradcheck(fn, (x, w))


def test_op_only_some_inputs_need_grad():
    """A frozen input (the usual shared batch) or frozen weights: the backward
    skips those GEMMs and returns None for them."""
    x, w, b, grad = _leaves((3, 5, 4, 7), True, True, torch.float64)
    x.requires_grad_(False)
    out = L.linear_act(x, w, b, "relu", True)
    gw, gb = torch.autograd.grad(out, [w, b], grad)
    ref = _per_model(x, w, b, grad, "relu", True)
    torch.testing.assert_close(gw, ref[2])
    torch.testing.assert_close(gb, ref[3])
    w.requires_grad_(False)
    b.requires_grad_(False)
    x.requires_grad_(True)
    (gx,) = torch.autograd.grad(L.linear_act(x, w, b, "relu", True), [x], grad)
    torch.testing.assert_close(gx, ref[1])


@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_model"])
def test_opcheck(shared):
    L.linear_act_ops()  # defines linear_act_forward / linear_act_backward
    x, w, b, grad = _leaves((3, 5, 4, 7), shared, True, torch.float32)
    for activation in ("gelu", "relu", "none"):
        args = (x, w, b, activation, shared)
        torch.library.opcheck(torch.ops.modelbatch.linear_act.default, args)
        torch.library.opcheck(torch.ops.modelbatch.linear_act_forward.default, args)
    _, pre = L.reference_linear_act_forward(x.detach(), w.detach(), b.detach(), "silu", shared)
    for need in ((True, True, True), (False, True, False)):
        torch.library.opcheck(
            torch.ops.modelbatch.linear_act_backward.default,
            (grad, x.detach(), w.detach(), pre, "silu", shared, *need),
        )
    torch.library.opcheck(
        torch.ops.modelbatch.linear_act_backward.default,
        (grad, x.detach(), w.detach(), None, "none", shared, True, True, True),
    )


def test_ops_are_triton_ops_that_name_their_kernels():
    """The forward and backward are ``torch.library.triton_op``s whose compiled
    kernels torch.compile finds (its caches key on their source). Checked in a
    fresh process without ``TRITON_INTERPRET`` (interpreted kernels are not
    ``JITFunction``s), which also shows that ``import modelbatch`` defines them
    only on first use, without importing triton or torch._dynamo."""
    code = """if True:
        import sys, torch, modelbatch
        from modelbatch.ops import linear as L
        assert "triton" not in sys.modules and "torch._dynamo" not in sys.modules
        assert not hasattr(torch.ops.modelbatch, "linear_act_forward")
        L.linear_act_ops()
        from modelbatch.kernels import linear as K
        find = torch._library.triton.get_triton_kernels_for_op
        assert find("modelbatch::linear_act_forward") == [K._forward_kernel]
        assert set(find("modelbatch::linear_act_backward")) == {K._grad_x_kernel, K._grad_w_kernel}
    """
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


_AOT = """if True:
    import torch, triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from modelbatch.kernels import linear as K

    INTS = {"M", "Q", "I", "O", "K", "sx_b", "sx_m", "sx_k"}

    def build(kernel, dtype, p, **flags):
        meta = K.config(p, p, p, dtype)
        opts = {"num_warps": meta.pop("num_warps"), "num_stages": meta.pop("num_stages")}
        tl_dtype = K._TL_DTYPES[dtype]
        const = dict(DTYPE=tl_dtype, DOT=tl_dtype, COMPUTE=K._TL_DTYPES[K._compute_dtype(dtype)],
                     PRECISION="ieee", GROUP=K.GROUP_M, INT64=False, **meta)
        const.update(flags)
        ptr = "*" + {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16",
                     "float64": "fp64"}[str(dtype).split(".")[1]]
        sig = {a: "constexpr" if a in const else "i32" if a in INTS else ptr
               for a in kernel.arg_names}
        src = ASTSource(fn=kernel, signature=sig, constexprs=const)
        compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
        assert compiled.metadata.shared <= 99 * 1024, (kernel, dtype, compiled.metadata.shared)

    build(K._forward_kernel, torch.bfloat16, 4096, HAS_BIAS=True, SAVE_PRE=True, ACT=3)
    build(K._forward_kernel, torch.float64, 17, HAS_BIAS=False, SAVE_PRE=False, ACT=5)
    build(K._grad_x_kernel, torch.float16, 4096, ACT=2)
    build(K._grad_w_kernel, torch.float32, 4096, ACT=4, WRITE_W=True, WRITE_B=True, INT64=True)
    build(K._grad_w_kernel, torch.bfloat16, 5, ACT=1, WRITE_W=False, WRITE_B=True)
"""


def test_kernels_compile_for_the_gpu():
    """Without a GPU, Triton still compiles the kernels to sm_90 machine code
    (its bundled ptxas): the code the interpreter checks is also valid GPU code
    (types, loop-carried values, dot layouts), for the largest tiles of each
    dtype family, and fits in 99 KiB of shared memory (sm_86 / sm_89)."""
    import triton.backends

    if "nvidia" not in triton.backends.backends:
        pytest.skip("triton has no NVIDIA backend here")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    proc = subprocess.run([sys.executable, "-c", _AOT], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_op_compiles_on_cpu():
    """torch.compile (fullgraph) traces the op and its backward."""
    x, w, b, grad = _leaves((3, 5, 4, 7), True, True, torch.float32)
    fn = torch.compile(lambda x, w, b: L.linear_act(x, w, b, "gelu", True), fullgraph=True,
                       backend="aot_eager")  # fmt: skip
    out = fn(x, w, b)
    got = (out.detach(), *torch.autograd.grad(out, [x, w, b], grad))
    _assert_all_close(got, _per_model(x, w, b, grad, "gelu", True), "compiled", **TOL32)


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.zeros(shape, dtype=dtype, device=device)


_X, _W = _t(5, 4), _t(3, 7, 4)
BAD = [
    ((_X, _W, None, "swish", True), r"activation must be one of .*got 'swish'"),
    ((_X, _t(7, 4), None, "relu", True), r"weight must be a 3-D \[N, O, I\] tensor, got \(7, 4\)"),
    ((_t(3, 5, 4), _W, None, "relu", True), r"x must be a 2-D \[M, I\] \(shared=True\)"),
    ((_X, _W, None, "relu", False), r"x must be a 3-D \[N, M, I\] \(shared=False\)"),
    ((_t(2, 5, 4), _W, None, "relu", False), r"x has 2 models .* weight has N=3"),
    ((_t(5, 6), _W, None, "relu", True), r"x has 6 input features .* has I=4"),
    ((_X, _W, _t(3, 6), "relu", True), r"bias must be None or \[N, O\] = \[3, 7\], got \(3, 6\)"),
    ((_X, _W.double(), None, "relu", True), r"weight is torch.float64, x is torch.float32"),
    ((_X, _W, _t(3, 7, device="meta"), "relu", True), r"bias is on meta, x is on cpu"),
    ((_X.long(), _W.long(), None, "relu", True), r"floating-point"),
]


@pytest.mark.parametrize("args, match", BAD)
def test_bad_input(args, match):
    """The op (its CPU path and its fake) and the Triton launcher raise the same
    ValueError."""
    with pytest.raises(ValueError, match=match):
        torch.ops.modelbatch.linear_act(*args)
    with pytest.raises(ValueError, match=match):
        K.linear_act_forward(*args)


def test_bad_backward_input(triton_device):
    x, w, b, grad = _inputs(3, 5, 4, 7, False, True, device=triton_device)
    out, _ = K.linear_act_forward(x, w, b, "tanh", False)
    cases = [
        ((grad[:, :4], x, w, out, "tanh"), r"grad must be \[N, M, O\] = \[3, 5, 7\], got \(3, 4"),
        ((grad, x, w, None, "tanh"), r"saved must be \[N, M, O\] = \[3, 5, 7\], got NoneType"),
        ((grad.double(), x, w, out, "tanh"), r"grad is torch.float64 .* expected torch.float32"),
        ((grad, x, w, out, "elu"), r"activation must be one of"),
    ]  # fmt: skip
    for (g, xx, ww, s, act), match in cases:
        with pytest.raises(ValueError, match=match):
            K.linear_act_backward(g, xx, ww, s, act, False, True, True, True)
    with pytest.raises(ValueError, match="x has 2 models"):
        torch.ops.modelbatch.linear_act_backward(
            grad.cpu(), x[:2].cpu(), w.cpu(), None, "none", False, True, True, True
        )


def test_triton_wrong_device():
    """Under the interpreter the kernels take CPU tensors (on CUDA: CUDA tensors)."""
    if K._interpreting(K._forward_kernel):
        match, dev = "under TRITON_INTERPRET=1 the kernel takes CPU tensors, got meta", "meta"
    else:
        match, dev = "the Triton kernel takes CUDA tensors", "cpu"
    with pytest.raises(ValueError, match=match):
        K.linear_act_forward(_t(5, 4, device=dev), _t(3, 7, 4, device=dev), None, "relu", True)


# --------------------------------------------------------------------------
# CUDA
# --------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_model"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_cuda_op_matches_reference(dtype, shared):
    """On a GPU: the registered CUDA kernels (Triton), eager and under
    torch.compile, with autograd, within twice the error of torch's own
    computation (cuBLAS) in that dtype, against the float64 truth."""
    if K._interpreting(K._forward_kernel):
        pytest.skip("TRITON_INTERPRET=1: the kernels take CPU tensors")
    compiled = torch.compile(L.linear_act, fullgraph=True)
    for activation in ACTS:
        for shape in ((3, 17, 19, 33), (64, 256, 96, 80)):
            x, w, b, grad = _inputs(*shape, shared, True, dtype, "cuda", seed=1)
            truth = _reference(*(t.double() for t in (x, w, b, grad)), activation, shared)
            torch_lowp = _reference(x, w, b, grad, activation, shared)
            leaves = [t.requires_grad_() for t in (x, w, b)]
            for fn in (L.linear_act, compiled):
                out = fn(x, w, b, activation, shared)
                got = (out.detach(), *torch.autograd.grad(out, leaves, grad))
                _assert_within_torch_error(got, torch_lowp, truth, f"{activation} {shape}")
