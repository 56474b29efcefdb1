"""Tests of ``modelbatch::adam_step``.

* The C++ CPU kernel (``torch.ops.modelbatch.adam_step`` on CPU tensors) and the
  Triton kernel (``modelbatch.kernels.adam.adam_step``: on CUDA, or on CPU under
  ``TRITON_INTERPRET=1``) against the pure-torch reference, over several steps,
  odd shapes and random per-model hyper-parameters.
* The CUDA op against the reference (needs a GPU).
* Both kernels against ``torch.optim.Adam`` / ``AdamW`` run model by model.
* ``torch.library.opcheck``; bad input raises and changes nothing.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl
from modelbatch.kernels import adam as triton_adam
from modelbatch.ops.adam import reference

SHAPES = [(7, 5), (13,), (1,), (3, 3, 3)]
DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
# Relative to each tensor's largest magnitude (see assert_close_scaled).
RTOL = {torch.float32: 1e-6, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
HP_NAMES = ("lr", "beta1", "beta2", "eps", "weight_decay", "amsgrad")
LISTS = ("params", "exp_avgs", "exp_avg_sqs", "max_exp_avg_sqs")

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the op's CUDA kernel is Triton)"
)


def make_state(n, dtype, ams_mode="mixed", seed=0, shapes=SHAPES, fresh=False, hp_dtype=None):
    """Stacked parameters and optimizer state for ``n`` models, with random
    per-model hyper-parameters.

    ``ams_mode``: "mixed" (random flags, model 0 on, model 1 off), "all" or
    "none" (then ``max_exp_avg_sqs`` is empty). ``fresh``: zero state and step
    counts, as torch.optim starts. Otherwise the state is random, the step counts
    differ per model, and the max buffers of models without amsgrad are NaN, so
    that a kernel that touched them would be caught.
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
    if ams_mode == "mixed":
        ams = (rand(n) < 0.5).double()
        ams[0] = 1.0
        if n > 1:
            ams[1] = 0.0
    else:
        ams = torch.full((n,), 1.0 if ams_mode == "all" else 0.0, dtype=torch.float64)
    if fresh:
        exp_avgs = [torch.zeros(s, dtype=dtype) for s in full]
        exp_avg_sqs = [torch.zeros(s, dtype=dtype) for s in full]
        maxes = [torch.zeros(s, dtype=dtype) for s in full]
        steps = torch.zeros(n, dtype=torch.float64)
    else:
        exp_avgs = [(0.1 * torch.randn(s, generator=g)).to(dtype) for s in full]
        exp_avg_sqs = [(0.01 * torch.rand(s, generator=g)).to(dtype) for s in full]
        maxes = []
        for v in exp_avg_sqs:
            mx = v + (0.01 * torch.rand(v.shape, generator=g)).to(dtype)
            off = (ams == 0).view((-1,) + (1,) * (v.dim() - 1)).expand(v.shape)
            maxes.append(mx.masked_fill(off, float("nan")))
        steps = torch.randint(0, 20, (n,), generator=g).double()
    hps = {
        "lr": 10 ** (rand(n) * 3 - 4),
        # 0.5 is the edge of lerp's two branches (weight 1 - beta1 < 0.5 or not).
        "beta1": choice([0.0, 0.3, 0.5, 0.9, 0.99]),
        "beta2": choice([0.9, 0.99, 0.999, 0.9999]),
        "eps": 10 ** (rand(n) * 7 - 10),
        "weight_decay": torch.where(rand(n) < 0.5, 0.0, 0.1 * rand(n)),
        "amsgrad": ams,
    }
    return {
        "params": params,
        "exp_avgs": exp_avgs,
        "exp_avg_sqs": exp_avg_sqs,
        "max_exp_avg_sqs": maxes if ams_mode != "none" else [],
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


def op_args(state, grads, decoupled):
    return (
        state["params"],
        grads,
        state["exp_avgs"],
        state["exp_avg_sqs"],
        state["max_exp_avg_sqs"],
        state["steps"],
        *(state[k] for k in HP_NAMES),
        decoupled,
    )


def run_steps(fn, state, decoupled, num_steps=3, seed=100):
    device = state["params"][0].device if state["params"] else "cpu"
    for s in range(num_steps):
        grads = [x.to(device) for x in make_grads(state, seed + s)]
        fn(*op_args(state, grads, decoupled))


def assert_close_scaled(actual, expected, rtol):
    """Close to ``rtol`` relative to the tensor's largest magnitude (NaNs match)."""
    actual = actual.detach().cpu().double()
    expected = expected.detach().cpu().double()
    finite = expected[expected.isfinite()]
    scale = finite.abs().max().item() if finite.numel() else 0.0
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, equal_nan=True)


