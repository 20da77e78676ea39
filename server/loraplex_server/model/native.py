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
from torch._subclasses.fake_tensor import FakeTensor

log = logging.getLogger(__name__)

CSRC = Path(__file__).resolve().parent / "csrc"
SOURCES = tuple(CSRC / name for name in (
    "paged_attention.cpp", "argmax.cpp", "lora_sgmv.cpp", "elementwise.cpp"))
HEADERS = (CSRC / "elements.h",)
FLAGS = ("-O3", "-march=native", "-fopenmp-simd", "-fno-math-errno", "-fno-trapping-math", "-shared", "-fPIC",
         "-std=c++17")
GNU_FLAGS = ("-fopenmp",)
BUILD_TIMEOUT_S = 120
_ELEMENT = {torch.float32: "f32", torch.bfloat16: "bf16"}
_I64, _F32, _INT, _PTR = ctypes.c_int64, ctypes.c_float, ctypes.c_int, ctypes.c_void_p
_SGMV_ARGS = [_PTR, _I64, _PTR, _I64, _PTR, _PTR, _I64, _I64, _PTR, _PTR, _PTR, _PTR, _I64, _I64, _I64, _I64, _I64,
              _I64, _INT]
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


@functools.cache
def compiler_flags(compiler: str) -> tuple[str, ...]:
    """FLAGS, plus OpenMP when the compiler is GNU (its libgomp is the runtime torch ships)."""
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30,
                                 check=False).stdout
    except (OSError, subprocess.SubprocessError):
        version = ""
    gnu = "Free Software Foundation" in version and "clang" not in version
    return FLAGS + GNU_FLAGS if gnu else FLAGS


