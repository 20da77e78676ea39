"""The fixed input buffers of a captured decode step, and the step metadata read from them.

A CUDA graph replays kernels on the exact tensors it was captured with, so everything that varies
from step to step lives in two device buffers with fixed addresses, one row per sequence:

    rows   [max_batch, 5] int32:  token id | position | cache slot written | context length | LoRA slot
    tables [max_batch, max_blocks] int32: the sequence's cache blocks

Each step the runner's sequences are staged in pinned host memory and sent in two copies; the
captured forward reads every other tensor (ids, positions, slot mapping, context lengths, LoRA
token slots, block tables) as views of these. Only the block-table columns the step's longest
sequence uses are sent: the attention never reads a table past a sequence's context length.

Rows past a step's real sequences are padding: token 0 at position 0, writing and attending only
the *trash slot*, a cache block no sequence owns, with no adapter. Every row is computed (a fixed
shape), none of the padding reaches a real row: attention, the linears and the LoRA apply are all
per row or per sequence.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..lora.mapping import NO_SLOT, LoraMapping
from ..model.attention import PagedAttentionMetadata
from ..model.triton_attention import VarlenPagedMeta
from .kv_blocks import cache_slot
from .request import Request

TOKEN, POSITION, NEW_SLOT, CONTEXT, LORA_SLOT = range(5)
COLUMNS = 5  # per-row fields before the block table


@dataclass(frozen=True)
class DecodeRow:
    """One sequence of a pure-decode step: its next token and where it lives in the cache."""

    token_id: int
    position: int
    block_ids: list[int]
    lora_slot: int

    @classmethod
    def of(cls, request: Request, lora_slot: int) -> DecodeRow:
        pos = request.num_computed_tokens
        return cls(request.token_slice(pos, pos + 1)[0], pos, request.block_ids, lora_slot)


class StaticDecodeInputs:
    """``rows`` and ``tables`` on the device (the graphs' only varying inputs) and their host staging."""

    def __init__(self, max_batch: int, max_blocks: int, block_size: int, trash_block: int,
                 device: torch.device):
        self.max_batch, self.max_blocks, self.block_size = max_batch, max_blocks, block_size
        self.device = device
        self.rows = torch.zeros(max_batch, COLUMNS, dtype=torch.int32, device=device)  # [max_batch, 5]
        self.tables = torch.zeros(max_batch, max_blocks, dtype=torch.int32, device=device)  # [max_batch, max_blocks]
        pin = device.type == "cuda"
        self._host_rows = torch.zeros(max_batch, COLUMNS, dtype=torch.int32, pin_memory=pin)
        self._host_tables = torch.zeros(max_batch * max_blocks, dtype=torch.int32, pin_memory=pin)  # flat
        self._padding = (0, 0, trash_block * block_size, 1, NO_SLOT)
        self._trash_block = trash_block
        self._host_rows.numpy()[:] = self._padding
        self.rows.copy_(self._host_rows)
        self.tables[:, 0] = trash_block
        self._copied = torch.cuda.Event() if pin else None  # the staging buffers are free again
        self._seq_index = torch.arange(max_batch, dtype=torch.int32, device=device)  # [max_batch]
        self._ones = torch.ones(max_batch, dtype=torch.int32, device=device)  # [max_batch]

    def write(self, batch: list[DecodeRow], size: int) -> None:
        """Stage ``batch`` (at most ``size`` rows, padding after) and copy it to the device."""
        if not 0 < len(batch) <= size <= self.max_batch:
            raise ValueError(f"{len(batch)} sequences do not fit a padded batch of {size}")
        width = max(len(row.block_ids) for row in batch)
        if width > self.max_blocks:
            raise ValueError(f"a sequence holds {width} blocks, the table has {self.max_blocks}")
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copies have left the staging buffers
        rows = self._host_rows.numpy()
        host_tables = self._host_tables[:size * width].view(size, width)  # pinned, like its storage
        tables = host_tables.numpy()
        bs = self.block_size
        for i, row in enumerate(batch):
            slot = cache_slot(row.block_ids, bs, row.position)
            rows[i] = (row.token_id, row.position, slot, row.position + 1, row.lora_slot)
            tables[i, :len(row.block_ids)] = row.block_ids
        rows[len(batch):size] = self._padding
        tables[len(batch):size, 0] = self._trash_block
        self.rows[:size].copy_(self._host_rows[:size], non_blocking=True)
        self.tables[:size, :width].copy_(host_tables, non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def attention(self, size: int, kv_caches) -> PagedAttentionMetadata:
        """The step's attention metadata as views of ``rows`` (both the torch and Triton forms)."""
        rows = self.rows[:size]  # [size, 5]
        ctx_lens = rows[:, CONTEXT].contiguous()  # [size] int32
        tables = self.tables[:size]  # [size, max_blocks] int32
        varlen = VarlenPagedMeta(q_starts=self._seq_index[:size], q_lens=self._ones[:size], ctx_lens=ctx_lens,
                                 block_tables=tables, block_size=self.block_size, max_q_len=1)
        return PagedAttentionMetadata(
            kv_caches=kv_caches, slot_mapping=rows[:, NEW_SLOT].long(), prefills=[],
            decode_rows=self._seq_index[:size].long(), decode_ctx_lens=ctx_lens,
            decode_block_tables=tables, block_size=self.block_size, varlen=varlen)

    def token_ids(self, size: int) -> torch.Tensor:
        return self.rows[:size, TOKEN].long()[None]  # [1, size]

    def positions(self, size: int) -> torch.Tensor:
        return self.rows[:size, POSITION].long()[None]  # [1, size]

    def lora_mapping(self, size: int) -> LoraMapping:
        return LoraMapping.static(self.rows[:size, LORA_SLOT].long())  # [size] contiguous copy
