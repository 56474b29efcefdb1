"""modelbatch::fused_mlp_loss_grad (csrc/fused_mlp.cpp) against its pure-torch
reference on odd shapes, every activation and loss, each CPU ISA; the models it
recognises; and TrainStep on it, trained batched against the same models trained one
by one with plain PyTorch."""

from __future__ import annotations

import copy
import itertools

import modelbatch as mb
import pytest
import torch
import torch.nn.functional as F
from modelbatch import _backend
from modelbatch.ops import fused_mlp as fm
from modelbatch.train_step import TrainStep
from torch import nn

ISAS = ["", "avx2", "generic"]


@pytest.fixture(autouse=True)
def _needs_the_kernel():
    assert _backend.c_extension_loaded(), "modelbatch._C did not load: the CPU kernel is missing"


def problem(n, b, dims, acts, loss, *, shared_x=True, shared_t=True, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    ws = [torch.randn(n, o, i, generator=g) / i**0.5 for i, o in itertools.pairwise(dims)]
    if bias is True:
        bias = [True] * len(ws)
    elif bias is False:
        bias = [False] * len(ws)
    bs = [torch.randn(n, o, generator=g) * 0.3 if hb else None for o, hb in zip(dims[1:], bias)]
    x = torch.randn(*(() if shared_x else (n,)), b, dims[0], generator=g)
    lead = () if shared_t else (n,)
    if loss == 0:
        t = torch.randint(0, dims[-1], (*lead, b), generator=g)
    else:
        t = torch.randn(*lead, b, dims[-1], generator=g)
    return x, t, ws, bs, acts


def reference64(x, t, ws, bs, acts, loss, ignore_index=-100, scale=None):
    """The reference in float64: the oracle both float32 implementations approach."""

    def d(v):
        return None if v is None else v.double()

    losses, grads = fm.reference(
        d(x) if x.is_floating_point() else x,
        d(t) if t.is_floating_point() else t,
        [d(w) for w in ws],
        [d(b) for b in bs],
        acts,
        loss,
        ignore_index,
        d(scale),
    )
    return losses.float(), [g.float() for g in grads]


def check(got, want, rtol=3e-5, atol=3e-6):
    (gl, gg), (wl, wg) = got, want
    torch.testing.assert_close(gl, wl, rtol=rtol, atol=atol)
    assert len(gg) == len(wg)
    for a, b in zip(gg, wg):
        assert a.shape == b.shape and a.is_contiguous()
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol * max(1.0, b.abs().max().item()))


