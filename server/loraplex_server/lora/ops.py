"""Batched LoRA apply: ``y[t] += (A[rows(t)] @ x[t]) @ Bt[rows(t)]`` for every token with a slot.

The weights are a pool of rows: ``lora_a`` [pool_rows, in] and ``lora_bt`` [pool_rows, out] (B
transposed, with the LoRA scaling folded in). Slot ``s`` holds rows ``offsets[s] .. offsets[s] +
ranks[s] - 1`` for this module (``ranks[s]`` 0 = slot unused by this module), so every adapter is
stored and read at its true rank; rows past a slot's rank belong to other adapters (or are free),
never to it. Rows without a slot keep the base output exactly.

Layouts behind one function (``lora_apply``):
- SGMV (segment): tokens of one adapter form contiguous segments (the runner packs by row offset).
  Neighbouring segments of the same length and rank whose slots hold consecutive row blocks are
  one *run*, computed by two batched matmuls on views of the pool (no copies); any other segment
  is a plain matmul pair. The slot manager places equal ranks side by side (``row_pool.py``), so a
  many-adapter decode batch is a handful of runs.
- BGMV (gather): per-token gather of rows ``offsets[s] + j`` for ``j < max_rank``, masked past the
  slot's rank, and batched matmuls per token; the layout GPU kernels use for decode, and the one a
  static mapping (captured decode step) needs. On CPU the gathers cost more than they save, so the
  dispatcher picks it only for static mappings.

``apply_function(device, native)`` picks a model's apply once: the Triton kernels (``triton_ops``,
same signature and buffers) on a CUDA device when triton imports; on CPU the native SGMV kernel
(``NativeLoraApply``: model/csrc/lora_sgmv.cpp, 2-3x the torch runs at decode and prefill widths)
when the native kernels are built; else ``lora_apply``.

Measured on CPU (fp32, one thread, cold weights): ``bmm(A, x^T)`` then ``baddbmm(h^T, Bt)`` reads
the weights ~1.6x faster than ``bmm(x, A^T)`` then ``bmm(h, B^T)`` with B stored [out, rank].
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .mapping import LoraMapping, SlotValues, device_table, rank_bound
from .triton_ops import select_lora_backend

# (y [T, out], x [T, in], lora_a [pool_rows, in], lora_bt [pool_rows, out], ranks per slot,
#  row offsets per slot, mapping) -> None
LoraApply = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, SlotValues, SlotValues, LoraMapping],
                     None]


def lora_apply_reference(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor,
                         ranks: SlotValues, offsets: SlotValues, token_slots: torch.Tensor) -> None:
    """The maths as a loop (the oracle for every fast path).

    for t in range(num_tokens):
        s = token_slots[t]
        if s >= 0:
            rows = slice(offsets[s], offsets[s] + ranks[s])
            y[t] += (lora_a[rows] @ x[t]) @ lora_bt[rows]
    """
    for t in range(x.shape[0]):
        s = int(token_slots[t])
        if s >= 0:
            rows = slice(int(offsets[s]), int(offsets[s]) + int(ranks[s]))
            y[t] += (lora_a[rows] @ x[t]) @ lora_bt[rows]


def sgmv(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor,
         ranks: SlotValues, offsets: SlotValues, mapping: LoraMapping) -> None:
    """Segment layout, one batched matmul pair per run (segments of consecutive equal-rank blocks).

    for run in runs:  # n segments of `width` tokens; segment i reads rows row + i*r .. row + (i+1)*r - 1
        xs = x[run tokens] viewed [n, width, in]
        A_run = A[row : row + n*r] viewed [n, r, in]; Bt_run likewise [n, r, out]
        y[run tokens] viewed [n, width, out] += (A_run @ xs^T)^T @ Bt_run
    """
    runs = mapping.segment_runs(ranks, offsets)
    if not runs:
        return
    # In the LoRA compute dtype (fp32 pool buffers for a bf16 model on CPU, layers.py) the adapted
    # rows (from the first one on: rows before it need no copy) are converted once per module.
    first = min(run.start for run in runs)
    xc = x[first:].to(lora_a.dtype)  # [T - first, in]
    yc = y[first:].to(lora_bt.dtype)  # [T - first, out], y itself when the dtypes agree
    for run in runs:
        n, r, rows = run.count, run.rank, slice(run.row, run.row + run.count * run.rank)
        xs = xc[run.start - first:run.end - first].reshape(n, run.width, -1)  # [n, width, in]
        h = torch.bmm(lora_a[rows].reshape(n, r, -1), xs.transpose(1, 2))  # [n, r, width], a view of the pool
        ys = yc[run.start - first:run.end - first].view(n, run.width, -1)  # [n, width, out], a view
        ys.baddbmm_(h.transpose(1, 2), lora_bt[rows].reshape(n, r, -1))
    if yc.data_ptr() != y.data_ptr():
        y[first:].copy_(yc)


def bgmv(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor,
         ranks: SlotValues, offsets: SlotValues, mapping: LoraMapping) -> None:
    """Gather layout: every row gathers ``max_rank`` rows from its slot's offset (clamped into the
    pool), masked past the slot's rank (those rows are other adapters' weights), and rows without
    a slot add an exact zero. Reads nothing on the host but the fixed rank bound, so it is the
    torch apply a captured decode step (static mapping) can replay; costly on CPU otherwise.

    for t in range(T):
        s = max(token_slots[t], 0); keep = token_slots[t] >= 0
        for j in range(max_rank):
            if keep and j < ranks[s]:
                y[t] += (A[offsets[s] + j] @ x[t]) * Bt[offsets[s] + j]
    """
    max_rank = rank_bound(ranks)
    if max_rank == 0:
        return
    device = x.device
    has_slot = mapping.token_slots >= 0  # [T]
    slots = mapping.token_slots.clamp(min=0)  # [T]
    j = torch.arange(max_rank, device=device)  # [R]
    rows = (device_table(offsets, device).long()[slots][:, None] + j).clamp(max=lora_a.shape[0] - 1)  # [T, R]
    keep = (j < device_table(ranks, device)[slots][:, None]) & has_slot[:, None]  # [T, R]
    h = torch.bmm(lora_a[rows], x.to(lora_a.dtype).unsqueeze(2))  # [T, R, 1]
    h = torch.where(keep[:, :, None], h, 0)  # other adapters' rows and rows without a slot: exact zeros
    bt = torch.where(keep[:, :, None], lora_bt[rows], 0)  # [T, R, out]
    if y.dtype == lora_bt.dtype:
        y.unsqueeze(1).baddbmm_(h.transpose(1, 2), bt)  # [T, 1, out], a view of y
    else:
        y.add_(torch.bmm(h.transpose(1, 2), bt)[:, 0])


def lora_apply(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor,
               ranks: SlotValues, offsets: SlotValues, mapping: LoraMapping) -> None:
    """Add every token's LoRA delta to ``y`` [T, out] in place; ``x`` is [T, in]."""
    if mapping.is_static:
        bgmv(y, x, lora_a, lora_bt, ranks, offsets, mapping)
    elif mapping.segments:
        sgmv(y, x, lora_a, lora_bt, ranks, offsets, mapping)


