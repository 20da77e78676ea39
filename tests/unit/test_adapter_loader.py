"""Adapters PEFT can make but we cannot serve are refused at load, naming the problem."""

import json
import math
import struct
import threading
import time

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from loraplex_server.errors import AdapterLoadError, AdapterNotFoundError
from loraplex_server.lora.loader import inspect_adapter, load_adapter
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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_loaded_weights_are_peft_a_and_scaled_b_transposed_even_when_huge(tmp_path, targets, dtype):
    """The loader hands slots fp32 A and (scale * B)^T; one check over all the weights finds a NaN
    or Inf (here after the scale), and finite weights whose sum overflows (1e38 each) still load."""
    path = save(tmp_path, r=4, lora_alpha=8, target_modules=ALL7)
    file = path / "adapter_model.safetensors"
    w = {k: v.to(dtype) for k, v in load_file(str(file)).items()}
    key_b = next(k for k in sorted(w) if "layers.1" in k and "v_proj.lora_B" in k)
    w[key_b] = torch.full_like(w[key_b], 1e38)
    save_file(w, str(file))
    loaded = load_adapter("big", path, targets, 16)
    for key, module in loaded.modules.items():
        prefix = f"base_model.model.model.layers.{key.layer}."
        name_a = next(k for k in w if k.startswith(prefix) and f".{key.name}.lora_A" in k)
        a, b = w[name_a].float(), w[name_a.replace("lora_A", "lora_B")].float()
        assert module.a.dtype == module.bt.dtype == torch.float32 and module.scale == 2.0
        assert torch.equal(module.a, a) and torch.equal(module.bt, (b.T * 2.0))
    assert len(loaded.modules) == 2 * len(ALL7)
    for value in (float("inf"), 3e38):  # 3e38 * alpha / r overflows fp32
        w[key_b][0, 0] = value
        save_file({k: v.to(dtype) for k, v in w.items()}, str(file))
        with pytest.raises(AdapterLoadError, match="layer 1 v_proj: weights contain NaN or Inf"):
            load_adapter("inf", path, targets, 16)


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


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_registry_publishes_nothing_on_failure_and_reloads_after_cpu_eviction(tmp_path, targets):
    reg = AdapterRegistry(targets, max_rank=16, max_cpu_loras=1)
    good, bad = save(tmp_path, "good"), save(tmp_path, "bad", use_dora=True)
    with pytest.raises(AdapterLoadError):
        reg.register("bad", bad)
    assert "bad" not in reg
    v1 = reg.register("g1", good, eager=True)
    v2 = reg.register("g2", good, eager=True)
    assert reg.ready(v2.key) and not reg.ready(v1.key) and reg.num_cpu_evictions == 1
    reg.ensure_loading(v1.key)  # back from disk, in the background
    wait_for(lambda: reg.ready(v1.key))
    assert reg.cached(v1.key).adapter_id == "g1" and v1.load_latency_s is not None


def test_touched_weights_are_not_the_next_cpu_eviction(tmp_path, targets):
    reg = AdapterRegistry(targets, max_rank=16, max_cpu_loras=2)
    path = save(tmp_path, "good")
    a, b = (reg.register(name, path, eager=True) for name in ("a", "b"))
    assert reg.touch(a.key)  # a queued request needs a soon: b is now the least recently used
    c = reg.register("c", path, eager=True)
    assert reg.ready(a.key) and not reg.ready(b.key) and reg.ready(c.key)
    assert not reg.touch(b.key)  # not cached: nothing to touch


def test_registration_is_cheap_and_loading_happens_in_the_background(tmp_path, targets):
    calls = []
    gate = threading.Event()

    def slow_load(*args):
        calls.append(args[0])
        gate.wait(5)
        return load_adapter(*args)
    reg = AdapterRegistry(targets, max_rank=16, max_cpu_loras=4, load_fn=slow_load)
    version = reg.register("lazy", save(tmp_path))
    assert calls == [] and version.meta.rank == 4 and version.meta.target_modules == ("q_proj", "v_proj")
    reg.ensure_loading(version.key)
    reg.ensure_loading(version.key)  # idempotent while loading
    wait_for(lambda: calls == ["lazy"])
    assert reg.is_loading(version.key) and not reg.ready(version.key)
    gate.set()
    wait_for(lambda: reg.ready(version.key))
    assert calls == ["lazy"]


