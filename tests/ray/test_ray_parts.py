"""The Ray-free parts of the Serve deployment: statuses across the hop, the adapter catalog, which
adapters a replica holds, and the application's args. Fast; no Ray needed for most."""

from __future__ import annotations

import asyncio
import pickle
import subprocess
import sys
from pathlib import Path

import grpc
import pytest

from loraplex_server.config import Config, EngineConfig, LoraConfig, ModelConfig, ServerConfig
from loraplex_server.errors import AdapterNotFoundError
from loraplex_server.ray_serve.adapters import AdapterCatalog, LoadedAdapter, ReplicaAdapters
from loraplex_server.ray_serve.status import ForwardedContext, ReplicaStatusError, forwarded_metadata
from ray_support import FakeServeContext


# ---- statuses ------------------------------------------------------------------------------------
def test_status_survives_pickle_and_sets_serve_context():
    status = ReplicaStatusError("RESOURCE_EXHAUSTED", "tenant over its limit", (("retry-after-s", "3"),))
    again = pickle.loads(pickle.dumps(status))
    assert (again.code, again.details, again.trailing_metadata) == (status.code, status.details,
                                                                    status.trailing_metadata)
    context = FakeServeContext()
    again.apply(context)
    assert context.code is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert context.details == "tenant over its limit"
    assert context.trailing == [("retry-after-s", "3")]


def test_forwarded_context_abort_raises_the_status_with_trailing_metadata():
    context = ForwardedContext((("authorization", "Bearer k"),))
    assert context.invocation_metadata() == (("authorization", "Bearer k"),)
    context.set_trailing_metadata([("retry-after-s", "2")])
    with pytest.raises(ReplicaStatusError) as caught:
        asyncio.run(context.abort(grpc.StatusCode.NOT_FOUND, "adapter 'x' is not loaded"))
    assert caught.value.code == "NOT_FOUND"
    assert caught.value.trailing_metadata == (("retry-after-s", "2"),)


def test_forwarded_metadata_keeps_text_and_decodes_binary_values():
    context = FakeServeContext([("authorization", "Bearer k"), ("trace-bin", b"\x01a")])
    assert forwarded_metadata(context) == (("authorization", "Bearer k"), ("trace-bin", "\x01a"))
    assert forwarded_metadata(None) == ()


# ---- the catalog ---------------------------------------------------------------------------------
def _adapter_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    return path


def test_catalog_finds_named_and_rooted_adapters(tmp_path):
    _adapter_dir(tmp_path / "acme" / "sql")
    catalog = AdapterCatalog((("upper", "demo/upper"),), tmp_path)
    assert catalog.source_of("upper") == "demo/upper"
    assert catalog.source_of("acme/sql") == tmp_path / "acme" / "sql"


@pytest.mark.parametrize("adapter_id", ["missing", "acme", "../outside", "acme/../acme/sql", "/etc"])
def test_catalog_refuses_what_is_not_an_adapter_under_the_root(tmp_path, adapter_id):
    _adapter_dir(tmp_path / "root" / "acme" / "sql")
    _adapter_dir(tmp_path / "outside")  # a real adapter, but outside the root
    with pytest.raises(AdapterNotFoundError):
        AdapterCatalog((), tmp_path / "root").source_of(adapter_id)


def test_catalog_without_a_root_knows_only_named_adapters():
    with pytest.raises(AdapterNotFoundError):
        AdapterCatalog((), None).source_of("upper")


# ---- which adapters a replica holds --------------------------------------------------------------
def test_eviction_of_an_idle_adapter_unpublishes_it_now():
    unpublished = []
    adapters = ReplicaAdapters(unpublished.append)
    adapters.added("a")
    adapters.evict("a")
    assert unpublished == ["a"] and adapters.published() == []
    adapters.evict("a")  # already gone: nothing more
    assert unpublished == ["a"]


