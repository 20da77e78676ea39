"""Shared fixtures: the embedded default model (fresh copies), PEFT-made adapters, engines."""

from __future__ import annotations

import ctypes
import gc
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from helpers import ADAPTER_SPECS, engine_config, fresh_loaded, load_fresh, make_peft_adapter
from loraplex_server.config import default_cache_dir
from loraplex_server.engine.engine import LLMEngine
from loraplex_server.model.loader import embedded_model_dir

# A test slower than this may have built engines; a collection after it costs little beside it.
COLLECT_AFTER_S = 1.0
# glibc's malloc_trim, where the process has it (getattr below answers None elsewhere)
_LIBC = ctypes.CDLL(None)


def _free_dead_engines() -> None:
    """Collect reference cycles, then hand the freed heap back to the OS: glibc keeps freed memory
    of its arenas (its mmap threshold grows to 32 MB once big blocks are freed, so tensors below
    that come from the heap), and RSS only ever grew (12 GB after the first API modules)."""
    gc.collect()
    trim = getattr(_LIBC, "malloc_trim", None)
    if trim is not None:
        trim(0)


def pytest_collection_finish(session):
    """Move everything alive after collection (torch, transformers, the test modules: ~440k
    objects) out of the collector's sight, so that each later collection takes milliseconds plus
    what it frees, not ~1 s."""
    gc.collect()
    gc.freeze()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """Free dead engines at once. An engine is a reference cycle (its grammar cache's backend
    factory closes over it, ...), so only the cyclic collector frees it with its model and KV cache
    (~1 GB with the default 256 blocks), and full collections come rarely: dead engines piled up.
    Collect after every slow test (it may have built some) and at the end of each module (its
    module-scoped fixtures are gone by then)."""
    started = time.monotonic()
    yield
    if time.monotonic() - started > COLLECT_AFTER_S or nextitem is None or nextitem.module is not item.module:
        _free_dead_engines()


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
