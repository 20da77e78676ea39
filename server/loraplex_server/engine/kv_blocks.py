"""Paged KV block manager: which physical cache blocks each request owns (pure Python, no torch).

A request holding ``n`` tokens in the cache owns ``ceil(n / block_size)`` blocks; token ``p`` of
the request lives in slot ``block_ids[p // block_size] * block_size + p % block_size``.

Automatic prefix caching (``prefix_caching=True``): a *full* block whose K/V have been computed is
published under a chained hash of its content,

    h[-1] = seed(adapter version key, or the base model)
    h[i]  = sha256(h[i - 1] || token ids of block i)

so a block is reused only by a sequence with the same adapter version and the same tokens in every
position up to the block's end (a LoRA on any layer changes every later layer's K/V, so versions
never share). Blocks are reference counted; when the last owner frees a published block it stays
cached (``evictable``) and is reused by a later request with that prefix, or recycled least
recently used first, only once no never-cached free block is left. Shared blocks are never written:
only full blocks are shared and a sequence computes only the tokens after its cached prefix.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict, deque
from dataclasses import dataclass

from ..lora.ids import VersionKey
from .request import Request


def blocks_for(num_tokens: int, block_size: int) -> int:
    """Blocks that hold ``num_tokens`` tokens: ``ceil(num_tokens / block_size)``."""
    return -(-num_tokens // block_size)


def cache_slot(block_ids: list[int], block_size: int, position: int) -> int:
    """Cache slot of token ``position`` of a sequence owning ``block_ids``."""
    return block_ids[position // block_size] * block_size + position % block_size


def chain_seed(adapter_key: VersionKey | None) -> bytes:
    """The hash chain's start: one per adapter version key, another for the base model."""
    tag = b"adapter\0" + adapter_key.encode() if adapter_key else b"base"
    return hashlib.sha256(b"loraplex-prefix\0" + tag).digest()


def chain_hash(parent: bytes, token_ids: list[int]) -> bytes:
    """Hash of one full block given its parent block's hash (or the chain seed)."""
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


@dataclass(frozen=True)
class PrefixHit:
    """Cached blocks holding a waiting request's longest cached prefix (possibly none)."""

    block_ids: tuple[int, ...] = ()
    num_tokens: int = 0


NO_HIT = PrefixHit()


