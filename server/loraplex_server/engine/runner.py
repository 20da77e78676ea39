"""Model runner: a scheduled batch -> packed tensors -> model forward -> sampled tokens.

No policy lives here: the scheduler decided what runs; the runner only executes it. Sequences are
packed sorted by where their LoRA slot's rows start in the weight pool, so each adapter's tokens
form one contiguous segment and adapters side by side in the pool are neighbouring segments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ..host_tensors import int_tensor, padded_rows
from ..lora.ids import VersionKey
from ..lora.manager import LoraManager
from ..lora.mapping import NO_SLOT, LoraMapping
from ..model.attention import META_KWARG, PagedAttentionMetadata, PrefillSpan, block_slots
from ..model.native import NativeKernels
from .decode_batch import DecodeRows
from .decode_graphs import DecodeGraphs, on_device
from .decode_inputs import DecodeRow
from .kv_blocks import cache_slot
from .request import Request
from .sampler import Sampler, SampleResult
from .scheduler import ScheduledRequest, SchedulerOutput


@dataclass
class PackedBatch:
    input_ids: torch.Tensor  # [1, num_tokens]
    position_ids: torch.Tensor  # [1, num_tokens]
    attention: PagedAttentionMetadata
    lora: LoraMapping | None
    logits_rows: torch.Tensor  # [num_sampling] packed index of each sampling request's last token
    sampling_requests: list[Request]


class ModelRunner:
    def __init__(self, model: torch.nn.Module, kv_caches, block_size: int, device: torch.device,
                 lora: LoraManager | None = None):
        self.model = model
        self.kv_caches = kv_caches
        self.block_size = block_size
        self.device = device
        self.lora = lora
        self.sampler = Sampler(device)
        self.decode_graphs: DecodeGraphs | None = None  # set by the engine when decode steps are captured
        self.decode_kernel: NativeKernels | None = None  # native CPU decode attention (use_native_kernels)
        self.decode_rows: DecodeRows | None = None  # the last pure-decode step's rows (decode_batch.py)
        self.before_forward: Callable[[], None] | None = None  # the engine's hook for this step (step_tokens)

    def use_native_kernels(self, kernels: NativeKernels | None) -> None:
        """Decode attention and the greedy argmax through the native CPU kernels (None: torch)."""
        self.decode_kernel = kernels
        self.sampler.fast_argmax = kernels.argmax if kernels is not None else None

    def slots_of(self, request: Request, num_tokens: int) -> torch.Tensor:
        """[num_tokens] cache slots of the request's first ``num_tokens`` positions."""
        return block_slots(torch.tensor(request.block_ids, dtype=torch.long), self.block_size)[:num_tokens]

    @staticmethod
    def _slot_of(lora_slots: dict[VersionKey, int]) -> Callable[[ScheduledRequest], int]:
        def slot(s: ScheduledRequest) -> int:
            return lora_slots.get(s.request.adapter_key, NO_SLOT) if s.request.adapter_key else NO_SLOT
        return slot

    def _packed_order(self, batch: SchedulerOutput, slot: Callable[[ScheduledRequest], int]) -> list[ScheduledRequest]:
        """Base-model rows first, then by the slot's first pool row (by slot without LoRA layers)."""
        return [s for _, s in self._slotted_order(batch, slot)]

    def _slotted_order(self, batch: SchedulerOutput,
                       slot: Callable[[ScheduledRequest], int]) -> list[tuple[int, ScheduledRequest]]:
        """(LoRA slot, scheduled sequence) in packed order, each slot looked up once."""
        slotted = [(slot(s), s) for s in batch.scheduled]
        lora = self.lora
        if lora is None:
            return sorted(slotted, key=lambda pair: pair[0])
        order = {lora_slot: lora.pack_order(lora_slot) for lora_slot in {pair[0] for pair in slotted}}
        return sorted(slotted, key=lambda pair: order[pair[0]])

    def pack(self, batch: SchedulerOutput, lora_slots: dict[VersionKey, int]) -> PackedBatch:
        """The step's packed inputs. A pure-decode step (every row one token that samples) updates
        the persistent decode rows (``decode_batch.py``) when the step's requests are theirs or a
        subset, and builds them when not; any other step packs every row from scratch."""
        scheduled = batch.scheduled
        if not scheduled or not all(s.num_new_tokens == 1 and s.samples and s.request.num_computed_tokens > 0
                                    for s in scheduled):
            self.decode_rows = None
            return self.pack_all(batch, lora_slots)
        rows = self.decode_rows
        if rows is None or not rows.follow([s.request for s in scheduled], lora_slots, self._pool_order,
                                           self.device):
            rows = self.decode_rows = self._build_decode_rows(batch, lora_slots)
        return self._packed_decodes(rows)

    def _pool_order(self, slot: int) -> int:
        return self.lora.pack_order(slot) if self.lora is not None else 0

    def _build_decode_rows(self, batch: SchedulerOutput, lora_slots: dict[VersionKey, int]) -> DecodeRows:
        slotted = self._slotted_order(batch, self._slot_of(lora_slots))
        slots = [slot for slot, _ in slotted]
        mapping = LoraMapping.from_runs([(slot, 1) for slot in slots], self.device) if self.lora is not None else None
        return DecodeRows.build([s.request for _, s in slotted], [s.request for s in batch.scheduled], slots,
                                lora_slots, {slot: self._pool_order(slot) for slot in set(slots)}, mapping)

    def _packed_decodes(self, rows: DecodeRows) -> PackedBatch:
        ids, positions, new_slots, table = rows.step_arrays(self.block_size)
        dev = self.device
        every_row = torch.arange(len(ids), device=dev)
        attention = PagedAttentionMetadata(
            kv_caches=self.kv_caches, slot_mapping=torch.from_numpy(new_slots).to(dev), prefills=[],
            decode_rows=every_row, decode_ctx_lens=torch.from_numpy((positions + 1).astype(np.int32)).to(dev),
            decode_block_tables=torch.from_numpy(table).to(dev), block_size=self.block_size,
            decode_kernel=self.decode_kernel)
        return PackedBatch(input_ids=torch.from_numpy(ids).to(dev).view(1, -1),
                           position_ids=torch.from_numpy(positions).to(dev).view(1, -1), attention=attention,
                           lora=rows.mapping, logits_rows=every_row, sampling_requests=list(rows.requests))

    def pack_all(self, batch: SchedulerOutput, lora_slots: dict[VersionKey, int]) -> PackedBatch:
        """Every row packed from the scheduled requests (any step; the reference for the decode rows)."""
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        new_slots: list[int] = []
        prefills: list[PrefillSpan] = []
        runs: list[tuple[int, int]] = []  # (LoRA slot, num_tokens) per packed sequence
        decode_rows: list[int] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        logits_rows: list[int] = []
        sampling: list[Request] = []
        offset = 0
        for lora_slot, s in self._slotted_order(batch, self._slot_of(lora_slots)):
            req, n = s.request, s.num_new_tokens
            start = req.num_computed_tokens
            blocks = req.block_ids
            if n == 1 and start > 0:  # a decode: one token reading the cache in place
                ids.append(req.token_at(start))
                positions.append(start)
                new_slots.append(blocks[start // bs] * bs + start % bs)
                decode_rows.append(offset)
                decode_tables.append(blocks)
                decode_lens.append(start + 1)
            else:
                end = start + n
                ids.extend(req.token_slice(start, end))
                positions.extend(range(start, end))
                new_slots.extend(cache_slot(blocks, bs, p) for p in range(start, end))
                prefills.append(PrefillSpan(offset, n, end, self.slots_of(req, end) if start > 0 else None))
            runs.append((lora_slot, n))
            if s.samples:
                logits_rows.append(offset + n - 1)
                sampling.append(req)
            offset += n
        return self._to_device(ids, positions, new_slots, prefills, runs, decode_rows, decode_tables,
                               decode_lens, logits_rows, sampling)

    def _to_device(self, ids: list[int], positions: list[int], new_slots: list[int], prefills: list[PrefillSpan],
                   runs: list[tuple[int, int]], decode_rows: list[int], decode_tables: list[list[int]],
                   decode_lens: list[int], logits_rows: list[int], sampling: list[Request]) -> PackedBatch:
        dev = self.device
        for span in prefills:
            if span.ctx_slots is not None:
                span.ctx_slots = span.ctx_slots.to(dev)
        attention = PagedAttentionMetadata(
            kv_caches=self.kv_caches,
            slot_mapping=int_tensor(new_slots, torch.long, dev),
            prefills=prefills,
            decode_rows=int_tensor(decode_rows, torch.long, dev) if decode_rows else None,
            decode_ctx_lens=int_tensor(decode_lens, torch.int32, dev) if decode_rows else None,
            decode_block_tables=padded_rows(decode_tables, torch.int32, dev) if decode_rows else None,
            block_size=self.block_size, decode_kernel=self.decode_kernel,
        )
        lora = LoraMapping.from_runs(runs, dev) if self.lora is not None else None
        return PackedBatch(
            input_ids=int_tensor(ids, torch.long, dev).view(1, -1),
            position_ids=int_tensor(positions, torch.long, dev).view(1, -1),
            attention=attention,
            lora=lora,
            logits_rows=int_tensor(logits_rows or [len(ids) - 1], torch.long, dev),
            sampling_requests=sampling,
        )

    @torch.inference_mode()
    def forward_logits(self, packed: PackedBatch) -> torch.Tensor:
        """[num_sampling (or 1), vocab] logits at each sampling request's last token. On the CPU
        they may live in the LM head's reused buffer (``model/logits_head.py``): valid until the
        next forward; copy them to keep them longer."""
        if self.lora is not None:
            self.lora.set_mapping(packed.lora)
        try:
            out = self.model(input_ids=packed.input_ids, position_ids=packed.position_ids, use_cache=False,
                             logits_to_keep=packed.logits_rows, **{META_KWARG: packed.attention})
        finally:
            if self.lora is not None:
                self.lora.set_mapping(None)
        return out.logits[0]

    def is_graph_decode(self, batch: SchedulerOutput, lora_slots: dict[VersionKey, int]) -> bool:
        """A step the captured decode graphs can run: only decodes, each sampling, few enough,
        and a captured variant for it (with LoRA when any sequence has an adapter slot)."""
        graphs = self.decode_graphs
        if graphs is None or not all(s.num_new_tokens == 1 and s.request.num_computed_tokens > 0 and s.samples
                                     and len(s.request.block_ids) <= graphs.inputs.max_blocks
                                     for s in batch.scheduled):
            return False
        slot = self._slot_of(lora_slots)
        return graphs.serves(len(batch.scheduled), any(slot(s) != NO_SLOT for s in batch.scheduled))

    def run(self, batch: SchedulerOutput, lora_slots: dict[VersionKey, int]) -> tuple[list[Request], SampleResult]:
        """Execute one step; returns the requests that sampled a token and their samples."""
        with on_device(self.device):  # kernels and graphs launch on the current CUDA device
            return self._run(batch, lora_slots)

    def _forward_starts(self) -> None:
        if self.before_forward is not None:
            self.before_forward()

    def _run(self, batch: SchedulerOutput, lora_slots: dict[VersionKey, int]) -> tuple[list[Request], SampleResult]:
        graphs = self.decode_graphs  # is_graph_decode is False without them
        if graphs is not None and self.is_graph_decode(batch, lora_slots):
            slot = self._slot_of(lora_slots)
            order = self._packed_order(batch, slot)
            requests = [s.request for s in order]
            rows = [DecodeRow.of(s.request, slot(s)) for s in order]
            self.decode_rows = None  # they would miss this step's tokens
            self._forward_starts()
            logits = graphs.run(rows)
            return requests, self.sampler(logits, requests)
        packed = self.pack(batch, lora_slots)
        self._forward_starts()
        logits = self.forward_logits(packed)
        if not packed.sampling_requests:
            return [], SampleResult([], [])
        samples = self.sampler(logits, packed.sampling_requests)
        if self.decode_rows is not None:  # this step ran the decode rows: their next inputs
            self.decode_rows.took_tokens(samples.token_ids)
        return packed.sampling_requests, samples
