"""Triton LoRA shrink/expand (segment and gather layouts) against ``lora_apply_reference``."""

import pytest
import torch
import triton  # noqa: F401  (required: CI installs it; this file fails without it)
from kernel_cases import (DTYPES, ON_GPU, TOLERANCES, grid, lora_stacks, pool_layout, product, random_runs,
                          slot_ranks, stack_reference, to_pool)

from loraplex_server.lora import triton_ops
from loraplex_server.lora.layers import SlotTable
from loraplex_server.lora.mapping import LoraMapping

HIDDEN, RANKS, ADAPTERS, TOKENS = (576, 4096, 5120), (4, 8, 16, 64), (1, 7, 32), (1, 17, 256)
# CPU: every value of every axis at least once, big hidden sizes with few tokens (interpreter speed).
CPU_CASES = [
    (576, 4, 1, 17, "fp32"), (576, 8, 7, 256, "bf16"), (576, 64, 32, 17, "fp16"), (576, 16, 32, 256, "fp32"),
    (576, 64, 7, 1, "bf16"), (4096, 16, 7, 17, "bf16"), (4096, 8, 1, 1, "fp16"), (5120, 4, 32, 17, "fp32"),
    (5120, 16, 1, 256, "fp16"),
]
CASES = grid(product(HIDDEN, RANKS, ADAPTERS, TOKENS, DTYPES), CPU_CASES)


def make_batch(hidden, max_rank, num_adapters, num_tokens, device, seed=0, fan_out=None):
    """Random y, x, stacks and mapping; num_adapters slots plus one slot of rank 0 for this module."""
    gen = torch.Generator().manual_seed(seed)
    num_slots = num_adapters + 1
    ranks = slot_ranks(num_slots, max_rank)
    a, bt = lora_stacks(num_slots, max_rank, hidden, fan_out or hidden, ranks, gen)
    mapping = LoraMapping.from_runs(random_runs(num_tokens, num_slots, gen), device)
    x = torch.randn(num_tokens, hidden, generator=gen)
    y = torch.randn(num_tokens, fan_out or hidden, generator=gen)
    return y, x, a, bt, ranks, mapping


def expected(y, x, a, bt, ranks, mapping, dtype):
    """The oracle loop in fp64 on the inputs rounded to ``dtype``."""
    f64 = [t.to(dtype).double().cpu() for t in (y, x, a, bt)]
    stack_reference(*f64, ranks, mapping.token_slots.cpu())
    return f64[0]


def pools(a, bt, ranks, device, dtype=torch.float32, seed=0):
    """Row pools of the stacks (shuffled slot order, NaN in every row no slot owns) on the device,
    with their offsets."""
    offsets, num_rows = pool_layout(ranks, seed)
    a_pool, bt_pool = (to_pool(t, ranks, offsets, num_rows).to(device, dtype) for t in (a, bt))
    return a_pool, bt_pool, offsets.to(device)


def assert_matches(out, ref, y, mapping, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double().cpu(), ref, atol=atol, rtol=rtol)
    base = (mapping.token_slots < 0).cpu()
    assert torch.equal(out.cpu()[base], y.to(dtype)[base]), "rows without an adapter must stay bit-identical"


def run_apply(y, x, a, bt, ranks, mapping, dtype, device, layout, split_k=None):
    """Kernels on the given dtype over row pools with NaN in every row no slot owns (never read)."""
    yk = y.to(device, dtype).clone()
    ak, bk, offsets = pools(a, bt, ranks, device, dtype)
    segments = triton_ops.SegmentTensors.from_segments(mapping.segments, device)
    rk = ranks.to(device)
    h = triton_ops.lora_shrink(x.to(device, dtype), ak, rk, offsets, a.shape[1], mapping.token_slots, segments, layout,
                               split_k=split_k)
    triton_ops.lora_expand(yk, h, bk, rk, offsets, mapping.token_slots, segments, layout)
    return yk


