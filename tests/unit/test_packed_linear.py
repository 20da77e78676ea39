"""Packed bf16 linears (model/packed_linear.py) against nn.Linear, and what gets packed."""

import pytest
import torch
from torch import nn

from loraplex_server.lora.layers import LoraLinear, LoraStepState
from loraplex_server.lora.weights import ModuleKey
from loraplex_server.model.packed_linear import PackedLinear, pack_linears, packing_available

pytestmark = pytest.mark.skipif(not packing_available(), reason="oneDNN bf16 packing unavailable (torch build or CPU)")


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(5, 64), (1, 7, 64), (1, 1, 64)])
def test_packed_equals_linear_bit_for_bit(bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=bias).to(torch.bfloat16)
    x = torch.randn(*shape).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(PackedLinear(linear)(x), linear(x))


def test_only_bf16_cpu_linears_are_packed_lora_bases_included():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(16, 8)).to(torch.bfloat16)
    model[1] = LoraLinear(model[1], ModuleKey(0, "q_proj"), 2, 4, LoraStepState())
    model.append(nn.Linear(8, 8))  # fp32: untouched
    x = torch.randn(3, 32).to(torch.bfloat16)
    with torch.inference_mode():
        before = model[:3](x)
        assert pack_linears(model) == 3
        assert torch.equal(model[:3](x), before)
    assert isinstance(model[0], PackedLinear) and isinstance(model[1].base, PackedLinear)
    assert type(model[3]) is nn.Linear
