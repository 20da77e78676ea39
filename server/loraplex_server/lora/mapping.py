"""Per-step token -> device-slot mapping for the batched LoRA apply.

The runner packs sequences sorted by slot, so tokens of one adapter form contiguous segments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

NO_SLOT = -1


@dataclass(frozen=True)
class LoraMapping:
    token_slots: torch.Tensor  # [num_tokens] slot of each token, NO_SLOT for the base model
    segments: tuple[tuple[int, int, int], ...]  # (start, end, slot): maximal runs with slot >= 0
    num_tokens: int

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
