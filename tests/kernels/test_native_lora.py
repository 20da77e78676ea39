"""The native CPU SGMV kernel (model/csrc/lora_sgmv.cpp) against the loop reference in fp64, and
the native apply that the LoRA layers call on CPU."""

import pytest
import torch

from helpers import pack
from loraplex_server.lora import ops
from loraplex_server.lora.layers import SlotTable
from loraplex_server.lora.mapping import NO_SLOT, LoraMapping
from loraplex_server.model import native

# (x/y dtype, weight dtype) pairs the kernel has
VARIANTS = {"f32": (torch.float32, torch.float32), "bf16": (torch.bfloat16, torch.bfloat16),
            "bf16_f32w": (torch.bfloat16, torch.float32)}
# (in, out): the AVX-512 tile (multiples of 16, LoRA-sized and wide) and the portable tile (odd sizes)
SHAPES = [(64, 48), (96, 384), (40, 24), (33, 17)]
# (slot, tokens) per packed sequence: decode rows, mixed widths with partial tiles, base rows between
LAYOUTS = {
    "decode": [(0, 1), (1, 1), (1, 1), (3, 1), (2, 1)],
    "mixed": [(NO_SLOT, 2), (2, 5), (0, 1), (NO_SLOT, 1), (1, 13), (3, 7), (0, 9), (1, 2)],  # tiles of 1-4 tokens
}
TOL = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (1e-2, 1e-2)}


def make_case(shape, variant, layout, ranks=(4, 16, 0, 7), max_rank=16, seed=0):
    """y0, x, flat weight buffers (each slot's A and Bt at unaligned element offsets, placed in two
    different shuffled orders with a few NaN elements between them, NaN wherever no slot reads),
    rank table, A and Bt offset tables, and mapping."""
    g = torch.Generator().manual_seed(seed)
    (fin, fout), (act, wdt) = shape, VARIANTS[variant]
    mapping = LoraMapping.from_runs(LAYOUTS[layout])
    a_offsets, a = _scatter(ranks, fin, g)
    b_offsets, bt = _scatter(ranks, fout, g)
    x = torch.randn(mapping.num_tokens, fin, generator=g).to(act)
    y0 = torch.randn(mapping.num_tokens, fout, generator=g).to(act)
    cpu = torch.device("cpu")
    tables = SlotTable(len(ranks), cpu, bound=max_rank), SlotTable(len(ranks), cpu), SlotTable(len(ranks), cpu)
    for s, values in enumerate(zip(ranks, a_offsets, b_offsets)):
        for table, value in zip(tables, values):
            table.set(s, value)
    return y0, x, a.to(wdt), bt.to(wdt), *tables, mapping


def _scatter(ranks, width, g):
    """Element offsets of each slot's [r, width] block in a NaN-filled flat buffer, and the buffer
    (``helpers.pack``: shuffled, unaligned)."""
    buf, where = pack({s: torch.randn(r, width, generator=g) / width ** 0.5 for s, r in enumerate(ranks)}, g)
    return [where[s] for s in range(len(ranks))], buf


def reference(y0, x, a, bt, ranks, a_offsets, b_offsets, mapping) -> torch.Tensor:
    y = y0.double()
    ops.lora_apply_reference(y, x.double(), a.double(), bt.double(), ranks, a_offsets, b_offsets,
                             mapping.token_slots)
    return y


def sgmv(kernels, y, x, a, bt, ranks, a_offsets, b_offsets, mapping, table=None):
    kernels.lora_sgmv(y, x, a, bt, ranks.table, a_offsets.table, b_offsets.table,
                      mapping.segment_table() if table is None else table, ranks.bound)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("layout", LAYOUTS)
def test_sgmv_matches_the_loop_reference(shape, variant, layout, native_kernels):
    y0, x, a, bt, ranks, a_offsets, b_offsets, mapping = make_case(shape, variant, layout)
    y = y0.clone()
    sgmv(native_kernels, y, x, a, bt, ranks, a_offsets, b_offsets, mapping)
    atol, rtol = TOL[y.dtype]
    ref = reference(y0, x, a, bt, ranks, a_offsets, b_offsets, mapping)
    torch.testing.assert_close(y.double(), ref.to(y.dtype).double(), atol=atol, rtol=rtol)
    unadapted = mapping.token_slots < 0
    assert torch.equal(y[unadapted], y0[unadapted])  # rows without a slot are untouched, bit for bit
    zero_rank = (mapping.token_slots == 2)  # slot 2 has rank 0 for this module
    assert torch.equal(y[zero_rank], y0[zero_rank])


@pytest.mark.parametrize("shape", [(64, 48), (40, 24), (33, 17)])  # 16-wide, 8-wide and portable tiles
def test_bf16_outputs_round_to_nearest_even_as_torch(shape, native_kernels):
    """x one-hot and A's first column 1 make h exactly 1 for the rank-1 slot, so each output is
    0 + 1 * Bt[o, c] in fp32 and its bf16 store must be torch's rounding of Bt, bit for bit: ties
    to even, NaN kept NaN, infinities, subnormals, values rounding up to infinity."""
    fin, fout = shape
    specials = [1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), float("nan"), float("inf"), -float("inf"),
                2 ** -130, 65504.0, 3.4e38]
    bt_row = torch.randn(fout, generator=torch.Generator().manual_seed(3))
    bt_row[:len(specials)] = torch.tensor(specials)
    a = torch.zeros(fin)
    a[0] = 1.0
    x = torch.zeros(5, fin, dtype=torch.bfloat16)
    x[:, 0] = 1.0
    y = torch.zeros(5, fout, dtype=torch.bfloat16)
    ranks = SlotTable(1, torch.device("cpu"), bound=1)
    offsets = SlotTable(1, torch.device("cpu"))
    ranks.set(0, 1)
    sgmv(native_kernels, y, x, a, bt_row.clone(), ranks, offsets, offsets, LoraMapping.from_runs([(0, 5)]))
    expected = bt_row.to(torch.bfloat16).expand(5, fout).contiguous()
    nan = expected.isnan()
    assert torch.equal(y.isnan(), nan) and nan[:, 3].all()
    assert torch.equal(y[~nan].view(torch.int16), expected[~nan].view(torch.int16))


