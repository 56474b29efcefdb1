"""N recurrent models, forward + backward: ModelBatch against a per-model loop.

* ``modelbatch``: one ``ModelBatch`` of N unmodified ``nn.LSTM`` / ``nn.GRU``
  modules; its vmap batching rule (``modelbatch.batching``) runs per layer one
  input-projection GEMM and one ``modelbatch::rnn_layer`` (per time step one batched
  GEMM and one fused gate kernel for all N models; C++ on CPU, Triton on CUDA).
* ``loop``: the N modules called one after the other, what users do today; on CPU
  each call is oneDNN's fused LSTM / GRU kernel, on CUDA cuDNN's.

Each step: forward of the shared input ``[T, B, I]``, then backward of the output
with a fixed gradient (weights and input projection included). Medians over
interleaved rounds (a noisy machine slows both alike); the ratio is loop time over
modelbatch time in the same run.

Run: ``python benchmarks/bench_rnn.py [--device cuda] [--quick] [--threads T]``.
Writes ``benchmarks/results/<device>/rnn.{csv,md}``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H
import modelbatch as mb

#: (label, module, N, input, hidden, seq, batch)
CASES = [
    ("small LSTM", nn.LSTM, 256, 32, 32, 32, 16),
    ("medium LSTM", nn.LSTM, 64, 128, 128, 32, 64),
    ("small GRU", nn.GRU, 256, 32, 32, 32, 16),
    ("small LSTM, 2 layers bidirectional", "lstm2bi", 128, 32, 32, 32, 16),
]
QUICK = [("tiny LSTM", nn.LSTM, 16, 8, 8, 6, 4)]


class Out(nn.Module):
    """The recurrent module's output sequence only."""

    def __init__(self, rnn: nn.Module) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x):
        return self.rnn(x)[0]


def make(kind, i, h):
    if kind == "lstm2bi":
        return nn.LSTM(i, h, num_layers=2, bidirectional=True)
    return kind(i, h)


def methods(kind, n, i, h, t, b, device):
    torch.manual_seed(0)
    models = [Out(make(kind, i, h)).to(device) for _ in range(n)]
    batch = mb.ModelBatch(models).to(device)
    x = torch.randn(t, b, i, device=device)
    out_features = models[0](x).shape[-1]
    g = torch.randn(t, b, out_features, device=device)
    gb = g.expand(n, *g.shape)

    def batched():
        batch(x).backward(gb)

    def loop():
        for m in models:
            m(x).backward(g)

    return {"modelbatch": batched, "loop": loop}, batch


def main() -> None:
    args, ctx = H.standard_args(__doc__, repeats=7)
    rows = []
    for label, kind, n, i, h, t, b in QUICK if args.quick else CASES:
        fns, batch = methods(kind, n, i, h, t, b, args.device)
        times = H.interleaved_times(fns, repeats=args.repeats, warmup=2, device=args.device)
        assert batch.forward_path == "vmap"
        speedup = times["loop"] / times["modelbatch"]
        rows.append(
            {
                "case": label,
                "N": n,
                "input": i,
                "hidden": h,
                "seq": t,
                "batch": b,
                "modelbatch_ms": round(times["modelbatch"] * 1e3, 2),
                "loop_ms": round(times["loop"] * 1e3, 2),
                "speedup_vs_loop": round(speedup, 2),
                **ctx,
            }
        )
        print(
            f"{label} N={n} I={i} H={h} T={t} B={b}: "
            f"modelbatch {times['modelbatch'] * 1e3:.1f} ms, "
            f"loop {times['loop'] * 1e3:.1f} ms, {speedup:.2f}x",
            flush=True,
        )
    out = H.results_dir(args.device)
    name = "rnn_quick" if args.quick else "rnn"
    H.write_csv(out / f"{name}.csv", rows)
    lines = [
        "# Recurrent models, forward + backward: ModelBatch vs a per-model loop",
        "",
        f"device: {ctx['device']}; torch {ctx['torch']}; commit {ctx['commit']}; {ctx['date']}",
        "",
        "| case | N | input | hidden | seq | batch | modelbatch ms | loop ms | speed-up |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['case']} | {r['N']} | {r['input']} | {r['hidden']} | {r['seq']} | {r['batch']} | "
        f"{r['modelbatch_ms']} | {r['loop_ms']} | {r['speedup_vs_loop']}x |"
        for r in rows
    ]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {out / name}.csv and .md")


if __name__ == "__main__":
    main()
