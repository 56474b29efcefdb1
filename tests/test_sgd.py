"""Tests of ``modelbatch::sgd_step``.

* The C++ CPU kernel (``torch.ops.modelbatch.sgd_step`` on CPU tensors) and the
  Triton kernel (``modelbatch.kernels.sgd.sgd_step``: on CUDA, or on CPU under
  ``TRITON_INTERPRET=1``) against the pure-torch reference, over several steps,
  odd shapes and random per-model hyper-parameters (mixed momentum 0 / nonzero,
  nesterov, dampening, weight decay, first and later steps).
* The CUDA op against the reference (needs a GPU).
* Both kernels against ``torch.optim.SGD`` run model by model.
* ``torch.library.opcheck``; bad input raises and changes nothing.
"""

from __future__ import annotations

import pytest
import torch
from modelbatch.kernels import adam as triton_adam
from modelbatch.kernels import sgd as triton_sgd
from modelbatch.ops.sgd import reference

SHAPES = [(7, 5), (13,), (1,), (3, 3, 3)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Relative to each tensor's largest magnitude (see assert_close_scaled).
RTOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
HP_NAMES = ("lr", "momentum", "dampening", "weight_decay", "nesterov")

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the op's CUDA kernel is Triton)"
)


def make_state(n, dtype, mom_mode="mixed", seed=0, shapes=SHAPES, fresh=False, hp_dtype=None):
    """Stacked parameters and momentum buffers for ``n`` models, with random
    per-model hyper-parameters.

    ``mom_mode``: "mixed" (model 0 with momentum and nesterov, model 1 without
    momentum, the others random), "all" or "none" (momentum 0 everywhere, then
    ``momentum_buffers`` is empty). ``fresh``: step counts 0, as torch.optim
    starts. Otherwise step counts are random in {0, 1, 5}: models at 0 take
    their first step next, and their buffers are NaN (a first step must not read
    them); the buffers of models without momentum are NaN too (they must stay so).
    """
    g = torch.Generator().manual_seed(seed)
    hp_dtype = hp_dtype or torch.float32

    def rand(*shape):
        return torch.rand(shape, generator=g, dtype=torch.float64)

    def choice(values):
        return torch.tensor(values, dtype=torch.float64)[
            torch.randint(len(values), (n,), generator=g)
        ]

    full = [(n, *s) for s in shapes]
    params = [torch.randn(s, generator=g).to(dtype) for s in full]
    momentum = choice([0.0, 0.5, 0.9, 0.99])
    nesterov = (rand(n) < 0.5).double()
    if mom_mode == "mixed":
        momentum[0], nesterov[0] = 0.9, 1.0
        if n > 1:
            momentum[1] = 0.0
    elif mom_mode == "all":
        momentum = torch.where(momentum == 0, 0.8, momentum)
    else:
        momentum = torch.zeros(n, dtype=torch.float64)
    steps = torch.zeros(n, dtype=torch.float64) if fresh else choice([0.0, 1.0, 5.0])
    bufs = []
    for s in full:
        buf = torch.randn(s, generator=g).to(dtype)
        unread = ((steps == 0) | (momentum == 0)).view((-1,) + (1,) * (len(s) - 1))
        bufs.append(buf.masked_fill(unread.expand(s), float("nan")))
    hps = {
        "lr": 10 ** (rand(n) * 3 - 4),
        "momentum": momentum,
        "dampening": torch.where(rand(n) < 0.5, 0.0, rand(n) * 0.5),
        "weight_decay": torch.where(rand(n) < 0.5, 0.0, 0.1 * rand(n)),
        "nesterov": nesterov,
    }
    return {
        "params": params,
        "momentum_buffers": bufs if mom_mode != "none" else [],
        "steps": steps,
        **{k: v.to(hp_dtype) for k, v in hps.items()},
    }


def make_grads(state, seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(p.shape, generator=g).to(p.dtype) for p in state["params"]]


def clone_state(state, device="cpu"):
    return {
        k: [x.clone().to(device) for x in v] if isinstance(v, list) else v.clone().to(device)
        for k, v in state.items()
    }


def op_args(state, grads):
    return (
        state["params"],
        grads,
        state["momentum_buffers"],
        state["steps"],
        *(state[k] for k in HP_NAMES),
    )


def run_steps(fn, state, num_steps=3, seed=100):
    device = state["params"][0].device if state["params"] else "cpu"
    for s in range(num_steps):
        grads = [x.to(device) for x in make_grads(state, seed + s)]
        fn(*op_args(state, grads))


def assert_close_scaled(actual, expected, rtol):
    """Close to ``rtol`` relative to the tensor's largest magnitude (NaNs match)."""
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    finite = expected[expected.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, equal_nan=True)


def assert_states_close(actual, expected, dtype):
    assert torch.equal(actual["steps"].cpu(), expected["steps"].cpu())
    for name in ("params", "momentum_buffers"):
        assert len(actual[name]) == len(expected[name])
        for k, (a, e) in enumerate(zip(actual[name], expected[name])):
            assert a.dtype == e.dtype and a.shape == e.shape, (name, k)
            try:
                assert_close_scaled(a, e, RTOL[dtype])
            except AssertionError as exc:
                raise AssertionError(f"{name}[{k}]: {exc}") from None


