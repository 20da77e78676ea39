"""Batched LoRA apply: ``y[t] += B[slot(t)] @ (A[slot(t)] @ x[t])`` for every token with a slot.

Slot buffers are stacked and padded to the maximum rank: ``lora_a`` [num_slots, max_rank, in],
``lora_b`` [num_slots, out, max_rank], with the LoRA scaling already folded into ``lora_b``.
Padded rank rows/columns are zero, so padding changes nothing; ``ranks[s]`` (0 = slot unused by
this module) lets the fast paths skip the padding. Rows without a slot keep the base output
exactly (nothing is added to them).

Layouts behind one function (``lora_apply``):
- SGMV (segment): one shrink/expand matmul pair per contiguous run of tokens of one adapter.
  Best when runs are long (prefill) or few.
- Slot-batched SGMV: tokens regrouped per slot (padded to the longest group) and two batched
  matmuls over all slots at once. Best when most slots are busy with short runs (many-adapter
  decode): a fixed handful of ops per layer, whatever the number of adapters.
- BGMV (gather): per-token gather of the slot weights and batched matmuls per token; the layout
  GPU kernels use for decode. On CPU the gathers cost more than they save, so the dispatcher
  does not pick it there.
"""

from __future__ import annotations

import torch

from .mapping import LoraMapping

# Measured on CPU (benchmarks in the notes): the slot-batched form wins once more than a few
# segments are present and most slots are in use; otherwise plain segments win.
SGMV_MAX_SEGMENTS = 4
BATCHED_MIN_SLOT_SHARE = 0.75


def lora_apply_reference(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                         token_slots: torch.Tensor) -> None:
    """The maths as a loop (the oracle for every fast path).

    for t in range(num_tokens):
        s = token_slots[t]
        if s >= 0:
            y[t] += lora_b[s] @ (lora_a[s] @ x[t])
    """
    for t in range(x.shape[0]):
        s = int(token_slots[t])
        if s >= 0:
            y[t] += lora_b[s] @ (lora_a[s] @ x[t])


def sgmv(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
         ranks: list[int], segments) -> None:
    """Segment layout: y [T, out] += per segment (x[seg] @ A[s,:r].T) @ B[s,:,:r].T."""
    for start, end, slot in segments:
        r = ranks[slot]
        if r == 0:
            continue
        h = x[start:end] @ lora_a[slot, :r].T  # [seg, r]
        y[start:end].addmm_(h, lora_b[slot, :, :r].T)  # [seg, out]


def bgmv(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
         ranks: list[int], mapping: LoraMapping) -> None:
    """Gather layout: gather each token's slot weights and run two batched matmuls."""
    r = max((ranks[s] for s in mapping.active_slots), default=0)
    if r == 0:
        return
    rows = mapping.token_slots >= 0
    slots = mapping.token_slots.clamp(min=0)  # [T]
    a = lora_a[slots, :r]  # [T, r, in]
    b = lora_b[slots, :, :r]  # [T, out, r]
    h = torch.bmm(a, x.unsqueeze(2))  # [T, r, 1]
    delta = torch.bmm(b, h).squeeze(2)  # [T, out]
    if bool(rows.all()):
        y += delta
    else:
        y[rows] += delta[rows]


def slot_batched_sgmv(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
                      ranks: list[int], mapping: LoraMapping) -> None:
    """Slot-batched layout: y[dest] += bmm(bmm(x regrouped [S, W, in], A^T), B^T) for real cells."""
    r = max((ranks[s] for s in mapping.active_slots), default=0)
    if r == 0:
        return
    num_slots = lora_a.shape[0]
    batches = mapping.slot_batches(num_slots)
    xs = x.index_select(0, batches.gather).view(num_slots, batches.width, -1)  # [S, W, in]
    h = torch.bmm(xs, lora_a[:, :r].transpose(1, 2))  # [S, W, r]
    delta = torch.bmm(h, lora_b[:, :, :r].transpose(1, 2)).view(num_slots * batches.width, -1)  # [S*W, out]
    y.index_add_(0, batches.dest, delta.index_select(0, batches.valid))


def lora_apply(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               ranks: list[int], mapping: LoraMapping) -> None:
    """Add every token's LoRA delta to ``y`` [T, out] in place; ``x`` is [T, in]."""
    segments = mapping.segments
    if not segments:
        return
    busy = len(mapping.active_slots) >= BATCHED_MIN_SLOT_SHARE * lora_a.shape[0]
    if len(segments) > SGMV_MAX_SEGMENTS and busy:
        slot_batched_sgmv(y, x, lora_a, lora_b, ranks, mapping)
    else:
        sgmv(y, x, lora_a, lora_b, ranks, segments)
