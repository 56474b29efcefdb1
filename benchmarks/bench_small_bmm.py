"""``modelbatch::small_bmm`` against ``torch.bmm`` / ``torch.baddbmm`` on the CPU.

The shapes are the GEMMs of the batched linear layer for the small MLPs this
library trains (x [N, M, K] activations, W [N, P, K] weights, g = dL/dy [N, M, P]):

* forward ``x @ W^T (+ b)``: layout NT (``trans_b``); the first layer's input is
  shared by all models (``x.expand(N, M, K)``, batch stride 0);
* input gradient ``g @ W`` (NN): an [M, P] @ [P, K] product;
* weight gradient ``g^T @ x`` (TN, ``trans_a``): a [P, M] @ [M, K] product.

Rows are labelled with the product's own (M, K, P). Methods are timed in
interleaved rounds (medians), so a noisy machine slows all of them alike; the
output buffers come from a tuned glibc heap, as inside ``ModelBatch`` (see
``modelbatch.allocator``; ``--no-tune-malloc`` measures the default heap, where
each call's fresh output page-faults, which costs both methods the same).

Run: ``python benchmarks/bench_small_bmm.py [--threads T] [--quick] [--threshold]``.
``--threshold`` times the sizes around the op's own limits (per-model work
``kMaxWork``, ``kMinWork``, ``kMaxK`` in ``csrc/small_bmm.cpp``), where it hands
over to ``torch.bmm``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H
import modelbatch  # noqa: F401  (loads the ops)
from modelbatch.allocator import tune_cpu_allocator

OP = torch.ops.modelbatch.small_bmm


def layer(n: int, m: int, k: int, p: int, *, shared_x: bool = False, bias: bool = True):
    """(label, args) of the GEMMs of one linear layer: x [M, K] -> y [M, P]."""
    x = torch.randn(m, k).expand(n, m, k) if shared_x else torch.randn(n, m, k)
    w = torch.randn(n, p, k)
    b = torch.randn(n, p)
    g = torch.randn(n, m, p)
    sx = " shared x" if shared_x else ""
    rows = [(f"N={n} ({m},{k},{p}) fwd NT{sx}", (x, w, False, True, None))]
    if bias:
        rows.append((f"N={n} ({m},{k},{p}) fwd NT+bias{sx}", (x, w, False, True, b)))
    if not shared_x:
        rows.append((f"N={n} ({m},{p},{k}) dx NN", (g, w, False, False, None)))
        rows.append((f"N={n} ({p},{m},{k}) dW TN", (g, x, True, False, None)))
    return rows


def plain(n: int, m: int, k: int, p: int, layout: str):
    a = torch.randn(n, k, m) if layout[0] == "T" else torch.randn(n, m, k)
    b = torch.randn(n, p, k) if layout[1] == "T" else torch.randn(n, k, p)
    return (f"N={n} ({m},{k},{p}) {layout}", (a, b, layout[0] == "T", layout[1] == "T", None))


def main_rows():
    rows = []
    rows += layer(1024, 32, 16, 32, shared_x=True)
    rows += layer(1024, 32, 32, 32)
    rows += layer(1024, 32, 32, 4)
    rows += layer(256, 128, 64, 128, bias=False)
    rows += layer(256, 128, 128, 128, bias=False)
    rows += layer(256, 128, 128, 10, bias=False)
    # Narrow heads (the dot-product kernel): x @ W^T with 1-2 outputs.
    rows += [plain(1024, 64, 128, 1, "NT"), plain(256, 256, 64, 2, "NT")]
    return rows


def threshold_rows():
    return [
        plain(1024, 4, 4, 4, "NN"),  # 64 multiply-adds: below kMinWork -> torch.bmm
        plain(1024, 2, 32, 2, "NN"),  # 128: the smallest the kernel takes
        plain(64, 256, 256, 256, "NN"),  # 2^24 = kMaxWork: the largest it takes
        plain(64, 256, 256, 256, "NT"),
        plain(32, 256, 512, 256, "NN"),  # 2^25 -> torch.bmm
        plain(1, 256, 256, 256, "NN"),  # one model: split into row chunks over threads
        plain(8, 32, 8192, 32, "NT"),  # K = kMaxK
        plain(8, 32, 8193, 32, "NT"),  # K > kMaxK -> torch.bmm
    ]


def torch_fn(a, b, ta, tb, bias):
    x = a.transpose(1, 2) if ta else a
    y = b.transpose(1, 2) if tb else b
    if bias is None:
        return lambda: torch.bmm(x, y)
    bb = bias.unsqueeze(1)
    return lambda: torch.baddbmm(bb, x, y)


def flops(a, b, ta, tb):
    n = a.shape[0]
    m = a.shape[2] if ta else a.shape[1]
    k = a.shape[1] if ta else a.shape[2]
    p = b.shape[1] if tb else b.shape[2]
    return 2 * n * m * k * p


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=0, help="torch threads (default: all)")
    ap.add_argument("--quick", action="store_true", help="7 rounds instead of 25")
    ap.add_argument("--repeats", type=int, default=0, help="rounds (overrides --quick)")
    ap.add_argument("--threshold", action="store_true", help="sizes around the op's limits")
    ap.add_argument("--no-tune-malloc", action="store_true", help="keep glibc's default heap")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not args.no_tune_malloc:
        tune_cpu_allocator()
    torch.manual_seed(0)
    repeats = args.repeats or (7 if args.quick else 25)
    rows = threshold_rows() if args.threshold else main_rows()
    print(f"{H.device_name('cpu')}, torch {torch.__version__}, {repeats} rounds (medians)")
    print(
        f"{'case (M, K, P of the product)':38s} {'small_bmm':>10s} {'torch':>8s} "
        f"{'small_bmm':>10s} {'torch':>8s} {'speedup':>7s}"
    )
    print(f"{'':38s} {'ms':>10s} {'ms':>8s} {'GFLOP/s':>10s} {'GFLOP/s':>8s}")
    for label, (a, b, ta, tb, bias) in rows:
        ref = torch_fn(a, b, ta, tb, bias)

        def ours(a=a, b=b, ta=ta, tb=tb, bias=bias):
            return OP(a, b, ta, tb, bias)

        torch.testing.assert_close(ours(), ref(), rtol=1e-4, atol=1e-3)
        work = flops(a, b, ta, tb)
        block = max(1, int(1e8 // work))  # ~1 ms of work per timed call
        t = H.interleaved_times({"ours": ours, "torch": ref}, repeats=repeats, block=block)
        print(
            f"{label:38s} {t['ours'] * 1e3:10.3f} {t['torch'] * 1e3:8.3f} "
            f"{work / t['ours'] / 1e9:10.1f} {work / t['torch'] / 1e9:8.1f} "
            f"{t['torch'] / t['ours']:6.2f}x"
        )


if __name__ == "__main__":
    main()
