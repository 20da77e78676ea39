"""Which memory pool the engine builds, and how many KV blocks (or unified pages) it allocates.

``memory_pool``:
- ``separate``: ``kv_cache_bytes`` of KV blocks; adapter weights in a row pool of their own.
- ``unified``: ``kv_cache_bytes`` is one pool of pages shared by KV blocks and adapter weights.
- ``auto`` (the default): unified over the same device memory the separate pools would take,
  ``kv_cache_bytes`` plus the row pool's bytes (``lora_pool_rows`` rows, default ``max_loras x
  max_lora_rank``; none with ``max_loras`` 0), so no deployment loses capacity by the switch; KV
  and adapters then borrow from each other. It stays separate where unified cannot run: when the
  LoRA apply does not compute in the KV cache's dtype (a bf16 model on the CPU without the native
  kernels), when a page cannot start 16-aligned blocks, or when an adapter of ``max_lora_rank``
  would take more than half the pool. ``unified`` refuses to start in those cases, with the reason.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..config import EngineConfig
from ..lora.layers import lora_compute_dtype
from ..lora.model import find_targets
from ..lora.ops import apply_function
from ..lora.page_layout import ALIGN, PageLayout
from .kv_cache import KVCacheSpec, num_blocks_for


@dataclass(frozen=True)
class MemoryPlan:
    pool: str  # "separate" or "unified"
    num_blocks: int  # KV blocks, or pages of the unified pool
    reason: str  # why, for the start-up log


def plan_memory(config: EngineConfig, spec: KVCacheSpec, model: nn.Module, device: torch.device,
                native_kernels=None) -> MemoryPlan:
    kv_blocks = num_blocks_for(spec, config.cache)
    mode = config.cache.memory_pool
    if mode == "separate":
        return MemoryPlan("separate", kv_blocks, "configured")
    dims = {key: (t.in_features, t.out_features) for key, t in find_targets(model).items()}
    lora = config.lora
    pages, reason = kv_blocks, "configured"
    if mode == "auto":  # the row pool's bytes join the KV budget
        rows = lora.lora_pool_rows if lora.lora_pool_rows is not None else lora.max_loras * lora.max_lora_rank
        row_bytes = sum(fan_in + fan_out for fan_in, fan_out in dims.values()) * spec.element_bytes
        pages += -(-rows * row_bytes // spec.bytes_per_block(config.cache.block_size))
        reason = f"{kv_blocks} KV blocks and {rows} LoRA rows' memory as one pool"
    refusal = _unified_refusal(config, spec, dims, pages, device, native_kernels)
    if refusal is None:
        return MemoryPlan("unified", pages, reason)
    if mode == "unified":
        raise ValueError(refusal)
    if lora.max_loras == 0:
        raise ValueError(f"max_loras 0 (no cap) needs the unified memory pool, not usable here: {refusal}")
    return MemoryPlan("separate", kv_blocks, refusal)


def _unified_refusal(config: EngineConfig, spec: KVCacheSpec, dims: dict, pages: int, device: torch.device,
                     native_kernels) -> str | None:
    """Why the unified pool of ``pages`` pages cannot serve these settings, or None."""
    apply = apply_function(device, native_kernels) if device.type == "cpu" else None
    compute = lora_compute_dtype(spec.dtype, device, apply)
    if compute != spec.dtype:
        return (f"the unified memory pool keeps adapter weights in the KV cache's dtype ({spec.dtype}), but the "
                f"LoRA apply here computes in {compute} (build the native CPU kernels, or use memory_pool=separate)")
    page_elems = spec.elements_per_block(config.cache.block_size)
    if page_elems % ALIGN:
        return f"a page of {page_elems} elements per arena is not a multiple of {ALIGN}"
    rank = config.lora.max_lora_rank
    largest = PageLayout(dims, page_elems).pages_for_rank(rank)
    if largest > pages // 2:
        return (f"an adapter of max_lora_rank {rank} would hold {largest} of the {pages} pages of the unified "
                "memory pool, more than half: raise kv_cache_bytes or lower max_lora_rank")
    return None
