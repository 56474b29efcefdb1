"""Per-model loss scaling: the cost of ``modelbatch.amp.GradScaler`` against the baselines.

The optimizer step of mixed-precision training (unscale, inf/NaN check, skip,
Adam update, scale update) for N models whose scaled grads already exist:

* ``modelbatch fused``: ``scaler.step(opt); scaler.update()``: one check kernel,
  then the fused Adam kernel unscales the grads as it reads them and skips the
  flagged models; no host sync.
* ``modelbatch unscale_``: ``scaler.unscale_(opt)`` first (what clipping needs),
  then the same step.
* ``torch per-model``: N ``torch.amp.GradScaler`` + N ``torch.optim.Adam``
  (foreach), one per model, what training the models one by one does at this step.
* ``torch shared scaler``: ONE ``torch.amp.GradScaler`` and one
  ``torch.optim.Adam(fused=True)`` over the stacked parameters, the seed
  prototype's approach: fast, but one model's overflow skips every model's step
  and shrinks every scale (it is not per-model training; a speed reference only).

Every method first restores the same scaled grads (a copy, the same for all), so
repeated unscaling never drifts into denormals. Interleaved rounds, medians;
ratios against ``torch per-model`` in the same run.

A second table times a whole training step (forward under autocast, loss,
backward, step) of a ModelBatch with the per-model scaler against the same step
with the scaler disabled (``enabled=False``): the overhead of loss scaling.

Run: ``python benchmarks/bench_amp.py [--device cuda] [--quick] [--threads T]``.
Writes ``benchmarks/results/<device>/amp.{csv,md}``.
"""

from __future__ import annotations

import copy
import itertools
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H
import modelbatch as mb

#: (label, N, layer widths)
CASES = [
    ("small: N=1024 MLP 32-64-64-10", 1024, (32, 64, 64, 10)),
    ("standard: N=256 MLP 64-256-256-10", 256, (64, 256, 256, 10)),
]
QUICK = [("quick: N=16 MLP 8-16-4", 16, (8, 16, 4))]


def mlp(widths):
    layers = []
    for a, b in itertools.pairwise(widths):
        layers += [nn.Linear(a, b), nn.ReLU()]
    return nn.Sequential(*layers[:-1])


def step_methods(n, widths, device):
    torch.manual_seed(0)
    models = [mlp(widths).to(device) for _ in range(n)]
    batch = mb.ModelBatch(copy.deepcopy(models)).to(device)
    stacked = [p for p in batch.parameters()]
    # Scaled grads as a backward under a 2^16 scale would leave them.
    scaled = [torch.randn_like(p) * 2.0**16 * 1e-3 for p in stacked]

    fns = {}
    for mode in ("fused", "unscale_"):
        b = mb.ModelBatch(copy.deepcopy(models)).to(device)
        ps = list(b.parameters())
        opt = mb.optim.Adam(b, lr=1e-3)
        scaler = mb.amp.GradScaler(b, growth_interval=10**9)
        for p, g in zip(ps, scaled):
            p.grad = g.clone()

        def run(ps=ps, opt=opt, scaler=scaler, mode=mode):
            for p, g in zip(ps, scaled):
                p.grad.copy_(g)
            if mode == "unscale_":
                scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()

        fns[f"modelbatch {mode}"] = run

    per = [copy.deepcopy(m) for m in models]
    per_params = [list(m.parameters()) for m in per]
    per_opts = [torch.optim.Adam(m.parameters(), lr=1e-3, foreach=True) for m in per]
    per_scalers = [torch.amp.GradScaler(device, growth_interval=10**9) for _ in per]
    for i, ps in enumerate(per_params):
        for p, g in zip(ps, scaled):
            p.grad = g[i].clone()
    for sc in per_scalers:  # the scale tensor is created lazily by scale()
        sc.scale(torch.ones((), device=device))

    def run_per():
        for i, (ps, opt, sc) in enumerate(zip(per_params, per_opts, per_scalers)):
            for p, g in zip(ps, scaled):
                p.grad.copy_(g[i])
            sc.step(opt)
            sc.update()

    fns["torch per-model"] = run_per

    shared = [p.detach().clone().requires_grad_() for p in stacked]
    shared_opt = torch.optim.Adam(shared, lr=1e-3, fused=True)
    shared_scaler = torch.amp.GradScaler(device, growth_interval=10**9)
    shared_scaler.scale(torch.ones((), device=device))
    for p, g in zip(shared, scaled):
        p.grad = g.clone()

    def run_shared():
        for p, g in zip(shared, scaled):
            p.grad.copy_(g)
        shared_scaler.step(shared_opt)
        shared_scaler.update()

    fns["torch shared scaler"] = run_shared
    return fns