@pytest.mark.parametrize("threads", [1, 3, 8])
def test_same_result_for_any_thread_count(threads, native_kernels):
    case = make_case((96, 384), "bf16", "mixed", seed=1)
    y0, rest = case[0], case[1:]
    expected = y0.clone()
    sgmv(native_kernels, expected, *rest)
    got = y0.clone()
    sgmv(native.NativeKernels(native_kernels.path, threads), got, *rest)
    assert torch.equal(got, expected) and not torch.equal(got, y0)


def test_native_apply_uses_model_dtype_buffers_and_matches_the_torch_apply(native_kernels):
    apply = ops.apply_function("cpu", native_kernels)
    assert isinstance(apply, ops.NativeLoraApply)
    assert apply.weight_dtype(torch.bfloat16) == torch.bfloat16 and apply.weight_dtype(torch.float32) == torch.float32
    assert apply.weight_dtype(torch.float16) == torch.float32  # no fp16 variant: fp32 buffers, torch runs
    y0, x, a, bt, ranks, a_offsets, b_offsets, mapping = make_case((64, 48), "f32", "mixed", seed=2)
    native_y, torch_y = y0.clone(), y0.clone()
    apply(native_y, x, a, bt, ranks, a_offsets, b_offsets, mapping)
    ops.lora_apply(torch_y, x, a, bt, list(ranks), list(a_offsets), list(b_offsets), mapping)
    torch.testing.assert_close(native_y, torch_y, atol=1e-5, rtol=1e-5)
    assert not torch.equal(torch_y, y0)
    half = y0.half()
    apply(half, x.half(), a, bt, ranks, a_offsets, b_offsets, mapping)  # fp16 activations fall back to the torch runs
    torch.testing.assert_close(half.float(), torch_y, atol=2e-2, rtol=2e-2)


def test_bad_arguments_are_refused(native_kernels):
    y0, x, a, bt, ranks, a_offsets, b_offsets, mapping = make_case((64, 48), "f32", "mixed")
    table, r, ao, bo, bound = mapping.segment_table(), ranks.table, a_offsets.table, b_offsets.table, ranks.bound

    def call(y=y0, a=a, bt=bt, r=r, ao=ao, bo=bo, table=table):
        native_kernels.lora_sgmv(y, x, a, bt, r, ao, bo, table, bound)

    with pytest.raises(ValueError, match="no variant"):
        call(y=y0.bfloat16())
    with pytest.raises(ValueError, match="contiguous"):
        call(a=a[::2], bt=bt[::2])
    with pytest.raises(ValueError, match="int32"):
        call(r=r.long())
    with pytest.raises(ValueError, match="int32"):
        call(bo=bo.long())
    with pytest.raises(ValueError, match="shapes"):
        call(y=y0[:-1])
    with pytest.raises(ValueError, match="1-D"):
        call(a=a[:64 * (a.numel() // 64)].view(-1, 64))
    with pytest.raises(ValueError, match="one entry per slot"):
        call(ao=ao[:-1])
    past_end = table.clone()
    past_end[-1, 1] = x.shape[0] + 1
    with pytest.raises(ValueError, match="outside the tokens"):
        call(y=y0.clone(), table=past_end)
    bad_slot = table.clone()
    bad_slot[0, 2] = len(ranks)
    with pytest.raises(ValueError, match="outside the tokens or the slots"):
        call(y=y0.clone(), table=bad_slot)
    too_high = r.clone()
    too_high[0] = bound + 1
    with pytest.raises(ValueError, match="rank above"):
        call(y=y0.clone(), r=too_high)


@pytest.mark.parametrize("side", ["a", "b"])
@pytest.mark.parametrize("offset", [-1, "last_row", "past_end"])
def test_weights_outside_the_buffers_are_refused_before_anything_is_written(native_kernels, side, offset):
    """A slot whose offset + rank rows run past its A or Bt buffer (or start before it) is an error
    code, and ``y`` is left as it was (validation runs before any tile)."""
    y0, x, a, bt, ranks, a_offsets, b_offsets, mapping = make_case((64, 48), "f32", "mixed")
    tables = {"a": a_offsets.table, "b": b_offsets.table}
    buf, width = (a, 64) if side == "a" else (bt, 48)
    used = next(int(slot) for slot in mapping.segment_table()[:, 2] if ranks[int(slot)] > 0)  # a slot read
    exact_start = buf.numel() - ranks[used] * width  # its rows end exactly at the buffer's end: allowed
    bad = tables[side].clone()
    bad[used] = {-1: -1, "last_row": exact_start + 1, "past_end": buf.numel()}[offset]
    y = y0.clone()
    with pytest.raises(ValueError, match="outside the buffers"):
        native_kernels.lora_sgmv(y, x, a, bt, ranks.table, *{**tables, side: bad}.values(),
                                 mapping.segment_table(), ranks.bound)
    assert torch.equal(y, y0)
    exact = tables[side].clone()
    exact[used] = exact_start
    native_kernels.lora_sgmv(y, x, a, bt, ranks.table, *{**tables, side: exact}.values(),
                             mapping.segment_table(), ranks.bound)
