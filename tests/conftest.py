"""Shared fixtures: the embedded default model (fresh copies), PEFT-made adapters, engines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex_server.config import CacheConfig, EngineConfig, LoraConfig, SchedulerConfig, default_cache_dir
from loraplex_server.engine.engine import LLMEngine
from loraplex_server.model.loader import LoadedModel, embedded_model_dir

ASSETS = Path(__file__).parent / "assets"

# (name, rank, alpha, target modules, rslora): different ranks and target sets on purpose.
ADAPTER_SPECS = [
    ("all7-r8", 8, 16, ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"], False),
    ("qv-r4", 4, 8, ["q_proj", "v_proj"], False),
    ("mlp-r16", 16, 8, ["gate_proj", "up_proj", "down_proj"], True),
    ("ko-r32", 32, 32, ["k_proj", "o_proj"], False),
]


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # 2 cores: oversubscription makes everything ~20x slower


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return embedded_model_dir(default_cache_dir())


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(str(model_dir))


def load_fresh(model_dir: Path) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    return model.eval().requires_grad_(False)


@pytest.fixture
def fresh_model(model_dir):
    return lambda: load_fresh(model_dir)


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


@pytest.fixture(scope="session")
def peft_adapters(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    paths = {}
    for i, (name, rank, alpha, targets, rslora) in enumerate(ADAPTER_SPECS):
        paths[name] = make_peft_adapter(load_fresh(model_dir), root / name, rank, alpha, targets, rslora, seed=i)
    return paths


def engine_config(num_blocks=256, block_size=16, max_loras=4, max_rank=32, max_tokens=512, max_seqs=64,
                  max_cpu_loras=16, max_queued=1024) -> EngineConfig:
    return EngineConfig(
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_tokens, max_num_seqs=max_seqs,
                                  max_queued_requests=max_queued),
        lora=LoraConfig(max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=max_rank),
    )


@pytest.fixture
def make_engine(model_dir, tokenizer):
    def build(**kwargs) -> LLMEngine:
        loaded = LoadedModel(load_fresh(model_dir), tokenizer, "test", torch.device("cpu"), torch.float32)
        return LLMEngine(engine_config(**kwargs), loaded=loaded)
    return build


def run_to_completion(engine: LLMEngine, max_steps: int = 10_000) -> dict[str, list]:
    """Step until idle; returns request id -> list of deltas."""
    outputs: dict[str, list] = {}
    for _ in range(max_steps):
        if not engine.has_work:
            return outputs
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    raise AssertionError("engine did not finish")


def tokens_of(deltas) -> list[int]:
    return [t for d in deltas for t in d.token_ids]
