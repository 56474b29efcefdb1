"""Training-step suite: four workloads, N models, five ways to train them, one run.

    python benchmarks/suite.py --workload mlp cnn lstm transformer --models 1 16 64 256 1024
                               [--amp] [--device cpu|cuda] [--quick | --tiny] [--max-n]
                               [--mem-limit-gb G] [--methods ...] [--out DIR]
    python benchmarks/plot.py benchmarks/results/<device>/suite.csv    # the figures

Workloads (random data, the same batch for every model, cross-entropy):
  mlp          the "standard" MLP of bench.py: 64-128-128-10, batch 128
  cnn          a ResNet-8: conv3x3(3->16)+BN+ReLU, one BasicBlock per stage at 16/32/64
               channels (stride 2 between stages, 1x1 conv+BN shortcuts), global average
               pool, linear 10 (78,042 parameters); BatchNorm running statistics per
               model; CIFAR-shaped inputs [B, 3, 32, 32], batch 32 (128 on CUDA)
  lstm         embedding 1000x32, 1-layer LSTM hidden 64, linear 5 on the last step;
               token sequences of 32, batch 16
  transformer  2-layer nn.TransformerEncoder (d_model 64, 4 heads, feed-forward 128,
               dropout 0, batch_first), mean-pool, linear 10; inputs [16, 16, 64]

Methods, each one training step of all N models (forward, per-model loss, backward,
Adam step), timed as the median of interleaved rounds after warm-up
(``_harness.interleaved_times``: a slow spell of the machine hits every method alike):
  sequential   N plain modules, each with its own torch.optim.Adam and learning rate,
               stepped one after another (Adam foreach or fused, whichever steps one
               model faster). Independent models cost N times one, so it runs
               min(N, --seq-cap=16) models and scales the time by N / that.
  torchfunc    the torch.func ensembling recipe: stack_module_state +
               vmap(functional_call) with ONE torch.optim.Adam over the stacked tensors
               (fused or foreach, whichever steps them faster); one learning rate for
               all models, since that recipe cannot give each its own.
  concurrent   one process per model, up to the core count (CUDA: the GPU count;
               --procs overrides): P = min(N, cores) spawned workers with one torch
               thread each, each training its N/P models one after another like
               sequential, all P at once behind a barrier; time = from the barrier's
               release to the end of the last worker (the workers' monotonic clocks;
               the pipe messages that start a step and collect it are left out). Each
               worker runs at most --seq-cap/P models; time scaled as for sequential.
  modelbatch   modelbatch.ModelBatch + modelbatch.optim.Adam (an lr per model),
               compute_loss, backward, step: the eager path.
  trainstep    modelbatch.TrainStep(batch, opt, F.cross_entropy): the same step as one
               torch.compile graph. Compilation happens in warm-up and is reported
               apart (compile_s = first call - median step).
With --amp: CUDA float16 autocast with a per-model modelbatch.amp.GradScaler for
modelbatch and trainstep and torch.amp.GradScaler for the baselines (one per model
for sequential/concurrent, one for the stacked tensors of torchfunc); on the CPU
bfloat16 autocast without a scaler.

Reported per (workload, N, method): step time, throughput (samples/s over all
models), peak memory, on CUDA the GPU utilisation while the step repeats (pynvml,
else nvidia-smi, else omitted with a note), the ratios to sequential and to
torchfunc, and for failures (TrainStep cannot trace a model, out of memory, ...) the
reason: a failed method is a row, never missing.

Peak memory. CUDA: torch.cuda.max_memory_allocated above what was allocated before
the method was built. CPU: torch keeps no CPU allocator statistics, so the process's
resident-set high-water mark (VmHWM, reset through /proc/self/clear_refs) above its
resident set before the method was built, with free heap returned (malloc_trim)
before both readings. Both are taken over one step after warm-up (what the build
keeps counts; compile-time transients do not). sequential and concurrent run only
some of the N models; their figure is that measurement plus the exact size of the
missing models' state (parameters, gradients, two Adam moments, buffers); for
concurrent, the sum over the workers. On the CPU the run caps its own address space
at its size plus 85% of the memory available before each method, so a method that
does not fit fails with an allocation error (reported as out of memory) instead of
the kernel's OOM killer ending the whole run.

Max-N search (--max-n; methods --max-n-methods, default modelbatch and trainstep):
the largest N whose step fits in memory. From --max-n-start (64), N doubles until a
step fails, then bisects between the last success and the first failure until they
are within 5%. On CUDA a probe that raises torch.cuda.OutOfMemoryError failed
(--mem-limit-gb caps the GPU with set_per_process_memory_fraction); on the CPU each
probe runs in its own process whose address space is capped at its size after
start-up plus --mem-limit-gb (default 4; RLIMIT_AS) and fails if an allocation fails
or its peak resident set grows by more than the cap. The address space runs ahead of
the resident set (heap fragmentation, malloc arenas) and TrainStep compiles under the
cap, so the CPU figure is a conservative bound for that cap.

Output: <out>/<stem>.csv (one row per workload, N and method, plus one per max-N
search) and <out>/<stem>.md, stem = suite[_tiny|_quick][_amp][_maxn]; --out defaults
to benchmarks/results/<device>/. Every row records device, torch version, thread
count and commit.

--quick: N in 1 16 64 256, 3 interleaved rounds. --tiny (the smoke test): smaller
batches and inputs, 2 rounds, TrainStep compiled with the aot_eager backend (the same
trace, without inductor's code generation); for checking the script, not for figures.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _harness as H
import modelbatch as mb

METHODS = ("sequential", "torchfunc", "concurrent", "modelbatch", "trainstep")
MAX_N_METHODS = ("modelbatch", "trainstep", "torchfunc")
MB = 1 << 20


# ------------------------------------------------------------------------ models
class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)
        )

    def forward(self, x):  # x: [B, 64]
        return self.net(x)


class BasicBlock(nn.Module):
    """ResNet's two-conv block; a 1x1 conv + BN shortcut where the shape changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        # No conv biases: the BatchNorm after each conv cancels them.
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet8(nn.Module):
    """A CIFAR ResNet-8 (78,042 parameters): stem, three one-block stages, pool, head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(3, 16, 3, 1, 1, bias=False), nn.BatchNorm2d(16), nn.ReLU()
        )
        self.stages = nn.Sequential(
            BasicBlock(16, 16, 1), BasicBlock(16, 32, 2), BasicBlock(32, 64, 2)
        )
        self.head = nn.Linear(64, 10)

    def forward(self, x):  # x: [B, 3, H, W]
        return self.head(self.stages(self.stem(x)).mean((2, 3)))


class LSTMClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(1000, 32)
        self.lstm = nn.LSTM(32, 64, batch_first=True)
        self.head = nn.Linear(64, 5)

    def forward(self, tokens):  # tokens: [B, T]
        out, _ = self.lstm(self.emb(tokens))
        return self.head(out[:, -1])


class TransformerClassifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        layer = nn.TransformerEncoderLayer(
            64, 4, dim_feedforward=128, dropout=0.0, batch_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(64, 10)

    def forward(self, x):  # x: [B, T, 64]
        return self.head(self.encoder(x).mean(1))


@dataclass(frozen=True)
class Workload:
    name: str
    make: Callable[[], nn.Module]
    describe: str
    classes: int
    batch: int  # CPU
    cuda_batch: int
    tiny_batch: int
    inputs: Callable[[int, bool, torch.Generator], torch.Tensor]  # (batch, tiny, gen)


def _features(b: int, tiny: bool, g: torch.Generator) -> torch.Tensor:
    return torch.randn(b, 64, generator=g)


def _images(b: int, tiny: bool, g: torch.Generator) -> torch.Tensor:
    side = 16 if tiny else 32
    return torch.randn(b, 3, side, side, generator=g)


def _tokens(b: int, tiny: bool, g: torch.Generator) -> torch.Tensor:
    return torch.randint(0, 1000, (b, 8 if tiny else 32), generator=g)


def _sequences(b: int, tiny: bool, g: torch.Generator) -> torch.Tensor:
    return torch.randn(b, 4 if tiny else 16, 64, generator=g)


WORKLOADS = {
    w.name: w
    for w in (
        Workload("mlp", MLP, "MLP 64-128-128-10", 10, 128, 128, 8, _features),
        Workload("cnn", ResNet8, "ResNet-8 on [B, 3, 32, 32]", 10, 32, 128, 2, _images),
        Workload(
            "lstm", LSTMClassifier, "embedding 1000x32, LSTM 64, linear 5, T=32", 5, 16, 16, 2,
            _tokens,
        ),
        Workload(
            "transformer", TransformerClassifier,
            "2-layer TransformerEncoder d64 h4 ff128, T=16", 10, 16, 16, 2, _sequences,
        ),
    )
}  # fmt: skip


def params_per_model(w: Workload) -> int:
    return sum(p.numel() for p in w.make().parameters())


def state_bytes(model: nn.Module) -> int:
    """Bytes one plainly trained model keeps between steps: parameters, gradients and
    Adam's two moments (4 tensors the size of each parameter), and its buffers."""
    p = sum(t.numel() * t.element_size() for t in model.parameters())
    b = sum(t.numel() * t.element_size() for t in model.buffers())
    return 4 * p + b


