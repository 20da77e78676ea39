"""Triton LoRA shrink/expand (segment and gather layouts) against the plain loop in
``kernel_cases.stack_reference``, over flat A / Bt buffers addressed by element offsets."""

import pytest
import torch
import triton  # noqa: F401  (required: CI installs it; this file fails without it)
from kernel_cases import (DTYPES, ON_GPU, PLACEMENTS, TOLERANCES, flat_buffers, grid, lora_stacks, product,
                          random_runs, slot_ranks, stack_reference)

from loraplex_server.lora import triton_ops
from loraplex_server.lora.layers import SlotTable
from loraplex_server.lora.mapping import LoraMapping

HIDDEN, RANKS, ADAPTERS, TOKENS = (576, 4096, 5120), (4, 8, 16, 64), (1, 7, 32), (1, 17, 256)
# CPU: every value of every axis at least once, big hidden sizes with few tokens (interpreter speed).
CPU_CASES = [
    (576, 4, 1, 17, "fp32", "arena"), (576, 8, 7, 256, "bf16", "rows"), (576, 64, 32, 17, "fp16", "arena"),
    (576, 16, 32, 256, "fp32", "rows"), (576, 64, 7, 1, "bf16", "arena"), (4096, 16, 7, 17, "bf16", "rows"),
    (4096, 8, 1, 1, "fp16", "arena"), (5120, 4, 32, 17, "fp32", "arena"), (5120, 16, 1, 256, "fp16", "rows"),
]
CASES = grid(product(HIDDEN, RANKS, ADAPTERS, TOKENS, DTYPES, PLACEMENTS), CPU_CASES)


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


def buffers(a, bt, ranks, device, placement="arena", dtype=torch.float32, seed=0):
    """One module's flat A and Bt buffers on the device (NaN in every element no slot owns) and its
    [S] element offsets into each."""
    a_bufs, bt_bufs, a_off, b_off = flat_buffers([a], [bt], ranks[:, None], placement, device, dtype, seed)
    return a_bufs[0], bt_bufs[0], a_off[:, 0], b_off[:, 0]


def assert_matches(out, ref, y, mapping, dtype):
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(out.double().cpu(), ref, atol=atol, rtol=rtol)
    base = (mapping.token_slots < 0).cpu()
    assert torch.equal(out.cpu()[base], y.to(dtype)[base]), "rows without an adapter must stay bit-identical"


def run_apply(y, x, a, bt, ranks, mapping, dtype, device, layout, placement, split_k=None):
    """Kernels on the given dtype over flat buffers with NaN in every element no slot owns."""
    yk = y.to(device, dtype).clone()
    ak, bk, a_off, b_off = buffers(a, bt, ranks, device, placement, dtype)
    segments = triton_ops.SegmentTensors.from_segments(mapping.segments, device)
    rk = ranks.to(device)
    h = triton_ops.lora_shrink(x.to(device, dtype), ak, rk, a_off, a.shape[1], mapping.token_slots, segments, layout,
                               split_k=split_k)
    triton_ops.lora_expand(yk, h, bk, rk, b_off[:, None], mapping.token_slots, segments, layout)  # [S, 1] too
    return yk


@pytest.mark.parametrize("layout", ["segment", "gather"])
@pytest.mark.parametrize("hidden,max_rank,num_adapters,num_tokens,dtype,placement", CASES)
def test_shrink_expand_match_reference(hidden, max_rank, num_adapters, num_tokens, dtype, placement, layout,
                                       device):
    dtype = DTYPES[dtype]
    y, x, a, bt, ranks, mapping = make_batch(hidden, max_rank, num_adapters, num_tokens, device)
    out = run_apply(y, x, a, bt, ranks, mapping, dtype, device, layout, placement)
    assert_matches(out, expected(y, x, a, bt, ranks, mapping, dtype), y, mapping, dtype)


@pytest.mark.parametrize("layout", ["segment", "gather"])
@pytest.mark.parametrize("split_k,dtype,placement", [(2, "fp32", "rows"), (3, "bf16", "arena"), (5, "fp16", "arena")])
def test_split_k_matches_reference(split_k, dtype, placement, layout, device):
    dtype = DTYPES[dtype]
    y, x, a, bt, ranks, mapping = make_batch(576, 16, 7, 17, device, seed=1)
    out = run_apply(y, x, a, bt, ranks, mapping, dtype, device, layout, placement, split_k=split_k)
    assert_matches(out, expected(y, x, a, bt, ranks, mapping, dtype), y, mapping, dtype)


