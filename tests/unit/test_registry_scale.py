"""Many registered adapters: what a lazy registration costs in host memory (tracemalloc, a fixed
bound), that it reads no tensor data, and that its deferred sha256 still refuses a changed source."""

from __future__ import annotations

import hashlib
import os
import sys
import tracemalloc
from types import SimpleNamespace

import pytest

from helpers import BENCHMARKS
from loraplex_server.lora.adapter_files import WEIGHTS_FILE
from loraplex_server.lora.registry import AdapterRegistry
from loraplex_server.lora.weights import ModuleKey, TargetShape
from loraplex_server.model.presets import PRESETS

sys.path.insert(0, str(BENCHMARKS))
from synthetic_adapters import module_shapes, write_adapter, write_linked_pool  # noqa: E402

SMOLLM2 = SimpleNamespace(**PRESETS["smollm2-135m"])  # 30 layers: 420 tensors in each header
MAX_BYTES_PER_ADAPTER = 3 * 1024  # measured ~1.1 KB (AdapterVersion, meta, fingerprint, path, dict entries)


@pytest.fixture(scope="module")
def targets():
    shapes = module_shapes(SMOLLM2)
    return {ModuleKey(layer, name): TargetShape(*shapes[name]) for layer in range(SMOLLM2.num_hidden_layers)
            for name in shapes}


def wait_loaded(reg, key):
    reg.ensure_loading(key)
    reg._loading[key].result(30)


def test_a_lazy_registration_costs_a_bounded_few_kb_of_host_memory(tmp_path, targets):
    n = 200
    paths = write_linked_pool(tmp_path / "pool", SMOLLM2, n + 20, rank=4, distinct=2)
    reg = AdapterRegistry(targets, max_rank=16, max_cpu_loras=4)
    for path in paths[:20]:  # first-call costs (regex cache, dict growth) before measuring
        reg.register(path.name, path)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for path in paths[20:]:
            reg.register(path.name, path)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert len(reg.adapter_ids) == n + 20 and reg.num_in_cpu_cache == 0
    assert grown / n < MAX_BYTES_PER_ADAPTER, f"{grown / n:.0f} bytes per registered adapter"


def test_a_lazy_registration_reads_the_header_not_the_tensor_data(tmp_path, targets):
    path = write_adapter(tmp_path / "a", SMOLLM2, rank=4)
    weights = path / WEIGHTS_FILE
    with open(weights, "r+b") as f:  # clobber the tensor data (not the header): only a full read sees it
        size = os.path.getsize(weights)
        f.seek(size - 64)
        f.write(b"\xff" * 64)  # NaN bytes in the last tensor
    reg = AdapterRegistry(targets, max_rank=16, max_cpu_loras=4)
    version = reg.register("a", path)
    fp = version.fingerprint
    assert fp.sha256 is None and fp.size_bytes == size + (path / "adapter_config.json").stat().st_size
    wait_loaded(reg, version.key)
    assert "NaN or Inf" in reg.failure(version.key)  # the full read validates the data


def test_the_first_full_read_pins_the_sha256(tmp_path, targets):
    path = write_adapter(tmp_path / "a", SMOLLM2, rank=4)
    reg = AdapterRegistry(targets, max_rank=16, max_cpu_loras=4)
    version = reg.register("a", path)
    wait_loaded(reg, version.key)
    config, weights = (path / "adapter_config.json").read_bytes(), (path / WEIGHTS_FILE).read_bytes()
    assert reg.ready(version.key)
    assert version.fingerprint.sha256 == hashlib.sha256(len(config).to_bytes(8, "little") + config
                                                        + weights).hexdigest()


def _rewrite_keeping_size_and_mtime(path, seed):
    """Other bytes of the same size in the same inode, with the old mtime put back."""
    weights = path / WEIGHTS_FILE
    old = weights.stat()
    other = write_adapter(path.parent / f"other{seed}", SMOLLM2, rank=4, seed=seed) / WEIGHTS_FILE
    data = other.read_bytes()
    assert len(data) == old.st_size
    weights.write_bytes(data)
    os.utime(weights, ns=(old.st_atime_ns, old.st_mtime_ns))


@pytest.mark.parametrize("change", ["replaced", "rewritten"])
def test_a_source_changed_before_its_first_read_is_refused(tmp_path, targets, change):
    path = write_adapter(tmp_path / "a", SMOLLM2, rank=4)
    reg = AdapterRegistry(targets, max_rank=16, max_cpu_loras=4)
    version = reg.register("a", path)
    if change == "replaced":  # same size and mtime, another inode (an atomic rename over it)
        other = write_adapter(tmp_path / "b", SMOLLM2, rank=4, seed=1) / WEIGHTS_FILE
        mtime = (path / WEIGHTS_FILE).stat().st_mtime_ns
        os.utime(other, ns=(mtime, mtime))
        os.replace(other, path / WEIGHTS_FILE)
    else:
        (path / WEIGHTS_FILE).write_bytes((path / WEIGHTS_FILE).read_bytes()[:-4] + b"\0\0\0\0")
    wait_loaded(reg, version.key)
    assert not reg.ready(version.key) and "changed since LoadAdapter" in reg.failure(version.key)


def test_after_the_first_read_a_change_is_caught_by_its_sha256(tmp_path, targets):
    path = write_adapter(tmp_path / "a", SMOLLM2, rank=4)
    reg = AdapterRegistry(targets, max_rank=16, max_cpu_loras=1)
    version = reg.register("a", path)
    wait_loaded(reg, version.key)
    wait_loaded(reg, reg.register("b", write_adapter(tmp_path / "b", SMOLLM2, rank=4, seed=2)).key)
    assert not reg.ready(version.key)  # evicted from the one-adapter CPU cache
    _rewrite_keeping_size_and_mtime(path, seed=3)
    wait_loaded(reg, version.key)
    assert not reg.ready(version.key) and "changed since LoadAdapter (sha256" in reg.failure(version.key)
