"""api/discovery.py: what a sweep of the adapter root registers, under which id and owner.

A real (tiny) engine behind a real EngineLoop: a 2-layer SmolLM2-shaped model with dummy weights,
and adapters written for its shapes. Registration is lazy, so only configs and headers are read.
"""

from __future__ import annotations

import logging
import shutil
import sys

import pytest
import torch

from helpers import ASSETS, BENCHMARKS, dummy_engine_factory
from loraplex_server.api.discovery import AdapterDiscovery
from loraplex_server.engine.loop import EngineLoop
from loraplex_server.lora.adapter_root import find_adapters

sys.path.insert(0, str(BENCHMARKS))
from synthetic_adapters import write_adapter  # noqa: E402


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    return dummy_engine_factory(tmp_path_factory.mktemp("tiny"), torch.device("cpu"))()


@pytest.fixture
def loop(engine):
    with EngineLoop(engine) as loop:
        yield loop


@pytest.fixture
def make_adapter(engine, tmp_path):
    """Write a valid adapter for the tiny model at ``path`` (a copy of one made once per test)."""
    template = write_adapter(tmp_path / "template", engine.loaded.model.config, rank=4, targets=["q_proj"])

    def make(path):
        shutil.copytree(template, path)
        return path
    return make


def registered(engine, adapter_id):
    return engine.lora.has_adapter(adapter_id)


def test_a_sweep_registers_every_adapter_directory_by_its_path(loop, engine, make_adapter, tmp_path):
    root = tmp_path / "root"
    make_adapter(root / "disc-public")
    make_adapter(root / "disc-acme" / "sql")
    make_adapter(root / "disc-acme" / "team" / "deep")
    (root / "disc-empty").mkdir()                                       # no adapter_config.json
    (root / "disc-notes").mkdir()
    (root / "disc-notes" / "README.md").write_text("not an adapter")
    added = AdapterDiscovery(loop, root).sweep()
    assert sorted(added) == ["disc-acme/sql", "disc-acme/team/deep", "disc-public"]
    assert all(registered(engine, a) for a in added)
    assert not registered(engine, "disc-empty") and not registered(engine, "disc-notes")
    # the first path component names the owner; ids without a '/' are public
    assert engine.lora.resolve("disc-acme/sql").owner == "disc-acme"
    assert engine.lora.resolve("disc-acme/team/deep").owner == "disc-acme"
    assert engine.lora.resolve("disc-public").owner is None
    assert engine.lora.resolve("disc-public").meta.source.resolve() == (root / "disc-public").resolve()


def test_registration_is_lazy(loop, engine, make_adapter, tmp_path):
    root = tmp_path / "root"
    make_adapter(root / "disc-lazy")
    assert AdapterDiscovery(loop, root).sweep() == ["disc-lazy"]
    infos = {i.meta.adapter_id: i for i in loop.call(lambda e: e.lora.info()).result(30)}
    assert infos["disc-lazy"].state == "disk"  # weights not read until first use
    assert infos["disc-lazy"].fingerprint.sha256 is None  # taken at the first full read
    only = loop.call(lambda e: e.lora.info(["disc-lazy", "never-registered"])).result(30)
    assert [i.meta.adapter_id for i in only] == ["disc-lazy"]


def test_later_sweeps_register_only_new_directories(loop, engine, make_adapter, tmp_path):
    root = tmp_path / "root"
    make_adapter(root / "disc-first")
    discovery = AdapterDiscovery(loop, root)
    assert discovery.sweep() == ["disc-first"]
    version = engine.lora.resolve("disc-first").version
    assert discovery.sweep() == []
    make_adapter(root / "disc-second")
    assert discovery.sweep() == ["disc-second"]
    assert engine.lora.resolve("disc-first").version == version  # not registered again
    assert list(find_adapters(root, skip={"disc-first"})) == ["disc-second"]  # known ids: not checked again


