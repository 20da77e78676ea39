"""Configuration: frozen dataclasses, and the only place environment variables are read.

Everything else receives a config object; nothing reads ``os.environ`` at import time.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Mapping

ENV_PREFIX = "LORAPLEX_"


def default_cache_dir() -> Path:
    return Path.home() / ".cache" / "loraplex"


def default_threads(cpu_count: int | None = None) -> int:
    """Half the logical CPUs, at least one: oversubscribing a small CPU makes a step ~20x slower."""
    count = cpu_count if cpu_count is not None else (os.cpu_count() or 1)
    return max(1, count // 2)


@dataclass(frozen=True)
class ModelConfig:
    """Which base model to load and where it runs.

    ``model``: a Hugging Face directory, a ``.gguf`` file, or ``None`` for the embedded default
    (SmolLM2-135M-Instruct). With ``load_format="dummy"``, ``model`` is a config.json path or a
    preset name (see ``model.presets``) and the weights are random.
    """

    model: str | None = None
    load_format: str = "auto"  # auto | safetensors | gguf | dummy
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "auto"  # auto | float32 | bfloat16 | float16
    threads: int | None = None  # torch intra-op threads; None -> default_threads()
    cache_dir: Path = field(default_factory=default_cache_dir)
    max_model_len: int | None = None  # None -> the model's own context length
    seed: int = 0  # for dummy weights


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. ``kv_cache_bytes`` is the memory budget for K and V of all layers."""

    block_size: int = 16
    kv_cache_bytes: int = 512 * 1024 * 1024
    num_blocks: int | None = None  # overrides kv_cache_bytes when set (tests)


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512  # per-step token budget (prefill chunks + decodes)
    max_num_seqs: int = 64  # cap on running sequences
    max_queued_requests: int = 1024


@dataclass(frozen=True)
class LoraConfig:
    max_loras: int = 4  # device slots = distinct adapters per step
    max_cpu_loras: int = 16  # loaded adapters kept in host memory (LRU)
    max_lora_rank: int = 64
    adapter_root: Path | None = None  # adapters resolve inside this directory when set


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)

    def resolved_threads(self) -> int:
        return self.model.threads if self.model.threads is not None else default_threads()


def _coerce(value: str, current: object) -> object:
    if isinstance(current, bool):
        return value.strip().lower() in ("1", "true", "yes", "on")
    if isinstance(current, int):
        return int(value)
    if isinstance(current, Path):
        return Path(value)
    return value


_SECTIONS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "lora": LoraConfig}
_INT_OR_NONE = {"threads", "max_model_len", "num_blocks"}


def _env_overrides(section_cls: type, section: str, environ: Mapping[str, str]) -> dict:
    out: dict = {}
    defaults = section_cls()
    for f in fields(section_cls):
        key = f"{ENV_PREFIX}{f.name.upper()}"
        if key not in environ:
            continue
        raw = environ[key]
        current = getattr(defaults, f.name)
        if f.name in _INT_OR_NONE:
            out[f.name] = int(raw) if raw else None
        elif f.name in ("model", "adapter_root"):
            out[f.name] = (Path(raw) if f.name == "adapter_root" else raw) if raw else None
        else:
            out[f.name] = _coerce(raw, current)
    return out


def engine_config_from_env(environ: Mapping[str, str] | None = None, **sections) -> EngineConfig:
    """Build an EngineConfig from ``LORAPLEX_*`` variables, then apply explicit section overrides.

    ``sections`` maps a section name (model, cache, scheduler, lora) to a dict of field values,
    which win over the environment (flags beat env vars).
    """
    env = os.environ if environ is None else environ
    built = {}
    for name, cls in _SECTIONS.items():
        values = _env_overrides(cls, name, env)
        values.update(sections.get(name, {}))
        built[name] = cls(**values)
    return EngineConfig(**built)


def with_overrides(config: EngineConfig, **sections) -> EngineConfig:
    """A copy of ``config`` with some fields of some sections replaced."""
    return replace(config, **{k: replace(getattr(config, k), **v) for k, v in sections.items()})
