"""The fused Langevin step as one Triton kernel: noise, prior, drift and update in a single pass over memory.

Computes what ``fastlangevin.ops.langevin_step_reference`` computes, up to float rounding of the noise's
``log``/``cos``/``sin`` (see there for the formula, the sign convention and the prior kinds)::

    out = z − (step_size/2)·(grad + prior_term) + noise_scale·ω,   ω = the Philox stream at rng_state = [seed, counter]

Each program owns ``BLOCK`` Philox blocks = ``4·BLOCK`` consecutive elements: it draws the four normals of each block
once and interleaves them into stream order. float16/bfloat16/float32 are computed in float32, float64 in float64.
The kernel reads ``rng_state`` and does not advance it: advancing the counter is the caller's job.

The launchers check their arguments and launch; ``fastlangevin.ops.langevin_step`` registers the step as the op
``fastlangevin::langevin_step_triton`` (``torch.library.triton_op``, passing ``wrap=utils.wrap_triton``, which is
``torch.library.wrap_triton`` for compiled kernels, so that ``torch.compile`` sees the kernel) with an explicit
fake and the autograd formula. The kernels (``langevin_step_kernel``, ``normal_noise_kernel``) and
``launch_settings`` are public for a launcher written elsewhere.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
import triton
import triton.language as tl

from fastlangevin.ops.codes import PRIOR_DIAGONAL, PRIOR_FLAT, PRIOR_NORMAL
from fastlangevin.ops.philox import compute_dtype
from fastlangevin.ops.triton import codes
from fastlangevin.ops.triton.philox import interleave4, load_rng_state, normal4
from fastlangevin.ops.triton.utils import scalar_as, to_storage

MAX_ELEMENTS_PER_PROGRAM = 2048
MIN_ELEMENTS_PER_PROGRAM = 64
ELEMENTS_PER_WARP = 256  # 8 elements (two Philox blocks) per thread


class LaunchSettings(NamedTuple):
    """How to launch an elementwise stream kernel over ``n`` elements."""

    block: int  # Philox blocks per program; the program covers 4·block elements
    num_warps: int
    grid: tuple[int]
    index_64: bool  # whether element offsets need int64


def launch_settings(n: int) -> LaunchSettings:
    """Block size, warps and grid for ``n`` elements: the one place these are chosen (no autotune).

    Elements per program: the next power of two of ``n`` clamped to [64, 2048]; one warp per 256 elements. Offsets
    switch to int64 only when the last program's offsets would pass the int32 range (int32 keeps the
    ``% n_features`` of the diagonal prior cheap).
    """
    elements = min(max(triton.next_power_of_2(max(n, 1)), MIN_ELEMENTS_PER_PROGRAM), MAX_ELEMENTS_PER_PROGRAM)
    num_warps = max(1, min(8, elements // ELEMENTS_PER_WARP))
    grid = (triton.cdiv(n, elements),)
    index_64 = grid[0] * elements > 2**31 - 1  # the last program's offsets reach grid·elements − 1
    return LaunchSettings(block=elements // 4, num_warps=num_warps, grid=grid, index_64=index_64)


@triton.jit
def _program_offsets(BLOCK: tl.constexpr, INDEX_64: tl.constexpr):
    """This program's Philox block indices (BLOCK) and element offsets (4·BLOCK), int64 if INDEX_64."""
    if INDEX_64:
        pid = tl.program_id(0).to(tl.int64)
    else:
        pid = tl.program_id(0)
    block_index = pid * BLOCK + tl.arange(0, BLOCK)
    offsets = pid * (4 * BLOCK) + tl.arange(0, 4 * BLOCK)
    return block_index, offsets


@triton.jit
def _stream_noise(rng_state_ptr, block_index, BLOCK: tl.constexpr, COMPUTE_F64: tl.constexpr):
    """The stream's 4·BLOCK normals for these Philox blocks, in element order."""
    seed_lo, seed_hi, counter_lo, counter_hi = load_rng_state(rng_state_ptr)
    n0, n1, n2, n3 = normal4(seed_lo, seed_hi, block_index, counter_lo, counter_hi, COMPUTE_F64)
    return interleave4(n0, n1, n2, n3, BLOCK)


