"""Per-model mixed precision: ``modelbatch.amp.GradScaler`` and ``torch.autocast``.

The contract: N models trained batched under autocast with a per-model scaler ==
the same N models trained one by one with plain ``torch.autocast`` and their own
``torch.amp.GradScaler``: the same scale trajectories, the same skipped steps, the
same parameters. One model is made to overflow on chosen steps (its inputs
scaled past float16's range); the others must not notice it.
"""

from __future__ import annotations

import copy

import modelbatch as mb
import pytest
import torch
import torch.nn.functional as F
from _models import MLP, max_rel_err

N = 4
STEPS = 100
LRS = [1e-3, 3e-3, 1e-2, 2e-3]
OVERFLOW_MODEL = 2
OVERFLOW_STEPS = {5, 17, 40, 41, 77}
GROWTH_INTERVAL = 10  # small, so the scales also grow during the run

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def make_data(steps=STEPS, n=N, batch=8, seed=0, overflow_model=OVERFLOW_MODEL):
    """Per-model inputs [n, B, 8] and targets [n, B]; model ``overflow_model``'s
    inputs are scaled by 1e5 on OVERFLOW_STEPS (float16 overflows in its forward)."""
    g = torch.Generator().manual_seed(seed)
    data = []
    for s in range(steps):
        x = torch.randn(n, batch, 8, generator=g)
        y = torch.randint(0, 3, (n, batch), generator=g)
        if overflow_model is not None and s in OVERFLOW_STEPS:
            x[overflow_model] *= 1e5
        data.append((x, y))
    return data


def train_torch(models, data, opt_fn, device, dtype, clip=None, keep=None):
    """Each model alone: plain autocast + its own torch.amp.GradScaler. Returns the
    models, the [steps, n] scales after each update and the [steps, n] step counts."""
    keep = list(range(len(models))) if keep is None else keep
    models = [copy.deepcopy(models[i]).to(device) for i in keep]
    opts = [opt_fn(m, i) for m, i in zip(models, keep)]
    scalers = [torch.amp.GradScaler(device, growth_interval=GROWTH_INTERVAL) for _ in models]
    scales, counts = [], []
    for x, y in data:
        row_s, row_c = [], []
        for j, (m, o, sc) in enumerate(zip(models, opts, scalers)):
            i = keep[j]
            o.zero_grad()
            with torch.autocast(device, dtype=dtype):
                loss = F.cross_entropy(m(x[i].to(device)), y[i].to(device))
            sc.scale(loss).backward()
            if clip is not None:
                sc.unscale_(o)
                torch.nn.utils.clip_grad_norm_(m.parameters(), clip[i])
            before = [p.detach().clone() for p in m.parameters()]
            sc.step(o)
            sc.update()
            row_s.append(sc.get_scale())
            row_c.append(any(not torch.equal(a, p) for a, p in zip(before, m.parameters())))
        scales.append(row_s)
        counts.append(row_c)
    return models, torch.tensor(scales), torch.tensor(counts)


def train_batched(models, data, opt_fn, device, dtype, clip=None, keep=None):
    keep = list(range(len(models))) if keep is None else keep
    batch = mb.ModelBatch([copy.deepcopy(models[i]) for i in keep], shared_input=False).to(device)
    opt = opt_fn(batch, keep)
    scaler = mb.amp.GradScaler(batch, growth_interval=GROWTH_INTERVAL)
    scales, counts = [], []
    for x, y in data:
        opt.zero_grad()
        x, y = x[keep].to(device), y[keep].to(device)
        with torch.autocast(device, dtype=dtype):
            losses = batch.compute_loss(batch(x), y, F.cross_entropy, reduction="none")
        scaler.scale(losses).backward()
        if clip is not None:
            scaler.unscale_(opt)
            mb.clip_grad_norm_(batch, [clip[i] for i in keep])
        before = [p.detach().clone() for p in batch.parameters()]
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale().cpu())
        counts.append(_stepped(before, list(batch.parameters())))
    return batch, torch.stack(scales), torch.stack(counts)