def assert_states_close(actual, expected, dtype):
    assert torch.equal(actual["steps"].cpu(), expected["steps"].cpu())
    for name in LISTS:
        assert len(actual[name]) == len(expected[name])
        for k, (a, e) in enumerate(zip(actual[name], expected[name])):
            assert a.dtype == e.dtype and a.shape == e.shape, (name, k)
            try:
                assert_close_scaled(a, e, RTOL[dtype])
            except AssertionError as exc:
                raise AssertionError(f"{name}[{k}]: {exc}") from None


def check_against_reference(fn, device, n, dtype, decoupled, ams_mode, seed, shapes=SHAPES):
    state = make_state(n, dtype, ams_mode, seed=seed, shapes=shapes)
    expected = clone_state(state)
    actual = clone_state(state, device)
    run_steps(reference, expected, decoupled)
    run_steps(fn, actual, decoupled)
    assert_states_close(actual, expected, dtype)
    # Models without amsgrad keep their max buffers as they were.
    for before, after in zip(state["max_exp_avg_sqs"], actual["max_exp_avg_sqs"]):
        off = state["amsgrad"] == 0
        torch.testing.assert_close(after.cpu()[off], before[off], rtol=0, atol=0, equal_nan=True)


# --------------------------------------------------------------------------
# C++ CPU kernel vs reference
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ams_mode", ["mixed", "none", "all"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 3, 17])
def test_cpp_matches_reference(n, dtype, decoupled, ams_mode):
    seed = n * 1000 + DTYPES.index(dtype) * 10 + decoupled
    check_against_reference(
        torch.ops.modelbatch.adam_step, "cpu", n, dtype, decoupled, ams_mode, seed
    )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_cpp_large_tensors(dtype, decoupled):
    """Tensors large enough that the C++ kernel splits the work over threads,
    with splits inside a model's range, next to tiny and zero-size tensors."""
    shapes = [(12345,), (3,), (0,), (7, 1001), (1,)]
    check_against_reference(
        torch.ops.modelbatch.adam_step, "cpu", 3, dtype, decoupled, "mixed", 77, shapes
    )


def test_cpp_float64_hparams():
    """Hyper-parameters may come in any real dtype; they are read as float64."""
    state = make_state(5, torch.float32, seed=7, hp_dtype=torch.float64)
    expected, actual = clone_state(state), clone_state(state)
    run_steps(reference, expected, True)
    run_steps(torch.ops.modelbatch.adam_step, actual, True)
    assert_states_close(actual, expected, torch.float32)


# --------------------------------------------------------------------------
# Triton kernel vs reference (interpreter on CPU, or CUDA)
# --------------------------------------------------------------------------