@triton.jit
def langevin_step_kernel(z_ptr, grad_ptr, out_ptr, rng_state_ptr, prior_mean_ptr, prior_inv_var_ptr, n, n_features,
                         half_step: tl.float64, noise_scale: tl.float64, PRIOR_KIND: tl.constexpr,
                         NOISE: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr,
                         INDEX_64: tl.constexpr):
    """``out = z − half_step·(grad + prior_term) + noise_scale·ω`` over ``n`` contiguous elements.

    ``half_step`` = step_size/2 (halved on the host in float64, as the reference does); both float scalars are
    annotated fp64 so that float64 runs are not rounded through float32. Prior pointers are read only when
    ``PRIOR_KIND`` is diagonal (element i uses feature ``i % n_features``); ``rng_state`` only when ``NOISE``.
    """
    CDT: tl.constexpr = tl.float64 if COMPUTE_F64 else tl.float32
    block_index, offsets = _program_offsets(BLOCK, INDEX_64)
    mask = offsets < n
    z = tl.load(z_ptr + offsets, mask=mask, other=0.0).to(CDT)
    drift = tl.load(grad_ptr + offsets, mask=mask, other=0.0).to(CDT)
    if PRIOR_KIND == codes.PRIOR_NORMAL:
        drift = drift + z
    elif PRIOR_KIND == codes.PRIOR_DIAGONAL:
        feature = offsets % n_features
        mean = tl.load(prior_mean_ptr + feature, mask=mask, other=0.0).to(CDT)
        inv_var = tl.load(prior_inv_var_ptr + feature, mask=mask, other=0.0).to(CDT)
        drift = drift + inv_var * (z - mean)
    result = z - scalar_as(half_step, CDT) * drift
    if NOISE:
        noise = _stream_noise(rng_state_ptr, block_index, BLOCK, COMPUTE_F64)
        result = result + scalar_as(noise_scale, CDT) * noise
    tl.store(out_ptr + offsets, to_storage(result, out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def normal_noise_kernel(out_ptr, rng_state_ptr, n, COMPUTE_F64: tl.constexpr, BLOCK: tl.constexpr,
                        INDEX_64: tl.constexpr):
    """The first ``n`` elements of the stream at ``rng_state``, cast to ``out``'s dtype."""
    block_index, offsets = _program_offsets(BLOCK, INDEX_64)
    noise = _stream_noise(rng_state_ptr, block_index, BLOCK, COMPUTE_F64)
    tl.store(out_ptr + offsets, to_storage(noise, out_ptr.dtype.element_ty), mask=offsets < n)


def check_rng_state(rng_state: torch.Tensor, device: torch.device) -> None:
    if rng_state.dtype != torch.int64 or rng_state.numel() < 2 or not rng_state.is_contiguous():
        raise ValueError(f"rng_state must be a contiguous int64 tensor [seed, counter], got dtype {rng_state.dtype} "
                         f"with shape {tuple(rng_state.shape)}; make it with torch.tensor([seed, 0], "
                         f"dtype=torch.int64, device=...)")
    if rng_state.device != device:
        raise ValueError(f"rng_state must be on {device} (the kernel reads it there), got {rng_state.device}")


def check_prior_args(prior_kind: int, prior_mean, prior_inv_var, n_features: int, ctype: torch.dtype,
                     device: torch.device) -> None:
    """The prior arguments of the Triton launchers: a known kind; for the diagonal prior, contiguous 1-D
    mean and inverse variance of length ``n_features`` in the compute dtype on ``device``."""
    if prior_kind == PRIOR_DIAGONAL:
        for name, t in (("prior_mean", prior_mean), ("prior_inv_var", prior_inv_var)):
            if t is None or t.dim() != 1 or t.numel() != n_features or t.dtype != ctype or t.device != device \
                    or not t.is_contiguous():
                got = "None" if t is None else f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"
                raise ValueError(f"{name} must be a contiguous 1-D tensor of length {n_features} (= z[0].numel()), "
                                 f"{ctype}, on {device} for the diagonal prior; got {got}")
    elif prior_kind not in (PRIOR_FLAT, PRIOR_NORMAL):
        raise ValueError(f"prior_kind must be {PRIOR_FLAT} (flat), {PRIOR_NORMAL} (normal) or {PRIOR_DIAGONAL} "
                         f"(diagonal), got {prior_kind}")


def langevin_step_triton(z: torch.Tensor, grad: torch.Tensor, out: torch.Tensor, rng_state: torch.Tensor,
                         step_size: float, noise_scale: float, prior_kind: int,
                         prior_mean: torch.Tensor | None, prior_inv_var: torch.Tensor | None,
                         wrap: Optional[Callable] = None) -> None:
    """One Langevin step written into ``out`` (which may be ``z`` itself: each element is read before it is written).

    ``z``, ``grad``, ``out``: contiguous, same shape, dtype (float16/bfloat16/float32/float64) and device;
    ``rng_state``: int64 ``[seed, counter]`` on that device, read by the kernel, not advanced; ``prior_kind``: 0 flat,
    1 N(0, I), 2 diagonal with ``prior_mean``/``prior_inv_var`` 1-D of length ``z[0].numel()`` in the compute dtype
    (float64 for float64, else float32); for other kinds they are ignored and may be None. ``wrap``: applied to the
    kernel before launching (``utils.wrap_triton`` inside a ``triton_op``); None launches it directly.
    """
    for name, t in (("grad", grad), ("out", out)):
        if t.shape != z.shape or t.dtype != z.dtype or t.device != z.device:
            raise ValueError(f"{name} must match z (shape {tuple(z.shape)}, {z.dtype}, {z.device}), got "
                             f"shape {tuple(t.shape)}, {t.dtype}, {t.device}")
    for name, t in (("z", z), ("grad", grad), ("out", out)):
        if not t.is_contiguous():
            raise ValueError(f"{name} must be contiguous; call .contiguous() on it first")
    if z.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"z must be float16, bfloat16, float32 or float64, got {z.dtype}")
    ctype = compute_dtype(z.dtype)
    n_features = z[0].numel() if z.dim() > 0 else 1
    check_prior_args(prior_kind, prior_mean, prior_inv_var, n_features, ctype, z.device)
    noise = noise_scale != 0.0
    if noise:
        check_rng_state(rng_state, z.device)
    n = z.numel()
    if n == 0:
        return
    settings = launch_settings(n)
    # Unused pointer slots get z: a real tensor keeps the argument list the same for every prior kind.
    mean = prior_mean if prior_kind == PRIOR_DIAGONAL else z
    inv_var = prior_inv_var if prior_kind == PRIOR_DIAGONAL else z
    kernel = langevin_step_kernel if wrap is None else wrap(langevin_step_kernel)
    kernel[settings.grid](
        z, grad, out, rng_state, mean, inv_var, n, n_features, float(step_size) / 2, float(noise_scale),
        PRIOR_KIND=prior_kind, NOISE=noise, COMPUTE_F64=ctype == torch.float64, BLOCK=settings.block,
        INDEX_64=settings.index_64, num_warps=settings.num_warps)


def normal_noise_triton(out: torch.Tensor, rng_state: torch.Tensor) -> None:
    """Fill the contiguous 1-D ``out`` with the stream's first ``out.numel()`` normals at ``rng_state``.

    Computed in float64 for a float64 ``out``, else in float32 and rounded to ``out``'s dtype; matches
    ``fastlangevin.ops.philox.normal_noise``. ``rng_state`` is read, not advanced.
    """
    if out.dim() != 1 or not out.is_contiguous() or not out.is_floating_point():
        raise ValueError(f"out must be a contiguous 1-D float tensor, got shape {tuple(out.shape)}, {out.dtype}")
    check_rng_state(rng_state, out.device)
    n = out.numel()
    if n == 0:
        return
    settings = launch_settings(n)
    normal_noise_kernel[settings.grid](
        out, rng_state, n, COMPUTE_F64=out.dtype == torch.float64, BLOCK=settings.block,
        INDEX_64=settings.index_64, num_warps=settings.num_warps)
