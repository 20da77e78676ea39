"""Read an adapter directory's two files once into memory, with their fingerprint.

Everything downstream (config checks, header checks, tensors) is taken from these bytes, so a
directory rewritten in place while it is read can never yield half-old, half-new weights: what is
validated is exactly what is served, and the fingerprint (sha256, size, mtime) names those bytes.

An ``OSError`` while reading (EIO, a file vanishing mid-read, a network filesystem timeout) is
transient: ``AdapterSourceUnavailableError``, which the registry retries. A missing directory or
file, a pickle, or a file over the size limit is permanent: ``AdapterLoadError``.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterLoadError, AdapterSourceUnavailableError
from .weights import Fingerprint

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


@dataclass(frozen=True)
class AdapterFiles:
    config: bytes  # adapter_config.json
    weights: bytes  # adapter_model.safetensors
    fingerprint: Fingerprint


def _check_layout(adapter_id: str, path: Path, max_bytes: int) -> None:
    if not path.is_dir():
        raise AdapterLoadError(adapter_id, f"{path} is not a directory")
    if not (path / CONFIG_FILE).is_file():
        raise AdapterLoadError(adapter_id, f"{CONFIG_FILE} missing in {path}")
    weights = path / WEIGHTS_FILE
    if not weights.is_file():
        pickles = [n for n in PICKLE_FILES if (path / n).is_file()]
        if pickles:
            raise AdapterLoadError(adapter_id, f"{pickles[0]} is a pickle file; we never unpickle: "
                                               f"save the adapter with safe_serialization=True")
        raise AdapterLoadError(adapter_id, f"{WEIGHTS_FILE} missing in {path}")
    size = weights.stat().st_size
    if size > max_bytes:
        raise AdapterLoadError(adapter_id, f"{WEIGHTS_FILE} is {size} bytes, over the {max_bytes}-byte limit")


def read_adapter_files(adapter_id: str, path: Path, max_bytes: int) -> AdapterFiles:
    """Both files' bytes, read once, and their fingerprint."""
    path = Path(path)
    try:
        _check_layout(adapter_id, path, max_bytes)
        mtime = max((path / CONFIG_FILE).stat().st_mtime, (path / WEIGHTS_FILE).stat().st_mtime)
        config = (path / CONFIG_FILE).read_bytes()
        weights = (path / WEIGHTS_FILE).read_bytes()
    except AdapterLoadError:
        raise
    except OSError as exc:
        raise AdapterSourceUnavailableError(adapter_id, f"reading {path} failed: {exc}") from exc
    if len(weights) > max_bytes:  # grew between the size check and the read
        raise AdapterLoadError(adapter_id, f"{WEIGHTS_FILE} is {len(weights)} bytes, over the {max_bytes}-byte limit")
    digest = hashlib.sha256()
    digest.update(len(config).to_bytes(8, "little") + config)
    digest.update(weights)
    return AdapterFiles(config, weights, Fingerprint(digest.hexdigest(), len(config) + len(weights), mtime))
