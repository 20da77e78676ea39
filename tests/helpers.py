"""Helpers shared by the test suites (fixtures live in conftest.py)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from loraplex_server.api.auth import hash_key
from loraplex_server.config import CacheConfig, EngineConfig, LoraConfig, ModelConfig, SchedulerConfig
from loraplex_server.engine.engine import LLMEngine
from loraplex_server.model.loader import LoadedModel

ASSETS = Path(__file__).parent / "assets"
BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"

# (name, rank, alpha, target modules, rslora): different ranks and target sets on purpose.
ADAPTER_SPECS = [
    ("all7-r8", 8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    ("qv-r4", 4, 8, ["q_proj", "v_proj"], False),
    ("mlp-r16", 16, 8, ["gate_proj", "up_proj", "down_proj"], True),
    ("ko-r32", 32, 32, ["k_proj", "o_proj"], False),
]


def load_fresh(model_dir: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval().requires_grad_(False)


def fresh_loaded(model_dir: Path, tokenizer, name: str = "SmolLM2-135M-Instruct") -> LoadedModel:
    """A fresh fp32 CPU copy of the embedded model, as the engine takes it (``loaded=``)."""
    return LoadedModel(load_fresh(model_dir), tokenizer, name, torch.device("cpu"), torch.float32)


class FakeClock:
    """A clock for ``clock=`` parameters: reads ``t``, which moves only when a test moves it."""

    def __init__(self, t: float = 100.0):
        self.t = t

    def __call__(self) -> float:
        return self.t


def key_entry(key: str, tenant: str, role: str = "tenant") -> str:
    """One ``[[keys]]`` entry of an API keys file (the key stored as its sha256)."""
    return f'[[keys]]\nsha256 = "{hash_key(key)}"\ntenant = "{tenant}"\nrole = "{role}"\n\n'


def make_peft_adapter(base: torch.nn.Module, out: Path, rank: int, alpha: int, targets: list[str],
                      rslora: bool = False, seed: int = 0, **extra) -> Path:
    """Save a PEFT LoRA adapter with random A and non-zero random B."""
    from peft import LoraConfig as PeftLoraConfig, get_peft_model

    torch.manual_seed(seed)
    config = PeftLoraConfig(r=rank, lora_alpha=alpha, target_modules=targets, use_rslora=rslora,
                            init_lora_weights=False, **extra)
    peft_model = get_peft_model(base, config)
    with torch.no_grad():  # keep deltas moderate so greedy text stays meaningful
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.mul_(0.3)
    peft_model.save_pretrained(str(out), safe_serialization=True)
    peft_model.unload()
    return out


def engine_config(num_blocks=256, block_size=16, max_loras=4, max_rank=32, max_tokens=512, max_seqs=64,
                  max_cpu_loras=16, max_queued=1024, max_adapter_bytes=2 * 1024 ** 3,
                  cpu_kernels="auto", max_failed_steps=3, pool_rows=None, cpu_gemm="onednn",
                  memory_pool="separate") -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(cpu_kernels=cpu_kernels, cpu_gemm=cpu_gemm),
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks, memory_pool=memory_pool),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_tokens, max_num_seqs=max_seqs,
                                  max_queued_requests=max_queued, max_failed_steps=max_failed_steps),
        lora=LoraConfig(max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=max_rank,
                        max_adapter_bytes=max_adapter_bytes, lora_pool_rows=pool_rows),
    )


def pack(blocks: dict, gen: torch.Generator) -> tuple[torch.Tensor, dict]:
    """Blocks ([r, cols] each, keyed) flattened into one 1-D buffer back to back in a shuffled
    order, each after a gap of 1-7 elements (so offsets are unaligned); NaN in every gap. Returns
    the buffer and each key's element offset (an empty block gets a gap's offset: never read)."""
    keys = list(blocks)
    order = torch.randperm(len(keys), generator=gen).tolist()
    parts, offsets, top = [], {}, 0
    for i in order:
        gap = 1 + int(torch.randint(0, 7, (), generator=gen))
        block = blocks[keys[i]].reshape(-1)
        parts += [torch.full((gap,), float("nan")), block]
        offsets[keys[i]] = top + gap if block.numel() else top
        top += gap + block.numel()
    parts.append(torch.full((3,), float("nan")))
    return torch.cat(parts), offsets


def run_to_completion(engine: LLMEngine, timeout_s: float = 300.0) -> dict[str, list]:
    """Step until idle; returns request id -> list of deltas."""
    outputs: dict[str, list] = {}
    deadline = time.monotonic() + timeout_s
    while engine.has_work:
        if time.monotonic() > deadline:
            raise AssertionError("engine did not finish")
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
        if not engine.last_batch[0]:
            time.sleep(0.001)  # waiting on background adapter loads
    return outputs


def tokens_of(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


# Mixed adapters and base rows, prompts long enough for chunked prefill under a 24-token budget.
MIXED_REQUESTS = [("a0", 13), (None, 5), ("a1", 20), ("a0", 3)]  # (adapter, prompt tokens)


def write_tiny_config(path: Path) -> Path:
    """A 2-layer SmolLM2-shaped config.json for dummy-weight engines (fast, real layer shapes)."""
    import json

    from loraplex_server.model.presets import PRESETS

    config = dict(PRESETS["smollm2-135m"], num_hidden_layers=2, architectures=["LlamaForCausalLM"])
    path.write_text(json.dumps(config))
    return path


def dummy_engine_factory(tmp_path: Path, device: torch.device, *, max_batch_tokens: int = 24, **model):
    """Builds engines of one config (2-layer SmolLM2 shape, seeded dummy weights) with adapters
    a0 (rank 8) and a1 (rank 16); ``model`` overrides ModelConfig fields (e.g. cuda_graphs);
    ``memory_pool="unified"`` pages the adapters in a KV cache of 160 blocks."""
    import sys

    from loraplex_server.config import ModelConfig

    sys.path.insert(0, str(BENCHMARKS))
    from synthetic_adapters import write_adapter

    model_cfg = dict(model=str(write_tiny_config(tmp_path / "config.json")), load_format="dummy", device=device.type,
                     dtype="float32", threads=1, **model)

    def make(memory_pool: str = "separate", **overrides) -> LLMEngine:
        cache = CacheConfig(block_size=8, num_blocks=64 if memory_pool == "separate" else 160, memory_pool=memory_pool)
        cfg = EngineConfig(model=ModelConfig(**{**model_cfg, **overrides}), cache=cache,
                           scheduler=SchedulerConfig(max_num_batched_tokens=max_batch_tokens),
                           lora=LoraConfig(max_loras=3, max_lora_rank=16))
        engine = LLMEngine(cfg)
        for i, rank in enumerate([8, 16]):
            path = tmp_path / f"a{i}"
            if not path.exists():
                write_adapter(path, engine.loaded.model.config, rank, seed=i, b_scale=0.05)
            engine.lora.add_adapter(f"a{i}", path)
        return engine
    return make


def generate_mixed(engine: LLMEngine, requests=MIXED_REQUESTS, max_new_tokens: int = 6) -> dict[str, list]:
    """Run ``requests`` (adapter, prompt length) to completion: request id -> output deltas."""
    from loraplex_server.engine.request import Prompt, SamplingParams

    for j, (adapter, n) in enumerate(requests):
        sampling = SamplingParams(max_new_tokens=max_new_tokens, ignore_eos=True, logprobs=3)
        engine.add_request(engine.make_request(Prompt(token_ids=tuple(range(10 + j, 10 + j + n))), sampling,
                                               adapter, f"r{j}"))
    return run_to_completion(engine)


def assert_same_generation(got: dict[str, list], expected: dict[str, list], atol: float = 1e-4) -> None:
    """Same tokens, and logprobs of the top candidates within ``atol``."""
    import pytest

    assert expected.keys() == got.keys()
    for rid in expected:
        assert [o.token_ids for o in got[rid]] == [o.token_ids for o in expected[rid]]
        for mine, ref in zip(got[rid], expected[rid]):
            for a, b in zip(mine.logprobs, ref.logprobs):
                assert a.logprob == pytest.approx(b.logprob, abs=atol)
