"""The fused per-model optimizer step against torch.optim, in bytes per second.

One step of Adam (and of SGD with momentum) over the stacked parameters of N
models whose grads already exist:

* ``modelbatch``: ``modelbatch.optim.Adam`` / ``SGD`` with a learning rate per
  model: one multi-tensor kernel launch per (device, dtype) for all models (C++
  on CPU, Triton on CUDA).
* ``torch foreach`` / ``torch fused``: ``torch.optim.Adam(foreach=True)`` and
  ``(fused=True)`` (SGD: ``foreach=True`` / ``fused=True``) over the same stacked
  tensors with ONE learning rate: the speed of torch's own kernels, a bound for
  any per-model scheme (torch cannot give each model its own rate this way).

The step is memory-bound: Adam reads param, grad, exp_avg and exp_avg_sq and
writes param, exp_avg and exp_avg_sq (7 values per parameter), SGD with momentum
reads param, grad and the buffer and writes param and buffer (5). GB/s is those
bytes over the time, compared with the device's copy bandwidth (read + write)
measured in the same run; GFLOP/s counts the arithmetic of the update (Adam 14,
SGD 4 per parameter), for scale against the measured sgemm rate. On a CPU the
ratio to the copy bandwidth can exceed 1: a plain copy also reads every
destination line before writing it (write-allocate), which the counted bytes
leave out, and the smaller cases fit in the last-level cache.

Each method runs in blocks of back-to-back steps, blocks interleaved across
methods (medians), so a noisy machine slows all alike.

Run: ``python benchmarks/bench_optim.py [--device cuda] [--quick] [--threads T]``.
Writes ``benchmarks/results/<device>/optim.{csv,md}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H
import modelbatch as mb

#: (label, N, features of each model's square Linear): parameters N * (f * f + f)
CPU_CASES = [
    ("N=1024 x 1k params", 1024, 31),
    ("N=256 x 40k params", 256, 200),
    ("N=64 x 1M params", 64, 1000),
]
CUDA_CASES = CPU_CASES + [("N=1024 x 100k params (1e8)", 1024, 312)]
QUICK = [("N=16 x 1k params", 16, 31)]

#: values read + written per parameter, and flops per parameter, of one step
TRAFFIC = {"adam": (7, 14), "sgd": (5, 4)}


def methods(kind: str, n: int, f: int, device: str):
    torch.manual_seed(0)
    batch = mb.ModelBatch([nn.Linear(f, f) for _ in range(n)]).to(device)
    params = list(batch.parameters())
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    lrs = torch.logspace(-4, -2, n).tolist()
    if kind == "adam":
        fns = {"modelbatch": mb.optim.Adam(batch, lr=lrs).step}
        for name, kw in (("torch foreach", {"foreach": True}), ("torch fused", {"fused": True})):
            fns[name] = torch.optim.Adam(params, lr=1e-3, **kw).step
    else:
        fns = {"modelbatch": mb.optim.SGD(batch, lr=lrs, momentum=0.9).step}
        for name, kw in (("torch foreach", {"foreach": True}), ("torch fused", {"fused": True})):
            fns[name] = torch.optim.SGD(params, lr=1e-3, momentum=0.9, **kw).step
    return fns, sum(p.numel() for p in params)


def main() -> None:
    args, ctx = H.standard_args(__doc__)
    copy_gbs = H.measured_copy_gbs(args.device)
    sgemm = H.measured_sgemm_gflops(args.device)
    print(f"measured: copy {copy_gbs:.1f} GB/s, sgemm {sgemm:.1f} GFLOP/s", flush=True)
    cases = QUICK if args.quick else (CUDA_CASES if args.device.startswith("cuda") else CPU_CASES)
    rows = []
    for label, n, f in cases:
        for kind in ("adam", "sgd"):
            fns, numel = methods(kind, n, f, args.device)
            times = H.interleaved_times(fns, repeats=args.repeats, device=args.device, block=5)
            values, flops = TRAFFIC[kind]
            for name, t in times.items():
                gbs = values * 4 * numel / t / 1e9
                rows.append(
                    {
                        "case": label,
                        "optimizer": kind,
                        "method": name,
                        "params": numel,
                        "ms": round(t * 1e3, 3),
                        "GB/s": round(gbs, 1),
                        "fraction_of_copy_bw": round(gbs / copy_gbs, 2),
                        "GFLOP/s": round(flops * numel / t / 1e9, 1),
                        "vs_torch_fused": round(times["torch fused"] / t, 2),
                        "measured_copy_GB/s": round(copy_gbs, 1),
                        "measured_sgemm_GFLOP/s": round(sgemm, 1),
                        **ctx,
                    }
                )
            summary = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items())
            print(f"{label} {kind} ({numel} params): {summary}", flush=True)
    out = H.results_dir(args.device)
    name = "optim_quick" if args.quick else "optim"
    H.write_csv(out / f"{name}.csv", rows)
    lines = [
        "# Optimizer step: fused per-model (modelbatch) vs torch.optim over the stacked tensors",
        "",
        f"device: {ctx['device']}; torch {ctx['torch']}; commit {ctx['commit']}; {ctx['date']}",
        f"measured in the same run: copy {copy_gbs:.1f} GB/s (read + write), "
        f"sgemm {sgemm:.1f} GFLOP/s. GB/s counts the values an update must read and write "
        "(Adam 7, SGD with momentum 5 per parameter); on a CPU it can exceed the copy rate "
        "(a copy also reads its destination; small cases fit in cache).",
        "",
        "| case | optimizer | method | ms | GB/s | of copy bandwidth | GFLOP/s | "
        "speed vs torch fused |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['optimizer']} | {r['method']} | {r['ms']} | {r['GB/s']} | "
        f"{r['fraction_of_copy_bw']} | {r['GFLOP/s']} | {r['vs_torch_fused']}x |"
        for r in rows
    ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / name}.csv and .md")


if __name__ == "__main__":
    main()
