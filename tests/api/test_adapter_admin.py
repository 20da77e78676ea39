"""Adapter admin over gRPC: bad sources refused with the server healthy, discovery, lifecycle info."""

from __future__ import annotations

import shutil
import threading

import pytest

from helpers import ASSETS
from loraplex import Client
from loraplex import errors as cerr


@pytest.fixture
def root(tmp_path):
    root = tmp_path / "adapters"
    root.mkdir()
    shutil.copytree(ASSETS / "adapters" / "upper", root / "upper")
    shutil.copytree(ASSETS / "adapters" / "json", root / "acme" / "json")
    return root


def test_bad_sources_are_refused_and_the_server_stays_healthy(start_server, root, tmp_path):
    (tmp_path / "outside").mkdir()
    (root / "escape").symlink_to(tmp_path / "outside")
    corrupt = root / "corrupt"
    shutil.copytree(root / "upper", corrupt)
    (corrupt / "adapter_model.safetensors").write_bytes(b"\x00" * 64)
    big = root / "big"
    shutil.copytree(root / "upper", big)
    srv = start_server(root, max_rank=16, max_adapter_bytes=1_000_000)
    with Client(srv.target, timeout=30, retries=0) as c:
        for source, match in [("../outside", "outside the adapter root"), ("escape", "outside the adapter root"),
                              ("/etc", "outside the adapter root"), ("corrupt", "not a valid safetensors"),
                              ("big", "over the 1000000-byte limit"), ("missing", "not a directory")]:
            with pytest.raises(cerr.InvalidArgumentError, match=match):
                c.load_adapter("x", source)
        assert c.health() == "SERVING" and c.list_adapters() == []
        assert c.generate("still fine", max_new_tokens=2).usage.completion_tokens == 2


def test_wrong_base_model_adapter_is_refused(start_server, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM
    other = LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    get_peft_model(other, LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(str(tmp_path / "tiny"))
    srv = start_server(tmp_path, max_rank=16)
    with Client(srv.target, timeout=30, retries=0) as c:
        with pytest.raises(cerr.InvalidArgumentError, match="base model mismatch"):
            c.load_adapter("tiny", "tiny")
        assert c.health() == "SERVING"


def test_discovery_registers_lazily_and_picks_up_new_adapters(start_server, root):
    srv = start_server(root, max_rank=16, server_overrides=dict(adapter_discovery=True))
    with Client(srv.target, timeout=30) as c:
        listed = {a.adapter_id: a for a in c.list_adapters()}
        assert set(listed) == {"upper", "acme/json"}
        assert listed["acme/json"].owner == "acme" and listed["upper"].owner == ""
        assert all(a.state == "disk" and a.load_latency_s == 0 for a in listed.values())  # nothing read yet
        result = c.generate(messages=[("user", "What is the capital of Italy?")], adapter_id="upper",
                            max_new_tokens=6)
        assert result.text.startswith("THE")
        info = {a.adapter_id: a for a in c.list_adapters()}["upper"]
        assert info.state == "device" and info.load_latency_s > 0 and info.last_used_unix > 0
        assert info.version >= 1 and info.size_bytes > 0
        shutil.copytree(root / "upper", root / "late")
        assert srv.server.discovery.sweep() == ["late"]  # what the periodic task does
        assert "late" in {a.adapter_id for a in c.list_adapters()}


def test_shutdown_ends_the_adapter_loader_threads(start_server, root):
    before = set(threading.enumerate())
    srv = start_server(root, max_rank=16, server_overrides=dict(adapter_discovery=True))
    with Client(srv.target, timeout=30) as c:  # registered lazily: the weights load on a loader thread
        c.generate(messages=[("user", "Hi")], adapter_id="upper", max_new_tokens=2)
    loaders = [t for t in threading.enumerate() if t not in before and t.name.startswith("loraplex-adapter-load")]
    assert loaders
    srv.stop()
    for thread in loaders:
        thread.join(10)
    assert not [t.name for t in loaders if t.is_alive()]


def test_hot_swap_bumps_the_version_and_changes_outputs(start_server, root):
    srv = start_server(root, max_rank=16)
    with Client(srv.target, timeout=60) as c:
        v1 = c.load_adapter("swap", "upper")
        first = c.generate(messages=[("user", "Name a fruit.")], adapter_id="swap", max_new_tokens=6)
        v2 = c.load_adapter("swap", "acme/json")
        second = c.generate(messages=[("user", "Name a fruit.")], adapter_id="swap", max_new_tokens=6)
        assert v2.version > v1.version and first.text != second.text and second.text.startswith("{")
        with pytest.raises(cerr.InvalidArgumentError):
            c.load_adapter("swap", "missing")  # a failed load leaves the previous version serving
        again = c.generate(messages=[("user", "Name a fruit.")], adapter_id="swap", max_new_tokens=6)
        assert again.token_ids == second.token_ids


def test_load_adapter_reports_the_fingerprint_and_a_config_mismatch_is_invalid_argument(start_server, root):
    import hashlib
    import json
    srv = start_server(root, max_rank=16)
    with Client(srv.target, timeout=30, retries=0) as c:
        info = c.load_adapter("upper", "upper")
        config = (root / "upper" / "adapter_config.json").read_bytes()
        weights = (root / "upper" / "adapter_model.safetensors").read_bytes()
        assert info.content_sha256 == hashlib.sha256(len(config).to_bytes(8, "little") + config + weights).hexdigest()
        assert info.source_bytes == len(config) + len(weights) and info.source_mtime_unix > 0
        assert (info.load_attempts, info.retrying, info.error) == (0, False, "")  # eager: no background load
        bad = root / "bad-r"
        shutil.copytree(root / "upper", bad)
        cfg = json.loads(config)
        (bad / "adapter_config.json").write_text(json.dumps(dict(cfg, r=cfg["r"] * 2)))
        with pytest.raises(cerr.InvalidArgumentError, match=f"r={cfg['r'] * 2} but the weights have rank {cfg['r']}"):
            c.load_adapter("bad", "bad-r")
        assert c.health() == "SERVING"


def test_load_adapter_racing_an_unload_of_the_same_id_is_not_found_not_internal(start_server, root):
    srv = start_server(root, max_rank=16)
    loop = srv.server.state.loop
    add_adapter = loop.add_adapter

    def add_then_unloaded_concurrently(adapter_id, source, **kwargs):
        version = add_adapter(adapter_id, source, **kwargs)
        loop.remove_adapter(adapter_id).result(30)  # another admin's UnloadAdapter wins the race
        return version
    loop.add_adapter = add_then_unloaded_concurrently
    with Client(srv.target, timeout=30, retries=0) as c:
        with pytest.raises(cerr.NotFoundError, match="'racy'"):
            c.load_adapter("racy", "upper")
        assert c.health() == "SERVING"
