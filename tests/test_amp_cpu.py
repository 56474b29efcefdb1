"""Tests of the mixed-precision (per-model loss scaling) support of the C++ CPU
kernels.

* ``modelbatch::amp_unscale_`` (``csrc/amp.cpp``) against
  :func:`modelbatch.ops.amp.reference`, bit for bit: every dtype, odd shapes, a
  tensor large enough to be split over threads inside one model, inf / -inf /
  NaN planted in chosen models (last element of a model's slice, a one-element
  tensor), ``write=True`` and ``write=False``, ``found_inf`` already set,
  non-power-of-two ``inv_scale``, accumulation over calls.
* ``adam_step`` / ``sgd_step`` with ``inv_scale`` and ``found_inf`` against
  their references over several steps: grads written back bit for bit, skipped
  models bit-identical (parameters, moments, max buffers, momentum buffers,
  step counts); ``found_inf = 0`` with ``inv_scale = 1`` is bit-identical to the
  plain call; the fused unscale equals ``amp_unscale_`` then a step.
* ``torch.library.opcheck`` of the three ops with the new arguments.
* Bad input raises a clear error and changes nothing.
"""

from __future__ import annotations

import pytest
import test_adam as ta
import test_sgd as ts
import torch
from modelbatch.ops import adam as adam_ops
from modelbatch.ops import amp as amp_ops
from modelbatch.ops import sgd as sgd_ops

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
INT_VIEW = {
    torch.float32: torch.int32,
    torch.float64: torch.int64,
    torch.float16: torch.int16,
    torch.bfloat16: torch.int16,
}
# Per-model elements: 35, 13, 1, 27 and 17000 (> 16384, the C++ kernels' grain,
# so one model's range is split over threads).
SHAPES = [(7, 5), (13,), (1,), (3, 3, 3), (17000,)]
TINY, BIG = 2, 4  # indices into SHAPES
# Powers of two and not (1/1000, 0.37 and 1/3 round in float32).
INV_CHOICES = [2.0**-10, 1e-3, 0.37, 1.0, 1.0 / 3.0, 2.0**-16]
NON_FINITE = [float("inf"), float("-inf"), float("nan")]

amp_unscale_ = torch.ops.modelbatch.amp_unscale_


def bits(t):
    return t.view(INT_VIEW[t.dtype])


def assert_bitwise(actual, expected):
    """Bit for bit, except that any NaN matches any NaN (payloads may differ)."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    nan = expected.isnan()
    assert torch.equal(actual.isnan(), nan)
    assert torch.equal(bits(actual)[~nan], bits(expected)[~nan])


def assert_same_bits(actual, expected):
    """Strictly bit for bit, NaN payloads included: the tensor was not touched."""
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert torch.equal(bits(actual), bits(expected))


def rand_inv_scale(n, gen, choices=INV_CHOICES):
    idx = torch.randint(len(choices), (n,), generator=gen)
    return torch.tensor(choices, dtype=torch.float32)[idx]


def test_amp_unscale_cpu_kernel_is_cpp():
    """The CPU kernel is csrc/amp.cpp's (the reference is registered only without _C)."""
    assert torch._C._dispatch_has_kernel_for_dispatch_key("modelbatch::amp_unscale_", "CPU")
    schema = torch.ops.modelbatch.amp_unscale_.default._schema
    assert [a.name for a in schema.arguments] == ["grads", "found_inf", "inv_scale", "write"]


# --------------------------------------------------------------------------
# amp_unscale_ vs reference
# --------------------------------------------------------------------------


def make_amp_grads(n, dtype, seed, shapes=SHAPES):
    g = torch.Generator().manual_seed(seed)
    # Loss-scaled magnitudes that still fit float16.
    return [(100.0 * torch.randn((n, *s), generator=g)).to(dtype) for s in shapes]