def train_methods(n, widths, device, dtype):
    torch.manual_seed(0)
    models = [mlp(widths) for _ in range(n)]
    x = torch.randn(128, widths[0], device=device)
    y = torch.randint(0, widths[-1], (128,), device=device)
    fns = {}
    for enabled in (True, False):
        b = mb.ModelBatch(copy.deepcopy(models)).to(device)
        opt = mb.optim.Adam(b, lr=1e-3)
        scaler = mb.amp.GradScaler(b, enabled=enabled)

        def run(b=b, opt=opt, scaler=scaler):
            opt.zero_grad()
            with torch.autocast(device, dtype=dtype):
                losses = b.compute_loss(b(x), y, F.cross_entropy, reduction="none")
            scaler.scale(losses).backward()
            scaler.step(opt)
            scaler.update()

        fns["per-model scaler" if enabled else "scaler disabled"] = run
    return fns


def main() -> None:
    args, ctx = H.standard_args(__doc__)
    # bfloat16 on the CPU (its autocast default), float16 on CUDA.
    dtype = torch.float16 if args.device.startswith("cuda") else torch.bfloat16
    rows, train_rows = [], []
    for label, n, widths in QUICK if args.quick else CASES:
        times = H.interleaved_times(
            step_methods(n, widths, args.device), repeats=args.repeats, device=args.device
        )
        base = times["torch per-model"]
        for name, t in times.items():
            rows.append({"case": label, "method": name, "ms": round(t * 1e3, 3),
                         "speedup_vs_per_model": round(base / t, 2), **ctx})  # fmt: skip
        print(label, ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()), flush=True)
        times = H.interleaved_times(
            train_methods(n, widths, args.device, dtype), repeats=args.repeats, device=args.device
        )
        base = times["scaler disabled"]
        for name, t in times.items():
            train_rows.append({"case": label, "method": name, "ms": round(t * 1e3, 3),
                               "relative_to_disabled": round(t / base, 3), **ctx})  # fmt: skip
        print(label, ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items()), flush=True)
    out = H.results_dir(args.device)
    name = "amp_quick" if args.quick else "amp"
    H.write_csv(out / f"{name}.csv", rows + train_rows)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    lines = [
        "# Per-model loss scaling: the AMP optimizer step (unscale, check, skip, Adam, update)",
        "",
        f"device: {ctx['device']}; torch {ctx['torch']}; commit {ctx['commit']}; {ctx['date']}",
        "",
        "| case | " + " | ".join(f"{m} ms" for m in methods) + " | fused vs per-model |",
        "|---|" + "---|" * (len(methods) + 1),
    ]
    for label in dict.fromkeys(r["case"] for r in rows):
        r = {row["method"]: row for row in rows if row["case"] == label}
        cells = " | ".join(str(r[m]["ms"]) for m in methods)
        lines.append(f"| {label} | {cells} | {r['modelbatch fused']['speedup_vs_per_model']}x |")
    lines += [
        "",
        "`torch shared scaler` is not per-model training (one overflow skips every model);",
        "it is the speed of the seed prototype's approach, for reference.",
        "",
        f"Whole training step under autocast ({str(dtype).replace('torch.', '')}), batch 128,"
        " fused Adam:",
        "",
        "| case | per-model scaler ms | scaler disabled ms | relative |",
        "|---|---|---|---|",
    ]
    for label in dict.fromkeys(r["case"] for r in train_rows):
        r = {row["method"]: row for row in train_rows if row["case"] == label}
        lines.append(
            f"| {label} | {r['per-model scaler']['ms']} | {r['scaler disabled']['ms']} | "
            f"{r['per-model scaler']['relative_to_disabled']} |"
        )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / name}.csv and .md")


if __name__ == "__main__":
    main()