def test_eviction_waits_for_the_requests_holding_the_adapter():
    unpublished = []
    adapters = ReplicaAdapters(unpublished.append)
    adapters.added("a")
    with adapters.holding("a"):
        with adapters.holding("a"):
            adapters.evict("a")
        assert unpublished == [] and adapters.published() == ["a"]
    assert unpublished == ["a"] and adapters.published() == []


def test_an_adapter_loaded_again_before_its_deferred_eviction_stays():
    unpublished = []
    adapters = ReplicaAdapters(unpublished.append)
    adapters.added("a")
    with adapters.holding("a"):
        adapters.evict("a")
        assert adapters.keep("a")  # Serve's cache loads it again: keep the published version
    assert unpublished == [] and adapters.published() == ["a"]
    assert not adapters.keep("b")


def test_holding_the_base_model_is_a_no_op():
    adapters = ReplicaAdapters(lambda adapter_id: None)
    with adapters.holding(""):
        pass
    assert adapters.published() == []


def test_loaded_adapter_evicts_once_though_del_runs_twice():
    unpublished = []
    adapters = ReplicaAdapters(unpublished.append)
    adapters.added("a")
    loaded = LoadedAdapter("a", adapters)
    loaded.__del__()  # Serve's LRU
    loaded.__del__()  # the garbage collector, later
    adapters.added("a")
    del loaded
    assert unpublished == ["a"] and adapters.published() == ["a"]


# ---- the application's args (imports Ray) --------------------------------------------------------
def test_app_args_parse_and_refuse_bad_values():
    app = pytest.importorskip("loraplex_server.ray_serve.app", reason="needs the ray extra")
    assert app.AppArgs.parse({"adapters_per_replica": 3}).adapters_per_replica == 3
    assert app.AppArgs.parse(None) == app.AppArgs()
    with pytest.raises(ValueError, match="unknown application args"):
        app.AppArgs.parse({"adapters": 3})
    for bad in (0, -1, "4", True):
        with pytest.raises(ValueError, match="adapters_per_replica"):
            app.AppArgs.parse({"adapters_per_replica": bad})


def test_relative_paths_become_absolute_where_the_app_is_built(tmp_path, monkeypatch):
    app = pytest.importorskip("loraplex_server.ray_serve.app", reason="needs the ray extra")
    (tmp_path / "models" / "m").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    engine = EngineConfig(model=ModelConfig(model="models/m"), lora=LoraConfig(adapter_root=Path("ad")))
    config = Config(engine=engine, server=ServerConfig(keys_file=Path("keys.toml")))
    fixed = app.absolute_paths(config)
    assert fixed.engine.model.model == str(tmp_path / "models" / "m")
    assert fixed.engine.lora.adapter_root == tmp_path / "ad"
    assert fixed.server.keys_file == tmp_path / "keys.toml"
    preset = Config(engine=EngineConfig(model=ModelConfig(model="llama-3-8b", load_format="dummy")))
    assert app.absolute_paths(preset).engine.model.model == "llama-3-8b"  # a preset name, not a path


def test_build_app_reads_the_config_file(tmp_path):
    app = pytest.importorskip("loraplex_server.ray_serve.app", reason="needs the ray extra")
    from ray.serve import Application

    good = tmp_path / "good.toml"
    good.write_text('[lora]\nadapter_root = "adapters"\n[model]\nthreads = 1\n')
    assert isinstance(app.build_app({"config_file": str(good)}), Application)
    bad = tmp_path / "bad.toml"
    bad.write_text("[lorra]\nmax_loras = 2\n")
    with pytest.raises(ValueError, match="unknown section"):
        app.build_app({"config_file": str(bad)})


def test_without_ray_the_app_names_the_extra_to_install():
    code = ("import sys; sys.modules['ray'] = None\n"
            "try:\n    import loraplex_server.ray_serve.app\nexcept ImportError as exc:\n    print(exc)\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert "pip install 'loraplex-server[ray]'" in result.stdout, result.stderr