@pytest.mark.parametrize("layout", ["segment", "gather"])
@pytest.mark.parametrize("hidden,max_rank,num_adapters,num_tokens,dtype", CASES)
def test_shrink_expand_match_reference(hidden, max_rank, num_adapters, num_tokens, dtype, layout, device):
    dtype = DTYPES[dtype]
    y, x, a, bt, ranks, mapping = make_batch(hidden, max_rank, num_adapters, num_tokens, device)
    out = run_apply(y, x, a, bt, ranks, mapping, dtype, device, layout)
    assert_matches(out, expected(y, x, a, bt, ranks, mapping, dtype), y, mapping, dtype)


@pytest.mark.parametrize("layout", ["segment", "gather"])
@pytest.mark.parametrize("split_k,dtype", [(2, "fp32"), (3, "bf16"), (5, "fp16")])
def test_split_k_matches_reference(split_k, dtype, layout, device):
    dtype = DTYPES[dtype]
    y, x, a, bt, ranks, mapping = make_batch(576, 16, 7, 17, device, seed=1)
    out = run_apply(y, x, a, bt, ranks, mapping, dtype, device, layout, split_k=split_k)
    assert_matches(out, expected(y, x, a, bt, ranks, mapping, dtype), y, mapping, dtype)


def test_shrink_into_input_dtype_buffer(device):
    y, x, a, bt, ranks, mapping = make_batch(576, 8, 7, 17, device, seed=2)
    segments = triton_ops.SegmentTensors.from_segments(mapping.segments, device)
    ak, _, offsets = pools(a, bt, ranks, device, torch.float16)
    for layout in ("segment", "gather"):
        h = triton_ops.lora_shrink(x.to(device, torch.float16), ak, ranks, offsets, 8, mapping.token_slots,
                                   segments, layout, out_dtype=torch.float16)  # [T, R]
        assert h.dtype == torch.float16 and h.shape == (17, 8)
        for t, s in enumerate(mapping.token_slots.tolist()):  # only these cells are defined
            if s >= 0:
                r = int(ranks[s])
                torch.testing.assert_close(h[t, :r].float().cpu(), a[s, :r] @ x[t], atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="split-K"):
        triton_ops.lora_shrink(x.to(device), ak.float(), ranks, offsets, 8, mapping.token_slots, segments, "gather",
                               out_dtype=torch.float16, split_k=2)


@pytest.mark.parametrize("num_tokens,num_adapters", [(1, 1), (17, 7), (256, 32)] if ON_GPU else [(17, 7), (64, 3)])
def test_backend_is_a_drop_in_for_lora_apply(num_tokens, num_adapters, device):
    """The ``lora_apply`` signature and buffers: list ranks and offsets, a ``LoraMapping``, row
    pools; the layout is chosen per step."""
    y, x, a, bt, ranks, mapping = make_batch(576, 16, num_adapters, num_tokens, device, seed=3)
    ak, bk, offsets = pools(a, bt, ranks, device)
    backend = triton_ops.TritonLoraBackend()
    out = y.to(device).clone()
    backend(out, x.to(device), ak, bk, ranks.tolist(), offsets.tolist(), mapping)
    assert_matches(out, expected(y, x, a, bt, ranks, mapping, torch.float32), y, mapping, torch.float32)
    assert backend.segments_for(mapping) is backend.segments_for(mapping)  # built once per step