def test_an_adapter_unloaded_after_discovery_stays_unloaded(loop, engine, make_adapter, tmp_path):
    """Unloading a discovered adapter (UnloadAdapter) is not undone by the next periodic sweep."""
    root = tmp_path / "root"
    make_adapter(root / "disc-unloaded")
    discovery = AdapterDiscovery(loop, root)
    assert discovery.sweep() == ["disc-unloaded"]
    loop.remove_adapter("disc-unloaded").result(30)
    assert not registered(engine, "disc-unloaded")
    assert discovery.sweep() == [] and not registered(engine, "disc-unloaded")


def test_an_id_already_registered_is_left_as_it_is(loop, engine, make_adapter, tmp_path):
    """An adapter loaded by an admin (LoadAdapter) under the same id keeps its version and source."""
    root = tmp_path / "root"
    other = make_adapter(tmp_path / "elsewhere")
    loop.add_adapter("disc-taken", other, eager=False)
    before = engine.lora.resolve("disc-taken")
    make_adapter(root / "disc-taken")
    make_adapter(root / "disc-free")
    assert AdapterDiscovery(loop, root).sweep() == ["disc-free"]
    after = engine.lora.resolve("disc-taken")
    assert (after.version, after.meta.source) == (before.version, before.meta.source)


def test_invalid_adapters_are_skipped_with_a_warning_and_the_rest_registered(loop, engine, make_adapter,
                                                                            tmp_path, caplog):
    root = tmp_path / "root"
    make_adapter(root / "disc-good")
    broken = make_adapter(root / "disc-broken-json")
    (broken / "adapter_config.json").write_text("{broken")
    shutil.copytree(ASSETS / "adapters" / "upper", root / "disc-other-model")  # for the 30-layer model
    no_weights = make_adapter(root / "disc-no-weights")
    (no_weights / "adapter_model.safetensors").unlink()
    with caplog.at_level(logging.WARNING, logger="loraplex_server.api.discovery"):
        added = AdapterDiscovery(loop, root).sweep()
    assert added == ["disc-good"]
    for name in ("disc-broken-json", "disc-other-model", "disc-no-weights"):
        assert not registered(engine, name)
        assert any("discovery skipped" in r.getMessage() and name in r.getMessage() for r in caplog.records), name


def test_the_root_itself_and_symlinks_out_of_it_are_not_adapters(loop, engine, make_adapter, tmp_path):
    root = make_adapter(tmp_path / "root")                  # a config in the root itself: no id
    outside = make_adapter(tmp_path / "outside" / "disc-secret")
    (root / "disc-escape").symlink_to(outside.parent)       # a directory link leading out of the root
    (root / "disc-escape-adapter").symlink_to(outside)
    make_adapter(root / "disc-inside")
    assert AdapterDiscovery(loop, root).sweep() == ["disc-inside"]
    assert not registered(engine, "") and not registered(engine, ".")
    assert not any(registered(engine, i) for i in ("disc-escape/disc-secret", "disc-escape-adapter"))


def test_a_directory_refused_while_being_copied_is_registered_once_complete(loop, engine, make_adapter,
                                                                             tmp_path, caplog):
    """The config lands before the weights (a copy in progress): refused, warned once, and
    registered by the first sweep after the weights arrive."""
    root = tmp_path / "root"
    complete = make_adapter(tmp_path / "complete")
    partial = root / "disc-copying"
    partial.mkdir(parents=True)
    shutil.copy(complete / "adapter_config.json", partial)
    discovery = AdapterDiscovery(loop, root)
    with caplog.at_level(logging.WARNING, logger="loraplex_server.api.discovery"):
        assert discovery.sweep() == []
        assert discovery.sweep() == []  # unchanged: not tried (nor warned about) again
    assert sum("disc-copying" in r.getMessage() for r in caplog.records) == 1
    assert not registered(engine, "disc-copying")
    shutil.copy(complete / "adapter_model.safetensors", partial)
    assert discovery.sweep() == ["disc-copying"]
    assert registered(engine, "disc-copying")
    assert discovery.sweep() == []
