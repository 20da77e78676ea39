"""Fused projections (q/k/v, gate/up): one shrink over several A buffers, one expand into several
outputs (or column views of one fused output), each projection with its own per-slot ranks and its
own A and Bt element offsets (one buffer per projection, or one arena per side shared by all)."""

import pytest
import torch
from kernel_cases import (DTYPES, TOLERANCES, flat_buffers, grid, lora_stacks, pack, product, random_runs,
                          stack_reference)

from loraplex_server.lora import triton_ops
from loraplex_server.lora.fusion import group_shared_inputs
from loraplex_server.lora.layers import LoraLinear, LoraStepState
from loraplex_server.lora.mapping import LoraMapping
from loraplex_server.lora.weights import ModuleKey

FULL = product((576, 4096), (1, 17, 256), DTYPES, ("segment", "gather"), ("rows", "arena"))
CPU = [(576, 17, "fp32", "segment", "arena"), (576, 17, "bf16", "gather", "rows"),
       (576, 64, "fp16", "segment", "rows"), (576, 1, "fp32", "gather", "arena")]
# [S, 3] ranks of q/k/v, different per projection: slot 1 skips k, slot 2 skips q, slot 3 uses none.
QKV_RANKS = torch.tensor([[16, 4, 8], [4, 0, 16], [0, 16, 4], [0, 0, 0]], dtype=torch.int32)


