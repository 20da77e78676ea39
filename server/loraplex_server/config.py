"""Configuration: frozen dataclasses, and the only place environment variables are read.

Everything else receives a config object; nothing reads ``os.environ`` at import time.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

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
    # decode steps as CUDA graph replays: auto = on a CUDA device, on (on CPU: the same padded
    # static step run eagerly, for tests), off = always eager
    cuda_graphs: str = "auto"
    cuda_graph_max_batch: int | None = None  # largest captured decode batch; None -> max_num_seqs
    # native CPU kernels (model/csrc, built once with the system C++ compiler): auto = on a CPU
    # device when they build (else the torch path, with a warning), off = torch only
    cpu_kernels: str = "auto"
    # CPU linears (with cpu_kernels auto): onednn = weights packed once for oneDNN where the torch
    # build and CPU support the dtype; torch = F.linear (MKL) (model/packed_linear.py)
    cpu_gemm: str = "onednn"

    def __post_init__(self):
        if self.cuda_graphs not in ("auto", "on", "off"):
            raise ValueError(f"cuda_graphs must be auto, on or off, got {self.cuda_graphs!r}")
        if self.cpu_kernels not in ("auto", "off"):
            raise ValueError(f"cpu_kernels must be auto or off, got {self.cpu_kernels!r}")
        if self.cpu_gemm not in ("onednn", "torch"):
            raise ValueError(f"cpu_gemm must be onednn or torch, got {self.cpu_gemm!r}")
        if self.cuda_graph_max_batch is not None and self.cuda_graph_max_batch < 1:
            raise ValueError(f"cuda_graph_max_batch must be >= 1, got {self.cuda_graph_max_batch}")


@dataclass(frozen=True)
class CacheConfig:
    """Paged KV cache. ``kv_cache_bytes`` is the memory budget for K and V of all layers."""

    block_size: int = 16
    kv_cache_bytes: int = 512 * 1024 * 1024
    num_blocks: int | None = None  # overrides kv_cache_bytes when set (tests)
    # reuse the K/V of full blocks whose tokens (and adapter version) a previous request computed
    prefix_caching: bool = True
    # separate: KV blocks in kv_cache_bytes, adapter weights in their own row pool (lora_pool_rows);
    # unified: kv_cache_bytes is one pool of pages that KV blocks and adapter weights share;
    # auto: unified over kv_cache_bytes plus the row pool's bytes, separate where unified cannot run
    # (engine/memory_plan.py)
    memory_pool: str = "auto"

    def __post_init__(self):
        if self.memory_pool not in ("auto", "separate", "unified"):
            raise ValueError(f"memory_pool must be auto, separate or unified, got {self.memory_pool!r}")


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_batched_tokens: int = 512  # per-step token budget (prefill chunks + decodes)
    max_num_seqs: int = 64  # cap on running sequences
    max_queued_requests: int = 1024
    fairness: str = "vtc"  # vtc (Virtual Token Counter across tenants) | fcfs
    # steps a request kept out by the max_loras cap may be passed over by requests whose adapters
    # are already in the batch (0 = strict arrival order)
    max_slot_bypass_steps: int = 64
    # engine steps failing in a row (after isolating culprit requests) before health turns NOT_SERVING
    max_failed_steps: int = 3


@dataclass(frozen=True)
class LoraConfig:
    # device slots = distinct adapters resident / per step; 0 (memory_pool unified or auto): no cap but
    # memory (slots for up to min(pool pages, 4,096) resident versions)
    max_loras: int = 4
    max_cpu_loras: int = 16  # loaded adapters kept in host memory (LRU)
    max_lora_rank: int = 64
    adapter_root: Path | None = None  # adapters resolve inside this directory when set
    max_adapter_bytes: int = 2 * 1024 ** 3  # adapter_model.safetensors size limit
    # weight rows of every LoRA layer's pool (an adapter of rank r holds r of them); None = max_loras * max_lora_rank
    lora_pool_rows: int | None = None

    @property
    def resolved_pool_rows(self) -> int:
        rows = self.max_loras * self.max_lora_rank if self.lora_pool_rows is None else self.lora_pool_rows
        if rows < 1:
            raise ValueError(f"lora_pool_rows must be at least 1, got {rows}")
        return rows


@dataclass(frozen=True)
class GuidedConfig:
    """Structured outputs (constrained decoding)."""

    grammar_cache_size: int = 256  # compiled grammars kept (LRU), failures included
    max_constraint_bytes: int = 64 * 1024  # a schema / regex / grammar / choice list over this is refused
    grammar_compile_threads: int = 1  # compiles run off the engine thread on this many workers
    # a request whose grammar has not compiled after this long is refused (INVALID_ARGUMENT), not left waiting
    grammar_compile_timeout_s: float = 30.0


@dataclass(frozen=True)
class EngineConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    guided: GuidedConfig = field(default_factory=GuidedConfig)

    def __post_init__(self):
        if self.lora.max_loras < 0 or (self.lora.max_loras == 0 and self.cache.memory_pool == "separate"):
            raise ValueError(f"max_loras must be at least 1 (0, no cap, only with memory_pool unified or auto), "
                             f"got {self.lora.max_loras}")

    def resolved_threads(self) -> int:
        return self.model.threads if self.model.threads is not None else default_threads()


@dataclass(frozen=True)
class ServerConfig:
    host: str = "0.0.0.0"
    port: int = 50051
    metrics_port: int = 9090  # 0 = any free port, -1 = no metrics endpoint
    http_port: int = 8000  # OpenAI-compatible HTTP API; 0 = any free port, -1 = off
    http_host: str | None = None  # None = ``host``
    grace_period_s: float = 10.0  # SIGTERM: in-flight requests get this long to finish
    log_level: str = "INFO"
    adapters: tuple[tuple[str, str], ...] = ()  # (name, path inside the adapter root) loaded at start
    keys_file: Path | None = None  # API keys (TOML, sha256-hashed); None = open development mode
    adapter_discovery: bool = False  # register every adapter directory under the adapter root
    state_dir: Path | None = None  # SQLite registry of LoadAdapter'd adapters; None = not persisted

    @property
    def resolved_http_host(self) -> str:
        return self.http_host if self.http_host else self.host


@dataclass(frozen=True)
class Config:
    engine: EngineConfig = field(default_factory=EngineConfig)
    server: ServerConfig = field(default_factory=ServerConfig)


_SECTIONS = {"model": ModelConfig, "cache": CacheConfig, "scheduler": SchedulerConfig, "lora": LoraConfig,
             "guided": GuidedConfig}
_SIZE_SUFFIXES = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(raw: str | int) -> int:
    """Bytes from ``123``, ``512MiB``, ``4G`` or ``1.5g``."""
    if isinstance(raw, int):
        return raw
    text = raw.strip().lower().removesuffix("ib").removesuffix("b")
    if text and text[-1] in _SIZE_SUFFIXES:
        return int(float(text[:-1]) * _SIZE_SUFFIXES[text[-1]])
    return int(text)


def parse_adapters(items) -> tuple[tuple[str, str], ...]:
    """``NAME=PATH`` strings (or a comma-separated string, or a {name: path} table)."""
    if isinstance(items, dict):
        return tuple((str(k), str(v)) for k, v in items.items())
    if isinstance(items, str):
        items = [x for x in items.split(",") if x.strip()]
    out = []
    for item in items:
        name, sep, path = str(item).partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"adapter {item!r} must be NAME=PATH")
        out.append((name.strip(), path.strip()))
    return tuple(out)


_SWITCHES = {"on": True, "true": True, "1": True, "yes": True, "off": False, "false": False, "0": False,
             "no": False}


def parse_switch(raw: str | bool) -> bool:
    """``on``/``off`` (also true/false, 1/0, yes/no) -> bool; anything else is an error."""
    if isinstance(raw, bool):
        return raw
    value = _SWITCHES.get(str(raw).strip().lower())
    if value is None:
        raise ValueError(f"expected on or off, got {raw!r}")
    return value


def _coerce(name: str, annotation: str, raw):
    """Convert a raw (string, or TOML-typed) value to a config field's type."""
    if name == "prefix_caching":
        return parse_switch(raw)
    if name in ("kv_cache_bytes", "max_adapter_bytes", "max_constraint_bytes"):
        return parse_size(raw)
    if name == "adapters":
        return parse_adapters(raw)
    if raw in ("", None) and "None" in annotation:
        return None
    if isinstance(raw, str):
        if annotation.startswith("bool"):
            return raw.strip().lower() in ("1", "true", "yes", "on")
        if annotation.startswith("int"):
            return int(raw)
        if annotation.startswith("float"):
            return float(raw)
    if annotation.startswith("Path"):
        return Path(raw)
    return raw


