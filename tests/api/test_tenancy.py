"""Tenants over real gRPC: authentication, adapter isolation, namespaces, limits, key reload."""

from __future__ import annotations

import functools
import os
import threading
import time

import grpc
import pytest

from helpers import ASSETS, FakeClock, key_entry
from loraplex import Client
from loraplex import errors as cerr
from loraplex_server.api.auth import KeyStore

KEYS = {"admin": "admin-key-0123456789", "acme": "acme-key-0123456789", "beta": "beta-key-0123456789"}


def keys_toml(extra: str = "") -> str:
    entries = "".join(key_entry(k, t, "admin" if t == "admin" else "tenant") for t, k in KEYS.items())
    return entries + extra + "[tenants.beta]\nmax_concurrent = 1\ntokens_per_minute = 30\n"


@pytest.fixture
def keys_clock(monkeypatch) -> FakeClock:
    """The clock of every KeyStore made while the test runs (the server's too): the keys file is
    re-checked only when the test moves it on."""
    clock = FakeClock()
    monkeypatch.setattr(KeyStore, "__init__", functools.partialmethod(KeyStore.__init__, clock=clock))
    return clock


@pytest.fixture
def tenant_server(start_server, tmp_path, keys_clock):
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(keys_toml())
    srv = start_server(ASSETS / "adapters", adapters=[("upper", "upper")], max_loras=3, max_rank=16,
                       server_overrides=dict(keys_file=keys_file))
    srv.keys_file = keys_file
    return srv


def client(srv, tenant=None, key=None):
    return Client(srv.target, timeout=60, retries=0, api_key=key or (KEYS[tenant] if tenant else None))


def test_unauthenticated_calls_are_refused(tenant_server):
    with client(tenant_server) as anon, pytest.raises(cerr.PermissionDeniedError) as exc:
        anon.generate("hi")
    assert exc.value.code is grpc.StatusCode.UNAUTHENTICATED
    with client(tenant_server, key="not-a-real-key") as bad, pytest.raises(cerr.PermissionDeniedError):
        bad.list_adapters()
    with client(tenant_server) as anon:
        assert anon.health() == "SERVING"  # probes need no key


def test_tenants_are_isolated(tenant_server):
    with client(tenant_server, "acme") as acme, client(tenant_server, "beta") as beta, \
            client(tenant_server, "admin") as admin:
        info = acme.load_adapter("acme/json", "json")
        assert info.owner == "acme"
        assert acme.generate(messages=[("user", "Hi")], adapter_id="acme/json", max_new_tokens=4).text.startswith("{")
        with pytest.raises(cerr.NotFoundError):  # no existence leak
            beta.generate("Hi", adapter_id="acme/json")
        assert {a.adapter_id for a in beta.list_adapters()} == {"upper"}
        assert {a.adapter_id for a in acme.list_adapters()} == {"upper", "acme/json"}
        assert {a.adapter_id for a in admin.list_adapters()} == {"upper", "acme/json"}
        for hidden in ("acme/json", "acme/does-not-exist"):  # same answer whether it exists or not
            with pytest.raises(cerr.PermissionDeniedError):
                beta.unload_adapter(hidden)
            with pytest.raises(cerr.PermissionDeniedError):
                beta.load_adapter(hidden, "upper")
        with pytest.raises(cerr.PermissionDeniedError):
            beta.load_adapter("public-one", "upper")  # only admins publish public adapters
        with pytest.raises(cerr.PermissionDeniedError):
            beta.unload_adapter("upper")
        assert beta.generate("Hi", adapter_id="upper", max_new_tokens=2).usage.completion_tokens == 2
        assert acme.generate(messages=[("user", "Hi")], adapter_id="acme/json", max_new_tokens=2)
        admin.unload_adapter("acme/json")
        with pytest.raises(cerr.NotFoundError):
            acme.generate("Hi", adapter_id="acme/json")


def test_per_tenant_limits_answer_resource_exhausted_with_a_retry_hint(tenant_server):
    with client(tenant_server, "beta") as beta, client(tenant_server, "acme") as acme:
        stream = beta.generate_stream("Count:", max_new_tokens=25, ignore_eos=True)
        next(stream)
        with pytest.raises(cerr.ResourceExhaustedError) as exc:  # max_concurrent = 1
            beta.generate("again", max_new_tokens=1)
        assert exc.value.retry_after and exc.value.retry_after > 0
        assert acme.generate("other tenant", max_new_tokens=2).usage.completion_tokens == 2  # unaffected
        list(stream)
        beta.generate("more", max_new_tokens=8, ignore_eos=True)  # 25 + 8 > 30 tokens per minute
        with pytest.raises(cerr.ResourceExhaustedError) as exc:
            beta.generate("over budget", max_new_tokens=1)
        assert 0 < exc.value.retry_after <= 61


def test_keys_file_reloads_without_restart(tenant_server, keys_clock):
    """The server re-reads an edited keys file on a call once its check interval (1 s) has passed
    on the KeyStore's clock, and not before."""
    new_key = "gamma-key-0123456789"
    extra = key_entry(new_key, "gamma")
    with client(tenant_server, key=new_key) as gamma:
        with pytest.raises(cerr.PermissionDeniedError):
            gamma.list_adapters()
        tenant_server.keys_file.write_text(keys_toml(extra))
        stat = tenant_server.keys_file.stat()
        os.utime(tenant_server.keys_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
        keys_clock.t += 0.9
        with pytest.raises(cerr.PermissionDeniedError):  # checked 0.9 s ago: the old keys still rule
            gamma.list_adapters()
        keys_clock.t += 0.1
        assert {a.adapter_id for a in gamma.list_adapters()} == {"upper"}


def test_per_tenant_queue_cap(start_server, tmp_path):
    keys_file = tmp_path / "keys.toml"
    keys_file.write_text(keys_toml("[tenants.acme]\nmax_queued = 1\n"))
    srv = start_server(ASSETS / "adapters", max_seqs=1, server_overrides=dict(keys_file=keys_file))
    with client(srv, "acme") as acme, client(srv, "admin") as admin:
        running = acme.generate_stream("Count:", max_new_tokens=60, ignore_eos=True)
        next(running)  # occupies the only running slot
        queued = acme.generate_stream("Wait:", max_new_tokens=2)
        done = threading.Thread(target=lambda: list(queued))
        done.start()
        deadline = time.monotonic() + 10
        while srv.server.state.limiter.queued("acme") < 1 and time.monotonic() < deadline:
            time.sleep(0.02)
        with pytest.raises(cerr.ResourceExhaustedError, match="queued"):
            acme.generate("one too many", max_new_tokens=1)
        assert srv.server.state.limiter.queued("admin") == 0
        running.close()
        done.join(30)
        assert admin.generate("fine", max_new_tokens=1).usage.completion_tokens == 1
