"""Per-model dropout of N models: ``modelbatch::batched_dropout`` against the baselines.

Every method gives each of the N models its own mask:

* ``modelbatch``: one ``batched_dropout`` call, model i drawing from its own Philox
  stream (C++ on CPU, Triton on CUDA); backward draws the mask again (nothing saved).
* ``torch.vmap``: ``torch.vmap(F.dropout, randomness="different")``, the
  torch.func ensembling recipe: one shared generator, masks depend on N.
* ``loop``: ``F.dropout`` per model and a ``torch.stack``, what a per-model loop
  costs (the same work ``rng="torch"`` does, minus its generator swaps).

A second table times one training step (forward, loss, backward, fused SGD) of N
MLPs with dropout in a ModelBatch: ``rng="philox"`` against ``rng=None`` (vmap's
shared generator, the cost without per-model streams) and ``rng="torch"`` (exact
replay, a Python loop per dropout call).

Forward alone and forward + backward (``autograd.grad`` of the output with a
fixed gradient), in interleaved rounds (medians), so a noisy machine slows all
methods alike. Ratios are against ``torch.vmap`` in the same run.

Run: ``python benchmarks/bench_dropout.py [--device cuda] [--quick] [--threads T]``.
Writes ``benchmarks/results/<device>/dropout.{csv,md}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H
from modelbatch.ops import dropout as dropout_op

#: (label, total shape [N, ...], p, channel-wise)
CASES = [
    ("N=256 [128, 512] p=0.1", (256, 128, 512), 0.1, False),
    ("N=256 [128, 512] p=0.5", (256, 128, 512), 0.5, False),
    ("N=256 [32, 16, 8, 8] p=0.2 (Dropout2d)", (256, 32, 16, 8, 8), 0.2, True),
    ("N=1024 [64, 64] p=0.1", (1024, 64, 64), 0.1, False),
]
QUICK = [("N=64 [64, 128] p=0.1", (64, 64, 128), 0.1, False)]


def methods(shape, p, feature, device, backward):
    n = shape[0]
    x = torch.randn(shape, device=device, requires_grad=backward)
    g = torch.randn(shape, device=device)
    seeds = torch.arange(n, device=device, dtype=torch.int64)
    offsets = torch.zeros(n, device=device, dtype=torch.int64)
    repeat = 1
    for s in shape[3:]:
        repeat *= s
    repeat = repeat if feature else 1
    drop = F.dropout2d if feature else F.dropout

    fns = {
        "modelbatch": lambda: dropout_op.batched_dropout(x, seeds, offsets, p, repeat),
        "torch.vmap": lambda: torch.vmap(lambda t: drop(t, p, True), randomness="different")(x),
        "loop": lambda: torch.stack([drop(t, p, True) for t in x.unbind(0)]),
    }
    if not backward:
        return {k: _no_grad(f) for k, f in fns.items()}
    return {k: _with_grad(f, x, g) for k, f in fns.items()}


def _no_grad(f):
    def run():
        with torch.no_grad():
            return f()

    return run


def _with_grad(f, x, g):
    return lambda: torch.autograd.grad(f(), x, g)


def training_steps(n: int, batch: int, device: str):
    """One SGD step of N MLPs (64 -> 256 -> 256 -> 10, Dropout(0.1) twice) per rng."""
    import modelbatch as mb
    from torch import nn

    torch.manual_seed(0)
    models = [
        nn.Sequential(
            nn.Linear(64, 256), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(256, 256), nn.ReLU(), nn.Dropout(0.1),
            nn.Linear(256, 10),
        )
        for _ in range(n)
    ]  # fmt: skip
    x = torch.randn(batch, 64, device=device)
    y = torch.randint(0, 10, (batch,), device=device)
    fns = {}
    for rng in ("philox", None, "torch"):
        b = mb.ModelBatch(models, seeds=0, rng=rng).to(device)
        opt = mb.optim.SGD(b, lr=0.01, momentum=0.9)

        def step(b=b, opt=opt):
            opt.zero_grad()
            b.compute_loss(b(x), y, F.cross_entropy).backward()
            opt.step()

        fns[f"rng={rng!r}"] = step
    return fns


def main() -> None:
    args, ctx = H.standard_args(__doc__)
    rows = []
    for label, shape, p, feature in QUICK if args.quick else CASES:
        for backward in (False, True):
            fns = methods(shape, p, feature, args.device, backward)
            times = H.interleaved_times(fns, repeats=args.repeats, warmup=2, device=args.device)
            base = times["torch.vmap"]
            for name, t in times.items():
                rows.append(
                    {
                        "case": label,
                        "pass": "fwd+bwd" if backward else "fwd",
                        "method": name,
                        "ms": round(t * 1e3, 3),
                        "speedup_vs_vmap": round(base / t, 2),
                        **ctx,
                    }
                )
            summary = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items())
            print(f"{label} {'fwd+bwd' if backward else 'fwd'}: {summary}", flush=True)
    steps = []
    n_models = 16 if args.quick else 256
    times = H.interleaved_times(
        training_steps(n_models, 128, args.device), repeats=args.repeats, device=args.device
    )
    base = times["rng=None"]
    for name, t in times.items():
        steps.append({"case": f"train step N={n_models} MLP+Dropout", "method": name,
                      "ms": round(t * 1e3, 3), "relative_to_rng_None": round(t / base, 2),
                      **ctx})  # fmt: skip
    print(", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()), flush=True)
    out = H.results_dir(args.device)
    name = "dropout_quick" if args.quick else "dropout"
    H.write_csv(out / f"{name}_train_step.csv", steps)
    H.write_csv(out / f"{name}.csv", rows)
    lines = [
        "# Per-model dropout: modelbatch::batched_dropout vs torch.vmap and a loop",
        "",
        f"device: {ctx['device']}; torch {ctx['torch']}; commit {ctx['commit']}; {ctx['date']}",
        "",
        "| case | pass | modelbatch ms | torch.vmap ms | loop ms | modelbatch / vmap speed-up |",
        "|---|---|---|---|---|---|",
    ]
    for i in range(0, len(rows), 3):
        r = {row["method"]: row for row in rows[i : i + 3]}
        mb_row = r["modelbatch"]
        lines.append(
            f"| {mb_row['case']} | {mb_row['pass']} | {mb_row['ms']} | {r['torch.vmap']['ms']} | "
            f"{r['loop']['ms']} | {mb_row['speedup_vs_vmap']}x |"
        )
    lines += [
        "",
        f"One training step of N={n_models} MLPs (64-256-256-10, two Dropout(0.1), batch 128, "
        "fused SGD) in a ModelBatch:",
        "",
        "| rng | ms | time relative to rng=None |",
        "|---|---|---|",
    ]
    lines += [f"| {r['method']} | {r['ms']} | {r['relative_to_rng_None']} |" for r in steps]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / name}.csv and .md")


if __name__ == "__main__":
    main()
