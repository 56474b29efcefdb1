"""The linear layer of N models, forward + backward: ``modelbatch::batched_linear``
against the ways torch offers, in GFLOP/s against the measured sgemm rate.

For stacked weights ``W [N, O, I]``, biases ``b [N, O]`` and an input that is
either shared by the models (``x [B, I]``, a model's first layer; no input grad)
or per model (``x [N, B, I]``, a hidden layer; input grad too):

* ``modelbatch``: ``modelbatch.ops.linear.batched_linear``, what every
  ``nn.Linear`` inside a ModelBatch runs (``modelbatch::small_bmm`` GEMMs on CPU,
  a shared input broadcast with a zero stride, never copied);
* ``torch.bmm``: ``torch.baddbmm`` over the stacked tensors (a shared input
  expanded), autograd's backward;
* ``vmap F.linear``: ``torch.vmap(F.linear)``, the torch.func ensembling recipe;
* ``one GEMM`` (shared input only): ``x @ W.view(N*O, I).T``, all models as one
  large GEMM (the output then has the model axis in the middle of memory): what
  the BLAS reaches when it sees the whole problem at once.

GFLOP/s counts the GEMM work (forward 2NBIO, weight grad 2NBIO, input grad 2NBIO
when per model); the sgemm rate is measured in the same run on a 2048^3 product.
Interleaved rounds, medians.

Run: ``python benchmarks/bench_linear.py [--device cuda] [--quick] [--threads T]``.
Writes ``benchmarks/results/<device>/linear.{csv,md}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H
from modelbatch.ops.linear import batched_linear

#: (label, N, B, I, O)
CASES = [
    ("small MLP layer", 1024, 32, 32, 64),
    ("standard MLP layer", 256, 128, 64, 256),
    ("wide layer", 256, 128, 256, 256),
    ("large layer", 64, 256, 1024, 1024),
]
QUICK = [("tiny", 16, 8, 8, 16)]


def methods(n, b, i, o, shared, device):
    torch.manual_seed(0)
    w = torch.randn(n, o, i, device=device, requires_grad=True)
    bias = torch.randn(n, o, device=device, requires_grad=True)
    x = torch.randn(*(() if shared else (n,)), b, i, device=device, requires_grad=not shared)
    g = torch.randn(n, b, o, device=device)
    inputs = [w, bias] if shared else [x, w, bias]

    def run(forward):
        def step():
            torch.autograd.grad(forward(), inputs, g)

        return step

    xb = x.expand(n, b, i) if shared else x
    fns = {
        "modelbatch": run(lambda: batched_linear(x, w, bias, shared)),
        "torch.bmm": run(lambda: torch.baddbmm(bias.unsqueeze(1), xb, w.transpose(1, 2))),
        "vmap F.linear": run(
            lambda: torch.vmap(F.linear, in_dims=(None if shared else 0, 0, 0))(x, w, bias)
        ),
    }
    if shared:
        fns["one GEMM"] = run(
            lambda: (
                torch.addmm(bias.reshape(-1), x, w.reshape(n * o, i).t())
                .view(b, n, o)
                .transpose(0, 1)
            )
        )
    return fns


def main() -> None:
    args, ctx = H.standard_args(__doc__)
    sgemm = H.measured_sgemm_gflops(args.device)
    print(f"measured sgemm {sgemm:.1f} GFLOP/s", flush=True)
    rows = []
    for label, n, b, i, o in QUICK if args.quick else CASES:
        for shared in (True, False):
            fns = methods(n, b, i, o, shared, args.device)
            times = H.interleaved_times(fns, repeats=args.repeats, device=args.device)
            flops = 2 * n * b * i * o * (2 if shared else 3)
            for name, t in times.items():
                rows.append(
                    {
                        "case": label,
                        "input": "shared" if shared else "per model",
                        "N": n,
                        "B": b,
                        "I": i,
                        "O": o,
                        "method": name,
                        "ms": round(t * 1e3, 3),
                        "GFLOP/s": round(flops / t / 1e9, 1),
                        "fraction_of_sgemm": round(flops / t / 1e9 / sgemm, 2),
                        "speedup_vs_vmap": round(times["vmap F.linear"] / t, 2),
                        "measured_sgemm_GFLOP/s": round(sgemm, 1),
                        **ctx,
                    }
                )
            summary = ", ".join(f"{k} {v * 1e3:.2f} ms" for k, v in times.items())
            kind = "shared" if shared else "per-model"
            print(f"{label} N={n} B={b} I={i} O={o} {kind}: {summary}", flush=True)
    out = H.results_dir(args.device)
    name = "linear_quick" if args.quick else "linear"
    H.write_csv(out / f"{name}.csv", rows)
    lines = [
        "# Linear layer of N models, forward + backward: modelbatch vs torch",
        "",
        f"device: {ctx['device']}; torch {ctx['torch']}; commit {ctx['commit']}; {ctx['date']}",
        f"sgemm measured in the same run: {sgemm:.1f} GFLOP/s",
        "",
        "| case | input | N | B | I | O | method | ms | GFLOP/s | of sgemm | vs vmap |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['input']} | {r['N']} | {r['B']} | {r['I']} | {r['O']} | "
        f"{r['method']} | {r['ms']} | {r['GFLOP/s']} | {r['fraction_of_sgemm']} | "
        f"{r['speedup_vs_vmap']}x |"
        for r in rows
    ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / name}.csv and .md")


if __name__ == "__main__":
    main()
