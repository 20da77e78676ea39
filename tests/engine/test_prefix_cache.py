"""Prefix caching through the engine (2-layer SmolLM2 shape, seeded dummy weights, fp32): with
caching on, base and adapter rows in one mixed batch generate what they generate with it off, and
their first-step logits agree within 1e-5, for prompts sharing 0, 1, many and all full blocks with
earlier requests, under chunked prefill, preemption, the torch and native attention paths and the
captured decode step; a hot-swapped adapter never reads its old version's blocks."""

import json
import sys
from types import SimpleNamespace

import pytest
import torch

from helpers import BENCHMARKS, assert_same_generation, run_to_completion, write_tiny_config
from loraplex_server.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig, SchedulerConfig
from loraplex_server.engine.engine import LLMEngine
from loraplex_server.engine.request import Prompt, SamplingParams

BS = 8
P = list(range(1000, 1024))  # a shared "system prompt": 3 full blocks
Q = list(range(5000, 5016))  # 2 full blocks only adapter a1 sees in the first wave
WAVE1 = [("w-base", None, P + [5, 6, 7]), ("w-a0", "a0", P + [8, 9]), ("w-a1", "a1", P + list(range(2000, 2010))),
         ("w-q", "a1", Q + [4])]
WAVE2 = [  # (id, adapter, prompt, cached tokens expected with a roomy cache)
    ("all", None, P + [5, 6, 7], 24),  # every full block of the prompt is cached
    ("all-but-last", None, P + [5], 24),  # the whole prompt but its last token: computes 1 token
    ("many", "a0", P + [3, 3, 3, 3, 3], 24),
    ("one", "a1", P[:8] + list(range(3000, 3020)), 8),
    ("zero", None, list(range(4000, 4030)), 0),
    ("other-adapter", "a0", Q + [1, 2], 0),  # a1 computed these blocks: a0 must not use them
    ("base-vs-adapter", None, Q + [1], 0),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("prefix")
    config = write_tiny_config(root / "config.json")
    sys.path.insert(0, str(BENCHMARKS))
    from synthetic_adapters import write_adapter

    shape = SimpleNamespace(**json.loads(config.read_text()))
    out = {"config": config}
    for i, rank in enumerate([8, 16, 8]):
        out[f"a{i}"] = write_adapter(root / f"a{i}", shape, rank, seed=i, b_scale=0.05)
    return out


def build(files, caching, num_blocks=64, budget=24, memory_pool="auto", **model) -> LLMEngine:
    cfg = EngineConfig(
        model=ModelConfig(model=str(files["config"]), load_format="dummy", device="cpu", dtype="float32",
                          threads=1, max_model_len=256, **model),
        cache=CacheConfig(block_size=BS, num_blocks=num_blocks, prefix_caching=caching, memory_pool=memory_pool),
        scheduler=SchedulerConfig(max_num_batched_tokens=budget),
        lora=LoraConfig(max_loras=3, max_lora_rank=16))
    engine = LLMEngine(cfg)
    for name in ("a0", "a1"):
        engine.lora.add_adapter(name, files[name])
    engine.runner.sampler = LogitsTap(engine.runner.sampler)
    return engine


class LogitsTap:
    """Wraps the runner's sampler: keeps each request's logits of the step it first samples in."""

    def __init__(self, sampler):
        self.sampler, self.first = sampler, {}

    def __call__(self, logits, rows):
        for row, request in zip(logits, rows):
            self.first.setdefault(request.request_id, row.detach().clone())
        return self.sampler(logits, rows)

    def __getattr__(self, name):
        return getattr(self.sampler, name)


def submit(engine, requests, max_new_tokens=3):
    for rid, adapter, prompt, *_ in requests:
        sampling = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, logprobs=3)
        engine.add_request(engine.make_request(Prompt(token_ids=tuple(prompt)), sampling, adapter, rid))


def waves(engine, new_tokens: int) -> dict[str, list]:
    submit(engine, WAVE1, new_tokens)
    outputs = run_to_completion(engine)
    submit(engine, WAVE2, new_tokens)
    return {**outputs, **run_to_completion(engine)}


