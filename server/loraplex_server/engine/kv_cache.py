"""The paged KV cache tensors: per layer, K and V of shape [num_blocks * block_size, n_kv_heads, head_dim]."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import CacheConfig


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @classmethod
    def from_model_config(cls, config, dtype: torch.dtype) -> KVCacheSpec:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        return cls(config.num_hidden_layers, kv_heads, head_dim, dtype)

    @property
    def element_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    def elements_per_block(self, block_size: int) -> int:
        """Elements of one block in one layer's K (or V) cache: a page of each arena, unified."""
        return block_size * self.num_kv_heads * self.head_dim

    def bytes_per_block(self, block_size: int) -> int:
        return 2 * self.num_layers * self.elements_per_block(block_size) * self.element_bytes


def num_blocks_for(spec: KVCacheSpec, cache: CacheConfig) -> int:
    if cache.num_blocks is not None:
        return cache.num_blocks
    return max(1, cache.kv_cache_bytes // spec.bytes_per_block(cache.block_size))


def allocate_kv_cache(spec: KVCacheSpec, num_blocks: int, block_size: int,
                      device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    shape = (num_blocks * block_size, spec.num_kv_heads, spec.head_dim)
    return [(torch.zeros(shape, dtype=spec.dtype, device=device),
             torch.zeros(shape, dtype=spec.dtype, device=device)) for _ in range(spec.num_layers)]