def _stepped(before, after):
    """[N] bools: did model i's parameters change?"""
    n = after[0].shape[0]
    out = torch.zeros(n, dtype=torch.bool)
    for a, p in zip(before, after):
        out |= (a.reshape(n, -1) != p.detach().reshape(n, -1)).any(dim=1).cpu()
    return out


OPTS = {
    "adam": (
        lambda m, i: torch.optim.Adam(m.parameters(), lr=LRS[i]),
        lambda b, keep: mb.optim.Adam(b, lr=[LRS[i] for i in keep]),
    ),
    "sgd": (
        lambda m, i: torch.optim.SGD(m.parameters(), lr=LRS[i] * 10, momentum=0.9),
        lambda b, keep: mb.optim.SGD(b, lr=[LRS[i] * 10 for i in keep], momentum=0.9),
    ),
    # any other torch.optim class: a PerModelOptimizer, which skips by hiding grads
    "rmsprop": (
        lambda m, i: torch.optim.RMSprop(m.parameters(), lr=LRS[i]),
        lambda b, keep: mb.OptimizerFactory(torch.optim.RMSprop).create_optimizer(
            b, [{"lr": LRS[i]} for i in keep]
        ),
    ),
}


def _models(seed=0, n=N):
    torch.manual_seed(seed)
    return [MLP() for _ in range(n)]


def assert_params_close(batch, ref, rtol, rtol_of=None):
    """max |a - b| <= rtol * max |b| per tensor (tests/_models.max_rel_err);
    ``rtol_of`` {model: rtol} overrides it for some models."""
    states = batch.get_model_states()
    for i, m in enumerate(ref):
        tol = (rtol_of or {}).get(i, rtol)
        for k, v in m.state_dict().items():
            err = max_rel_err(states[i][k].cpu(), v.cpu())
            assert err <= tol, f"model {i} {k}: rel err {err:.2e}"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("opt_name", list(OPTS))
