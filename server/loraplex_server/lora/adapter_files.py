"""Read an adapter directory's two files once into memory, with their fingerprint.

Everything downstream (config checks, header checks, tensors) is taken from these bytes, so a
directory rewritten in place while it is read can never yield half-old, half-new weights: what is
validated is exactly what is served, and the fingerprint (sha256, size, mtime) names those bytes.
Both files are stat-ed before and after the read; if they changed meanwhile the read is transient
(retried).

``read_adapter_head`` reads what registration checks (the config and the safetensors header, not
the tensor data) and fingerprints without a sha256: the files' identity (size, mtime, inode of
each, and a digest of the bytes read). Hashing every weights file at registration would cost a
full read per adapter (minutes for thousands of adapters); the sha256 is taken on the first full
read, which is refused if the identity changed since registration (``same_source``).

An ``OSError`` while reading (EIO, a file vanishing mid-read, a network filesystem timeout) is
transient: ``AdapterSourceUnavailableError``, which the registry retries. A missing directory or
file, a pickle, or a file over the size limit is permanent: ``AdapterLoadError``.
"""

from __future__ import annotations

import hashlib
import os
import struct
from dataclasses import dataclass
from pathlib import Path

from ..errors import AdapterLoadError, AdapterSourceUnavailableError
from .safetensors_header import MAX_HEADER_BYTES
from .weights import Fingerprint

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
PICKLE_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")


@dataclass(frozen=True)
class AdapterFiles:
    config: bytes  # adapter_config.json
    weights: bytes  # adapter_model.safetensors; from read_adapter_head, its first 8 + header-length bytes
    weights_size: int  # of the whole weights file
    fingerprint: Fingerprint
    config_digest: bytes  # blake2b-256 of the config, and of the weights file's 8-byte length + header:
    header_digest: bytes  # taken once, at the read, for the fingerprint and the validation memo keys


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


def _stats(path: Path) -> tuple[os.stat_result, os.stat_result]:
    return (path / CONFIG_FILE).stat(), (path / WEIGHTS_FILE).stat()


def _key(stats: tuple[os.stat_result, os.stat_result]) -> tuple[tuple[int, int, int, int], ...]:
    """What changes when a file is rewritten or replaced: size, mtime, inode and device of each."""
    return tuple((st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev) for st in stats)


def _head(weights: bytes) -> bytes:
    """A safetensors file's first 8 bytes and the header they announce (as far as there are bytes)."""
    n = struct.unpack("<Q", weights[:8])[0] if len(weights) >= 8 else 0
    return weights[:8 + min(n, MAX_HEADER_BYTES + 1)]


def _read_head(file) -> bytes:
    head = file.read(8)
    if len(head) < 8:
        return head
    return head + file.read(min(struct.unpack("<Q", head)[0], MAX_HEADER_BYTES + 1))


def _digest(data: bytes) -> bytes:
    return hashlib.blake2b(data, digest_size=32).digest()


def _read(adapter_id: str, path: Path, max_bytes: int, whole: bool) -> AdapterFiles:
    """The config's bytes, the weights file's (``whole``) or its head's, and their fingerprint
    (with the sha256 only when ``whole``)."""
    try:
        _check_layout(adapter_id, path, max_bytes)
        before = _stats(path)
        config = (path / CONFIG_FILE).read_bytes()
        with open(path / WEIGHTS_FILE, "rb") as file:
            weights = file.read() if whole else _read_head(file)
        after = _stats(path)
    except AdapterLoadError:
        raise
    except OSError as exc:
        raise AdapterSourceUnavailableError(adapter_id, f"reading {path} failed: {exc}") from exc
    if _key(before) != _key(after):
        raise AdapterSourceUnavailableError(adapter_id, f"{path} changed while it was read")
    size = after[1].st_size
    if size > max_bytes:  # grew between the size check and the read
        raise AdapterLoadError(adapter_id, f"{WEIGHTS_FILE} is {size} bytes, over the {max_bytes}-byte limit")
    config_digest, header_digest = _digest(config), _digest(_head(weights))
    identity = hashlib.sha256(repr(_key(after)).encode() + config_digest + header_digest)
    sha256 = None
    if whole:
        digest = hashlib.sha256()
        digest.update(len(config).to_bytes(8, "little") + config)
        digest.update(weights)
        sha256 = digest.hexdigest()
    mtime = max(after[0].st_mtime, after[1].st_mtime)
    fingerprint = Fingerprint(sha256, len(config) + size, mtime, identity.digest())
    return AdapterFiles(config, weights, len(weights) if whole else size, fingerprint, config_digest, header_digest)


def read_adapter_files(adapter_id: str, path: Path, max_bytes: int) -> AdapterFiles:
    """Both files' bytes, read once, and their fingerprint."""
    return _read(adapter_id, Path(path), max_bytes, whole=True)


def read_adapter_head(adapter_id: str, path: Path, max_bytes: int) -> AdapterFiles:
    """The config and the weights file's header (not its tensor data), fingerprinted without a sha256."""
    return _read(adapter_id, Path(path), max_bytes, whole=False)


def same_source(registered: Fingerprint, read: Fingerprint) -> bool:
    """Did ``read`` come from the files ``registered`` was taken from? By sha256 when both have one,
    else by identity (same size, mtime, inode and device of each file, same config and header)."""
    if registered.sha256 is not None and read.sha256 is not None:
        return registered.sha256 == read.sha256
    return registered.identity == read.identity
