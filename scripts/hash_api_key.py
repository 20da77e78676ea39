"""Hash an API key for the keys file, or make a new key with a ready-to-paste [[keys]] block.

    echo -n "$KEY" | python scripts/hash_api_key.py          # sha256 of a key read from stdin
    python scripts/hash_api_key.py --key "$KEY"               # (ends up in shell history)
    python scripts/hash_api_key.py --new --tenant acme --role tenant

Only the sha256 goes into the keys file; give the key itself to the client and do not store it.
"""

from __future__ import annotations

import argparse
import secrets
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "server"))  # runs without installing

from loraplex_server.api.auth import bearer_token, hash_key
from loraplex_server.tenancy import ROLES, TENANT_NAME_RE, AuthenticationError


def keys_block(key_hash: str, tenant: str, role: str) -> str:
    """A ``[[keys]]`` TOML block for the keys file."""
    return f'[[keys]]\nsha256 = "{key_hash}"\ntenant = "{tenant}"\nrole = "{role}"\n'


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--key", help="the API key to hash (default: read it from stdin)")
    source.add_argument("--new", action="store_true", help="generate a new random key")
    parser.add_argument("--tenant", default="default", help="tenant for the [[keys]] block (with --new)")
    parser.add_argument("--role", default="tenant", choices=sorted(ROLES), help="role for the [[keys]] block")
    args = parser.parse_args(argv)
    if not TENANT_NAME_RE.fullmatch(args.tenant):
        parser.error(f"invalid tenant name {args.tenant!r} (must match {TENANT_NAME_RE.pattern})")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.new:
        key = secrets.token_urlsafe(32)
        print(f"API key (give to the client, store nowhere else): {key}")
        print()
        print(keys_block(hash_key(key), args.tenant, args.role), end="")
        return 0
    key = args.key if args.key is not None else sys.stdin.read().strip()
    try:
        bearer_token([("authorization", f"Bearer {key}")])  # the server would accept it as sent
    except AuthenticationError:
        print("error: the key is empty or has characters a Bearer token cannot carry", file=sys.stderr)
        return 2
    print(hash_key(key))
    return 0


if __name__ == "__main__":
    sys.exit(main())
