"""Batched LoRA apply: ``y[t] += (A_s @ x[t]) @ Bt_s`` for every token with a slot ``s``.

The weights are flat buffers addressed by element offsets: ``lora_a`` and ``lora_bt`` are 1-D
(B transposed, with the LoRA scaling folded in), and for a module of input width ``in`` and output
width ``out``, slot ``s`` at rank ``r = ranks[s]`` reads

    A_s  = lora_a[a_offsets[s] : a_offsets[s] + r * in].view(r, in)
    Bt_s = lora_bt[b_offsets[s] : b_offsets[s] + r * out].view(r, out)

(``ranks[s]`` 0 = slot unused by this module). Every adapter is stored and read at its true rank.
The offsets are per module and differ between A and Bt: the buffers may be a module's own row pool
(slot at row ``o``: ``a_offsets = o * in``, ``b_offsets = o * out``) or views of a buffer several
modules share. Rows without a slot keep the base output exactly.

Layouts behind one function (``lora_apply``):
- SGMV (segment): tokens of one adapter form contiguous segments (the runner packs by slot place).
  Neighbouring segments of the same length and rank whose slots' A offsets, and Bt offsets, step
  evenly are one *run*, computed by two batched matmuls on strided views of the buffers (no
  copies); any other segment is a plain matmul pair. The slot manager places equal ranks side by
  side, so a many-adapter decode batch is a handful of runs.
- BGMV (gather): per-token gather of the ``max_rank`` rows from each slot's offsets, masked past
  the slot's rank, and batched matmuls per token; the layout GPU kernels use for decode, and the
  one a static mapping (captured decode step) needs. On CPU the gathers cost more than they save,
  so the dispatcher picks it only for static mappings.

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

# (y [T, out], x [T, in], lora_a 1-D, lora_bt 1-D, ranks per slot, A element offsets per slot,
#  Bt element offsets per slot, mapping) -> None
LoraApply = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, SlotValues, SlotValues, SlotValues,
                      LoraMapping], None]


def slot_weights(lora_a: torch.Tensor, lora_bt: torch.Tensor, rank: int, a_offset: int, b_offset: int,
                 in_features: int, out_features: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A slot's ``A`` [rank, in] and ``Bt`` [rank, out]: views of the flat buffers."""
    a = lora_a[a_offset:a_offset + rank * in_features].view(rank, in_features)
    bt = lora_bt[b_offset:b_offset + rank * out_features].view(rank, out_features)
    return a, bt


def lora_apply_reference(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor,
                         ranks: SlotValues, a_offsets: SlotValues, b_offsets: SlotValues,
                         token_slots: torch.Tensor) -> None:
    """The maths as a loop (the oracle for every fast path).

    for t in range(num_tokens):
        s = token_slots[t]
        if s >= 0:
            r = ranks[s]
            A = lora_a[a_offsets[s] : a_offsets[s] + r * in].view(r, in)
            Bt = lora_bt[b_offsets[s] : b_offsets[s] + r * out].view(r, out)
            y[t] += (A @ x[t]) @ Bt
    """
    for t in range(x.shape[0]):
        s = int(token_slots[t])
        if s >= 0:
            a, bt = slot_weights(lora_a, lora_bt, int(ranks[s]), int(a_offsets[s]), int(b_offsets[s]),
                                 x.shape[1], y.shape[1])
            y[t] += (a @ x[t]) @ bt


def _run_view(buf: torch.Tensor, offset: int, step: int, count: int, rank: int, width: int) -> torch.Tensor:
    """[count, rank, width]: ``count`` blocks of ``rank`` rows, block i at ``offset + i * step``."""
    return buf.as_strided((count, rank, width), (step, width, 1), buf.storage_offset() + offset)


def sgmv(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor,
         ranks: SlotValues, a_offsets: SlotValues, b_offsets: SlotValues, mapping: LoraMapping) -> None:
    """Segment layout, one batched matmul pair per run (segments whose slots step evenly).

    for run in runs:  # n segments of `width` tokens; segment i's A at a_off + i*a_step, Bt at b_off + i*b_step
        xs = x[run tokens] viewed [n, width, in]
        A_run = [n, r, in] strided view of lora_a; Bt_run likewise [n, r, out] of lora_bt
        y[run tokens] viewed [n, width, out] += (A_run @ xs^T)^T @ Bt_run
    """
    runs = mapping.segment_runs(ranks, a_offsets, b_offsets)
    if not runs:
        return
    # In the LoRA compute dtype (fp32 pool buffers for a bf16 model on CPU, layers.py) the adapted
    # rows (from the first one on: rows before it need no copy) are converted once per module.
    first = min(run.start for run in runs)
    in_f, out_f = x.shape[1], y.shape[1]
    xc = x[first:].to(lora_a.dtype)  # [T - first, in]
    yc = y[first:].to(lora_bt.dtype)  # [T - first, out], y itself when the dtypes agree
    for run in runs:
        n, r = run.count, run.rank
        xs = xc[run.start - first:run.end - first].reshape(n, run.width, -1)  # [n, width, in]
        a = _run_view(lora_a, run.a_offset, run.a_step, n, r, in_f)  # [n, r, in]
        h = torch.bmm(a, xs.transpose(1, 2))  # [n, r, width]
        ys = yc[run.start - first:run.end - first].view(n, run.width, -1)  # [n, width, out], a view
        ys.baddbmm_(h.transpose(1, 2), _run_view(lora_bt, run.b_offset, run.b_step, n, r, out_f))
    if yc.data_ptr() != y.data_ptr():
        y[first:].copy_(yc)