# ------------------------------------------------------------------------ config
@dataclass
class Config:
    device: str = "cpu"
    amp: bool = False
    tiny: bool = False
    quick: bool = False
    repeats: int = 7
    warmup: int = 1
    seq_cap: int = 16
    procs: int | None = None
    backend: str = "inductor"
    util_window: float = 2.0
    batch: int | None = None
    threads: int | None = None

    def batch_size(self, w: Workload) -> int:
        if self.batch:
            return self.batch
        if self.tiny:
            return w.tiny_batch
        return w.cuda_batch if self.device.startswith("cuda") else w.batch

    @property
    def device_type(self) -> str:
        return torch.device(self.device).type

    @property
    def scaler(self) -> bool:
        """A loss scaler: float16 autocast on CUDA needs one; bfloat16 on the CPU not."""
        return self.amp and self.device_type == "cuda"

    @property
    def amp_dtype(self) -> torch.dtype | None:
        if not self.amp:
            return None
        return torch.float16 if self.device_type == "cuda" else torch.bfloat16

    def autocast(self, device: str | None = None):
        if not self.amp:
            return contextlib.nullcontext()
        return torch.autocast(torch.device(device or self.device).type, dtype=self.amp_dtype)

    def amp_label(self) -> str:
        if not self.amp:
            return "fp32"
        return "fp16+GradScaler" if self.scaler else "bf16"


def data(w: Workload, cfg: Config, device: str | None = None):
    """The fixed batch every model of every method trains on: (inputs, targets)."""
    g = torch.Generator().manual_seed(0)
    b = cfg.batch_size(w)
    x = w.inputs(b, cfg.tiny, g)
    y = torch.randint(0, w.classes, (b,), generator=g)
    dev = device or cfg.device
    return x.to(dev), y.to(dev)


def lrs(n: int) -> torch.Tensor:
    """A different learning rate per model, as a sweep would have."""
    return torch.logspace(-4, -2, n) if n > 1 else torch.tensor([1e-3])


def reason(err: BaseException) -> str:
    """One line saying why a method failed."""
    msg = " ".join(str(err).split())
    if len(msg) > 300:
        msg = msg[:297] + "..."
    return f"{type(err).__name__}: {msg}" if msg else type(err).__name__


def is_oom(err: BaseException) -> bool:
    if isinstance(err, MemoryError | torch.cuda.OutOfMemoryError):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and (
        "out of memory" in text or "can't allocate memory" in text or "bad_alloc" in text
    )


def failure(err: BaseException) -> str:
    """The reason of a failed method, out-of-memory errors named as such."""
    return ("out of memory: " if is_oom(err) else "") + reason(err)


# ----------------------------------------------------------------------- methods
@dataclass
class Built:
    """One method, ready to step: ``step()`` trains ``measured`` models; times a scale of
    ``scale`` give the time of all N; ``mem_extra`` bytes are what the unmeasured
    models would add; ``mem_peak`` is set when the method measures its own memory."""

    step: Callable[[], object]
    scale: float = 1.0
    info: dict = field(default_factory=dict)
    mem_extra: int = 0
    mem_peak: int | None = None
    mem_method: str | None = None
    close: Callable[[], None] = lambda: None
    devices: list[int] = field(default_factory=list)
    self_timed: bool = False  # step() returns its own seconds (work in other processes)


