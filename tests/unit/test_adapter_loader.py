"""Adapters PEFT can make but we cannot serve are refused at load, naming the problem."""

import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from loraplex_server.errors import AdapterLoadError
from loraplex_server.lora.loader import load_adapter
from loraplex_server.lora.model import find_targets
from loraplex_server.lora.registry import AdapterRegistry, resolve_source

ALL7 = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_model():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=64)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def targets():
    return find_targets(tiny_model())


def save(tmp_path, name="a", **cfg):
    cfg.setdefault("r", 4)
    cfg.setdefault("target_modules", ["q_proj", "v_proj"])
    model = get_peft_model(tiny_model(), LoraConfig(init_lora_weights=False, **cfg))
    out = tmp_path / name
    model.save_pretrained(str(out), safe_serialization=True)
    return out


def refused(path, targets, match, max_rank=16):
    with pytest.raises(AdapterLoadError, match=match):
        load_adapter("x", path, targets, max_rank)


def test_valid_adapter_loads_with_scales(tmp_path, targets):
    path = save(tmp_path, r=8, lora_alpha=16, target_modules=ALL7, rank_pattern={"down_proj": 4},
                alpha_pattern={"q_proj": 4})
    a = load_adapter("ok", path, targets, 16)
    assert a.target_modules == tuple(sorted(ALL7)) and a.rank == 8
    mods = {(k.layer, k.name): m for k, m in a.modules.items()}
    assert mods[(0, "k_proj")].scale == pytest.approx(2.0)
    assert mods[(0, "q_proj")].scale == pytest.approx(0.5)
    assert mods[(1, "down_proj")].rank == 4 and mods[(1, "down_proj")].scale == pytest.approx(4.0)
    r = load_adapter("rs", save(tmp_path, "rs", r=4, lora_alpha=8, use_rslora=True), targets, 16)
    assert next(iter(r.modules.values())).scale == pytest.approx(8 / math.sqrt(4))


@pytest.mark.parametrize("cfg,match", [
    (dict(use_dora=True), "DoRA"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(target_modules=["embed_tokens", "q_proj"]), "embedding"),
    (dict(r=32), "exceeds max_lora_rank"),
    (dict(bias="lora_only"), "bias"),
])
def test_peft_kinds_we_cannot_serve_are_refused(tmp_path, targets, cfg, match):
    refused(save(tmp_path, **cfg), targets, match)


def test_unknown_target_module_is_refused(tmp_path, targets):
    path = save(tmp_path)
    weights = load_file(str(path / "adapter_model.safetensors"))
    weights = {k.replace("q_proj", "qkv_proj"): v for k, v in weights.items()}
    save_file(weights, str(path / "adapter_model.safetensors"))
    refused(path, targets, "unknown target module 'qkv_proj'")


def test_wrong_shapes_missing_half_and_nan_are_refused(tmp_path, targets):
    path = save(tmp_path)
    file = path / "adapter_model.safetensors"
    good = load_file(str(file))
    key_b = next(k for k in good if "lora_B" in k)
    for mutate, match in [
        (lambda w: w.update({key_b: torch.zeros(5, 4)}), "wrong shapes"),
        (lambda w: w.pop(key_b), "must both be present"),
        (lambda w: w[key_b].__setitem__((0, 0), float("nan")), "NaN or Inf"),
        (lambda w: w.update({"base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight": torch.zeros(4, 32)}),
         "layer 7 does not exist"),
    ]:
        w = {k: v.clone() for k, v in good.items()}
        mutate(w)
        save_file(w, str(file))
        refused(path, targets, match)


def test_pickle_missing_and_garbage_files_are_refused(tmp_path, targets):
    path = save(tmp_path)
    (path / "adapter_model.safetensors").rename(path / "adapter_model.bin")
    refused(path, targets, "pickle")
    (path / "adapter_model.bin").unlink()
    refused(path, targets, "missing")
    (path / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    refused(path, targets, "not a valid safetensors")
    (path / "adapter_config.json").write_text("{broken")
    refused(path, targets, "not valid JSON")
    refused(tmp_path / "nope", targets, "not a directory")
    cfg_path = save(tmp_path, "p2") / "adapter_config.json"
    original = json.loads(cfg_path.read_text())
    for field, value, match in [("peft_type", "IA3", "peft_type IA3"), ("alora_invocation_tokens", [5], "activated"),
                                ("layer_replication", [[0, 2]], "layer_replication"),
                                ("trainable_token_indices", [1, 2], "trainable_token_indices")]:
        cfg_path.write_text(json.dumps({**original, field: value}))
        refused(cfg_path.parent, targets, match)


def test_registry_publishes_nothing_on_failure_and_reloads_after_cpu_eviction(tmp_path, targets):
    reg = AdapterRegistry(targets, max_rank=16, max_cpu_loras=1)
    good, bad = save(tmp_path, "good"), save(tmp_path, "bad", use_dora=True)
    with pytest.raises(AdapterLoadError):
        reg.add("bad", bad)
    assert "bad" not in reg
    reg.add("g1", good)
    reg.add("g2", good)
    assert not reg.in_cpu_cache("g1") and reg.num_cpu_evictions == 1
    assert reg.get("g1").adapter_id == "g1" and reg.in_cpu_cache("g1")


def test_sources_stay_inside_the_adapter_root(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    assert resolve_source(root, "a") == (root / "a").resolve()
    for bad in ["../outside", "link", str(tmp_path / "outside")]:
        with pytest.raises(AdapterLoadError, match="outside the adapter root"):
            resolve_source(root, bad)
