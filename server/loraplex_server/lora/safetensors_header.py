"""Read and sanity-check a safetensors header without reading the tensors.

Layout: 8-byte little-endian header length N, then N bytes of JSON
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the data.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from math import prod
from pathlib import Path

DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2}
MAX_HEADER_BYTES = 16 * 1024 * 1024


class HeaderError(ValueError):
    pass


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return prod(self.shape) * DTYPE_BYTES[self.dtype]


def _entry(name: str, raw, data_bytes: int) -> TensorInfo:
    if not isinstance(raw, dict) or {"dtype", "shape", "data_offsets"} - set(raw):
        raise HeaderError(f"tensor {name!r}: malformed entry")
    dtype, shape, offsets = raw["dtype"], raw["shape"], raw["data_offsets"]
    if dtype not in DTYPE_BYTES:
        raise HeaderError(f"tensor {name!r}: dtype {dtype} is not a floating type we accept")
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise HeaderError(f"tensor {name!r}: bad shape {shape!r}")
    info = TensorInfo(dtype, tuple(shape))
    if not (isinstance(offsets, list) and len(offsets) == 2 and 0 <= offsets[0] <= offsets[1] <= data_bytes):
        raise HeaderError(f"tensor {name!r}: data offsets {offsets!r} fall outside the file")
    if offsets[1] - offsets[0] != info.nbytes:
        raise HeaderError(f"tensor {name!r}: {offsets[1] - offsets[0]} bytes stored for shape {shape} {dtype}")
    return info


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor name -> dtype and shape; raises HeaderError if the file is not sane."""
    return parse_header(path.read_bytes())


def parse_header(data: bytes, size: int | None = None) -> dict[str, TensorInfo]:
    """Like ``read_header``, from a safetensors file's bytes already in memory: all of them, or
    (with ``size``, the whole file's size) at least its first 8 + header-length bytes."""
    size = len(data) if size is None else size
    if size < 8 or len(data) < 8:
        raise HeaderError("file is too short to be safetensors")
    (n,) = struct.unpack("<Q", data[:8])
    if n > MAX_HEADER_BYTES or 8 + n > size or 8 + n > len(data):
        raise HeaderError(f"header length {n} is impossible for a {size}-byte file")
    try:
        header = json.loads(data[8:8 + n])
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HeaderError(f"header is not valid JSON: {exc}") from exc
    if not isinstance(header, dict):
        raise HeaderError("header is not a JSON object")
    data_bytes = size - 8 - n
    return {k: _entry(k, v, data_bytes) for k, v in header.items() if k != "__metadata__"}
