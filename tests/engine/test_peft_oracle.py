"""The engine against PEFT, the reference LoRA implementation (fp32, CPU).

Rows of one batch use different adapters (and some none); each row must produce exactly the greedy
tokens PEFT's generate() gives for that row's adapter alone, and first-step logits within 1e-4.
"""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

from helpers import ADAPTER_SPECS, engine_config, load_fresh, run_to_completion, tokens_of
from loraplex_server.engine.engine import LLMEngine
from loraplex_server.engine.request import Prompt, SamplingParams
from loraplex_server.model.loader import LoadedModel
from loraplex_server.model.packed_linear import PackedLinear, packing_available

NEW_TOKENS = 32
LOGITS_ATOL = 1e-4
PROMPTS = [
    "The capital of France is",
    "Write a short poem about the ocean and the moon:",
    "1, 2, 3, 4,",
    "Here is a recipe for pancakes. First,",
    "def fibonacci(n):",
    "Once upon a time in a small village there lived",
]
ROW_ADAPTERS = ["all7-r8", None, "qv-r4", "mlp-r16", None, "ko-r32"]


@pytest.fixture(scope="module")
def peft_model(model_dir, peft_adapters):
    names = [spec[0] for spec in ADAPTER_SPECS]
    model = PeftModel.from_pretrained(load_fresh(model_dir), str(peft_adapters[names[0]]), adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(str(peft_adapters[name]), adapter_name=name)
    return model.eval()


def run_peft(peft_model, adapter, fn):
    if adapter is None:
        with peft_model.disable_adapter():
            return fn()
    peft_model.set_adapter(adapter)
    return fn()


@pytest.fixture(scope="module")
def reference(peft_model, tokenizer):
    """Per row: (greedy tokens of PEFT alone, last-position logits, the base model's logits)."""
    out = []
    for prompt, adapter in zip(PROMPTS, ROW_ADAPTERS):
        ids = torch.tensor([tokenizer.encode(prompt)])
        with torch.no_grad():
            gen = run_peft(peft_model, adapter, lambda: peft_model.generate(
                input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=NEW_TOKENS, do_sample=False))
            logits = run_peft(peft_model, adapter, lambda: peft_model(input_ids=ids).logits[0, -1])
            base = run_peft(peft_model, None, lambda: peft_model(input_ids=ids).logits[0, -1])
        out.append((gen[0, ids.shape[1]:].tolist(), logits, base))
    return out


def submit(engine, tokenizer, rows):
    ids = []
    for i in rows:
        req = engine.make_request(Prompt(text=PROMPTS[i]), SamplingParams(max_new_tokens=NEW_TOKENS),
                                  adapter_id=ROW_ADAPTERS[i], request_id=f"row{i}")
        engine.add_request(req)
        ids.append(req.request_id)
    return ids


def engine_with_adapters(make_engine, peft_adapters, **kwargs):
    engine = make_engine(**kwargs)
    for name, path in peft_adapters.items():
        engine.lora.add_adapter(name, path)
    return engine


def assert_rows_match(outputs, reference, rows):
    for i in rows:
        ours = tokens_of(outputs[f"row{i}"])
        assert ours == reference[i][0], f"row {i} ({ROW_ADAPTERS[i]}) diverged from PEFT"


# both CPU GEMM paths: F.linear (MKL, the one PEFT runs) and oneDNN's packed fp32 linears (the
# default), which sum in another order
CPU_GEMMS = [pytest.param("torch"), pytest.param("onednn", marks=pytest.mark.skipif(
    not packing_available(torch.float32), reason="oneDNN linear packing unavailable in this torch build"))]


def gemm_engine(make_engine, peft_adapters, cpu_gemm):
    engine = engine_with_adapters(make_engine, peft_adapters, cpu_gemm=cpu_gemm)
    packed = sum(isinstance(m, PackedLinear) for m in engine.loaded.model.modules())
    assert (packed > 0) == (cpu_gemm == "onednn")  # the path under test really runs
    return engine


@pytest.mark.parametrize("cpu_gemm", CPU_GEMMS)
def test_first_step_logits_match_peft(make_engine, peft_adapters, tokenizer, reference, cpu_gemm):
    engine = gemm_engine(make_engine, peft_adapters, cpu_gemm)
    submit(engine, tokenizer, range(len(PROMPTS)))
    batch = engine.scheduler.schedule()
    slots = engine.lora.activate(batch.adapter_keys, engine.scheduler.running_adapter_keys())
    packed = engine.runner.pack(batch, slots)
    logits = engine.runner.forward_logits(packed)
    assert len(batch.adapter_keys) == 4
    for row, req in enumerate(packed.sampling_requests):
        i = int(req.request_id[3:])
        diff = (logits[row] - reference[i][1]).abs().max().item()
        assert diff < LOGITS_ATOL, f"row {i} ({ROW_ADAPTERS[i]}): max |diff| {diff}"
        if ROW_ADAPTERS[i] is not None:  # the adapter really moves the logits, so the check has teeth
            assert (reference[i][1] - reference[i][2]).abs().max().item() > 100 * LOGITS_ATOL


@pytest.mark.parametrize("cpu_gemm", CPU_GEMMS)
def test_mixed_batch_greedy_equals_peft_alone(make_engine, peft_adapters, tokenizer, reference, cpu_gemm):
    engine = gemm_engine(make_engine, peft_adapters, cpu_gemm)
    submit(engine, tokenizer, range(len(PROMPTS)))
    outputs = run_to_completion(engine)
    assert_rows_match(outputs, reference, range(len(PROMPTS)))


def test_requests_joining_mid_stream(make_engine, peft_adapters, tokenizer, reference):
    """Continuous batching: later rows join while earlier ones decode; max_loras=2 forces slot swaps."""
    engine = engine_with_adapters(make_engine, peft_adapters, max_loras=2, max_tokens=24)
    outputs: dict[str, list] = {}
    submit(engine, tokenizer, [0, 1])
    for joiner in [2, 3, 4, 5]:
        for _ in range(5):
            for out in engine.step():
                outputs.setdefault(out.request_id, []).append(out)
        submit(engine, tokenizer, [joiner])
    for rid, deltas in run_to_completion(engine).items():
        outputs.setdefault(rid, []).extend(deltas)
    assert_rows_match(outputs, reference, range(len(PROMPTS)))
    assert engine.lora.slots.num_evictions > 0


def test_preemption_by_recompute_loses_nothing(make_engine, peft_adapters, tokenizer, reference):
    """A KV budget too small for all rows at once forces preemption; outputs stay exact."""
    engine = engine_with_adapters(make_engine, peft_adapters, num_blocks=20, block_size=4)
    submit(engine, tokenizer, range(len(PROMPTS)))
    outputs = run_to_completion(engine)
    assert_rows_match(outputs, reference, range(len(PROMPTS)))
    assert engine.scheduler.num_preemptions > 0
    assert engine.blocks.num_free_blocks == engine.blocks.num_blocks


# bf16 weights and activations over 30 layers: measured max |diff| 0.26-0.66 over the six rows
# (logits of magnitude ~20), deterministic on one machine
BF16_LOGITS_ATOL = 1.0


def test_bf16_engine_stays_within_tolerance_of_fp32_peft(model_dir, tokenizer, peft_adapters, reference):
    """bf16 on CPU (fp32 LoRA slot buffers, native decode attention): first-step logits within
    BF16_LOGITS_ATOL of fp32 PEFT, each adapted row nearer its adapter's logits than the base's,
    and the same first greedy token."""
    loaded = LoadedModel(load_fresh(model_dir).to(torch.bfloat16), tokenizer, "bf16", torch.device("cpu"),
                         torch.bfloat16)
    engine = LLMEngine(engine_config(), loaded=loaded)
    for name, path in peft_adapters.items():
        engine.lora.add_adapter(name, path)
    submit(engine, tokenizer, range(len(PROMPTS)))
    batch = engine.scheduler.schedule()
    packed = engine.runner.pack(batch, engine.lora.activate(batch.adapter_keys, engine.scheduler.running_adapter_keys()))
    logits = engine.runner.forward_logits(packed).float()
    for row, req in enumerate(packed.sampling_requests):
        i = int(req.request_id[3:])
        ours, theirs, base = logits[row], reference[i][1], reference[i][2]
        assert (ours - theirs).abs().max().item() < BF16_LOGITS_ATOL, f"row {i}"
        assert ours.argmax() == theirs.argmax(), f"row {i}: first greedy token differs"
        if ROW_ADAPTERS[i] is not None:
            assert (ours - theirs).norm() < (ours - base).norm(), f"row {i}: the adapter was not applied"
