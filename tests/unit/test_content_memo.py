"""Validation memo (lora/content_memo.py): adapters sharing a safetensors header and a config are
validated once, and nothing that differs in a validated byte (config, header, file size) is
ever served from another adapter's result."""

from __future__ import annotations

import json
import sys
from types import SimpleNamespace

import pytest

from helpers import BENCHMARKS
from loraplex_server.errors import AdapterLoadError
from loraplex_server.lora.adapter_files import CONFIG_FILE, WEIGHTS_FILE
from loraplex_server.lora.content_memo import ContentMemo
from loraplex_server.lora.loader import inspect_adapter
from loraplex_server.lora.registry import AdapterRegistry
from loraplex_server.lora.weights import ModuleKey, TargetShape
from loraplex_server.model.presets import PRESETS

sys.path.insert(0, str(BENCHMARKS))
from synthetic_adapters import module_shapes, write_adapter  # noqa: E402

TINY = SimpleNamespace(**{**PRESETS["smollm2-135m"], "num_hidden_layers": 2})


@pytest.fixture(scope="module")
def targets():
    shapes = module_shapes(TINY)
    return {ModuleKey(layer, name): TargetShape(*shapes[name]) for layer in range(TINY.num_hidden_layers)
            for name in shapes}


def test_memo_stores_results_lru_and_never_failures():
    memo = ContentMemo(capacity=2)
    assert memo.get_or_make("a", lambda: 1) == 1 and memo.get_or_make("a", lambda: 2) == 1
    memo.get_or_make("b", lambda: 3)
    memo.get_or_make("a", lambda: 0)  # a is now the most recent: c evicts b
    memo.get_or_make("c", lambda: 4)
    assert memo.get_or_make("b", lambda: 5) == 5 and (memo.hits, memo.misses) == (2, 4)

    def fail():
        raise ValueError("bad")
    with pytest.raises(ValueError):
        memo.get_or_make("d", fail)
    assert memo.get_or_make("d", lambda: 6) == 6


def test_distinct_files_with_one_layout_are_validated_once(tmp_path, targets):
    reg = AdapterRegistry(targets, max_rank=16, max_cpu_loras=2)
    paths = [write_adapter(tmp_path / f"a{i}", TINY, rank=4, seed=i) for i in range(3)]  # other weights
    versions = [reg.register(p.name, p) for p in paths]
    assert (reg.validated.misses, reg.validated.hits) == (3, 6)  # config, layout, both: once, then hits
    assert [v.meta.adapter_id for v in versions] == ["a0", "a1", "a2"]
    assert {v.meta.source for v in versions} == set(paths) and {v.meta.rank for v in versions} == {4}
    assert len({v.fingerprint.identity for v in versions}) == 3  # each file is still its own source


def test_a_shared_header_with_its_own_config_is_checked_on_its_own(tmp_path, targets):
    memo = ContentMemo()
    good = write_adapter(tmp_path / "good", TINY, rank=4)
    plan = inspect_adapter("good", good, targets, 16, memo=memo)
    liar = write_adapter(tmp_path / "liar", TINY, rank=4)  # same header bytes ...
    config = json.loads((liar / CONFIG_FILE).read_text())
    (liar / CONFIG_FILE).write_text(json.dumps({**config, "r": 8}))  # ... a config that disagrees
    with pytest.raises(AdapterLoadError, match="liar.*r=8 but the weights have rank 4"):
        inspect_adapter("liar", liar, targets, 16, memo=memo)
    other_alpha = write_adapter(tmp_path / "alpha", TINY, rank=4, alpha=2.0)
    scaled = inspect_adapter("alpha", other_alpha, targets, 16, memo=memo)
    assert set(plan.scales.values()) == {2.0} and set(scaled.scales.values()) == {0.5}


def test_the_same_header_in_a_shorter_file_is_refused(tmp_path, targets):
    memo = ContentMemo()
    whole = write_adapter(tmp_path / "whole", TINY, rank=4)
    inspect_adapter("whole", whole, targets, 16, memo=memo)
    cut = write_adapter(tmp_path / "cut", TINY, rank=4)
    data = (cut / WEIGHTS_FILE).read_bytes()
    (cut / WEIGHTS_FILE).write_bytes(data[:-16])  # header untouched, the last tensor short
    with pytest.raises(AdapterLoadError, match="cut.*outside the file"):
        inspect_adapter("cut", cut, targets, 16, memo=memo)


def test_a_larger_max_rank_is_its_own_entry(tmp_path, targets):
    memo = ContentMemo()
    path = write_adapter(tmp_path / "r8", TINY, rank=8)
    inspect_adapter("r8", path, targets, 16, memo=memo)
    with pytest.raises(AdapterLoadError, match="rank 8 exceeds max_lora_rank 4"):
        inspect_adapter("r8", path, targets, 4, memo=memo)
