"""Shared fixtures: the embedded default model (fresh copies), PEFT-made adapters, engines."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from helpers import ADAPTER_SPECS, engine_config, fresh_loaded, load_fresh, make_peft_adapter
from loraplex_server.config import default_cache_dir
from loraplex_server.engine.engine import LLMEngine
from loraplex_server.model.loader import embedded_model_dir


@pytest.fixture(scope="session", autouse=True)
def _one_thread():
    torch.set_num_threads(1)  # 2 cores: oversubscription makes everything ~20x slower


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return embedded_model_dir(default_cache_dir())


@pytest.fixture(scope="session")
def tokenizer(model_dir):
    return AutoTokenizer.from_pretrained(str(model_dir))


@pytest.fixture
def fresh_model(model_dir):
    return lambda: load_fresh(model_dir)


@pytest.fixture(scope="session")
def peft_adapters(model_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("adapters")
    paths = {}
    for i, (name, rank, alpha, targets, rslora) in enumerate(ADAPTER_SPECS):
        paths[name] = make_peft_adapter(load_fresh(model_dir), root / name, rank, alpha, targets, rslora, seed=i)
    return paths


@pytest.fixture
def make_engine(model_dir, tokenizer):
    def build(adapter_load_fn=None, **kwargs) -> LLMEngine:
        return LLMEngine(engine_config(**kwargs), loaded=fresh_loaded(model_dir, tokenizer, "test"),
                         adapter_load_fn=adapter_load_fn)
    return build