def test_fp16_overflow_matches_per_model_scalers(device, opt_name):
    """100 float16 steps, per-model learning rates, model 2 overflowing on chosen
    steps: scales, skipped steps and parameters equal N torch.amp.GradScaler runs."""
    models = _models()
    data = make_data()
    torch_opt, mb_opt = OPTS[opt_name]
    ref, ref_scales, ref_counts = train_torch(models, data, torch_opt, device, torch.float16)
    batch, scales, counts = train_batched(models, data, mb_opt, device, torch.float16)

    assert torch.equal(scales, ref_scales), "scale trajectories differ"
    assert torch.equal(counts, ref_counts), "skipped steps differ"
    skipped = ~counts
    # The forced overflows were skipped (and the scale backed off) on those steps,
    # on top of the natural overflows that torch's own runs had too.
    assert OVERFLOW_STEPS <= {s for s in range(STEPS) if skipped[s, OVERFLOW_MODEL]}
    others = [i for i in range(N) if i != OVERFLOW_MODEL]
    assert skipped[:, others].any()  # natural overflows
    # The scales moved both ways during the run.
    assert (scales > 2.0**16).any() and (scales < 2.0**16).any()
    if opt_name == "rmsprop":
        # torch.optim's own RMSprop steps each model: nothing but the batched
        # forward, backward and scaler stands between the two runs. They agree bit
        # for bit where torch's float16 GEMM of one model rounds as the batched one
        # does (AMD EPYC, AVX-512 without FP16). On CPUs where oneDNN runs it with
        # native float16 arithmetic (AVX512-FP16 / AMX) the float16 activations differ
        # now and then in the last bit: the models then agree to 2e-5 (seen on a Xeon
        # with AMX), except the one whose inputs are scaled by 1e5 on some steps,
        # where RMSprop's 1/sqrt(v) amplifies such differences to 3e-2. Its scale and
        # skip trajectory, asserted exactly above, is unaffected.
        assert_params_close(batch, ref, rtol=1e-4, rtol_of={OVERFLOW_MODEL: 5e-2})
    else:
        # The fused kernels agree with torch.optim to float32 rounding; through the
        # float16 casts of the weights in the next forward, such a last-bit
        # difference now and then moves a weight to the neighbouring float16 value.
        # Float16's resolution is the tolerance (torch.testing's rtol for it).
        assert_params_close(batch, ref, rtol=1e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_other_models_bit_identical_without_the_overflowing_one(device):
    models = _models(seed=1)
    data = make_data()
    opt = OPTS["adam"][1]
    full, full_scales, full_counts = train_batched(models, data, opt, device, torch.float16)
    keep = [i for i in range(N) if i != OVERFLOW_MODEL]
    part, part_scales, part_counts = train_batched(
        models, data, opt, device, torch.float16, keep=keep
    )
    assert torch.equal(full_scales[:, keep], part_scales)
    assert torch.equal(full_counts[:, keep], part_counts)
    fs, ps = full.get_model_states(), part.get_model_states()
    for j, i in enumerate(keep):
        for k in ps[j]:
            assert torch.equal(fs[i][k], ps[j][k]), f"model {i} {k} changed"
    # ...while the overflowing model really did skip its forced steps.
    assert not full_counts[sorted(OVERFLOW_STEPS), OVERFLOW_MODEL].any()


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_clip_after_unscale_matches(device, dtype):
    """unscale_, then per-model clipping (each model its own max norm), then step."""
    models = _models(seed=2)
    data = make_data(steps=40)
    clip = [0.5, 1.0, 0.05, 2.0]
    torch_opt, mb_opt = OPTS["adam"]
    ref, ref_scales, ref_counts = train_torch(models, data, torch_opt, device, dtype, clip=clip)
    batch, scales, counts = train_batched(models, data, mb_opt, device, dtype, clip=clip)
    assert torch.equal(scales, ref_scales)
    assert torch.equal(counts, ref_counts)
    # As above: float32 rounding of the fused Adam (and of the per-model norms)
    # against torch.optim, seen through float16/bfloat16 casts.
    assert_params_close(batch, ref, rtol=1e-3 if dtype == torch.float16 else 8e-3)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_autocast_forward_dtypes_and_values_match(device, dtype):
    """The batched forward under autocast gives each model the dtype and the values
    its own autocast forward gives (linear in the low precision, the loss in float32)."""
    models = _models(seed=3)
    batch = mb.ModelBatch(copy.deepcopy(models), shared_input=True).to(device)
    x = torch.randn(5, 8, device=device)
    y = torch.randint(0, 3, (5,), device=device)
    with torch.autocast(device, dtype=dtype):
        out = batch(x)
        losses = batch.compute_loss(out, y, F.cross_entropy, reduction="none")
        refs = [m.to(device)(x) for m in models]
        ref_losses = [F.cross_entropy(r, y) for r in refs]
    assert out.dtype == refs[0].dtype == dtype
    assert losses.dtype == ref_losses[0].dtype == torch.float32
    for i in range(N):
        assert torch.equal(out[i], refs[i])
        # the fused cross-entropy kernel rounds differently from torch's, in float32
        torch.testing.assert_close(losses[i], ref_losses[i], rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------- the update rule


def test_update_matches_torch_amp_update_scale():
    """update() per model == torch._amp_update_scale_ on each model's scalars, for
    random skip patterns, trackers at and around the interval, and per-model
    factors that are not powers of two."""
    n = 64
    g = torch.Generator().manual_seed(0)
    batch = mb.ModelBatch([MLP(2, 2, 2) for _ in range(n)])
    growth = (1.0 + torch.rand(n, generator=g, dtype=torch.float64) * 2).tolist()
    backoff = (0.1 + torch.rand(n, generator=g, dtype=torch.float64) * 0.8).tolist()
    interval = torch.randint(1, 5, (n,), generator=g).tolist()
    init = (torch.rand(n, generator=g) * 1e4 + 1).tolist()
    init[0] = 3.0e38  # growth would overflow float32: the scale must stay
    scaler = mb.amp.GradScaler(batch, init, growth, backoff, interval)
    opt = mb.optim.SGD(batch, lr=0.0)
    ref_scale = torch.tensor(init, dtype=torch.float32)
    ref_tracker = torch.zeros(n, dtype=torch.int32)
    for _ in range(12):
        found = (torch.rand(n, generator=g) < 0.3).float()
        for p in batch.parameters():
            p.grad = torch.ones_like(p)
        # plant an inf in the models that should skip
        w = batch.stacked_params()["net.0.weight"]
        w.grad[found.bool(), 0, 0] = float("inf")
        scaler.step(opt)
        scaler.update()
        for i in range(n):
            s = ref_scale[i : i + 1].clone()
            t = ref_tracker[i : i + 1].clone()
            torch._amp_update_scale_(s, t, found[i : i + 1], growth[i], backoff[i], interval[i])
            ref_scale[i], ref_tracker[i] = s[0], t[0]
        assert torch.equal(scaler.get_scale(), ref_scale)
        assert torch.equal(scaler.get_growth_tracker(), ref_tracker)


def test_disabled_scaler_is_plain_training():
    models = _models(seed=4)
    data = make_data(steps=5, overflow_model=None)
    runs = []
    for enabled in (False, None):
        batch = mb.ModelBatch(copy.deepcopy(models), shared_input=False)
        opt = mb.optim.Adam(batch, lr=LRS)
        scaler = mb.amp.GradScaler(batch, enabled=bool(enabled))
        for x, y in data:
            opt.zero_grad()
            losses = batch.compute_loss(batch(x), y, F.cross_entropy, reduction="none")
            if enabled is None:
                losses.sum().backward()
                opt.step()
            else:
                scaler.scale(losses).backward()
                scaler.unscale_(opt)
                scaler.step(opt)
                scaler.update()
        runs.append(batch)
        if enabled is False:
            assert torch.equal(scaler.get_scale(), torch.ones(N))
            assert scaler.state_dict() == {}
    for a, b in zip(runs[0].get_model_states(), runs[1].get_model_states()):
        for k in a:
            assert torch.equal(a[k], b[k])


def test_fused_step_leaves_grads_unscaled_like_torch():
    """After scaler.step (no explicit unscale_), .grad holds the unscaled grads, as
    after torch's GradScaler.step."""
    models = _models(seed=5)
    x, y = make_data(steps=1, overflow_model=None)[0]
    batch = mb.ModelBatch(copy.deepcopy(models), shared_input=False)
    opt = mb.optim.SGD(batch, lr=0.1)
    scaler = mb.amp.GradScaler(batch, init_scale=[2.0**4, 2.0**8, 2.0**12, 3.0])
    losses = batch.compute_loss(batch(x), y, F.cross_entropy, reduction="none")
    scaler.scale(losses).backward()
    scaled = {k: p.grad.clone() for k, p in batch.stacked_params().items()}
    scaler.step(opt)
    inv = scaler.get_scale().double().reciprocal().float()
    for k, p in batch.stacked_params().items():
        want = scaled[k] * inv.view((-1,) + (1,) * (p.dim() - 1))
        assert torch.equal(p.grad, want), k


# ------------------------------------------------------------------ state dicts


def _trained_scaler(n=3, steps=3):
    batch = mb.ModelBatch([MLP() for _ in range(n)])
    opt = mb.optim.SGD(batch, lr=0.01)
    scaler = mb.amp.GradScaler(batch, init_scale=[8.0, 16.0, 32.0][:n], growth_interval=2)
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    for s in range(steps):
        opt.zero_grad()
        losses = batch.compute_loss(batch(x), y, F.cross_entropy, reduction="none")
        scaler.scale(losses).backward()
        if s == 1:
            batch.stacked_params()["net.0.weight"].grad[1, 0, 0] = float("nan")
        scaler.step(opt)
        scaler.update()
    return batch, opt, scaler


def test_state_dict_round_trip_and_torch_per_model_states():
    batch, _, scaler = _trained_scaler()
    sd = scaler.state_dict()
    assert sd["num_models"] == 3 and sd["scale"].shape == (3,)
    fresh = mb.amp.GradScaler(batch)
    fresh.load_state_dict(sd)
    assert torch.equal(fresh.get_scale(), scaler.get_scale())
    assert torch.equal(fresh.get_growth_tracker(), scaler.get_growth_tracker())
    assert fresh.get_growth_interval() == [2, 2, 2]
    # Model i's state, as torch's own scaler would save it, resumes a torch scaler.
    for i in range(3):
        ts = torch.amp.GradScaler("cpu")
        ts.load_state_dict(scaler.model_state_dict(i))
        assert ts.get_scale() == float(scaler.get_scale()[i])
        assert ts._init_growth_tracker == int(scaler.get_growth_tracker()[i])
    # ...and N torch states load back as one batched state.
    other = mb.amp.GradScaler(batch)
    other.load_state_dict([scaler.model_state_dict(i) for i in range(3)])
    assert torch.equal(other.get_scale(), scaler.get_scale())
    assert torch.equal(other.get_growth_tracker(), scaler.get_growth_tracker())
    # One torch state goes to every model.
    other.load_state_dict(torch.amp.GradScaler("cpu", init_scale=4.0).state_dict())
    assert torch.equal(other.get_scale(), torch.full((3,), 4.0))
    # The skipped model backed off on its own.
    assert scaler.get_scale()[1] < 16.0 * 2


# -------------------------------------------------------------------- bad input


def _losses(batch):
    x, y = torch.randn(4, 8), torch.randint(0, 3, (4,))
    return batch.compute_loss(batch(x), y, F.cross_entropy, reduction="none")


def test_scale_rejects_summed_or_wrong_size_losses():
    batch = mb.ModelBatch([MLP() for _ in range(3)])
    scaler = mb.amp.GradScaler(batch)
    losses = _losses(batch)
    with pytest.raises(ValueError, match=r"per-model losses \[N=3\].*got a scalar"):
        scaler.scale(losses.sum())
    with pytest.raises(ValueError, match=r"per-model losses \[N=3\].*shape \(2,\)"):
        scaler.scale(losses[:2])
    with pytest.raises(ValueError, match="tensor"):
        scaler.scale([1.0, 2.0, 3.0])


def test_scaler_of_another_batch_size_is_rejected_and_changes_nothing():
    batch3 = mb.ModelBatch([MLP() for _ in range(3)])
    batch4 = mb.ModelBatch([MLP() for _ in range(4)])
    scaler = mb.amp.GradScaler(batch3)
    opt4 = mb.optim.Adam(batch4)
    _losses(batch4).sum().backward()
    grads = [p.grad.clone() for p in batch4.parameters()]
    params = [p.detach().clone() for p in batch4.parameters()]
    for call in (scaler.unscale_, scaler.step):
        with pytest.raises(ValueError, match=r"built for a ModelBatch of 3 models.*of 4"):
            call(opt4)
    assert all(torch.equal(p.grad, g) for p, g in zip(batch4.parameters(), grads))
    assert all(torch.equal(p.detach(), q) for p, q in zip(batch4.parameters(), params))
    with pytest.raises(ValueError, match="state is of 4 models, this scaler has 3"):
        scaler.load_state_dict(mb.amp.GradScaler(batch4).state_dict())
    with pytest.raises(ValueError, match=r"optimizer over a ModelBatch"):
        scaler.step(torch.optim.SGD(batch3.parameters(), lr=0.1))


def test_bad_state_dicts_and_arguments_are_rejected_unchanged():
    batch, _, scaler = _trained_scaler()
    before = (scaler.get_scale(), scaler.get_growth_tracker())
    sd = scaler.state_dict()
    bad_scale = dict(sd, scale=torch.tensor([1.0, -2.0, 3.0]))
    with pytest.raises(ValueError, match="init_scale must be finite and > 0; model 1"):
        scaler.load_state_dict(bad_scale)
    with pytest.raises(ValueError, match="missing keys"):
        scaler.load_state_dict({"scale": 1.0})
    with pytest.raises(ValueError, match="expected 3 per-model scaler states, got 2"):
        scaler.load_state_dict([scaler.model_state_dict(0)] * 2)
    with pytest.raises(ValueError, match="scale: expected a scalar or 3 values"):
        scaler.load_state_dict(dict(sd, scale=torch.ones(5)))
    with pytest.raises(RuntimeError, match="empty"):
        scaler.load_state_dict({})
    assert torch.equal(scaler.get_scale(), before[0])
    assert torch.equal(scaler.get_growth_tracker(), before[1])
    with pytest.raises(ValueError, match=r"growth_factor must be > 1\.0; model 0"):
        mb.amp.GradScaler(batch, growth_factor=1.0)
    with pytest.raises(ValueError, match="backoff_factor must be in"):
        mb.amp.GradScaler(batch, backoff_factor=[0.5, 1.5, 0.5])
    with pytest.raises(ValueError, match="growth_interval must be an integer"):
        mb.amp.GradScaler(batch, growth_interval=2.5)
    with pytest.raises(ValueError, match="expected a scalar or 3 values"):
        mb.amp.GradScaler(batch, init_scale=[1.0, 2.0])
    with pytest.raises(ValueError, match="ModelBatch"):
        mb.amp.GradScaler(torch.nn.Linear(2, 2))


def test_setters_are_per_model_and_validated():
    batch = mb.ModelBatch([MLP() for _ in range(3)])
    scaler = mb.amp.GradScaler(batch)
    scaler.set_growth_factor([2.0, 3.0, 4.0])
    scaler.set_backoff_factor(0.25)
    scaler.set_growth_interval([1, 2, 3])
    assert scaler.get_growth_factor() == [2.0, 3.0, 4.0]
    assert scaler.get_backoff_factor() == [0.25] * 3
    assert scaler.get_growth_interval() == [1, 2, 3]
    with pytest.raises(
        ValueError, match=r"set_growth_interval: growth_interval must be an integer"
    ):
        scaler.set_growth_interval([1, 0, 3])
    with pytest.raises(ValueError, match=r"set_backoff_factor: backoff_factor must be in \(0, 1\)"):
        scaler.set_backoff_factor(2.0)
    assert scaler.get_growth_interval() == [1, 2, 3]
    assert scaler.get_backoff_factor() == [0.25] * 3
    # The new factors drive update(): model 0 grows after 1 clean step, x2.
    _losses(batch).sum().backward()
    opt = mb.optim.SGD(batch, lr=0.0)
    scaler.step(opt)
    scaler.update()
    assert scaler.get_scale().tolist() == [2.0**17, 2.0**16, 2.0**16]


def test_call_order_errors_like_torch():
    batch = mb.ModelBatch([MLP() for _ in range(2)])
    opt = mb.optim.SGD(batch, lr=0.1)
    scaler = mb.amp.GradScaler(batch)
    with pytest.raises(RuntimeError, match="no inf checks"):
        scaler.step(opt)  # no grads yet
    with pytest.raises(RuntimeError, match="no inf checks were recorded prior to update"):
        scaler.update()
    scaler.scale(_losses(batch)).backward()
    scaler.unscale_(opt)
    with pytest.raises(RuntimeError, match="already been called"):
        scaler.unscale_(opt)
    scaler.step(opt)
    with pytest.raises(RuntimeError, match="step\\(\\) has already been called"):
        scaler.step(opt)
    with pytest.raises(RuntimeError, match="closure"):
        mb.amp.GradScaler(batch).step(opt, closure=lambda: None)
    scaler.update()
    scaler.update(new_scale=[4.0, 8.0])
    assert torch.equal(scaler.get_scale(), torch.tensor([4.0, 8.0]))
    with pytest.raises(ValueError, match="new_scale must be finite"):
        scaler.update(new_scale=float("inf"))


def test_fp16_gradients_are_refused_like_torch():
    batch = mb.ModelBatch([MLP().half() for _ in range(2)])
    opt = mb.optim.SGD(batch, lr=0.1)
    scaler = mb.amp.GradScaler(batch)
    for p in batch.parameters():
        p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="FP16 gradients"):
        scaler.step(opt)


def test_optimizer_step_rejects_bad_amp_vectors():
    batch = mb.ModelBatch([MLP() for _ in range(3)])
    opt = mb.optim.Adam(batch)
    _losses(batch).sum().backward()
    params = [p.detach().clone() for p in batch.parameters()]
    with pytest.raises(ValueError, match=r"found_inf must be a \[N=3\] tensor, got \(2,\)"):
        opt.step(found_inf=torch.zeros(2))
    with pytest.raises(ValueError, match=r"inv_scale must be a \[N=3\] tensor"):
        opt.step(inv_scale=1.0)
    assert all(torch.equal(p.detach(), q) for p, q in zip(batch.parameters(), params))
    assert torch.equal(opt.steps, torch.zeros(3, dtype=torch.float64))
