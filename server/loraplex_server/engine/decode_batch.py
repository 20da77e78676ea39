"""The persistent decode batch: a pure-decode step's packed inputs, updated for the next one.

A steady decode phase runs the same requests step after step, each one token further on. Instead
of packing every row again (sorting by LoRA slot, one block table per row, the LoRA mapping), the
runner keeps the last pure-decode step's rows here (vLLM's persistent batch) and, when the next
step decodes the same requests or a subset of them (others finished or were preempted), updates
them in numpy:

    for each kept row r (packed order unchanged):
        position[r] = request.num_computed_tokens         # the token this step computes
        input_id[r] = the request's last token             # sampled by the previous step
        if the request holds more blocks than table[r]:  table[r] = request.block_ids
        new_slot[r] = table[r][position // block_size] * block_size + position % block_size
        ctx_len[r]  = position + 1

When the rows' last step sampled a token for every row (``took_tokens``), that step's positions
and tokens already say the above without reading the requests: each kept request has since
recorded exactly that token and moved one position on (a request that ended, or was preempted,
is not scheduled again, so it is no longer a row). Only a row whose new position starts a block
reads its request's blocks. A step that failed before sampling leaves no tokens: the next one
reads every request.

Anything else (a request that is new to the rows, a prefill in the step, a LoRA slot moved) packs
from scratch. A running request's blocks only ever grow at the end (shared prefix blocks are never
rewritten), so a table row whose length matches is current.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..host_tensors import padded_array
from ..lora.ids import VersionKey
from ..lora.mapping import LoraMapping
from .request import Request


@dataclass
class DecodeRows:
    requests: list[Request]  # packed order
    scheduled: list[Request]  # the same requests in the scheduler's order (what the next step compares)
    lora_slots: np.ndarray  # [n] int64 LoRA slot per row (NO_SLOT: base model)
    table: np.ndarray  # [n, capacity] int32 block ids, zero padded
    table_lens: np.ndarray  # [n] int64 blocks in each table row
    slot_of_key: dict[VersionKey, int]  # the step's LoRA slots the rows were packed with
    pool_order: dict[int, int]  # LoRA slot -> where its rows start in the pool, when packed
    mapping: LoraMapping | None
    positions: np.ndarray | None = None  # [n] the last step's positions
    sampled: np.ndarray | None = None  # [n] the tokens the last step sampled (``took_tokens``)

    @classmethod
    def build(cls, requests: list[Request], scheduled: list[Request], lora_slots: list[int],
              slot_of_key: dict[VersionKey, int], pool_order: dict[int, int],
              mapping: LoraMapping | None) -> DecodeRows:
        """``requests`` in packed order with their ``lora_slots``; ``scheduled``: the step's order."""
        blocks = [r.block_ids for r in requests]
        lens = np.fromiter(map(len, blocks), np.int64, count=len(blocks))
        table = padded_array(blocks, np.int32, int(lens.max()) + 1 if blocks else 1)  # a spare column to grow into
        return cls(list(requests), list(scheduled), np.array(lora_slots, np.int64), table, lens, dict(slot_of_key),
                   pool_order, mapping)

    def follow(self, requests: list[Request], slot_of_key: dict[VersionKey, int],
               pool_order: Callable[[int], int], device: torch.device) -> bool:
        """Make the rows those of ``requests`` (this step's, all decodes that sample): True when
        they are the rows' requests or a subset of them, packed with the same LoRA slots; False
        (rows unchanged) when the step must pack from scratch."""
        if slot_of_key != self.slot_of_key and any(
                self.slot_of_key.get(k, -2) != slot for k, slot in slot_of_key.items()):
            return False  # a running adapter's slot changed (a kept row's key maps elsewhere)
        if any(pool_order(slot) != start for slot, start in self.pool_order.items()):
            return False  # extents moved (pool compaction): the packed order is stale
        if requests == self.scheduled:  # identity: a Request compares by identity (eq=False)
            return True  # the same requests in the same order: nothing to drop
        wanted = {id(r) for r in requests}
        if len(wanted) != len(requests):
            return False
        keep = np.fromiter((id(r) in wanted for r in self.requests), bool, count=len(self.requests))
        if int(keep.sum()) != len(requests):
            return False  # a request new to the rows
        self.requests = [r for r, kept in zip(self.requests, keep.tolist(), strict=True) if kept]
        self.scheduled = list(requests)
        self.lora_slots, self.table, self.table_lens = self.lora_slots[keep], self.table[keep], self.table_lens[keep]
        if self.positions is not None and self.sampled is not None:
            self.positions, self.sampled = self.positions[keep], self.sampled[keep]
        self.mapping = None if self.mapping is None else LoraMapping.from_runs(
            [(slot, 1) for slot in self.lora_slots.tolist()], device)
        return True

    def took_tokens(self, token_ids: list[int]) -> None:
        """The step just packed from these rows sampled ``token_ids`` (one per row, row order)."""
        self.sampled = np.array(token_ids, np.int64)

    def step_arrays(self, block_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(input ids, positions, new cache slots, block table) of this step, rows in packed order."""
        requests, n = self.requests, len(self.requests)
        if self.positions is not None and self.sampled is not None:  # each row one token on
            positions, ids, lens = self.positions + 1, self.sampled, self.table_lens.copy()
            for row in np.flatnonzero(positions % block_size == 0).tolist():
                lens[row] = len(requests[row].block_ids)
        else:
            flat: list[int] = []  # one flat list: numpy reads it 2x faster than a list of tuples
            for r in requests:
                flat += (r.num_computed_tokens, (r.output_token_ids or r.prompt_token_ids)[-1], len(r.block_ids))
            state = np.array(flat, np.int64).reshape(n, 3)
            positions, ids, lens = state[:, 0].copy(), state[:, 1].copy(), state[:, 2].copy()
        self.positions, self.sampled = positions, None
        for row in np.flatnonzero(lens != self.table_lens).tolist():
            blocks = requests[row].block_ids
            if len(blocks) > self.table.shape[1]:
                grown = np.zeros((n, len(blocks) + 1), np.int32)
                grown[:, :self.table.shape[1]] = self.table
                self.table = grown
            self.table[row, :len(blocks)] = blocks
            self.table[row, len(blocks):] = 0
        self.table_lens = lens
        rows = np.arange(n)
        new_slots = self.table[rows, positions // block_size].astype(np.int64) * block_size + positions % block_size
        return ids, positions, new_slots, self.table[:, :int(lens.max()) if n else 0].copy()

