"""Tests of the per-model mixed-precision paths of the Triton kernels (on CUDA, or
on CPU under ``TRITON_INTERPRET=1``), against the pure-torch references.

* ``modelbatch.kernels.amp.amp_unscale_`` (``modelbatch::amp_unscale_``'s CUDA
  kernel): per-model found_inf and unscaled grads, bit for bit, for every dtype,
  odd shapes, inf / -inf / NaN planted in chosen models, write on and off,
  accumulation across calls, blocks spanning models and several launches.
* ``adam_step`` / ``sgd_step`` with ``inv_scale`` and ``found_inf``: state over
  a few steps as the references', grads written back bit for bit, skipped
  models left untouched bit for bit (a skipped model at step 0 included), and
  ``found_inf = 0, inv_scale = 1`` equal to calling without them.
* Bad input raises ValueError and changes nothing.
* The CUDA ops (and a CUDA graph replay) against the references (needs a GPU).
"""

from __future__ import annotations

import pytest
import test_adam
import test_sgd
import torch
import triton
from modelbatch.kernels import adam as triton_adam
from modelbatch.kernels import amp as triton_amp
from modelbatch.kernels import sgd as triton_sgd
from modelbatch.ops import adam as adam_ops
from modelbatch.ops import amp as amp_ops
from modelbatch.ops import sgd as sgd_ops

SHAPES = [(7, 5), (13,), (1,), (3, 3, 3)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
# Non-powers of two, so that unscaling rounds.
INV_SCALES = [1 / 3, 0.7, 3 / 65536, 1e-3, 2.5]
INF, NAN = float("inf"), float("nan")

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device (the op's CUDA kernel is Triton)"
)

_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def assert_bitwise(actual, expected, what=""):
    """Same bits, except that any NaN matches any NaN (payloads differ between
    torch's and the kernels' roundings, and between CPUs and GPUs)."""
    actual, expected = actual.detach().cpu(), expected.detach().cpu()
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan), f"{what}: NaNs differ"
    ints = _INT[actual.element_size()]
    a, e = actual[~nan].view(ints), expected[~nan].view(ints)
    assert torch.equal(a, e), f"{what}: bits differ at {(a != e).nonzero().flatten().tolist()}"


def _flat_model(t, i):
    """Model i's slice of a stacked tensor, flattened (a view)."""
    return t.view(t.shape[0], -1)[i]


# --------------------------------------------------------------------------
# amp_unscale_
# --------------------------------------------------------------------------

# Per N: the non-finite values to plant, (tensor, model, position in the model's
# slice, value), and the models whose found_inf is already 1 before the call.
PLANTS = {
    # The first element of the last tensor (the first lane of block 0).
    1: ([(3, 0, 0, NAN)], []),
    # Only the last element of model 1's slice; only the tiny (1,) tensor of model 2.
    3: ([(0, 1, -1, INF), (2, 2, 0, -INF)], []),
    # Model 2 is clean but already flagged: it stays 1. Model 0 stays 0.
    5: ([(1, 1, 0, NAN), (2, 3, 0, INF), (3, 4, -1, -INF)], [2]),
}


def make_amp_inputs(n, dtype, seed, shapes=SHAPES, device="cpu"):
    """Loss-scaled grads with the non-finite values of ``PLANTS[n]`` (when there
    is an entry), found_inf with its preset ones, and inv_scale."""
    g = torch.Generator().manual_seed(seed)
    grads = [(torch.randn((n, *s), generator=g) * 2048.0).to(dtype) for s in shapes]
    plants, preset = PLANTS.get(n, ([], []))
    for t, i, pos, value in plants:
        _flat_model(grads[t], i)[pos] = value
    found = torch.zeros(n, dtype=torch.float32)
    found[preset] = 1.0
    inv = torch.tensor((INV_SCALES * n)[:n], dtype=torch.float32)
    expected_found = found.clone()
    for _, i, _, _ in plants:
        expected_found[i] = 1.0
    to = lambda x: x.to(device)
    return [to(x) for x in grads], to(found), to(inv), expected_found


