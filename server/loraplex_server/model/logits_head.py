"""The LM head computing into logits memory it keeps (CPU), not into a fresh tensor per step.

A decode step of N sequences makes an N x vocab logits tensor: 256 x 49,152 fp32 is 50 MB. Fresh
each step, glibc serves a block that large with mmap, so every page faults on its first write and
munmap hands the pages back after sampling: measured here, 104 ms for that LM head matmul on a
2-layer model against 68 ms into memory already touched, plus ~9 ms to free it. This head keeps one
buffer, grown to the largest step seen, and writes each step's logits into its leading rows with the
same matmul ``F.linear`` runs (``x @ W^T``; bit-equal).

The returned logits are a view of that buffer: valid until the head's next forward. The runner
samples from them before the next step; whoever keeps logits longer must copy them.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel


class ReusedLogitsHead(nn.Module):
    """A bias-free ``nn.Linear`` LM head that, under ``torch.inference_mode`` (the runner's), writes
    into its buffer; anywhere else (no_grad, training) it is the plain head."""

    def __init__(self, head: nn.Linear):
        super().__init__()
        if head.bias is not None:
            raise ValueError("ReusedLogitsHead wraps a bias-free LM head")
        self.head: nn.Linear = head
        self._buffer: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:  # transformers' get_output_embeddings().weight
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        weight = self.head.weight
        if (not torch.is_inference_mode_enabled() or hidden.dtype != weight.dtype  # the buffer is an
                or hidden.device != weight.device):  # inference tensor: written only in inference mode
            return self.head(hidden)
        lead = hidden.shape[:-1]
        rows = lead.numel()
        out = self._rows(rows)
        torch.mm(hidden.reshape(rows, hidden.shape[-1]), weight.t(), out=out)
        return out.view(*lead, weight.shape[0])

    def _rows(self, rows: int) -> torch.Tensor:
        weight = self.head.weight
        if self._buffer is None or self._buffer.shape[0] < rows:
            self._buffer = torch.empty(rows, weight.shape[0], dtype=weight.dtype, device=weight.device)
        return self._buffer[:rows]


def reuse_logits_memory(model: PreTrainedModel) -> bool:
    """Wrap ``model``'s LM head when it is a bias-free ``nn.Linear`` on the CPU; True if wrapped."""
    head = model.get_output_embeddings()
    if type(head) is not nn.Linear or head.bias is not None or head.weight.device.type != "cpu":
        return False
    model.set_output_embeddings(ReusedLogitsHead(head))
    return True