def plant(grads, n, seed):
    """Put inf / -inf / NaN in chosen models; returns the models now non-finite."""
    g = torch.Generator().manual_seed(seed)
    bad = set()

    def put(t, model, pos, value):
        grads[t][model].view(-1)[pos] = value
        bad.add(model)

    put(BIG, 0, -1, float("nan"))  # only the last element of model 0's big slice
    if n >= 2:
        put(TINY, n - 1, 0, float("inf"))  # only the one-element tensor of the last model
    if n >= 3:
        # Model 1 both early and late: with n = 3 on two threads its big slice
        # is split between the threads, so both of them store its flag.
        put(0, 1, 17, float("-inf"))
        put(BIG, 1, 16000, float("nan"))
    for model in torch.randperm(n, generator=g)[: n // 4].tolist():
        t = int(torch.randint(len(grads), (1,), generator=g))
        pos = int(torch.randint(grads[t][model].numel(), (1,), generator=g))
        put(t, model, pos, NON_FINITE[model % 3])
    return bad


def preset_found_inf(n):
    """found_inf from an earlier call: 1 for some models (it must stay 1)."""
    found = torch.zeros(n, dtype=torch.float32)
    found[3::4] = 1.0
    return found


@pytest.mark.parametrize("write", [True, False], ids=["write", "check_only"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 3, 37])
def test_unscale_matches_reference(n, dtype, write):
    seed = n * 100 + DTYPES.index(dtype) * 10 + write
    grads = make_amp_grads(n, dtype, seed)
    bad = plant(grads, n, seed)
    found = preset_found_inf(n)
    preset = set(found.nonzero().flatten().tolist())
    inv = rand_inv_scale(n, torch.Generator().manual_seed(seed))
    original = [g.clone() for g in grads]
    exp_grads, exp_found = [g.clone() for g in grads], found.clone()
    amp_ops.reference(exp_grads, exp_found, inv, write)
    inv_before = inv.clone()

    amp_unscale_(grads, found, inv, write)

    assert torch.equal(found, exp_found)
    want = torch.zeros(n, dtype=torch.float32)
    want[sorted(bad | preset)] = 1.0
    assert torch.equal(found, want)
    for a, e, o in zip(grads, exp_grads, original):
        assert_bitwise(a, e)
        if not write:
            assert_same_bits(a, o)
    assert_same_bits(inv, inv_before)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_unscale_clean_grads_keep_found_inf(dtype):
    """No non-finite value: found_inf stays as it was, 0 or not (never reset)."""
    n = 6
    grads = make_amp_grads(n, dtype, 5)
    found = torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 1.0])
    inv = rand_inv_scale(n, torch.Generator().manual_seed(5))
    exp_grads, exp_found = [g.clone() for g in grads], found.clone()
    amp_ops.reference(exp_grads, exp_found, inv)
    amp_unscale_(grads, found, inv)
    assert torch.equal(found, torch.tensor([0.0, 1.0, 0.0, 2.0, 0.0, 1.0]))
    assert torch.equal(found, exp_found)
    for a, e in zip(grads, exp_grads):
        assert_same_bits(a, e)


def test_unscale_accumulates_over_calls():
    """One call per dtype group: found_inf collects the flags of all of them."""
    n = 5
    inv = rand_inv_scale(n, torch.Generator().manual_seed(1))
    found, exp_found = torch.zeros(n), torch.zeros(n)
    groups = []
    for k, dtype in enumerate([torch.float32, torch.float16, torch.bfloat16]):
        grads = make_amp_grads(n, dtype, 10 + k, shapes=SHAPES[:4])
        grads[k][k + 1].view(-1)[-1] = NON_FINITE[k]  # model k + 1 in group k
        groups.append((grads, [g.clone() for g in grads]))
    for grads, exp_grads in groups:
        amp_unscale_(grads, found, inv)
        amp_ops.reference(exp_grads, exp_found, inv)
        for a, e in zip(grads, exp_grads):
            assert_bitwise(a, e)
    assert torch.equal(found, torch.tensor([0.0, 1.0, 1.0, 1.0, 0.0]))
    assert torch.equal(found, exp_found)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_unscale_checks_the_scaled_value(dtype):
    """The check is on the grads as given: a finite value that overflows only
    once unscaled (inv_scale > 1) does not set found_inf, as in torch."""
    big = torch.finfo(dtype).max
    grads = [torch.full((2, 4), big, dtype=dtype)]
    found = torch.zeros(2)
    inv = torch.tensor([4.0, 0.5])
    exp_grads, exp_found = [g.clone() for g in grads], found.clone()
    amp_ops.reference(exp_grads, exp_found, inv)
    amp_unscale_(grads, found, inv)
    assert torch.equal(found, torch.zeros(2)) and torch.equal(exp_found, found)
    assert grads[0][0].isinf().all()
    assert_bitwise(grads[0], exp_grads[0])


