"""Helpers shared by the test suites (fixtures live in conftest.py)."""

from __future__ import annotations

import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from loraplex_server.api.auth import hash_key
from loraplex_server.config import CacheConfig, EngineConfig, LoraConfig, SchedulerConfig
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
                  max_cpu_loras=16, max_queued=1024, max_adapter_bytes=2 * 1024 ** 3) -> EngineConfig:
    return EngineConfig(
        cache=CacheConfig(block_size=block_size, num_blocks=num_blocks),
        scheduler=SchedulerConfig(max_num_batched_tokens=max_tokens, max_num_seqs=max_seqs,
                                  max_queued_requests=max_queued),
        lora=LoraConfig(max_loras=max_loras, max_cpu_loras=max_cpu_loras, max_lora_rank=max_rank,
                        max_adapter_bytes=max_adapter_bytes),
    )


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