def assert_same_first_logits(on: LLMEngine, off: LLMEngine):
    assert on.runner.sampler.first.keys() == off.runner.sampler.first.keys()
    for rid, logits in off.runner.sampler.first.items():
        torch.testing.assert_close(on.runner.sampler.first[rid], logits, atol=1e-5, rtol=0, msg=rid)


def assert_no_block_held(engine):
    """No request holds a KV block: all are free (the unified pool, which ``auto`` builds here:
    every page KV holds is a cached block no request references)."""
    blocks, shared = engine.blocks, engine.lora.shared
    assert not any(blocks._refs)
    if shared is None:
        assert blocks.num_free_blocks == blocks.num_blocks
    else:
        assert shared.pool.kv_pages == len(blocks.cached_free_blocks())


@pytest.mark.parametrize("case", [
    dict(),  # native CPU decode attention where it builds
    dict(cpu_kernels="off", budget=7),  # torch path; chunks of 7 cross every block boundary
    dict(cuda_graphs="on"),  # the captured decode step (run eagerly on the CPU)
    # preemption: decodes outgrow 14 KV blocks (of their own: auto would add the adapters' share)
    dict(num_blocks=14, new_tokens=8, memory_pool="separate"),
], ids=["native", "torch-chunked", "decode-graphs", "preemption"])
def test_outputs_and_first_logits_equal_with_caching_off(files, case):
    case = dict(case)
    new_tokens = case.pop("new_tokens", 3)
    off, on = build(files, False, **case), build(files, True, **case)
    expected = waves(off, new_tokens)
    submit(on, WAVE1, new_tokens)
    got = run_to_completion(on)
    before = on.blocks.hit_tokens
    submit(on, WAVE2, new_tokens)
    got.update(run_to_completion(on))
    assert_same_generation(got, expected, atol=1e-5)
    assert_same_first_logits(on, off)
    assert_no_block_held(on)
    if "num_blocks" in case:
        assert on.scheduler.num_preemptions > 0 and on.blocks.hit_tokens > 0
    else:
        assert on.blocks.hit_tokens - before == sum(r[3] for r in WAVE2)
        assert on.blocks.query_tokens == sum(len(r[2]) for r in WAVE1 + WAVE2)


def hot_swap_run(files, caching) -> tuple[LLMEngine, dict]:
    """a0@1 serves a request; while it still holds its blocks, a0 is replaced by other weights and
    the same prompt is sent to a0 again (a0@2)."""
    engine = build(files, caching)
    prompt = P + [7, 7]
    submit(engine, [("old", "a0", prompt)], max_new_tokens=8)
    outputs: dict[str, list] = {}
    for _ in range(3):  # its prompt is computed and published, it keeps decoding
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    old_key = engine.lora.resolve("a0").key
    engine.lora.add_adapter("a0", files["a2"])
    engine.adapter_replaced(old_key)
    submit(engine, [("new", "a0", prompt)])
    for rid, deltas in run_to_completion(engine).items():
        outputs.setdefault(rid, []).extend(deltas)
    return engine, outputs


def test_hot_swap_computes_fresh_kv_and_drops_the_old_versions_blocks(files):
    off, expected = hot_swap_run(files, False)
    on, got = hot_swap_run(files, True)
    assert on.blocks.hit_tokens == 0  # a0@2 found nothing although a0@1's blocks were still held
    assert_same_generation(got, expected, atol=1e-5)
    assert_same_first_logits(on, off)
    # the check is sensitive: the two versions' logits for the same prompt are far apart
    assert (on.runner.sampler.first["old"] - on.runner.sampler.first["new"]).abs().max() > 1e-2
    assert {key for key, blocks in on.blocks._by_seed.items() if blocks} == {on.lora.resolve("a0").key}
    submit(on, [("again", "a0", P + [7, 7])])
    run_to_completion(on)
    assert on.blocks.hit_tokens == 24  # the new version's own blocks are reused
    assert_no_block_held(on)
