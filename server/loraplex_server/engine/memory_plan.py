"""Which memory pool the engine builds, and how many KV blocks (or unified pages) it allocates.

``memory_pool``:
- ``separate``: ``kv_cache_bytes`` of KV blocks; adapter weights in a row pool of their own.
- ``unified``: ``kv_cache_bytes`` is one pool of pages shared by KV blocks and adapter weights.
- ``auto`` (the default): unified over the same device memory the separate pools would take,
  ``kv_cache_bytes`` plus the row pool's bytes (``lora_pool_rows`` rows, default ``max_loras x
  max_lora_rank``; none with ``max_loras`` 0), so no deployment loses capacity by the switch; KV
  and adapters then borrow from each other. It stays separate where unified cannot run: when the
  LoRA apply does not compute in the KV cache's dtype (a bf16 model on the CPU without the native
  kernels), or when an adapter of ``max_lora_rank`` would take more than half the pool.
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
    if config.cache.memory_pool != "auto":
        return MemoryPlan(config.cache.memory_pool, kv_blocks, "configured")
    plan = _auto(config, spec, model, device, native_kernels, kv_blocks)
    if plan.pool == "separate" and config.lora.max_loras == 0:
        raise ValueError(f"max_loras 0 (no cap) needs the unified memory pool, not usable here: {plan.reason}")
    return plan


def _auto(config: EngineConfig, spec: KVCacheSpec, model: nn.Module, device: torch.device, native_kernels,
          kv_blocks: int) -> MemoryPlan:
    apply = apply_function(device, native_kernels) if device.type == "cpu" else None
    compute = lora_compute_dtype(spec.dtype, device, apply)
    if compute != spec.dtype:
        return MemoryPlan("separate", kv_blocks, f"the LoRA apply computes in {compute}, the KV cache holds "
                                                 f"{spec.dtype} (the native CPU kernels would compute in it)")
    lora = config.lora
    rows = lora.lora_pool_rows if lora.lora_pool_rows is not None else lora.max_loras * lora.max_lora_rank
    dims = {key: (t.in_features, t.out_features) for key, t in find_targets(model).items()}
    element = torch.empty((), dtype=spec.dtype).element_size()
    row_bytes = sum(fan_in + fan_out for fan_in, fan_out in dims.values()) * element
    block_bytes = spec.bytes_per_block(config.cache.block_size)
    pages = kv_blocks + -(-rows * row_bytes // block_bytes)
    page_elems = config.cache.block_size * spec.num_kv_heads * spec.head_dim
    if page_elems % ALIGN:
        return MemoryPlan("separate", kv_blocks, f"a page of {page_elems} elements per arena is not a multiple "
                                                 f"of {ALIGN}")
    layout = PageLayout(dims, page_elems)
    largest = layout.pages_for_rank(lora.max_lora_rank)
    if largest > pages // 2:
        return MemoryPlan("separate", kv_blocks, f"an adapter of max_lora_rank {lora.max_lora_rank} would hold "
                                                 f"{largest} of {pages} pages (more than half)")
    return MemoryPlan("unified", pages, f"{kv_blocks} KV blocks and {rows} LoRA rows' memory as one pool")