def check_amp_against_reference(fn, device, n, dtype, write, seed=0, shapes=SHAPES):
    grads, found, inv, expected_found = make_amp_inputs(n, dtype, seed, shapes, device)
    ref_grads = [x.cpu().clone() for x in grads]
    ref_found, ref_inv = found.cpu().clone(), inv.cpu().clone()
    before = [x.cpu().clone() for x in grads]
    fn(grads, found, inv, write)
    amp_ops.reference(ref_grads, ref_found, ref_inv, write)
    assert torch.equal(ref_found, expected_found)  # the oracle agrees with the plan
    assert torch.equal(found.cpu(), expected_found)
    assert torch.equal(inv.cpu(), ref_inv)
    for k, (a, e, b) in enumerate(zip(grads, ref_grads, before)):
        assert_bitwise(a, e, f"grads[{k}]")
        if not write:
            assert_bitwise(a, b, f"grads[{k}] (write=False)")
        else:
            # Unscaling did change finite values (not an accidental identity).
            changed = a.cpu() != b
            assert changed[b.isfinite() & (b != 0)].all(), k


@pytest.mark.parametrize("write", [True, False], ids=["write", "check"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 3, 5])
def test_amp_unscale_matches_reference(triton_device, n, dtype, write):
    seed = 100 * n + 10 * DTYPES.index(dtype) + write
    check_amp_against_reference(triton_amp.amp_unscale_, triton_device, n, dtype, write, seed)


def test_amp_unscale_all_finite(triton_device):
    """No non-finite value: found_inf stays 0 for every model."""
    grads, found, inv, _ = make_amp_inputs(4, torch.float16, 7, device=triton_device)
    ref = [x.cpu().clone() for x in grads]
    triton_amp.amp_unscale_(grads, found, inv)
    amp_ops.reference(ref, torch.zeros(4), inv.cpu())
    assert torch.equal(found.cpu(), torch.zeros(4))
    for a, e in zip(grads, ref):
        assert_bitwise(a, e)


@pytest.mark.parametrize("int64_index", [False, True], ids=["int32", "int64"])
def test_amp_unscale_launch_geometry_and_accumulation(triton_device, monkeypatch, int64_index):
    """Blocks that span several models, several blocks per tensor, zero-size
    tensors, the tensors split over launches, 64-bit offsets; and found_inf
    accumulating over two calls (as over two dtype buckets)."""
    monkeypatch.setattr(triton_adam, "BLOCK", 16)
    monkeypatch.setattr(triton_adam, "MAX_TENSORS_PER_LAUNCH", 2)
    if int64_index:
        monkeypatch.setattr(triton_adam, "INT64_INDEX_FROM", 0)
    n = 5
    shapes = [(40,), (3,), (0,), (2, 9), (1,)]
    g = torch.Generator().manual_seed(3)
    first = [(torch.randn((n, *s), generator=g) * 100).to(torch.bfloat16) for s in shapes]
    second = [(torch.randn((n, *s), generator=g) * 100) for s in [(6,), (0, 2)]]
    _flat_model(first[0], 1)[39] = INF  # model 1's last element, the last of block 4
    _flat_model(first[3], 3)[4] = NAN  # mid-slice, in a block shared with model 2
    _flat_model(second[0], 4)[5] = -INF  # the last element of the tensor
    found = torch.zeros(n)
    inv = torch.tensor(INV_SCALES, dtype=torch.float32)
    ref_first, ref_second = [x.clone() for x in first], [x.clone() for x in second]
    ref_found = found.clone()
    dev = lambda xs: [x.to(triton_device) for x in xs]
    first_d, second_d = dev(first), dev(second)
    found_d, inv_d = found.to(triton_device), inv.to(triton_device)

    triton_amp.amp_unscale_(first_d, found_d, inv_d)
    amp_ops.reference(ref_first, ref_found, inv)
    assert torch.equal(found_d.cpu(), torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0]))
    triton_amp.amp_unscale_(second_d, found_d, inv_d, False)
    amp_ops.reference(ref_second, ref_found, inv, False)
    assert torch.equal(found_d.cpu(), torch.tensor([0.0, 1.0, 0.0, 1.0, 1.0]))
    assert torch.equal(found_d.cpu(), ref_found)
    for a, e in zip(first_d + second_d, ref_first + ref_second):
        assert_bitwise(a, e)
    for a, e in zip(second_d, second):
        assert_bitwise(a, e)  # write=False