def test_unscale_empty_and_zero_size():
    found, inv = torch.tensor([0.0, 1.0, 0.0]), torch.full((3,), 0.5)
    amp_unscale_([], found, inv)
    assert torch.equal(found, torch.tensor([0.0, 1.0, 0.0]))
    grads = [torch.zeros(3, 0), torch.tensor([[2.0], [4.0], [float("inf")]])]
    amp_unscale_(grads, found, inv)
    assert torch.equal(found, torch.tensor([0.0, 1.0, 1.0]))
    assert torch.equal(grads[1][:2], torch.tensor([[1.0], [2.0]]))


# --------------------------------------------------------------------------
# adam_step / sgd_step with inv_scale and found_inf
# --------------------------------------------------------------------------

OPTS = {
    "adam": (ta, torch.ops.modelbatch.adam_step, adam_ops.reference),
    "adamw": (ta, torch.ops.modelbatch.adam_step, adam_ops.reference),
    "sgd": (ts, torch.ops.modelbatch.sgd_step, sgd_ops.reference),
}
STATE_LISTS = {"adam": ta.LISTS, "adamw": ta.LISTS, "sgd": ("params", "momentum_buffers")}


def step_args(opt, state, grads):
    if opt == "sgd":
        return ts.op_args(state, grads)
    return ta.op_args(state, grads, opt == "adamw")


def amp_step_inputs(n, step, seed, mode):
    """inv_scale and found_inf of one step. Step 0 skips model 0, step 1 only
    random models, step 2 the last model and random ones."""
    g = torch.Generator().manual_seed(seed * 10 + step)
    inv = rand_inv_scale(n, g, INV_CHOICES[:-1])  # scaled grads stay finite in float16
    found = (torch.rand(n, generator=g) < 0.3).float()
    if step == 0:
        found[0] = 1.0
    if step == 2:
        found[-1] = 1.0
    return (None if mode == "found_only" else inv), (None if mode == "inv_only" else found)


def scaled_grads(mod, state, seed, inv, found):
    """The step's grads times 1 / inv_scale (as a loss-scaled backward makes
    them), with inf / NaN in the models that found_inf skips."""
    grads = mod.make_grads(state, seed)
    if inv is not None:
        grads = [
            (g.double() / inv.double().view((-1,) + (1,) * (g.dim() - 1))).to(g.dtype)
            for g in grads
        ]
    if found is not None:
        for i in found.nonzero().flatten().tolist():
            grads[0][i].view(-1)[0] = float("inf")
            grads[-1][i].view(-1)[-1] = float("nan")
    return grads


def snapshot(state):
    return {
        k: [x.clone() for x in v] if isinstance(v, list) else v.clone() for k, v in state.items()
    }


def check_amp_steps(opt, n, dtype, mode, seed, shapes=ta.SHAPES, num_steps=3):
    mod, op, ref = OPTS[opt]
    state = mod.make_state(n, dtype, "mixed", seed=seed, shapes=shapes)
    expected, actual = mod.clone_state(state), mod.clone_state(state)
    for step in range(num_steps):
        inv, found = amp_step_inputs(n, step, seed, mode)
        grads = scaled_grads(mod, state, seed + step, inv, found)
        exp_grads, given = [g.clone() for g in grads], [g.clone() for g in grads]
        before = snapshot(actual)
        ref(*step_args(opt, expected, exp_grads), inv, found)
        op(*step_args(opt, actual, grads), inv, found)

        for a, e, g in zip(grads, exp_grads, given):
            assert_bitwise(a, e)  # unscaled in place as the reference does
            if inv is None:
                assert_same_bits(a, g)
        skipped = found != 0 if found is not None else torch.zeros(n, dtype=torch.bool)
        assert torch.equal(actual["steps"], before["steps"] + (~skipped).double())
        for i in skipped.nonzero().flatten().tolist():
            for name in STATE_LISTS[opt]:
                for a, b in zip(actual[name], before[name]):
                    assert_same_bits(a[i], b[i])
        mod.assert_states_close(actual, expected, dtype)
    for p in actual["params"]:
        assert not p.isnan().any()  # no skipped model's inf / NaN leaked