def test_failed_background_load_is_reported_not_raised(tmp_path, targets):
    def broken(*args):
        raise OSError("disk on fire")
    reg = AdapterRegistry(targets, max_rank=16, max_cpu_loras=4, load_fn=broken)
    version = reg.register("x", save(tmp_path))
    reg.ensure_loading(version.key)
    wait_for(lambda: reg.failure(version.key) is not None)
    assert "disk on fire" in reg.failure(version.key) and not reg.ready(version.key)


def test_versions_hot_swap_and_unpublish(tmp_path, targets):
    reg = AdapterRegistry(targets, max_rank=16, max_cpu_loras=4)
    v1 = reg.register("a", save(tmp_path, "one"), eager=True)
    v2 = reg.register("a", save(tmp_path, "two", r=8), eager=True)
    assert reg.current("a") is v2 and v1.key != v2.key and v2.version > v1.version
    assert reg.version(v1.key) is v1 and reg.cached(v1.key).rank == 4  # old version still serves
    reg.forget(v1.key)
    with pytest.raises(KeyError):
        reg.version(v1.key)
    reg.forget(v2.key)  # current: not forgotten
    assert reg.version(v2.key) is v2
    assert reg.unpublish("a") is v2 and "a" not in reg
    with pytest.raises(AdapterNotFoundError):
        reg.current("a")


def test_failed_registration_leaves_the_previous_version_serving(tmp_path, targets):
    reg = AdapterRegistry(targets, max_rank=16, max_cpu_loras=4)
    v1 = reg.register("a", save(tmp_path, "one"), eager=True)
    with pytest.raises(AdapterLoadError):
        reg.register("a", save(tmp_path, "dora", use_dora=True), eager=True)
    assert reg.current("a") is v1


def test_size_limit_and_corrupt_headers_are_refused_before_reading(tmp_path, targets):
    path = save(tmp_path)
    file = path / "adapter_model.safetensors"
    size = file.stat().st_size
    with pytest.raises(AdapterLoadError, match="over the"):
        inspect_adapter("x", path, targets, 16, max_bytes=size - 1)
    data = bytearray(file.read_bytes())
    data[0:8] = struct.pack("<Q", 10**9)
    file.write_bytes(bytes(data))
    refused(path, targets, "impossible")
    header_len = struct.unpack("<Q", bytes(file.read_bytes()[:8]))[0]
    good = save(tmp_path, "good2")
    raw = bytearray((good / "adapter_model.safetensors").read_bytes())
    n = struct.unpack("<Q", bytes(raw[:8]))[0]
    header = json.loads(raw[8:8 + n])
    first = next(k for k in header if k != "__metadata__")
    header[first]["shape"] = [header[first]["shape"][0] * 2, header[first]["shape"][1]]
    new = json.dumps(header).encode()
    (good / "adapter_model.safetensors").write_bytes(struct.pack("<Q", len(new)) + new + bytes(raw[8 + n:]))
    refused(good, targets, "bytes stored for shape")
    assert header_len == 10**9


def test_wrong_base_model_is_refused(tmp_path, targets):
    torch.manual_seed(0)
    other = LlamaForCausalLM(LlamaConfig(hidden_size=48, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    peft_model = get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj"], init_lora_weights=False))
    peft_model.save_pretrained(str(tmp_path / "other"), safe_serialization=True)
    refused(tmp_path / "other", targets, "base model mismatch")


def test_sources_stay_inside_the_adapter_root(tmp_path):
    root = tmp_path / "root"
    (root / "a").mkdir(parents=True)
    (tmp_path / "outside").mkdir()
    (root / "link").symlink_to(tmp_path / "outside")
    assert resolve_source(root, "a") == (root / "a").resolve()
    for bad in ["../outside", "link", str(tmp_path / "outside")]:
        with pytest.raises(AdapterLoadError, match="outside the adapter root"):
            resolve_source(root, bad)