def test_shrink_into_input_dtype_buffer(device):
    y, x, a, bt, ranks, mapping = make_batch(576, 8, 7, 17, device, seed=2)
    segments = triton_ops.SegmentTensors.from_segments(mapping.segments, device)
    ak, _, a_off, _ = buffers(a, bt, ranks, device, dtype=torch.float16)
    for layout in ("segment", "gather"):
        h = triton_ops.lora_shrink(x.to(device, torch.float16), ak, ranks, a_off, 8, mapping.token_slots,
                                   segments, layout, out_dtype=torch.float16)  # [T, R]
        assert h.dtype == torch.float16 and h.shape == (17, 8)
        for t, s in enumerate(mapping.token_slots.tolist()):  # only these cells are defined
            if s >= 0:
                r = int(ranks[s])
                torch.testing.assert_close(h[t, :r].float().cpu(), a[s, :r] @ x[t], atol=1e-2, rtol=1e-2)
    with pytest.raises(ValueError, match="split-K"):
        triton_ops.lora_shrink(x.to(device), ak.float(), ranks, a_off, 8, mapping.token_slots, segments, "gather",
                               out_dtype=torch.float16, split_k=2)


@pytest.mark.parametrize("num_tokens,num_adapters", [(1, 1), (17, 7), (256, 32)] if ON_GPU else [(17, 7), (64, 3)])
def test_backend_is_a_drop_in_for_lora_apply(num_tokens, num_adapters, device):
    """The ``lora_apply`` signature and buffers: list ranks and A / Bt element offsets, a
    ``LoraMapping``, flat buffers; the layout is chosen per step."""
    y, x, a, bt, ranks, mapping = make_batch(576, 16, num_adapters, num_tokens, device, seed=3)
    ak, bk, a_off, b_off = buffers(a, bt, ranks, device)
    backend = triton_ops.TritonLoraBackend()
    out = y.to(device).clone()
    backend(out, x.to(device), ak, bk, ranks.tolist(), a_off.tolist(), b_off.tolist(), mapping)
    assert_matches(out, expected(y, x, a, bt, ranks, mapping, torch.float32), y, mapping, torch.float32)
    assert backend.segments_for(mapping) is backend.segments_for(mapping)  # built once per step


def test_backend_on_a_static_mapping_reads_the_device_tables(device):
    """A captured decode step: a static mapping (token slots only) and a module's rank, A offset
    and Bt offset ``SlotTable``s (their device tables are what the kernels read)."""
    y, x, a, bt, ranks, mapping = make_batch(576, 16, 7, 17, device, seed=5)
    ak, bk, a_off, b_off = buffers(a, bt, ranks, device, seed=5)
    tables = [SlotTable(len(ranks), device, bound=bound) for bound in (16, ak.numel(), bk.numel())]
    for table, values in zip(tables, (ranks, a_off, b_off)):
        for slot, value in enumerate(values.tolist()):
            table.set(slot, value)
    backend = triton_ops.TritonLoraBackend()
    assert all(backend.table_for(table, device) is table.table for table in tables)
    out = y.to(device).clone()
    backend(out, x.to(device), ak, bk, *tables, LoraMapping.static(mapping.token_slots))
    assert_matches(out, expected(y, x, a, bt, ranks, mapping, torch.float32), y, mapping, torch.float32)


def test_buffers_may_be_views_of_one_arena(device):
    """A and Bt as 1-D views (storage offsets) of one buffer, Bt first: offsets count from each
    view's own start, and nothing is copied."""
    y, x, a, bt, ranks, mapping = make_batch(576, 16, 7, 17, device, seed=4, fan_out=320)
    ak, bk, a_off, b_off = buffers(a, bt, ranks, device, seed=4)
    arena = torch.cat([torch.full((5,), float("nan"), device=device), bk, ak])
    bt_view, a_view = arena[5:5 + bk.numel()], arena[5 + bk.numel():]
    for layout in ("segment", "gather"):
        out = y.to(device).clone()
        segments = triton_ops.SegmentTensors.from_segments(mapping.segments, device)
        triton_ops.triton_lora_apply(out, x.to(device), a_view, bt_view, ranks.to(device), a_off, b_off, 16,
                                     mapping.token_slots, segments, layout)
        assert_matches(out, expected(y, x, a, bt, ranks, mapping, torch.float32), y, mapping, torch.float32)


