import pytest

from loraplex_server.engine.kv_blocks import BlockManager
from loraplex_server.engine.request import Request, SamplingParams


def req(n_prompt=5, rid="r"):
    return Request(rid, list(range(n_prompt)), SamplingParams())


def test_allocates_ceil_blocks_and_maps_slots():
    bm = BlockManager(num_blocks=8, block_size=4)
    r = req(9)
    assert bm.blocks_needed(r, 9) == 3
    assert bm.allocate(r, 9)
    assert len(r.block_ids) == 3 and bm.num_free_blocks == 5
    r.num_computed_tokens = 9
    assert bm.blocks_needed(r, 1) == 0  # position 9 fits in block 3 (slots 8..11)
    assert bm.slot(r, 5) == r.block_ids[1] * 4 + 1
    r.num_computed_tokens = 12
    assert bm.blocks_needed(r, 1) == 1


def test_refuses_without_partial_allocation_and_frees():
    bm = BlockManager(num_blocks=2, block_size=4)
    a, b = req(rid="a"), req(rid="b")
    assert bm.allocate(a, 5)
    assert not bm.allocate(b, 1)
    assert b.block_ids == [] and bm.num_free_blocks == 0
    bm.free(a)
    assert a.block_ids == [] and bm.num_free_blocks == 2
    assert bm.allocate(b, 8)


def test_rejects_bad_sizes():
    with pytest.raises(ValueError):
        BlockManager(0, 4)


def test_token_slice_spans_prompt_and_output():
    r = Request("r", [1, 2, 3], SamplingParams())
    r.output_token_ids = [4, 5]
    for start in range(6):
        for end in range(start, 6):
            assert r.token_slice(start, end) == r.all_token_ids[start:end]
