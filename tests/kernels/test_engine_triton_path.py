"""End to end through the engine's own wiring: the LoRA apply (``LoraStepState.apply``) and the
attention function the engine registers come from the per-device selection. Made to pick the
Triton kernels, an engine generates exactly what one on the torch functions generates (2-layer
dummy SmolLM2 shape, seeded weights, mixed adapters and base rows, chunked prefill, decodes)."""

import json
import sys

import pytest
import torch
from transformers import AttentionInterface

from helpers import BENCHMARKS
from loraplex_server.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig, SchedulerConfig
from loraplex_server.engine import engine as engine_module
from loraplex_server.engine.engine import LLMEngine
from loraplex_server.engine.request import Prompt, SamplingParams
from loraplex_server.lora import manager as manager_module
from loraplex_server.lora import ops, triton_ops
from loraplex_server.model import attention, triton_attention
from loraplex_server.model.presets import PRESETS

sys.path.insert(0, str(BENCHMARKS))
from synthetic_adapters import write_adapter  # noqa: E402

REQUESTS = [("a0", 13), (None, 5), ("a1", 20), ("a0", 3)]  # (adapter, prompt tokens)


@pytest.fixture
def make_engine(tmp_path, device):
    """Builds engines of one config (same seeded dummy weights) with the same two adapters."""
    config = dict(PRESETS["smollm2-135m"], num_hidden_layers=2, architectures=["LlamaForCausalLM"])
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg = EngineConfig(model=ModelConfig(model=str(tmp_path / "config.json"), load_format="dummy",
                                         device=device.type, dtype="float32", threads=1),
                       cache=CacheConfig(block_size=8, num_blocks=64),
                       scheduler=SchedulerConfig(max_num_batched_tokens=24),  # forces prefill chunks
                       lora=LoraConfig(max_loras=3, max_lora_rank=16))

    def make() -> LLMEngine:
        engine = LLMEngine(cfg)
        for i, rank in enumerate([8, 16]):
            path = tmp_path / f"a{i}"
            if not path.exists():
                write_adapter(path, engine.loaded.model.config, rank, seed=i, b_scale=0.05)
            engine.lora.add_adapter(f"a{i}", path)
        return engine
    return make


def attention_of(engine):
    """The attention function the engine's model dispatches to."""
    return AttentionInterface()[engine.loaded.model.config._attn_implementation]


def force_selection(monkeypatch, lora_apply, attend) -> list[torch.device]:
    """Make the engine's selection return these functions; returns the devices it was asked for."""
    asked: list[torch.device] = []

    def apply_function(device):
        asked.append(torch.device(device))
        return lora_apply

    def select_attention_function(device):
        asked.append(torch.device(device))
        return attend

    monkeypatch.setattr(manager_module, "apply_function", apply_function)
    monkeypatch.setattr(engine_module, "select_attention_function", select_attention_function)
    return asked


def generate(engine) -> dict[str, list]:
    for j, (adapter, n) in enumerate(REQUESTS):
        sampling = SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=3)
        engine.add_request(engine.make_request(Prompt(token_ids=tuple(range(10 + j, 10 + j + n))), sampling,
                                               adapter, f"r{j}"))
    outs: dict[str, list] = {}
    while engine.has_work:
        for out in engine.step():
            outs.setdefault(out.request_id, []).append(out)
    return outs


def test_engine_installs_what_the_selection_gives_for_its_device(make_engine, device):
    """Unforced: the torch functions on CPU (the fallback), the Triton kernels on CUDA."""
    engine = make_engine()
    if device.type == "cuda":
        assert isinstance(engine.lora.state.apply, triton_ops.TritonLoraBackend)
        assert attention_of(engine) is triton_attention.triton_paged_attention
    else:
        assert engine.lora.state.apply is ops.lora_apply
        assert attention_of(engine) is attention.paged_attention


def test_triton_path_generates_what_the_torch_path_generates(make_engine, device, monkeypatch):
    force_selection(monkeypatch, ops.lora_apply, attention.paged_attention)
    expected = generate(make_engine())

    calls = {"lora": 0, "attention": 0}
    backend = triton_ops.TritonLoraBackend()

    def counted_apply(*args):
        calls["lora"] += 1
        backend(*args)

    def counted_attend(*args, **kwargs):
        calls["attention"] += 1
        return triton_attention.triton_paged_attention(*args, **kwargs)

    asked = force_selection(monkeypatch, counted_apply, counted_attend)
    engine = make_engine()
    assert [d.type for d in asked] == [device.type] * 2  # attention, then LoRA: each asked with the engine's device
    assert engine.lora.state.apply is counted_apply and attention_of(engine) is counted_attend
    got = generate(engine)
    assert calls["lora"] > 0 and calls["attention"] > 0
    assert expected.keys() == got.keys()
    for rid in expected:
        assert [o.token_ids for o in got[rid]] == [o.token_ids for o in expected[rid]]
        for mine, ref in zip(got[rid], expected[rid]):
            for a, b in zip(mine.logprobs, ref.logprobs):
                assert a.logprob == pytest.approx(b.logprob, abs=1e-4)
