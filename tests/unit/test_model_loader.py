"""model/loader.py: Hugging Face directories (single and sharded safetensors), the pickle refusal,
dummy weights from presets or a config.json, device/dtype resolution, and the embedded GGUF model.

Every loaded model is compared against a reference (the model that was saved, or a model built
the ordinary way from the same config), never judged by eye.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from loraplex_server.config import ModelConfig, default_cache_dir
from loraplex_server.errors import ModelLoadError
from loraplex_server.model import loader
from loraplex_server.model.loader import (
    EMBEDDED_NAME,
    check_no_pickle,
    dummy_config,
    embedded_gguf_path,
    embedded_model_dir,
    load_model,
    resolve_device,
    resolve_dtype,
)
from loraplex_server.model.presets import PRESETS

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, head_dim=16, max_position_embeddings=128, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)
PROMPT = torch.tensor([[5, 17, 42, 99, 3, 250, 7, 64, 128, 11]])


@pytest.fixture(autouse=True)
def _one_thread():
    torch.set_num_threads(1)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides) -> torch.nn.Module:
    config = AutoConfig.for_model(model_type, **{**TINY, **overrides})
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()


@torch.no_grad()
def logits_of(model: torch.nn.Module, ids: torch.Tensor = PROMPT) -> torch.Tensor:
    return model(input_ids=ids).logits


def _embedded_cache() -> Path | None:
    target = default_cache_dir() / "models" / EMBEDDED_NAME
    return target if (target / "config.json").is_file() else None


needs_embedded_cache = pytest.mark.skipif(_embedded_cache() is None,
                                          reason="embedded model cache not built (make model-cache)")


@pytest.fixture
def no_embedded_tokenizer(monkeypatch):
    """Dummy loads borrow the embedded tokenizer; without a cache that means a ~20 s GGUF conversion.
    Make the embedded model look absent so those tests stay fast and hermetic."""
    def missing(_cache_dir):
        raise ModelLoadError("embedded model absent (test)")
    monkeypatch.setattr(loader, "embedded_model_dir", missing)


@pytest.fixture
def no_unpickling(monkeypatch):
    """Fail the test if anything calls torch.load or pickle.load(s) while loading."""
    def refuse(*_a, **_k):
        raise AssertionError("the loader unpickled something")
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)


# ---- Hugging Face directories ------------------------------------------------------------------

def test_safetensors_directory_loads_and_matches(tmp_path, no_unpickling):
    ref = tiny_model()
    ref.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = load_model(ModelConfig(model=str(tmp_path), device="cpu"))
    assert loaded.name == tmp_path.name
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert loaded.tokenizer is None  # the directory holds no tokenizer: token-id prompts only
    assert not loaded.model.training
    assert not any(p.requires_grad for p in loaded.model.parameters())
    assert all(p.dtype == torch.float32 for p in loaded.model.parameters())
    torch.testing.assert_close(logits_of(loaded.model), logits_of(ref), rtol=0, atol=0)


def test_sharded_safetensors_directory_loads_and_matches(tmp_path, no_unpickling):
    ref = tiny_model("qwen2", seed=3)
    ref.save_pretrained(tmp_path, max_shard_size="50KB")
    shards = sorted(tmp_path.glob("model-*.safetensors"))
    assert len(shards) > 1 and (tmp_path / "model.safetensors.index.json").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    loaded = load_model(ModelConfig(model=str(tmp_path), device="cpu"))
    torch.testing.assert_close(logits_of(loaded.model), logits_of(ref), rtol=0, atol=0)
    for name, tensor in ref.state_dict().items():
        assert torch.equal(loaded.model.state_dict()[name], tensor), name


def test_bfloat16_dtype_is_applied(tmp_path):
    ref = tiny_model()
    ref.save_pretrained(tmp_path)
    loaded = load_model(ModelConfig(model=str(tmp_path), device="cpu", dtype="bfloat16"))
    assert loaded.dtype == torch.bfloat16
    ref_params = dict(ref.named_parameters())
    for name, p in loaded.model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, ref_params[name].to(torch.bfloat16)), name
    assert torch.isfinite(logits_of(loaded.model)).all()


def test_pickle_only_directory_is_refused(tmp_path, no_unpickling):
    model = tiny_model()
    model.config.save_pretrained(tmp_path)
    # Bytes of a real pickle (written without our torch.load guard being involved).
    (tmp_path / "pytorch_model.bin").write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    with pytest.raises(ModelLoadError, match="pickle") as info:
        load_model(ModelConfig(model=str(tmp_path), device="cpu"))
    assert "pytorch_model.bin" in str(info.value)
    with pytest.raises(ModelLoadError, match="pickle"):
        check_no_pickle(tmp_path)


@pytest.mark.parametrize("name", ["model.pt", "weights.pth", "model.ckpt", "state.pkl"])
def test_other_pickle_suffixes_are_refused(tmp_path, name):
    (tmp_path / name).write_bytes(b"\x80\x04N.")
    with pytest.raises(ModelLoadError, match="pickle"):
        check_no_pickle(tmp_path)


def test_safetensors_win_over_a_pickle_beside_them(tmp_path, no_unpickling):
    ref = tiny_model()
    ref.save_pretrained(tmp_path)
    (tmp_path / "pytorch_model.bin").write_bytes(b"not even a pickle")
    check_no_pickle(tmp_path)  # accepted: safetensors are present
    loaded = load_model(ModelConfig(model=str(tmp_path), device="cpu"))
    torch.testing.assert_close(logits_of(loaded.model), logits_of(ref), rtol=0, atol=0)


def test_directory_without_weights_is_refused(tmp_path):
    tiny_model().config.save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="no \\*.safetensors"):
        load_model(ModelConfig(model=str(tmp_path), device="cpu"))


def test_missing_path_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_model(ModelConfig(model=str(tmp_path / "nowhere"), device="cpu"))


def test_plain_file_that_is_not_gguf_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="neither a model directory nor a .gguf"):
        load_model(ModelConfig(model=str(path), device="cpu"))


def test_invalid_config_json_is_a_model_load_error(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(ModelConfig(model=str(tmp_path), device="cpu"))


def test_truncated_safetensors_is_a_model_load_error(tmp_path):
    tiny_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="cannot load model"):
        load_model(ModelConfig(model=str(tmp_path), device="cpu"))


def test_unknown_load_format_is_refused():
    with pytest.raises(ModelLoadError, match="unknown load format"):
        load_model(ModelConfig(model="x", load_format="pickle", device="cpu"))


# ---- dummy weights ---------------------------------------------------------------------------

def _write_config(tmp_path: Path, model_type: str, **overrides) -> Path:
    values = {"model_type": model_type, **TINY, **overrides}
    path = tmp_path / "config.json"
    path.write_text(json.dumps(values))
    return path


DUMMY_ARCHS = pytest.mark.parametrize("model_type,overrides", [
    ("llama", {}),
    ("llama", {"tie_word_embeddings": True}),
    ("qwen2", {}),
    ("qwen3", {}),
    ("gemma", {"hidden_act": "gelu_pytorch_tanh"}),
    ("phi3", {"original_max_position_embeddings": 128}),
], ids=["llama", "llama-tied", "qwen2", "qwen3", "gemma", "phi3"])


@pytest.fixture
def poisoned_memory(monkeypatch):
    """A loader that builds on the meta device and materializes with ``Module.to_empty`` (i.e.
    ``torch.empty_like``) leaves every tensor uninitialized, non-persistent buffers included. Fill
    that memory with NaN so anything left uninitialized is caught deterministically (real
    uninitialized memory may happen to hold the right values, e.g. a freed tensor of the same shape)."""
    real_empty_like = torch.empty_like

    def nan_empty_like(t, *args, **kwargs):
        out = real_empty_like(t, *args, **kwargs)
        return out.fill_(float("nan")) if out.is_floating_point() else out
    monkeypatch.setattr(torch, "empty_like", nan_empty_like)


def _dummy(tmp_path, model_type="llama", seed=0, dtype="auto", **overrides):
    path = _write_config(tmp_path, model_type, **overrides)
    return load_model(ModelConfig(model=str(path), load_format="dummy", device="cpu", seed=seed, dtype=dtype))


@DUMMY_ARCHS
def test_dummy_is_fully_initialized_and_matches_an_ordinary_build(tmp_path, no_embedded_tokenizer, poisoned_memory,
                                                                 model_type, overrides):
    """Reference: the same config built the ordinary way (buffers such as RoPE inv_freq and Gemma's
    embed_scale computed at construction), given the dummy's parameters: every buffer and the
    logits must be identical, and nothing may be left uninitialized (NaN-poisoned)."""
    loaded = _dummy(tmp_path, model_type, seed=7, **overrides)
    model = loaded.model
    assert loaded.name == f"dummy:{tmp_path / 'config.json'}" and loaded.tokenizer is None
    assert loaded.dtype == torch.float32
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert model.config.hidden_size == TINY["hidden_size"] and model.config.vocab_size == TINY["vocab_size"]

    reference = tiny_model(model_type, **overrides)
    assert {n: p.shape for n, p in model.named_parameters()} == \
        {n: p.shape for n, p in reference.named_parameters()}
    for name, p in model.named_parameters():
        assert not p.isnan().any(), f"parameter {name} left uninitialized"
        if p.dim() == 2:  # random matrices, not constants
            assert 0.005 < p.std().item() < 0.2, name
    ref_buffers = dict(reference.named_buffers())
    for name, buf in model.named_buffers():
        assert torch.equal(buf, ref_buffers[name]), f"buffer {name} differs from an ordinary build"
    missing, unexpected = reference.load_state_dict(model.state_dict(), strict=False)
    assert not unexpected and all("lm_head" in k for k in missing), (missing, unexpected)
    reference.tie_weights()
    torch.testing.assert_close(logits_of(model), logits_of(reference), rtol=0, atol=0)
    if model.config.tie_word_embeddings:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    else:
        assert not torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)


def test_dummy_parameters_follow_the_seed(tmp_path, no_embedded_tokenizer):
    a, b, c = (_dummy(tmp_path, seed=s).model.state_dict() for s in (1, 1, 2))
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert not torch.equal(a["model.embed_tokens.weight"], c["model.embed_tokens.weight"])


def test_dummy_accepts_a_directory_holding_config_json(tmp_path, no_embedded_tokenizer):
    _write_config(tmp_path, "llama")
    loaded = load_model(ModelConfig(model=str(tmp_path), load_format="dummy", device="cpu"))
    assert loaded.model.config.num_hidden_layers == TINY["num_hidden_layers"]


def test_dummy_bfloat16(tmp_path, no_embedded_tokenizer, poisoned_memory):
    loaded = _dummy(tmp_path, dtype="bfloat16")
    assert loaded.dtype == torch.bfloat16
    for name, p in loaded.model.named_parameters():
        assert p.dtype == torch.bfloat16 and not p.isnan().any(), name


def test_dummy_unknown_name_is_refused(no_embedded_tokenizer):
    with pytest.raises(ModelLoadError, match="neither a preset"):
        load_model(ModelConfig(model="no-such-model-42", load_format="dummy", device="cpu"))


def test_dummy_config_without_model_type_is_refused(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(TINY))
    with pytest.raises(ModelLoadError, match="no model_type"):
        dummy_config(str(path))


# Parameter counts of the real checkpoints these presets imitate (public model cards / safetensors
# indexes): SmolLM2-135M, Meta-Llama-3-8B, Mistral-7B-v0.3, Qwen2.5-7B.
PRESET_PARAMS = {"smollm2-135m": 134_515_008, "llama-3-8b": 8_030_261_248,
                 "mistral-7b": 7_248_023_552, "qwen2.5-7b": 7_615_616_512}


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_builds_the_real_shape_without_weights(preset):
    config = dummy_config(preset)
    assert config.model_type == PRESETS[preset]["model_type"]
    with torch.device("meta"):  # shapes only: nothing is allocated
        model = AutoModelForCausalLM.from_config(config)
    assert all(p.is_meta for p in model.parameters())
    assert sum(p.numel() for p in model.parameters()) == PRESET_PARAMS[preset]


def test_llama_3_8b_preset_config():
    config = dummy_config("llama-3-8b")
    assert type(config).__name__ == "LlamaConfig"
    assert (config.hidden_size, config.intermediate_size, config.num_hidden_layers) == (4096, 14336, 32)
    assert (config.num_attention_heads, config.num_key_value_heads, config.vocab_size) == (32, 8, 128256)
    assert config.rope_parameters["rope_theta"] == 500000.0
    assert config.tie_word_embeddings is False
    assert dummy_config(None).to_dict() == dummy_config("smollm2-135m").to_dict()  # the default shape


@needs_embedded_cache
def test_smollm2_preset_matches_the_embedded_model():
    real = AutoConfig.from_pretrained(str(_embedded_cache()))
    preset = dummy_config("smollm2-135m")
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "tie_word_embeddings",
                "bos_token_id", "eos_token_id", "head_dim"):
        assert getattr(preset, key) == getattr(real, key), key
    assert preset.rope_parameters["rope_theta"] == real.rope_parameters["rope_theta"]


# ---- device and dtype ------------------------------------------------------------------------

@pytest.fixture
def no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_resolve_device_without_cuda(no_cuda):
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device("cpu") == torch.device("cpu")
    for name in ("cuda", "cuda:0", "cuda:1"):
        with pytest.raises(ModelLoadError, match="CUDA is not available"):
            resolve_device(name)


def test_resolve_device_auto_prefers_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("cuda")
    assert resolve_device("cuda:1") == torch.device("cuda", 1)


def test_resolve_device_unknown_name_is_a_model_load_error(no_cuda):
    with pytest.raises(ModelLoadError, match="unknown device 'gpu'"):
        resolve_device("gpu")


def test_load_model_refuses_cuda_without_cuda(no_cuda, tmp_path):
    with pytest.raises(ModelLoadError, match="CUDA is not available"):
        load_model(ModelConfig(model=str(tmp_path), device="cuda"))


def test_resolve_dtype():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_dtype("auto", cpu) == torch.float32
    assert resolve_dtype("auto", cuda) == torch.bfloat16
    assert resolve_dtype("float32", cuda) == torch.float32
    assert resolve_dtype("bfloat16", cpu) == torch.bfloat16
    assert resolve_dtype("float16", cpu) == torch.float16
    for bad in ("float64", "fp16", "int8", ""):
        with pytest.raises(ModelLoadError, match="unknown dtype"):
            resolve_dtype(bad, cpu)


def test_load_model_default_device_and_dtype(tmp_path, no_cuda):
    tiny_model().save_pretrained(tmp_path)
    loaded = load_model(ModelConfig(model=str(tmp_path)))  # device and dtype "auto"
    assert loaded.device == torch.device("cpu") and loaded.dtype == torch.float32
    assert next(loaded.model.parameters()).device.type == "cpu"


# ---- the embedded model ----------------------------------------------------------------------

@needs_embedded_cache
def test_embedded_default_loads_with_tokenizer():
    loaded = load_model(ModelConfig(device="cpu"))
    assert loaded.name == EMBEDDED_NAME
    assert loaded.dtype == torch.float32
    tok = loaded.tokenizer
    assert tok is not None
    ids = tok.encode("The capital of France is", add_special_tokens=True)
    assert ids and all(0 <= i < loaded.model.config.vocab_size for i in ids)
    assert tok.decode(ids, skip_special_tokens=True) == "The capital of France is"
    assert tok.eos_token_id is not None and tok.eos_token_id < loaded.model.config.vocab_size
    assert getattr(tok, "chat_template", None)  # chat prompts need it
    logits = logits_of(loaded.model, torch.tensor([ids]))
    assert logits.shape == (1, len(ids), loaded.model.config.vocab_size)
    assert torch.isfinite(logits).all()


@needs_embedded_cache
def test_embedded_model_dir_reuses_the_cache():
    assert embedded_model_dir(default_cache_dir()) == _embedded_cache()


@pytest.mark.slow
@needs_embedded_cache
def test_gguf_loads_and_matches_the_safetensors_cache():
    """The GGUF file, dequantized by transformers on load (~20-30 s), against the safetensors cache
    that was converted from the same file. Measured: bitwise-identical weights and logits (max
    |diff| 0.0), so the comparison is exact."""
    gguf = embedded_gguf_path()
    from_gguf = load_model(ModelConfig(model=str(gguf), device="cpu"))
    from_dir = load_model(ModelConfig(model=str(embedded_model_dir(default_cache_dir())), device="cpu"))
    assert from_gguf.name == gguf.name and from_gguf.dtype == torch.float32
    assert from_gguf.tokenizer is not None
    text = "The capital of France is Paris, and the capital of Germany is"
    ids = from_dir.tokenizer.encode(text)
    assert from_gguf.tokenizer.encode(text) == ids
    sd_gguf, sd_dir = from_gguf.model.state_dict(), from_dir.model.state_dict()
    assert sd_gguf.keys() == sd_dir.keys()
    for name in sd_dir:
        assert torch.equal(sd_gguf[name], sd_dir[name]), name
    torch.testing.assert_close(logits_of(from_gguf.model, torch.tensor([ids])),
                               logits_of(from_dir.model, torch.tensor([ids])), rtol=0, atol=0)