def adam_kwargs(variant: str) -> dict:
    return {"fused": True} if variant == "fused" else {"foreach": True}


def faster_adam(params: list[torch.Tensor], device: str) -> str:
    """'fused' or 'foreach': whichever torch.optim.Adam steps copies of ``params`` faster
    (random gradients). The forward and backward do not depend on the choice, so the
    optimizer step alone decides."""
    fns = {}
    for variant in ("foreach", "fused"):
        copies = [p.detach().clone().requires_grad_() for p in params]
        for c in copies:
            c.grad = torch.randn_like(c)
        fns[variant] = torch.optim.Adam(copies, lr=1e-3, **adam_kwargs(variant)).step
    t = H.interleaved_times(fns, repeats=5, warmup=2, device=device, block=3)
    return min(t, key=t.get)


def plain_trainer(w: Workload, cfg: Config, k: int, device: str, lr_values, variant: str):
    """k plain models, each with its own Adam (and GradScaler under CUDA AMP); returns
    a function that trains each of them for one step, one after another."""
    models = [w.make().to(device) for _ in range(k)]
    opts = [
        torch.optim.Adam(m.parameters(), lr=float(lr), **adam_kwargs(variant))
        for m, lr in zip(models, lr_values)
    ]
    scalers = [
        torch.amp.GradScaler(torch.device(device).type) if cfg.scaler else None for _ in models
    ]
    x, y = data(w, cfg, device)

    def round_() -> None:
        for m, o, s in zip(models, opts, scalers):
            o.zero_grad()
            with cfg.autocast(device):
                loss = F.cross_entropy(m(x), y)
            if s is not None:
                s.scale(loss).backward()
                s.step(o)
                s.update()
            else:
                loss.backward()
                o.step()

    return round_, models


def build_sequential(w: Workload, n: int, cfg: Config, pool) -> Built:
    k = min(n, cfg.seq_cap)
    variant = faster_adam(list(w.make().to(cfg.device).parameters()), cfg.device)
    round_, models = plain_trainer(w, cfg, k, cfg.device, lrs(n)[:k], variant)
    return Built(
        round_,
        scale=n / k,
        info={"variant": variant, "measured_models": k},
        mem_extra=(n - k) * state_bytes(models[0]),
    )


def build_torchfunc(w: Workload, n: int, cfg: Config, pool) -> Built:
    models = [w.make() for _ in range(n)]
    params, buffers = stack_module_state(models)
    params = {k: v.detach().to(cfg.device).requires_grad_() for k, v in params.items()}
    buffers = {k: v.to(cfg.device) for k, v in buffers.items()}
    base = copy.deepcopy(models[0]).to("meta")
    del models  # the recipe keeps only the stacked state
    variant = faster_adam(list(params.values()), cfg.device)
    opt = torch.optim.Adam(list(params.values()), lr=1e-3, **adam_kwargs(variant))
    scaler = torch.amp.GradScaler(cfg.device_type) if cfg.scaler else None
    x, y = data(w, cfg)

    def one(p, b, xx):
        return functional_call(base, (p, b), (xx,))

    forward = vmap(one, in_dims=(0, 0, None))
    losses = vmap(F.cross_entropy, in_dims=(0, None))

    def step() -> None:
        opt.zero_grad()
        with cfg.autocast():
            loss = losses(forward(params, buffers, x), y).sum()
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        else:
            loss.backward()
            opt.step()

    return Built(step, info={"variant": variant})


def _modelbatch(w: Workload, n: int, cfg: Config):
    torch.manual_seed(0)
    batch = mb.ModelBatch([w.make() for _ in range(n)]).to(cfg.device)
    opt = mb.optim.Adam(batch, lr=lrs(n))
    scaler = mb.amp.GradScaler(batch) if cfg.scaler else None
    return batch, opt, scaler


def build_modelbatch(w: Workload, n: int, cfg: Config, pool) -> Built:
    batch, opt, scaler = _modelbatch(w, n, cfg)
    x, y = data(w, cfg)

    def step() -> None:
        opt.zero_grad()
        with cfg.autocast():
            out = batch(x)
            per_model = batch.compute_loss(out, y, F.cross_entropy, reduction="none")
        if scaler is not None:
            scaler.scale(per_model).backward()
            scaler.step(opt)
            scaler.update()
        else:
            per_model.sum().backward()
            opt.step()

    return Built(step, info={"batch": batch})


def build_trainstep(w: Workload, n: int, cfg: Config, pool) -> Built:
    # One TrainStep per (workload, N) in this process: without a reset, dynamo's
    # per-code-object recompile limit would be reached after a few cases.
    torch._dynamo.reset()
    batch, opt, scaler = _modelbatch(w, n, cfg)
    kwargs = None if cfg.backend == "inductor" else {"backend": cfg.backend}
    step = mb.TrainStep(
        batch, opt, F.cross_entropy, scaler=scaler, autocast=cfg.amp_dtype, compile_kwargs=kwargs
    )
    x, y = data(w, cfg)
    return Built(lambda: step(x, y), info={"batch": batch})