class NativeLoraApply:
    """The CPU apply through a native SGMV kernel (``kernels.lora_sgmv``, duck-typed so this package
    does not import the model's kernel library): every segment in one call per module, tiles of a
    few tokens spread over torch's threads. ``weight_dtype``: the slot buffers' dtype it wants for a
    model in ``model_dtype`` (the model's own: the kernel widens to fp32 as it reads)."""

    def __init__(self, kernels):
        self.kernels = kernels

    def weight_dtype(self, model_dtype: torch.dtype) -> torch.dtype:
        return model_dtype if self.kernels.supports_lora(model_dtype, model_dtype) else torch.float32

    def __call__(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor,
                 ranks, offsets, mapping: LoraMapping) -> None:
        if mapping.is_static:
            bgmv(y, x, lora_a, lora_bt, ranks, offsets, mapping)
        elif not mapping.segments:
            return
        elif self.kernels.supports_lora(x.dtype, lora_a.dtype):
            self.kernels.lora_sgmv(y, x, lora_a, lora_bt, device_table(ranks, x.device),
                                   device_table(offsets, x.device), mapping.segment_table(), rank_bound(ranks))
        else:  # a dtype the kernel lacks (fp16): the torch runs
            sgmv(y, x, lora_a, lora_bt, ranks, offsets, mapping)


def apply_function(device: torch.device | str, native=None) -> LoraApply:
    """The LoRA apply for a model on ``device``: a Triton backend on CUDA (when triton imports), the
    native kernel on CPU when ``native`` kernels are given, else the torch ``lora_apply``. Call once
    per model: a Triton backend keeps per-step caches."""
    if torch.device(device).type == "cpu" and native is not None:
        return NativeLoraApply(native)
    return select_lora_backend(device) or lora_apply