class FreeBlockIds(deque):
    """The default free-block source: every block id of the KV cache's own tensors."""

    def has(self, n: int) -> bool:
        return len(self) >= n


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = False, free_blocks=None):
        """``free_blocks``: where never-cached free blocks come from and go back to (``popleft``,
        ``append``, ``len``, ``has(n)``): by default all ``num_blocks`` (``FreeBlockIds``); on the
        unified memory pool its pages (``memory.page_pool.KvPages``), shared with adapter weights."""
        if num_blocks < 1 or block_size < 1:
            raise ValueError("num_blocks and block_size must be >= 1")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        # free, holding nothing cached
        self._free = FreeBlockIds(range(num_blocks)) if free_blocks is None else free_blocks
        self._evictable: OrderedDict[int, None] = OrderedDict()  # free but cached, least recent first
        self._refs = [0] * num_blocks
        self._hash_of: dict[int, tuple[bytes, VersionKey | None]] = {}  # published block -> (hash, seed key)
        self._block_of: dict[bytes, int] = {}  # hash -> published block
        self._by_seed: dict[VersionKey | None, set[int]] = {}  # adapter version key -> its published blocks
        self._seeds: dict[VersionKey | None, bytes] = {}
        self.query_tokens = 0  # cumulative: tokens of admitted requests looked up in the cache
        self.hit_tokens = 0  # cumulative: of those, tokens found cached

    @property
    def num_free_blocks(self) -> int:
        """Blocks an allocation may take: never-cached ones plus cached ones no request holds."""
        return len(self._free) + len(self._evictable)

    @property
    def num_cached_blocks(self) -> int:
        """Published blocks (held by requests or evictable)."""
        return len(self._hash_of)

    @property
    def capacity_tokens(self) -> int:
        return self.num_blocks * self.block_size

    def blocks_needed(self, request: Request, num_new_tokens: int) -> int:
        total = request.num_computed_tokens + num_new_tokens
        return max(0, blocks_for(total, self.block_size) - len(request.block_ids))

    def allocate(self, request: Request, num_new_tokens: int) -> bool:
        """Give ``request`` blocks for ``num_new_tokens`` more tokens; False (nothing taken) if short."""
        needed = self.blocks_needed(request, num_new_tokens)
        if not self._has_free(needed):
            return False
        for _ in range(needed):
            request.block_ids.append(self._pop_free())
        return True

    def free(self, request: Request) -> None:
        """Drop the request's hold on its blocks. Last blocks first, so that among blocks freed
        together a prompt's tail is evicted before its head (heads are the more shared)."""
        for block in reversed(request.block_ids):
            self._refs[block] -= 1
            if self._refs[block] == 0:
                if block in self._hash_of:
                    self._evictable[block] = None
                else:
                    self._free.append(block)
        request.block_ids = []
        request.num_published_blocks = 0

    def slot(self, request: Request, position: int) -> int:
        return cache_slot(request.block_ids, self.block_size, position)

    # ---- prefix caching ------------------------------------------------------------------
    def lookup(self, request: Request) -> PrefixHit:
        """The longest run of cached full blocks a request holding no blocks starts with, at most
        ``num_tokens - 1`` tokens: its last token is always computed (it needs the logits)."""
        if not self.prefix_caching or request.block_ids:
            return NO_HIT
        hits = []
        num_blocks = (request.num_tokens - 1) // self.block_size
        hashes = self._hashes(request, num_blocks)
        for i in range(num_blocks):
            block = self._block_of.get(hashes[i])
            if block is None:
                break
            hits.append(block)
        return PrefixHit(tuple(hits), len(hits) * self.block_size) if hits else NO_HIT

    def admit(self, request: Request, num_new_tokens: int, hit: PrefixHit = NO_HIT) -> bool:
        """A waiting request takes its cached prefix ``hit`` (from ``lookup``) and blocks for
        ``num_new_tokens`` tokens after it; False (nothing taken) if short of free blocks."""
        reclaimed = sum(1 for b in hit.block_ids if self._refs[b] == 0)  # cached blocks leaving the free pool
        needed = blocks_for(hit.num_tokens + num_new_tokens, self.block_size) - len(hit.block_ids)
        if not self._has_free(reclaimed + needed):
            return False
        for block in hit.block_ids:
            if self._refs[block] == 0:
                del self._evictable[block]
            self._refs[block] += 1
        request.block_ids = list(hit.block_ids)
        request.num_computed_tokens = hit.num_tokens
        request.num_published_blocks = len(hit.block_ids)
        if self.prefix_caching:
            self.query_tokens += request.num_tokens
            self.hit_tokens += hit.num_tokens
        return self.allocate(request, num_new_tokens)

    def publish(self, request: Request) -> None:
        """After a step: publish the request's newly completed full blocks (whose K/V are all in the
        cache). A block whose content is already published by another block stays private."""
        full = request.num_computed_tokens // self.block_size
        if not self.prefix_caching or full <= request.num_published_blocks:
            return
        hashes = self._hashes(request, full)
        key = request.adapter_key
        for i in range(request.num_published_blocks, full):
            block, h = request.block_ids[i], hashes[i]
            if h not in self._block_of and block not in self._hash_of:
                self._block_of[h] = block
                self._hash_of[block] = (h, key)
                self._by_seed.setdefault(key, set()).add(block)
        request.num_published_blocks = full

    def drop_cached(self, adapter_key: VersionKey) -> int:
        """Forget every block published under an adapter version (it is unloaded); returns how many.
        Held blocks stay with their requests, unpublished; free ones return to the free pool."""
        blocks = self._by_seed.pop(adapter_key, set())
        for block in blocks:
            h, _key = self._hash_of.pop(block)
            del self._block_of[h]
            if block in self._evictable:
                del self._evictable[block]
                self._free.append(block)
        self._seeds.pop(adapter_key, None)
        return len(blocks)

    def cached_free_blocks(self) -> list[int]:
        """Cached blocks no request holds (what an allocation may recycle)."""
        return list(self._evictable)

    def reclaim_cached(self, blocks) -> None:
        """Forget these cached blocks no request holds and free them (the unified pool gives their
        pages to an adapter)."""
        for block in blocks:
            del self._evictable[block]
            self._unpublish(block)
            self._free.append(block)

    def _has_free(self, n: int) -> bool:
        """``n`` blocks an allocation may take are there (``num_free_blocks >= n``), counted cheap
        sources first: on the unified pool the free-block source's length walks the idle adapters."""
        short = n - len(self._evictable)
        if short <= 0:
            return True
        return self._free.has(short)

    def _pop_free(self) -> int:
        """A free block: a never-cached one if any, else the least recently used cached one."""
        if self._free:
            block = self._free.popleft()
        else:
            block, _ = self._evictable.popitem(last=False)
            self._unpublish(block)
        self._refs[block] = 1
        return block

    def _unpublish(self, block: int) -> None:
        h, key = self._hash_of.pop(block)
        del self._block_of[h]
        self._by_seed[key].discard(block)

    def _hashes(self, request: Request, num_blocks: int) -> list[bytes]:
        """The request's chain hashes, at least its first ``num_blocks`` full blocks' (memoized on it)."""
        hashes = request.block_hashes
        if len(hashes) < num_blocks:
            key = request.adapter_key
            if key not in self._seeds:
                self._seeds[key] = chain_seed(key)
            parent = hashes[-1] if hashes else self._seeds[key]
            bs = self.block_size
            for i in range(len(hashes), num_blocks):
                parent = chain_hash(parent, request.token_slice(i * bs, (i + 1) * bs))
                hashes.append(parent)
        return hashes
