"""API-key store: hashing and lookup, Bearer parsing, open mode, reload on change, keys-file validation."""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import threading
from pathlib import Path

import pytest

from helpers import FakeClock, key_entry
from loraplex_server.api.auth import KeyStore, bearer_token, hash_key
from loraplex_server.tenancy import (
    OPEN_PRINCIPAL,
    AuthenticationError,
    Principal,
    TenantLimits,
)

ROOT = Path(__file__).resolve().parents[2]
ACME_KEY = "acme-secret-key-0123456789"
ADMIN_KEY = "admin-secret-key-9876543210"
NEW_KEY = "brand-new-secret-key-55555"


BASE_FILE = (key_entry(ACME_KEY, "acme") + key_entry(ADMIN_KEY, "ops", "admin")
             + "[tenants.acme]\nmax_concurrent = 8\nmax_queued = 32\ntokens_per_minute = 60000\nweight = 2.5\n")


def auth(key: str) -> list[tuple[str, str]]:
    return [("user-agent", "grpc-python"), ("authorization", f"Bearer {key}")]


def write(path: Path, text: str, bump_s: int = 0) -> None:
    """Write ``text`` and move the mtime ``bump_s`` seconds past the previous one (coarse-mtime safe)."""
    old = path.stat().st_mtime_ns if path.exists() else None
    path.write_text(text)
    if old is not None:
        new = old + bump_s * 1_000_000_000
        os.utime(path, ns=(new, new))


@pytest.fixture
def keys_file(tmp_path) -> Path:
    path = tmp_path / "keys.toml"
    path.write_text(BASE_FILE)
    return path


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def store(keys_file, clock) -> KeyStore:
    return KeyStore(keys_file, clock=clock, check_interval_s=1.0)


def test_hash_key_is_sha256_hex():
    assert hash_key("abc") == hashlib.sha256(b"abc").hexdigest() == (
        "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")


def test_known_keys_map_to_their_principals(store):
    assert not store.open_mode
    assert store.authenticate(auth(ACME_KEY)) == Principal("acme", "tenant")
    admin = store.authenticate(auth(ADMIN_KEY))
    assert admin == Principal("ops", "admin") and admin.is_admin
    assert not store.authenticate(auth(ACME_KEY)).is_admin


def test_uppercase_hash_in_file_matches(tmp_path):
    path = tmp_path / "k.toml"
    path.write_text(key_entry(ACME_KEY, "acme").replace(hash_key(ACME_KEY), hash_key(ACME_KEY).upper()))
    assert KeyStore(path).authenticate(auth(ACME_KEY)).tenant == "acme"


@pytest.mark.parametrize("metadata", [
    [("Authorization", f"Bearer {ACME_KEY}")],
    [("AUTHORIZATION", f"Bearer {ACME_KEY}")],
    (("x-request-id", "r1"), ("authorization", f"Bearer {ACME_KEY}"), ("x-other", "v")),
])
def test_bearer_header_name_is_case_insensitive(store, metadata):
    assert bearer_token(metadata) == ACME_KEY
    assert store.authenticate(metadata).tenant == "acme"


@pytest.mark.parametrize("metadata", [
    None,
    [],
    [("x-api-key", ACME_KEY)],
    [("authorization", ACME_KEY)],
    [("authorization", f"bearer {ACME_KEY}")],
    [("authorization", f"BEARER {ACME_KEY}")],
    [("authorization", f"Basic {ACME_KEY}")],
    [("authorization", "Bearer")],
    [("authorization", "Bearer ")],
    [("authorization", f"Bearer  {ACME_KEY}")],
    [("authorization", f"Bearer {ACME_KEY} ")],
    [("authorization", f"Bearer {ACME_KEY} extra")],
    [("authorization", f"Bearer {ACME_KEY}\n")],
    [("authorization", f"Bearer {ACME_KEY}".encode())],
    [("authorization", f"Bearer {ACME_KEY}"), ("authorization", f"Bearer {ACME_KEY}")],
])
def test_missing_or_malformed_authorization_is_unauthenticated(store, metadata):
    with pytest.raises(AuthenticationError) as info:
        store.authenticate(metadata)
    assert ACME_KEY not in str(info.value) and ACME_KEY not in repr(info.value)