CASES = {
    # name: (N, B, dims, activations, loss, options)
    "relu_ce_shared": (5, 7, [5, 13, 3], [1, 0], 0, {}),
    "tanh_sigmoid_per_model": (3, 33, [16, 32, 32, 4], [2, 3, 0], 0, {"shared_x": False}),
    "silu_gelu_mse": (4, 17, [9, 20, 6], [4, 5], 1, {}),
    "gelu_tanh_no_bias": (2, 40, [17, 18, 2], [6, 0], 0, {"bias": False}),
    "batch_of_one": (3, 1, [3, 4, 2], [1, 1], 1, {"shared_x": False, "shared_t": False}),
    "per_model_targets": (6, 19, [7, 31, 11, 5], [1, 5, 0], 0, {"shared_t": False}),
    "mixed_bias_one_layer": (4, 16, [16, 3], [0], 0, {"bias": [False]}),
    "wide": (2, 130, [70, 129, 10], [1, 0], 0, {"bias": [True, False]}),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("case", list(CASES))
def test_op_matches_the_reference(case, isa, monkeypatch):
    monkeypatch.setenv("MODELBATCH_FUSED_MLP_ISA", isa)
    n, b, dims, acts, loss, opts = CASES[case]
    x, t, ws, bs, acts = problem(n, b, dims, acts, loss, **opts)
    scale = torch.linspace(0.5, 4.0, n)
    for s in (None, scale):
        got = torch.ops.modelbatch.fused_mlp_loss_grad(x, t, ws, bs, acts, loss, -100, s)
        check(got, reference64(x, t, ws, bs, acts, loss, scale=s))
    # The float32 reference agrees too (what the eager step computes).
    check(got, fm.reference(x, t, ws, bs, acts, loss, -100, scale))


@pytest.mark.parametrize("act", sorted(fm.ACTIVATIONS))
def test_every_activation_forward_and_backward(act):
    """Inputs spread over [-12, 12] reach the tails of tanh, sigmoid and gelu."""
    code = fm.ACTIVATIONS[act]
    x, t, ws, bs, acts = problem(3, 21, [6, 40, 40, 4], [code, code, 0], 0)
    x = x * 4
    got = torch.ops.modelbatch.fused_mlp_loss_grad(x, t, ws, bs, acts, 0, -100, None)
    check(got, reference64(x, t, ws, bs, acts, 0))


CHAIN_CASES = [c for c in CASES if 3 not in CASES[c][3] and c != "wide"]  # no sigmoid


@pytest.mark.parametrize("case", CHAIN_CASES)
def test_linear_act_chain_matches_the_reference(case, triton_device):
    """The op's CUDA kernel: a chain of linear_act Triton GEMMs (bias and activation
    in the epilogues), here in the Triton interpreter without a GPU; and the same
    chain over the linear_act op's CPU path."""
    from modelbatch.kernels import linear as triton_linear

    n, b, dims, acts, loss, opts = CASES[case]
    x, t, ws, bs, acts = problem(n, b, dims, acts, loss, **opts)
    if loss == 0:
        t[..., ::4] = -100
    scale = torch.linspace(0.5, 4.0, n)
    want = reference64(x, t, ws, bs, acts, loss, scale=scale)
    check(fm.linear_act_chain(x, t, ws, bs, acts, loss, -100, scale), want)

    def dev(v):
        return None if v is None else v.to(triton_device)

    losses, grads = fm.linear_act_chain(
        dev(x), dev(t), [dev(w) for w in ws], [dev(v) for v in bs], acts, loss, -100,
        dev(scale), forward=triton_linear.linear_act_forward,
        backward=triton_linear.linear_act_backward,
    )  # fmt: skip
    check((losses.cpu(), [g.cpu() for g in grads]), want)


@pytest.mark.parametrize("act", sorted(fm.ACTIVATIONS))
def test_nan_stays_in_its_model(act):
    """A NaN input makes that model's loss NaN (as in torch, whatever the activation)
    and leaves the other models' results as they were."""
    code = fm.ACTIVATIONS[act]
    x, t, ws, bs, acts = problem(3, 9, [5, 17, 3], [code, 0], 0, shared_x=False)
    clean = torch.ops.modelbatch.fused_mlp_loss_grad(x, t, ws, bs, acts, 0, -100, None)
    x[1, 4, 2] = float("nan")
    losses, grads = torch.ops.modelbatch.fused_mlp_loss_grad(x, t, ws, bs, acts, 0, -100, None)
    assert torch.isnan(losses[1]) and torch.equal(losses[[0, 2]], clean[0][[0, 2]])
    for g, c in zip(grads, clean[1]):
        assert torch.equal(g[[0, 2]], c[[0, 2]])


def test_ignore_index():
    op = torch.ops.modelbatch.fused_mlp_loss_grad
    x, t, ws, bs, acts = problem(3, 12, [4, 8, 3], [1, 0], 0, shared_t=False)
    t[0, ::3] = -100
    check(op(x, t, ws, bs, acts, 0, -100, None), reference64(x, t, ws, bs, acts, 0))
    t[0, ::3] = 7
    t[1, :] = 7  # every sample of model 1 ignored
    losses, _ = op(x, t, ws, bs, acts, 0, 7, None)
    one = F.linear(F.relu(F.linear(x, ws[0][1], bs[0][1])), ws[1][1], bs[1][1])
    want = F.cross_entropy(one, t[1], ignore_index=7)
    assert torch.isnan(want) and torch.isnan(losses[1])  # nothing left to average
    torch.testing.assert_close(losses[[0, 2]], reference64(x, t, ws, bs, acts, 0, 7)[0][[0, 2]])


def test_bad_input_says_what_was_expected():
    x, t, ws, bs, acts = problem(3, 8, [4, 6, 3], [1, 0], 0)
    op = torch.ops.modelbatch.fused_mlp_loss_grad
    with pytest.raises(RuntimeError, match="x has 5 features, the first layer takes 4"):
        op(torch.randn(8, 5), t, ws, bs, acts, 0, -100, None)
    with pytest.raises(RuntimeError, match="target 3 is out of bounds for 3 classes"):
        op(x, torch.full((8,), 3), ws, bs, acts, 0, -100, None)
    with pytest.raises(RuntimeError, match=r"targets must be \[B\] or \[N, B\]"):
        op(x, t[:5], ws, bs, acts, 0, -100, None)
    with pytest.raises(RuntimeError, match="weight 1 must be"):
        op(x, t, [ws[0], ws[1][:, :, :5]], bs, acts, 0, -100, None)
    with pytest.raises(RuntimeError, match="bias 0 must be"):
        op(x, t, ws, [bs[0][:2], bs[1]], acts, 0, -100, None)
    with pytest.raises(RuntimeError, match="must be a float32"):
        op(x.double(), t, ws, bs, acts, 0, -100, None)
    with pytest.raises(RuntimeError, match="unknown activation code 9"):
        op(x, t, ws, bs, [9, 0], 0, -100, None)
    with pytest.raises(RuntimeError, match="grad_scale must hold N = 3"):
        op(x, t, ws, bs, acts, 0, -100, torch.ones(2))
    with pytest.raises(RuntimeError, match=r"mse targets must be \[B, 3\]"):
        op(x, torch.randn(8, 2), ws, bs, acts, 1, -100, None)


@pytest.mark.parametrize("decoupled", [False, True])
@pytest.mark.parametrize("clip", [False, True])
def test_adam_step_op_matches_its_parts(clip, decoupled):
    """fused_mlp_adam_step = fused_mlp_loss_grad + clipping + adam_step, with per-model
    hyper-parameters, amsgrad on some models and a model whose loss is NaN (skipped:
    parameters, state and step count untouched)."""
    n = 5
    x, t, ws, bs, acts = problem(n, 13, [7, 19, 9, 4], [1, 6, 0], 0, bias=[True, False, True])
    params = [ws[0], bs[0], ws[1], ws[2], bs[2]]
    with torch.no_grad():
        params[0][2, 0, 0] = float("nan")  # model 2: NaN loss
    biased = [1, 0, 1]
    hp = {
        "lr": torch.logspace(-3, -1, n, dtype=torch.float64),
        "beta1": torch.full((n,), 0.9, dtype=torch.float64),
        "beta2": torch.tensor([0.999, 0.99, 0.95, 0.9, 0.999], dtype=torch.float64),
        "eps": torch.full((n,), 1e-8, dtype=torch.float64),
        "weight_decay": torch.tensor([0, 0.01, 0.1, 0, 0.05], dtype=torch.float64),
        "amsgrad": torch.tensor([0, 1, 0, 1, 0], dtype=torch.float64),
    }
    runs = []
    for fn in (torch.ops.modelbatch.fused_mlp_adam_step, fm.adam_step_reference):
        ps = [p.clone() for p in params]
        m = [torch.full_like(p, 0.01) for p in params]
        v = [torch.full_like(p, 1e-4) for p in params]
        vmax = [torch.full_like(p, 2e-4) for p in params]
        steps = torch.tensor([0.0, 3.0, 1.0, 5.0, 2.0], dtype=torch.float64)
        max_norm = torch.tensor([0.01, 0.1, 1.0, 10.0, 0.5]) if clip else None
        for _ in range(3):
            losses = fn(x, t, ps, biased, acts, 0, -100, m, v, vmax, steps, hp["lr"],
                        hp["beta1"], hp["beta2"], hp["eps"], hp["weight_decay"],
                        hp["amsgrad"], decoupled, max_norm)  # fmt: skip
        runs.append((losses, ps, m, v, vmax, steps))
    (l1, *a), (l2, *b) = runs
    torch.testing.assert_close(l1, l2, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.isnan(l1[2])
    for xs, ys in zip(a[:-1], b[:-1]):
        for u, w in zip(xs, ys):
            torch.testing.assert_close(u, w, rtol=1e-5, atol=1e-6, equal_nan=True)
    assert torch.equal(a[-1], b[-1]) and a[-1].tolist() == [3.0, 6.0, 1.0, 8.0, 5.0]
    assert torch.equal(a[0][1][2], params[1][2])  # the NaN model kept its bias


def test_adam_step_op_says_what_was_expected():
    x, t, ws, bs, acts = problem(2, 4, [3, 5, 2], [1, 0], 0)
    params = [ws[0], bs[0], ws[1], bs[1]]
    st = [torch.zeros_like(p) for p in params]
    hp = [torch.full((2,), v, dtype=torch.float64) for v in (1e-3, 0.9, 0.999, 1e-8, 0, 0)]
    steps = torch.zeros(2, dtype=torch.float64)
    op = torch.ops.modelbatch.fused_mlp_adam_step
    with pytest.raises(RuntimeError, match="params has 4 tensors, biased describes 3"):
        op(x, t, params, [1, 0], acts, 0, -100, st, st, [], steps, *hp, False, None)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        strided = [ws[0].transpose(1, 2).contiguous().transpose(1, 2), *params[1:]]
        op(x, t, strided, [1, 1], acts, 0, -100, st, st, [], steps, *hp, False, None)
    with pytest.raises(RuntimeError, match="max_norm must hold N = 2"):
        op(x, t, params, [1, 1], acts, 0, -100, st, st, [], steps, *hp, False, torch.ones(3))


# ---------------------------------------------------------------------------
# Which models the kernel covers


class Wrapped(nn.Module):
    """A module that calls a Sequential, plus functional activations."""

    def __init__(self, i=8, h=12, o=3):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(i, h), nn.SiLU(), nn.Linear(h, h))
        self.head = nn.Linear(h, o)

    def forward(self, x):
        return self.head(F.gelu(self.body(x), approximate="tanh"))


class Residual(Wrapped):
    def forward(self, x):
        h = self.body(x)
        return self.head(h + h.tanh())


def names(m):
    return [n for n, _ in m.named_parameters()]


def test_plan_reads_the_chain_of_layers():
    p, why = fm.plan(Wrapped(), F.cross_entropy, names(Wrapped()))
    assert why == "" and p.weights == ("body.0.weight", "body.2.weight", "head.weight")
    assert p.activations == (fm.ACTIVATIONS["silu"], fm.ACTIVATIONS["gelu_tanh"], 0)
    assert (p.in_features, p.out_features, p.loss) == (8, 3, 0)
    seq = nn.Sequential(nn.Linear(3, 4, bias=False), nn.Dropout(0.0), nn.Tanh(), nn.Linear(4, 1))
    p, _ = fm.plan(seq, nn.MSELoss(), names(seq))
    assert p.biases == (None, "3.bias") and p.loss == 1
    p, _ = fm.plan(seq, nn.CrossEntropyLoss(ignore_index=5), names(seq))
    assert p.ignore_index == 5


@pytest.mark.parametrize(
    ("model", "loss", "why"),
    [
        (Residual(), F.cross_entropy, "not a step of one chain of layers"),
        (nn.Sequential(nn.Linear(3, 4), nn.Dropout(0.1)), F.cross_entropy, "Dropout"),
        (nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.ReLU()), F.cross_entropy, "does not follow"),
        (nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)), F.cross_entropy, "buffers"),
        (nn.Sequential(nn.Linear(3, 4)), nn.CrossEntropyLoss(label_smoothing=0.1), "loss"),
        (nn.Sequential(nn.Linear(3, 4)), F.l1_loss, "loss"),
        (nn.Sequential(nn.Linear(3, 4).double()), F.mse_loss, "float64"),
    ],
)
def test_plan_says_why_a_model_is_not_covered(model, loss, why):
    p, reason = fm.plan(model, loss, names(model))
    assert p is None and why in reason


