"""Packed linears (model/packed_linear.py) against nn.Linear, and what ``cpu_gemm`` packs."""

import logging

import pytest
import torch
from torch import nn

from loraplex_server.lora.layers import LoraLinear, LoraStepState
from loraplex_server.lora.weights import ModuleKey
from loraplex_server.model import packed_linear
from loraplex_server.model.packed_linear import PackedLinear, pack_linears, packing_available

needs_bf16 = pytest.mark.skipif(not packing_available(torch.bfloat16),
                                reason="oneDNN bf16 packing unavailable (torch build or CPU)")
needs_fp32 = pytest.mark.skipif(not packing_available(torch.float32),
                                reason="oneDNN linear packing unavailable (torch build)")
# oneDNN and MKL sum a dot product of 64-256 terms in different orders: measured max relative
# difference ~4e-7 here; 1e-5 is loose enough for any blocking and tight enough to catch a wrong layout
FP32_RTOL = 1e-5


@needs_bf16
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(5, 64), (1, 7, 64), (1, 1, 64)])
def test_packed_bf16_equals_linear_bit_for_bit(bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(64, 96, bias=bias).to(torch.bfloat16)
    x = torch.randn(*shape).to(torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(PackedLinear(linear)(x), linear(x))


@needs_fp32
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("shape", [(5, 256), (1, 7, 256), (1, 1, 256), (64, 256)])
def test_packed_fp32_matches_linear(bias, shape):
    torch.manual_seed(0)
    linear = nn.Linear(256, 200, bias=bias)
    x = torch.randn(*shape)
    with torch.inference_mode():
        got, want = PackedLinear(linear)(x), linear(x)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=FP32_RTOL, atol=FP32_RTOL * want.abs().max().item())


def lora_stack(dtype: torch.dtype) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 32), nn.Linear(32, 16), nn.Linear(16, 8)).to(dtype)
    model[1] = LoraLinear(model[1], ModuleKey(0, "q_proj"), 2, 4, LoraStepState())
    return model


@needs_bf16
def test_bf16_linears_are_packed_bit_for_bit_lora_bases_included():
    model = lora_stack(torch.bfloat16)
    x = torch.randn(3, 32).to(torch.bfloat16)
    with torch.inference_mode():
        before = model(x)
        report = pack_linears(model, "onednn")
        assert torch.equal(model(x), before)
    assert report.packed == {"bfloat16": 3} and report.kept == {}
    assert isinstance(model[0], PackedLinear) and isinstance(model[1].base, PackedLinear)


@needs_fp32
@pytest.mark.parametrize("cpu_gemm, packed", [("torch", 0), ("onednn", 3)])
def test_cpu_gemm_torch_packs_nothing_and_onednn_everything(cpu_gemm, packed):
    model = lora_stack(torch.float32)
    model.append(nn.Linear(8, 8).to(torch.float16))  # no oneDNN linear for fp16 here: never touched
    x = torch.randn(3, 32)
    with torch.inference_mode():
        before = model[:3](x)
        report = pack_linears(model, cpu_gemm)
        torch.testing.assert_close(model[:3](x), before, rtol=FP32_RTOL, atol=FP32_RTOL)
    assert report.packed.get("float32", 0) == packed and report.kept.get("float32", 0) == 3 - packed
    assert isinstance(model[1].base, PackedLinear) == bool(packed)
    assert type(model[3]) is nn.Linear and "float16" not in str(report)


def test_bf16_stays_on_f_linear_with_a_warning_where_onednn_cannot_pack_it(monkeypatch, caplog):
    monkeypatch.setattr(packed_linear, "packing_available", lambda dtype=torch.bfloat16: dtype == torch.float32)
    model = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8).to(torch.bfloat16))
    with caplog.at_level(logging.WARNING, logger=packed_linear.__name__):
        report = pack_linears(model, "onednn")
    assert report.packed == {"float32": 1} and report.kept == {"bfloat16": 1}
    assert type(model[1]) is nn.Linear
    assert "bfloat16 linear packing unavailable" in caplog.text


def test_an_unknown_cpu_gemm_is_refused():
    with pytest.raises(ValueError, match="cpu_gemm"):
        pack_linears(nn.Sequential(nn.Linear(4, 4)), "mkl")
