"""Small Triton helpers that behave the same compiled and under ``TRITON_INTERPRET=1``, on every supported
torch and Triton.

The kernel helpers exist because the interpreter differs from compiled Triton (checked on Triton 3.6 and 3.9):

* float32 → bfloat16: compiled code rounds to nearest even (``cvt.rn.bf16.f32``); the interpreter truncates toward
  zero (its explicit ``rtne`` path rounds ties up and can carry into the exponent wrongly). ``to_storage`` rounds with
  integer ops instead, which every mode executes alike.
* a float kernel argument annotated ``tl.float64``: compiled it is an fp64 scalar; interpreted it stays a Python
  float, and ``tl.cast`` of a Python float goes through float32 first. ``scalar_as`` converts it exactly once.

The launch helpers (``wrap_triton``, ``loop_bound``) are the compatibility layer of the launchers: the interpreter's
kernels are ``InterpretedFunction`` objects, which torch < 2.13 refuses to wrap, and Triton < 3.9 passes an int
argument as a 1-element array that ``range()`` rejects with NumPy ≥ 2.4. Compiled kernels launch exactly as
without them.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


def is_interpreted(kernel) -> bool:
    """Whether ``kernel`` (a ``triton.jit`` function, or an autotuner around one) runs in Triton's interpreter, i.e.
    ``TRITON_INTERPRET=1`` was set when it was defined."""
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(kernel.fn if isinstance(kernel, Autotuner) else kernel, InterpretedFunction)


def wrap_triton(kernel):
    """``torch.library.wrap_triton(kernel)``, for a launch inside a ``torch.library.triton_op``; an interpreted
    kernel is returned as it is. torch ≥ 2.13 does the same itself; torch 2.6–2.12 raise ``wrap_triton only works on
    functions annotated with triton.jit`` for it. An interpreted kernel runs eagerly (on CPU tensors, for tests), so
    there is no graph for the wrapper to trace it into."""
    if is_interpreted(kernel):
        return kernel
    return torch.library.wrap_triton(kernel)


def loop_bound(kernel, n: int):
    """The argument ``n`` of ``kernel`` that the kernel uses only as a ``range()`` bound: ``n`` itself when compiled
    (a runtime scalar, so a new ``n`` does not recompile); under the interpreter ``tl.constexpr(n)``, which
    ``range()`` accepts on every Triton (3.6 with NumPy ≥ 2.4 fails on a plain int: ``only 0-dimensional arrays can
    be converted to Python scalars``)."""
    return tl.constexpr(n) if is_interpreted(kernel) else n


@triton.jit
def scalar_as(x, DTYPE: tl.constexpr):
    """A float scalar argument (fp64 compiled, Python float interpreted) rounded once to ``DTYPE``; shape (1,).

    Adding it to a ``DTYPE`` zero rounds a Python float straight to ``DTYPE`` in the interpreter; compiled, the sum
    is fp64 and exact, and the cast rounds it.
    """
    return (tl.zeros((1,), DTYPE) + x).to(DTYPE)


@triton.jit
def to_storage(x, DTYPE: tl.constexpr):
    """``x`` (float32, or float64 for a float64 ``DTYPE``) rounded to nearest even into ``DTYPE`` for a store."""
    if DTYPE == tl.bfloat16:
        tl.static_assert(x.dtype == tl.float32, "to_storage: bfloat16 is stored from float32")
        bits = x.to(tl.uint32, bitcast=True)
        # Round to nearest, ties to even, on the top 16 bits; overflow correctly carries into the exponent (to inf).
        rounded = tl.add(bits, 0x7FFF + ((bits >> 16) & 1), sanitize_overflow=False)
        # Keep NaN a (quiet) NaN: a payload only in the low bits would otherwise round to inf.
        rounded = tl.where(x != x, bits | 0x00400000, rounded)
        return (rounded >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)