# ---------------------------------------------------------------------------
# TrainStep on the fused kernel


def models(n=4, cls=Wrapped, seed=0, **kw):
    torch.manual_seed(seed)
    return [cls(**kw) for _ in range(n)]


def data(steps, b=24, i=8, c=3, n=None, mse=False, seed=1):
    g = torch.Generator().manual_seed(seed)
    lead = () if n is None else (n,)
    out = []
    for _ in range(steps):
        x = torch.randn(*lead, b, i, generator=g)
        y = (
            torch.randn(*lead, b, c, generator=g)
            if mse
            else torch.randint(0, c, (*lead, b), generator=g)
        )
        out.append((x, y))
    return out


LRS = [1e-3, 3e-3, 1e-2, 3e-2]


@pytest.mark.parametrize("compile", [True, False])
def test_fused_trainstep_equals_models_trained_alone(compile):
    """The contract: N models trained batched equal the same N trained one by one with
    plain PyTorch (torch.optim.AdamW, per-model learning rates and betas)."""
    ms = models()
    alone = copy.deepcopy(ms)
    batch = mb.ModelBatch(ms)
    opt = mb.optim.AdamW(batch, lr=LRS, betas=(0.9, [0.999, 0.99, 0.95, 0.9]), weight_decay=0.01)
    step = TrainStep(batch, opt, F.cross_entropy, compile=compile)
    assert step._plan is not None
    opts = [
        torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, b2), weight_decay=0.01)
        for m, lr, b2 in zip(alone, LRS, [0.999, 0.99, 0.95, 0.9])
    ]
    for x, y in data(8):
        losses = step(x, y)
        for i, (m, o) in enumerate(zip(alone, opts)):
            o.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            o.step()
            torch.testing.assert_close(losses[i], loss.detach(), rtol=1e-5, atol=1e-6)
    for i, m in enumerate(alone):
        for (k, p), q in zip(batch.model(i).named_parameters(), m.parameters()):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=k)
    assert opt.steps.tolist() == [8] * 4