def check_against_reference(fn, device, n, dtype, mom_mode, seed, shapes=SHAPES):
    state = make_state(n, dtype, mom_mode, seed=seed, shapes=shapes)
    expected = clone_state(state)
    actual = clone_state(state, device)
    run_steps(reference, expected)
    run_steps(fn, actual)
    assert_states_close(actual, expected, dtype)
    # Models without momentum kept their (NaN) buffers.
    off = state["momentum"] == 0
    for before, after in zip(state["momentum_buffers"], actual["momentum_buffers"]):
        torch.testing.assert_close(after.cpu()[off], before[off], rtol=0, atol=0, equal_nan=True)
    for p in actual["params"]:
        assert not p.isnan().any()  # no NaN buffer was read


# --------------------------------------------------------------------------
# C++ CPU kernel vs reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mom_mode", ["mixed", "none", "all"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 3, 17])
def test_cpp_matches_reference(n, dtype, mom_mode):
    seed = n * 1000 + DTYPES.index(dtype) * 10 + len(mom_mode)
    check_against_reference(torch.ops.modelbatch.sgd_step, "cpu", n, dtype, mom_mode, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cpp_large_tensors(dtype):
    """Tensors large enough that the C++ kernel splits the work over threads,
    with splits inside a model's range, next to tiny and zero-size tensors."""
    shapes = [(12345,), (3,), (0,), (7, 1001), (1,)]
    check_against_reference(torch.ops.modelbatch.sgd_step, "cpu", 3, dtype, "mixed", 77, shapes)


def test_cpp_float64_hparams():
    """Hyper-parameters may come in any real dtype; they are read as float64."""
    state = make_state(5, torch.float32, seed=7, hp_dtype=torch.float64)
    expected, actual = clone_state(state), clone_state(state)
    run_steps(reference, expected)
    run_steps(torch.ops.modelbatch.sgd_step, actual)
    assert_states_close(actual, expected, torch.float32)


# --------------------------------------------------------------------------
# Triton kernel vs reference (interpreter on CPU, or CUDA)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("mom_mode", ["mixed", "none"])
@pytest.mark.parametrize(
    "n,dtype",
    [(3, d) for d in DTYPES] + [(1, torch.float32), (17, torch.float32)],
    ids=lambda x: str(x),
)
def test_triton_matches_reference(triton_device, n, dtype, mom_mode):
    seed = 5000 + n * 100 + DTYPES.index(dtype) * 10 + len(mom_mode)
    check_against_reference(triton_sgd.sgd_step, triton_device, n, dtype, mom_mode, seed)


@pytest.mark.parametrize("int64_index", [False, True], ids=["int32", "int64"])
def test_triton_launch_geometry(triton_device, monkeypatch, int64_index):
    """Blocks that span several models, several blocks per tensor, a zero-size
    tensor, the tensors split over two launches, and 64-bit offsets. (The launch
    settings live in kernels/adam.py, whose launcher sgd uses.)"""
    monkeypatch.setattr(triton_adam, "BLOCK", 16)
    monkeypatch.setattr(triton_adam, "MAX_TENSORS_PER_LAUNCH", 3)
    if int64_index:
        monkeypatch.setattr(triton_adam, "INT64_INDEX_FROM", 0)
    shapes = [(40,), (3,), (0,), (2, 9), (1,)]
    check_against_reference(
        triton_sgd.sgd_step, triton_device, 5, torch.float32, "mixed", 11, shapes
    )


# --------------------------------------------------------------------------
# CUDA op vs reference
# --------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_op_matches_reference(dtype):
    seed = 9000 + DTYPES.index(dtype)
    check_against_reference(torch.ops.modelbatch.sgd_step, "cuda", 17, dtype, "mixed", seed)


# --------------------------------------------------------------------------
# torch.optim, model by model
# --------------------------------------------------------------------------

# Per model: (momentum, dampening, nesterov, weight_decay). torch.optim requires
# zero dampening and nonzero momentum for nesterov.
TORCH_OPTIM_HPS = [
    (0.9, 0.0, 1.0, 0.0),
    (0.0, 0.0, 0.0, 0.01),
    (0.5, 0.2, 0.0, 0.05),
    (0.99, 0.0, 1.0, 0.1),
    (0.8, 0.0, 0.0, 0.0),
]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_matches_torch_optim(request, backend):
    device = "cpu" if backend == "cpp" else request.getfixturevalue("triton_device")
    fn = torch.ops.modelbatch.sgd_step if backend == "cpp" else triton_sgd.sgd_step
    n, num_steps = len(TORCH_OPTIM_HPS), 5
    state = make_state(n, torch.float32, "mixed", seed=3, fresh=True, hp_dtype=torch.float64)
    for j, name in enumerate(("momentum", "dampening", "nesterov", "weight_decay")):
        state[name] = torch.tensor([h[j] for h in TORCH_OPTIM_HPS], dtype=torch.float64)

    actual = clone_state(state, device)
    run_steps(fn, actual, num_steps=num_steps, seed=200)
    assert torch.equal(
        actual["steps"].cpu(), torch.full((n,), float(num_steps), dtype=torch.float64)
    )
    for i in range(n):
        ps = [p[i].clone().requires_grad_() for p in state["params"]]
        opt = torch.optim.SGD(
            ps,
            lr=state["lr"][i].item(),
            momentum=state["momentum"][i].item(),
            dampening=state["dampening"][i].item(),
            weight_decay=state["weight_decay"][i].item(),
            nesterov=bool(state["nesterov"][i]),
            foreach=False,
        )
        for s in range(num_steps):
            for p, g in zip(ps, make_grads(state, 200 + s)):
                p.grad = g[i].clone()
            opt.step()
        for k, p in enumerate(ps):
            # Relative to the tensor's scale: a buffer element can be the small
            # difference of larger terms (momentum * buf and grad), each rounded.
            assert_close_scaled(actual["params"][k][i], p, 1e-6)
            if state["momentum"][i] != 0:
                buf = opt.state[p]["momentum_buffer"]
                assert_close_scaled(actual["momentum_buffers"][k][i], buf, 1e-6)


# --------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=needs_cuda)], ids=["cpu", "cuda"]
)
@pytest.mark.parametrize("mom_mode", ["mixed", "none"])
def test_opcheck(device, mom_mode):
    """Schema (the declared mutations), fake kernel, autograd registration and
    AOT dispatch all pass for this mutating op that returns ()."""
    state = clone_state(make_state(3, torch.float32, mom_mode, seed=21), device)
    grads = [x.to(device) for x in make_grads(state, 1)]
    results = torch.library.opcheck(
        torch.ops.modelbatch.sgd_step.default, op_args(state, grads), raise_exception=False
    )
    assert results == dict.fromkeys(results, "SUCCESS"), results
    assert set(results) >= {"test_schema", "test_faketensor", "test_aot_dispatch_dynamic"}


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