def test_amp_unscale_one_launch_for_all_tensors(triton_device, monkeypatch):
    kernel = triton_amp._amp_unscale_kernel
    grids = []

    def getitem(self, grid):
        grids.append(grid)
        return kernel[grid]

    # Same class name as the real kernel's, so the interpreter is still detected.
    counting = type(type(kernel).__name__, (), {"__getitem__": getitem})()
    monkeypatch.setattr(triton_amp, "_amp_unscale_kernel", counting)
    monkeypatch.setattr(triton_adam, "BLOCK", 64)
    grads, found, inv, expected = make_amp_inputs(3, torch.float32, 1, device=triton_device)
    triton_amp.amp_unscale_(grads, found, inv)
    assert grids == [(triton.cdiv(3 * 35, 64), len(SHAPES))]
    assert torch.equal(found.cpu(), expected)


def test_amp_unscale_empty_is_a_no_op(triton_device):
    found = torch.tensor([0.0, 1.0, 0.0], device=triton_device)
    inv = torch.full((3,), 0.5, device=triton_device)
    triton_amp.amp_unscale_([], found, inv)
    empty = [torch.zeros(3, 0, device=triton_device), torch.zeros(3, 2, 0, device=triton_device)]
    triton_amp.amp_unscale_(empty, found, inv)
    assert torch.equal(found.cpu(), torch.tensor([0.0, 1.0, 0.0]))


# --------------------------------------------------------------------------
# adam_step / sgd_step with inv_scale and found_inf
# --------------------------------------------------------------------------

N_OPT = 5
# Per step: the skipped models (found_inf = 1) and the inv_scale of every model.
# Model 1 is skipped on its step 0 (bias corrections divide by zero) and model 4
# twice in a row.
SKIPS = [[1, 4], [3, 4], []]
STEP_INV = [
    [1 / 3, 1e-3, 0.7, 1 / 24, 1 / 7],
    [0.7, 1 / 3, 1 / 7, 1e-3, 1 / 24],
    [1 / 24, 1 / 7, 1e-3, 0.7, 1 / 3],
]


class Optim:
    """What differs between Adam and SGD in these tests."""

    def __init__(self, name):
        self.name = name
        self.mod = test_adam if name == "adam" else test_sgd
        self.kernel = triton_adam.adam_step if name == "adam" else triton_sgd.sgd_step
        self.reference = adam_ops.reference if name == "adam" else sgd_ops.reference
        self.lists = test_adam.LISTS if name == "adam" else ("params", "momentum_buffers")

    def make_state(self, dtype, seed):
        """Random state for N_OPT models; model 1 at step 0, and models 3 and 4
        (skipped) with amsgrad / momentum on, so their max / momentum buffers are
        in use (and must still be left alone)."""
        state = self.mod.make_state(N_OPT, dtype, "mixed", seed=seed)
        state["steps"][1] = 0.0
        g = torch.Generator().manual_seed(seed)
        if self.name == "adam":
            state["amsgrad"][3:] = 1.0
            for v, mx in zip(state["exp_avg_sqs"], state["max_exp_avg_sqs"]):
                mx[3:] = v[3:] + (0.01 * torch.rand(v[3:].shape, generator=g)).to(dtype)
        else:
            state["momentum"][3:] = torch.tensor([0.9, 0.5])
            state["steps"][3:] = torch.tensor([1.0, 5.0], dtype=torch.float64)
            for buf in state["momentum_buffers"]:
                buf[3:] = torch.randn(buf[3:].shape, generator=g).to(dtype)
        return state

    def args(self, state, grads, decoupled):
        if self.name == "adam":
            return test_adam.op_args(state, grads, decoupled)
        return test_sgd.op_args(state, grads)

    def assert_states_close(self, actual, expected, dtype):
        self.mod.assert_states_close(actual, expected, dtype)


OPTIMS = {name: Optim(name) for name in ("adam", "sgd")}


def scaled_grads(state, step, inv, skipped, seed):
    """Loss-scaled grads (``g / inv_scale``), with inf / NaN in the skipped models."""
    grads = []
    for g in test_adam.make_grads(state, seed + step):
        shape = (-1,) + (1,) * (g.dim() - 1)
        grads.append((g.double() / inv.double().view(shape)).to(g.dtype))
    for j, i in enumerate(skipped):
        _flat_model(grads[j % len(grads)], i)[-1] = INF if j % 2 else NAN
    return grads


