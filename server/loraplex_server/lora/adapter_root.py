"""Adapter directories under the adapter root, each named by its path relative to the root
(``acme/sql``; a first component names the owning tenant). A directory holds an adapter when it
has an adapter config (``CONFIG_FILE``). ``--adapter-discovery`` registers what ``find_adapters``
lists; a Ray replica loads what ``adapter_dir`` finds on first use.
"""

from __future__ import annotations

from collections.abc import Container
from pathlib import Path, PurePosixPath

from .adapter_files import CONFIG_FILE
from .ids import AdapterId


def holds_adapter(directory: Path) -> bool:
    return (directory / CONFIG_FILE).is_file()


def find_adapters(root: Path, skip: Container[str] = ()) -> dict[AdapterId, Path]:
    """Adapter id -> directory, for every directory under ``root`` holding an adapter config (not
    the root itself, nor one a symlink leads to outside the root). Ids in ``skip`` are left out
    unchecked (a sweep over thousands of known adapters costs a directory walk, not their checks)."""
    root = Path(root).resolve()
    found = {}
    for config in sorted(root.rglob(CONFIG_FILE)):
        directory = config.parent
        adapter_id = AdapterId(directory.relative_to(root).as_posix())
        if adapter_id in skip or directory == root or root not in directory.resolve().parents:
            continue
        found[adapter_id] = directory
    return found


def adapter_dir(root: Path, adapter_id: str) -> Path | None:
    """The directory ``adapter_id`` names under ``root`` if it holds an adapter config, else None
    (an empty, absolute or ``..`` id names nothing). A symlink out of the root is returned: loading
    it is refused (``resolve_source``)."""
    path = PurePosixPath(adapter_id)
    if not path.parts or ".." in path.parts or path.is_absolute():
        return None
    directory = Path(root) / adapter_id
    return directory if holds_adapter(directory) else None