def _section_values(cls: type, raw: Mapping, where: str) -> dict:
    types = {f.name: str(f.type) for f in fields(cls)}
    unknown = set(raw) - set(types)
    if unknown:
        raise ValueError(f"unknown setting(s) in {where}: {sorted(unknown)}")
    return {k: _coerce(k, types[k], v) for k, v in raw.items()}


def _env_values(cls: type, environ: Mapping[str, str]) -> dict:
    raw = {f.name: environ[f"{ENV_PREFIX}{f.name.upper()}"] for f in fields(cls)
           if f"{ENV_PREFIX}{f.name.upper()}" in environ}
    return _section_values(cls, raw, "the environment")


def _build(layers: list[dict[str, dict]]) -> Config:
    """Merge per-section value dicts, later layers winning."""
    sections = dict(_SECTIONS, server=ServerConfig)
    merged: dict[str, dict] = {name: {} for name in sections}
    for layer in layers:
        for name, values in layer.items():
            merged[name].update(values)
    built = {name: cls(**merged[name]) for name, cls in sections.items()}
    server = built.pop("server")
    return Config(engine=EngineConfig(**built), server=server)


def _file_layer(path: Path | None) -> dict[str, dict]:
    if path is None:
        return {}
    import tomllib

    with open(path, "rb") as fh:
        data = tomllib.load(fh)
    sections = dict(_SECTIONS, server=ServerConfig)
    unknown = set(data) - set(sections)
    if unknown:
        raise ValueError(f"unknown section(s) in {path}: {sorted(unknown)}")
    return {name: _section_values(sections[name], data[name], f"{path} [{name}]") for name in data}


