"""The fused MLP kernel against the general compiled step, across layer widths.

One training step (forward, cross-entropy, backward, Adam) of N MLPs
``I -> H -> H -> C`` (ReLU) with ``modelbatch.TrainStep``:

* ``fused``: ``TrainStep(fused=True)``, whose forward, loss and backward are the
  op ``modelbatch::fused_mlp_loss_grad`` (``csrc/fused_mlp.cpp`` on the CPU: one
  model at a time with its activations in the core's caches; on CUDA a chain of
  ``linear_act`` Triton GEMMs);
* ``general``: ``TrainStep(fused=False)``, the whole step as one torch.compile graph
  of aten ops (MKL / cuBLAS GEMMs, inductor's fused elementwise kernels);
* ``torch.func``: ``vmap(functional_call)`` + ``torch.optim.Adam(fused=True)``.

TrainStep's default (``fused="auto"``) takes the fused kernel on the CPU for layers
of at most 512 features (``modelbatch.train_step._FUSED_MAX_WIDTH``); the widths
here bracket that choice. GFLOP/s counts 6 x B x (weights per model) x N.

Run: ``python benchmarks/bench_fused_mlp.py [--device cuda] [--quick]``.
Writes ``benchmarks/results/<device>/fused_mlp.{csv,md}``.
"""

from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H
import modelbatch as mb

# (N, batch, input, hidden, classes)
CASES = [
    (1024, 32, 16, 32, 4),
    (256, 128, 64, 128, 10),
    (64, 256, 256, 256, 10),
    (16, 256, 512, 512, 10),
    (8, 512, 1024, 1024, 10),
]
QUICK = [(64, 32, 16, 32, 4), (8, 64, 128, 128, 10)]


def mlp(i, h, c):
    return nn.Sequential(nn.Linear(i, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, c))


def trainstep(n, b, i, h, c, device, fused):
    torch.manual_seed(0)
    batch = mb.ModelBatch([mlp(i, h, c) for _ in range(n)]).to(device)
    opt = mb.optim.Adam(batch, lr=torch.logspace(-4, -2, n).tolist())
    step = mb.TrainStep(batch, opt, F.cross_entropy, fused=fused)
    x, y = torch.randn(b, i, device=device), torch.randint(0, c, (b,), device=device)
    return lambda: step(x, y)


def torchfunc(n, b, i, h, c, device):
    torch.manual_seed(0)
    models = [mlp(i, h, c).to(device) for _ in range(n)]
    params, buffers = stack_module_state(models)
    base = copy.deepcopy(models[0]).to("meta")
    opt = torch.optim.Adam(list(params.values()), lr=1e-3, fused=True)
    x, y = torch.randn(b, i, device=device), torch.randint(0, c, (b,), device=device)

    def step():
        opt.zero_grad()
        out = vmap(lambda p, bb, xx: functional_call(base, (p, bb), (xx,)), in_dims=(0, 0, None))(
            params, buffers, x
        )
        vmap(F.cross_entropy, in_dims=(0, None))(out, y).sum().backward()
        opt.step()

    return step


def main() -> None:
    args, ctx = H.standard_args(__doc__, repeats=9)
    mb.allocator.tune_cpu_allocator()
    device = args.device
    sgemm = H.measured_sgemm_gflops(device)
    rows = []
    for n, b, i, h, c in QUICK if args.quick else CASES:
        fns = {
            "fused": trainstep(n, b, i, h, c, device, True),
            "general": trainstep(n, b, i, h, c, device, False),
            "torchfunc": torchfunc(n, b, i, h, c, device),
        }
        t = H.interleaved_times(fns, repeats=args.repeats, device=device)
        flops = 6 * b * (i * h + h * h + h * c) * n
        for method, sec in t.items():
            rows.append(
                {
                    "N": n,
                    "batch": b,
                    "input": i,
                    "hidden": h,
                    "classes": c,
                    "method": method,
                    "step_ms": round(sec * 1e3, 3),
                    "gflops": round(flops / sec / 1e9, 1),
                    "pct_sgemm": round(100 * flops / sec / 1e9 / sgemm, 1),
                    "fused_speedup": round(sec / t["fused"], 3),
                    "sgemm_gflops": round(sgemm, 1),
                    **ctx,
                }
            )
        print(
            f"N={n:5d} B={b:4d} {i}-{h}-{h}-{c}: fused {t['fused'] * 1e3:8.2f} ms, general "
            f"{t['general'] * 1e3:8.2f} ms (x{t['general'] / t['fused']:.2f}), torch.func "
            f"{t['torchfunc'] * 1e3:8.2f} ms (x{t['torchfunc'] / t['fused']:.2f})",
            flush=True,
        )
    out = H.results_dir(device)
    name = "fused_mlp_quick" if args.quick else "fused_mlp"
    H.write_csv(out / f"{name}.csv", rows)
    lines = [
        f"Device: {ctx['device']}; torch {ctx['torch']}; commit {ctx['commit']}; {ctx['date']}.",
        f"Measured float32 GEMM {sgemm:.1f} GFLOP/s. One TrainStep (Adam) of N MLPs "
        "I-H-H-C (ReLU); speed-ups are the other method's time over the fused kernel's.",
        "",
        "| N | batch | layers | fused ms | % sgemm | general ms | general / fused | "
        "torch.func ms | torch.func / fused |",
        "|---:|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k in range(0, len(rows), 3):
        f, g, tf = rows[k : k + 3]
        lines.append(
            f"| {f['N']} | {f['batch']} | {f['input']}-{f['hidden']}-{f['hidden']}-"
            f"{f['classes']} | {f['step_ms']:.2f} | {f['pct_sgemm']:.1f} | {g['step_ms']:.2f} | "
            f"{g['fused_speedup']:.2f}x | {tf['step_ms']:.2f} | {tf['fused_speedup']:.2f}x |"
        )
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / name}.csv and .md")


if __name__ == "__main__":
    main()