def run_scaled_steps(opt, fn, state, dtype, decoupled, mode, seed, check_skipped):
    """Three steps with the ``SKIPS`` / ``STEP_INV`` plan; ``mode``: "both",
    "unscale" (inv_scale only, no skipping) or "skip" (found_inf only, grads not
    scaled). Returns the grads of every step as the kernel left them."""
    device = state["steps"].device
    out = []
    for s, (skipped, inv_values) in enumerate(zip(SKIPS, STEP_INV)):
        skipped = skipped if mode != "unscale" else []
        inv = torch.tensor(inv_values, dtype=torch.float32)
        if mode == "skip":
            inv = torch.ones(N_OPT)
        grads = [x.to(device) for x in scaled_grads(state, s, inv, skipped, seed)]
        found = torch.zeros(N_OPT, dtype=torch.float32)
        found[skipped] = 1.0
        inv_arg = inv.to(device) if mode != "skip" else None
        found_arg = found.to(device) if mode != "unscale" else None
        before = test_adam.clone_state(state)
        fn(*opt.args(state, grads, decoupled), inv_arg, found_arg)
        if check_skipped:
            keep = torch.ones(N_OPT, dtype=torch.bool)
            keep[skipped] = False
            assert torch.equal(state["steps"].cpu(), before["steps"] + keep.double())
            for name in opt.lists:
                for k, (a, b) in enumerate(zip(state[name], before[name])):
                    for i in skipped:
                        assert_bitwise(a[i], b[i], f"step {s}: {name}[{k}] of skipped model {i}")
        out.append([g.cpu() for g in grads])
    return out


# (optimizer, dtype, decoupled, mode): every dtype with both arguments, and each
# argument alone for two dtypes.
OPT_CASES = (
    [("adam", d, dec, "both") for d in DTYPES for dec in (False, True)]
    + [("sgd", d, False, "both") for d in DTYPES]
    + [
        (name, d, False, mode)
        for name in ("adam", "sgd")
        for d in (torch.float32, torch.bfloat16)
        for mode in ("unscale", "skip")
    ]
)


@pytest.mark.parametrize(
    "name,dtype,decoupled,mode",
    OPT_CASES,
    ids=[f"{nm}{'w' if dec else ''}-{d}-{mode}" for nm, d, dec, mode in OPT_CASES],
)
def test_optimizer_step_matches_reference(triton_device, name, dtype, decoupled, mode):
    opt = OPTIMS[name]
    seed = 300 + 10 * DTYPES.index(dtype) + decoupled
    state = opt.make_state(dtype, seed)
    expected = test_adam.clone_state(state)
    actual = test_adam.clone_state(state, triton_device)
    ref_grads = run_scaled_steps(opt, opt.reference, expected, dtype, decoupled, mode, seed, False)
    got_grads = run_scaled_steps(opt, opt.kernel, actual, dtype, decoupled, mode, seed, True)
    opt.assert_states_close(actual, expected, dtype)
    for s, (got, ref) in enumerate(zip(got_grads, ref_grads)):
        for k, (a, e) in enumerate(zip(got, ref)):
            assert_bitwise(a, e, f"step {s}: written-back grads[{k}]")
    # Every kept model did move; nothing non-finite leaked from the skipped ones.
    for p, p0 in zip(actual["params"], state["params"]):
        assert p.isfinite().all()
        assert (p.cpu() != p0).any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_neutral_scaler_args_change_nothing(triton_device, name, dtype):
    """found_inf all 0 and inv_scale all 1: the same bits as without them."""
    opt = OPTIMS[name]
    state = test_adam.clone_state(opt.make_state(dtype, 41), triton_device)
    plain, scaled = test_adam.clone_state(state), test_adam.clone_state(state)
    ones = torch.ones(N_OPT, device=triton_device)
    zeros = torch.zeros(N_OPT, device=triton_device)
    for s in range(2):
        grads = [x.to(triton_device) for x in test_adam.make_grads(state, 50 + s)]
        grads2 = [x.clone() for x in grads]
        opt.kernel(*opt.args(plain, grads, True))
        opt.kernel(*opt.args(scaled, grads2, True), ones, zeros)
        for a, b in zip(grads, grads2):
            assert_bitwise(b, a)
    for key in plain:
        xs = plain[key] if isinstance(plain[key], list) else [plain[key]]
        ys = scaled[key] if isinstance(scaled[key], list) else [scaled[key]]
        for a, b in zip(xs, ys):
            assert_bitwise(b, a, key)


