"""The fully fused MLP-energy Langevin chain as one Triton kernel: all K steps in a single launch.

Computes what the generic chain computes for an ``MLPEnergy`` (the contract is the docstring of
``fastlangevin.ops.mlp_chain``): per step the forward pass through every layer, the analytic input gradient back
through them, clipping, the prior term, the Philox noise (element ``i = b·D + d`` at counter ``rng_state[1] + k``,
the same numbers as ``langevin_step_triton``) and the update; for MALA also the proposal's energy and gradient, the
Metropolis test with ``philox.acceptance_uniforms`` and the accept/reject.

Layout. Each program owns ``BLOCK_B`` samples and loops over all K steps with z (and for MALA the current E and
gradient) in registers. Widths are padded to powers of two (≥ 16, for ``tl.dot``): the input to ``D_PAD``, every
hidden layer to one ``H_PAD``. The launcher packs the weights into one zero-padded buffer::

    W_0 (H_PAD, D_PAD) | W_1 … W_{L−2} (H_PAD, H_PAD each) | w_{L−1} (H_PAD,)      [L = 1: just w_0 (D_PAD,)]

and the biases into ``b_0 … b_{L−2}`` (H_PAD each) then ``b_{L−1}`` (zeros without biases). Zero padding keeps the
padded units out of every result (their weights in and out are 0).

The matrix products run in chunks of ``CHUNK`` along the contracted width, so no operand tile is larger than
``CHUNK × max(D_PAD, H_PAD)``: the layer inputs (forward) and the back-propagated deltas (backward) are staged in a
small per-program scratch buffer in global memory (it stays in L1/L2), with a CTA barrier between writing it and
reading it back in chunks. The activation derivatives of all but the last hidden layer are kept there too. The last
layer (width 1) is a row dot product, not a ``tl.dot``. float32 products use ``input_precision="ieee"`` (no TF32),
so the chain matches the reference to float32 rounding; float64 runs in float64 throughout.

Registering with ``torch.library`` (the launcher is written for it, as ``langevin_step_triton``)::

    @torch.library.triton_op("fastlangevin::mlp_chain", mutates_args={"z", "energies", "grad_norms", "accepted"})
    def _(z, weights, biases, ...) -> None:
        mlp_chain_triton(z, weights, biases, ..., wrap=torch.library.wrap_triton)
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from fastlangevin.ops.langevin_step_reference import PRIOR_DIAGONAL
from fastlangevin.ops.mlp_chain import ACTIVATIONS
from fastlangevin.ops.triton.langevin_step import _check_rng_state, check_prior_args
from fastlangevin.ops.triton.philox import _box_muller, philox_block, split_u64
from fastlangevin.ops.triton.utils import loop_bound, scalar_as

ULA, MALA = 0, 1
MAX_LAYERS = 4
MIN_PAD = 16  # tl.dot needs every dimension ≥ 16
# The contracted width per tl.dot. The float32 product (input_precision="ieee") runs on FMA units, and Triton keeps
# each thread's operand rows and columns for the whole chunk in registers: (rows + columns per thread) × CHUNK, so
# the smallest chunk tl.dot allows keeps register pressure lowest.
CHUNK = 16
# Widest padded layer (input or hidden) per compute dtype: one chunked operand tile, CHUNK × width, stays within
# OPERAND_TILE_BYTES of shared memory (the K loop is software-pipelined, which doubles it).
OPERAND_TILE_BYTES = 64 * 1024
MAX_PADDED_WIDTH = {torch.float32: OPERAND_TILE_BYTES // (CHUNK * 4), torch.float64: OPERAND_TILE_BYTES // (CHUNK * 8)}
# Samples per program: the (BLOCK_B, width) accumulator is aimed at ACCUMULATOR_ELEMENTS, 16 per thread at 8 warps.
# More samples per program share each weight read; fewer keep the registers in bounds.
ACCUMULATOR_ELEMENTS = 4096
MAX_BLOCK_B = 64
ELEMENTS_PER_WARP = 512

_SQRT1_2 = tl.constexpr(0.7071067811865476)  # M_SQRT1_2
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # M_2_SQRTPI · M_SQRT1_2 · 0.5, torch's GELU kBeta
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)  # M_SQRT2 · M_2_SQRTPI · 0.5, torch's tanh-GELU kBeta
_GELU_KAPPA = tl.constexpr(0.044715)
_SOFTPLUS_THRESHOLD = tl.constexpr(20.0)
_TWO_POW_M32 = tl.constexpr(2.0 ** -32)
_TWO_POW_M33 = tl.constexpr(2.0 ** -33)
_MALA_DOMAIN_BIT = tl.constexpr(0x80000000)  # philox.MALA_DOMAIN_BIT in the counter's high word
_CLIP_EPS = tl.constexpr(1e-12)


class MLPChainLaunch(NamedTuple):
    """How to launch the fused chain for one network and batch."""

    block_b: int  # samples per program
    num_warps: int
    grid: tuple[int]
    d_pad: int  # padded input width
    h_pad: int  # padded hidden width (MIN_PAD when there is no hidden layer)
    chunk: int  # contracted width per tl.dot
    n_slots: int  # scratch slots of (block_b, max(d_pad, h_pad)) per program
    index_64: bool  # whether element offsets (b·D + d) need int64


def launch_settings(batch: int, dims: Sequence[int], dtype: torch.dtype) -> MLPChainLaunch:
    """Block size, warps, padding, chunk and grid for ``dims = (D, H_1, …, 1)``: the one place these are chosen.

    Raises ``ValueError`` naming the limit when the network cannot run fused (more than ``MAX_LAYERS`` layers, a
    width over ``MAX_PADDED_WIDTH``), so the caller can fall back to the step-by-step chain.
    """
    dims = [int(d) for d in dims]
    n_layers = len(dims) - 1
    if not 1 <= n_layers <= MAX_LAYERS:
        raise ValueError(f"the fused Triton chain supports 1 to {MAX_LAYERS} weight layers, got {n_layers} "
                         f"(dims {tuple(dims)}); use the step-by-step chain for deeper networks")
    d_pad = max(MIN_PAD, triton.next_power_of_2(dims[0]))
    hidden = dims[1:-1]
    h_pad = max(MIN_PAD, triton.next_power_of_2(max(hidden))) if hidden else MIN_PAD
    limit = MAX_PADDED_WIDTH[dtype]
    if max(d_pad, h_pad) > limit:
        raise ValueError(f"the fused Triton chain supports layer widths up to {limit} for {dtype} (padded to a power "
                         f"of two), got dims {tuple(dims)}; use the step-by-step chain for wider layers")
    width = max(d_pad, h_pad)
    block_b = max(MIN_PAD, min(MAX_BLOCK_B, ACCUMULATOR_ELEMENTS // width, triton.next_power_of_2(max(batch, 1))))
    num_warps = max(4, min(8, block_b * width // ELEMENTS_PER_WARP))
    grid = (triton.cdiv(batch, block_b),)
    # layer inputs / deltas for layers 0..L−2, activation derivatives of hidden layers 1..L−2
    n_slots = max(1, 2 * n_layers - 3)
    index_64 = grid[0] * block_b * dims[0] > 2**31 - 1
    return MLPChainLaunch(block_b, num_warps, grid, d_pad, h_pad, CHUNK, n_slots, index_64)


@triton.jit
def _tanh(x):
    """tanh from one exp, odd-symmetric, absolute error ~ one ulp of 1 (no tanh in tl.math)."""
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _log1p(x):
    """log(1 + x) accurate for small x (no log1p in tl.math): log(u)·x/(u − 1) with u = 1 + x rounded."""
    u = 1.0 + x
    return tl.where(u == 1.0, x, tl.log(u) * (x / tl.where(u == 1.0, 1.0, u - 1.0)))


@triton.jit
def _activation(a, ACT: tl.constexpr, param):
    """(act(a), act'(a)) for a pre-activation block, with torch's formulas and branch points."""
    if ACT == 0:  # relu
        h = tl.where(a > 0, a, 0.0)
        d = tl.where(a > 0, 1.0, 0.0).to(a.dtype)
    elif ACT == 1:  # leaky_relu, param = negative slope
        h = tl.where(a > 0, a, a * param)
        d = tl.where(a > 0, 1.0, param)
    elif ACT == 2:  # silu
        e = tl.exp(-a)
        s = 1.0 / (1.0 + e)
        h = a / (1.0 + e)
        d = s * (1.0 + a * (1.0 - s))
    elif ACT == 3:  # gelu (erf)
        cdf = 0.5 * (1.0 + tl.math.erf(a * _SQRT1_2))
        h = a * cdf
        d = cdf + a * (tl.exp(-0.5 * a * a) * _INV_SQRT_2PI)
    elif ACT == 4:  # gelu_tanh
        # Module constants stay on the right of a block: under the interpreter, constexpr * block is a constexpr.
        a_sq = a * a
        t = _tanh((a + (a_sq * a) * _GELU_KAPPA) * _SQRT_2_OVER_PI)
        h = 0.5 * a * (1.0 + t)
        inner_derivative = (1.0 + a_sq * (3.0 * _GELU_KAPPA)) * _SQRT_2_OVER_PI
        d = 0.5 * (1.0 + t) + (0.5 * a) * (1.0 - t * t) * inner_derivative
    elif ACT == 5:  # elu, param = alpha
        e = tl.exp(tl.where(a > 0, 0.0, a))
        h = tl.where(a > 0, a, (e - 1.0) * param)
        d = tl.where(a > 0, 1.0, e * param)
    elif ACT == 6:  # softplus, beta 1, threshold 20
        e = tl.exp(tl.where(a > _SOFTPLUS_THRESHOLD, 0.0, a))
        h = tl.where(a > _SOFTPLUS_THRESHOLD, a, _log1p(e))
        d = tl.where(a > _SOFTPLUS_THRESHOLD, 1.0, e / (e + 1.0))
    else:  # tanh
        h = _tanh(a)
        d = 1.0 - h * h
    return h, d


@triton.jit
def _slot(scratch, slot, BLOCK_B: tl.constexpr, WIDTH: tl.constexpr, SLOT_W: tl.constexpr):
    """Pointers to the (BLOCK_B, WIDTH) block of scratch slot ``slot`` (a slot is (BLOCK_B, SLOT_W), row-major)."""
    rows = tl.arange(0, BLOCK_B)
    return scratch + slot * (BLOCK_B * SLOT_W) + rows[:, None] * SLOT_W + tl.arange(0, WIDTH)[None, :]


@triton.jit
def _layer_forward(x_slot, w_ptr, b_ptr, BLOCK_B: tl.constexpr, K_PAD: tl.constexpr, N_PAD: tl.constexpr,
                   CHUNK: tl.constexpr, SLOT_W: tl.constexpr, CDT: tl.constexpr):
    """x W^T + b for x (BLOCK_B, K_PAD) staged at ``x_slot`` and W (N_PAD, K_PAD): (BLOCK_B, N_PAD), chunked in K."""
    rows = tl.arange(0, BLOCK_B)
    cols_n = tl.arange(0, N_PAD)
    acc = tl.zeros((BLOCK_B, N_PAD), CDT)
    for k0 in range(0, K_PAD, CHUNK):
        kk = k0 + tl.arange(0, CHUNK)
        x = tl.load(x_slot + rows[:, None] * SLOT_W + kk[None, :])
        w_t = tl.load(w_ptr + cols_n[None, :] * K_PAD + kk[:, None])  # (CHUNK, N_PAD) of W^T
        acc += tl.dot(x, w_t, input_precision="ieee")
    return acc + tl.load(b_ptr + cols_n)[None, :]


@triton.jit
def _layer_backward(delta_slot, w_ptr, BLOCK_B: tl.constexpr, K_PAD: tl.constexpr, N_PAD: tl.constexpr,
                    CHUNK: tl.constexpr, SLOT_W: tl.constexpr, CDT: tl.constexpr):
    """delta W for delta (BLOCK_B, N_PAD) staged at ``delta_slot`` and W (N_PAD, K_PAD): (BLOCK_B, K_PAD), chunked
    in N."""
    rows = tl.arange(0, BLOCK_B)
    cols_k = tl.arange(0, K_PAD)
    acc = tl.zeros((BLOCK_B, K_PAD), CDT)
    for n0 in range(0, N_PAD, CHUNK):
        nn = n0 + tl.arange(0, CHUNK)
        delta = tl.load(delta_slot + rows[:, None] * SLOT_W + nn[None, :])
        w = tl.load(w_ptr + nn[:, None] * K_PAD + cols_k[None, :])  # (CHUNK, K_PAD) of W
        acc += tl.dot(delta, w, input_precision="ieee")
    return acc


@triton.jit
def _energy_and_grad(z, w_ptr, b_ptr, scratch, out_sign, act_param, NUM_LAYERS: tl.constexpr, ACT: tl.constexpr,
                     BLOCK_B: tl.constexpr, D_PAD: tl.constexpr, H_PAD: tl.constexpr, CHUNK: tl.constexpr,
                     SLOT_W: tl.constexpr):
    """E (BLOCK_B,) and ∇E (BLOCK_B, D_PAD) of the packed MLP at z (BLOCK_B, D_PAD), in z's dtype.

    ``scratch``: this program's slots of (BLOCK_B, SLOT_W). Slot l (l ≤ L−2) holds the input h_l of layer l in the
    forward pass and the delta ∂E/∂a_{l+1} in the backward pass; slot L−1+l (l ≤ L−3) holds act'(a_{l+1}). Every
    write is fenced by CTA barriers: other threads read the slot back in chunks.
    """
    SLOT: tl.constexpr = BLOCK_B * SLOT_W
    W_HIDDEN: tl.constexpr = H_PAD * D_PAD  # offset of W_1 in the packed weights
    if NUM_LAYERS == 1:
        w = tl.load(w_ptr + tl.arange(0, D_PAD))
        e = out_sign * (tl.sum(z * w[None, :], axis=1) + tl.load(b_ptr))
        g = tl.zeros_like(z) + (out_sign * w)[None, :]
    else:
        tl.debug_barrier()  # every thread is done reading slot 0 from the previous call
        tl.store(_slot(scratch, 0, BLOCK_B, D_PAD, SLOT_W), z)
        tl.debug_barrier()
        # forward: a_{l+1} = W_l h_l + b_l, h_{l+1} = act(a_{l+1}) for the hidden layers l = 0..L−2
        a = _layer_forward(scratch, w_ptr, b_ptr, BLOCK_B, D_PAD, H_PAD, CHUNK, SLOT_W, z.dtype)
        h, dact = _activation(a, ACT, act_param)
        for l in tl.static_range(1, NUM_LAYERS - 1):
            tl.store(_slot(scratch, l, BLOCK_B, H_PAD, SLOT_W), h)
            tl.store(_slot(scratch, NUM_LAYERS - 2 + l, BLOCK_B, H_PAD, SLOT_W), dact)  # act'(a_l)
            tl.debug_barrier()
            a = _layer_forward(scratch + l * SLOT, w_ptr + W_HIDDEN + (l - 1) * H_PAD * H_PAD,
                               b_ptr + l * H_PAD, BLOCK_B, H_PAD, H_PAD, CHUNK, SLOT_W, z.dtype)
            h, dact = _activation(a, ACT, act_param)
        w_last = tl.load(w_ptr + W_HIDDEN + (NUM_LAYERS - 2) * H_PAD * H_PAD + tl.arange(0, H_PAD))
        e = out_sign * (tl.sum(h * w_last[None, :], axis=1) + tl.load(b_ptr + (NUM_LAYERS - 1) * H_PAD))
        # backward: ∂E/∂h_l = (∂E/∂a_{l+1}) W_l, ∂E/∂a_l = ∂E/∂h_l · act'(a_l), from the last hidden layer down
        delta = (out_sign * w_last)[None, :] * dact
        for i in tl.static_range(NUM_LAYERS - 2):  # layers l = L−2 .. 1 (hidden to hidden)
            tl.debug_barrier()
            tl.store(_slot(scratch, NUM_LAYERS - 2 - i, BLOCK_B, H_PAD, SLOT_W), delta)
            tl.debug_barrier()
            delta = _layer_backward(scratch + (NUM_LAYERS - 2 - i) * SLOT,
                                    w_ptr + W_HIDDEN + (NUM_LAYERS - 3 - i) * H_PAD * H_PAD,
                                    BLOCK_B, H_PAD, H_PAD, CHUNK, SLOT_W, z.dtype)
            delta = delta * tl.load(_slot(scratch, 2 * NUM_LAYERS - 4 - i, BLOCK_B, H_PAD, SLOT_W))
        tl.debug_barrier()
        tl.store(_slot(scratch, 0, BLOCK_B, H_PAD, SLOT_W), delta)
        tl.debug_barrier()
        g = _layer_backward(scratch, w_ptr, BLOCK_B, D_PAD, H_PAD, CHUNK, SLOT_W, z.dtype)
    return e, g


@triton.jit
def _norm(g, COMPUTE_F64: tl.constexpr):
    """Per-row Euclidean norm of a (BLOCK_B, D_PAD) block."""
    sq = tl.sum(g * g, axis=1)
    if COMPUTE_F64:
        return tl.sqrt(sq)
    else:
        return tl.sqrt_rn(sq)


@triton.jit
def _clip(g, norm, clip, CLIP: tl.constexpr):
    """g · min(1, clip/(‖g‖ + 1e−12)) per row, as ``_Evaluator`` clips."""
    if CLIP:
        eps = tl.full((1,), _CLIP_EPS, g.dtype)
        factor = clip / (norm + eps)
        g = g * tl.where(factor < 1.0, factor, 1.0)[:, None]
    return g


@triton.jit
def _prior_grad(z, mean, inv_var, PRIOR_KIND: tl.constexpr):
    """−∇log prior(z): 0, z, or inv_var·(z − mean)."""
    if PRIOR_KIND == 1:
        return z
    elif PRIOR_KIND == 2:
        return inv_var[None, :] * (z - mean[None, :])
    else:
        return tl.zeros_like(z)


@triton.jit
def _prior_energy(z, mean, inv_var, PRIOR_KIND: tl.constexpr):
    """U_prior(z) = −log prior(z) up to a constant, per row: 0, ½‖z‖², ½Σ inv_var (z − mean)²."""
    if PRIOR_KIND == 1:
        return 0.5 * tl.sum(z * z, axis=1)
    elif PRIOR_KIND == 2:
        diff = z - mean[None, :]
        return 0.5 * tl.sum(diff * (inv_var[None, :] * diff), axis=1)
    else:
        return tl.sum(tl.zeros_like(z), axis=1)


@triton.jit
def _normal_at(seed_lo, seed_hi, index, counter_lo, counter_hi, COMPUTE_F64: tl.constexpr):
    """The stream's normal for element ``index`` (any shape): lane ``index % 4`` of Philox block ``index // 4``.

    Draws only the Box-Muller pair the lane belongs to; the numbers are those of ``normal4``.
    """
    x0, x1, x2, x3 = philox_block(seed_lo, seed_hi, index >> 2, counter_lo, counter_hi)
    lane = index & 3
    first_pair = lane < 2
    c, s = _box_muller(tl.where(first_pair, x0, x2), tl.where(first_pair, x1, x3), COMPUTE_F64)
    return tl.where((lane & 1) == 0, c, s)


@triton.jit
def _log_acceptance_uniform(seed_lo, seed_hi, sample, counter_lo, counter_hi, CDT: tl.constexpr):
    """log u for MALA, u = ``acceptance_uniforms`` of these samples: word x0 in the counter's MALA domain."""
    x0, _, _, _ = philox_block(seed_lo, seed_hi, sample, counter_lo, counter_hi | _MALA_DOMAIN_BIT)
    return tl.log(x0.to(CDT) * _TWO_POW_M32 + _TWO_POW_M33)


@triton.jit
def mlp_chain_kernel(z_ptr, w_ptr, b_ptr, prior_mean_ptr, prior_inv_var_ptr, rng_state_ptr, energies_ptr,
                     grad_norms_ptr, accepted_ptr, scratch_ptr, batch, n_features, n_steps,
                     half_step: tl.float64, noise_scale: tl.float64, two_step: tl.float64, clip_grad: tl.float64,
                     activation_param: tl.float64, output_sign: tl.float64,
                     NUM_LAYERS: tl.constexpr, ACT: tl.constexpr, PRIOR_KIND: tl.constexpr, NOISE: tl.constexpr,
                     CLIP: tl.constexpr, METHOD: tl.constexpr, STORE_NORMS: tl.constexpr,
                     STORE_ACCEPTED: tl.constexpr, COMPUTE_F64: tl.constexpr, BLOCK_B: tl.constexpr,
                     D_PAD: tl.constexpr, H_PAD: tl.constexpr, CHUNK: tl.constexpr, N_SLOTS: tl.constexpr,
                     INDEX_64: tl.constexpr):
    """``n_steps`` Langevin (METHOD 0) or MALA (METHOD 1) steps of ``BLOCK_B`` samples of z (batch, n_features).

    Float scalars are annotated fp64 and rounded once to the compute dtype (``half_step`` = ε/2 and ``two_step`` = 2ε
    computed on the host in float64, as the reference does). Outputs at ``[k, b]`` (row-major (n_steps, batch)):
    energies always, grad norms if STORE_NORMS, accepted (uint8) if STORE_ACCEPTED.
    """
    CDT: tl.constexpr = tl.float64 if COMPUTE_F64 else tl.float32
    SLOT_W: tl.constexpr = D_PAD if D_PAD > H_PAD else H_PAD
    pid = tl.program_id(0)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    cols = tl.arange(0, D_PAD)
    row_ok = rows < batch
    col_ok = cols < n_features
    mask = row_ok[:, None] & col_ok[None, :]
    if INDEX_64:
        elements = rows.to(tl.int64)[:, None] * n_features + cols[None, :]
    else:
        elements = rows[:, None] * n_features + cols[None, :]
    scratch = scratch_ptr + pid.to(tl.int64) * (N_SLOTS * BLOCK_B * SLOT_W)

    z = tl.load(z_ptr + elements, mask=mask, other=0.0).to(CDT)
    if PRIOR_KIND == 2:
        mean = tl.load(prior_mean_ptr + cols, mask=col_ok, other=0.0).to(CDT)
        inv_var = tl.load(prior_inv_var_ptr + cols, mask=col_ok, other=0.0).to(CDT)
    else:
        mean = tl.zeros((D_PAD,), CDT)
        inv_var = tl.zeros((D_PAD,), CDT)
    half = scalar_as(half_step, CDT)
    sigma = scalar_as(noise_scale, CDT)
    two_eps = scalar_as(two_step, CDT)
    clip = scalar_as(clip_grad, CDT)
    act_param = scalar_as(activation_param, CDT)
    sign = scalar_as(output_sign, CDT)
    seed = tl.load(rng_state_ptr)
    counter0 = tl.load(rng_state_ptr + 1)
    seed_lo, seed_hi = split_u64(seed)

    if METHOD == 1:
        e, g = _energy_and_grad(z, w_ptr, b_ptr, scratch, sign, act_param, NUM_LAYERS, ACT, BLOCK_B, D_PAD, H_PAD,
                                CHUNK, SLOT_W)
        norm = _norm(g, COMPUTE_F64)
        g = _clip(g, norm, clip, CLIP)
    for k in range(n_steps):
        if METHOD == 0:
            e, g = _energy_and_grad(z, w_ptr, b_ptr, scratch, sign, act_param, NUM_LAYERS, ACT, BLOCK_B, D_PAD,
                                    H_PAD, CHUNK, SLOT_W)
            norm = _norm(g, COMPUTE_F64)
            g = _clip(g, norm, clip, CLIP)
        out = (tl.zeros((), tl.int64) + k) * batch + rows  # (K·B may pass the int32 range)
        tl.store(energies_ptr + out, e.to(energies_ptr.dtype.element_ty), mask=row_ok)
        if STORE_NORMS:
            tl.store(grad_norms_ptr + out, norm.to(grad_norms_ptr.dtype.element_ty), mask=row_ok)
        counter_lo, counter_hi = split_u64(counter0 + k)
        prior_g = _prior_grad(z, mean, inv_var, PRIOR_KIND)
        proposal = z - half * (g + prior_g)
        if NOISE:
            noise = _normal_at(seed_lo, seed_hi, elements, counter_lo, counter_hi, COMPUTE_F64)
            proposal = proposal + sigma * tl.where(col_ok[None, :], noise, 0.0)
        if METHOD == 0:
            z = proposal
        else:
            e_new, g_new = _energy_and_grad(proposal, w_ptr, b_ptr, scratch, sign, act_param, NUM_LAYERS, ACT,
                                            BLOCK_B, D_PAD, H_PAD, CHUNK, SLOT_W)
            norm_new = _norm(g_new, COMPUTE_F64)
            g_new = _clip(g_new, norm_new, clip, CLIP)
            prior_g_new = _prior_grad(proposal, mean, inv_var, PRIOR_KIND)
            backward = z - proposal + half * (g_new + prior_g_new)
            forward = proposal - z + half * (g + prior_g)
            log_alpha = ((e + _prior_energy(z, mean, inv_var, PRIOR_KIND))
                         - (e_new + _prior_energy(proposal, mean, inv_var, PRIOR_KIND))
                         - (tl.sum(backward * backward, axis=1) - tl.sum(forward * forward, axis=1)) / two_eps)
            log_u = _log_acceptance_uniform(seed_lo, seed_hi, rows, counter_lo, counter_hi, CDT)
            accept = log_u < log_alpha  # NaN (a non-finite proposal energy) rejects
            if STORE_ACCEPTED:
                tl.store(accepted_ptr + out, accept.to(tl.uint8), mask=row_ok)
            z = tl.where(accept[:, None], proposal, z)
            g = tl.where(accept[:, None], g_new, g)
            e = tl.where(accept, e_new, e)
            norm = tl.where(accept, norm_new, norm)
    tl.store(z_ptr + elements, z.to(z_ptr.dtype.element_ty), mask=mask)


def _identity(kernel):
    return kernel


def _pack(weights: Sequence[torch.Tensor], biases: Optional[Sequence[torch.Tensor]], settings: MLPChainLaunch,
          dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The zero-padded weight and bias buffers in the layout of the module docstring."""
    n_layers = len(weights)
    d_pad, h_pad = settings.d_pad, settings.h_pad
    size = d_pad if n_layers == 1 else h_pad * d_pad + (n_layers - 2) * h_pad * h_pad + h_pad
    packed_w = torch.zeros(size, dtype=dtype, device=device)
    packed_b = torch.zeros((n_layers - 1) * h_pad + 1, dtype=dtype, device=device)
    offset = 0
    for layer, w in enumerate(weights):
        out_pad = 1 if layer == n_layers - 1 else h_pad
        in_pad = d_pad if layer == 0 else h_pad
        packed_w[offset:offset + out_pad * in_pad].view(out_pad, in_pad)[:w.shape[0], :w.shape[1]] = w
        if biases is not None:
            packed_b[layer * h_pad:layer * h_pad + w.shape[0]] = biases[layer]
        offset += out_pad * in_pad
    return packed_w, packed_b


def _check_output(name, t, shape, dtype, device):
    if t.shape != shape or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, got "
                         f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"
                         f"{'' if t.is_contiguous() else ', not contiguous'}")


def mlp_chain_triton(z: torch.Tensor, weights: Sequence[torch.Tensor], biases: Optional[Sequence[torch.Tensor]],
                     activation: int, activation_param: float, output_sign: float, n_steps: int, step_size: float,
                     noise_scale: float, prior_kind: int, prior_mean: Optional[torch.Tensor],
                     prior_inv_var: Optional[torch.Tensor], rng_state: torch.Tensor, clip_grad: float, method: int,
                     energies: torch.Tensor, grad_norms: Optional[torch.Tensor], accepted: Optional[torch.Tensor],
                     wrap: Callable = _identity) -> None:
    """Run the whole chain in one launch; ``z`` (B, D) float32/float64, contiguous, is updated in place.

    weights: L (1 ≤ L ≤ ``MAX_LAYERS``) tensors (d_{l+1}, d_l) with d_0 = D, d_L = 1, in z's dtype and device;
    biases: None or L tensors (d_{l+1},). activation: a code of ``ops.mlp_chain.ACTIVATIONS`` with ``activation_param``;
    output_sign ±1. ``prior_kind`` 0 flat, 1 N(0, I), 2 diagonal (``prior_mean``, ``prior_inv_var``: 1-D length D in
    z's dtype). rng_state: int64 ``[seed, counter]`` on z's device, read by the kernel (step k uses counter + k), not
    advanced. clip_grad: 0 = off. method: 0 ULA, 1 MALA. Outputs (K, B) in z's dtype, filled for every step:
    ``energies`` (required), ``grad_norms`` (or None); ``accepted`` uint8 (MALA, or None). ``wrap``: applied to the
    kernel before the launch (``torch.library.wrap_triton`` inside a ``triton_op``).

    Raises ``ValueError`` for a network outside the limits (see ``launch_settings``) or inconsistent arguments.
    """
    if z.dim() != 2 or not z.is_contiguous() or z.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"z must be a contiguous 2-D float32 or float64 tensor (B, D), got shape {tuple(z.shape)}, "
                         f"{z.dtype}{'' if z.is_contiguous() else ', not contiguous'}")
    batch, n_features = z.shape
    dims = [n_features] + [w.shape[0] if w.dim() == 2 else 0 for w in weights]
    for layer, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != dims[layer] or w.dtype != z.dtype or w.device != z.device:
            raise ValueError(f"weights[{layer}] must be a 2-D (out, {dims[layer]}) {z.dtype} tensor on {z.device}, "
                             f"got shape {tuple(w.shape)}, {w.dtype}, {w.device}")
    if not weights or dims[-1] != 1:
        raise ValueError(f"the last weight must have one output (an energy per sample), got dims {tuple(dims)}")
    if biases is not None:
        if len(biases) != len(weights):
            raise ValueError(f"biases must be None or one per layer ({len(weights)}), got {len(biases)}")
        for layer, b in enumerate(biases):
            if b.shape != (dims[layer + 1],) or b.dtype != z.dtype or b.device != z.device:
                raise ValueError(f"biases[{layer}] must be ({dims[layer + 1]},) {z.dtype} on {z.device}, got "
                                 f"shape {tuple(b.shape)}, {b.dtype}, {b.device}")
    if activation not in ACTIVATIONS.values():
        raise ValueError(f"activation must be a code of fastlangevin.ops.mlp_chain.ACTIVATIONS {ACTIVATIONS}, got "
                         f"{activation}")
    if output_sign not in (1.0, -1.0):
        raise ValueError(f"output_sign must be 1 or -1, got {output_sign}")
    if method not in (ULA, MALA):
        raise ValueError(f"method must be {ULA} (ULA) or {MALA} (MALA), got {method}")
    check_prior_args(prior_kind, prior_mean, prior_inv_var, n_features, z.dtype, z.device)
    _check_rng_state(rng_state, z.device)
    out_shape = (n_steps, batch)
    _check_output("energies", energies, out_shape, z.dtype, z.device)
    if grad_norms is not None:
        _check_output("grad_norms", grad_norms, out_shape, z.dtype, z.device)
    if accepted is not None:
        _check_output("accepted", accepted, out_shape, torch.uint8, z.device)
    settings = launch_settings(batch, dims, z.dtype)  # raises for networks outside the limits
    if n_steps == 0 or batch == 0:
        return

    packed_w, packed_b = _pack(weights, biases, settings, z.dtype, z.device)
    slot_width = max(settings.d_pad, settings.h_pad)
    scratch = torch.empty(settings.grid[0] * settings.n_slots * settings.block_b * slot_width, dtype=z.dtype,
                          device=z.device)
    # Unused pointer slots get a real tensor, so the argument list is the same for every configuration.
    mean = prior_mean if prior_kind == PRIOR_DIAGONAL else z
    inv_var = prior_inv_var if prior_kind == PRIOR_DIAGONAL else z
    wrap(mlp_chain_kernel)[settings.grid](
        z, packed_w, packed_b, mean, inv_var, rng_state, energies,
        grad_norms if grad_norms is not None else energies, accepted if accepted is not None else rng_state,
        scratch, batch, n_features, loop_bound(mlp_chain_kernel, n_steps), float(step_size) / 2, float(noise_scale), 2 * float(step_size),
        float(clip_grad), float(activation_param), float(output_sign),
        NUM_LAYERS=len(weights), ACT=int(activation), PRIOR_KIND=int(prior_kind), NOISE=noise_scale != 0.0,
        CLIP=clip_grad > 0, METHOD=int(method), STORE_NORMS=grad_norms is not None,
        STORE_ACCEPTED=accepted is not None, COMPUTE_F64=z.dtype == torch.float64, BLOCK_B=settings.block_b,
        D_PAD=settings.d_pad, H_PAD=settings.h_pad, CHUNK=settings.chunk, N_SLOTS=settings.n_slots,
        INDEX_64=settings.index_64, num_warps=settings.num_warps)
