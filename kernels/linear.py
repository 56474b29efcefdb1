"""Triton kernels of ``modelbatch::linear_act_forward`` / ``linear_act_backward``:
N linear layers at once, with the bias and the activation fused into the GEMM.

Shapes. ``weight [N, O, I]``, ``bias [N, O]`` (or None), and either a shared
input ``x [M, I]`` (``shared=True``, fed to every model) or per-model inputs
``x [N, M, I]``. The output, the saved pre-activation and the gradient of the
output are contiguous ``[N, M, O]``. One dtype for all tensors: float32,
float16, bfloat16 or float64; the GEMMs accumulate in float32 (float64 for
float64) and the epilogues compute in that precision, rounding once at the
store. ``activation`` is one of ``modelbatch.ops.linear.ACTIVATIONS``.

Semantics (those of ``modelbatch.ops.linear.reference_linear_act_forward`` /
``reference_linear_act_backward``)::

    forward:   pre[n] = x(@n) @ weight[n].T + bias[n];  out[n] = act(pre[n])
               saved = pre for gelu / gelu_tanh / silu (their derivative needs
               it), an empty [0] tensor otherwise (relu / tanh differentiate
               from ``out``; "none" needs nothing)
    backward:  d = grad * act'(saved)               [N, M, O], never stored
               grad_x [M, I]    = sum_n d[n] @ weight[n]   (shared)
               grad_x [N, M, I] = d[n] @ weight[n]         (per model)
               grad_weight[n] = d[n].T @ x(@n);  grad_bias[n] = d[n].sum(0)

Why it is built this way:

* Three tiled GEMM kernels, ``C = A @ B`` over ``[BLOCK_M, BLOCK_N]`` output
  tiles with a ``BLOCK_K`` loop, ``tl.dot`` into a float32 accumulator. Grid:
  ``(tiles of C, B)``; grid axis 1 is the model (``B = N``) for per-model
  input and has one program (``B = 1``) for a shared one. Tile ids are grouped
  ``GROUP_M`` rows at a time so that neighbouring programs share B's columns
  in L2. Masks handle every size, odd ones included.
* A shared input folds the model axis into the weight's rows: the stacked
  contiguous weight *is* one ``[N*O, I]`` matrix, so the forward is ONE GEMM
  ``[M, I] x [I, N*O]``, whose tiles span model boundaries (small ``O`` still
  fills a tile). Column ``j`` of that product is output ``(n, o) = divmod(j,
  O)``; the epilogue scatters it to the ``[N, M, O]`` layout, so nothing is
  transposed afterwards. Per-model programs use the same addressing with
  ``row = n * O + o``, which is why the kernels need no separate shared path.
  The backward folds the same way: ``grad_x = [M, N*O] x [N*O, I]`` (the sum
  over models is the GEMM's reduction) and ``grad_weight = [N*O, M] x [M, I]``,
  each one GEMM for a shared input, a batched GEMM otherwise.
* Forward epilogue: ``+ bias`` and the activation on the float32 accumulator,
  then the stores (``out``, and ``pre`` when saved). Backward prologue: the
  activation derivative is applied to the A tiles as the GEMMs load them
  (``grad * act'(saved)``), so ``d`` is never written to memory; the
  grad_weight kernel also sums its float32 ``d`` tiles over ``M`` into
  ``grad_bias`` (stored by the programs of the first column block), so the
  bias gradient costs no extra pass. ``d`` is rounded to the storage dtype
  before the dot (the value torch's backward would materialise).
* The activations are those of torch, float32 throughout: exact ``gelu`` with
  ``erf``, ``gelu_tanh`` with torch's tanh formula and derivative, ``silu`` as
  ``z * sigmoid(z)``, and ``tanh`` / ``sigmoid`` / ``exp`` from
  ``kernels/rnn.py`` (accurate to a few ulp on the GPU as in the interpreter).
  relu keeps a NaN NaN (a select, as torch's ``relu``), and its derivative
  selects (``threshold_backward``): an infinite grad at an inactive unit gives 0.
* float32 GEMMs use IEEE products unless torch allows TF32
  (``torch.backends.cuda.matmul.allow_tf32``), as torch's own matmul.
* Triton's interpreter computes a bfloat16 ``tl.dot`` wrongly (it multiplies
  the raw bits), so under ``TRITON_INTERPRET=1`` bfloat16 operands are widened
  to float32 before the dot (exact: products of bfloat16 values are exact in
  float32); on the GPU they stay bfloat16 for the tensor cores.
* Offsets are int32 unless a tensor reaches 2**31 elements, then int64
  (``INT64``).

On CUDA these are the op's kernels (launched through ``torch.library.wrap_triton``,
so ``torch.compile`` sees them); on CPU tensors they run only under
``TRITON_INTERPRET=1`` (how the tests check them without a GPU).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from modelbatch.ops import linear as linear_ops
from torch.library import wrap_triton

from .adam import _TL_DTYPES, _compute_dtype, _interpreting, _to_storage, check_kernel_device
from .rnn import _exp_neg, _sigmoid, _tanh

#: Activation name -> the kernels' ``ACT`` code.
ACT_CODES = {"none": 0, "relu": 1, "gelu": 2, "gelu_tanh": 3, "silu": 4, "tanh": 5}
#: Tiles of a program's output block along its rows are grouped by this many.
GROUP_M = 8
#: CUDA's limit on grid axis 1 (the models of a per-model call).
MAX_GRID_Y = 65535
#: From this many elements in one tensor on, offsets are computed in int64.
INT64_INDEX_FROM = 2**31 - 1

_PREFIX = "modelbatch.kernels.linear."

_SQRT1_2: tl.constexpr = tl.constexpr(0.7071067811865476)
_INV_SQRT_2PI: tl.constexpr = tl.constexpr(0.3989422804014327)  # M_2_SQRTPI * M_SQRT1_2 / 2
_GELU_BETA: tl.constexpr = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
_GELU_KAPPA: tl.constexpr = tl.constexpr(0.044715)
# (The constants multiply tensors from the right: under the interpreter a
# constexpr on the left wraps the product in a constexpr.)


# --------------------------------------------------------------------------
# Device helpers
# --------------------------------------------------------------------------


@triton.jit
def _act(z, ACT: tl.constexpr):
    """``act(z)`` elementwise, in ``z``'s (float32 / float64) precision."""
    if ACT == 1:
        y = tl.where(z < 0, 0.0, z)
    elif ACT == 2:
        y = 0.5 * z * (1.0 + tl.erf(z * _SQRT1_2))
    elif ACT == 3:
        y = 0.5 * z * (1.0 + _tanh((z + z * z * z * _GELU_KAPPA) * _GELU_BETA))
    elif ACT == 4:
        y = z * _sigmoid(z)
    elif ACT == 5:
        y = _tanh(z)
    else:
        y = z
    return y


