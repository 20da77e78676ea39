"""Batched LoRA apply: ``y[t] += (A[slot(t)] @ x[t]) @ Bt[slot(t)]`` for every token with a slot.

Slot buffers are stacked and padded to the maximum rank: ``lora_a`` [num_slots, max_rank, in] and
``lora_bt`` [num_slots, max_rank, out] (B transposed, with the LoRA scaling folded in). Both keep
rank as the middle dimension, so the first ``r`` rank rows of a slot are contiguous and a slot is
read at its own rank, never at the padded one. ``ranks[s]`` is the slot's rank for this module
(0 = slot unused by this module). Rows without a slot keep the base output exactly.

Layouts behind one function (``lora_apply``):
- SGMV (segment): tokens of one adapter form contiguous segments (the runner packs by slot).
  Neighbouring segments of neighbouring slots with the same rank and the same length are one
  *run*, computed by two batched matmuls on views (no copies); a run of one segment is a plain
  segment matmul pair. Slots are placed so that equal ranks sit side by side (``slots.py``), so
  a many-adapter decode batch is a handful of runs, each read at its true rank. Neighbours of
  different rank join a run at the larger rank (padding rows are zero, so nothing changes) when
  the extra bytes read cost less than another matmul pair (``RUN_MERGE_PAD_BYTES``).
- BGMV (gather): per-token gather of the slot weights and batched matmuls per token; the layout
  GPU kernels use for decode, and the one a static mapping (captured decode step) needs. On CPU
  the gathers cost more than they save, so the dispatcher picks it only for static mappings.

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

from .mapping import LoraMapping, SlotRankList
from .triton_ops import select_lora_backend

# On CPU a matmul pair costs ~25 us of dispatch, about the time to stream 256 KB of weights (one
# core, ~10 GB/s): reading fewer zero padding bytes than that beats splitting a run.
RUN_MERGE_PAD_BYTES = 256 * 1024

# (y [T, out], x [T, in], lora_a [S, R, in], lora_bt [S, R, out], ranks per slot, mapping) -> None
LoraApply = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, SlotRankList, LoraMapping], None]


def lora_apply_reference(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor,
                         token_slots: torch.Tensor) -> None:
    """The maths as a loop (the oracle for every fast path).

    for t in range(num_tokens):
        s = token_slots[t]
        if s >= 0:
            y[t] += (lora_a[s] @ x[t]) @ lora_bt[s]
    """
    for t in range(x.shape[0]):
        s = int(token_slots[t])
        if s >= 0:
            y[t] += (lora_a[s] @ x[t]) @ lora_bt[s]


def sgmv(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor,
         ranks: SlotRankList, mapping: LoraMapping) -> None:
    """Segment layout, one batched matmul pair per run of equal-shaped segments.

    for run in runs:  # slots lo..hi-1, each with `width` contiguous tokens, all of rank r
        xs = x[run tokens] viewed [n, width, in]
        y[run tokens] viewed [n, width, out] += (A[lo:hi, :r] @ xs^T)^T @ Bt[lo:hi, :r]
    """
    row_bytes = (lora_a.shape[2] + lora_bt.shape[2]) * lora_a.element_size()  # one rank row of A and Bt
    runs = mapping.segment_runs(ranks, RUN_MERGE_PAD_BYTES // row_bytes)
    if not runs:
        return
    # In the LoRA compute dtype (fp32 slot buffers for a bf16 model on CPU, layers.py) the adapted
    # rows (from the first one on: rows before it need no copy) are converted once per module.
    first = min(run.start for run in runs)
    xc = x[first:].to(lora_a.dtype)  # [T - first, in]
    yc = y[first:].to(lora_bt.dtype)  # [T - first, out], y itself when the dtypes agree
    for run in runs:
        n, r = run.hi - run.lo, run.rank
        xs = xc[run.start - first:run.end - first].reshape(n, run.width, -1)  # [n, width, in]
        h = torch.bmm(lora_a[run.lo:run.hi, :r], xs.transpose(1, 2))  # [n, r, width]
        ys = yc[run.start - first:run.end - first].view(n, run.width, -1)  # [n, width, out], a view
        ys.baddbmm_(h.transpose(1, 2), lora_bt[run.lo:run.hi, :r])
    if yc.data_ptr() != y.data_ptr():
        y[first:].copy_(yc)


def bgmv(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor,
         ranks: SlotRankList, mapping: LoraMapping) -> None:
    """Gather layout: every row gathers its slot's weights at the padded rank (padding rank rows
    are zero) and rows without a slot add an exact zero. Reads nothing on the host, so it is the
    torch apply a captured decode step (static mapping) can replay; costly on CPU otherwise.

    for t in range(T):
        s = token_slots[t]
        y[t] += (A[max(s, 0)] @ (x[t] if s >= 0 else 0)) @ Bt[max(s, 0)]
    """
    slots = mapping.token_slots.clamp(min=0)  # [T]
    # [T, in]: rows without a slot read zeros
    xs = torch.where((mapping.token_slots >= 0)[:, None], x, 0).to(lora_a.dtype)
    h = torch.bmm(lora_a[slots], xs.unsqueeze(2))  # [T, R, 1], exact zeros on those rows
    if y.dtype == lora_bt.dtype:
        y.unsqueeze(1).baddbmm_(h.transpose(1, 2), lora_bt[slots])  # [T, 1, out], a view of y
    else:
        y.add_(torch.bmm(h.transpose(1, 2), lora_bt[slots])[:, 0])


def lora_apply(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor,
               ranks: SlotRankList, mapping: LoraMapping) -> None:
    """Add every token's LoRA delta to ``y`` [T, out] in place; ``x`` is [T, in]."""
    if mapping.is_static:
        bgmv(y, x, lora_a, lora_bt, ranks, mapping)
    elif mapping.segments:
        sgmv(y, x, lora_a, lora_bt, ranks, mapping)


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
                 ranks, mapping: LoraMapping) -> None:
        if mapping.is_static:
            bgmv(y, x, lora_a, lora_bt, ranks, mapping)
        elif not mapping.segments:
            return
        elif self.kernels.supports_lora(x.dtype, lora_a.dtype):
            self.kernels.lora_sgmv(y, x, lora_a, lora_bt, ranks.table, mapping.segment_table())
        else:  # a dtype the kernel lacks (fp16): the torch runs
            sgmv(y, x, lora_a, lora_bt, ranks, mapping)


def apply_function(device: torch.device | str, native=None) -> LoraApply:
    """The LoRA apply for a model on ``device``: a Triton backend on CUDA (when triton imports), the
    native kernel on CPU when ``native`` kernels are given, else the torch ``lora_apply``. Call once
    per model: a Triton backend keeps per-step caches."""
    if torch.device(device).type == "cpu" and native is not None:
        return NativeLoraApply(native)
    return select_lora_backend(device) or lora_apply
