"""API-key authentication from a reloadable TOML keys file.

Keys file (keys are stored as sha256 hex only; ``scripts/hash_api_key.py`` makes them)::

    [[keys]]
    sha256 = "<hex sha256 of the api key>"
    tenant = "acme"
    role = "tenant"          # or "admin"

    [tenants.acme]           # optional; unlisted tenants get TenantLimits() (unlimited, weight 1)
    max_concurrent = 8
    max_queued = 32
    tokens_per_minute = 60000
    weight = 1.0

Callers send gRPC metadata ``authorization: Bearer <api key>``. Without a keys file the store is
open: every call is :data:`~loraplex_server.tenancy.OPEN_PRINCIPAL` (development mode).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import threading
import time
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from ..tenancy import (
    OPEN_PRINCIPAL,
    ROLES,
    TENANT_NAME_RE,
    AuthenticationError,
    Principal,
    TenantLimits,
)

log = logging.getLogger(__name__)

_SHA256_HEX_RE = re.compile(r"^[0-9a-fA-F]{64}$")
_BEARER_PREFIX = "Bearer "
_TOKEN_RE = re.compile(r"^[A-Za-z0-9._~+/=-]+$")  # RFC 6750 b64token
_KEY_FIELDS = frozenset({"sha256", "tenant", "role"})
_LIMIT_FIELDS = frozenset(f.name for f in fields(TenantLimits))
_DEFAULT_LIMITS = TenantLimits()
_MISSING = "missing"  # file stamp of a keys file that could not be stat'ed

FileStamp = tuple[int, int, int] | str


@dataclass(frozen=True)
class _KeySet:
    """One parsed keys file: (sha256 digest, principal) pairs and per-tenant limits. Immutable."""

    keys: tuple[tuple[bytes, Principal], ...] = ()
    limits: dict[str, TenantLimits] = field(default_factory=dict)
    stamp: FileStamp | None = None


def hash_key(key: str) -> str:
    """The sha256 hex digest of an API key, as stored in the keys file."""
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


def bearer_token(metadata: Sequence[tuple[str, Any]] | None) -> str:
    """The key from exactly one ``authorization: Bearer <key>`` entry; AuthenticationError otherwise."""
    values = [value for name, value in (metadata or ()) if name.lower() == "authorization"]
    if not values:
        raise AuthenticationError("missing 'authorization' metadata (expected 'Bearer <api key>')")
    if len(values) > 1:
        raise AuthenticationError("more than one 'authorization' metadata entry")
    value = values[0]
    if not isinstance(value, str) or not value.startswith(_BEARER_PREFIX):
        raise AuthenticationError("malformed 'authorization' metadata (expected 'Bearer <api key>')")
    token = value[len(_BEARER_PREFIX):]
    if not _TOKEN_RE.fullmatch(token):
        raise AuthenticationError("malformed 'authorization' metadata (expected 'Bearer <api key>')")
    return token


def _file_stamp(path: Path) -> FileStamp:
    """What identifies one version of the file: (mtime_ns, size, inode), or ``"missing"``."""
    try:
        st = os.stat(path)
    except OSError:
        return _MISSING
    return (st.st_mtime_ns, st.st_size, st.st_ino)


def _parse_key(i: int, entry: Any) -> tuple[str, Principal]:
    """Validate one ``[[keys]]`` entry; returns (lowercase sha256 hex, principal)."""
    where = f"keys[{i}]"
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a table")
    unknown = set(entry) - _KEY_FIELDS
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} (allowed: {sorted(_KEY_FIELDS)})")
    missing = _KEY_FIELDS - set(entry)
    if missing:
        raise ValueError(f"{where}: missing field(s) {sorted(missing)}")
    digest, tenant, role = entry["sha256"], entry["tenant"], entry["role"]
    if not isinstance(digest, str) or not _SHA256_HEX_RE.fullmatch(digest):
        raise ValueError(f"{where}.sha256: not a sha256 hex digest (64 hex characters)")
    if not isinstance(tenant, str) or not TENANT_NAME_RE.fullmatch(tenant):
        raise ValueError(f"{where}.tenant: invalid tenant name {tenant!r} (must match {TENANT_NAME_RE.pattern})")
    if role not in ROLES:
        raise ValueError(f"{where}.role: unknown role {role!r} (expected one of {sorted(ROLES)})")
    return digest.lower(), Principal(tenant, role)


def _parse_limits(tenants: Any) -> dict[str, TenantLimits]:
    """Validate the ``[tenants.<name>]`` tables."""
    if not isinstance(tenants, dict):
        raise ValueError("tenants: expected a table of [tenants.<name>] tables")
    limits = {}
    for name, table in tenants.items():
        where = f"tenants.{name}"
        if not TENANT_NAME_RE.fullmatch(name):
            raise ValueError(f"{where}: invalid tenant name {name!r} (must match {TENANT_NAME_RE.pattern})")
        if not isinstance(table, dict):
            raise ValueError(f"{where}: expected a table")
        unknown = set(table) - _LIMIT_FIELDS
        if unknown:
            raise ValueError(f"{where}: unknown field(s) {sorted(unknown)} (allowed: {sorted(_LIMIT_FIELDS)})")
        try:
            limits[name] = TenantLimits(**table)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    return limits


def parse_keys_file(text: str) -> _KeySet:
    """Parse and validate keys-file text; ValueError names the first problem found."""
    data = tomllib.loads(text)
    unknown = set(data) - {"keys", "tenants"}
    if unknown:
        raise ValueError(f"unknown top-level key(s) {sorted(unknown)} (allowed: ['keys', 'tenants'])")
    entries = data.get("keys", [])
    if not isinstance(entries, list):
        raise ValueError("keys: expected an array of [[keys]] tables")
    seen: dict[str, int] = {}
    keys = []
    for i, entry in enumerate(entries):
        digest, principal = _parse_key(i, entry)
        if digest in seen:
            raise ValueError(f"keys[{i}].sha256: duplicate of keys[{seen[digest]}].sha256")
        seen[digest] = i
        keys.append((bytes.fromhex(digest), principal))
    return _KeySet(keys=tuple(keys), limits=_parse_limits(data.get("tenants", {})))


class KeyStore:
    """Maps API keys to principals and tenants to limits; reloads the keys file when it changes.

    ``path=None`` is open (development) mode. The constructor loads the file and raises
    ValueError/OSError when it is bad, so a server never starts with a broken keys file. Later
    reloads are atomic: a bad file keeps the previous keys. Thread-safe.
    """

    def __init__(self, path: Path | None, clock: Callable[[], float] = time.monotonic,
                 check_interval_s: float = 1.0):
        self._path = Path(path) if path is not None else None
        self._clock = clock
        self._check_interval_s = check_interval_s
        self._lock = threading.Lock()  # guards the fields below
        self._reload_lock = threading.Lock()  # one file read at a time
        self._keyset = _KeySet()
        self._last_check: float | None = None
        self._failed_stamp: FileStamp | None = None
        if self._path is not None:
            self.reload()
            self._last_check = clock()

    @property
    def open_mode(self) -> bool:
        """True when there is no keys file and every caller is OPEN_PRINCIPAL."""
        return self._path is None

    @property
    def path(self) -> Path | None:
        return self._path

    def authenticate(self, metadata: Sequence[tuple[str, Any]] | None) -> Principal:
        """The principal for the call's ``authorization: Bearer <key>``; AuthenticationError if none."""
        if self._path is None:
            return OPEN_PRINCIPAL
        self.maybe_reload()
        digest = hashlib.sha256(bearer_token(metadata).encode("utf-8")).digest()
        found = None
        for stored, principal in self._keyset.keys:  # compare all: timing says nothing about which
            if hmac.compare_digest(stored, digest):
                found = principal
        if found is None:
            raise AuthenticationError("unknown API key")
        return found

    def limits_for(self, tenant: str) -> TenantLimits:
        """The tenant's configured limits, or unlimited defaults when it has no [tenants.<name>] table."""
        return self._keyset.limits.get(tenant, _DEFAULT_LIMITS)

    def reload(self) -> None:
        """Re-read the keys file now. On error (OSError, ValueError) keep the previous keys and raise."""
        if self._path is None:
            return
        with self._reload_lock:
            stamp = _file_stamp(self._path)
            try:
                keyset = parse_keys_file(self._path.read_text(encoding="utf-8"))
            except (OSError, ValueError) as exc:
                with self._lock:
                    self._failed_stamp = stamp
                if isinstance(exc, OSError):
                    raise
                raise ValueError(f"keys file {self._path}: {exc}") from exc
            keyset = _KeySet(keys=keyset.keys, limits=keyset.limits, stamp=stamp)
            with self._lock:
                self._keyset = keyset
                self._failed_stamp = None
        if not keyset.keys:
            log.warning("keys file %s has no [[keys]] entries: every call will be rejected", self._path)
        log.info("loaded %d API key(s), %d tenant limit table(s) from %s",
                 len(keyset.keys), len(keyset.limits), self._path)

    def maybe_reload(self) -> bool:
        """Reload if the file's mtime/size/inode changed, checking at most every ``check_interval_s``.

        Returns True when new keys were loaded. Errors are logged (once per file version), never
        raised: the previous keys stay in force.
        """
        if self._path is None:
            return False
        now = self._clock()
        with self._lock:
            if self._last_check is not None and now - self._last_check < self._check_interval_s:
                return False
            self._last_check = now
            current, failed = self._keyset.stamp, self._failed_stamp
        stamp = _file_stamp(self._path)
        if stamp in (current, failed):
            return False
        if stamp == _MISSING:
            log.error("keys file %s is missing; keeping the %d previously loaded key(s)",
                      self._path, len(self._keyset.keys))
            with self._lock:
                self._failed_stamp = _MISSING
            return False
        try:
            self.reload()
        except (OSError, ValueError) as exc:
            log.error("keys file reload failed, keeping the previous keys: %s", exc)
            return False
        return True
