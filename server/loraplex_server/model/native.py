"""Native CPU kernels: C++ sources in ``csrc/`` built once into a shared library with the system
compiler and called through ctypes (no torch headers, so a build takes about a second).

The library lands in ``<cache_dir>/kernels/<key>/``, keyed by the sources, the compiler flags and
the CPU's instruction-set flags (it is built with ``-march=native``), and is written atomically so
concurrent engines never load a half-written file. ``load_native_kernels`` returns None, with a
warning naming the reason, when no compiler is found or the build fails: callers fall back to the
torch path.

With GNU g++ the library is built with ``-fopenmp``: it then links ``libgomp.so.1``, which resolves to
the copy torch has already loaded, so kernel threads are torch's own intra-op OpenMP threads (a
second pool would fight torch's spinning threads for the cores). Other compilers build it
single-threaded.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

import torch

log = logging.getLogger(__name__)

SOURCES = tuple(Path(__file__).resolve().parent / "csrc" / name for name in ("paged_attention.cpp", "argmax.cpp"))
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC",
         "-std=c++17")
GNU_FLAGS = ("-fopenmp",)
BUILD_TIMEOUT_S = 120
_ELEMENT = {torch.float32: "f32", torch.bfloat16: "bf16"}
_I64, _F32, _INT, _PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_DECODE_ARGS = [_PTR, _I64, _I64, _PTR, _PTR, _I64, _I64, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _I64, _I64,
                _INT, _INT, _INT, _INT, _F32, _I64, _INT]


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def _compiler() -> str | None:
    return shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")


@functools.lru_cache(maxsize=None)
def compiler_flags(compiler: str) -> tuple[str, ...]:
    """FLAGS, plus OpenMP when the compiler is GNU (its libgomp is the runtime torch ships)."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    gnu = "Free Software Foundation" in version and "clang" not in version
    return FLAGS + GNU_FLAGS if gnu else FLAGS


def build_key(compiler: str, flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for part in (compiler, " ".join(flags), platform.machine(), _cpu_flags()):
        h.update(part.encode())
    for source in SOURCES:
        h.update(source.read_bytes())
    return h.hexdigest()[:16]


def build_library(cache_dir: Path) -> Path:
    """The shared library's path, building it first when it is not cached (raises on failure)."""
    compiler = _compiler()
    if compiler is None:
        raise RuntimeError("no C++ compiler (c++, g++ or clang++) on PATH")
    flags = compiler_flags(compiler)
    target = Path(cache_dir) / "kernels" / build_key(compiler, flags) / "libloraplex_kernels.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, staging = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    start = time.monotonic()
    try:
        result = subprocess.run([compiler, *flags, "-o", staging, *map(str, SOURCES)], capture_output=True,
                                text=True, timeout=BUILD_TIMEOUT_S)
        if result.returncode != 0:
            raise RuntimeError(f"{compiler} failed: {result.stderr.strip()[-2000:]}")
        os.replace(staging, target)
    finally:
        if os.path.exists(staging):
            os.unlink(staging)
    log.info("built native CPU kernels in %.1f s: %s", time.monotonic() - start, target)
    return target


class NativeKernels:
    """ctypes bindings of the library; each call splits its rows over ``threads`` OpenMP threads."""

    def __init__(self, path: Path, threads: int = 1):
        self.path = path
        lib = ctypes.CDLL(str(path))
        self._decode = {}
        for suffix in _ELEMENT.values():
            fn = getattr(lib, f"loraplex_paged_decode_{suffix}")
            fn.argtypes, fn.restype = _DECODE_ARGS, ctypes.c_int
            self._decode[suffix] = fn
        self._argmax = lib.loraplex_argmax_f32
        self._argmax.argtypes, self._argmax.restype = [_PTR, _I64, _I64, _I64, _PTR, _INT], ctypes.c_int
        self.threads = max(1, threads)

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in _ELEMENT

    def argmax(self, logits: torch.Tensor) -> torch.Tensor:
        """[N] int64 index of each row's maximum of fp32 ``logits`` [N, V] (csrc/argmax.cpp), the
        same answer as ``logits.argmax(dim=1)``."""
        if logits.dtype != torch.float32 or logits.dim() != 2 or logits.stride(1) != 1 or logits.device.type != "cpu":
            raise ValueError("argmax needs fp32 CPU logits [N, V] with unit stride on V")
        out = torch.empty(logits.shape[0], dtype=torch.int64)
        if logits.shape[1] == 0:
            raise ValueError("argmax of an empty row")
        self._argmax(logits.data_ptr(), logits.shape[0], logits.shape[1], logits.stride(0), out.data_ptr(),
                     self.threads)
        return out

    def paged_decode(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
                     rows: torch.Tensor, ctx_lens: torch.Tensor, block_tables: torch.Tensor, block_size: int,
                     scale: float, window: int | None) -> None:
        """Decode attention (csrc/paged_attention.cpp) into ``out`` [T, H, D] for the packed rows
        ``rows`` [N] int64 of ``q`` [T, H, D]; ``ctx_lens`` [N] and ``block_tables`` [N, W] int32;
        caches [num_slots, H_kv, D]. Every tensor on the CPU, one dtype for q/caches/out, unit
        stride on the head dim, contiguous caches, rows, lens and tables."""
        for t in (q, out):
            if t.stride(2) != 1:
                raise ValueError("q and out need a unit stride on the head dim")
        if not (k_cache.is_contiguous() and v_cache.is_contiguous() and rows.is_contiguous()
                and ctx_lens.is_contiguous() and block_tables.stride(1) == 1):
            raise ValueError("caches, rows, lens and block tables must be contiguous")
        if not (q.dtype == k_cache.dtype == v_cache.dtype == out.dtype) or q.dtype not in _ELEMENT:
            raise ValueError(f"paged_decode needs one dtype among {list(_ELEMENT)}, got {q.dtype}/{k_cache.dtype}")
        if rows.dtype != torch.int64 or ctx_lens.dtype != torch.int32 or block_tables.dtype != torch.int32:
            raise ValueError("rows must be int64, ctx_lens and block_tables int32")
        fn = self._decode[_ELEMENT[q.dtype]]
        num_rows = rows.shape[0]
        args = (q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(), k_cache.stride(0),
                k_cache.stride(1), out.data_ptr(), out.stride(0), out.stride(1), rows.data_ptr(),
                ctx_lens.data_ptr(), block_tables.data_ptr(), block_tables.stride(0), num_rows, q.shape[1],
                k_cache.shape[1], q.shape[2], block_size, scale, window or 0, self.threads)
        if fn(*args) != 0:
            raise ValueError(f"paged_decode: {q.shape[1]} heads is not a multiple of {k_cache.shape[1]} KV heads")


def load_native_kernels(cache_dir: Path, threads: int = 1) -> NativeKernels | None:
    """The native kernels, or None (with a warning) when they cannot be built or loaded here."""
    try:
        return NativeKernels(build_library(cache_dir), threads)
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
        log.warning("native CPU kernels unavailable, using the torch attention path: %s", exc)
        return None
