"""What the API may read of the engine: plain values, no engine objects."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ServerInfo:
    """The model and capacities being served; fixed once the engine is built."""

    model: str  # the model's name (a path, a preset or a hub id)
    dtype: str  # e.g. "bfloat16"
    device: str  # e.g. "cpu", "cuda:0"
    max_loras: int  # device slots: distinct adapters per step
    max_lora_rank: int
    max_cpu_loras: int  # adapters kept in host memory
    context_length: int  # the longest prompt plus output, in tokens
    kv_cache_tokens: int  # tokens the KV cache holds
    prefix_caching: bool
    lora_pool_rows: int = 0  # rank rows of the LoRA weight pool (a rank-r adapter holds r while resident)
    lora_pool_bytes: int = 0  # device bytes of that pool (0 when unified)
    kv_cache_bytes: int = 0  # device bytes of the KV cache (unified: shared by KV blocks and adapter weights)
    memory_pool: str = "separate"  # or "unified": the pool the engine built (auto resolved)
