"""Decode steps as CUDA graph replays: one captured forward per padded batch size, with and
without LoRA.

A decode step launches a few hundred small kernels (per layer: norms, projections, the LoRA
shrink/expand pairs, attention); at small batches the CPU issuing them is slower than the GPU
running them. Captured once at start-up, a step becomes: write the sequences into the static
input rows (``decode_inputs``), one ``replay()``, read the logits.

What varies between replays lives in device memory with a fixed address: the input rows (token
ids, positions, cache slots, block tables, LoRA token slots), the KV cache, the LoRA weight pools,
each module's rank and element offset tables (``SlotTable.table``). So adapters loaded
into slots after capture, or moved in the pool by a compaction, are served by the same graphs, and
nothing the host knows at capture time is baked in (the gather's rank bound is fixed).

Sizes are 1, 2, 4, then every multiple of 8 up to the largest (vLLM's ladder): a batch of ``n``
replays the smallest size >= n, its padding rows computed and discarded. The LoRA graphs run the
gather kernels over every row (rows without an adapter add zero); base-only steps replay graphs
without LoRA, so the base model keeps its own speed.

``mode="eager"`` runs the same padded static step without capturing: what a CPU engine does with
``cuda_graphs=on`` (the tests' way to run this code without a GPU); it is never faster.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable

import torch

from ..lora.manager import LoraManager
from ..model.attention import META_KWARG
from ..triton_common import triton_available
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
        returns the seconds it took. A variant (with or without LoRA) whose capture fails is
        dropped with a warning; its steps then run eagerly."""
        start = time.perf_counter()
        with on_device(self.inputs.device):
            pool = torch.cuda.graph_pool_handle() if self.mode == "cuda" else None
            for with_lora in ([False, True] if self.lora is not None else [False]):
                try:
                    for size in sorted(self.sizes, reverse=True):
                        self.steps[size, with_lora] = self._build_step(size, with_lora, pool)
                except Exception as exc:  # noqa: BLE001 - any failure: this variant stays eager
                    log.warning("decode graph capture (%s LoRA) failed, those decode steps run eagerly: %s",
                                "with" if with_lora else "without", exc)
                    self.steps = {key: step for key, step in self.steps.items() if key[1] != with_lora}
        self.capture_seconds = time.perf_counter() - start
        log.info("decode steps %s: %d sizes up to %d, variants %s, in %.1f s",
                 "captured" if self.mode == "cuda" else "prepared (eager)", len(self.sizes), self.max_batch,
                 sorted({"lora" if lora else "base" for _, lora in self.steps}), self.capture_seconds)
        return self.capture_seconds

    def _build_step(self, size: int, with_lora: bool, pool) -> Callable[[], torch.Tensor]:
        forward = self._forward_fn(size, with_lora)
        return _GraphStep(forward, pool) if self.mode == "cuda" else _EagerStep(forward)

    def serves(self, num_seqs: int, with_lora: bool) -> bool:
        """A step of ``num_seqs`` sequences (any with an adapter: ``with_lora``) has a graph."""
        return 0 < num_seqs <= self.max_batch and (self.max_batch, with_lora) in self.steps

    @torch.inference_mode()
    def run(self, batch: list[DecodeRow]) -> torch.Tensor:
        """[len(batch), vocab] logits of one pure-decode step (``serves`` it)."""
        size = self.padded_size(len(batch))
        with_lora = any(row.lora_slot >= 0 for row in batch)
        with on_device(self.inputs.device):
            self.inputs.write(batch, size)
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


def on_device(device: torch.device):
    """Make ``device`` current (capture streams and graphs use the current CUDA device)."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def dynamic_rope(config) -> bool:
    """Dynamic RoPE rescales on the host when a sequence outgrows its cache: not capturable."""
    params = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    found: list[str] = []

    def visit(p: dict) -> None:  # flat, or one dict per attention type (e.g. Gemma 3)
        found.extend(str(p[k]) for k in ("rope_type", "type") if k in p)
        for value in p.values():
            if isinstance(value, dict):
                visit(value)
    if isinstance(params, dict):
        visit(params)
    return any("dynamic" in kind for kind in found)


def graph_mode(setting: str, device: torch.device, kernels: bool | None = None) -> str | None:
    """The ``cuda_graphs`` setting on ``device``: "cuda" (capture), "eager" (``on`` without a
    GPU) or None (off). ``auto`` captures on CUDA only with the Triton kernels (``kernels``,
    default: triton imports): the torch attention reads every block-table column of every row,
    cheap for the packed path's per-step tables, not for tables as wide as the context limit."""
    kernels = triton_available() if kernels is None else kernels
    if setting == "off" or (setting == "auto" and not (device.type == "cuda" and kernels)):
        return None
    return "cuda" if device.type == "cuda" else "eager"


def build_decode_graphs(mode: str, model: torch.nn.Module, kv_caches, lora: LoraManager | None, *,
                        max_batch: int, max_blocks: int, block_size: int, trash_block: int,
                        device: torch.device) -> DecodeGraphs | None:
    """Capture the decode steps; None (eager decode) when nothing could be captured, so a model
    the graphs cannot hold still serves."""
    if dynamic_rope(model.config):
        log.warning("decode graphs off: the model's dynamic RoPE rescales on the host")
        return None
    inputs = StaticDecodeInputs(max_batch, max_blocks, block_size, trash_block, device)
    graphs = DecodeGraphs(model, kv_caches, inputs, lora, mode)
    graphs.capture()
    if not graphs.steps:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.empty_cache()
        return None
    return graphs
