"""The LoRA row pool's extent allocator (lora/row_pool.py): first fit, equal lengths side by side,
coalescing, compaction."""

import pytest

from loraplex_server.lora.row_pool import RowPool


def test_first_fit_from_the_bottom():
    pool = RowPool(16)
    assert [pool.allocate(n) for n in (4, 2, 3)] == [0, 4, 6]
    assert pool.free_extents == [(9, 7)] and pool.free_rows == 7
    assert pool.allocate(8) is None  # refused, nothing changed
    assert pool.extents == [(0, 4), (4, 2), (6, 3)]


def test_first_fit_takes_the_lowest_hole_that_is_long_enough():
    pool = RowPool(20)
    starts = [pool.allocate(n) for n in (3, 5, 3, 5)]  # 0, 3, 8, 11
    pool.release(starts[0])  # hole 0..2 (3 rows)
    pool.release(starts[2])  # hole 8..10 (3 rows)
    assert pool.allocate(4) == 16  # neither hole fits 4: the tail
    assert pool.allocate(2) == 0  # the first hole that fits


def test_freed_neighbours_coalesce():
    pool = RowPool(12)
    a, b, c = pool.allocate(4), pool.allocate(4), pool.allocate(4)
    pool.release(a)
    pool.release(c)
    assert pool.free_extents == [(0, 4), (8, 4)]
    pool.release(b)  # joins both neighbours
    assert pool.free_extents == [(0, 12)] and pool.largest_free == 12
    assert pool.allocate(12) == 0


def test_equal_lengths_are_placed_side_by_side():
    pool = RowPool(32)
    eight = pool.allocate(8)  # 0..7
    assert pool.allocate(2) == 8
    pool.release(eight)  # hole 0..7, tail 10..31
    assert pool.allocate(2) == 6  # the hole's tail, right below the other 2 (not first fit's 0)
    assert pool.allocate(4) == 0  # no equal neighbour anywhere: first fit


def test_tail_of_a_hole_is_chosen_when_it_touches_an_equal_extent():
    pool = RowPool(20)
    first = pool.allocate(6)  # 0..5
    pool.allocate(4)  # 6..9
    pool.release(first)  # hole 0..5 sits below the 4
    assert pool.allocate(4) == 2  # the hole's tail, right below the other 4


def test_compact_slides_extents_down_and_reports_safe_moves():
    pool = RowPool(20)
    starts = [pool.allocate(n) for n in (2, 3, 4, 5)]  # 0, 2, 5, 9
    pool.release(starts[0])
    pool.release(starts[2])
    assert pool.allocate(7) is None and pool.free_rows == 12  # free but scattered: 0..1, 5..8, 14..19
    moves = pool.compact()
    assert moves == [(2, 0, 3), (9, 3, 5)]
    assert pool.extents == [(0, 3), (3, 5)] and pool.free_extents == [(8, 12)]
    assert pool.allocate(7) == 8
    for i, (src, dst, _) in enumerate(moves):  # each destination below its source and past earlier moves
        assert dst < src and all(dst >= d + n for _, d, n in moves[:i])


def test_release_of_unknown_start_and_bad_sizes_are_errors():
    pool = RowPool(4)
    with pytest.raises(KeyError):
        pool.release(0)
    with pytest.raises(ValueError):
        pool.allocate(0)
    with pytest.raises(ValueError):
        RowPool(0)
