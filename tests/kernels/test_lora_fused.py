"""Fused projections (q/k/v, gate/up): one shrink over several A stacks, one expand into several
outputs or into column slices of one fused output, each projection with its own per-slot ranks."""

import pytest
import torch
from kernel_cases import (DTYPES, TOLERANCES, grid, lora_stacks, pool_layout, product, random_runs, slot_ranks,
                          stack_reference, to_pool)

from loraplex_server.lora import triton_ops
from loraplex_server.lora.mapping import LoraMapping
from loraplex_server.lora.ops import lora_apply_reference

FULL = product((576, 4096), (1, 17, 256), DTYPES, ("segment", "gather"))
CPU = [(576, 17, "fp32", "segment"), (576, 17, "bf16", "gather"), (576, 64, "fp16", "segment"),
       (576, 1, "fp32", "gather")]


def qkv_batch(hidden, num_tokens, device, concat_a: bool, seed=0):
    """q/k/v with outs (hidden, hidden / 4, hidden / 4); the adapter of slot 1 skips k (rank 0)."""
    gen = torch.Generator().manual_seed(seed)
    num_slots, max_rank, outs = 4, 16, [hidden, hidden // 4, hidden // 4]
    ranks = torch.stack([slot_ranks(num_slots, max_rank) for _ in outs], dim=1)  # [S, 3]
    ranks[1, 1] = 0
    stacks = [lora_stacks(num_slots, max_rank, hidden, n, ranks[:, p], gen) for p, n in enumerate(outs)]
    mapping = LoraMapping.from_runs(random_runs(num_tokens, num_slots, gen), device)
    x = torch.randn(num_tokens, hidden, generator=gen)
    ys = [torch.randn(num_tokens, n, generator=gen) for n in outs]
    return ys, x, [a for a, _ in stacks], [bt for _, bt in stacks], ranks, mapping


def expected(ys, x, a_list, bt_list, ranks, mapping, dtype):
    outs = []
    for p, (y, a, bt) in enumerate(zip(ys, a_list, bt_list)):
        f64 = [t.to(dtype).double() for t in (y, x, a, bt)]
        stack_reference(*f64, ranks[:, p], mapping.token_slots.cpu())
        outs.append(f64[0])
    return outs


def prepared(ranks, a_list, bt_list, dtype, device, concat_a):
    """Device row pools, one per projection, sharing one offset table (each slot's extent is its
    largest rank over the projections), NaN in every row a projection's slot does not own. With
    ``concat_a`` the A pools are column views of one [rows, 3 * in] buffer."""
    offsets, num_rows = pool_layout(ranks)
    a_dev = [to_pool(a, ranks[:, p], offsets, num_rows).to(device, dtype) for p, a in enumerate(a_list)]
    if concat_a:
        buf = torch.cat(a_dev, dim=1)
        k = a_list[0].shape[2]
        a_dev = [buf[:, p * k:(p + 1) * k] for p in range(len(a_list))]
    bt_dev = [to_pool(bt, ranks[:, p], offsets, num_rows).to(device, dtype) for p, bt in enumerate(bt_list)]
    return a_dev, bt_dev, offsets.to(device)


@pytest.mark.parametrize("hidden,num_tokens,dtype,layout", grid(FULL, CPU))
@pytest.mark.parametrize("fused_output", [False, True])
def test_fused_qkv_matches_three_reference_loops(hidden, num_tokens, dtype, layout, fused_output, device):
    dtype = DTYPES[dtype]
    concat_a = fused_output  # cover both A forms without doubling the grid
    ys, x, a_list, bt_list, ranks, mapping = qkv_batch(hidden, num_tokens, device, concat_a)
    a_dev, bt_dev, offsets = prepared(ranks, a_list, bt_list, dtype, device, concat_a)
    segments = triton_ops.SegmentTensors.from_segments(mapping.segments, device)
    if fused_output:
        y_fused = torch.cat(ys, dim=1).to(device, dtype)  # [T, out_q + out_k + out_v]
        triton_ops.triton_lora_apply(y_fused, x.to(device, dtype), a_dev, bt_dev, ranks.to(device), offsets, 16,
                                     mapping.token_slots, segments, layout)
        outs = list(y_fused.split([y.shape[1] for y in ys], dim=1))
    else:
        outs = [y.to(device, dtype).clone() for y in ys]
        triton_ops.triton_lora_apply(outs, x.to(device, dtype), a_dev, bt_dev, ranks.to(device), offsets, 16,
                                     mapping.token_slots, segments, layout)
    atol, rtol = TOLERANCES[dtype]
    for out, ref in zip(outs, expected(ys, x, a_list, bt_list, ranks, mapping, dtype)):
        torch.testing.assert_close(out.double().cpu(), ref, atol=atol, rtol=rtol)


def test_rank_zero_projection_leaves_its_output_alone(device):
    ys, x, a_list, bt_list, ranks, _ = qkv_batch(576, 6, device, concat_a=False)
    mapping = LoraMapping.from_runs([(1, 6)], device)  # slot 1: k has rank 0
    outs = [y.to(device).clone() for y in ys]
    segments = triton_ops.SegmentTensors.from_segments(mapping.segments, device)
    a_dev, bt_dev, offsets = prepared(ranks, a_list, bt_list, torch.float32, device, False)
    triton_ops.triton_lora_apply(outs, x.to(device), a_dev, bt_dev, ranks.to(device), offsets, 16, mapping.token_slots,
                                 segments)
    assert torch.equal(outs[1].cpu(), ys[1])
    assert not torch.equal(outs[0].cpu(), ys[0])


def test_fused_inputs_are_validated(device):
    ys, x, a_list, bt_list, ranks, mapping = qkv_batch(576, 4, device, concat_a=False)
    a_pools, bt_pools, offsets = prepared(ranks, a_list, bt_list, torch.float32, "cpu", False)
    segments = triton_ops.SegmentTensors.from_segments(mapping.segments, device)
    with pytest.raises(ValueError, match="columns"):
        triton_ops.lora_expand(torch.zeros(4, 100), torch.zeros(4, 48), bt_pools, ranks, offsets, mapping.token_slots,
                               segments)
    with pytest.raises(ValueError, match="fused"):
        triton_ops.lora_shrink(x, [a_pools[0], a_pools[1][:8]], ranks[:, :2], offsets, 16, mapping.token_slots,
                               segments)
    with pytest.raises(ValueError, match="between 1 and 3"):
        triton_ops.lora_shrink(x, a_pools + a_pools[:1], ranks, offsets, 16, mapping.token_slots, segments)


# ---------------------------------------------------------------- shared-input groups in the model


def qkv_layers(device, backend, seed=0):
    """q/k/v ``LoraLinear`` layers over one hidden size, grouped, with mixed-rank adapters in
    slots 0 and 1 (slot 1's adapter skips k); returns the layers and a mapping over 6 tokens."""
    from loraplex_server.lora.fusion import group_shared_inputs
    from loraplex_server.lora.layers import LoraLinear, LoraStepState, SlotTable
    from loraplex_server.lora.weights import LoraModuleWeights, ModuleKey

    gen = torch.Generator().manual_seed(seed)
    state = LoraStepState(backend)
    offsets = SlotTable(3, torch.device(device), bound=24)
    offsets.set(0, 12)
    offsets.set(1, 3)
    layers = {}
    for name, out in (("q_proj", 64), ("k_proj", 16), ("v_proj", 16)):
        base = torch.nn.Linear(64, out, bias=False).to(device)
        layer = LoraLinear(base, ModuleKey(0, name), 3, 8, state, pool_rows=24, slot_offsets=offsets)
        for slot, rank in ((0, 8), (1, 0 if name == "k_proj" else 4)):
            if rank:  # slot 0 at rows 12..19, slot 1 at rows 3..6: neither at the slot's stride
                layer.set_slot(slot, (12, 3)[slot], LoraModuleWeights(torch.randn(rank, 64, generator=gen),
                                                                      torch.randn(out, rank, generator=gen), 0.5))
        layers[name] = layer
    groups = group_shared_inputs({layer.key: layer for layer in layers.values()})
    assert len(groups) == 1 and groups[0].members == list(layers.values())
    state.mapping = LoraMapping.from_runs([(0, 2), (-1, 1), (1, 3)], device)
    return layers, state


def reference_out(layer, x):
    y = layer.base(x).clone()
    lora_apply_reference(y, x, layer.lora_a, layer.lora_bt, layer.slot_ranks, layer.slot_offsets,
                         layer.state.mapping.token_slots)
    return y


@pytest.mark.parametrize("same_input", [True, False])
def test_group_members_match_the_reference_with_one_shrink(device, monkeypatch, same_input):
    """Called on one input, q/k/v run one shrink and three expands; called on different inputs
    (a model that feeds them differently) each call shrinks its own input: both exact."""
    calls = []
    shrink = triton_ops.lora_shrink
    monkeypatch.setattr(triton_ops, "lora_shrink", lambda *a, **k: (calls.append(1), shrink(*a, **k))[1])
    layers, _ = qkv_layers(device, triton_ops.TritonLoraBackend())
    x = torch.randn(6, 64, device=device)
    inputs = [x, x, x] if same_input else [x, torch.randn(6, 64, device=device), x]
    with torch.no_grad():
        for layer, inp in zip(layers.values(), inputs):
            torch.testing.assert_close(layer(inp), reference_out(layer, inp), atol=1e-4, rtol=1e-4)
    assert len(calls) == (1 if same_input else 3)
    if same_input:
        assert layers["q_proj"].group._x is None  # references dropped once every member ran


def test_group_without_a_split_apply_runs_each_layer(device):
    """The torch ops have no shrink/expand: grouped layers apply one by one, same result."""
    from loraplex_server.lora.ops import lora_apply

    layers, _ = qkv_layers(device, lora_apply)
    x = torch.randn(6, 64, device=device)
    with torch.no_grad():
        for layer in layers.values():
            torch.testing.assert_close(layer(x), reference_out(layer, x), atol=1e-4, rtol=1e-4)