@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_no_params_counts_only_kept_steps(triton_device, name):
    """Without params only the step counters of the kept models advance."""
    opt = OPTIMS[name]
    state = opt.mod.make_state(3, torch.float32, "none", shapes=[])
    state = test_adam.clone_state(state, triton_device)
    before = state["steps"].clone()
    found = torch.tensor([1.0, 0.0, 1.0], device=triton_device)
    opt.kernel(*opt.args(state, [], False), None, found)
    assert torch.equal(state["steps"].cpu(), before.cpu() + torch.tensor([0.0, 1.0, 0.0]).double())


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

N_BAD = 3


def _bad_vectors(device):
    """(inv_scale, found_inf, pattern) cases shared by the three kernels."""
    ok = lambda: torch.zeros(N_BAD, device=device)
    return {
        "found_inf_shape": (
            ok(),
            torch.zeros(N_BAD + 1, device=device),
            r"found_inf must be a float32 \[N\] per-model tensor with N=3, got \(4,\)",
        ),
        "found_inf_dtype": (
            ok(),
            torch.zeros(N_BAD, dtype=torch.float64, device=device),
            r"found_inf must be float32, got torch.float64",
        ),
        "found_inf_2d": (
            ok(),
            torch.zeros(N_BAD, 1, device=device),
            r"found_inf must be a float32 \[N\] per-model tensor",
        ),
        "found_inf_strided": (
            ok(),
            torch.zeros(2 * N_BAD, device=device)[::2],
            r"found_inf must be contiguous",
        ),
        "inv_scale_shape": (
            torch.ones(N_BAD - 1, device=device),
            ok(),
            r"inv_scale must be a float32 \[N\] per-model tensor with N=3, got \(2,\)",
        ),
        "inv_scale_dtype": (
            torch.ones(N_BAD, dtype=torch.bfloat16, device=device),
            ok(),
            r"inv_scale must be float32, got torch.bfloat16",
        ),
        "inv_scale_device": (
            torch.ones(N_BAD, device="meta"),
            ok(),
            r"inv_scale is on meta, expected",
        ),
    }


BAD_VECTORS = list(_bad_vectors("cpu"))


def _snapshot(*trees):
    out = []
    for tree in trees:
        for v in tree.values() if isinstance(tree, dict) else [tree]:
            for x in v if isinstance(v, list) else [v]:
                if isinstance(x, torch.Tensor) and x.device.type != "meta":
                    out.append(x.clone())
    return out


def _assert_unchanged(before, after):
    assert len(before) == len(after)
    for b, a in zip(before, after):
        assert_bitwise(a, b)


@pytest.mark.parametrize("case", [*BAD_VECTORS, "mixed_dtypes", "not_stacked", "strided"])
def test_amp_unscale_bad_input_raises_and_changes_nothing(triton_device, case):
    grads, found, inv, _ = make_amp_inputs(N_BAD, torch.float32, 5, device=triton_device)
    if case in BAD_VECTORS:
        inv, found, pattern = _bad_vectors(triton_device)[case]
    elif case == "mixed_dtypes":
        grads[2] = grads[2].half()
        pattern = r"all grads of one call share a dtype; grads\[2\] is torch.float16"
    elif case == "not_stacked":
        grads[1] = torch.zeros(N_BAD + 1, 2, device=triton_device)
        pattern = r"grads\[1\] has shape \(4, 2\), expected a stacked tensor \[N=3, \.\.\.\]"
    else:
        grads[3] = grads[3].transpose(1, 2)
        pattern = r"grads\[3\] must be contiguous"
    before = _snapshot({"g": grads, "f": found, "i": inv})
    with pytest.raises(ValueError, match=pattern):
        triton_amp.amp_unscale_(grads, found, inv)
    _assert_unchanged(before, _snapshot({"g": grads, "f": found, "i": inv}))