def build_key(compiler: str, flags: tuple[str, ...]) -> str:
    h = hashlib.sha256()
    for part in (compiler, " ".join(flags), platform.machine(), _cpu_flags()):
        h.update(part.encode())
    for source in SOURCES + HEADERS:
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
                                text=True, timeout=BUILD_TIMEOUT_S, check=False)  # stderr goes into the error
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
        self._sgmv = {}
        for x_suffix, w_suffix in (("f32", "f32"), ("bf16", "f32"), ("bf16", "bf16")):
            fn = getattr(lib, f"loraplex_sgmv_{x_suffix}_{w_suffix}")
            fn.argtypes, fn.restype = _SGMV_ARGS, ctypes.c_int
            self._sgmv[(x_suffix, w_suffix)] = fn
        self._rms_norm, self._silu_mul, self._rope = {}, {}, {}
        for suffix in _ELEMENT.values():
            fn = getattr(lib, f"loraplex_rope_{suffix}")
            fn.argtypes, fn.restype = [_PTR, _I64, _I64, _I64, _I64, _PTR, _PTR, _I64, _INT], ctypes.c_int
            self._rope[suffix] = fn
            fn = getattr(lib, f"loraplex_rms_norm_{suffix}")
            fn.argtypes, fn.restype = [_PTR, _I64, _PTR, _PTR, _I64, _I64, _I64, _F32, _INT], ctypes.c_int
            self._rms_norm[suffix] = fn
            fn = getattr(lib, f"loraplex_silu_mul_{suffix}")
            fn.argtypes, fn.restype = [_PTR, _I64, _PTR, _I64, _PTR, _I64, _I64, _I64, _INT], ctypes.c_int
            self._silu_mul[suffix] = fn
        self._argmax = lib.loraplex_argmax_f32
        self._argmax.argtypes, self._argmax.restype = [_PTR, _I64, _I64, _I64, _PTR, _INT], ctypes.c_int
        self.threads = max(1, threads)

    def supports(self, dtype: torch.dtype) -> bool:
        return dtype in _ELEMENT

    def supports_lora(self, x_dtype: torch.dtype, weight_dtype: torch.dtype) -> bool:
        return (_ELEMENT.get(x_dtype), _ELEMENT.get(weight_dtype)) in self._sgmv

    def lora_sgmv(self, y: torch.Tensor, x: torch.Tensor, lora_a: torch.Tensor, lora_bt: torch.Tensor,
                  ranks: torch.Tensor, a_offsets: torch.Tensor, b_offsets: torch.Tensor, segments: torch.Tensor,
                  max_rank: int) -> None:
        """``y[t] += (A_s @ x[t]) @ Bt_s`` for the tokens t of each segment (start, end, slot s) of
        ``segments`` [n, 3] int32, at rank r = ``ranks[s]`` <= ``max_rank``, where ``A_s`` is
        ``lora_a[a_offsets[s] : + r * in]`` viewed [r, in] and ``Bt_s`` ``lora_bt[b_offsets[s] :
        + r * out]`` viewed [r, out] (csrc/lora_sgmv.cpp). ``y`` [T, out] and ``x`` [T, in] share
        a dtype, the 1-D weight buffers another (fp32 or the activations' bf16); ``ranks`` and the
        offsets [S] int32; all on the CPU."""
        key = (_ELEMENT.get(x.dtype), _ELEMENT.get(lora_a.dtype))
        if key not in self._sgmv or y.dtype != x.dtype or lora_bt.dtype != lora_a.dtype:
            raise ValueError(f"lora_sgmv has no variant for x {x.dtype} / y {y.dtype}, weights "
                             f"{lora_a.dtype} / {lora_bt.dtype}")
        if x.stride(1) != 1 or y.stride(1) != 1 or not (lora_a.is_contiguous() and lora_bt.is_contiguous()):
            raise ValueError("lora_sgmv needs unit-stride rows and contiguous weight buffers")
        tables = (ranks, a_offsets, b_offsets, segments)
        if any(t.dtype != torch.int32 for t in tables) or not segments.is_contiguous():
            raise ValueError("ranks, offsets and segments must be int32 (segments contiguous [n, 3])")
        if lora_a.dim() != 1 or lora_bt.dim() != 1 or ranks.dim() != 1 or not (
                a_offsets.shape == b_offsets.shape == ranks.shape):
            raise ValueError("lora_a and lora_bt must be 1-D; ranks and offsets one entry per slot")
        if x.dim() != 2 or y.dim() != 2 or x.shape[0] != y.shape[0]:
            raise ValueError(f"lora_sgmv shapes: x {tuple(x.shape)}, y {tuple(y.shape)}")
        status = self._sgmv[key](x.data_ptr(), x.stride(0), y.data_ptr(), y.stride(0), lora_a.data_ptr(),
                                 lora_bt.data_ptr(), x.shape[1], y.shape[1], ranks.data_ptr(), a_offsets.data_ptr(),
                                 b_offsets.data_ptr(), segments.data_ptr(), segments.shape[0], x.shape[0],
                                 ranks.shape[0], lora_a.numel(), lora_bt.numel(), max_rank, self.threads)
        if status == 3:
            raise ValueError("lora_sgmv: a slot's weights (offset + rank rows) fall outside the buffers")
        if status != 0:
            raise ValueError("lora_sgmv: a segment outside the tokens or the slots, or a rank above max_rank")

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """``weight * (x * rsqrt(mean(x^2) + eps))`` over the last dim, with the roundings of
        transformers' LlamaRMSNorm (csrc/elementwise.cpp); ``x`` and ``weight`` of one native dtype."""
        rows = _rows(x, weight.dtype, "rms_norm")
        if weight.shape != (x.shape[-1],) or not weight.is_contiguous():
            raise ValueError(f"rms_norm weight {tuple(weight.shape)} for rows of {x.shape[-1]}")
        out = torch.empty_like(x, memory_format=torch.contiguous_format)
        self._rms_norm[_ELEMENT[x.dtype]](rows.data_ptr(), rows.stride(0), weight.data_ptr(), out.data_ptr(),
                                          x.shape[-1], rows.shape[0], x.shape[-1], eps, self.threads)
        return out

    def silu_mul(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``silu(gate) * up`` with the roundings of ``act_fn(gate) * up`` in the model's dtype."""
        gate_rows, up_rows = _rows(gate, up.dtype, "silu_mul"), _rows(up, gate.dtype, "silu_mul")
        if gate.shape != up.shape:
            raise ValueError(f"silu_mul shapes differ: {tuple(gate.shape)} vs {tuple(up.shape)}")
        out = torch.empty_like(gate, memory_format=torch.contiguous_format)
        self._silu_mul[_ELEMENT[gate.dtype]](gate_rows.data_ptr(), gate_rows.stride(0), up_rows.data_ptr(),
                                             up_rows.stride(0), out.data_ptr(), gate.shape[-1], gate_rows.shape[0],
                                             gate.shape[-1], self.threads)
        return out

    def rope_(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> None:
        """Rotary embedding in place on ``x`` [T, H, D] (unit strides on H and D): with
        ``cos``/``sin`` [T, D] of x's dtype, the result of transformers' ``apply_rotary_pos_emb``
        (``x * cos + rotate_half(x) * sin``) with its roundings."""
        if x.dtype not in _ELEMENT or cos.dtype != x.dtype or sin.dtype != x.dtype or x.device.type != "cpu":
            raise ValueError(f"rope needs CPU x/cos/sin of one dtype among {list(_ELEMENT)}")
        tokens, heads, head_dim = x.shape
        if x.stride(2) != 1 or x.stride(1) != head_dim or head_dim % 2:
            raise ValueError("rope needs x [T, H, D] with contiguous heads and an even head size")
        if (cos.shape != (tokens, head_dim) or sin.shape != cos.shape or cos.stride() != sin.stride()
                or cos.stride(1) != 1):
            raise ValueError(f"rope cos/sin {tuple(cos.shape)} for x {tuple(x.shape)}")
        self._rope[_ELEMENT[x.dtype]](x.data_ptr(), x.stride(0), tokens, heads, head_dim, cos.data_ptr(),
                                      sin.data_ptr(), cos.stride(0), self.threads)

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


def _rows(t: torch.Tensor, other_dtype: torch.dtype, op: str) -> torch.Tensor:
    """``t`` as [rows, last dim] with a unit last stride (a view when possible), checked for the op."""
    if t.dtype != other_dtype or t.dtype not in _ELEMENT or t.device.type != "cpu" or isinstance(t, FakeTensor):
        raise ValueError(f"{op} needs CPU tensors of one dtype among {list(_ELEMENT)}, got {t.dtype}/{other_dtype}")
    rows = t.reshape(-1, t.shape[-1])
    return rows if rows.stride(1) == 1 else rows.contiguous()


def load_native_kernels(cache_dir: Path, threads: int = 1) -> NativeKernels | None:
    """The native kernels, or None (with a warning) when they cannot be built or loaded here."""
    try:
        return NativeKernels(build_library(cache_dir), threads)
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
        log.warning("native CPU kernels unavailable, using the torch attention path: %s", exc)
        return None
