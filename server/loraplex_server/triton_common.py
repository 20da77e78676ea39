"""Triton plumbing shared by the LoRA kernels (``lora/triton_kernels.py``) and the attention kernel
(``model/triton_attention.py``): the optional import, the jit decorator, in-kernel helpers and the
launch options that depend on running under the CPU interpreter.

Like ``config`` and ``errors``, any package may import this module. Without triton installed it
still imports: ``jit`` leaves functions plain (never launched) and ``triton_available()`` says False.
"""

from types import SimpleNamespace

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None
    tl = SimpleNamespace(constexpr=None)


def triton_available() -> bool:
    return triton is not None


def jit(**kwargs):
    """``triton.jit(fn, **kwargs)`` when triton is installed, else ``fn`` unchanged."""
    def wrap(fn):
        return triton.jit(fn, **kwargs) if triton is not None else fn
    return wrap


# Kernels use builtins only, plus these: tl.sum / tl.max / tl.zeros / tl.cdiv are themselves
# @jit functions, which the CPU interpreter cannot call when triton was imported before
# TRITON_INTERPRET was set (transformers imports triton early). Same ops as tl.sum / tl.max.
@jit()
def tl_sum(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._sum_combine)


@jit()
def tl_max(x, axis: tl.constexpr):
    return tl.reduce(x, axis, tl.standard._elementwise_max)


@jit()
def dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    """a @ b in fp32; UPCAST: fp32 operands (the CPU interpreter multiplies bf16 as raw bits)."""
    if UPCAST:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b, input_precision=PRECISION)
    return out


def interpreted(kernel) -> bool:
    """The kernel runs under TRITON_INTERPRET=1 (the CPU tests)."""
    return type(kernel).__name__ == "InterpretedFunction"


def dot_options(kernel, dtype: torch.dtype) -> dict:
    """``dot``'s constexprs: fp32 dots stay exact (IEEE, not TF32); bf16 dots go through fp32
    under the CPU interpreter."""
    return dict(PRECISION="ieee" if dtype == torch.float32 else None,
                UPCAST=interpreted(kernel) and dtype == torch.bfloat16)


def cdiv(a: int, b: int) -> int:
    """Ceiling division on the host (grid sizes)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1): tile sizes."""
    return 1 << max(0, (n - 1).bit_length())
