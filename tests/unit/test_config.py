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


def test_lora_pool_rows_defaults_to_todays_memory_and_is_wired_like_the_other_lora_options(tmp_path):
    from loraplex_server.cli import build_parser, flag_values
    from loraplex_server.config import LoraConfig, load_config

    assert LoraConfig().lora_pool_rows is None and LoraConfig().resolved_pool_rows == 4 * 64
    assert LoraConfig(max_loras=256, max_lora_rank=16).resolved_pool_rows == 256 * 16
    assert engine_config_from_env({"LORAPLEX_LORA_POOL_ROWS": "2080"}).lora.resolved_pool_rows == 2080
    toml = tmp_path / "c.toml"
    toml.write_text("[lora]\nlora_pool_rows = 512\nmax_loras = 64\n")
    assert load_config(config_file=toml, environ={}).engine.lora.lora_pool_rows == 512
    env = {"LORAPLEX_LORA_POOL_ROWS": "1024"}
    assert load_config(config_file=toml, environ=env).engine.lora.lora_pool_rows == 1024  # env beats the file
    args = build_parser().parse_args(["--lora-pool-rows", "300"])
    assert load_config(flag_values(args), toml, env).engine.lora.lora_pool_rows == 300  # the flag beats both
    with pytest.raises(ValueError, match="at least 1"):
        _ = LoraConfig(lora_pool_rows=0).resolved_pool_rows


def test_memory_pool_defaults_to_auto_is_wired_and_refuses_other_values():
    from loraplex_server.cli import build_parser, flag_values
    from loraplex_server.config import CacheConfig, load_config

    assert CacheConfig().memory_pool == "auto"
    assert engine_config_from_env({"LORAPLEX_MEMORY_POOL": "unified"}).cache.memory_pool == "unified"
    args = build_parser().parse_args(["--memory-pool", "separate"])
    assert load_config(flag_values(args), None, {}).engine.cache.memory_pool == "separate"
    with pytest.raises(ValueError, match="memory_pool must be auto, separate or unified"):
        CacheConfig(memory_pool="shared")
    from loraplex_server.config import EngineConfig, LoraConfig
    assert EngineConfig(cache=CacheConfig(memory_pool="unified"), lora=LoraConfig(max_loras=0)).lora.max_loras == 0
    assert EngineConfig(lora=LoraConfig(max_loras=0)).lora.max_loras == 0  # auto: checked when the pool is planned
    with pytest.raises(ValueError, match="0, no cap, only with memory_pool unified or auto"):
        EngineConfig(cache=CacheConfig(memory_pool="separate"), lora=LoraConfig(max_loras=0))
    with pytest.raises(ValueError, match="max_loras must be at least 1"):
        EngineConfig(cache=CacheConfig(memory_pool="unified"), lora=LoraConfig(max_loras=-1))


def test_cpu_gemm_defaults_to_onednn_is_wired_and_refuses_other_values():
    from loraplex_server.cli import build_parser, flag_values
    from loraplex_server.config import ModelConfig, load_config

    assert ModelConfig().cpu_gemm == "onednn"
    assert engine_config_from_env({"LORAPLEX_CPU_GEMM": "torch"}).model.cpu_gemm == "torch"
    args = build_parser().parse_args(["--cpu-gemm", "torch"])
    assert load_config(flag_values(args), None, {}).engine.model.cpu_gemm == "torch"
    with pytest.raises(ValueError, match="cpu_gemm must be onednn or torch"):
        ModelConfig(cpu_gemm="mkl")
    with pytest.raises(ValueError, match="cpu_gemm"):
        engine_config_from_env({"LORAPLEX_CPU_GEMM": "auto"})
