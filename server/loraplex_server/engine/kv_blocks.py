"""Paged KV block manager: which physical cache blocks each request owns (pure Python, no torch).

A request holding ``n`` tokens in the cache owns ``ceil(n / block_size)`` blocks; token ``p`` of
the request lives in slot ``block_ids[p // block_size] * block_size + p % block_size``.
"""

from __future__ import annotations

from collections import deque

from .request import Request


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` tokens: ``ceil(num_tokens / block_size)``."""
    return -(-num_tokens // block_size)


def cache_slot(block_ids: list[int], block_size: int, position: int) -> int:
    """Cache slot of token ``position`` of a sequence owning ``block_ids``."""
    return block_ids[position // block_size] * block_size + position % block_size


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int):
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self._free: deque[int] = deque(range(num_blocks))

    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = request.num_computed_tokens + num_new_tokens
        return max(0, blocks_for(total, self.block_size) - len(request.block_ids))

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Give ``request`` blocks for ``num_new_tokens`` more tokens; False (nothing taken) if short."""
        needed = self.blocks_needed(request, num_new_tokens)
        if needed > len(self._free):
            return False
        for _ in range(needed):
            request.block_ids.append(self._free.popleft())
        return True

    def free(self, request: Request) -> None:
        self._free.extend(request.block_ids)
        request.block_ids = []

    def slot(self, request: Request, position: int) -> int:
        return cache_slot(request.block_ids, self.block_size, position)
