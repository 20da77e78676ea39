"""The unified memory pool's bookkeeping: KV pages lowest first, adapter runs highest first,
cached KV blocks and idle adapters given back on demand (memory/page_pool.py, kv_blocks.py)."""

import pytest

from loraplex_server.engine.kv_blocks import BlockManager
from loraplex_server.engine.request import Request, SamplingParams
from loraplex_server.memory.page_pool import ADAPTER, FREE, KV, AdapterRuns, KvPages, PagePool


def test_kv_takes_the_lowest_free_page_and_adapters_the_highest_run():
    pool = PagePool(10)
    assert [pool.take_page() for _ in range(3)] == [0, 1, 2]
    assert pool.find_run(4) == 6
    pool.take_run(6, 4)
    assert [pool.holder(p) for p in (2, 3, 6, 9)] == [KV, FREE, ADAPTER, ADAPTER]
    assert (pool.free_pages, pool.kv_pages, pool.adapter_pages) == (3, 3, 4)
    pool.give_page(1)
    assert pool.take_page() == 1  # a freed low page is reused before higher ones
    assert pool.take_page() == 3
    assert pool.find_run(3) is None and pool.find_run(2) == 4  # 4..5 free, 6..9 held
    pool.give_run(6)
    assert pool.find_run(6) == 4 and pool.adapter_pages == 0 and pool.free_pages == 6


def test_a_run_may_cross_claimable_pages_but_never_held_ones():
    pool = PagePool(8)
    for _ in range(8):
        pool.take_page()
    assert pool.find_run(1) is None
    assert pool.find_run(3, claimable=[2, 3, 4, 6]) == 2  # 6 alone is too short; 2..4 is the highest run
    assert pool.find_run(4, claimable=[2, 3, 4, 6]) is None
    with pytest.raises(ValueError, match="not all free"):
        pool.take_run(2, 3)  # claimable is the caller's promise to free them first, not a free pass
    with pytest.raises(ValueError, match="not held by a KV block"):
        PagePool(2).give_page(0)


def test_kv_pages_evict_idle_adapters_only_when_no_page_is_free():
    pool = PagePool(4)
    pool.take_run(2, 2)  # an idle adapter holds 2..3
    idle = {"runs": [2]}

    def evict():
        if not idle["runs"]:
            return False
        pool.give_run(idle["runs"].pop())
        return True
    pages = KvPages(pool, lambda: 2 * len(idle["runs"]), evict)
    assert len(pages) == 4
    assert [pages.popleft(), pages.popleft()] == [0, 1] and idle["runs"] == [2]  # free pages first
    assert pages.popleft() == 2 and idle["runs"] == []  # then the adapter's
    assert pages.popleft() == 3
    with pytest.raises(IndexError):
        pages.popleft()
    pages.append(1)
    assert pool.holder(1) == FREE and len(pages) == 1


def test_kv_pages_count_idle_adapters_only_when_free_pages_fall_short():
    pool = PagePool(8)
    pool.take_run(6, 2)  # an idle adapter holds 6..7
    counted = []

    def idle_pages():
        counted.append(1)
        return 2
    pages = KvPages(pool, idle_pages, lambda: False)
    assert pages.has(6) and not counted  # six free pages: the idle walk is not needed
    assert pages.has(8) and len(counted) == 1
    assert not pages.has(9)
    blocks = BlockManager(8, 4, free_blocks=pages)
    counted.clear()
    assert blocks.allocate(request(16), 16) and not counted  # 4 blocks from 6 free pages
    assert not blocks.allocate(request(17), 17) and counted  # 5 more: 2 free + 2 idle fall short
    counted.clear()
    assert blocks.allocate(request(7), 7) and not counted  # 2 blocks: the free pages
    assert pool.free_pages == 0


def request(tokens: int) -> Request:
    return Request(f"r{tokens}", tuple(range(100, 100 + tokens)), SamplingParams())


def test_adapter_runs_reclaim_cached_kv_blocks_and_keep_held_ones():
    pool = PagePool(8)
    blocks = BlockManager(8, 4, prefix_caching=True, free_blocks=KvPages(pool, lambda: 0, lambda: False))
    done, running = request(16), request(8)
    assert blocks.admit(done, 16) and blocks.admit(running, 8)
    assert done.block_ids == [0, 1, 2, 3] and running.block_ids == [4, 5]
    done.num_computed_tokens = 16
    blocks.publish(done)
    blocks.free(done)  # its 4 blocks stay cached, free
    assert sorted(blocks.cached_free_blocks()) == [0, 1, 2, 3] and blocks.num_free_blocks == 6
    runs = AdapterRuns(pool, blocks.cached_free_blocks, blocks.reclaim_cached)
    assert runs.allocate(2) == 6  # the free pages first (highest run)
    assert runs.allocate(3) == 1  # then a run through cached blocks: 1..3, block 0 stays cached
    assert blocks.cached_free_blocks() == [0] and blocks.lookup(request(16)).num_tokens == 4
    assert runs.allocate(2) is None  # 0 is cached but 4..5 are held by a running request
    assert not runs.can_compact(1) and runs.compact() == []
    runs.release(1)
    assert pool.free_pages == 3 and blocks.num_free_blocks == 4