def test_unknown_key_is_rejected_without_echoing_it(store, caplog):
    secret = "totally-unknown-key-XYZ123"
    with caplog.at_level(logging.DEBUG):
        with pytest.raises(AuthenticationError, match="unknown API key") as info:
            store.authenticate(auth(secret))
    assert secret not in str(info.value) and secret not in repr(info.value.args)
    assert hash_key(secret) not in str(info.value)
    assert secret not in caplog.text


def test_open_mode_lets_everyone_in(tmp_path):
    store = KeyStore(None)
    assert store.open_mode and store.path is None
    for metadata in (None, [], auth("anything"), [("authorization", "garbage")]):
        assert store.authenticate(metadata) is OPEN_PRINCIPAL
    assert OPEN_PRINCIPAL == Principal("default", "admin") and OPEN_PRINCIPAL.is_admin
    assert store.limits_for("default") == TenantLimits()
    assert store.maybe_reload() is False
    store.reload()  # no-op


def test_limits_for_configured_and_default(store):
    assert store.limits_for("acme") == TenantLimits(max_concurrent=8, max_queued=32, tokens_per_minute=60000,
                                                    weight=2.5)
    default = store.limits_for("ops")
    assert default == TenantLimits() and default.max_concurrent is None and default.weight == 1.0
    assert store.limits_for("nobody").tokens_per_minute is None


def test_reload_on_file_change_after_check_interval(store, keys_file, clock):
    write(keys_file, key_entry(NEW_KEY, "newco") + key_entry(ADMIN_KEY, "ops", "admin"), bump_s=5)
    clock.t += 0.5  # within check_interval_s: the old keys still apply
    assert store.authenticate(auth(ACME_KEY)).tenant == "acme"
    with pytest.raises(AuthenticationError):
        store.authenticate(auth(NEW_KEY))
    clock.t += 0.6
    assert store.authenticate(auth(NEW_KEY)) == Principal("newco", "tenant")
    with pytest.raises(AuthenticationError):
        store.authenticate(auth(ACME_KEY))  # revoked by the edit
    assert store.limits_for("acme") == TenantLimits()  # its limits table is gone too


def test_maybe_reload_only_when_stamp_changes(store, keys_file, clock):
    clock.t += 10
    assert store.maybe_reload() is False  # unchanged file
    write(keys_file, BASE_FILE.replace("max_concurrent = 8", "max_concurrent = 3"), bump_s=5)
    assert store.maybe_reload() is False  # checked 0 s ago
    clock.t += 1
    assert store.maybe_reload() is True
    assert store.limits_for("acme").max_concurrent == 3
    clock.t += 1
    assert store.maybe_reload() is False


def test_explicit_reload_ignores_interval(store, keys_file):
    write(keys_file, key_entry(NEW_KEY, "newco"), bump_s=5)
    store.reload()
    assert store.authenticate(auth(NEW_KEY)).tenant == "newco"


def test_bad_file_keeps_previous_keys_and_logs_once(store, keys_file, clock, caplog):
    write(keys_file, BASE_FILE + '[[keys]]\nsha256 = "nothex"\ntenant = "x"\nrole = "tenant"\n', bump_s=5)
    clock.t += 1
    with caplog.at_level(logging.ERROR, logger="loraplex_server.api.auth"):
        assert store.authenticate(auth(ACME_KEY)).tenant == "acme"
        clock.t += 1
        assert store.authenticate(auth(ADMIN_KEY)).tenant == "ops"
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "keys[2].sha256" in errors[0].getMessage()
    with pytest.raises(ValueError, match=r"keys\.toml.*keys\[2\]\.sha256"):
        store.reload()
    assert store.authenticate(auth(ACME_KEY)).tenant == "acme"
    write(keys_file, "this is = = not toml", bump_s=5)
    clock.t += 1
    assert store.maybe_reload() is False and store.authenticate(auth(ACME_KEY)).tenant == "acme"
    write(keys_file, key_entry(NEW_KEY, "newco"), bump_s=5)  # fixed: picked up again
    clock.t += 1
    assert store.maybe_reload() is True and store.authenticate(auth(NEW_KEY)).tenant == "newco"


