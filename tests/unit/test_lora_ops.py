"""Every fast LoRA path against the loop reference, over shapes, ranks and slot layouts."""

import pytest
import torch

from loraplex_server.lora import ops
from loraplex_server.lora.mapping import NO_SLOT, LoraMapping


def test_mapping_merges_runs_into_segments():
    m = LoraMapping.from_runs([(0, 3), (0, 1), (NO_SLOT, 2), (2, 1), (1, 4), (1, 0)])
    assert m.segments == ((0, 4, 0), (6, 7, 2), (7, 11, 1))
    assert m.token_slots.tolist() == [0, 0, 0, 0, -1, -1, 2, 1, 1, 1, 1]
    assert m.num_tokens == 11 and m.active_slots == {0, 1, 2}


def test_neighbouring_equal_segments_form_one_run():
    # slots 0,1 (rank 8, 2 tokens each) batch together; slot 2 differs in rank, slot 4 in width
    m = LoraMapping.from_runs([(NO_SLOT, 1), (0, 2), (1, 2), (2, 2), (3, 2), (4, 1)])
    runs = m.segment_runs([8, 8, 16, 16, 16])
    assert [(r.lo, r.hi, r.rank, r.width, r.start, r.end) for r in runs] == [
        (0, 2, 8, 2, 1, 5), (2, 4, 16, 2, 5, 9), (4, 5, 16, 1, 9, 10)]


def test_neighbours_of_other_ranks_join_a_run_within_the_padding_bound():
    m = LoraMapping.from_runs([(0, 2), (1, 2), (2, 2), (3, 2)])
    ranks = [8, 16, 16, 4]
    assert [(r.lo, r.hi, r.rank) for r in m.segment_runs(ranks, max_pad_rows=8)] == [(0, 3, 16), (3, 4, 4)]
    assert [(r.lo, r.hi, r.rank, r.pad_rows) for r in m.segment_runs(ranks, max_pad_rows=20)] == [(0, 4, 16, 20)]
    assert len(m.segment_runs(ranks)) == 3  # no padding allowed: only equal ranks join


def test_runs_skip_slots_unused_by_the_module_and_break_on_gaps():
    m = LoraMapping.from_runs([(0, 1), (1, 1), (3, 1), (0, 1)])
    runs = m.segment_runs([4, 0, 4, 4])
    assert [(r.lo, r.hi, r.start) for r in runs] == [(0, 1, 0), (3, 4, 2), (0, 1, 3)]


def test_mapping_without_adapters_has_no_lora():
    m = LoraMapping.from_runs([(NO_SLOT, 5)])
    assert not m.has_lora and m.token_slots.tolist() == [-1] * 5


def make_case(num_slots, max_rank, ranks, d_in, d_out, runs, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.zeros(num_slots, max_rank, d_in)
    bt = torch.zeros(num_slots, max_rank, d_out)
    for s, r in enumerate(ranks):
        a[s, :r] = torch.randn(r, d_in, generator=g)
        bt[s, :r] = torch.randn(r, d_out, generator=g)
    mapping = LoraMapping.from_runs(runs)
    x = torch.randn(mapping.num_tokens, d_in, generator=g)
    y = torch.randn(mapping.num_tokens, d_out, generator=g)
    return a, bt, x, y, mapping


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
def test_fast_paths_match_reference(ranks, runs, fn, d_in, d_out):
    a, b, x, y, mapping = make_case(len(ranks), 16, ranks, d_in, d_out, runs)
    expected = y.clone()
    ops.lora_apply_reference(expected, x, a, b, mapping.token_slots)
    got = y.clone()
    getattr(ops, fn)(got, x, a, b, ranks, mapping)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    base_rows = mapping.token_slots < 0
    assert torch.equal(got[base_rows], y[base_rows]), "rows without an adapter must keep the base output exactly"


@pytest.mark.parametrize("ranks,runs", CASES)
def test_static_mapping_gathers_every_row(ranks, runs):
    """A captured decode step's mapping (no host segments): every row through the gather path,
    rows without a slot unchanged exactly."""
    a, b, x, y, mapping = make_case(len(ranks), 16, ranks, 64, 96, runs)
    static = LoraMapping.static(mapping.token_slots.clone())
    assert static.is_static and static.has_lora and static.segments == ()
    expected = y.clone()
    ops.lora_apply_reference(expected, x, a, b, mapping.token_slots)
    got = y.clone()
    ops.lora_apply(got, x, a, b, ranks, static)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-4)
    base_rows = mapping.token_slots < 0
    assert torch.equal(got[base_rows], y[base_rows])


def test_static_gather_never_lets_a_base_row_overflow():
    """A row without a slot reads slot 0's weights in the gather; its input must not reach the
    matmul, or an overflowing product (here 1e30 * 1e30) times a zero mask would write NaN."""
    a, b, x, y, mapping = make_case(2, 4, [4, 4], 8, 6, [(0, 1), (NO_SLOT, 1)])
    x[1] = 1e30
    a[0] *= 1e30
    got = y.clone()
    ops.lora_apply(got, x, a, b, [4, 4], LoraMapping.static(mapping.token_slots))
    assert torch.equal(got[1], y[1])


def test_reference_is_the_plain_formula():
    a, b, x, y, mapping = make_case(2, 4, [4, 2], 8, 6, [(1, 1), (NO_SLOT, 1)])
    expected = y.clone()
    expected[0] += b[1].T @ (a[1] @ x[0])  # Bt is B transposed
    ops.lora_apply_reference(y, x, a, b, mapping.token_slots)
    torch.testing.assert_close(y, expected)


@pytest.mark.parametrize("ranks,runs", CASES)
@pytest.mark.parametrize("fn", ["sgmv", "bgmv"])
def test_half_precision_activations_with_fp32_slot_buffers(ranks, runs, fn):
    """A bf16 model on CPU keeps its slot buffers in fp32 (layers.lora_compute_dtype): x is
    converted for the matmuls and the fp32 delta added to the bf16 output, equal to the fp32 loop
    rounded once to bf16; base rows stay bit-exact."""
    a, b, x, y, mapping = make_case(len(ranks), 16, ranks, 64, 96, runs)
    x16, y16 = x.bfloat16(), y.bfloat16()
    expected = y16.float()
    ops.lora_apply_reference(expected, x16.float(), a, b, mapping.token_slots)
    got = y16.clone()
    getattr(ops, fn)(got, x16, a, b, ranks, mapping if fn == "sgmv" else LoraMapping.static(mapping.token_slots))
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.bfloat16().float(), rtol=1e-2, atol=2e-2)
    base_rows = mapping.token_slots < 0
    assert torch.equal(got[base_rows], y16[base_rows])


def test_slot_buffers_are_fp32_on_cpu_and_the_model_dtype_elsewhere():
    from loraplex_server.lora.layers import lora_compute_dtype
    assert lora_compute_dtype(torch.bfloat16, torch.device("cpu")) == torch.float32
    assert lora_compute_dtype(torch.float32, torch.device("cpu")) == torch.float32
    assert lora_compute_dtype(torch.bfloat16, torch.device("cuda")) == torch.bfloat16
