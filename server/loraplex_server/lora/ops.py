"""Batched LoRA apply: ``y[t] += B[slot(t)] @ (A[slot(t)] @ x[t])`` for every token with a slot.

Slot buffers are stacked and padded to the maximum rank: ``lora_a`` [num_slots, max_rank, in],
``lora_b`` [num_slots, out, max_rank], with the LoRA scaling already folded into ``lora_b``.
Padded rank rows/columns are zero, so padding changes nothing; ``ranks[s]`` (0 = slot unused by
this module) lets the fast paths skip the padding. Rows without a slot keep the base output
exactly (nothing is added to them).

Two layouts behind one function (``lora_apply``):
- SGMV (segment): one shrink/expand matmul pair per contiguous run of tokens of one adapter.
  Best when runs are long (prefill) or few.
- BGMV (gather): per-token gather of the slot weights, one batched matmul pair for all tokens.
  Best for decode batches with many distinct adapters.
"""

from __future__ import annotations

import torch

from .mapping import LoraMapping

# Use the segment layout when there are at most this many segments, or long ones.
SGMV_MAX_SEGMENTS = 4
SGMV_MIN_TOKENS_PER_SEGMENT = 8


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


def lora_apply(y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor,
               ranks: list[int], mapping: LoraMapping) -> None:
    """Add every token's LoRA delta to ``y`` [T, out] in place; ``x`` is [T, in]."""
    segments = mapping.segments
    if not segments:
        return
    if len(segments) <= SGMV_MAX_SEGMENTS or mapping.num_tokens >= SGMV_MIN_TOKENS_PER_SEGMENT * len(segments):
        sgmv(y, x, lora_a, lora_b, ranks, segments)
    else:
        bgmv(y, x, lora_a, lora_b, ranks, mapping)
