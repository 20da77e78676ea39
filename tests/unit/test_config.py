from pathlib import Path

import pytest

from loraplex_server.config import EngineConfig, default_threads, engine_config_from_env, with_overrides


def test_defaults_are_sensible():
    cfg = EngineConfig()
    assert cfg.model.model is None and cfg.model.device == "auto" and cfg.lora.max_loras == 4
    assert default_threads(2) == 1 and default_threads(16) == 8 and default_threads(1) == 1


def test_env_is_read_only_here_and_flags_win():
    env = {"LORAPLEX_MAX_LORAS": "8", "LORAPLEX_BLOCK_SIZE": "32", "LORAPLEX_THREADS": "3",
           "LORAPLEX_MODEL": "/models/x", "LORAPLEX_ADAPTER_ROOT": "/adapters", "LORAPLEX_DTYPE": "bfloat16"}
    cfg = engine_config_from_env(env, lora=dict(max_loras=2))
    assert cfg.lora.max_loras == 2  # explicit override beats the environment
    assert cfg.cache.block_size == 32 and cfg.model.threads == 3 and cfg.resolved_threads() == 3
    assert cfg.model.model == "/models/x" and cfg.lora.adapter_root == Path("/adapters")
    assert cfg.model.dtype == "bfloat16"


def test_bad_env_value_fails_loudly():
    with pytest.raises(ValueError):
        engine_config_from_env({"LORAPLEX_MAX_LORAS": "many"})


def test_with_overrides_copies():
    cfg = EngineConfig()
    new = with_overrides(cfg, cache=dict(num_blocks=7))
    assert new.cache.num_blocks == 7 and cfg.cache.num_blocks is None