def test_fused_per_model_inputs_mse_sgd_clipping_and_scaler_equal_the_eager_step():
    n = 3
    ms = models(n, cls=lambda: nn.Sequential(nn.Linear(8, 20), nn.Tanh(), nn.Linear(20, 2)))
    ref = mb.ModelBatch(copy.deepcopy(ms), shared_input=False, seeds=0)
    batch = mb.ModelBatch(ms, shared_input=False, seeds=0)
    kw = {"lr": [0.05, 0.1, 0.2], "momentum": 0.9, "nesterov": True}
    ref_opt, opt = mb.optim.SGD(ref, **kw), mb.optim.SGD(batch, **kw)
    ref_scaler = mb.amp.GradScaler(ref, init_scale=2.0**4)
    scaler = mb.amp.GradScaler(batch, init_scale=2.0**4)
    clip = [0.05, 0.5, 5.0]
    step = TrainStep(batch, opt, F.mse_loss, scaler=scaler, max_grad_norm=clip)
    general = TrainStep(
        ref, ref_opt, F.mse_loss, scaler=ref_scaler, max_grad_norm=clip, fused=False
    )
    assert step._plan is not None and general._plan is None
    for x, y in data(6, c=2, n=n, mse=True):
        torch.testing.assert_close(step(x, y), general(x, y), rtol=1e-5, atol=1e-6)
    for (k, v), w in zip(batch.state_dict().items(), ref.state_dict().values()):
        if torch.is_tensor(v):
            torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)
    torch.testing.assert_close(scaler.get_scale(), ref_scaler.get_scale())


