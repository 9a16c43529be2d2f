"""The noise stream of ``fastlangevin.ops.philox`` as Triton device functions.

Bit-identical to the reference in the integer part (the Philox words); the normals agree up to the rounding of
``log``/``sqrt``/``cos``/``sin`` in the compute dtype. Every function works on blocks of any shape, so the fused
whole-chain kernel can reuse them with its own block layout.

Usage inside a kernel::

    seed_lo, seed_hi, counter_lo, counter_hi = load_rng_state(rng_state_ptr)
    n0, n1, n2, n3 = normal4(seed_lo, seed_hi, block_index, counter_lo, counter_hi, COMPUTE_F64)

``n0..n3`` are the stream's elements ``4·j + 0..3`` for each Philox block index ``j`` in ``block_index``.

Overflow: every uint32 product and key bump must wrap mod 2³². ``tl.mul``/``tl.add`` with
``sanitize_overflow=False`` wrap in compiled Triton (LLVM ``mul``/``add`` on i32) and under ``TRITON_INTERPRET=1``
(numpy uint32 arrays wrap silently), and keep the debug-mode overflow checker from flagging the intended wrap.
``tl.umulhi`` takes uint32 operands only here: the interpreter of older Triton (3.6) widens signed operands by value,
not by bit pattern, so signed inputs would disagree with compiled code there.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastlangevin.ops.philox import PHILOX_M0, PHILOX_M1, PHILOX_ROUNDS, PHILOX_W0, PHILOX_W1

_M0 = tl.constexpr(PHILOX_M0)
_M1 = tl.constexpr(PHILOX_M1)
_W0 = tl.constexpr(PHILOX_W0)
_W1 = tl.constexpr(PHILOX_W1)
_ROUNDS = tl.constexpr(PHILOX_ROUNDS)
_TWO_POW_M32 = tl.constexpr(2.0 ** -32)  # uint32 -> [0, 1)
_TWO_POW_M33 = tl.constexpr(2.0 ** -33)  # half a step: keeps u in (0, 1] so log(u) is finite
_TWO_PI = tl.constexpr(6.283185307179586)  # rounded to float32 by the multiply in float32 mode, as torch does


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 on uint32 blocks (broadcastable): counter ``(c0, c1, c2, c3)``, key ``(k0, k1)``.

    Returns the four uint32 output words. The key is bumped after every round; the bump after the last is unused,
    which equals the reference's bump before rounds 1..9.
    """
    for _ in tl.static_range(_ROUNDS):
        _c0 = c0
        _c2 = c2
        c0 = tl.umulhi(_M1, _c2) ^ c1 ^ k0
        c2 = tl.umulhi(_M0, _c0) ^ c3 ^ k1
        c1 = tl.mul(_c2, _M1, sanitize_overflow=False)
        c3 = tl.mul(_c0, _M0, sanitize_overflow=False)
        k0 = tl.add(k0, _W0, sanitize_overflow=False)
        k1 = tl.add(k1, _W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def split_u64(x):
    """Low and high uint32 words of a non-negative integer scalar or block (e.g. the int64 seed or counter)."""
    x = x.to(tl.int64)
    lo = (x & 0xFFFFFFFF).to(tl.uint32)
    hi = ((x >> 32) & 0xFFFFFFFF).to(tl.uint32)
    return lo, hi


@triton.jit
def load_rng_state(rng_state_ptr):
    """Read ``rng_state = [seed, counter]`` (int64, on the device) and split both into uint32 words.

    Reading the state inside the kernel, rather than taking it as a scalar argument, keeps a captured CUDA graph
    following the state's current value.
    """
    seed = tl.load(rng_state_ptr)
    counter = tl.load(rng_state_ptr + 1)
    seed_lo, seed_hi = split_u64(seed)
    counter_lo, counter_hi = split_u64(counter)
    return seed_lo, seed_hi, counter_lo, counter_hi


@triton.jit
def box_muller(xa, xb, COMPUTE_F64: tl.constexpr):
    """Two normals from two uint32 words: ``r = sqrt(-2 log u(xa))``, ``θ = 2π v(xb)``; ``(r cos θ, r sin θ)``."""
    if COMPUTE_F64:
        u = xa.to(tl.float64) * _TWO_POW_M32 + _TWO_POW_M33
        v = xb.to(tl.float64) * _TWO_POW_M32
        r = tl.sqrt(-2.0 * tl.log(u))  # float64 sqrt is IEEE-rounded already
    else:
        # x·2⁻³² is exact, so a fused multiply-add here rounds the same as the reference's multiply then add.
        u = xa.to(tl.float32) * _TWO_POW_M32 + _TWO_POW_M33
        v = xb.to(tl.float32) * _TWO_POW_M32
        r = tl.sqrt_rn(-2.0 * tl.log(u))  # tl.sqrt may be the approximate sqrt in float32; the reference rounds
    theta = _TWO_PI * v
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def philox_block(seed_lo, seed_hi, block_index, counter_lo, counter_hi):
    """The four uint32 words of Philox block ``block_index`` (integer block, any shape) at the given step counter."""
    c0 = block_index.to(tl.uint32)
    if tl.constexpr(block_index.dtype.primitive_bitwidth) > 32:
        c1 = (block_index >> 32).to(tl.uint32)
    else:
        # A 32-bit index has no high word (and `>> 32` of a 32-bit value is undefined in LLVM).
        c1 = tl.zeros_like(c0)
    # The counter words stay scalars: they broadcast against the block in the first round.
    return philox4x32_10(c0, c1, counter_lo, counter_hi, seed_lo, seed_hi)


@triton.jit
def normal4(seed_lo, seed_hi, block_index, counter_lo, counter_hi, COMPUTE_F64: tl.constexpr):
    """The four standard normals of Philox block ``block_index``: stream elements ``4·j + 0..3``.

    ``seed_*``/``counter_*``: uint32 scalars (see ``load_rng_state``); ``block_index``: integer block of any shape
    (int32 or int64, non-negative). Returns four blocks of ``block_index``'s shape in float64 if ``COMPUTE_F64``
    else float32.
    """
    x0, x1, x2, x3 = philox_block(seed_lo, seed_hi, block_index, counter_lo, counter_hi)
    n0, n1 = box_muller(x0, x1, COMPUTE_F64)
    n2, n3 = box_muller(x2, x3, COMPUTE_F64)
    return n0, n1, n2, n3


@triton.jit
def interleave4(n0, n1, n2, n3, BLOCK: tl.constexpr):
    """Four 1-D blocks of ``BLOCK`` values → one block of ``4·BLOCK`` in the order n0[0], n1[0], n2[0], n3[0], n0[1]..

    ``join(join(n0, n2), join(n1, n3))`` has shape (BLOCK, 2, 2) with ``[k, a, b] = n_{2a+b}[k]``; the row-major
    reshape (``can_reorder=False``) lays it out in stream order.
    """
    return tl.reshape(tl.join(tl.join(n0, n2), tl.join(n1, n3)), [4 * BLOCK])
