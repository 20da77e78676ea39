"""Merged q/k/v and gate/up projections (model/merged_linear.py) against the members called alone,
LoRA deltas included, on the torch apply and the native SGMV."""

import pytest
import torch
from torch import nn

from loraplex_server.lora.layers import LoraLinear, LoraStepState
from loraplex_server.lora.mapping import LoraMapping
from loraplex_server.lora.ops import NativeLoraApply
from loraplex_server.lora.weights import LoraModuleWeights, ModuleKey
from loraplex_server.model import native
from loraplex_server.model.merged_linear import ColumnSlice, merge_projections
from loraplex_server.model.packed_linear import pack_linears, packing_available

NAMES = ("q_proj", "k_proj", "v_proj")
RUNS = [(0, 3), (-1, 2), (1, 4), (0, 1)]  # (slot, tokens): adapted, base, another adapter, again


@pytest.fixture(scope="module")
def kernels(tmp_path_factory):
    built = native.load_native_kernels(tmp_path_factory.mktemp("kernels"), threads=2)
    assert built is not None
    return built


def _block(state: LoraStepState, dtype: torch.dtype) -> nn.Module:
    """q and v carry LoRA (slots 0 and 1 of ranks 4 and 2), k is a plain linear."""
    torch.manual_seed(0)
    block = nn.Module()
    for name, out in zip(NAMES, (96, 32, 32)):
        linear = nn.Linear(64, out, bias=False).to(dtype)
        nn.init.normal_(linear.weight, std=0.1)
        if name == "k_proj":
            setattr(block, name, linear)
            continue
        layer = LoraLinear(linear, ModuleKey(0, name), max_loras=2, max_rank=4, state=state)
        for slot, rank in ((0, 4), (1, 2)):  # slot 0 at rows 0..3, slot 1 at rows 4..5 of the pool
            layer.set_slot(slot, 4 * slot, LoraModuleWeights.from_peft(torch.randn(rank, 64) * 0.2,
                                                             torch.randn(out, rank) * 0.2, 0.5))
        setattr(block, name, layer)
    return block


@pytest.mark.parametrize("native_apply", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_matmul_and_column_deltas_equal_each_member_alone(dtype, native_apply, kernels):
    state = LoraStepState(NativeLoraApply(kernels)) if native_apply else LoraStepState()
    block = _block(state, dtype)
    x = torch.randn(1, sum(n for _, n in RUNS), 64).to(dtype)
    state.mapping = LoraMapping.from_runs(RUNS)
    with torch.inference_mode():
        want = [getattr(block, name)(x) for name in NAMES]
        members = merge_projections(block, NAMES, "merged_qkv")
        assert [(m.lo, m.hi) for m in members] == [(0, 96), (96, 128), (128, 160)]
        assert isinstance(block.k_proj, ColumnSlice) and isinstance(block.q_proj.base, ColumnSlice)
        if dtype == torch.bfloat16:  # only the merged linear: the members keep no weights (0 without bf16 oneDNN)
            assert pack_linears(block).packed.get("bfloat16", 0) == (1 if packing_available() else 0)
        y = block.merged_qkv(x).view(x.shape[1], -1)
        for member in members:
            member.add_delta(y, x)
        fallback = [getattr(block, name)(x) for name in NAMES]  # a member called directly
    for m, expected, direct in zip(members, want, fallback):
        torch.testing.assert_close(y[:, m.lo:m.hi], expected[0], rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 0)
        torch.testing.assert_close(direct, expected, rtol=0, atol=1e-2 if dtype == torch.bfloat16 else 0)


def test_members_that_cannot_share_a_matmul_are_left_alone():
    block = nn.Module()
    block.q_proj, block.k_proj, block.v_proj = nn.Linear(64, 96), nn.Linear(48, 32), nn.Linear(64, 32)
    assert merge_projections(block, NAMES, "merged_qkv") is None  # input sizes differ
    block.k_proj = nn.Linear(64, 32, bias=False)
    assert merge_projections(block, NAMES, "merged_qkv") is None  # bias on some members only
    del block.v_proj
    assert merge_projections(block, NAMES, "merged_qkv") is None  # a member missing
    assert not hasattr(block, "merged_qkv") and type(block.q_proj) is nn.Linear