@pytest.mark.parametrize("mode", ["both", "inv_only", "found_only"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 5])
@pytest.mark.parametrize("opt", list(OPTS))
def test_step_matches_reference(opt, n, dtype, mode):
    seed = 300 + n * 100 + DTYPES.index(dtype) * 10 + len(mode) + len(opt)
    check_amp_steps(opt, n, dtype, mode, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("opt", list(OPTS))
def test_step_large_tensors(opt, dtype):
    """Segments split inside a model's range, next to tiny and zero-size tensors."""
    shapes = [(17000,), (3,), (0,), (1,)]
    check_amp_steps(opt, 3, dtype, "both", 41 + len(opt), shapes=shapes, num_steps=2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("opt", list(OPTS))
def test_step_neutral_amp_is_plain_step(opt, dtype):
    """found_inf = 0 and inv_scale = 1 give exactly the plain step, bit for bit."""
    mod, op, _ = OPTS[opt]
    n = 4
    plain = mod.make_state(n, dtype, "mixed", seed=61)
    amp = mod.clone_state(plain)
    ones, zeros = torch.ones(n), torch.zeros(n)
    for step in range(3):
        g_plain = mod.make_grads(plain, 70 + step)
        g_amp = [g.clone() for g in g_plain]
        op(*step_args(opt, plain, g_plain))
        op(*step_args(opt, amp, g_amp), ones, zeros)
        for a, b in zip(g_amp, g_plain):
            assert_same_bits(a, b)
    assert torch.equal(amp["steps"], plain["steps"])
    for name in STATE_LISTS[opt]:
        for a, b in zip(amp[name], plain[name]):
            assert_same_bits(a, b)
    assert torch.equal(ones, torch.ones(n)) and torch.equal(zeros, torch.zeros(n))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("opt", list(OPTS))
def test_fused_unscale_equals_separate_unscale(opt, dtype):
    """amp_unscale_(write=False) then a step with inv_scale and found_inf, and
    amp_unscale_(write=True) then a step with found_inf only: same bits."""
    mod, op, _ = OPTS[opt]
    n = 5
    fused = mod.make_state(n, dtype, "mixed", seed=81)
    separate = mod.clone_state(fused)
    for step in range(3):
        inv, found = amp_step_inputs(n, step, 81, "both")
        grads = scaled_grads(mod, fused, 90 + step, inv, found)
        g_sep = [g.clone() for g in grads]
        f_fused, f_sep = torch.zeros(n), torch.zeros(n)
        amp_unscale_(grads, f_fused, inv, False)
        op(*step_args(opt, fused, grads), inv, f_fused)
        amp_unscale_(g_sep, f_sep, inv, True)
        op(*step_args(opt, separate, g_sep), None, f_sep)
        assert torch.equal(f_fused, found) and torch.equal(f_sep, found)
        for a, b in zip(grads, g_sep):
            assert_bitwise(a, b)
    assert torch.equal(fused["steps"], separate["steps"])
    for name in STATE_LISTS[opt]:
        for a, b in zip(fused[name], separate[name]):
            assert_same_bits(a, b)


# --------------------------------------------------------------------------
# opcheck
# --------------------------------------------------------------------------


def assert_opcheck(op, args):
    results = torch.library.opcheck(op, args, raise_exception=False)
    assert results == dict.fromkeys(results, "SUCCESS"), results
    assert set(results) >= {"test_schema", "test_faketensor", "test_aot_dispatch_dynamic"}


@pytest.mark.parametrize("write", [True, False], ids=["write", "check_only"])
def test_opcheck_amp_unscale(write):
    grads = make_amp_grads(3, torch.float32, 7, shapes=SHAPES[:4])
    grads[1][2, 4] = float("inf")
    found, inv = torch.zeros(3), torch.tensor([0.5, 1e-3, 0.25])
    assert_opcheck(torch.ops.modelbatch.amp_unscale_.default, (grads, found, inv, write))


@pytest.mark.parametrize("opt", list(OPTS))
def test_opcheck_step_with_amp(opt):
    mod, op, _ = OPTS[opt]
    state = mod.make_state(3, torch.float32, "mixed", seed=21)
    inv, found = torch.tensor([0.5, 1e-3, 0.25]), torch.tensor([0.0, 1.0, 0.0])
    grads = scaled_grads(mod, state, 1, inv, found)
    assert_opcheck(op.default, (*step_args(opt, state, grads), inv, found))


# --------------------------------------------------------------------------
# Bad input
# --------------------------------------------------------------------------

N_BAD = 3


def _amp_bad_cases():
    def found_shape(g, f, s):
        return g, torch.zeros(N_BAD + 1), s

    def found_2d(g, f, s):
        return g, f.view(N_BAD, 1), s

    def found_f64(g, f, s):
        return g, f.double(), s

    def found_strided(g, f, s):
        return g, torch.zeros(2 * N_BAD)[::2], s

    def inv_shape(g, f, s):
        return g, f, torch.ones(N_BAD - 1)

    def inv_f64(g, f, s):
        return g, f, s.double()

    def mixed_dtypes(g, f, s):
        return [g[0], g[1].double(), *g[2:]], f, s

    def not_stacked(g, f, s):
        return [*g[:2], torch.zeros(N_BAD + 1, 2), *g[3:]], f, s

    def non_contiguous(g, f, s):
        return [g[0].transpose(1, 2).contiguous().transpose(1, 2), *g[1:]], f, s

    def int_grads(g, f, s):
        return [torch.zeros(N_BAD, 4, dtype=torch.int32)], f, s

    return {
        "found_shape": (found_shape, r"found_inf and inv_scale must both be \[N\]"),
        "found_2d": (found_2d, r"found_inf must be a 1-D \[N\] per-model tensor"),
        "found_f64": (found_f64, r"found_inf must be a float32 tensor, got Double"),
        "found_strided": (found_strided, r"found_inf must be contiguous"),
        "inv_shape": (inv_shape, r"found_inf and inv_scale must both be \[N\]"),
        "inv_f64": (inv_f64, r"inv_scale must be a float32 tensor, got Double"),
        "mixed_dtypes": (mixed_dtypes, r"all grads of one call share a dtype; grads\[1\] is"),
        "not_stacked": (not_stacked, r"grads\[2\] has shape .* expected a stacked tensor \[N=3"),
        "non_contiguous": (non_contiguous, r"grads\[0\] must be contiguous"),
        "int_grads": (int_grads, r"grads must be float32, float64, float16 or bfloat16"),
    }


AMP_BAD = _amp_bad_cases()


@pytest.mark.parametrize("case", list(AMP_BAD))
def test_amp_bad_input_raises_and_changes_nothing(case):
    grads = make_amp_grads(N_BAD, torch.float32, 3, shapes=SHAPES[:4])
    grads[0][0, 0, 0] = float("inf")  # a kernel that ran would set found_inf[0]
    found, inv = torch.tensor([0.0, 0.0, 1.0]), torch.tensor([0.5, 1e-3, 0.25])
    mutate, pattern = AMP_BAD[case]
    grads, found, inv = mutate(grads, found, inv)
    before = [x.clone() for x in (*grads, found, inv)]
    with pytest.raises(RuntimeError, match=pattern):
        amp_unscale_(grads, found, inv)
    for b, a in zip(before, (*grads, found, inv)):
        assert torch.equal(*(bits(x) if x.is_floating_point() else x for x in (a, b)))


STEP_BAD = {
    "inv_shape": (
        lambda inv, found: (torch.ones(N_BAD + 1), found),
        r"inv_scale must be a \[N\] per-model tensor with N=3, got shape \[4\]",
    ),
    "found_shape": (
        lambda inv, found: (inv, torch.zeros(N_BAD, 1)),
        r"found_inf must be a \[N\] per-model tensor with N=3, got shape \[3, 1\]",
    ),
    "inv_f64": (
        lambda inv, found: (inv.double(), found),
        r"inv_scale must be a float32 tensor, got Double",
    ),
    "found_f64": (
        lambda inv, found: (inv, found.double()),
        r"found_inf must be a float32 tensor, got Double",
    ),
}


@pytest.mark.parametrize("case", list(STEP_BAD))
@pytest.mark.parametrize("opt", ["adam", "sgd"])
def test_step_bad_amp_input_raises_and_changes_nothing(opt, case):
    mod, op, _ = OPTS[opt]
    state = mod.make_state(N_BAD, torch.float32, "mixed", seed=31)
    inv, found = STEP_BAD[case][0](torch.full((N_BAD,), 0.5), torch.tensor([0.0, 1.0, 0.0]))
    grads = mod.make_grads(state, 1)
    before = snapshot(state)
    g_before = [g.clone() for g in grads]
    with pytest.raises(RuntimeError, match=STEP_BAD[case][1]):
        op(*step_args(opt, state, grads), inv, found)
    assert torch.equal(state["steps"], before["steps"])
    for name in STATE_LISTS[opt]:
        for a, b in zip(state[name], before[name]):
            assert_same_bits(a, b)
    for a, b in zip(grads, g_before):
        assert_same_bits(a, b)
