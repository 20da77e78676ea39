"""Per-step token -> device-slot mapping for the batched LoRA apply.

The runner packs sequences sorted by slot, so tokens of one adapter form contiguous segments.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

NO_SLOT = -1


@dataclass(frozen=True)
class SlotBatches:
    """Tokens regrouped per slot and padded to the longest group, for batched matmuls.

    ``gather`` [num_slots * width]: token row for each (slot, position) cell (padding reads row 0);
    ``valid`` [n]: the cells holding real tokens; ``dest`` [n]: their token rows.
    """

    gather: torch.Tensor
    valid: torch.Tensor
    dest: torch.Tensor
    width: int


@dataclass(frozen=True)
class LoraMapping:
    token_slots: torch.Tensor  # [num_tokens] slot of each token, NO_SLOT for the base model
    segments: tuple[tuple[int, int, int], ...]  # (start, end, slot): maximal runs with slot >= 0
    num_tokens: int
    _batches: dict = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def from_runs(cls, runs: list[tuple[int, int]], device: torch.device | str = "cpu") -> "LoraMapping":
        """``runs``: (slot, num_tokens) per packed sequence, in packed order."""
        segments: list[list[int]] = []
        slots: list[int] = []
        start = 0
        for slot, n in runs:
            if n <= 0:
                continue
            slots.extend([slot] * n)
            if slot != NO_SLOT:
                if segments and segments[-1][2] == slot and segments[-1][1] == start:
                    segments[-1][1] = start + n
                else:
                    segments.append([start, start + n, slot])
            start += n
        token_slots = torch.tensor(slots, dtype=torch.long, device=device)
        return cls(token_slots, tuple(tuple(s) for s in segments), start)

    @property
    def has_lora(self) -> bool:
        return bool(self.segments)

    @property
    def active_slots(self) -> set[int]:
        return {s for _, _, s in self.segments}

    def slot_batches(self, num_slots: int) -> SlotBatches:
        """The per-slot regrouping (computed once per step, shared by every LoRA layer)."""
        if num_slots not in self._batches:
            rows: dict[int, list[int]] = {}
            for start, end, slot in self.segments:
                rows.setdefault(slot, []).extend(range(start, end))
            width = max(len(r) for r in rows.values())
            gather = torch.zeros(num_slots, width, dtype=torch.long)
            valid = torch.zeros(num_slots, width, dtype=torch.bool)
            for slot, r in rows.items():
                gather[slot, :len(r)] = torch.tensor(r)
                valid[slot, :len(r)] = True
            gather, valid = gather.flatten(), valid.flatten().nonzero().squeeze(1)
            device = self.token_slots.device
            self._batches[num_slots] = SlotBatches(gather.to(device), valid.to(device),
                                                   gather[valid].to(device), width)
        return self._batches[num_slots]
