"""Tenants and who is calling: principals, per-tenant limits, and the errors auth and limits raise.

Plain data and exceptions only; :mod:`loraplex_server.api.auth` builds principals from API keys and
:mod:`loraplex_server.api.limits` enforces :class:`TenantLimits`.

Proposed gRPC status mapping (for ``api/errors.py``):

* :class:`AuthenticationError` -> ``UNAUTHENTICATED``
* :class:`PermissionDeniedError` -> ``PERMISSION_DENIED``
* :class:`RateLimitError` -> ``RESOURCE_EXHAUSTED``, with :meth:`RateLimitError.trailing_metadata`
  (``retry-after-s``) attached to the call.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from .errors import LoraplexError

ROLE_ADMIN = "admin"
ROLE_TENANT = "tenant"
ROLES = frozenset({ROLE_ADMIN, ROLE_TENANT})

TENANT_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")

RETRY_AFTER_METADATA_KEY = "retry-after-s"


@dataclass(frozen=True)
class Principal:
    """The authenticated caller: the tenant it acts for and its role (``"admin"`` or ``"tenant"``)."""

    tenant: str
    role: str

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"unknown role {self.role!r} (expected one of {sorted(ROLES)})")

    @property
    def is_admin(self) -> bool:
        """Admins may call the admin RPCs (load/unload adapters) and act for any tenant."""
        return self.role == ROLE_ADMIN


# Development mode (no keys file): every caller is this principal.
OPEN_PRINCIPAL = Principal("default", ROLE_ADMIN)


def _check_optional_positive_int(name: str, value: object) -> None:
    """Raise ValueError unless ``value`` is None or an int >= 1 (bool is not an int here)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


@dataclass(frozen=True)
class TenantLimits:
    """Per-tenant limits; ``None`` means unlimited. ``weight`` is the tenant's fair-share weight."""

    max_concurrent: int | None = None
    max_queued: int | None = None
    tokens_per_minute: int | None = None
    weight: float = 1.0

    def __post_init__(self) -> None:
        for name in ("max_concurrent", "max_queued", "tokens_per_minute"):
            _check_optional_positive_int(name, getattr(self, name))
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ValueError(f"weight must be a number, got {weight!r}")
        if not math.isfinite(weight) or weight <= 0:
            raise ValueError(f"weight must be a finite number > 0, got {weight!r}")


class AuthenticationError(LoraplexError):
    """The caller presented no valid API key (UNAUTHENTICATED). Never carries the key itself."""


class PermissionDeniedError(LoraplexError):
    """The caller is known but may not do this (PERMISSION_DENIED)."""


class RateLimitError(LoraplexError):
    """A tenant limit was hit (RESOURCE_EXHAUSTED); ``retry_after_s`` says when to try again."""

    def __init__(self, message: str, retry_after_s: float):
        super().__init__(message)
        self.retry_after_s = float(retry_after_s)

    def trailing_metadata(self) -> tuple[tuple[str, str], ...]:
        """The gRPC trailing metadata to send with the error: ``(("retry-after-s", "1.500"),)``."""
        return ((RETRY_AFTER_METADATA_KEY, f"{self.retry_after_s:.3f}"),)

