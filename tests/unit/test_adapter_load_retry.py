"""Adapter loads: transient read errors retried with bounded backoff (injected sleeper), validation
failures not; the retry state in ListAdapters' AdapterInfo; files read once with a fingerprint; a
source rewritten in place is not served under the old version."""

from __future__ import annotations

import hashlib
import threading

import grpc
import pytest

from loraplex_server.api.errors import status_for
from loraplex_server.errors import AdapterLoadError, AdapterSourceUnavailableError
from loraplex_server.lora.loader import load_adapter
from loraplex_server.lora.registry import AdapterRegistry, RetryPolicy

from test_adapter_loader import save, targets  # noqa: F401 - fixture and builder


class FlakyLoad:
    """load_fn failing ``failures`` times with ``error`` before reading for real."""

    def __init__(self, failures: int, error: Exception):
        self.failures, self.error, self.calls = failures, error, 0

    def __call__(self, *args):
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return load_adapter(*args)


def registry(targets, load_fn, sleeps, attempts=3):
    return AdapterRegistry(targets, max_rank=16, max_cpu_loras=4, load_fn=load_fn,
                           retry=RetryPolicy(attempts=attempts, base_delay_s=0.1, max_delay_s=0.3), sleep=sleeps.append)


def test_a_transient_read_error_is_retried_with_backoff(tmp_path, targets):
    sleeps = []
    load = FlakyLoad(2, OSError(5, "Input/output error"))
    version = registry(targets, load, sleeps).register("a", save(tmp_path), eager=True)
    assert load.calls == 3 and sleeps == [0.1, 0.2] and version.version == 1


def test_retries_are_bounded_and_end_unavailable(tmp_path, targets):
    sleeps = []
    load = FlakyLoad(99, FileNotFoundError(2, "vanished mid-read"))
    reg = registry(targets, load, sleeps, attempts=4)
    with pytest.raises(AdapterSourceUnavailableError, match="vanished mid-read") as info:
        reg.register("a", save(tmp_path), eager=True)
    assert load.calls == 4 and sleeps == [0.1, 0.2, 0.3]  # capped at max_delay_s
    assert status_for(info.value) is grpc.StatusCode.UNAVAILABLE and "a" not in reg


def test_a_validation_failure_is_not_retried(tmp_path, targets):
    sleeps = []
    load = FlakyLoad(99, AdapterLoadError("a", "weights contain NaN or Inf"))
    with pytest.raises(AdapterLoadError, match="NaN"):
        registry(targets, load, sleeps).register("a", save(tmp_path), eager=True)
    assert load.calls == 1 and sleeps == []


def test_the_background_retry_state_is_visible_while_it_waits(tmp_path, targets):
    waiting, resume = threading.Event(), threading.Event()

    def sleep(seconds):
        waiting.set()
        assert resume.wait(30)
    load = FlakyLoad(1, TimeoutError(110, "nfs timeout"))
    reg = AdapterRegistry(targets, max_rank=16, max_cpu_loras=4, load_fn=load, sleep=sleep)
    key = reg.register("a", save(tmp_path)).key  # lazy: the weights load in the background
    reg.ensure_loading(key)
    assert waiting.wait(30)
    state = reg.load_state(key)
    assert (state.attempts, state.retrying) == (1, True) and "nfs timeout" in state.last_error
    assert reg.failure(key) is None  # not failed: retrying
    resume.set()
    reg._loading[key].result(30)
    state = reg.load_state(key)
    assert reg.ready(key) and (state.attempts, state.retrying) == (2, False)


def test_files_are_fingerprinted_as_read(tmp_path, targets):
    path = save(tmp_path)
    weights = load_adapter("a", path, targets, 16)
    config, tensors = (path / "adapter_config.json").read_bytes(), (path / "adapter_model.safetensors").read_bytes()
    expected = hashlib.sha256(len(config).to_bytes(8, "little") + config + tensors).hexdigest()
    fp = weights.fingerprint
    assert fp.sha256 == expected and fp.size_bytes == len(config) + len(tensors)
    assert fp.mtime == max((path / n).stat().st_mtime for n in ("adapter_config.json", "adapter_model.safetensors"))


def test_a_source_rewritten_in_place_is_not_served_under_the_old_version(tmp_path, targets):
    path = save(tmp_path, "a", r=4)
    reg = AdapterRegistry(targets, max_rank=16, max_cpu_loras=4)
    old = reg.register("a", path)  # lazy: fingerprinted, weights not yet read
    for name in ("adapter_config.json", "adapter_model.safetensors"):  # rewritten in place, same path
        (path / name).write_bytes((save(tmp_path, "b", r=8) / name).read_bytes())
    reg.ensure_loading(old.key)
    reg._loading[old.key].result(30)
    assert not reg.ready(old.key) and "changed since LoadAdapter" in reg.failure(old.key)
    new = reg.register("a", path)  # LoadAdapter again re-reads: the new files serve
    reg.ensure_loading(new.key)
    reg._loading[new.key].result(30)
    assert reg.ready(new.key) and reg.cached(new.key).rank == 8