def _env_layer(environ: Mapping[str, str]) -> dict[str, dict]:
    sections = dict(_SECTIONS, server=ServerConfig)
    return {name: _env_values(cls, environ) for name, cls in sections.items()}


def engine_config_from_env(environ: Mapping[str, str] | None = None, **sections) -> EngineConfig:
    """An EngineConfig from ``LORAPLEX_*`` variables, then explicit section overrides (which win)."""
    env = os.environ if environ is None else environ
    overrides = {name: {k: v for k, v in values.items() if v is not None} for name, values in sections.items()}
    return _build([_env_layer(env), overrides]).engine


def load_config(flag_values: Mapping[str, dict] | None = None, config_file: Path | None = None,
                environ: Mapping[str, str] | None = None) -> Config:
    """Defaults < config file (TOML) < ``LORAPLEX_*`` environment < flags.

    ``flag_values`` maps a section name to the fields given on the command line (None = not given).
    ``config_file`` falls back to ``$LORAPLEX_CONFIG``.
    """
    env = os.environ if environ is None else environ
    path = config_file or (Path(env["LORAPLEX_CONFIG"]) if env.get("LORAPLEX_CONFIG") else None)
    flags = {name: {k: v for k, v in values.items() if v is not None}
             for name, values in (flag_values or {}).items()}
    return _build([_file_layer(path), _env_layer(env), flags])


def with_overrides(config: EngineConfig, **sections) -> EngineConfig:
    """A copy of ``config`` with some fields of some sections replaced."""
    return replace(config, **{k: replace(getattr(config, k), **v) for k, v in sections.items()})