@pytest.mark.parametrize("ams_mode", ["mixed", "none"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize(
    "n,dtype",
    [(3, d) for d in DTYPES] + [(1, torch.float32), (17, torch.float32)],
    ids=lambda x: str(x),
)
def test_triton_matches_reference(triton_device, n, dtype, decoupled, ams_mode):
    seed = 5000 + n * 100 + DTYPES.index(dtype) * 10 + decoupled
    check_against_reference(
        triton_adam.adam_step, triton_device, n, dtype, decoupled, ams_mode, seed
    )


@pytest.mark.parametrize("int64_index", [False, True], ids=["int32", "int64"])
def test_triton_launch_geometry(triton_device, monkeypatch, int64_index):
    """Blocks that span several models, several blocks per tensor, a zero-size
    tensor, the tensors split over two launches, and 64-bit offsets."""
    monkeypatch.setattr(triton_adam, "BLOCK", 16)
    monkeypatch.setattr(triton_adam, "MAX_TENSORS_PER_LAUNCH", 3)
    if int64_index:
        monkeypatch.setattr(triton_adam, "INT64_INDEX_FROM", 0)
    shapes = [(40,), (3,), (0,), (2, 9), (1,)]
    check_against_reference(
        triton_adam.adam_step, triton_device, 5, torch.float32, True, "mixed", 11, shapes
    )


def test_triton_one_launch_for_all_tensors(triton_device, monkeypatch):
    """All tensors of the list go in one launch, grid (cdiv(max_numel, BLOCK), T)."""
    kernel = triton_adam._adam_kernel
    grids = []

    def getitem(self, grid):
        grids.append(grid)
        return kernel[grid]

    # Same class name as the real kernel's, so the interpreter is still detected.
    counting = type(type(kernel).__name__, (), {"__getitem__": getitem})()
    monkeypatch.setattr(triton_adam, "_adam_kernel", counting)
    monkeypatch.setattr(triton_adam, "BLOCK", 64)
    state = clone_state(make_state(3, torch.float32, "mixed", seed=5), triton_device)
    run_steps(triton_adam.adam_step, state, True, num_steps=1)
    assert grids == [(triton.cdiv(3 * 35, 64), len(SHAPES))]


@triton.jit
def _round_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask)
    tl.store(out_ptr + offs, triton_adam._to_storage(x, tl.bfloat16), mask=mask)


def test_triton_bfloat16_rounding(triton_device):
    """The kernels' float32 -> bfloat16 rounding is torch's (nearest, ties to even)."""
    bits = torch.tensor(
        [
            0x3F808000,  # tie, even below: rounds down
            0x3F818000,  # tie, odd below: rounds up
            0x3F808001,  # just above a tie
            0x3F807FFF,  # just below a tie
            0x7F7FFFFF,  # largest float: rounds to inf
            0x00000001,  # smallest subnormal
            0x807FFFFF,  # negative subnormal
            0x80000000,  # -0.0
            0x7F800000,  # inf
            0xFF800000,  # -inf
            0x7FC00000,  # NaN
            0x7F800001,  # signalling NaN: must not become inf
        ],
        dtype=torch.int64,
    )
    special = bits.to(torch.int32).view(torch.float32)  # int64 -> int32 wraps as bits
    x = torch.cat([special, torch.randn(1000) * 10.0 ** torch.randint(-30, 30, (1000,))])
    out = torch.empty(x.shape, dtype=torch.bfloat16)
    x_d, out_d = x.to(triton_device), out.to(triton_device)
    _round_kernel[(triton.cdiv(x.numel(), 256),)](x_d, out_d, x.numel(), BLOCK=256)
    got, want = out_d.cpu(), x.to(torch.bfloat16)
    nan = want.isnan()
    assert torch.equal(got.isnan(), nan)
    assert torch.equal(got[~nan].view(torch.int16), want[~nan].view(torch.int16))


# --------------------------------------------------------------------------
# CUDA op vs reference
# --------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_op_matches_reference(dtype, decoupled):
    seed = 9000 + DTYPES.index(dtype) * 10 + decoupled
    check_against_reference(
        torch.ops.modelbatch.adam_step, "cuda", 17, dtype, decoupled, "mixed", seed
    )


# --------------------------------------------------------------------------
# torch.optim, model by model
# --------------------------------------------------------------------------


def _torch_optim_models(state, decoupled, num_steps, seed):
    """Run torch.optim on each model's slice, with that model's hyper-parameters."""
    n = state["steps"].shape[0]
    results = []
    for i in range(n):
        ps = [p[i].clone().cpu().requires_grad_() for p in state["params"]]
        hp = {k: state[k][i].item() for k in HP_NAMES}
        cls = torch.optim.AdamW if decoupled else torch.optim.Adam
        opt = cls(
            ps,
            lr=hp["lr"],
            betas=(hp["beta1"], hp["beta2"]),
            eps=hp["eps"],
            weight_decay=hp["weight_decay"],
            amsgrad=bool(hp["amsgrad"]),
            foreach=False,
        )
        for s in range(num_steps):
            for p, g in zip(ps, make_grads(state, seed + s)):
                p.grad = g[i].clone()
            opt.step()
        results.append((ps, [opt.state[p] for p in ps]))
    return results


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_matches_torch_optim(request, backend, decoupled):
    device = "cpu" if backend == "cpp" else request.getfixturevalue("triton_device")
    fn = torch.ops.modelbatch.adam_step if backend == "cpp" else triton_adam.adam_step
    num_steps = 5
    state = make_state(4, torch.float32, "mixed", seed=3, fresh=True, hp_dtype=torch.float64)
    state["amsgrad"][:] = torch.tensor([1.0, 0.0, 1.0, 0.0], dtype=torch.float64)
    state["weight_decay"][:] = torch.tensor([0.0, 0.05, 0.01, 0.0], dtype=torch.float64)
    expected = _torch_optim_models(state, decoupled, num_steps, seed=200)
    actual = clone_state(state, device)
    run_steps(fn, actual, decoupled, num_steps=num_steps, seed=200)
    assert torch.equal(
        actual["steps"].cpu(), torch.full((4,), float(num_steps), dtype=torch.float64)
    )
    for i, (ps, states) in enumerate(expected):
        for k, (p, st) in enumerate(zip(ps, states)):
            pairs = [
                (actual["params"][k][i], p),
                (actual["exp_avgs"][k][i], st["exp_avg"]),
                (actual["exp_avg_sqs"][k][i], st["exp_avg_sq"]),
            ]
            if state["amsgrad"][i]:
                pairs.append((actual["max_exp_avg_sqs"][k][i], st["max_exp_avg_sq"]))
            for a, e in pairs:
                assert_close_scaled(a, e, 1e-6)


# --------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=needs_cuda)], ids=["cpu", "cuda"]
)
@pytest.mark.parametrize("decoupled", [False, True], ids=["adam", "adamw"])
def test_opcheck(device, decoupled):
    """Schema (the declared mutations), fake kernel, autograd registration and
    AOT dispatch all pass for this mutating op that returns ()."""
    state = clone_state(make_state(3, torch.float32, "mixed", seed=21), device)
    grads = [x.to(device) for x in make_grads(state, 1)]
    results = torch.library.opcheck(
        torch.ops.modelbatch.adam_step.default,
        op_args(state, grads, decoupled),
        raise_exception=False,
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
        s["exp_avgs"][1] = torch.zeros(N_BAD, 14, device=s["exp_avgs"][1].device)

    def bad_hparam(s, g):
        s["lr"] = torch.full((N_BAD + 1,), 1e-3, device=s["lr"].device)

    def missing_max(s, g):
        s["max_exp_avg_sqs"] = []

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
        "bad_shape": (bad_shape, r"exp_avgs\[1\] has shape"),
        "bad_hparam": (bad_hparam, r"lr must be a \[N\] per-model tensor with N=3"),
        "missing_max": (missing_max, r"max_exp_avg_sqs"),
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
    fn = torch.ops.modelbatch.adam_step if backend == "cpp" else triton_adam.adam_step
    error = RuntimeError if backend == "cpp" else ValueError
    state = clone_state(make_state(N_BAD, torch.float32, "mixed", seed=31), device)
    grads = [x.to(device) for x in make_grads(state, 1)]
    mutate, pattern = BAD_CASES[case]
    mutate(state, grads)
    if case == "missing_max" and device == "cuda":
        # Checked only where it is free: amsgrad on the CPU (see kernels/adam.py).
        state["amsgrad"] = state["amsgrad"].cpu()
    before = _snapshot(state, grads)
    with pytest.raises(error, match=pattern):
        fn(*op_args(state, grads, False))
    after = _snapshot(state, grads)
    for b, a in zip(before, after):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_no_params_still_counts_steps(request, backend):
    device = "cpu" if backend == "cpp" else request.getfixturevalue("triton_device")
    fn = torch.ops.modelbatch.adam_step if backend == "cpp" else triton_adam.adam_step
    state = clone_state(make_state(2, torch.float32, "none", shapes=[]), device)
    before = state["steps"].clone()
    fn(*op_args(state, [], True))
    assert torch.equal(state["steps"], before + 1)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_amsgrad_max_propagates_nan_like_torch_maximum(backend, triton_device):
    """A NaN already in the amsgrad max stays NaN (torch.maximum semantics), and a
    NaN second moment enters it: non-finite state is never silently dropped."""
    device = "cpu" if backend == "cpp" else triton_device
    fn = torch.ops.modelbatch.adam_step if backend == "cpp" else triton_adam.adam_step
    n = 2
    p = torch.ones(n, 4, device=device)
    g = torch.ones(n, 4, device=device)
    g[1, 3] = float("nan")
    m, v = torch.zeros_like(p), torch.zeros_like(p)
    vmax = torch.zeros_like(p)
    vmax[0, 1] = float("nan")
    h = lambda x: torch.full((n,), x, dtype=torch.float64, device=device)
    args = (
        [p],
        [g],
        [m],
        [v],
        [vmax],
        h(0.0),
        h(1e-3),
        h(0.9),
        h(0.999),
        h(1e-8),
        h(0.0),
        h(1.0),
        False,
    )
    ref_args = tuple(
        [t.clone() for t in a]
        if isinstance(a, list)
        else a.clone()
        if isinstance(a, torch.Tensor)
        else a
        for a in args
    )
    fn(*args)
    reference(*ref_args)
    assert torch.isnan(vmax[0, 1]) and torch.isnan(vmax[1, 3])
    torch.testing.assert_close(vmax, ref_args[4][0], equal_nan=True)
    torch.testing.assert_close(p, ref_args[0][0], equal_nan=True)
