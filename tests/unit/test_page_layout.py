"""Where an adapter's weights sit in its pages (lora/page_layout.py)."""

import pytest

from loraplex_server.lora.page_layout import ALIGN, PageLayout
from loraplex_server.lora.weights import ModuleKey

DIMS = {ModuleKey(0, "q_proj"): (64, 64), ModuleKey(0, "k_proj"): (64, 16), ModuleKey(0, "down_proj"): (160, 64),
        ModuleKey(1, "q_proj"): (64, 64), ModuleKey(1, "k_proj"): (64, 16), ModuleKey(1, "down_proj"): (160, 64)}


def test_blocks_go_back_to_back_in_name_order_aligned_per_layer():
    layout = PageLayout(DIMS, page_elems=512)
    ranks = {ModuleKey(0, "q_proj"): 3, ModuleKey(0, "k_proj"): 1, ModuleKey(0, "down_proj"): 2,
             ModuleKey(1, "k_proj"): 5}
    places = layout.place(2, ranks)
    base = 2 * 512
    # layer 0 in name order: down (A 2*160, Bt 2*64), k (A 64, Bt 16 -> next start aligned), q
    assert places[ModuleKey(0, "down_proj")] == (base, base)
    assert places[ModuleKey(0, "k_proj")] == (base + 320, base + 128)
    assert places[ModuleKey(0, "q_proj")] == (base + 384, base + 144)  # 128 + 16 = 144, a multiple of 16
    assert places[ModuleKey(1, "k_proj")] == (base, base)  # every layer starts at the run's first page
    assert ModuleKey(1, "q_proj") not in places  # rank 0: nothing placed
    for a, b in places.values():
        assert a % ALIGN == 0 and b % ALIGN == 0


def test_pages_cover_the_largest_layer_on_either_side():
    layout = PageLayout(DIMS, page_elems=512)
    # layer 0: A = 3*64 + 1*64 + 2*160 = 576 elements (2 pages), Bt = 192 + 16 + 128 (aligned) = 336
    assert layout.pages({ModuleKey(0, "q_proj"): 3, ModuleKey(0, "k_proj"): 1, ModuleKey(0, "down_proj"): 2}) == 2
    assert layout.pages({ModuleKey(1, "k_proj"): 1}) == 1
    assert layout.pages_for_rank(8) == -(-8 * (64 + 64 + 160) // 512)  # A side binds: 8 * 288 = 2304 -> 5 pages
    assert layout.pages_for_rank(1) == 1 and layout.pages_for_rank(16) == 9  # each adapter at its own rank


def test_a_page_must_hold_whole_aligned_blocks():
    with pytest.raises(ValueError, match="multiple of 16"):
        PageLayout(DIMS, page_elems=100)
