"""Every fast LoRA path against the loop reference, over shapes, ranks and slot layouts."""

import pytest
import torch

from helpers import pack
from loraplex_server.lora import ops
from loraplex_server.lora.mapping import NO_SLOT, LoraMapping


def test_mapping_merges_runs_into_segments():
    m = LoraMapping.from_runs([(0, 3), (0, 1), (NO_SLOT, 2), (2, 1), (1, 4), (1, 0)])
    assert m.segments == ((0, 4, 0), (6, 7, 2), (7, 11, 1))
    assert m.token_slots.tolist() == [0, 0, 0, 0, -1, -1, 2, 1, 1, 1, 1]
    assert m.num_tokens == 11 and m.active_slots == {0, 1, 2}


IN, OUT = 64, 32  # widths the run tests place rows at: row o is A element o * IN, Bt element o * OUT


def runs_of(m, ranks, rows, b_rows=None):
    """Runs for slots at pool ``rows`` (A) and ``b_rows`` (Bt, default the same rows), as
    (first A row, A row step, first Bt row, count, rank, width, start, end)."""
    b_rows = rows if b_rows is None else b_rows
    runs = m.segment_runs(ranks, [o * IN for o in rows], [o * OUT for o in b_rows])
    for r in runs:
        assert r.a_offset % IN == 0 and r.a_step % IN == 0 and r.b_offset % OUT == 0 and r.b_step % OUT == 0
    return [(r.a_offset // IN, r.a_step // IN, r.b_offset // OUT, r.count, r.rank, r.width, r.start, r.end)
            for r in runs]


def test_neighbouring_segments_of_consecutive_equal_rank_blocks_form_one_run():
    # slots 0,1 (rank 8, rows 0..15) batch together; slots 2,3 (rank 16, rows 16..47) too; slot 4
    # differs in width
    m = LoraMapping.from_runs([(NO_SLOT, 1), (0, 2), (1, 2), (2, 2), (3, 2), (4, 1)])
    assert runs_of(m, [8, 8, 16, 16, 16], [0, 8, 16, 32, 48]) == [
        (0, 8, 0, 2, 8, 2, 1, 5), (16, 16, 16, 2, 16, 2, 5, 9), (48, 0, 48, 1, 16, 1, 9, 10)]


def test_evenly_spaced_blocks_form_a_run_whatever_the_gap():
    """Equal-rank blocks that step evenly (an adapter's other modules between them, in a shared
    buffer) are one run; A and Bt may step differently; a broken step, or a Bt block that does not
    continue its own step, starts a new run."""
    m = LoraMapping.from_runs([(0, 1), (1, 1), (2, 1), (3, 1)])
    assert runs_of(m, [4] * 4, [0, 10, 20, 30], [5, 9, 13, 17]) == [(0, 10, 5, 4, 4, 1, 0, 4)]
    assert runs_of(m, [4] * 4, [0, 10, 20, 31]) == [(0, 10, 0, 3, 4, 1, 0, 3), (31, 0, 31, 1, 4, 1, 3, 4)]
    assert runs_of(m, [4] * 4, [0, 10, 20, 30], [0, 10, 21, 31]) == [(0, 10, 0, 2, 4, 1, 0, 2),
                                                                      (20, 10, 21, 2, 4, 1, 2, 4)]
    assert len(runs_of(m, [4] * 4, [30, 20, 10, 0])) == 4  # descending blocks: no negative strides


def test_equal_ranks_whose_rows_are_not_evenly_spaced_are_separate_runs():
    m = LoraMapping.from_runs([(0, 2), (1, 2), (2, 2), (3, 2), (4, 2)])
    # a pair sets a run's step (8); 12 breaks it and starts a run that 17 continues (step 5); 20 does not
    assert [(r[0], r[1], r[3]) for r in runs_of(m, [4] * 5, [0, 8, 12, 17, 20])] == [
        (0, 8, 2), (12, 5, 2), (20, 0, 1)]


def test_runs_skip_slots_unused_by_the_module_and_break_on_gaps():
    m = LoraMapping.from_runs([(0, 1), (1, 1), (3, 1), (0, 1)])
    assert [(r[0], r[3], r[6]) for r in runs_of(m, [4, 0, 4, 4], [8, 0, 4, 12])] == [
        (8, 1, 0), (12, 1, 2), (8, 1, 3)]


def test_mapping_without_adapters_has_no_lora():
    m = LoraMapping.from_runs([(NO_SLOT, 5)])
    assert not m.has_lora and m.token_slots.tolist() == [-1] * 5


POOL_LAYOUTS = ["packed", "stacked", "shuffled", "arena"]


def pool_rows(ranks, layout, gen):
    """Row offsets of slots with these ranks in a row pool: 'packed' (extents back to back in slot
    order), 'stacked' (every slot at s * 16, the oldest layout), 'shuffled' (random order with
    gaps); the pool's size in rows."""
    extents = [max(r, 1) for r in ranks]
    if layout == "stacked":
        return [16 * s for s in range(len(ranks))], 16 * len(ranks)
    order = list(range(len(ranks)))
    if layout == "shuffled":
        order = torch.randperm(len(ranks), generator=gen).tolist()
    offsets, top = [0] * len(ranks), 0
    for s in order:
        top += 3 if layout == "shuffled" else 0
        offsets[s] = top
        top += extents[s]
    return offsets, top + 2


def make_case(ranks, d_in, d_out, runs, layout="packed", seed=0):
    """Flat buffers A and Bt holding slots of these ranks (a row pool, or for 'arena' blocks placed
    independently on each side), with A and Bt element offsets; every element no slot owns is NaN,
    so a path that reads past a slot's rank (another adapter's weights) turns NaN."""
    g = torch.Generator().manual_seed(seed)
    if layout == "arena":  # each side's blocks shuffled, unaligned, apart (helpers.pack)
        a, a_where = pack({s: torch.randn(r, d_in, generator=g) for s, r in enumerate(ranks)}, g)
        bt, b_where = pack({s: torch.randn(r, d_out, generator=g) for s, r in enumerate(ranks)}, g)
        a_offsets, b_offsets = [a_where[s] for s in range(len(ranks))], [b_where[s] for s in range(len(ranks))]
    else:
        rows, num_rows = pool_rows(ranks, layout, g)
        a_offsets, b_offsets = [o * d_in for o in rows], [o * d_out for o in rows]
        a = torch.full((num_rows * d_in,), float("nan"))
        bt = torch.full((num_rows * d_out,), float("nan"))
        for ao, bo, r in zip(a_offsets, b_offsets, ranks):
            a[ao:ao + r * d_in] = torch.randn(r * d_in, generator=g)
            bt[bo:bo + r * d_out] = torch.randn(r * d_out, generator=g)
    mapping = LoraMapping.from_runs(runs)
    x = torch.randn(mapping.num_tokens, d_in, generator=g)
    y = torch.randn(mapping.num_tokens, d_out, generator=g)
    return a, bt, a_offsets, b_offsets, x, y, mapping


CASES = [
    # (ranks per slot, runs of (slot, tokens))
    ([8], [(0, 1)]),
    ([4, 8, 16], [(0, 3), (NO_SLOT, 2), (1, 1), (2, 7)]),
    ([8, 0, 16, 4], [(0, 1), (2, 1), (3, 1), (NO_SLOT, 1), (0, 1), (2, 1)]),  # slot 1: module unused
    ([16] * 7, [(s % 7, 1) for s in range(17)] + [(NO_SLOT, 3)]),
    ([8, 8, 8, 16, 16, 4], [(NO_SLOT, 2), (0, 3), (1, 3), (2, 3), (3, 1), (4, 1), (5, 5)]),  # sorted decode-like
    ([4, 16], [(NO_SLOT, 5)]),
]


@pytest.mark.parametrize("ranks,runs", CASES)
@pytest.mark.parametrize("fn", ["sgmv", "bgmv", "lora_apply"])
@pytest.mark.parametrize("d_in,d_out", [(64, 96), (96, 32)])
@pytest.mark.parametrize("layout", POOL_LAYOUTS)
def test_fast_paths_match_reference(ranks, runs, fn, d_in, d_out, layout):
    a, b, a_offsets, b_offsets, x, y, mapping = make_case(ranks, d_in, d_out, runs, layout)
    expected = y.clone()
    ops.lora_apply_reference(expected, x, a, b, ranks, a_offsets, b_offsets, mapping.token_slots)
    got = y.clone()
    if fn == "bgmv":
        ops.bgmv(got, x, a, b, ranks, a_offsets, b_offsets, LoraMapping.static(mapping.token_slots))
    else:
        getattr(ops, fn)(got, x, a, b, ranks, a_offsets, b_offsets, mapping)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    base_rows = mapping.token_slots < 0
    assert torch.equal(got[base_rows], y[base_rows]), "rows without an adapter must keep the base output exactly"


@pytest.mark.parametrize("ranks,runs", CASES)
@pytest.mark.parametrize("layout", POOL_LAYOUTS)
def test_static_mapping_gathers_every_row(ranks, runs, layout):
    """A captured decode step's mapping (no host segments): every row through the gather path,
    rows without a slot unchanged exactly."""
    a, b, a_offsets, b_offsets, x, y, mapping = make_case(ranks, 64, 96, runs, layout)
    static = LoraMapping.static(mapping.token_slots.clone())
    assert static.is_static and static.has_lora and static.segments == ()
    expected = y.clone()
    ops.lora_apply_reference(expected, x, a, b, ranks, a_offsets, b_offsets, mapping.token_slots)
    got = y.clone()
    ops.lora_apply(got, x, a, b, ranks, a_offsets, b_offsets, static)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    base_rows = mapping.token_slots < 0
    assert torch.equal(got[base_rows], y[base_rows])


def test_static_gather_never_lets_a_base_row_overflow():
    """A row without a slot reads slot 0's weights in the gather; its input must not reach the
    matmul, or an overflowing product (here 1e30 * 1e30) times a zero mask would write NaN."""
    a, b, a_offsets, b_offsets, x, y, mapping = make_case([4, 4], 8, 6, [(0, 1), (NO_SLOT, 1)])
    x[1] = 1e30
    a[0:4 * 8] *= 1e30
    got = y.clone()
    ops.lora_apply(got, x, a, b, [4, 4], a_offsets, b_offsets, LoraMapping.static(mapping.token_slots))
    assert torch.equal(got[1], y[1])


def test_gather_masks_rows_past_a_slots_rank_that_belong_to_its_neighbour():
    """Rows right after a slot's rank are the next adapter's weights (finite, not padding): the
    gather reads max_rank rows from every offset, and must drop those past the slot's rank."""
    g = torch.Generator().manual_seed(3)
    a, bt = torch.randn(12, 8, generator=g), torch.randn(12, 6, generator=g)  # every row finite and in use
    ranks, rows = [2, 8, 2], [0, 2, 10]  # slot 0 rows 0..1, slot 1 rows 2..9, slot 2 rows 10..11
    mapping = LoraMapping.from_runs([(0, 1), (2, 1), (1, 1)])
    x, y = torch.randn(3, 8, generator=g), torch.randn(3, 6, generator=g)
    expected = y.clone()
    for t, (o, r) in enumerate([(0, 2), (10, 2), (2, 8)]):
        expected[t] += (a[o:o + r] @ x[t]) @ bt[o:o + r]
    got = y.clone()
    ops.bgmv(got, x, a.view(-1), bt.view(-1), ranks, [o * 8 for o in rows], [o * 6 for o in rows],
             LoraMapping.static(mapping.token_slots))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    unmasked = y.clone()  # what a gather without the mask would compute for slot 0
    unmasked[0] += (a[0:8] @ x[0]) @ bt[0:8]
    assert not torch.allclose(got[0], unmasked[0])


def test_reference_is_the_plain_formula():
    a, b, a_offsets, b_offsets, x, y, mapping = make_case([4, 2], 8, 6, [(1, 1), (NO_SLOT, 1)], "arena")
    ao, bo = a_offsets[1], b_offsets[1]
    expected = y.clone()
    expected[0] += b[bo:bo + 12].view(2, 6).T @ (a[ao:ao + 16].view(2, 8) @ x[0])  # Bt is B transposed
    ops.lora_apply_reference(y, x, a, b, [4, 2], a_offsets, b_offsets, mapping.token_slots)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("ranks,runs", CASES)
@pytest.mark.parametrize("fn", ["sgmv", "bgmv"])
def test_half_precision_activations_with_fp32_pool_buffers(ranks, runs, fn):
    """A bf16 model on CPU keeps its pool buffers in fp32 (layers.lora_compute_dtype): x is
    converted for the matmuls and the fp32 delta added to the bf16 output, equal to the fp32 loop
    rounded once to bf16; base rows stay bit-exact."""
    a, b, a_offsets, b_offsets, x, y, mapping = make_case(ranks, 64, 96, runs, "arena")
    x16, y16 = x.bfloat16(), y.bfloat16()
    expected = y16.float()
    ops.lora_apply_reference(expected, x16.float(), a, b, ranks, a_offsets, b_offsets, mapping.token_slots)
    got = y16.clone()
    getattr(ops, fn)(got, x16, a, b, ranks, a_offsets, b_offsets,
                     mapping if fn == "sgmv" else LoraMapping.static(mapping.token_slots))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.bfloat16().float(), rtol=1e-2, atol=2e-2)
    base_rows = mapping.token_slots < 0
    assert torch.equal(got[base_rows], y16[base_rows])


def test_slot_buffers_are_fp32_on_cpu_and_the_model_dtype_elsewhere():
    from loraplex_server.lora.layers import lora_compute_dtype
    assert lora_compute_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    assert lora_compute_dtype(torch.float32, torch.device("cpu")) == torch.float32
    assert lora_compute_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16