def test_buffer_and_table_shapes_are_checked(device):
    """2-D or strided buffers, and offset or rank tables of the wrong shape, are refused."""
    y, x, a, bt, ranks, mapping = make_batch(576, 8, 3, 5, device)
    ak, bk, a_off, b_off = buffers(a, bt, ranks, device)
    segments = triton_ops.SegmentTensors.from_segments(mapping.segments, device)
    args = (8, mapping.token_slots, segments)
    for bad in (ak[: 576 * 8].view(8, 576), ak[::2]):
        with pytest.raises(ValueError, match="1-D and contiguous"):
            triton_ops.lora_shrink(x.to(device), bad, ranks, a_off, *args)
    for bad_off in (a_off[:-1], a_off[:, None].repeat(1, 2)):
        with pytest.raises(ValueError, match="a_offsets must be"):
            triton_ops.lora_shrink(x.to(device), ak, ranks, bad_off, *args)
    with pytest.raises(ValueError, match="ranks must be"):
        triton_ops.lora_shrink(x.to(device), ak, ranks[:, None].repeat(1, 2), a_off, *args)
    h = triton_ops.lora_shrink(x.to(device), ak, ranks, a_off, *args)
    with pytest.raises(ValueError, match="b_offsets must be"):
        triton_ops.lora_expand(y.to(device), h, bk, ranks, b_off[:-1], mapping.token_slots, segments)


def test_no_segments_changes_nothing(device):
    y, x, a, bt, ranks, _ = make_batch(576, 8, 3, 5, device)
    mapping = LoraMapping.from_runs([(-1, 5)], device)
    ak, bk, a_off, b_off = buffers(a, bt, ranks, device)
    out = y.to(device).clone()
    triton_ops.TritonLoraBackend()(out, x.to(device), ak, bk, ranks.tolist(), a_off.tolist(), b_off.tolist(),
                                   mapping)
    assert torch.equal(out.cpu(), y)


def test_layout_choice_follows_tokens_per_segment():
    prefill = triton_ops.SegmentTensors.from_segments([(0, 200, 0), (200, 256, 1)], "cpu")
    decode = triton_ops.SegmentTensors.from_segments([(i, i + 1, i % 4) for i in range(16)], "cpu")
    assert triton_ops.choose_layout(prefill) == "segment"
    assert triton_ops.choose_layout(decode) == "gather"


@pytest.mark.skipif(ON_GPU, reason="on a GPU every test already runs the GPU tile sizes")
@pytest.mark.parametrize("layout,dtype,placement", [("segment", "bf16", "arena"), ("gather", "fp32", "rows")])
def test_gpu_tile_sizes_under_the_interpreter(layout, dtype, placement, device, monkeypatch):
    """The interpreter widens K/N tiles for speed; this runs the exact GPU tiling once per layout."""
    monkeypatch.setattr(triton_ops, "INTERPRETER_TILE_SCALE", 1)
    dtype = DTYPES[dtype]
    y, x, a, bt, ranks, mapping = make_batch(1000, 64, 7, 40, device, seed=5, fan_out=700)
    out = run_apply(y, x, a, bt, ranks, mapping, dtype, device, layout, placement, split_k=2)
    assert_matches(out, expected(y, x, a, bt, ranks, mapping, dtype), y, mapping, dtype)


def test_split_k_fills_the_gpu_only_when_programs_are_few():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert triton_ops._split_k(1, 16, cuda, None) == 16  # decode of one token: split the reduction
    assert triton_ops._split_k(200, 16, cuda, None) == 2
    assert triton_ops._split_k(1000, 16, cuda, None) == 1
    assert triton_ops._split_k(1, 3, cuda, None) == 2  # never more splits than K blocks
    assert triton_ops._split_k(1, 16, cpu, None) == 1 and triton_ops._split_k(1, 16, cpu, 3) == 3