def test_missing_file_keeps_previous_keys(store, keys_file, clock):
    keys_file.unlink()
    clock.t += 1
    assert store.maybe_reload() is False
    assert store.authenticate(auth(ACME_KEY)).tenant == "acme"
    with pytest.raises(OSError):
        store.reload()
    assert store.authenticate(auth(ACME_KEY)).tenant == "acme"


def test_bad_or_missing_file_at_start_fails(tmp_path):
    with pytest.raises(OSError):
        KeyStore(tmp_path / "absent.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text(key_entry(ACME_KEY, "acme").replace('"tenant"\n', '"root"\n'))
    with pytest.raises(ValueError, match="unknown role 'root'"):
        KeyStore(bad)


H1, H2 = hash_key("k1"), hash_key("k2")


@pytest.mark.parametrize("text, problem", [
    (f'[[keys]]\nsha256 = "{H1}"\ntenant = "a"\nrole = "superuser"\n', r"keys\[0\]\.role: unknown role 'superuser'"),
    (f'[[keys]]\nsha256 = "{H1[:63]}"\ntenant = "a"\nrole = "tenant"\n', r"keys\[0\]\.sha256: not a sha256"),
    (f'[[keys]]\nsha256 = "{H1[:63]}g"\ntenant = "a"\nrole = "tenant"\n', r"keys\[0\]\.sha256: not a sha256"),
    (f'[[keys]]\nsha256 = "{H1}0"\ntenant = "a"\nrole = "tenant"\n', r"keys\[0\]\.sha256: not a sha256"),
    ('[[keys]]\nsha256 = 5\ntenant = "a"\nrole = "tenant"\n', r"keys\[0\]\.sha256: not a sha256"),
    (f'[[keys]]\nsha256 = "{H1}"\ntenant = "a"\nrole = "tenant"\n'
     f'[[keys]]\nsha256 = "{H2}"\ntenant = "b"\nrole = "tenant"\n'
     f'[[keys]]\nsha256 = "{H1.upper()}"\ntenant = "c"\nrole = "admin"\n',
     r"keys\[2\]\.sha256: duplicate of keys\[0\]"),
    (f'[[keys]]\nsha256 = "{H1}"\ntenant = "Acme"\nrole = "tenant"\n',
     r"keys\[0\]\.tenant: invalid tenant name 'Acme'"),
    (f'[[keys]]\nsha256 = "{H1}"\ntenant = "-acme"\nrole = "tenant"\n', r"invalid tenant name '-acme'"),
    (f'[[keys]]\nsha256 = "{H1}"\ntenant = "{"a" * 64}"\nrole = "tenant"\n', r"invalid tenant name"),
    (f'[[keys]]\nsha256 = "{H1}"\ntenant = "a.b"\nrole = "tenant"\n', r"invalid tenant name 'a\.b'"),
    (f'[[keys]]\nsha256 = "{H1}"\ntenant = "a\\n"\nrole = "tenant"\n', r"invalid tenant name 'a\\n'"),
    (f'[[keys]]\nsha256 = "{H1}\\n"\ntenant = "a"\nrole = "tenant"\n', r"keys\[0\]\.sha256: not a sha256"),
    (f'[[keys]]\nsha256 = "{H1}"\ntenant = "a"\n', r"keys\[0\]: missing field\(s\) \['role'\]"),
    (f'[[keys]]\nsha256 = "{H1}"\ntenant = "a"\nrole = "tenant"\nrloe = "x"\n', r"unknown field\(s\) \['rloe'\]"),
    ('keys = "nope"\n', r"keys: expected an array"),
    ('[[key]]\ntenant = "a"\n', r"unknown top-level key\(s\) \['key'\]"),
    ('[tenants.Big]\nweight = 1.0\n', r"tenants\.Big: invalid tenant name 'Big'"),
    ('[tenants.a]\nmax_concurent = 3\n', r"tenants\.a: unknown field\(s\) \['max_concurent'\]"),
    ('[tenants.a]\nmax_concurrent = 0\n', r"tenants\.a: max_concurrent must be a positive integer"),
    ('[tenants.a]\nmax_queued = -1\n', r"tenants\.a: max_queued must be a positive integer"),
    ('[tenants.a]\ntokens_per_minute = "lots"\n', r"tokens_per_minute must be a positive integer"),
    ('[tenants.a]\nmax_concurrent = true\n', r"max_concurrent must be a positive integer"),
    ('[tenants.a]\nweight = 0\n', r"tenants\.a: weight must be a finite number > 0"),
    ('[tenants.a]\nweight = inf\n', r"weight must be a finite number > 0"),
    ('[tenants]\na = 3\n', r"tenants\.a: expected a table"),
    ('[[keys]\n', r"keys file .*"),  # TOML syntax error
])
def test_invalid_keys_files_are_rejected_naming_the_problem(tmp_path, text, problem):
    path = tmp_path / "keys.toml"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        KeyStore(path)


def test_valid_edge_cases_load(tmp_path):
    path = tmp_path / "keys.toml"
    path.write_text(key_entry("k1", "a" * 63) + key_entry("k2", "0_x-y", "admin")
                    + "[tenants.idle]\nweight = 3\n")  # limits for a tenant without keys are fine
    store = KeyStore(path)
    assert store.authenticate(auth("k1")).tenant == "a" * 63
    assert store.authenticate(auth("k2")) == Principal("0_x-y", "admin")
    assert store.limits_for("idle") == TenantLimits(weight=3.0)


def test_empty_keys_file_rejects_everyone(tmp_path, caplog):
    path = tmp_path / "keys.toml"
    path.write_text("")
    with caplog.at_level(logging.WARNING, logger="loraplex_server.api.auth"):
        store = KeyStore(path)
    assert "no [[keys]] entries" in caplog.text
    with pytest.raises(AuthenticationError):
        store.authenticate(auth(ACME_KEY))


def test_raw_key_pasted_as_hash_is_not_echoed(tmp_path):
    secret = "s" * 64  # 64 chars but not hex: someone pasted a key instead of its hash
    path = tmp_path / "keys.toml"
    path.write_text(f'[[keys]]\nsha256 = "{secret}"\ntenant = "a"\nrole = "tenant"\n')
    with pytest.raises(ValueError) as info:
        KeyStore(path)
    assert secret not in str(info.value)


def test_concurrent_authenticate_during_reloads(store, keys_file, clock):
    errors: list[BaseException] = []
    versions = [BASE_FILE, BASE_FILE + key_entry(NEW_KEY, "newco")]

    def reader():
        try:
            for _ in range(300):
                assert store.authenticate(auth(ACME_KEY)).tenant == "acme"
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=reader) for _ in range(4)]
    for t in threads:
        t.start()
    for i in range(20):
        tmp = keys_file.with_suffix(".tmp")
        tmp.write_text(versions[i % 2])
        os.replace(tmp, keys_file)  # atomic swap, as a secret mount or editor would
        store.reload()
    for t in threads:
        t.join()
    assert not errors


