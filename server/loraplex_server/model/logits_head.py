"""The LM head computing into logits memory it keeps (CPU), not into a fresh tensor per step.

A decode step of N sequences makes an N x vocab logits tensor: 256 x 49,152 fp32 is 50 MB. Fresh
each step, glibc serves a block that large with mmap, so every page faults on its first write and
munmap hands the pages back after sampling: measured here, 104 ms for that LM head matmul on a
2-layer model against 68 ms into memory already touched, plus ~9 ms to free it. This head keeps one
buffer, grown to the largest step seen, and writes each step's logits into its leading rows with the
same matmul ``F.linear`` runs (``x @ W^T``; bit-equal).

The returned logits are a view of that buffer: valid until the head's next forward. The runner
samples from them before the next step; whoever keeps logits longer must copy them.

A head packed for oneDNN (packed_linear.py) has no ``out=``: its logits come fresh. Below
``CHUNK_BYTES`` glibc serves them from the heap (its mmap threshold grows to 32 MB once a block
that large was freed), so they are returned as they are; above it the rows are computed in chunks
that size and copied into the buffer. Measured on a 2-layer model with the 49k vocabulary, 256
rows: fresh 50 MB logits cost ~20 ms of page faults in the forward and ~9 ms of munmap after
sampling per step; the chunked copy costs ~8-10 ms of the forward instead.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedModel

from .packed_linear import PackedLinear

CHUNK_BYTES = 16 * 1024 * 1024  # a packed head's logits above this go through the buffer in chunks


class ReusedLogitsHead(nn.Module):
    """A bias-free LM head (``nn.Linear`` or ``PackedLinear``) that, under ``torch.inference_mode``
    (the runner's), writes into its buffer; anywhere else (no_grad, training) it is the plain head."""

    def __init__(self, head: nn.Linear | PackedLinear):
        super().__init__()
        if head.bias is not None:
            raise ValueError("ReusedLogitsHead wraps a bias-free LM head")
        self.head = head
        self.out_features: int = head.out_features
        weights = _weights(head)
        self._dtype, self._device = weights.dtype, weights.device
        self._buffer: torch.Tensor | None = None

    @property
    def weight(self) -> torch.Tensor:  # transformers' get_output_embeddings().weight (nn.Linear's)
        if isinstance(self.head, PackedLinear):
            raise AttributeError("a packed LM head keeps only its packed weight")
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if (not torch.is_inference_mode_enabled() or hidden.dtype != self._dtype  # the buffer is an
                or hidden.device != self._device):  # inference tensor: written only in inference mode
            return self.head(hidden)
        lead = hidden.shape[:-1]
        rows = lead.numel()
        x = hidden.reshape(rows, hidden.shape[-1])
        if isinstance(self.head, nn.Linear):
            out = self._rows(rows)
            torch.mm(x, self.head.weight.t(), out=out)
        else:
            row_bytes = self.out_features * hidden.element_size()
            if rows * row_bytes <= CHUNK_BYTES:
                return self.head(hidden)
            out = self._rows(rows)
            chunk = max(1, CHUNK_BYTES // row_bytes)
            for start in range(0, rows, chunk):
                out[start:start + chunk].copy_(self.head(x[start:start + chunk]))
        return out.view(*lead, self.out_features)

    def _rows(self, rows: int) -> torch.Tensor:
        if self._buffer is None or self._buffer.shape[0] < rows:
            self._buffer = torch.empty(rows, self.out_features, dtype=self._dtype, device=self._device)
        return self._buffer[:rows]


def _weights(head: nn.Linear | PackedLinear) -> torch.Tensor:
    return head.packed_weight if isinstance(head, PackedLinear) else head.weight


def reuse_logits_memory(model: PreTrainedModel) -> bool:
    """Wrap ``model``'s LM head when it is a bias-free ``nn.Linear`` or ``PackedLinear`` on the
    CPU; True if wrapped."""
    head = model.get_output_embeddings()
    if not (type(head) is nn.Linear or isinstance(head, PackedLinear)):
        return False
    if head.bias is not None or _weights(head).device.type != "cpu":
        return False
    model.set_output_embeddings(ReusedLogitsHead(head))
    return True