def build_concurrent(w: Workload, n: int, cfg: Config, pool: ConcurrentPool) -> Built:
    p = min(n, pool.size)
    m = math.ceil(n / p)  # models of the busiest worker: it sets the wall time
    k = min(m, max(1, cfg.seq_cap // p))
    lr_all = lrs(n).tolist()
    specs = [
        {"workload": w.name, "cfg": asdict(cfg), "k": k, "lrs": lr_all[r * m : r * m + k]}
        for r in range(p)
    ]
    replies = pool.call(p, "build", specs)
    one_state = state_bytes(w.make())
    peaks = [r["peak"] for r in replies]

    def step() -> float:
        """All P workers' round: seconds from the barrier's release to the last end."""
        spans = pool.call(p, "step", [p] * p)
        return max(t1 for _, t1 in spans) - min(t0 for t0, _ in spans)

    return Built(
        step,
        scale=m / k,
        self_timed=True,
        info={"variant": replies[0]["variant"], "measured_models": k * p, "procs": p},
        mem_extra=p * (m - k) * one_state,
        mem_peak=None if None in peaks else sum(peaks),
        mem_method=replies[0]["mem_method"],
        close=lambda: pool.call(p, "free", [None] * p),
        devices=sorted({pool.device_index(r) for r in range(p)}),
    )


def warm_process(cfg: Config, device: str, batched: bool, compiler: bool = False) -> None:
    """Run every code path once on a throwaway model, before anything is measured: the
    first calls load libraries and build caches (100-300 MB of resident memory) that
    would otherwise be charged to whichever method happened to run first."""
    small = dataclasses.replace(cfg, tiny=True, batch=4, device=device)
    w = WORKLOADS["mlp"]
    for variant in ("foreach", "fused"):
        round_, _ = plain_trainer(w, small, 1, device, [1e-3], variant)
        round_()
        round_()
    if batched:
        for build in (build_torchfunc, build_modelbatch):
            b = build(w, 2, small, None)
            b.step()
            b.step()
    if compiler:
        # TrainStep's compiler: imported here, run only by the method.
        import torch._dynamo
        import torch._inductor.compile_fx  # noqa: F401
    H.release_memory(device)


BUILDERS = {
    "sequential": build_sequential,
    "torchfunc": build_torchfunc,
    "concurrent": build_concurrent,
    "modelbatch": build_modelbatch,
    "trainstep": build_trainstep,
}


# ------------------------------------------------------------- concurrent workers
def _worker_main(rank: int, conn, barriers, device: str) -> None:
    """A concurrent-method worker: builds plain models on request, then trains them one
    step per "step" message, starting together with the other workers (barrier)."""
    torch.set_num_threads(1)
    mb.allocator.tune_cpu_allocator()  # the same heap settings as the main process
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    round_ = None
    warmed = False
    while True:
        cmd, arg = conn.recv()
        try:
            if cmd == "build":
                round_ = None
                cfg = Config(**arg["cfg"])
                w = WORKLOADS[arg["workload"]]
                if not warmed:
                    warm_process(cfg, device, batched=False)
                    warmed = True
                mem = H.PeakMemory(device).start()
                variant = faster_adam(list(w.make().to(device).parameters()), device)
                round_, _ = plain_trainer(w, cfg, arg["k"], device, arg["lrs"], variant)
                round_()
                H.sync(device)
                mem.restart_peak()
                round_()
                H.sync(device)
                out = {"peak": mem.peak_bytes(), "mem_method": mem.method, "variant": variant}
                conn.send(("ok", out))
            elif cmd == "step":
                barriers[arg - 1].wait(timeout=3600)
                # perf_counter is CLOCK_MONOTONIC: one clock for every process.
                t0 = time.perf_counter()
                round_()
                H.sync(device)
                conn.send(("ok", (t0, time.perf_counter())))
            elif cmd == "free":
                round_ = None
                H.release_memory(device)
                conn.send(("ok", None))
            elif cmd == "stop":
                conn.send(("ok", None))
                return
        except Exception as err:
            round_ = None
            conn.send(("error", f"worker {rank}: {reason(err)}"))


class ConcurrentPool:
    """``size`` spawned worker processes, kept for the whole run (starting one costs
    seconds); a case with P < size models uses the first P. One barrier per P."""

    def __init__(self, size: int, device: str) -> None:
        self.size = size
        self.device = device
        ctx = torch.multiprocessing.get_context("spawn")
        self.barriers = [ctx.Barrier(p) for p in range(1, size + 1)]
        self.conns, self.procs = [], []
        # Set before the children start, so their OpenMP pools are one thread from the
        # beginning (set_num_threads(1) in the worker as well).
        saved = os.environ.get("OMP_NUM_THREADS")
        os.environ["OMP_NUM_THREADS"] = "1"
        try:
            for r in range(size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker_main,
                    args=(r, child, self.barriers, self.worker_device(r)),
                    daemon=True,
                )
                proc.start()
                child.close()
                self.conns.append(parent)
                self.procs.append(proc)
        finally:
            if saved is None:
                os.environ.pop("OMP_NUM_THREADS", None)
            else:
                os.environ["OMP_NUM_THREADS"] = saved

    def worker_device(self, r: int) -> str:
        if torch.device(self.device).type == "cuda":
            return f"cuda:{r % torch.cuda.device_count()}"
        return self.device

    def device_index(self, r: int) -> int:
        return torch.device(self.worker_device(r)).index or 0

    def call(self, p: int, cmd: str, args: list) -> list:
        """Send ``cmd`` to workers 0..p-1 (all first, so they run at once) and collect
        their replies; raise with every worker's error if any failed."""
        for r in range(p):
            self.conns[r].send((cmd, args[r]))
        out, errors = [], []
        for r in range(p):
            if not self.conns[r].poll(3600):
                errors.append(f"worker {r}: no reply within an hour")
                continue
            try:
                status, value = self.conns[r].recv()
            except EOFError:
                status, value = "error", f"worker {r} died (exit code {self.procs[r].exitcode})"
            if status == "ok":
                out.append(value)
            else:
                errors.append(value)
        if errors:
            raise RuntimeError("; ".join(errors))
        return out

    def close(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            with contextlib.suppress(OSError, EOFError, BrokenPipeError):
                conn.send(("stop", None))
                if conn.poll(30):
                    conn.recv()
            proc.join(timeout=30)
            if proc.is_alive():
                proc.terminate()


class LazyPool:
    """The worker pool, started on first use and restarted after a failure (a worker
    that died or a broken barrier leaves the pool unusable)."""

    def __init__(self, size: int, device: str) -> None:
        self.size, self.device, self.pool = size, device, None

    def get(self) -> ConcurrentPool:
        if self.pool is None:
            self.pool = ConcurrentPool(self.size, self.device)
        return self.pool

    def discard(self) -> None:
        if self.pool is not None:
            self.pool.close()
            self.pool = None

    close = discard


def default_procs(device: str) -> int:
    if torch.device(device).type == "cuda":
        return max(torch.cuda.device_count(), 1)
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# -------------------------------------------------------------------- one case
def gpu_utilisation(fn: Callable[[], object], devices: list[int], cfg: Config):
    """Mean GPU utilisation (%) while ``fn`` repeats for ``cfg.util_window`` seconds."""
    sampler = H.GpuUtilSampler(devices)
    if not sampler.available:
        return None, sampler.note
    fn()
    H.sync(cfg.device)
    with sampler:
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < cfg.util_window:
            fn()
        H.sync(cfg.device)
    return sampler.mean, sampler.note


def guard_cpu_memory(fraction: float = 0.85) -> None:
    """Cap this process's address space at its size now plus ``fraction`` of the
    memory still available. Without a cap, a method that needs more than the machine
    has is killed by the kernel's OOM killer, taking the whole run with it; with it,
    the allocation fails and raises, and the method is reported as out of memory
    (the CPU analogue of torch.cuda.OutOfMemoryError). Re-set before every method, as
    the memory of the methods already built and of other processes changes."""
    avail = H.available_memory_bytes()
    if avail is not None:
        H.limit_address_space(int(fraction * avail))


def run_case(w: Workload, n: int, cfg: Config, methods, pools: LazyPool) -> dict[str, dict]:
    """Build, warm up, measure the memory of, and time every method on N models of w.

    Returns per method a dict with status ("ok" / "failed"), reason, seconds per step
    of all N models, peak bytes, compile seconds, GPU utilisation and details.
    """
    res: dict[str, dict] = {}
    built: dict[str, Built] = {}
    for m in methods:
        mem = H.PeakMemory(cfg.device)
        try:
            mem.start()
            if cfg.device_type == "cpu":
                guard_cpu_memory()
            pool = pools.get() if m == "concurrent" else None
            b = BUILDERS[m](w, n, cfg, pool)
            t0 = time.perf_counter()
            b.step()  # warm-up: first-call set-up and TrainStep's compilation
            H.sync(cfg.device)
            first = time.perf_counter() - t0
            mem.restart_peak()  # the peak of a steady step, over the baseline
            b.step()
            H.sync(cfg.device)
            peak = b.mem_peak if m == "concurrent" else mem.peak_bytes()
            built[m] = b
            res[m] = {
                "status": "ok",
                "first_s": first,
                "peak": None if peak is None else peak + b.mem_extra,
                "mem_method": (b.mem_method or mem.method)
                + (" + state of unmeasured models" if b.mem_extra else ""),
            }
        except Exception as err:
            res[m] = {"status": "failed", "reason": failure(err)}
            if m == "concurrent":
                pools.discard()
            # The exception's frames (and their tensors) are gone once we leave here.
        finally:
            b = None
            H.release_memory(cfg.device)

    errors: dict[str, str] = {}

    def guarded(m: str, fn: Callable[[], object]) -> Callable[[], object]:
        def call() -> object:
            if m in errors:
                return None
            try:
                return fn()
            except Exception as err:
                errors[m] = failure(err)
                return None

        return call

    fns = {m: guarded(m, b.step) for m, b in built.items()}
    times = H.interleaved_times(
        fns,
        repeats=cfg.repeats,
        warmup=cfg.warmup,
        device=cfg.device,
        self_timed={m for m, b in built.items() if b.self_timed},
    )
    for m, b in built.items():
        r = res[m]
        if m in errors:
            res[m] = {"status": "failed", "reason": errors[m]}
            continue
        r["seconds"] = times[m] * b.scale
        if m == "trainstep":
            r["compile_s"] = max(r["first_s"] - times[m], 0.0)
        r.update({k: v for k, v in b.info.items() if k != "batch"})
        if "batch" in b.info:
            r["forward_path"] = b.info["batch"].forward_path
        if cfg.device_type == "cuda" and cfg.util_window > 0:
            util, note = gpu_utilisation(
                fns[m], b.devices or [torch.device(cfg.device).index or 0], cfg
            )
            if m in errors:
                note = f"utilisation run failed: {errors[m]}"
            r["gpu_util"], r["gpu_util_note"] = util, note
    if "concurrent" in errors:
        pools.discard()  # a worker died or the barrier broke: start afresh next time
    for m, b in built.items():
        try:
            b.close()
        except Exception:
            if m == "concurrent":
                pools.discard()
    built.clear()
    if "trainstep" in methods:
        # Dynamo's cache holds the compiled step and, through its guards, the
        # TrainStep and its models: without a reset they would stay alive into the
        # next case.
        torch._dynamo.reset()
    H.release_memory(cfg.device)
    return res


def case_rows(w: Workload, n: int, cfg: Config, res: dict[str, dict], ctx: dict) -> list[dict]:
    batch = cfg.batch_size(w)
    t_seq = res.get("sequential", {}).get("seconds")
    t_tf = res.get("torchfunc", {}).get("seconds")
    rows = []
    for m, r in res.items():
        sec = r.get("seconds")
        ok = r["status"] == "ok"
        row = {
            "kind": "step",
            "workload": w.name,
            "N": n,
            "method": m,
            "status": r["status"],
            "reason": r.get("reason", ""),
            "step_ms": round(sec * 1e3, 4) if ok else "",
            "samples_per_s": round(n * batch / sec, 1) if ok else "",
            "peak_mem_mb": round(r["peak"] / MB, 2) if ok and r.get("peak") is not None else "",
            "mem_method": r.get("mem_method", "") if ok else "",
            "speedup_vs_sequential": round(t_seq / sec, 3) if ok and t_seq else "",
            "speedup_vs_torchfunc": round(t_tf / sec, 3) if ok and t_tf else "",
            "compile_s": round(r["compile_s"], 2) if "compile_s" in r else "",
            "gpu_util_pct": "" if r.get("gpu_util") is None else round(r["gpu_util"], 1),
            "gpu_util_note": r.get("gpu_util_note", ""),
            "variant": r.get("variant", ""),
            "measured_models": r.get("measured_models", n if ok else ""),
            "procs": r.get("procs", ""),
            "forward_path": r.get("forward_path", ""),
            "per_model_lr": "no" if m == "torchfunc" else "yes",
            "params_per_model": params_per_model(w),
            "batch": batch,
            "amp": cfg.amp_label(),
            "repeats": cfg.repeats,
            "mem_limit_gb": "",
            "max_n_probes": "",
            **ctx,
        }
        rows.append(row)
    return rows


def print_case(w: Workload, n: int, rows: list[dict]) -> None:
    parts = []
    for r in rows:
        if r["status"] != "ok":
            parts.append(f"{r['method']} FAILED ({r['reason'][:80]})")
            continue
        s = f"{r['method']} {r['step_ms']:.2f} ms"
        if r["speedup_vs_sequential"] != "":
            s += f" x{r['speedup_vs_sequential']:.2f}seq"
        if r["peak_mem_mb"] != "":
            s += f" {r['peak_mem_mb']:.0f}MB"
        if r["compile_s"] != "":
            s += f" (compile {r['compile_s']:.1f} s)"
        parts.append(s)
    print(f"{w.name:11s} N={n:5d}  " + " | ".join(parts), flush=True)


# ----------------------------------------------------------------------- max-N
def probe_once(spec: dict) -> dict:
    """One max-N probe in this process: build the method on N models, run two steps,
    report whether it fitted and its peak memory. On the CPU the caller has capped
    the address space; here the resident-set growth is checked against the cap."""
    cfg = Config(**spec["cfg"])
    w = WORKLOADS[spec["workload"]]
    n, cap = spec["n"], spec.get("cap_bytes")
    mem = H.PeakMemory(cfg.device).start()
    b = None
    try:
        b = BUILDERS[spec["method"]](w, n, cfg, None)
        b.step()
        H.sync(cfg.device)
        mem.restart_peak()
        b.step()
        H.sync(cfg.device)
        peak = mem.peak_bytes()
    except Exception as err:
        return {"ok": False, "oom": is_oom(err), "reason": reason(err)}
    finally:
        b = None
        H.release_memory(cfg.device)
    if cap and peak is not None and mem.method == "rss_high_water_mark" and peak > cap:
        return {"ok": False, "oom": True, "reason": f"peak RSS {peak / MB:.0f} MB > cap"}
    return {"ok": True, "peak": peak}


def probe_main(spec: dict) -> None:
    """The entry of a CPU probe process (``suite.py --probe SPEC``)."""
    cfg = Config(**spec["cfg"])
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    mb.allocator.tune_cpu_allocator()
    # Start-up allocations (thread pools, libraries, first-call caches) before the
    # cap, so the cap measures the method.
    warm_process(cfg, cfg.device, batched=True, compiler=spec["method"] == "trainstep")
    if spec.get("cap_bytes"):
        H.limit_address_space(spec["cap_bytes"])
    try:
        out = probe_once(spec)
    except BaseException as err:  # MemoryError while reporting, etc.
        out = {"ok": False, "oom": True, "reason": reason(err)}
    print("PROBE " + json.dumps(out), flush=True)


def probe(w: Workload, method: str, n: int, cfg: Config, cap_bytes: int | None, timeout: float):
    spec = {
        "workload": w.name,
        "method": method,
        "n": n,
        "cfg": asdict(cfg),
        "cap_bytes": cap_bytes,
    }
    if cfg.device_type == "cuda":
        return probe_once(spec)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--probe", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {
            "ok": False,
            "oom": False,
            "timeout": True,
            "reason": f"probe timed out ({timeout:.0f} s)",
        }
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("PROBE "):
            return json.loads(line[len("PROBE ") :])
    # No result: the process died, most likely of an allocation failing where nothing
    # could raise (C++ threads, the interpreter itself).
    tail = (proc.stderr.strip().splitlines() or [""])[-1][:200]
    return {
        "ok": False,
        "oom": True,
        "reason": f"probe process died (rc={proc.returncode}): {tail}",
    }


def max_n_search(w: Workload, method: str, cfg: Config, args) -> dict:
    """The largest N whose step of ``method`` fits: doubling from ``--max-n-start``
    until a failure, then bisection to within ``--max-n-tol`` (5%). Returns max_n, the probes made
    (N -> ok), the peak at max_n and a status/reason."""
    cap = int(args.mem_limit_gb * (1 << 30)) if args.mem_limit_gb else None
    probes: list[tuple[int, bool, str]] = []
    peaks: dict[int, int | None] = {}

    def run(n: int) -> bool | None:
        """True: fits; False: out of memory; None: failed otherwise (search stops)."""
        r = probe(w, method, n, cfg, cap, args.probe_timeout)
        if r["ok"]:
            probes.append((n, True, ""))
            peaks[n] = r.get("peak")
            return True
        probes.append((n, False, r["reason"]))
        return False if r.get("oom") else None

    status, note = "ok", ""
    lo, hi, n = 0, None, args.max_n_start
    while n <= args.max_n_limit:
        ok = run(n)
        if ok is None:
            status, note = "failed", probes[-1][2]
            break
        if not ok:
            hi = n
            break
        lo, n = n, n * 2
    else:
        note = f"every probe up to the limit {args.max_n_limit} fitted: max N >= {lo}"
    if status == "ok" and hi is not None and lo == 0:
        n = hi // 2  # the start failed: halve down to a fit
        while n >= 1:
            ok = run(n)
            if ok is None:
                status, note = "failed", probes[-1][2]
                break
            if ok:
                lo = n
                break
            hi, n = n, n // 2
        if status == "ok" and lo == 0:
            note = "even N=1 does not fit"
    while status == "ok" and hi is not None and lo > 0 and hi - lo > max(1, args.max_n_tol * lo):
        mid = (lo + hi) // 2
        ok = run(mid)
        if ok is None:
            status, note = "failed", probes[-1][2]
            break
        lo, hi = (mid, hi) if ok else (lo, mid)
    first_fail = next((r for n_, ok, r in probes if not ok and n_ == hi), "")
    return {
        "max_n": lo,
        "first_failure": hi,
        "status": status,
        "reason": note or (f"N={hi}: {first_fail}" if hi else ""),
        "probes": probes,
        "peak": peaks.get(lo),
        "cap": cap,
    }


def max_n_row(w: Workload, method: str, cfg: Config, r: dict, ctx: dict) -> dict:
    return {
        "kind": "max_n",
        "workload": w.name,
        "N": r["max_n"],
        "method": method,
        "status": r["status"],
        "reason": r["reason"],
        "peak_mem_mb": "" if r["peak"] is None else round(r["peak"] / MB, 2),
        "mem_limit_gb": "" if r["cap"] is None else round(r["cap"] / (1 << 30), 3),
        "max_n_probes": " ".join(f"{n}:{'ok' if ok else 'fail'}" for n, ok, _ in r["probes"]),
        "params_per_model": params_per_model(w),
        "batch": cfg.batch_size(w),
        "amp": cfg.amp_label(),
        **ctx,
    }


# --------------------------------------------------------------------- markdown
LEGEND = {
    "sequential": "sequential",
    "torchfunc": "torch.func",
    "concurrent": "concurrent",
    "modelbatch": "ModelBatch",
    "trainstep": "TrainStep",
}


def _fmt(v, spec: str, suffix: str = "") -> str:
    return "" if v in ("", None) else f"{v:{spec}}{suffix}"


def _cell(text: str) -> str:
    return str(text).replace("|", "/")


def write_markdown(path: Path, rows: list[dict], cfg: Config, ctx: dict, notes: list[str]) -> None:
    step_rows = [r for r in rows if r["kind"] == "step"]
    mem_method = next((r["mem_method"] for r in step_rows if r["mem_method"]), "n/a")
    lines = [
        f"# Training-step suite{' (tiny)' if cfg.tiny else ' (quick)' if cfg.quick else ''}",
        "",
        f"Device: {ctx['device']}; torch {ctx['torch']}; commit {ctx['commit']}; "
        f"{ctx['threads']} threads; {ctx['date']}. Precision: {cfg.amp_label()}; "
        f"{cfg.repeats} interleaved rounds per case.",
        "",
        "One training step of all N models (forward, per-model loss, backward, Adam). "
        "Speed-ups are the other method's step time over this one's, in the same run. "
        "sequential / concurrent run at most "
        f"{cfg.seq_cap} models and are scaled to N; torch.func has one learning rate for "
        "all models, every other method one per model. Peak memory: "
        + (
            "torch.cuda.max_memory_allocated over the method's baseline."
            if cfg.device_type == "cuda"
            else "resident-set high-water mark over the method's baseline (free heap "
            "trimmed), one steady step."
        )
        + f" ({mem_method.split(' + ')[0]})",
        "",
        *[f"- {n}" for n in notes],
    ]
    for wname in dict.fromkeys(r["workload"] for r in step_rows):
        w = WORKLOADS[wname]
        wr = [r for r in step_rows if r["workload"] == wname]
        lines += [
            "",
            f"## {wname}: {w.describe}, batch {wr[0]['batch']}, "
            f"{wr[0]['params_per_model']:,} parameters per model",
            "",
            "| N | method | step ms | samples/s | peak MB | vs sequential | vs torch.func | "
            "notes |",
            "|---:|---|---:|---:|---:|---:|---:|---|",
        ]
        for r in wr:
            if r["status"] != "ok":
                lines.append(
                    f"| {r['N']} | {LEGEND[r['method']]} | failed | | | | | {_cell(r['reason'])} |"
                )
                continue
            notes_ = []
            if r["compile_s"] != "":
                notes_.append(f"compile {r['compile_s']:.1f} s")
            if r["variant"]:
                notes_.append(f"Adam {r['variant']}")
            if r["method"] in ("sequential", "concurrent") and r["measured_models"] != r["N"]:
                notes_.append(f"{r['measured_models']} models run, scaled")
            if r["procs"] != "":
                notes_.append(f"{r['procs']} process{'es' if int(r['procs']) != 1 else ''}")
            if r["forward_path"] and r["forward_path"] != "vmap":
                notes_.append(f"forward path {r['forward_path']}")
            if r["gpu_util_pct"] != "":
                notes_.append(f"GPU {r['gpu_util_pct']:.0f}% busy")
            elif r["gpu_util_note"]:
                notes_.append(r["gpu_util_note"])
            lines.append(
                f"| {r['N']} | {LEGEND[r['method']]} | {r['step_ms']:.2f} | "
                f"{r['samples_per_s']:,.0f} | {_fmt(r['peak_mem_mb'], '.1f')} | "
                f"{_fmt(r['speedup_vs_sequential'], '.2f', 'x')} | "
                f"{_fmt(r['speedup_vs_torchfunc'], '.2f', 'x')} | {'; '.join(notes_)} |"
            )
    mx = [r for r in rows if r["kind"] == "max_n"]
    if mx:
        lines += [
            "",
            "## Largest N that fits",
            "",
            "Doubling from the start N until a step fails, then bisection to within 5%. "
            + (
                "Limit: the GPU's memory (or --mem-limit-gb)."
                if cfg.device_type == "cuda"
                else "CPU cap: each probe process's address space (RLIMIT_AS) and its "
                "resident-set growth limited to the memory limit."
            ),
            "",
            "| workload | method | max N | memory limit GB | peak MB at max N | probes | notes |",
            "|---|---|---:|---:|---:|---|---|",
        ]
        for r in mx:
            lines.append(
                f"| {r['workload']} | {LEGEND[r['method']]} | "
                f"{r['N'] if r['status'] == 'ok' else 'failed'} | {r['mem_limit_gb']} | "
                f"{_fmt(r['peak_mem_mb'], '.0f')} | {r['max_n_probes']} | {_cell(r['reason'])} |"
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


# -------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        epilog="See the module docstring (python -c 'help(...)' or the file) for details.",
    )
    ap.add_argument("--workload", nargs="+", choices=list(WORKLOADS), default=list(WORKLOADS))
    ap.add_argument("--models", nargs="+", type=int, help="N values (default 1 16 64 256 1024)")
    ap.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    ap.add_argument("--amp", action="store_true", help="CUDA fp16 + GradScaler; CPU bf16")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="N in 1 16 64 256, 3 rounds")
    ap.add_argument("--tiny", action="store_true", help="smoke test: tiny batches, 2 rounds")
    ap.add_argument("--repeats", type=int, help="interleaved rounds (default 7; quick 3)")
    ap.add_argument("--threads", type=int, help="torch threads of the main process")
    ap.add_argument("--batch", type=int, help="override every workload's batch size")
    ap.add_argument("--seq-cap", type=int, default=16, help="models sequential/concurrent run")
    ap.add_argument("--procs", type=int, help="concurrent workers (default: cores / GPUs)")
    ap.add_argument("--compile-backend", help="TrainStep's backend (default inductor)")
    ap.add_argument("--util-window", type=float, help="seconds of GPU-utilisation sampling")
    ap.add_argument("--max-n", action="store_true", help="also search the largest N that fits")
    ap.add_argument("--max-n-only", action="store_true", help="only the max-N search")
    ap.add_argument("--max-n-methods", nargs="+", choices=MAX_N_METHODS,
                    default=["modelbatch", "trainstep"])  # fmt: skip
    ap.add_argument("--max-n-start", type=int, default=64)
    ap.add_argument("--max-n-tol", type=float, default=0.05, help="bisect until hi-lo <= tol*lo")
    ap.add_argument("--max-n-limit", type=int, default=1 << 16, help="stop doubling here")
    ap.add_argument("--mem-limit-gb", type=float,
                    help="max-N memory cap (CPU default 4; CUDA: the whole GPU)")  # fmt: skip
    ap.add_argument("--probe-timeout", type=float, default=900.0, help="seconds per CPU probe")
    ap.add_argument("--out", type=Path, help="results folder (default benchmarks/results/<dev>)")
    ap.add_argument("--name", help="file stem (default suite[_tiny|_quick][_amp][_maxn])")
    ap.add_argument("--probe", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.max_n_only:
        args.max_n = True
    return args


def make_config(args) -> Config:
    quick = args.quick or args.tiny
    cfg = Config(
        device=args.device,
        amp=args.amp,
        tiny=args.tiny,
        quick=quick,
        repeats=args.repeats or (2 if args.tiny else 3 if quick else 7),
        # The first call and the memory-measured step already warm every method up.
        warmup=0 if quick else 1,
        seq_cap=min(args.seq_cap, 4) if args.tiny else args.seq_cap,
        procs=args.procs,
        backend=args.compile_backend or ("aot_eager" if args.tiny else "inductor"),
        util_window=(
            args.util_window
            if args.util_window is not None
            else (0.2 if args.tiny else 0.5 if quick else 2.0)
        ),
        batch=args.batch,
        threads=torch.get_num_threads(),
    )
    return cfg


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.probe:
        probe_main(json.loads(args.probe))
        return {}
    if args.threads:
        torch.set_num_threads(args.threads)
    H.threads_from_env()
    # Every method, and every worker, runs under the allocator settings ModelBatch
    # would apply on first use, applied before anything is measured.
    mb.allocator.tune_cpu_allocator()
    cfg = make_config(args)
    if cfg.device_type == "cuda" and torch.device(cfg.device).index is not None:
        torch.cuda.set_device(torch.device(cfg.device))  # sync() waits on the current one
    if args.mem_limit_gb is None and cfg.device_type == "cpu":
        args.mem_limit_gb = 4.0
    if args.mem_limit_gb and cfg.device_type == "cuda":
        dev = torch.device(cfg.device)
        total = torch.cuda.get_device_properties(dev).total_memory
        torch.cuda.set_per_process_memory_fraction(
            min(1.0, args.mem_limit_gb * (1 << 30) / total), dev
        )
    ns = args.models or ([1, 16, 64, 256] if cfg.quick else [1, 16, 64, 256, 1024])
    ctx = H.context(cfg.device)
    out_dir = args.out or H.results_dir(cfg.device)
    stem = args.name or (
        "suite"
        + ("_tiny" if cfg.tiny else "_quick" if cfg.quick else "")
        + ("_amp" if cfg.amp else "")
        + ("_maxn" if args.max_n_only else "")
    )
    print(f"device: {ctx['device']}  torch {ctx['torch']}  commit {ctx['commit']}  "
          f"precision {cfg.amp_label()}", flush=True)  # fmt: skip
    for wname in args.workload:
        print(f"  {wname}: {WORKLOADS[wname].describe}, {params_per_model(WORKLOADS[wname]):,} "
              f"parameters per model, batch {cfg.batch_size(WORKLOADS[wname])}")  # fmt: skip

    rows: list[dict] = []
    notes: list[str] = []
    pools = LazyPool(cfg.procs or default_procs(cfg.device), cfg.device)
    warm_process(cfg, cfg.device, batched=True, compiler="trainstep" in args.methods)
    t_start = time.perf_counter()
    try:
        if not args.max_n_only:
            for wname in args.workload:
                w = WORKLOADS[wname]
                for n in ns:
                    torch.manual_seed(0)
                    res = run_case(w, n, cfg, args.methods, pools)
                    case = case_rows(w, n, cfg, res, ctx)
                    print_case(w, n, case)
                    rows += case
    finally:
        pools.close()
    if cfg.device_type == "cuda" and not H.GpuUtilSampler().available:
        notes.append(H.GpuUtilSampler().note)
    if args.max_n:
        for wname in args.workload:
            w = WORKLOADS[wname]
            for method in args.max_n_methods:
                r = max_n_search(w, method, cfg, args)
                row = max_n_row(w, method, cfg, r, ctx)
                print(f"max N {wname:11s} {method:10s} {row['N']} ({row['status']}; "
                      f"{row['max_n_probes']}) {row['reason'][:100]}", flush=True)  # fmt: skip
                rows.append(row)
    elapsed = time.perf_counter() - t_start
    notes.append(f"wall time of this run: {elapsed:.0f} s")
    csv_path = H.write_csv(out_dir / f"{stem}.csv", rows)
    write_markdown(out_dir / f"{stem}.md", rows, cfg, ctx, notes)
    print(f"wrote {csv_path} and {stem}.md in {elapsed:.0f} s", flush=True)
    return {"rows": rows, "csv": csv_path, "md": out_dir / f"{stem}.md", "seconds": elapsed}


if __name__ == "__main__":
    main()
