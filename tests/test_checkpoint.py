"""save_checkpoint / load_checkpoint: a resumed run continues bit-identically (in
this process and in a new one), a kill mid-write leaves the previous checkpoint
loadable, and foreign, truncated or mismatched files raise and change nothing."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import time

import modelbatch as mb
import pytest
import torch
import torch.nn.functional as F
from torch import nn

N, STEPS = 4, 40
HERE = os.path.dirname(os.path.abspath(__file__))


def make(seed: int = 0, n: int = N, rng: str = "philox"):
    torch.manual_seed(seed)
    models = [
        nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Dropout(0.3), nn.Linear(16, 3))
        for _ in range(n)
    ]
    batch = mb.ModelBatch(models, seeds=100, rng=rng)
    opt = mb.optim.Adam(batch, lr=[1e-3 * (i + 1) for i in range(n)])
    return batch, opt


def train(batch, opt, steps: int) -> None:
    for _ in range(steps):
        # The data comes from torch's global generator, which the checkpoint carries.
        x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
        opt.zero_grad()
        batch.compute_loss(batch(x), y, F.cross_entropy).backward()
        opt.step()


def straight_run(rng: str = "philox"):
    batch, opt = make(rng=rng)
    torch.manual_seed(7)
    train(batch, opt, STEPS)
    return batch


def assert_same(a, b) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k, v in sa.items():
        if torch.is_tensor(v):
            assert torch.equal(v, sb[k]), k


@pytest.mark.parametrize("rng", ["philox", "torch"])
def test_resume_is_bit_identical(tmp_path, rng):
    ref = straight_run(rng)
    batch, opt = make(rng=rng)
    torch.manual_seed(7)
    train(batch, opt, STEPS // 2)
    path = tmp_path / "ckpt.pt"
    mb.save_checkpoint(path, batch, opt, extra={"step": STEPS // 2, "note": "half"})
    torch.manual_seed(12345)  # the resumed process would start elsewhere
    resumed, ropt = make(seed=99, rng=rng)  # other initial weights, fresh optimizer
    extra = mb.load_checkpoint(path, resumed, ropt)
    assert extra == {"step": STEPS // 2, "note": "half"}
    train(resumed, ropt, STEPS - extra["step"])
    assert_same(resumed, ref)


def test_resume_in_a_new_process(tmp_path):
    ref = straight_run()
    batch, opt = make()
    torch.manual_seed(7)
    train(batch, opt, STEPS // 2)
    mb.save_checkpoint(tmp_path / "ckpt.pt", batch, opt, extra={"step": STEPS // 2})
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {HERE!r})
        import modelbatch as mb
        from test_checkpoint import make, train
        batch, opt = make(seed=5)
        extra = mb.load_checkpoint({str(tmp_path / "ckpt.pt")!r}, batch, opt)
        train(batch, opt, {STEPS} - extra["step"])
        torch.save(batch.state_dict(), {str(tmp_path / "final.pt")!r})
        """
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=300)
    final = torch.load(tmp_path / "final.pt")
    for k, v in ref.state_dict().items():
        if torch.is_tensor(v):
            assert torch.equal(v, final[k]), k


def test_scaler_state_round_trips(tmp_path):
    batch, opt = make()
    scaler = mb.amp.GradScaler(batch, init_scale=[2.0**k for k in range(N)], growth_interval=3)
    mb.save_checkpoint(tmp_path / "c.pt", batch, opt, scaler)
    other, oopt = make(seed=3)
    oscaler = mb.amp.GradScaler(other)
    mb.load_checkpoint(tmp_path / "c.pt", other, oopt, oscaler)
    assert torch.equal(oscaler.get_scale(), scaler.get_scale())
    assert torch.equal(
        oscaler.state_dict()["growth_interval"], scaler.state_dict()["growth_interval"]
    )


def test_kill_mid_write_keeps_previous_checkpoint(tmp_path):
    path = tmp_path / "ckpt.pt"
    batch, opt = make()
    mb.save_checkpoint(path, batch, opt, extra={"version": "good"})
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {HERE!r})
        import modelbatch as mb
        from test_checkpoint import make
        batch, opt = make()
        print("writing", flush=True)
        big = [torch.randn(1 << 22) for _ in range(96)]  # ~1.5 GB of extra: a slow write
        mb.save_checkpoint({str(path)!r}, batch, opt, extra={{"version": "bad", "big": big}})
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    deadline = time.time() + 120
    while not any(p.name.startswith(".ckpt.pt.tmp") for p in tmp_path.iterdir()):
        assert time.time() < deadline and proc.poll() is None, "the writer never started"
        time.sleep(0.01)
    proc.kill()
    proc.wait()
    fresh, fopt = make(seed=1)
    assert mb.load_checkpoint(path, fresh, fopt) == {"version": "good"}
    assert_same(fresh, batch)


def _params(batch):
    return {k: v.clone() for k, v in batch.state_dict().items() if torch.is_tensor(v)}


def _unchanged(batch, before) -> bool:
    return all(torch.equal(v, before[k]) for k, v in _params(batch).items())


def test_bad_files_raise_and_change_nothing(tmp_path):
    batch, opt = make()
    path = tmp_path / "ckpt.pt"
    mb.save_checkpoint(path, batch, opt)
    target, topt = make(seed=8)
    before = _params(target)

    data = path.read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="not a readable checkpoint"):
        mb.load_checkpoint(tmp_path / "cut.pt", target, topt)

    torch.save({"weights": torch.zeros(3)}, tmp_path / "other.pt")
    with pytest.raises(ValueError, match="not a modelbatch checkpoint"):
        mb.load_checkpoint(tmp_path / "other.pt", target, topt)

    small, sopt = make(n=3)
    with pytest.raises(ValueError, match="holds 4 models, this ModelBatch 3"):
        mb.load_checkpoint(path, small, sopt)

    wide = mb.ModelBatch(
        [
            nn.Sequential(nn.Linear(6, 32), nn.ReLU(), nn.Dropout(0.3), nn.Linear(32, 3))
            for _ in range(N)
        ],
        seeds=100,
    )
    with pytest.raises(ValueError, match="differ from this ModelBatch"):
        mb.load_checkpoint(path, wide)

    mb.save_checkpoint(tmp_path / "noopt.pt", batch)
    with pytest.raises(ValueError, match="has no optimizer state"):
        mb.load_checkpoint(tmp_path / "noopt.pt", target, topt)

    with pytest.raises(FileNotFoundError):
        mb.load_checkpoint(tmp_path / "missing.pt", target, topt)
    assert _unchanged(target, before)


def test_failed_optimizer_load_rolls_back(tmp_path):
    """The optimizer state of an SGD checkpoint cannot load into Adam: the batch
    weights loaded just before are put back."""
    batch, _ = make()
    sgd = mb.optim.SGD(batch, lr=0.1, momentum=0.9)
    mb.save_checkpoint(tmp_path / "sgd.pt", batch, sgd)
    target, topt = make(seed=4)
    before = _params(target)
    opt_before = topt.state_dict()
    with pytest.raises(ValueError):
        mb.load_checkpoint(tmp_path / "sgd.pt", target, topt)
    assert _unchanged(target, before)
    assert topt.state_dict().keys() == opt_before.keys()