@pytest.mark.parametrize("case", [*BAD_VECTORS, "mixed_dtypes"])
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_optimizer_bad_input_raises_and_changes_nothing(triton_device, name, case):
    opt = OPTIMS[name]
    state = opt.mod.make_state(N_BAD, torch.float32, "mixed", seed=31)
    state = test_adam.clone_state(state, triton_device)
    grads = [x.to(triton_device) for x in test_adam.make_grads(state, 1)]
    inv = torch.full((N_BAD,), 0.5, device=triton_device)
    found = torch.zeros(N_BAD, device=triton_device)
    if case in BAD_VECTORS:
        inv, found, pattern = _bad_vectors(triton_device)[case]
    else:
        grads[1] = grads[1].double()
        pattern = r"grads\[1\] has dtype torch.float64, expected torch.float32"
    before = _snapshot(state, grads, inv, found)
    with pytest.raises(ValueError, match=pattern):
        opt.kernel(*opt.args(state, grads, False), inv, found)
    _assert_unchanged(before, _snapshot(state, grads, inv, found))


# --------------------------------------------------------------------------
# CUDA ops vs references
# --------------------------------------------------------------------------


@needs_cuda
@pytest.mark.parametrize("write", [True, False], ids=["write", "check"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_cuda_amp_unscale_op_matches_reference(dtype, write):
    check_amp_against_reference(
        torch.ops.modelbatch.amp_unscale_, "cuda", 5, dtype, write, seed=DTYPES.index(dtype)
    )


@needs_cuda
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", ["adam", "sgd"])
def test_cuda_optimizer_op_matches_reference(name, dtype):
    opt = OPTIMS[name]
    op = torch.ops.modelbatch.adam_step if name == "adam" else torch.ops.modelbatch.sgd_step
    state = opt.make_state(dtype, 900 + DTYPES.index(dtype))
    expected = test_adam.clone_state(state)
    actual = test_adam.clone_state(state, "cuda")
    ref_grads = run_scaled_steps(opt, opt.reference, expected, dtype, True, "both", 9, False)
    got_grads = run_scaled_steps(opt, op, actual, dtype, True, "both", 9, True)
    opt.assert_states_close(actual, expected, dtype)
    for got, ref in zip(got_grads, ref_grads):
        for a, e in zip(got, ref):
            assert_bitwise(a, e)


@needs_cuda
def test_cuda_graph_replay():
    """amp_unscale_ (check only) then adam_step unscaling and skipping, captured
    in a CUDA graph: nothing synchronises, and replays match the reference."""
    opt = OPTIMS["adam"]
    state = test_adam.clone_state(opt.make_state(torch.float32, 77), "cuda")
    grads = [torch.zeros_like(p) for p in state["params"]]
    found = torch.zeros(N_OPT, device="cuda")
    inv = torch.zeros(N_OPT, device="cuda")

    def step():
        found.zero_()
        torch.ops.modelbatch.amp_unscale_(grads, found, inv, False)
        torch.ops.modelbatch.adam_step(*opt.args(state, grads, True), inv, found)

    # Warm up on the capture stream, with the captured tensors: compiles the
    # kernels and builds their pointer tables. Every model skipped, nothing moves.
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.ops.modelbatch.amp_unscale_(grads, found, inv, False)
        skip_all = torch.ones(N_OPT, device="cuda")
        torch.ops.modelbatch.adam_step(*opt.args(state, grads, True), inv, skip_all)
    side.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=side):
        step()
    torch.cuda.synchronize()

    expected = test_adam.clone_state(state, "cpu")
    for s, (skipped, inv_values) in enumerate(zip(SKIPS, STEP_INV)):
        inv_cpu = torch.tensor(inv_values, dtype=torch.float32)
        new = scaled_grads(expected, s, inv_cpu, skipped, 5)
        for g, x in zip(grads, new):
            g.copy_(x)
        inv.copy_(inv_cpu)
        graph.replay()
        ref_found = torch.zeros(N_OPT)
        amp_ops.reference(new, ref_found, inv_cpu, False)
        opt.reference(*opt.args(expected, new, True), inv_cpu, ref_found)
        torch.cuda.synchronize()
        assert torch.equal(found.cpu(), ref_found)
        for a, e in zip(grads, new):
            assert_bitwise(a, e)
    opt.assert_states_close(state, expected, torch.float32)
