"""Who may see and change which adapter.

- Adapter ids ``<tenant>/<name>`` belong to that tenant (private); ids without a ``/`` are public.
- A tenant sees and uses its own adapters and the public ones; another tenant's private adapter is
  NOT_FOUND to it (its existence does not leak). Admins see everything.
- A tenant may load and unload only inside its own namespace; admins anywhere.
"""

from __future__ import annotations

from ..errors import AdapterNotFoundError
from ..tenancy import PermissionDeniedError, Principal


def owner_of(adapter_id: str) -> str | None:
    namespace, sep, _ = adapter_id.partition("/")
    return namespace if sep else None


def can_see(principal: Principal, owner: str | None) -> bool:
    return principal.is_admin or owner is None or owner == principal.tenant


def check_visible(principal: Principal, adapter_id: str, owner: str | None) -> None:
    if not can_see(principal, owner):
        raise AdapterNotFoundError(adapter_id)


def check_may_manage(principal: Principal, adapter_id: str) -> None:
    """Load or unload ``adapter_id``: admins anywhere, tenants inside their namespace.

    Decided from the id alone, so the answer never depends on (or reveals) whether another
    tenant's adapter exists.
    """
    if not principal.is_admin and owner_of(adapter_id) != principal.tenant:
        raise PermissionDeniedError(f"tenant {principal.tenant!r} may only manage adapters named "
                                    f"'{principal.tenant}/<name>'")