def test_a_principal_is_an_admin_or_a_tenant():
    assert Principal("ops", "admin").is_admin and not Principal("acme", "tenant").is_admin
    with pytest.raises(ValueError):
        Principal("acme", "root")


def load_script():
    spec = importlib.util.spec_from_file_location("hash_api_key", ROOT / "scripts" / "hash_api_key.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hash_script_new_key_block_authenticates(tmp_path, capsys):
    script = load_script()
    assert script.main(["--new", "--tenant", "acme", "--role", "admin"]) == 0
    out = capsys.readouterr().out
    key = out.splitlines()[0].rsplit(" ", 1)[1]
    block = out[out.index("[[keys]]"):]
    path = tmp_path / "keys.toml"
    path.write_text(block)
    assert KeyStore(path).authenticate(auth(key)) == Principal("acme", "admin")
    assert script.main([f"--key={key}"]) == 0  # a generated key may start with "-"
    assert capsys.readouterr().out.strip() == hash_key(key)


def test_hash_script_reads_stdin(monkeypatch, capsys):
    script = load_script()
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("abc\n"))
    assert script.main([]) == 0
    assert capsys.readouterr().out.strip() == hash_key("abc")
    monkeypatch.setattr("sys.stdin", __import__("io").StringIO("has space\n"))
    assert script.main([]) == 2