def _gathered_rows(buf: torch.Tensor, offsets: torch.Tensor, j: torch.Tensor, width: int) -> torch.Tensor:
    """[T, R, width]: row ``j`` (width elements from ``offsets[t] + j * width``) of each token's
    slot, clamped into the buffer (a window view: row e of it is ``buf[e : e + width]``)."""
    windows = buf.as_strided((buf.numel() - width + 1, width), (1, 1), buf.storage_offset())
    starts = (offsets.long()[:, None] + j * width).clamp(0, buf.numel() - width)  # [T, R]
    return windows[starts]


def bgmv(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor,
         ranks: SlotValues, a_offsets: SlotValues, b_offsets: SlotValues, mapping: LoraMapping) -> None:
    """Gather layout: every row gathers ``max_rank`` rows from its slot's offsets (clamped into the
    buffers), masked past the slot's rank (those rows are other adapters' weights), and rows without
    a slot add an exact zero. Reads nothing on the host but the fixed rank bound, so it is the
    torch apply a captured decode step (static mapping) can replay; costly on CPU otherwise.

    for t in range(T):
        s = max(token_slots[t], 0); keep = token_slots[t] >= 0
        for j in range(max_rank):
            if keep and j < ranks[s]:
                a_row = lora_a[a_offsets[s] + j*in :][:in]; bt_row = lora_bt[b_offsets[s] + j*out :][:out]
                y[t] += (a_row @ x[t]) * bt_row
    """
    max_rank = rank_bound(ranks)
    if max_rank == 0:
        return
    device = x.device
    has_slot = mapping.token_slots >= 0  # [T]
    slots = mapping.token_slots.clamp(min=0)  # [T]
    j = torch.arange(max_rank, device=device)  # [R]
    keep = (j < device_table(ranks, device)[slots][:, None]) & has_slot[:, None]  # [T, R]
    a = _gathered_rows(lora_a, device_table(a_offsets, device)[slots], j, x.shape[1])  # [T, R, in]
    h = torch.bmm(a, x.to(lora_a.dtype).unsqueeze(2))  # [T, R, 1]
    h = torch.where(keep[:, :, None], h, 0)  # other adapters' rows and rows without a slot: exact zeros
    bt = _gathered_rows(lora_bt, device_table(b_offsets, device)[slots], j, y.shape[1])  # [T, R, out]
    bt = torch.where(keep[:, :, None], bt, 0)
    if y.dtype == lora_bt.dtype:
        y.unsqueeze(1).baddbmm_(h.transpose(1, 2), bt)  # [T, 1, out], a view of y
    else:
        y.add_(torch.bmm(h.transpose(1, 2), bt)[:, 0])


def lora_apply(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor,
               ranks: SlotValues, a_offsets: SlotValues, b_offsets: SlotValues, mapping: LoraMapping) -> None:
    """Add every token's LoRA delta to ``y`` [T, out] in place; ``x`` is [T, in]."""
    if mapping.is_static:
        bgmv(y, x, lora_a, lora_bt, ranks, a_offsets, b_offsets, mapping)
    elif mapping.segments:
        sgmv(y, x, lora_a, lora_bt, ranks, a_offsets, b_offsets, mapping)


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
                 ranks, a_offsets, b_offsets, mapping: LoraMapping) -> None:
        if mapping.is_static:
            bgmv(y, x, lora_a, lora_bt, ranks, a_offsets, b_offsets, mapping)
        elif not mapping.segments:
            return
        elif self.kernels.supports_lora(x.dtype, lora_a.dtype):
            device = x.device
            self.kernels.lora_sgmv(y, x, lora_a, lora_bt, device_table(ranks, device),
                                   device_table(a_offsets, device), device_table(b_offsets, device),
                                   mapping.segment_table(), rank_bound(ranks))
        else:  # a dtype the kernel lacks (fp16): the torch runs
            sgmv(y, x, lora_a, lora_bt, ranks, a_offsets, b_offsets, mapping)


def apply_function(device: torch.device | str, native=None) -> LoraApply:
    """The LoRA apply for a model on ``device``: a Triton backend on CUDA (when triton imports), the
    native kernel on CPU when ``native`` kernels are given, else the torch ``lora_apply``. Call once
    per model: a Triton backend keeps per-step caches."""
    if torch.device(device).type == "cpu" and native is not None:
        return NativeLoraApply(native)
    return select_lora_backend(device) or lora_apply