def test_fused_adam_with_clipping_and_amsgrad_equals_the_general_step():
    ms = models(4)
    batch, ref = mb.ModelBatch(ms, seeds=0), mb.ModelBatch(copy.deepcopy(ms), seeds=0)
    kw = {"lr": LRS, "amsgrad": [False, True, False, True], "weight_decay": 0.01}
    opt, ref_opt = mb.optim.Adam(batch, **kw), mb.optim.Adam(ref, **kw)
    clip = [0.01, 0.1, 1.0, 10.0]
    step = TrainStep(batch, opt, F.cross_entropy, max_grad_norm=clip)
    general = TrainStep(ref, ref_opt, F.cross_entropy, max_grad_norm=clip, fused=False)
    assert step._fused_adam and general._plan is None
    for x, y in data(6):
        torch.testing.assert_close(step(x, y), general(x, y), rtol=1e-5, atol=1e-6)
    for (k, v), w in zip(batch.state_dict().items(), ref.state_dict().values()):
        if torch.is_tensor(v):
            torch.testing.assert_close(v, w, rtol=1e-5, atol=1e-6, msg=k)
    for a, b in zip(opt.state.values(), ref_opt.state.values()):
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-6, msg=key)
    assert torch.equal(opt.steps, ref_opt.steps)


