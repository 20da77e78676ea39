"""api/access.py: who may see and manage which adapter, per tenant, for public ids and for admins."""

from __future__ import annotations

import pytest

from loraplex_server.api.access import can_see, check_may_manage, check_visible, owner_of
from loraplex_server.errors import AdapterNotFoundError
from loraplex_server.tenancy import OPEN_PRINCIPAL, PermissionDeniedError, Principal

ACME = Principal("acme", "tenant")
BETA = Principal("beta", "tenant")
ADMIN = Principal("ops", "admin")


@pytest.mark.parametrize("adapter_id, owner", [
    ("upper", None),              # no namespace: public
    ("sql-v2.1", None),
    ("acme/sql", "acme"),         # the first path component names the tenant
    ("acme/team/sql", "acme"),    # discovery ids can be deeper; still acme's
    ("acme-co/sql", "acme-co"),
])
def test_owner_is_the_first_path_component(adapter_id, owner):
    assert owner_of(adapter_id) == owner


@pytest.mark.parametrize("principal, owner, visible", [
    (ACME, None, True),           # public adapters: everyone
    (BETA, None, True),
    (ACME, "acme", True),         # its own
    (ACME, "beta", False),        # another tenant's private adapter
    (BETA, "acme", False),
    (ACME, "acme-co", False),     # a namespace that only starts like its own
    (ADMIN, "acme", True),        # admins see everything
    (ADMIN, "beta", True),
    (ADMIN, None, True),
    (OPEN_PRINCIPAL, "acme", True),  # open (development) mode is an admin
])
def test_visibility_per_principal(principal, owner, visible):
    assert can_see(principal, owner) is visible
    adapter_id = f"{owner}/x" if owner else "x"
    if visible:
        check_visible(principal, adapter_id, owner)
    else:
        with pytest.raises(AdapterNotFoundError):
            check_visible(principal, adapter_id, owner)


def test_a_hidden_adapter_is_refused_exactly_like_a_missing_one():
    """No existence leak: beta's error for acme's real adapter is the one the engine gives for an
    id that does not exist (same type, same message, no owner named)."""
    with pytest.raises(AdapterNotFoundError) as hidden:
        check_visible(BETA, "acme/sql", "acme")
    missing = AdapterNotFoundError("acme/sql")  # what lookups of an unknown id raise
    assert type(hidden.value) is type(missing) and str(hidden.value) == str(missing)
    assert hidden.value.adapter_id == "acme/sql"


@pytest.mark.parametrize("principal, adapter_id, allowed", [
    (ACME, "acme/sql", True),         # inside its namespace
    (ACME, "acme/team/sql", True),
    (ACME, "upper", False),           # public ids: admins only
    (ACME, "beta/sql", False),        # another tenant's namespace
    (ACME, "acme-co/sql", False),     # a lookalike namespace
    (ACME, "acme", False),            # its own name without a slash is a public id
    (BETA, "acme/sql", False),
    (ADMIN, "upper", True),           # admins anywhere
    (ADMIN, "acme/sql", True),
    (ADMIN, "beta/team/sql", True),
])
def test_manage_rights_per_principal(principal, adapter_id, allowed):
    if allowed:
        check_may_manage(principal, adapter_id)
    else:
        with pytest.raises(PermissionDeniedError) as info:
            check_may_manage(principal, adapter_id)
        assert f"'{principal.tenant}/<name>'" in str(info.value)  # says where it may manage

