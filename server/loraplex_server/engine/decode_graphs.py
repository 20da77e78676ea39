"""Decode steps as CUDA graph replays: one captured forward per padded batch size, with and
without LoRA.

A decode step launches a few hundred small kernels (per layer: norms, projections, the LoRA
shrink/expand pairs, attention); at small batches the CPU issuing them is slower than the GPU
running them. Captured once at start-up, a step becomes: write the sequences into the static
input rows (``decode_inputs``), one ``replay()``, read the logits.

What varies between replays lives in device memory with a fixed address: the input rows (token
ids, positions, cache slots, block tables, LoRA token slots), the KV cache, the LoRA slot buffers
and each module's ``SlotRanks.table``. So adapters loaded into slots after capture are served by
the same graphs, and nothing the host knows at capture time is baked in.

Sizes are 1, 2, 4, then every multiple of 8 up to the largest (vLLM's ladder): a batch of ``n``
replays the smallest size >= n, its padding rows computed and discarded. The LoRA graphs run the
gather kernels over every row (rows without an adapter add zero); base-only steps replay graphs
without LoRA, so the base model keeps its own speed.

``mode="eager"`` runs the same padded static step without capturing: what a CPU engine does with
``cuda_graphs=on`` (the tests' way to run this code without a GPU); it is never faster.
"""

from __future__ import annotations

import logging
import time
from typing import Callable

import torch

from ..lora.manager import LoraManager
from ..model.attention import META_KWARG
from .decode_inputs import DecodeRow, StaticDecodeInputs

log = logging.getLogger(__name__)


def capture_sizes(max_batch: int) -> list[int]:
    """Padded batch sizes to capture: 1, 2, 4, 8, 16, 24, ... up to ``max_batch`` (included)."""
    if max_batch < 1:
        raise ValueError(f"the largest captured batch must be >= 1, got {max_batch}")
    sizes = [s for s in (1, 2, 4) if s < max_batch] + list(range(8, max_batch, 8))
    return sizes + [max_batch]


class _EagerStep:
    """The step function run as is on every call (no capture); run once when built, as the
    capture's warm-up would, so a body that cannot run fails at start-up here too."""

    def __init__(self, forward: Callable[[], torch.Tensor]):
        self._forward = forward
        forward()

    def __call__(self) -> torch.Tensor:
        return self._forward()


class _GraphStep:
    """The step function captured once into a CUDA graph; a call replays it."""

    def __init__(self, forward: Callable[[], torch.Tensor], pool):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up: compiles kernels, settles the allocator
            for _ in range(2):
                forward()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=pool):
            self.logits = forward()  # [size, vocab], rewritten by each replay

    def __call__(self) -> torch.Tensor:
        self.graph.replay()
        return self.logits


class DecodeGraphs:
    """Captured (or, in eager mode, emulated) decode forwards, keyed by (padded size, with LoRA)."""

    def __init__(self, model: torch.nn.Module, kv_caches, inputs: StaticDecodeInputs,
                 lora: LoraManager | None, mode: str = "cuda"):
        if mode not in ("cuda", "eager"):
            raise ValueError(f"unknown decode graph mode {mode!r} (cuda or eager)")
        self.model, self.kv_caches, self.inputs, self.lora, self.mode = model, kv_caches, inputs, lora, mode
        self.sizes = capture_sizes(inputs.max_batch)
        self.steps: dict[tuple[int, bool], Callable[[], torch.Tensor]] = {}
        self.capture_seconds = 0.0

    @property
    def max_batch(self) -> int:
        return self.inputs.max_batch

    def padded_size(self, num_seqs: int) -> int:
        return next(s for s in self.sizes if s >= num_seqs)

    @torch.inference_mode()
    def capture(self) -> float:
        """Capture every (size, LoRA) step, largest first so smaller ones reuse its memory pool;
        returns the seconds it took."""
        start = time.perf_counter()
        pool = torch.cuda.graph_pool_handle() if self.mode == "cuda" else None
        variants = [False, True] if self.lora is not None else [False]
        for size in sorted(self.sizes, reverse=True):
            for with_lora in variants:
                forward = self._forward_fn(size, with_lora)
                self.steps[size, with_lora] = _GraphStep(forward, pool) if self.mode == "cuda" else _EagerStep(forward)
        self.capture_seconds = time.perf_counter() - start
        log.info("decode steps %s: %d sizes up to %d, %s LoRA, in %.1f s",
                 "captured" if self.mode == "cuda" else "prepared (eager)", len(self.sizes), self.max_batch,
                 "with and without" if self.lora is not None else "without", self.capture_seconds)
        return self.capture_seconds

    @torch.inference_mode()
    def run(self, batch: list[DecodeRow]) -> torch.Tensor:
        """[len(batch), vocab] logits of one pure-decode step."""
        size = self.padded_size(len(batch))
        self.inputs.write(batch, size)
        with_lora = self.lora is not None and any(row.lora_slot >= 0 for row in batch)
        return self.steps[size, with_lora]()[:len(batch)]

    def _forward_fn(self, size: int, with_lora: bool) -> Callable[[], torch.Tensor]:
        """The forward of a padded step of ``size`` rows: reads only ``inputs.rows`` and the
        model's own buffers, so it can be captured."""
        def forward() -> torch.Tensor:
            meta = self.inputs.attention(size, self.kv_caches)
            if self.lora is not None:
                self.lora.set_mapping(self.inputs.lora_mapping(size) if with_lora else None)
            try:
                out = self.model(input_ids=self.inputs.token_ids(size), position_ids=self.inputs.positions(size),
                                 use_cache=False, **{META_KWARG: meta})
            finally:
                if self.lora is not None:
                    self.lora.set_mapping(None)
            return out.logits[0]  # [size, vocab]
        return forward


def graph_mode(setting: str, device: torch.device) -> str | None:
    """The ``cuda_graphs`` setting on ``device``: "cuda" (capture), "eager" (``on`` without a
    GPU) or None (off; ``auto`` off the GPU)."""
    if setting == "off" or (setting == "auto" and device.type != "cuda"):
        return None
    return "cuda" if device.type == "cuda" else "eager"


def build_decode_graphs(mode: str, model: torch.nn.Module, kv_caches, lora: LoraManager | None, *,
                        max_batch: int, max_blocks: int, block_size: int, trash_block: int,
                        device: torch.device) -> DecodeGraphs | None:
    """Capture the decode steps; on a capture failure log why and return None (eager decode),
    so a model the graphs cannot hold still serves."""
    inputs = StaticDecodeInputs(max_batch, max_blocks, block_size, trash_block, device)
    graphs = DecodeGraphs(model, kv_caches, inputs, lora, mode)
    try:
        graphs.capture()
    except RuntimeError as exc:  # capture-unsafe op, out of memory, ...
        log.warning("decode graph capture failed, decode steps run eagerly: %s", exc)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        return None
    return graphs