def test_fused_step_is_one_graph_and_never_recompiles():
    batch = mb.ModelBatch(models())
    opt = mb.optim.Adam(batch, lr=LRS)
    step = TrainStep(batch, opt, F.cross_entropy, max_grad_norm=1.0)
    (x, y), *rest = data(4)
    step._prepare(x)
    step._refresh_hparams()
    explained = torch._dynamo.explain(step._fused_step)(
        x, y, step._hp, step._buckets, step._max_norm
    )
    assert explained.graph_count == 1 and explained.graph_break_count == 0, explained
    ops = [str(n.target) for g in explained.graphs for n in g.graph.nodes]
    assert "modelbatch.fused_mlp_adam_step" in ops  # Adam: the update inside the kernel
    step(x, y)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for i, (x, y) in enumerate(rest):
            opt.param_groups[0]["lr"] = 0.5 / (i + 1)
            step.set_max_grad_norm(0.5 + i)
            step(x, y)


def test_fused_step_isolates_a_nonfinite_model():
    """A model with NaN weights skips its update; the others end bit-identical to a
    batch in which that model was healthy."""
    clean = mb.ModelBatch(models())
    broken = mb.ModelBatch(models())
    with torch.no_grad():
        broken.stacked_params()["head.weight"][2, 0, 0] = float("nan")
    runs = []
    for batch in (clean, broken):
        opt = mb.optim.Adam(batch, lr=LRS)
        step = TrainStep(batch, opt, F.cross_entropy)
        for x, y in data(3):
            losses = step(x, y)
        runs.append((batch, opt, losses))
    (cb, _, cl), (bb, bopt, bl) = runs
    assert torch.isnan(bl[2]) and bopt.steps.tolist() == [3, 3, 0, 3]
    assert torch.equal(bl[[0, 1, 3]], cl[[0, 1, 3]])
    for name, v in bb.stacked_params().items():
        assert torch.equal(v[[0, 1, 3]], cb.stacked_params()[name][[0, 1, 3]]), name


def test_auto_uses_the_general_step_for_other_inputs():
    """[B, T, I] inputs are not the kernel's [B, I]: the general compiled step runs
    them, and still equals the eager step."""
    batch = mb.ModelBatch(models(3))
    ref = mb.ModelBatch(models(3))
    opt, ref_opt = mb.optim.SGD(batch, lr=0.1), mb.optim.SGD(ref, lr=0.1)
    step = TrainStep(batch, opt, lambda out, y: F.cross_entropy(out.flatten(0, 1), y.flatten()))
    assert step._plan is None  # a lambda loss is not recognised
    step2 = TrainStep(ref, ref_opt, F.mse_loss)
    x = torch.randn(5, 4, 8)
    y = torch.randn(5, 4, 3)
    assert step2._plan is not None and not step2._fits_fused(x, y)
    got = step2(x, y)
    ref_opt2 = mb.optim.SGD(mb.ModelBatch(models(3)), lr=0.1)
    eager = ref_opt2.batch
    ref_opt2.zero_grad()
    want = eager.compute_loss(eager(x), y, F.mse_loss, reduction="none")
    want.sum().backward()
    ref_opt2.step()
    torch.testing.assert_close(got, want.detach(), rtol=1e-5, atol=1e-6)
    assert step2._fused_fn is None and step2._fn is not None


def test_fused_true_refuses_an_uncovered_model():
    batch = mb.ModelBatch(models(2, cls=Residual))
    with pytest.raises(ValueError, match="fused MLP kernel does not cover this model"):
        TrainStep(batch, mb.optim.SGD(batch, lr=0.1), F.cross_entropy, fused=True)
    with pytest.raises(ValueError, match="fused must be"):
        TrainStep(batch, mb.optim.SGD(batch, lr=0.1), F.cross_entropy, fused="yes")