@triton.jit
def _act_grad(g, s, ACT: tl.constexpr):
    """``g * act'(.)`` from ``s``, the saved output (relu, tanh) or
    pre-activation (gelu, gelu_tanh, silu); torch's backward formulas."""
    if ACT == 1:
        d = tl.where(s > 0, g, 0.0)
    elif ACT == 2:
        cdf = 0.5 * (1.0 + tl.erf(s * _SQRT1_2))
        pdf = _exp_neg(-0.5 * s * s) * _INV_SQRT_2PI
        d = g * (cdf + s * pdf)
    elif ACT == 3:
        s2 = s * s
        t = _tanh((s + s2 * s * _GELU_KAPPA) * _GELU_BETA)
        inner = (1.0 + s2 * (3.0 * _GELU_KAPPA)) * _GELU_BETA
        d = g * (0.5 * (1.0 + t) + 0.5 * s * (1.0 - t * t) * inner)
    elif ACT == 4:
        sg = _sigmoid(s)
        d = g * sg * (1.0 + s * (1.0 - sg))
    elif ACT == 5:
        d = g * (1.0 - s * s)
    else:
        d = g
    return d


@triton.jit
def _tile_ids(P, Q, INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              GROUP: tl.constexpr):  # fmt: skip
    """``(pid_m, pid_n, b)``: this program's output tile of a ``[P, Q]`` product
    (grid axis 0, grouped ``GROUP`` tile rows at a time) and its model (axis 1)."""
    pid = tl.program_id(0)
    b = tl.program_id(1)
    if INT64:
        pid = pid.to(tl.int64)
        b = b.to(tl.int64)
    num_m = tl.cdiv(P, BLOCK_M)
    num_n = tl.cdiv(Q, BLOCK_N)
    per_group = GROUP * num_n
    first_m = (pid // per_group) * GROUP
    size_m = tl.minimum(num_m - first_m, GROUP)
    pid_m = first_m + (pid % per_group) % size_m
    pid_n = (pid % per_group) // size_m
    return pid_m, pid_n, b


@triton.jit
def _k_range(BLOCK_K: tl.constexpr, INT64: tl.constexpr):
    """``arange(BLOCK_K)``, the reduction offsets of a tile (int64 with ``INT64``:
    they multiply strides)."""
    rk = tl.arange(0, BLOCK_K)
    if INT64:
        rk = rk.to(tl.int64)
    return rk


@triton.jit
def _operand(v, DTYPE: tl.constexpr, DOT: tl.constexpr):
    """A float32 tile rounded to the storage dtype, as a ``tl.dot`` operand."""
    return _to_storage(v, DTYPE).to(DOT)


# --------------------------------------------------------------------------
# Kernels
# --------------------------------------------------------------------------


@triton.jit
def _forward_kernel(
    x, sx_b, sx_m, sx_k,  # [B, M, I] (B = 1, shared input)
    w,  # [N*O, I] contiguous
    bias,  # [N*O] contiguous (unused without HAS_BIAS)
    out, pre,  # [N, M, O] contiguous (pre unused without SAVE_PRE)
    M, Q, I, O,  # Q: output columns of one program row, O or N*O (shared)
    HAS_BIAS: tl.constexpr, SAVE_PRE: tl.constexpr, ACT: tl.constexpr,
    DTYPE: tl.constexpr, DOT: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
    INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n, b = _tile_ids(M, Q, INT64, BLOCK_M, BLOCK_N, GROUP)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = _k_range(BLOCK_K, INT64)
    m_ok = rm < M
    n_ok = rn < Q
    row = b * O + rn  # weight row (= model * O + output unit) of each column
    a_ptr = x + b * sx_b + rm[:, None] * sx_m + rk[None, :] * sx_k
    w_ptr = w + row[None, :] * I + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), COMPUTE)
    for k0 in range(0, I, BLOCK_K):
        k_ok = rk < I - k0
        a = tl.load(a_ptr, mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptr, mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        acc = tl.dot(a.to(DOT), wt.to(DOT), acc, input_precision=PRECISION)
        a_ptr += BLOCK_K * sx_k
        w_ptr += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias + row, mask=n_ok, other=0.0).to(COMPUTE)[None, :]
    model = row // O
    offs = ((model * M)[None, :] + rm[:, None]) * O + (row - model * O)[None, :]
    mask = m_ok[:, None] & n_ok[None, :]
    if SAVE_PRE:
        tl.store(pre + offs, _to_storage(acc, DTYPE), mask=mask)
    tl.store(out + offs, _to_storage(_act(acc, ACT), DTYPE), mask=mask)