def test_backend_on_a_static_mapping_reads_the_device_rank_table(device):
    """A captured decode step: a static mapping (token slots only) and a module's rank and offset
    ``SlotTable``s (their device tables are what the kernels read)."""
    y, x, a, bt, ranks, mapping = make_batch(576, 16, 7, 17, device, seed=5)
    ak, bk, offsets = pools(a, bt, ranks, device)
    slot_ranks = SlotTable(len(ranks), device, bound=16)
    slot_offsets = SlotTable(len(ranks), device, bound=ak.shape[0])
    for slot, (rank, offset) in enumerate(zip(ranks.tolist(), offsets.tolist())):
        slot_ranks.set(slot, rank)
        slot_offsets.set(slot, offset)
    backend = triton_ops.TritonLoraBackend()
    assert backend.table_for(slot_ranks, device) is slot_ranks.table
    assert backend.table_for(slot_offsets, device) is slot_offsets.table
    out = y.to(device).clone()
    backend(out, x.to(device), ak, bk, slot_ranks, slot_offsets, LoraMapping.static(mapping.token_slots))
    assert_matches(out, expected(y, x, a, bt, ranks, mapping, torch.float32), y, mapping, torch.float32)


def test_strided_bt_is_read_through_its_strides(device):
    """A Bt that is a view (here of [out, rows] storage) is not copied: strides are read."""
    y, x, a, bt, ranks, mapping = make_batch(576, 16, 7, 17, device, seed=4, fan_out=320)
    ak, bk, offsets = pools(a, bt, ranks, device)
    bt_view = bk.t().contiguous().t()  # [rows, out], out stride rows
    assert not bt_view.is_contiguous()
    for layout in ("segment", "gather"):
        out = y.to(device).clone()
        segments = triton_ops.SegmentTensors.from_segments(mapping.segments, device)
        triton_ops.triton_lora_apply(out, x.to(device), ak, bt_view, ranks.to(device), offsets, 16,
                                     mapping.token_slots, segments, layout)
        assert_matches(out, expected(y, x, a, bt, ranks, mapping, torch.float32), y, mapping, torch.float32)


def test_no_segments_changes_nothing(device):
    y, x, a, bt, ranks, _ = make_batch(576, 8, 3, 5, device)
    mapping = LoraMapping.from_runs([(-1, 5)], device)
    ak, bk, offsets = pools(a, bt, ranks, device)
    out = y.to(device).clone()
    triton_ops.TritonLoraBackend()(out, x.to(device), ak, bk, ranks.tolist(), offsets.tolist(), mapping)
    assert torch.equal(out.cpu(), y)


def test_layout_choice_follows_tokens_per_segment():
    prefill = triton_ops.SegmentTensors.from_segments([(0, 200, 0), (200, 256, 1)], "cpu")
    decode = triton_ops.SegmentTensors.from_segments([(i, i + 1, i % 4) for i in range(16)], "cpu")
    assert triton_ops.choose_layout(prefill) == "segment"
    assert triton_ops.choose_layout(decode) == "gather"


@pytest.mark.skipif(ON_GPU, reason="on a GPU every test already runs the GPU tile sizes")
@pytest.mark.parametrize("layout,dtype", [("segment", "bf16"), ("gather", "fp32")])
def test_gpu_tile_sizes_under_the_interpreter(layout, dtype, device, monkeypatch):
    """The interpreter widens K/N tiles for speed; this runs the exact GPU tiling once per layout."""
    monkeypatch.setattr(triton_ops, "INTERPRETER_TILE_SCALE", 1)
    dtype = DTYPES[dtype]
    y, x, a, bt, ranks, mapping = make_batch(1000, 64, 7, 40, device, seed=5, fan_out=700)
    out = run_apply(y, x, a, bt, ranks, mapping, dtype, device, layout, split_k=2)
    assert_matches(out, expected(y, x, a, bt, ranks, mapping, dtype), y, mapping, dtype)


def test_split_k_fills_the_gpu_only_when_programs_are_few():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert triton_ops._split_k(1, 16, cuda, None) == 16  # decode of one token: split the reduction
    assert triton_ops._split_k(200, 16, cuda, None) == 2
    assert triton_ops._split_k(1000, 16, cuda, None) == 1
    assert triton_ops._split_k(1, 3, cuda, None) == 2  # never more splits than K blocks
    assert triton_ops._split_k(1, 16, cpu, None) == 1 and triton_ops._split_k(1, 16, cpu, 3) == 3