def qkv_batch(hidden, num_tokens, device, seed=0):
    """q/k/v with outs (hidden, hidden / 4, hidden / 4) and ``QKV_RANKS``."""
    gen = torch.Generator().manual_seed(seed)
    ranks, max_rank, outs = QKV_RANKS, 16, [hidden, hidden // 4, hidden // 4]
    stacks = [lora_stacks(len(ranks), max_rank, hidden, n, ranks[:, p], gen) for p, n in enumerate(outs)]
    mapping = LoraMapping.from_runs(random_runs(num_tokens, len(ranks), gen), device)
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


def prepared(ranks, a_list, bt_list, dtype, device, placement):
    """Device buffers and [S, 3] offsets (``kernel_cases.flat_buffers``). "rows": separate A
    tensors, and the Bt buffers as 1-D views of one concatenation (each from its own start);
    "arena": one A and one Bt buffer for all three, blocks at unaligned, unrelated offsets."""
    a_dev, bt_dev, a_off, b_off = flat_buffers(a_list, bt_list, ranks, placement, device, dtype)
    if placement == "rows":
        cat, starts = torch.cat(bt_dev), [0]
        for b in bt_dev:
            starts.append(starts[-1] + b.numel())
        bt_dev = [cat[s:e] for s, e in zip(starts, starts[1:])]
    else:
        assert (a_off % a_list[0].shape[2] != 0).any() and not torch.equal(a_off, b_off)
    return a_dev, bt_dev, a_off, b_off


@pytest.mark.parametrize("hidden,num_tokens,dtype,layout,placement", grid(FULL, CPU))
@pytest.mark.parametrize("fused_output", [False, True])
def test_fused_qkv_matches_three_reference_loops(hidden, num_tokens, dtype, layout, placement, fused_output, device):
    dtype = DTYPES[dtype]
    ys, x, a_list, bt_list, ranks, mapping = qkv_batch(hidden, num_tokens, device)
    a_dev, bt_dev, a_off, b_off = prepared(ranks, a_list, bt_list, dtype, device, placement)
    segments = triton_ops.SegmentTensors.from_segments(mapping.segments, device)
    if fused_output:  # column views of one [T, out_q + out_k + out_v] output
        y_fused = torch.cat(ys, dim=1).to(device, dtype)
        outs = list(y_fused.split([y.shape[1] for y in ys], dim=1))
    else:
        outs = [y.to(device, dtype).clone() for y in ys]
    triton_ops.triton_lora_apply(outs, x.to(device, dtype), a_dev, bt_dev, ranks.to(device), a_off, b_off, 16,
                                 mapping.token_slots, segments, layout)
    if fused_output:
        outs = list(y_fused.split([y.shape[1] for y in ys], dim=1))
    atol, rtol = TOLERANCES[dtype]
    for out, ref in zip(outs, expected(ys, x, a_list, bt_list, ranks, mapping, dtype)):
        torch.testing.assert_close(out.double().cpu(), ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("placement", ["rows", "arena"])
def test_rank_zero_projection_leaves_its_output_alone(device, placement):
    ys, x, a_list, bt_list, ranks, _ = qkv_batch(576, 6, device)
    mapping = LoraMapping.from_runs([(1, 6)], device)  # slot 1: k has rank 0
    outs = [y.to(device).clone() for y in ys]
    segments = triton_ops.SegmentTensors.from_segments(mapping.segments, device)
    a_dev, bt_dev, a_off, b_off = prepared(ranks, a_list, bt_list, torch.float32, device, placement)
    triton_ops.triton_lora_apply(outs, x.to(device), a_dev, bt_dev, ranks.to(device), a_off, b_off, 16,
                                 mapping.token_slots, segments)
    assert torch.equal(outs[1].cpu(), ys[1])
    assert not torch.equal(outs[0].cpu(), ys[0]) and not torch.equal(outs[2].cpu(), ys[2])


def test_fused_inputs_are_validated(device):
    ys, x, a_list, bt_list, ranks, mapping = qkv_batch(576, 4, device)
    a_bufs, bt_bufs, a_off, b_off = prepared(ranks, a_list, bt_list, torch.float32, device, "arena")
    segments = triton_ops.SegmentTensors.from_segments(mapping.segments, device)
    h = torch.zeros(4, 48, device=device)
    with pytest.raises(ValueError, match="3 projections need 3 outputs"):
        triton_ops.lora_expand(torch.zeros(4, 864, device=device), h, bt_bufs, ranks, b_off, mapping.token_slots,
                               segments)
    with pytest.raises(ValueError, match="b_offsets must be"):  # one column for three projections
        triton_ops.lora_expand([y.to(device) for y in ys], h, bt_bufs, ranks, b_off[:, 0], mapping.token_slots,
                               segments)
    with pytest.raises(ValueError, match="a_offsets must be"):  # three columns for two projections
        triton_ops.lora_shrink(x, a_bufs[:2], ranks[:, :2], a_off, 16, mapping.token_slots, segments)
    with pytest.raises(ValueError, match="share dtype"):
        triton_ops.lora_shrink(x, [a_bufs[0], a_bufs[1].half()], ranks[:, :2], a_off[:, :2], 16,
                               mapping.token_slots, segments)
    with pytest.raises(ValueError, match="between 1 and 3"):
        triton_ops.lora_shrink(x, a_bufs + a_bufs[:1], ranks, a_off, 16, mapping.token_slots, segments)


# ---------------------------------------------------------------- shared-input groups in the model


def qkv_layers(device, backend, seed=0, v_rank_bound=8):
    """q/k/v ``LoraLinear`` layers over one hidden size sharing ONE A and ONE Bt buffer (an arena),
    grouped, with mixed-rank adapters in slots 0 and 1 (slot 1's adapter skips k), each block at
    an unaligned element offset, A and Bt in unrelated orders; a mapping over 6 tokens."""
    gen = torch.Generator().manual_seed(seed)
    state = LoraStepState(backend)
    layers, a_blocks, b_blocks = {}, {}, {}
    for name, out, bound in (("q_proj", 64, 8), ("k_proj", 16, 8), ("v_proj", 16, v_rank_bound)):
        key = ModuleKey(0, name)
        layers[key] = LoraLinear(torch.nn.Linear(64, out, bias=False).to(device), key, 3, bound, state)
        for slot, rank in ((0, 8), (1, 0 if name == "k_proj" else 4)):
            a_blocks[name, slot] = torch.randn(rank, 64, generator=gen)
            b_blocks[name, slot] = torch.randn(rank, out, generator=gen) / 4
            layers[key].slot_ranks.set(slot, rank)
    a_arena, a_where = pack(a_blocks, gen)
    b_arena, b_where = pack(b_blocks, gen)
    for key, layer in layers.items():
        layer.lora_a, layer.lora_bt = a_arena.to(device), b_arena.to(device)  # one arena per side for all
        for slot in (0, 1):
            layer.a_offsets.set(slot, a_where[key.name, slot])
            layer.b_offsets.set(slot, b_where[key.name, slot])
    groups = group_shared_inputs(layers)
    state.mapping = LoraMapping.from_runs([(0, 2), (-1, 1), (1, 3)], device)
    return {key.name: layer for key, layer in layers.items()}, groups


def reference_out(layer, x):
    """base(x) plus the delta as a plain loop over the layer's flat buffers and offset tables."""
    y = layer.base(x).clone()
    for t, s in enumerate(layer.state.mapping.token_slots.tolist()):
        if s >= 0:
            r, a, b = layer.slot_ranks[s], layer.a_offsets[s], layer.b_offsets[s]
            A = layer.lora_a[a:a + r * layer.in_features].view(r, layer.in_features)
            Bt = layer.lora_bt[b:b + r * layer.out_features].view(r, layer.out_features)
            y[t] += (A @ x[t]) @ Bt
    return y


@pytest.mark.parametrize("same_input", [True, False])
def test_group_members_match_the_reference_with_one_shrink(device, monkeypatch, same_input):
    """Called on one input, q/k/v run one shrink and three expands; called on different inputs
    (a model that feeds them differently) each call shrinks its own input: both exact."""
    calls = []
    shrink = triton_ops.lora_shrink
    monkeypatch.setattr(triton_ops, "lora_shrink", lambda *a, **k: (calls.append(1), shrink(*a, **k))[1])
    layers, groups = qkv_layers(device, triton_ops.TritonLoraBackend())
    assert len(groups) == 1 and groups[0].members == list(layers.values())
    x = torch.randn(6, 64, device=device)
    inputs = [x, x, x] if same_input else [x, torch.randn(6, 64, device=device), x]
    with torch.no_grad():
        for layer, inp in zip(layers.values(), inputs):
            out = layer(inp)
            assert not torch.equal(out, layer.base(inp))  # every member has an adapter on some token
            torch.testing.assert_close(out, reference_out(layer, inp), atol=1e-4, rtol=1e-4)
    assert len(calls) == (1 if same_input else 3)
    if same_input:
        assert layers["q_proj"].group._x is None  # references dropped once every member ran


def test_members_group_on_input_width_and_rank_bound_only(device):
    """Own buffers and offset tables do not keep layers apart; a different rank bound does (the
    members' h columns are max_rank apart)."""
    layers, groups = qkv_layers(device, triton_ops.TritonLoraBackend())
    layers["k_proj"].lora_a = layers["k_proj"].lora_a.clone()  # k on a buffer of its own
    assert len(group_shared_inputs({layer.key: layer for layer in layers.values()})) == 1
    layers, groups = qkv_layers(device, triton_ops.TritonLoraBackend(), v_rank_bound=16)
    assert groups == [] and all(layer.group is None for layer in layers.values())


def test_group_without_a_split_apply_runs_each_layer(device):
    """The torch ops have no shrink/expand: grouped layers apply one by one, same result."""
    from loraplex_server.lora.ops import lora_apply

    layers, _ = qkv_layers(device, lora_apply)
    x = torch.randn(6, 64, device=device)
    with torch.no_grad():
        for layer in layers.values():
            torch.testing.assert_close(layer(x), reference_out(layer, x), atol=1e-4, rtol=1e-4)


def test_backend_shrink_takes_per_projection_offsets_or_a_table(device):
    """``shrink``'s A offsets as P per-slot lists (stacked by the backend) or as the [S, P] tensor
    give the same h, which is each projection's A block (at its own offset) times x."""
    _, x, a_list, bt_list, ranks, mapping = qkv_batch(576, 17, device)
    a_dev, _, a_off, _ = prepared(ranks, a_list, bt_list, torch.float32, device, "arena")
    backend = triton_ops.TritonLoraBackend()
    xd = x.to(device)
    h_lists = backend.shrink(xd, a_dev, ranks.to(device), [a_off[:, p].tolist() for p in range(3)], 16, mapping)
    h_table = backend.shrink(xd, a_dev, ranks.to(device), a_off, 16, mapping)
    for t, s in enumerate(mapping.token_slots.tolist()):
        for p in range(3):
            r = int(ranks[s, p]) if s >= 0 else 0
            for h in (h_lists, h_table):
                torch.testing.assert_close(h[t, p * 16:p * 16 + r].cpu(), a_list[p][s, :r] @ x[t], atol=1e-4,
                                           rtol=1e-4)