@triton.jit
def _grad_x_kernel(
    g, s,  # [N, M, O] contiguous: grad of out, saved (unused for ACT 0)
    w,  # [N*O, I] contiguous
    gx,  # [B, M, I] contiguous (B = 1, shared input)
    M, K, I, O,  # K: the reduction, O or N*O (shared)
    ACT: tl.constexpr,
    DTYPE: tl.constexpr, DOT: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
    INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n, b = _tile_ids(M, I, INT64, BLOCK_M, BLOCK_N, GROUP)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ri = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = _k_range(BLOCK_K, INT64)
    m_ok = rm < M
    i_ok = ri < I
    acc = tl.zeros((BLOCK_M, BLOCK_N), COMPUTE)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < K
        row = b * O + kk  # weight row = model * O + output unit
        model = row // O
        d_offs = ((model * M)[None, :] + rm[:, None]) * O + (row - model * O)[None, :]
        d_mask = m_ok[:, None] & k_ok[None, :]
        d = tl.load(g + d_offs, mask=d_mask, other=0.0).to(COMPUTE)
        if ACT != 0:
            d = _act_grad(d, tl.load(s + d_offs, mask=d_mask, other=0.0).to(COMPUTE), ACT)
        wt = tl.load(
            w + row[:, None] * I + ri[None, :], mask=k_ok[:, None] & i_ok[None, :], other=0.0
        )
        acc = tl.dot(_operand(d, DTYPE, DOT), wt.to(DOT), acc, input_precision=PRECISION)
    offs = (b * M + rm)[:, None] * I + ri[None, :]
    tl.store(gx + offs, _to_storage(acc, DTYPE), mask=m_ok[:, None] & i_ok[None, :])


@triton.jit
def _grad_w_kernel(
    g, s,  # [N, M, O] contiguous: grad of out, saved (unused for ACT 0)
    x, sx_b, sx_m, sx_k,  # [B, M, I] (B = 1, shared input)
    gw,  # [N*O, I] contiguous (unused without WRITE_W)
    gb,  # [N*O] contiguous (unused without WRITE_B)
    M, Q, I, O,  # Q: grad_weight rows of one model axis program, O or N*O (shared)
    ACT: tl.constexpr, WRITE_W: tl.constexpr, WRITE_B: tl.constexpr,
    DTYPE: tl.constexpr, DOT: tl.constexpr, COMPUTE: tl.constexpr, PRECISION: tl.constexpr,
    INT64: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP: tl.constexpr,
):  # fmt: skip
    if WRITE_W:
        cols = I
    else:  # grad_bias alone: the launch has one column block
        cols = 1
    pid_p, pid_i, b = _tile_ids(Q, cols, INT64, BLOCK_M, BLOCK_N, GROUP)
    rp = pid_p * BLOCK_M + tl.arange(0, BLOCK_M)
    ri = pid_i * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = _k_range(BLOCK_K, INT64)
    p_ok = rp < Q
    i_ok = ri < I
    row = b * O + rp  # grad_weight row = model * O + output unit
    model = row // O
    d_base = model * M * O + (row - model * O)  # offset of (model, m = 0, unit)
    x_ptr = x + b * sx_b + rk[:, None] * sx_m + ri[None, :] * sx_k
    acc = tl.zeros((BLOCK_M, BLOCK_N), COMPUTE)
    acc_b = tl.zeros((BLOCK_M,), COMPUTE)
    for k0 in range(0, M, BLOCK_K):
        kk = k0 + rk
        k_ok = kk < M
        d_offs = d_base[:, None] + kk[None, :] * O
        d_mask = p_ok[:, None] & k_ok[None, :]
        d = tl.load(g + d_offs, mask=d_mask, other=0.0).to(COMPUTE)
        if ACT != 0:
            d = _act_grad(d, tl.load(s + d_offs, mask=d_mask, other=0.0).to(COMPUTE), ACT)
        if WRITE_B:
            acc_b += tl.sum(d, axis=1)
        if WRITE_W:
            xt = tl.load(x_ptr, mask=k_ok[:, None] & i_ok[None, :], other=0.0)
            acc = tl.dot(_operand(d, DTYPE, DOT), xt.to(DOT), acc, input_precision=PRECISION)
        x_ptr += BLOCK_K * sx_m
    if WRITE_W:
        offs = row[:, None] * I + ri[None, :]
        tl.store(gw + offs, _to_storage(acc, DTYPE), mask=p_ok[:, None] & i_ok[None, :])
    if WRITE_B:
        # Only the first column block stores: every one computes the same sums.
        rows_b = tl.where(pid_i == 0, Q, 0)
        tl.store(gb + row, _to_storage(acc_b, DTYPE), mask=rp < rows_b)


# --------------------------------------------------------------------------
# Host side
# --------------------------------------------------------------------------


def _pow2_in(v: int, lo: int, hi: int) -> int:
    return min(max(triton.next_power_of_2(max(v, 1)), lo), hi)


def config(p: int, q: int, k: int, dtype: torch.dtype) -> dict:
    """Launch meta-parameters of a ``[p, q]`` GEMM with reduction ``k``:
    ``BLOCK_M``, ``BLOCK_N``, ``BLOCK_K`` (powers of two from 16, the smallest
    ``tl.dot`` tile), ``num_warps`` and ``num_stages``. Tiles shrink to the
    problem (a 5-row input gets a 16-row tile, not a 128-row one) and grow to
    128 x 128 (64 x 64 in float64, whose operands are twice as big in shared
    memory); the half types take 64-deep K steps and 3 pipeline stages, the
    others 32 and 2 (so that the float32 backward's tiles stay within the 99 KiB
    of shared memory of sm_86 / sm_89 GPUs). A heuristic, not autotuned."""
    half = dtype in (torch.float16, torch.bfloat16)
    cap = 64 if dtype == torch.float64 else 128
    block_m, block_n = _pow2_in(p, 16, cap), _pow2_in(q, 16, cap)
    return {
        "BLOCK_M": block_m,
        "BLOCK_N": block_n,
        "BLOCK_K": _pow2_in(k, 16, 64 if half else 32),
        "num_warps": 8 if block_m * block_n >= 128 * 128 else 4,
        "num_stages": 3 if half else 2,
    }


def _launch_args(op: str, kernel, p: int, q: int, k: int, batch: int, dtype: torch.dtype,
                 extent: int) -> tuple[tuple, dict] | None:  # fmt: skip
    """``(grid, meta)`` of ``kernel`` over the tiles of a ``[p, q]`` product
    (reduction ``k``) for ``batch`` models, or None when there is nothing to
    compute. ``extent`` is the largest element count an in-bounds lane
    addresses (masked lanes of the last tiles may wrap around in int32: they are
    never dereferenced). The callers launch ``wrap_triton(<kernel>)[grid](...,
    **meta)`` naming the kernel, so that ``torch.library.triton_op`` finds it in
    their source (torch.compile's caches key on the kernels' code)."""
    if p == 0 or q == 0 or batch == 0:
        return None
    if batch > MAX_GRID_Y:
        raise ValueError(
            f"{op}: {batch} models exceed CUDA's grid ({MAX_GRID_Y} per call of per-model "
            "input); split the call"
        )
    meta = config(p, q, k, dtype)
    grid = (triton.cdiv(p, meta["BLOCK_M"]) * triton.cdiv(q, meta["BLOCK_N"]), batch)
    if _interpreting(kernel):
        meta.pop("num_warps")
        meta.pop("num_stages")
        dot = torch.float32 if dtype == torch.bfloat16 else dtype
    else:
        dot = dtype
    tf32 = dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
    meta.update(
        DTYPE=_TL_DTYPES[dtype],
        DOT=_TL_DTYPES[dot],
        COMPUTE=_TL_DTYPES[_compute_dtype(dtype)],
        PRECISION="tf32" if tf32 else "ieee",
        INT64=extent >= INT64_INDEX_FROM,
        GROUP=GROUP_M,
    )
    return grid, meta


def _check(op: str, x, weight, bias, activation, shared) -> tuple[int, int, int, int]:
    """The op's checks, plus the dtypes and device the kernels take."""
    n, m, i, o = linear_ops.check_linear_act(op, x, weight, bias, activation, shared)
    if x.dtype not in _TL_DTYPES:
        raise ValueError(
            f"{op}: dtype {x.dtype} is not supported; supported: float32, float16, bfloat16, "
            "float64"
        )
    check_kernel_device(op, x.device, _interpreting(_forward_kernel))
    return n, m, i, o


def _check_mno(op: str, name: str, t, n: int, m: int, o: int, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or tuple(t.shape) != (n, m, o):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{op}: {name} must be [N, M, O] = {[n, m, o]}, got {shape}")
    if t.dtype != like.dtype or t.device != like.device:
        raise ValueError(
            f"{op}: {name} is {t.dtype} on {t.device}, expected {like.dtype} on {like.device}"
        )


def _x3(x: torch.Tensor, shared: bool) -> tuple[torch.Tensor, int, int, int]:
    """``x`` with its batch, row and column strides (batch stride 0 if shared)."""
    if shared:
        return x, 0, x.stride(0), x.stride(1)
    return x, x.stride(0), x.stride(1), x.stride(2)


def linear_act_forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    shared: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(out [N, M, O], saved)``: ``out[n] = act(x(@n) @ weight[n].T + bias[n])``
    in one launch; ``saved`` is the pre-activation ``[N, M, O]`` for gelu,
    gelu_tanh and silu, an empty ``[0]`` tensor otherwise. ``x`` is ``[M, I]``
    (shared) or ``[N, M, I]``, any strides. Raises ValueError on bad input."""
    op = _PREFIX + "linear_act_forward"
    n, m, i, o = _check(op, x, weight, bias, activation, shared)
    save_pre = activation in linear_ops.SAVES_PRE
    w = weight.contiguous()
    b = bias.contiguous() if bias is not None else w
    out = torch.empty((n, m, o), dtype=x.dtype, device=x.device)
    pre = torch.empty((n, m, o) if save_pre else (0,), dtype=x.dtype, device=x.device)
    xs, sb, sm, sk = _x3(x, shared)
    q, batch = (n * o, 1) if shared else (o, n)
    extent = max(out.numel(), w.numel(), _span(x))
    launch = _launch_args(op, _forward_kernel, m, q, i, batch, x.dtype, extent)
    if launch is not None:
        grid, meta = launch
        wrap_triton(_forward_kernel)[grid](
            xs, sb, sm, sk, w, b, out, pre if save_pre else out, m, q, i, o,
            HAS_BIAS=bias is not None, SAVE_PRE=save_pre, ACT=ACT_CODES[activation], **meta,
        )  # fmt: skip
    return out, pre


def linear_act_backward(
    grad: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    saved: torch.Tensor | None,
    activation: str,
    shared: bool,
    need_x: bool,
    need_w: bool,
    need_b: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(grad_x, grad_weight [N, O, I], grad_bias [N, O])`` from ``grad [N, M,
    O]``, the grad of ``out``; an output not asked for (``need_*``) is an empty
    ``[0]`` tensor. ``saved`` is ``out`` (relu, tanh), the pre-activation
    (gelu, gelu_tanh, silu) or None ("none"). grad_x is ``[M, I]`` (shared) or
    ``[N, M, I]``. Two launches at most (grad_x; grad_weight with grad_bias).
    Raises ValueError on bad input."""
    op = _PREFIX + "linear_act_backward"
    n, m, i, o = _check(op, x, weight, None, activation, shared)
    _check_mno(op, "grad", grad, n, m, o, x)
    act = ACT_CODES[activation]
    if act != 0:
        _check_mno(op, "saved", saved, n, m, o, x)
        s = saved.contiguous()
    g = grad.contiguous()
    if act == 0:
        s = g
    w = weight.contiguous()
    # Three distinct empty tensors: an op's outputs may not alias each other.
    gx, gw, gb = x.new_empty(0), x.new_empty(0), x.new_empty(0)
    extent = max(g.numel(), w.numel(), _span(x))
    if need_x:
        gx = torch.empty((m, i) if shared else (n, m, i), dtype=x.dtype, device=x.device)
        k, batch = (n * o, 1) if shared else (o, n)
        launch = _launch_args(op, _grad_x_kernel, m, i, k, batch, x.dtype, extent)
        if launch is not None:
            grid, meta = launch
            wrap_triton(_grad_x_kernel)[grid](g, s, w, gx, m, k, i, o, ACT=act, **meta)
    if need_w or need_b:
        if need_w:
            gw = torch.empty((n, o, i), dtype=x.dtype, device=x.device)
        if need_b:
            gb = torch.empty((n, o), dtype=x.dtype, device=x.device)
        xs, sb, sm, sk = _x3(x, shared)
        q, batch = (n * o, 1) if shared else (o, n)
        write_w = need_w and i > 0  # grad_bias alone: one column block, no GEMM
        launch = _launch_args(op, _grad_w_kernel, q, i if write_w else 1, m, batch, x.dtype, extent)
        if launch is not None:
            grid, meta = launch
            wrap_triton(_grad_w_kernel)[grid](
                g, s, xs, sb, sm, sk, gw if write_w else g, gb if need_b else g, m, q, i, o,
                ACT=act, WRITE_W=write_w, WRITE_B=need_b, **meta,
            )  # fmt: skip
    return gx, gw, gb


def linear_act(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    shared: bool,
) -> torch.Tensor:
    """``out [N, M, O]`` of :func:`linear_act_forward` (its ``saved`` dropped)."""
    return linear_act_forward(x, weight, bias, activation, shared)[0]


def _span(x: torch.Tensor) -> int:
    """The largest offset (plus one) ``x``'s strides address."""
    return 1 + sum((s - 1) * st for s, st in zip(x.shape, x.stride()) if s > 0)