N_BAD = 3


def _bad_cases():
    def short_grads(s, g):
        g.pop()

    def bad_shape(s, g):
        s["momentum_buffers"][1] = torch.zeros(N_BAD, 14, device=s["momentum_buffers"][1].device)

    def bad_hparam(s, g):
        s["dampening"] = torch.zeros(N_BAD - 1, device=s["dampening"].device)

    def missing_buffers(s, g):
        s["momentum_buffers"] = []

    def bad_dtype(s, g):
        g[0] = g[0].double()

    def non_contiguous(s, g):
        p = s["params"][0]
        s["params"][0] = p.transpose(1, 2).contiguous().transpose(1, 2)

    def bad_steps(s, g):
        s["steps"] = s["steps"].float()

    def not_stacked(s, g):
        s["params"][2] = torch.zeros(N_BAD + 1, 1, device=s["params"][2].device)

    return {
        "short_grads": (short_grads, r"expected 4 grads \(one per parameter\), got 3"),
        "bad_shape": (bad_shape, r"momentum_buffers\[1\] has shape"),
        "bad_hparam": (bad_hparam, r"dampening must be a \[N\] per-model tensor with N=3"),
        "missing_buffers": (missing_buffers, r"momentum_buffers"),
        "bad_dtype": (bad_dtype, r"grads\[0\] has dtype"),
        "non_contiguous": (non_contiguous, r"params\[0\] must be contiguous"),
        "bad_steps": (bad_steps, r"steps must be a contiguous float64"),
        "not_stacked": (not_stacked, r"params\[2\] has shape .* expected a stacked tensor"),
    }


BAD_CASES = _bad_cases()


def _snapshot(state, grads):
    return [x.clone() for v in state.values() for x in (v if isinstance(v, list) else [v])] + [
        g.clone() for g in grads
    ]


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_input_raises_and_changes_nothing(request, backend, case):
    device = "cpu" if backend == "cpp" else request.getfixturevalue("triton_device")
    fn = torch.ops.modelbatch.sgd_step if backend == "cpp" else triton_sgd.sgd_step
    error = RuntimeError if backend == "cpp" else ValueError
    state = clone_state(make_state(N_BAD, torch.float32, "mixed", seed=31), device)
    grads = [x.to(device) for x in make_grads(state, 1)]
    mutate, pattern = BAD_CASES[case]
    mutate(state, grads)
    if case == "missing_buffers" and device == "cuda":
        # Checked only where it is free: momentum on the CPU (see kernels/sgd.py).
        state["momentum"] = state["momentum"].cpu()
    before = _snapshot(state, grads)
    with pytest.raises(error, match=pattern):
        fn(*op_args(state, grads))
    after = _snapshot(state, grads)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_no_params_still_counts_steps(request, backend):
    device = "cpu" if backend == "cpp" else request.getfixturevalue("triton_device")
    fn = torch.ops.modelbatch.sgd_step if backend == "cpp" else triton_sgd.sgd_step
    state = clone_state(make_state(2, torch.float32, "none", shapes=[]), device)
    before = state["steps"].clone()
    fn(*op_args(state, []))
    assert torch.equal(state["steps"], before + 1)
