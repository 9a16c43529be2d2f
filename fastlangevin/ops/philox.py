"""The one noise stream of fastlangevin: counter-based Philox4x32-10 + Box-Muller, in plain PyTorch.

Every backend (reference, Triton, C++ CPU, CUDA) draws exactly these numbers, so the same seed gives the same chain
on each of them up to float rounding. The definition:

* key   ``(k0, k1) = (seed & 0xFFFFFFFF, seed >> 32)`` for a seed in ``[0, 2**63)``;
* element ``i`` of the flattened (contiguous) tensor at step ``counter`` lies in block ``j = i // 4``, lane ``i % 4``;
  the block is one Philox4x32-10 call on counter ``(j & 0xFFFFFFFF, j >> 32, counter & 0xFFFFFFFF, counter >> 32)``
  giving four uint32 words ``x0..x3``;
* uniforms ``u(x) = x·2⁻³² + 2⁻³³`` (in (0, 1], never 0) and ``v(x) = x·2⁻³²`` (in [0, 1));
* Box-Muller on the pairs: ``r = sqrt(-2·log u(x0))``, ``θ = 2π·v(x1)`` give lanes 0, 1 = ``r·cos θ, r·sin θ``;
  ``(x2, x3)`` give lanes 2, 3 the same way.

The arithmetic runs in float64 for float64 tensors and in float32 otherwise (half/bfloat16 round the float32 result).
"""

from __future__ import annotations

import math
import numbers

import torch

PHILOX_M0 = 0xD2511F53
PHILOX_M1 = 0xCD9E8D57
PHILOX_W0 = 0x9E3779B9
PHILOX_W1 = 0xBB67AE85
PHILOX_ROUNDS = 10
MASK32 = 0xFFFFFFFF
MAX_SEED = 2**63 - 1


def _mulhilo32(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """High and low 32 bits of ``a * b`` for a 32-bit constant ``a`` and int64 tensor ``b`` holding uint32 values.

    Splits ``b`` into 16-bit halves so that no intermediate product leaves the int64 range.
    """
    b_lo = b & 0xFFFF
    b_hi = b >> 16
    p_lo = a * b_lo  # < 2**48
    p_hi = a * b_hi  # < 2**48
    mid = p_hi + (p_lo >> 16)  # < 2**49
    hi = mid >> 16
    lo = ((mid & 0xFFFF) << 16) | (p_lo & 0xFFFF)
    return hi & MASK32, lo


def philox4x32(c0, c1, c2, c3, k0, k1, rounds: int = PHILOX_ROUNDS):
    """Philox4x32 on int64 tensors holding uint32 values (broadcastable). Returns four int64 tensors of uint32."""
    for r in range(rounds):
        if r:
            k0 = (k0 + PHILOX_W0) & MASK32
            k1 = (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo32(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo32(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return c0, c1, c2, c3


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the noise and the update are computed in: float64 stays, every other float becomes float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _check_state(rng_state) -> None:
    """``rng_state``: an integer tensor ``[seed, counter]`` (its values are read by kernels, not here: no sync)."""
    if not isinstance(rng_state, torch.Tensor) or rng_state.shape != (2,) or rng_state.dtype == torch.bool \
            or rng_state.is_floating_point() or rng_state.is_complex():
        raise TypeError(f"rng_state must be an integer tensor [seed, counter] of shape (2,), got "
                        f"{getattr(rng_state, 'dtype', type(rng_state).__name__)} "
                        f"{tuple(getattr(rng_state, 'shape', ()))}")


def normal_noise(n: int, rng_state: torch.Tensor, dtype: torch.dtype = torch.float32,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """``n`` standard normals of the stream at ``rng_state = tensor([seed, counter], dtype=int64)``.

    Returns a 1-D tensor of ``compute_dtype(dtype)`` on ``device`` (default: ``rng_state``'s). Reads the state as a
    tensor (no ``.item()``), so it can be captured in a CUDA graph.
    """
    if isinstance(n, bool) or not isinstance(n, (numbers.Integral, torch.SymInt)):  # SymInt: under torch.compile
        raise TypeError(f"n must be an int >= 0, got {type(n).__name__} {n!r}")
    if n < 0:
        raise ValueError(f"n must be an int >= 0, got {n}")
    _check_state(rng_state)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    device = rng_state.device if device is None else torch.device(device)
    ctype = compute_dtype(dtype)
    state = rng_state.to(device=device, dtype=torch.int64)
    seed, counter = state[0], state[1]
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    c2, c3 = counter & MASK32, (counter >> 32) & MASK32
    n_blocks = (n + 3) // 4
    j = torch.arange(n_blocks, dtype=torch.int64, device=device)
    x0, x1, x2, x3 = philox4x32(j & MASK32, (j >> 32) & MASK32, c2, c3, k0, k1)
    scale = 2.0 ** -32
    two_pi = 2.0 * math.pi

    def pair(xa, xb):
        u = xa.to(ctype) * scale + 2.0 ** -33
        v = xb.to(ctype) * scale
        r = torch.sqrt(-2.0 * torch.log(u))
        theta = two_pi * v
        return r * torch.cos(theta), r * torch.sin(theta)

    n0, n1 = pair(x0, x1)
    n2, n3 = pair(x2, x3)
    return torch.stack((n0, n1, n2, n3), dim=1).reshape(-1)[:n]


MALA_DOMAIN_BIT = 1 << 31  # set in the counter's high word: the acceptance uniforms never meet the step noise


def acceptance_uniforms(batch: int, rng_state: torch.Tensor, dtype: torch.dtype = torch.float32,
                        device: torch.device | str | None = None) -> torch.Tensor:
    """MALA's per-sample acceptance uniforms in (0, 1] at ``rng_state = [seed, counter]``: shape (batch,).

    Sample ``b`` takes word x0 of the Philox block at counter ``(b & 0xFFFFFFFF, b >> 32, counter & 0xFFFFFFFF,
    (counter >> 32) | 2³¹)`` — a domain of the stream that the step noise (counters < 2⁶³) never uses — and
    ``u = x0·2⁻³² + 2⁻³³``, in the compute dtype.
    """
    device = rng_state.device if device is None else torch.device(device)
    state = rng_state.to(device=device, dtype=torch.int64)
    seed, counter = state[0], state[1]
    b = torch.arange(batch, dtype=torch.int64, device=device)
    x0, _, _, _ = philox4x32(b & MASK32, (b >> 32) & MASK32, counter & MASK32,
                             ((counter >> 32) & MASK32) | MALA_DOMAIN_BIT, seed & MASK32, (seed >> 32) & MASK32)
    return x0.to(compute_dtype(dtype)) * 2.0 ** -32 + 2.0 ** -33
