"""The fully fused Langevin chain of MLP energies as one Triton kernel: all K steps in a single launch.

Computes what the generic chain computes for an ``fl.MLPEnergy`` or an ``fl.GaussianPosteriorEnergy`` of MLPs (the
contract is the docstring of ``fastlangevin.ops.mlp_chain``): per step the forward pass through every layer of the
energy network (and of the generator, with the squared error against the target), the analytic input gradient back
through them, clipping, the prior term, the Philox noise (element ``i = b·D + d`` at counter ``rng_state[1] + k``,
the same numbers as ``langevin_step_triton``) and the update; for MALA also the proposal's energy and gradient, the
Metropolis test with ``philox.acceptance_uniforms`` and the accept/reject.

Layout. Each program owns ``BLOCK_B`` samples and loops over all K steps with z (and for MALA the current E and
gradient) in registers. Every width is padded to a power of two (≥ 16, for ``tl.dot``), each layer its own; the
generator reads z through its first weight padded to z's width (zero columns beyond its d_0). The launcher packs
the weights of both networks into one zero-padded buffer, layer after layer, ``W_l`` as (P_{l+1}, P_l) row-major
(the energy's last layer, width 1, as a row of P_{L−1}); the biases (zeros for none) and the activation parameters
likewise. Zero padding keeps the padded units out of every result (their weights in and out are 0); only the
generator's output is masked, since act(0) need not be 0 there.

The matrix products run in chunks of ``CHUNK`` along the contracted width, so no operand tile is larger than
``CHUNK × width``: each layer's input (forward) and back-propagated delta (backward) are staged in slot 0 of a
small per-program scratch buffer in global memory (it stays in L1/L2), fenced by CTA barriers, and read back in
chunks. The activation derivatives of the layers before a network's last are kept in slots 1, 2, … for the backward
pass. The network's shape (padded widths, activation codes, packing offsets) is a set of constexpr tuples, so each
configuration compiles to straight-line code; tuple elements only ever reach jitted helpers as constexpr arguments
(Triton 3.6 rejects them elsewhere). float32 products use ``input_precision="ieee"`` (no TF32), so the chain matches
the reference to float32 rounding; float64 runs in float64 throughout.

Mixed precision: with bfloat16 weights and biases and a float32 z, every layer product is ``tl.dot`` on bfloat16
operands (the weights as given; the staged float32 input or delta rounded to nearest even as it is loaded) with
float32 accumulation, tensor cores on a GPU. Everything else (biases upcast, activations, the scalar output layer,
the likelihood's residual, the gradient's norm, prior, noise, the update, MALA's test) stays float32, as on the CPU's
bfloat16 units (``csrc/include/fastlangevin/cpu_bf16.h``).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional, Sequence

import torch
import triton
import triton.language as tl

from fastlangevin.ops import codes as host_codes
from fastlangevin.ops.triton import codes
from fastlangevin.ops.triton.langevin_step import check_prior_args, check_rng_state
from fastlangevin.ops.triton.philox import box_muller, philox_block, split_u64
from fastlangevin.ops.triton.utils import is_interpreted, loop_bound, scalar_as, to_storage

MAX_LAYERS = 16  # per network: every layer is unrolled into the kernel, so depth costs compile time and code size
MIN_PAD = 16  # tl.dot needs every dimension ≥ 16
# The contracted width per tl.dot. The float32 product (input_precision="ieee") runs on FMA units, and Triton keeps
# each thread's operand rows and columns for the whole chunk in registers: (rows + columns per thread) × CHUNK, so
# the smallest chunk tl.dot allows keeps register pressure lowest.
CHUNK = 16
# Widest padded layer per compute dtype: one chunked operand tile, CHUNK × width, stays within OPERAND_TILE_BYTES of
# shared memory (the K loop is software-pipelined, which doubles it).
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
_INF = tl.constexpr(float("inf"))


def padded(width: int) -> int:
    """A layer width as the kernel holds it: the next power of two, at least ``MIN_PAD``."""
    return max(MIN_PAD, triton.next_power_of_2(int(width)))


class NetworkLayout(NamedTuple):
    """One network packed for the kernel: per layer its padded widths, activation code and offsets (constexprs)."""

    widths: tuple[int, ...]  # padded (P_0, …, P_L); an energy's P_L is 1 (its last layer is a row)
    activations: tuple[int, ...]
    weight_offsets: tuple[int, ...]  # into the packed weights, elements
    bias_offsets: tuple[int, ...]


class MLPChainLaunch(NamedTuple):
    """How to launch the fused chain for one pair of networks and batch."""

    block_b: int  # samples per program
    num_warps: int
    grid: tuple[int]
    energy: NetworkLayout
    generator: Optional[NetworkLayout]
    slot_width: int  # scratch slots are (block_b, slot_width): the widest padded layer
    n_slots: int  # staging slot + the activation derivatives kept for the backward pass
    index_64: bool  # whether element offsets (b·D + d, b·P + p) need int64
    weight_size: int  # packed weights, biases and parameters (elements)
    bias_size: int
    param_size: int


def _layout(dims: Sequence[int], activations: Sequence[int], input_width: int, is_energy: bool, weight_offset: int,
            bias_offset: int) -> NetworkLayout:
    widths = [input_width] + [padded(d) for d in dims[1:]]
    if is_energy:
        widths[-1] = 1
    weight_offsets, bias_offsets = [], []
    for n_in, n_out in zip(widths[:-1], widths[1:]):
        weight_offsets.append(weight_offset)
        bias_offsets.append(bias_offset)
        weight_offset += n_in * n_out
        bias_offset += n_out
    return NetworkLayout(tuple(widths), tuple(int(a) for a in activations), tuple(weight_offsets),
                         tuple(bias_offsets))


def _end(layout: NetworkLayout) -> tuple[int, int]:
    """(weights, biases) elements up to the end of this network in the packed buffers."""
    return (layout.weight_offsets[-1] + layout.widths[-2] * layout.widths[-1],
            layout.bias_offsets[-1] + layout.widths[-1])


def launch_settings(batch: int, energy_dims: Sequence[int], energy_activations: Sequence[int],
                    generator_dims: Optional[Sequence[int]], generator_activations: Optional[Sequence[int]],
                    n_targets: int, dtype: torch.dtype) -> MLPChainLaunch:
    """Block size, warps, padding, packing layout and grid: the one place these are chosen.

    energy_dims ``(D, …, 1)``; generator_dims ``(Dg, …, P)`` with Dg ≤ D, or None. Raises ``ValueError`` naming the
    limit when the networks cannot run fused (more than ``MAX_LAYERS`` layers in a network, a padded width over
    ``MAX_PADDED_WIDTH``), so the caller can fall back to the step-by-step chain.
    """
    networks = [("energy", [int(d) for d in energy_dims])]
    if generator_dims is not None:
        networks.append(("generator", [int(d) for d in generator_dims]))
    limit = MAX_PADDED_WIDTH[dtype]
    for name, dims in networks:
        if not 1 <= len(dims) - 1 <= MAX_LAYERS:
            raise ValueError(f"the fused Triton chain supports 1 to {MAX_LAYERS} weight layers per network, the "
                             f"{name} has {len(dims) - 1} (dims {tuple(dims)}); the step-by-step chain runs deeper "
                             f"networks")
        if max(padded(d) for d in dims) > limit:
            raise ValueError(f"the fused Triton chain supports layer widths up to {limit} for {dtype} (padded to a "
                             f"power of two), the {name} has dims {tuple(dims)}; the step-by-step chain runs wider "
                             f"layers")
    d_pad = padded(energy_dims[0])
    energy = _layout(energy_dims, energy_activations, d_pad, True, 0, 0)
    generator = None
    if generator_dims is not None:
        generator = _layout(generator_dims, generator_activations, d_pad, False, *_end(energy))
    ends = _end(generator or energy)
    widths = list(energy.widths[:-1]) + ([] if generator is None else list(generator.widths))
    width = max(widths)
    block_b = max(MIN_PAD, min(MAX_BLOCK_B, ACCUMULATOR_ELEMENTS // width, triton.next_power_of_2(max(batch, 1))))
    num_warps = max(4, min(8, block_b * width // ELEMENTS_PER_WARP))
    grid = (triton.cdiv(batch, block_b),)
    # the energy keeps act' of its layers 0..L−3 (its last hidden layer's stays in registers), the generator of
    # 0..L−2; the two run one after the other and share the slots
    kept = max(len(energy_dims) - 3, 0 if generator_dims is None else len(generator_dims) - 2, 0)
    rows = grid[0] * block_b
    index_64 = rows * max(int(energy_dims[0]), n_targets) > 2**31 - 1
    n_params = len(energy_dims) - 1 + (0 if generator_dims is None else len(generator_dims) - 1)
    return MLPChainLaunch(block_b, num_warps, grid, energy, generator, width, 1 + kept, index_64, ends[0], ends[1],
                          n_params)


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
    if ACT == codes.RELU:
        h = tl.where(a > 0, a, 0.0)
        d = tl.where(a > 0, 1.0, 0.0).to(a.dtype)
    elif ACT == codes.LEAKY_RELU:  # param = negative slope
        h = tl.where(a > 0, a, a * param)
        d = tl.where(a > 0, 1.0, param)
    elif ACT == codes.SILU:
        e = tl.exp(-a)
        s = 1.0 / (1.0 + e)
        h = a / (1.0 + e)
        d = s * (1.0 + a * (1.0 - s))
    elif ACT == codes.GELU:
        cdf = 0.5 * (1.0 + tl.math.erf(a * _SQRT1_2))
        h = a * cdf
        d = cdf + a * (tl.exp(-0.5 * a * a) * _INV_SQRT_2PI)
    elif ACT == codes.GELU_TANH:
        # Module constants stay on the right of a block: under the interpreter, constexpr * block is a constexpr.
        a_sq = a * a
        t = _tanh((a + (a_sq * a) * _GELU_KAPPA) * _SQRT_2_OVER_PI)
        h = 0.5 * a * (1.0 + t)
        inner_derivative = (1.0 + a_sq * (3.0 * _GELU_KAPPA)) * _SQRT_2_OVER_PI
        d = 0.5 * (1.0 + t) + (0.5 * a) * (1.0 - t * t) * inner_derivative
    elif ACT == codes.ELU:  # param = alpha
        e = tl.exp(tl.where(a > 0, 0.0, a))
        h = tl.where(a > 0, a, (e - 1.0) * param)
        d = tl.where(a > 0, 1.0, e * param)
    elif ACT == codes.SOFTPLUS:  # beta 1, threshold 20
        e = tl.exp(tl.where(a > _SOFTPLUS_THRESHOLD, 0.0, a))
        h = tl.where(a > _SOFTPLUS_THRESHOLD, a, _log1p(e))
        d = tl.where(a > _SOFTPLUS_THRESHOLD, 1.0, e / (e + 1.0))
    elif ACT == codes.TANH:
        h = _tanh(a)
        d = 1.0 - h * h
    elif ACT == codes.SIGMOID:
        h = 1.0 / (1.0 + tl.exp(-a))
        d = h * (1.0 - h)
    else:
        tl.static_assert(ACT == codes.IDENTITY, "unknown activation code")
        h = a
        d = tl.full(a.shape, 1.0, a.dtype)
    return h, d


@triton.jit
def _slot(scratch, slot, BLOCK_B: tl.constexpr, WIDTH: tl.constexpr, SLOT_W: tl.constexpr):
    """Pointers to the (BLOCK_B, WIDTH) block of scratch slot ``slot`` (a slot is (BLOCK_B, SLOT_W), row-major)."""
    rows = tl.arange(0, BLOCK_B)
    return scratch + slot * (BLOCK_B * SLOT_W) + rows[:, None] * SLOT_W + tl.arange(0, WIDTH)[None, :]


@triton.jit
def _stage(scratch, x, BLOCK_B: tl.constexpr, WIDTH: tl.constexpr, SLOT_W: tl.constexpr):
    """Write x (BLOCK_B, WIDTH) to the staging slot 0 for every thread to read back in chunks."""
    tl.debug_barrier()  # every thread is done reading what the slot held before
    tl.store(_slot(scratch, 0, BLOCK_B, WIDTH, SLOT_W), x)
    tl.debug_barrier()


# Triton's interpreter (3.6-3.9) multiplies bfloat16 tl.dot operands as their raw 16-bit storage; it gets the same
# products from bfloat16 values widened to float32 (exact) in an IEEE float32 dot.
_INTERPRETED = tl.constexpr(is_interpreted(_tanh))


@triton.jit
def _dot(a, w):
    """a · w accumulated in a's dtype: bfloat16 operands when the weights w are bfloat16 (a rounded to nearest
    even; the mixed-precision chain), else IEEE float32/float64 products (no TF32)."""
    if w.dtype == tl.bfloat16:
        a_bf16 = to_storage(a, tl.bfloat16)
        if _INTERPRETED:
            return tl.dot(a_bf16.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            return tl.dot(a_bf16, w, out_dtype=tl.float32)
    else:
        return tl.dot(a, w, input_precision="ieee")


@triton.jit
def _matmul_wt(x_slot, w_ptr, BLOCK_B: tl.constexpr, K: tl.constexpr, N: tl.constexpr, CHUNK: tl.constexpr,
               SLOT_W: tl.constexpr, CDT: tl.constexpr):
    """x W^T for x (BLOCK_B, K) staged at ``x_slot`` and W (N, K): (BLOCK_B, N), chunked in K."""
    rows = tl.arange(0, BLOCK_B)
    cols_n = tl.arange(0, N)
    acc = tl.zeros((BLOCK_B, N), CDT)
    for k0 in range(0, K, CHUNK):
        kk = k0 + tl.arange(0, CHUNK)
        x = tl.load(x_slot + rows[:, None] * SLOT_W + kk[None, :])
        w_t = tl.load(w_ptr + cols_n[None, :] * K + kk[:, None])  # (CHUNK, N) of W^T
        acc += _dot(x, w_t)
    return acc


@triton.jit
def _matmul_w(delta_slot, w_ptr, BLOCK_B: tl.constexpr, K: tl.constexpr, N: tl.constexpr, CHUNK: tl.constexpr,
              SLOT_W: tl.constexpr, CDT: tl.constexpr):
    """delta W for delta (BLOCK_B, N) staged at ``delta_slot`` and W (N, K): (BLOCK_B, K), chunked in N."""
    rows = tl.arange(0, BLOCK_B)
    cols_k = tl.arange(0, K)
    acc = tl.zeros((BLOCK_B, K), CDT)
    for n0 in range(0, N, CHUNK):
        nn = n0 + tl.arange(0, CHUNK)
        delta = tl.load(delta_slot + rows[:, None] * SLOT_W + nn[None, :])
        w = tl.load(w_ptr + nn[:, None] * K + cols_k[None, :])  # (CHUNK, K) of W
        acc += _dot(delta, w)
    return acc


@triton.jit
def _forward_layer(x, scratch, w_ptr, b_ptr, param_ptr, LAYER: tl.constexpr, KEEP_DERIVATIVE: tl.constexpr,
                   K: tl.constexpr, N: tl.constexpr, ACT: tl.constexpr, W_OFFSET: tl.constexpr,
                   B_OFFSET: tl.constexpr, P_INDEX: tl.constexpr, BLOCK_B: tl.constexpr, CHUNK: tl.constexpr,
                   SLOT_W: tl.constexpr):
    """Layer ``LAYER``: x (BLOCK_B, K) → (act(a), act'(a)), a = x W^T + b (BLOCK_B, N); act'(a) also kept in slot
    1 + LAYER when KEEP_DERIVATIVE (an identity's is 1 and never kept)."""
    _stage(scratch, x, BLOCK_B, K, SLOT_W)
    a = _matmul_wt(scratch, w_ptr + W_OFFSET, BLOCK_B, K, N, CHUNK, SLOT_W, x.dtype)
    a = a + tl.load(b_ptr + B_OFFSET + tl.arange(0, N)).to(a.dtype)[None, :]
    h, d = _activation(a, ACT, tl.load(param_ptr + P_INDEX))
    if KEEP_DERIVATIVE and ACT != codes.IDENTITY:
        tl.store(_slot(scratch, 1 + LAYER, BLOCK_B, N, SLOT_W), d)
    return h, d


@triton.jit
def _backward_layer(delta, scratch, w_ptr, LAYER: tl.constexpr, KEPT_DERIVATIVE: tl.constexpr, K: tl.constexpr,
                    N: tl.constexpr, ACT: tl.constexpr, W_OFFSET: tl.constexpr, BLOCK_B: tl.constexpr,
                    CHUNK: tl.constexpr, SLOT_W: tl.constexpr):
    """∂E/∂x (BLOCK_B, K) of layer ``LAYER`` from delta (BLOCK_B, N): ∂E/∂a when not KEPT_DERIVATIVE, else ∂E/∂h,
    multiplied here by act'(a) from slot 1 + LAYER."""
    if KEPT_DERIVATIVE and ACT != codes.IDENTITY:
        delta = delta * tl.load(_slot(scratch, 1 + LAYER, BLOCK_B, N, SLOT_W))
    _stage(scratch, delta, BLOCK_B, N, SLOT_W)
    return _matmul_w(scratch, w_ptr + W_OFFSET, BLOCK_B, K, N, CHUNK, SLOT_W, delta.dtype)


@triton.jit
def _energy_term(z, scratch, w_ptr, b_ptr, param_ptr, sign, LAYERS: tl.constexpr, WIDTHS: tl.constexpr,
                 ACTS: tl.constexpr, W_OFFSETS: tl.constexpr, B_OFFSETS: tl.constexpr, BLOCK_B: tl.constexpr,
                 CHUNK: tl.constexpr, SLOT_W: tl.constexpr):
    """``sign · energy_net(z)`` (BLOCK_B,) and its gradient (BLOCK_B, WIDTHS[0]); parameters from index 0."""
    h = z
    d = z  # act' of the last hidden layer (defined here for the linear energy, which has none)
    for l in tl.static_range(LAYERS - 1):  # hidden layers; the last one's act' stays in registers
        h, d = _forward_layer(h, scratch, w_ptr, b_ptr, param_ptr, l, l < LAYERS - 2, WIDTHS[l], WIDTHS[l + 1],
                              ACTS[l], W_OFFSETS[l], B_OFFSETS[l], l, BLOCK_B, CHUNK, SLOT_W)
    e, delta = _energy_output(h, w_ptr, b_ptr, sign, WIDTHS[LAYERS - 1], W_OFFSETS[LAYERS - 1],
                              B_OFFSETS[LAYERS - 1])
    if LAYERS > 1:
        delta = _times_derivative(delta, d, ACTS[LAYERS - 2])
    for i in tl.static_range(LAYERS - 1):  # layers L−2 … 0
        delta = _backward_layer(delta, scratch, w_ptr, LAYERS - 2 - i, i > 0, WIDTHS[LAYERS - 2 - i],
                                WIDTHS[LAYERS - 1 - i], ACTS[LAYERS - 2 - i], W_OFFSETS[LAYERS - 2 - i], BLOCK_B,
                                CHUNK, SLOT_W)
    return e, delta


@triton.jit
def _energy_output(h, w_ptr, b_ptr, sign, K: tl.constexpr, W_OFFSET: tl.constexpr, B_OFFSET: tl.constexpr):
    """The energy's last layer, a row w (K,): E = sign · (h·w + b) (BLOCK_B,) and ∂E/∂h (BLOCK_B, K)."""
    w = tl.load(w_ptr + W_OFFSET + tl.arange(0, K)).to(h.dtype)
    e = sign * (tl.sum(h * w[None, :], axis=1) + tl.load(b_ptr + B_OFFSET).to(h.dtype))
    return e, tl.zeros_like(h) + (sign * w)[None, :]


@triton.jit
def _times_derivative(delta, d, ACT: tl.constexpr):
    if ACT != codes.IDENTITY:
        delta = delta * d
    return delta


@triton.jit
def _generator_term(z, scratch, w_ptr, b_ptr, param_ptr, target_ptr, rows, batch, n_targets, scale,
                    INDEX_64: tl.constexpr, LAYERS: tl.constexpr, WIDTHS: tl.constexpr, ACTS: tl.constexpr,
                    W_OFFSETS: tl.constexpr, B_OFFSETS: tl.constexpr, P_OFFSET: tl.constexpr, BLOCK_B: tl.constexpr,
                    CHUNK: tl.constexpr, SLOT_W: tl.constexpr):
    """``scale · ‖target_b − generator(z)‖²`` (BLOCK_B,) and its gradient (BLOCK_B, WIDTHS[0]) for the rows
    ``rows`` of target (batch, n_targets); the generator's first weight is zero beyond its inputs, its activation
    parameters start at index P_OFFSET."""
    x = z
    for l in tl.static_range(LAYERS):
        x, d = _forward_layer(x, scratch, w_ptr, b_ptr, param_ptr, l, l < LAYERS - 1, WIDTHS[l], WIDTHS[l + 1],
                              ACTS[l], W_OFFSETS[l], B_OFFSETS[l], P_OFFSET + l, BLOCK_B, CHUNK, SLOT_W)
    e, delta = _squared_error(x, d, target_ptr, rows, batch, n_targets, scale, INDEX_64, WIDTHS[LAYERS],
                              ACTS[LAYERS - 1])
    for i in tl.static_range(LAYERS):  # layers L−1 … 0
        delta = _backward_layer(delta, scratch, w_ptr, LAYERS - 1 - i, i > 0, WIDTHS[LAYERS - 1 - i],
                                WIDTHS[LAYERS - i], ACTS[LAYERS - 1 - i], W_OFFSETS[LAYERS - 1 - i], BLOCK_B,
                                CHUNK, SLOT_W)
    return e, delta


@triton.jit
def _squared_error(x, d, target_ptr, rows, batch, n_targets, scale, INDEX_64: tl.constexpr, P: tl.constexpr,
                   ACT: tl.constexpr):
    """scale · ‖target − x‖² over the n_targets real columns of x (BLOCK_B, P), and its gradient with respect to
    the pre-activation of x (d = act'(a))."""
    cols = tl.arange(0, P)
    col_ok = cols < n_targets
    if INDEX_64:
        offsets = rows.to(tl.int64)[:, None] * n_targets + cols[None, :]
    else:
        offsets = rows[:, None] * n_targets + cols[None, :]
    target = tl.load(target_ptr + offsets, mask=(rows < batch)[:, None] & col_ok[None, :], other=0.0)
    residual = tl.where(col_ok[None, :], x - target.to(x.dtype), 0.0)  # padded outputs are act(0), not 0
    e = scale * tl.sum(residual * residual, axis=1)
    return e, _times_derivative((2.0 * scale) * residual, d, ACT)


@triton.jit
def _energy_and_grad(z, scratch, w_ptr, b_ptr, param_ptr, target_ptr, rows, batch, n_targets, sign, scale,
                     E_LAYERS: tl.constexpr, E_WIDTHS: tl.constexpr, E_ACTS: tl.constexpr,
                     E_W_OFFSETS: tl.constexpr, E_B_OFFSETS: tl.constexpr, G_LAYERS: tl.constexpr,
                     G_WIDTHS: tl.constexpr, G_ACTS: tl.constexpr, G_W_OFFSETS: tl.constexpr,
                     G_B_OFFSETS: tl.constexpr, INDEX_64: tl.constexpr, BLOCK_B: tl.constexpr, CHUNK: tl.constexpr,
                     SLOT_W: tl.constexpr):
    """Total E (BLOCK_B,) and ∇E (BLOCK_B, D_PAD) at z: the energy network, plus the generator term when
    G_LAYERS > 0 (its activation parameters follow the energy's)."""
    e, g = _energy_term(z, scratch, w_ptr, b_ptr, param_ptr, sign, E_LAYERS, E_WIDTHS, E_ACTS, E_W_OFFSETS,
                        E_B_OFFSETS, BLOCK_B, CHUNK, SLOT_W)
    if G_LAYERS > 0:
        e_gen, g_gen = _generator_term(z, scratch, w_ptr, b_ptr, param_ptr, target_ptr, rows, batch, n_targets,
                                       scale, INDEX_64, G_LAYERS, G_WIDTHS, G_ACTS, G_W_OFFSETS, G_B_OFFSETS,
                                       E_LAYERS, BLOCK_B, CHUNK, SLOT_W)
        e = e + e_gen
        g = g + g_gen
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
    if PRIOR_KIND == codes.PRIOR_NORMAL:
        return z
    elif PRIOR_KIND == codes.PRIOR_DIAGONAL:
        return inv_var[None, :] * (z - mean[None, :])
    else:
        return tl.zeros_like(z)


@triton.jit
def _prior_energy(z, mean, inv_var, PRIOR_KIND: tl.constexpr):
    """U_prior(z) = −log prior(z) up to a constant, per row: 0, ½‖z‖², ½Σ inv_var (z − mean)²."""
    if PRIOR_KIND == codes.PRIOR_NORMAL:
        return 0.5 * tl.sum(z * z, axis=1)
    elif PRIOR_KIND == codes.PRIOR_DIAGONAL:
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
    c, s = box_muller(tl.where(first_pair, x0, x2), tl.where(first_pair, x1, x3), COMPUTE_F64)
    return tl.where((lane & 1) == 0, c, s)


@triton.jit
def _log_acceptance_uniform(seed_lo, seed_hi, sample, counter_lo, counter_hi, CDT: tl.constexpr):
    """log u for MALA, u = ``acceptance_uniforms`` of these samples: word x0 in the counter's MALA domain."""
    x0, _, _, _ = philox_block(seed_lo, seed_hi, sample, counter_lo, counter_hi | _MALA_DOMAIN_BIT)
    return tl.log(x0.to(CDT) * _TWO_POW_M32 + _TWO_POW_M33)


@triton.jit
def mlp_chain_kernel(z_ptr, w_ptr, b_ptr, param_ptr, target_ptr, prior_mean_ptr, prior_inv_var_ptr, rng_state_ptr,
                     energies_ptr, grad_norms_ptr, accepted_ptr, first_bad_ptr, scratch_ptr, batch, n_features,
                     n_targets, n_steps, half_step: tl.float64, noise_scale: tl.float64, two_step: tl.float64,
                     clip_grad: tl.float64, output_sign: tl.float64, likelihood_scale: tl.float64,
                     E_LAYERS: tl.constexpr, E_WIDTHS: tl.constexpr, E_ACTS: tl.constexpr,
                     E_W_OFFSETS: tl.constexpr, E_B_OFFSETS: tl.constexpr, G_LAYERS: tl.constexpr,
                     G_WIDTHS: tl.constexpr, G_ACTS: tl.constexpr, G_W_OFFSETS: tl.constexpr,
                     G_B_OFFSETS: tl.constexpr, PRIOR_KIND: tl.constexpr, NOISE: tl.constexpr, CLIP: tl.constexpr,
                     METHOD: tl.constexpr, STORE_INFO: tl.constexpr, STORE_ACCEPTED: tl.constexpr,
                     COMPUTE_F64: tl.constexpr, BLOCK_B: tl.constexpr, D_PAD: tl.constexpr, CHUNK: tl.constexpr,
                     N_SLOTS: tl.constexpr, SLOT_W: tl.constexpr, INDEX_64: tl.constexpr):
    """``n_steps`` ULA or MALA steps (``METHOD``, a ``codes`` value) of ``BLOCK_B`` samples of z (batch, n_features).

    Networks: ``E_*`` the energy's layout (``NetworkLayout``), ``G_*`` the generator's (G_LAYERS = 0: none; target
    (batch, n_targets)). Float scalars are annotated fp64 and rounded once to the compute dtype (``half_step`` = ε/2
    and ``two_step`` = 2ε computed on the host in float64, as the reference does). Outputs at ``[k, b]`` (row-major
    (n_steps, batch)): energies and grad norms if STORE_INFO, accepted (uint8) if STORE_ACCEPTED; ``first_bad``
    (batch,) always.
    """
    CDT: tl.constexpr = tl.float64 if COMPUTE_F64 else tl.float32
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
    if PRIOR_KIND == codes.PRIOR_DIAGONAL:
        mean = tl.load(prior_mean_ptr + cols, mask=col_ok, other=0.0).to(CDT)
        inv_var = tl.load(prior_inv_var_ptr + cols, mask=col_ok, other=0.0).to(CDT)
    else:
        mean = tl.zeros((D_PAD,), CDT)
        inv_var = tl.zeros((D_PAD,), CDT)
    half = scalar_as(half_step, CDT)
    sigma = scalar_as(noise_scale, CDT)
    two_eps = scalar_as(two_step, CDT)
    clip = scalar_as(clip_grad, CDT)
    sign = scalar_as(output_sign, CDT)
    scale = scalar_as(likelihood_scale, CDT)
    seed = tl.load(rng_state_ptr)
    counter0 = tl.load(rng_state_ptr + 1)
    seed_lo, seed_hi = split_u64(seed)
    first_bad = tl.full((BLOCK_B,), -1, tl.int64)

    if METHOD == codes.MALA:
        e, g = _energy_and_grad(z, scratch, w_ptr, b_ptr, param_ptr, target_ptr, rows, batch, n_targets, sign, scale,
                                E_LAYERS, E_WIDTHS, E_ACTS, E_W_OFFSETS, E_B_OFFSETS, G_LAYERS, G_WIDTHS, G_ACTS,
                                G_W_OFFSETS, G_B_OFFSETS, INDEX_64, BLOCK_B, CHUNK, SLOT_W)
        norm = _norm(g, COMPUTE_F64)
        g = _clip(g, norm, clip, CLIP)
    for k in range(n_steps):
        if METHOD == codes.ULA:
            e, g = _energy_and_grad(z, scratch, w_ptr, b_ptr, param_ptr, target_ptr, rows, batch, n_targets, sign,
                                    scale, E_LAYERS, E_WIDTHS, E_ACTS, E_W_OFFSETS, E_B_OFFSETS, G_LAYERS, G_WIDTHS,
                                    G_ACTS, G_W_OFFSETS, G_B_OFFSETS, INDEX_64, BLOCK_B, CHUNK, SLOT_W)
            norm = _norm(g, COMPUTE_F64)
            g = _clip(g, norm, clip, CLIP)
        # the norm is not finite exactly when some gradient element is not
        bad = (e != e) | (tl.abs(e) == _INF) | (norm != norm) | (norm == _INF)
        first_bad = tl.where((first_bad < 0) & bad, k, first_bad)
        out = (tl.zeros((), tl.int64) + k) * batch + rows  # (K·B may pass the int32 range)
        if STORE_INFO:
            tl.store(energies_ptr + out, e.to(energies_ptr.dtype.element_ty), mask=row_ok)
            tl.store(grad_norms_ptr + out, norm.to(grad_norms_ptr.dtype.element_ty), mask=row_ok)
        counter_lo, counter_hi = split_u64(counter0 + k)
        prior_g = _prior_grad(z, mean, inv_var, PRIOR_KIND)
        proposal = z - half * (g + prior_g)
        if NOISE:
            noise = _normal_at(seed_lo, seed_hi, elements, counter_lo, counter_hi, COMPUTE_F64)
            proposal = proposal + sigma * tl.where(col_ok[None, :], noise, 0.0)
        if METHOD == codes.ULA:
            z = proposal
        else:
            e_new, g_new = _energy_and_grad(proposal, scratch, w_ptr, b_ptr, param_ptr, target_ptr, rows, batch,
                                            n_targets, sign, scale, E_LAYERS, E_WIDTHS, E_ACTS, E_W_OFFSETS,
                                            E_B_OFFSETS, G_LAYERS, G_WIDTHS, G_ACTS, G_W_OFFSETS, G_B_OFFSETS,
                                            INDEX_64, BLOCK_B, CHUNK, SLOT_W)
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
    tl.store(first_bad_ptr + rows, first_bad, mask=row_ok)


def _pack(networks, settings: MLPChainLaunch, weight_dtype: torch.dtype, dtype: torch.dtype,
          device) -> tuple[torch.Tensor, ...]:
    """The zero-padded weights and biases (in weight_dtype) and activation parameters (in the chain's dtype) of
    (network, layout) pairs, as the kernel reads them (see ``NetworkLayout``)."""
    packed_w = torch.zeros(settings.weight_size, dtype=weight_dtype, device=device)
    packed_b = torch.zeros(settings.bias_size, dtype=weight_dtype, device=device)
    params = []
    for (weights, biases, _, activation_params), layout in networks:
        for layer, w in enumerate(weights):
            n_in, n_out = layout.widths[layer], layout.widths[layer + 1]
            start = layout.weight_offsets[layer]
            packed_w[start:start + n_in * n_out].view(n_out, n_in)[:w.shape[0], :w.shape[1]] = w
            if biases:
                start = layout.bias_offsets[layer]
                packed_b[start:start + w.shape[0]] = biases[layer]
        params.extend(float(p) for p in activation_params)
    return packed_w, packed_b, torch.tensor(params, dtype=dtype, device=device)


def _check_output(name, t, shape, dtype, device):
    if t.shape != shape or t.dtype != dtype or t.device != device or not t.is_contiguous():
        raise ValueError(f"{name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on {device}, got "
                         f"shape {tuple(t.shape)}, {t.dtype}, {t.device}"
                         f"{'' if t.is_contiguous() else ', not contiguous'}")


def _check_network(name: str, network, n_inputs: int, dtype: torch.dtype, device) -> list[int]:
    """dims of a ``(weights, biases, activations, activation_params)`` network whose first layer takes n_inputs."""
    weights, biases, activations, activation_params = network
    if not weights:
        raise ValueError(f"{name}: a network needs at least one layer")
    dims = [n_inputs] + [w.shape[0] if w.dim() == 2 else 0 for w in weights]
    for layer, w in enumerate(weights):
        if w.dim() != 2 or w.shape[1] != dims[layer] or w.dtype != dtype or w.device != device \
                or not w.is_contiguous():
            raise ValueError(f"{name} weights[{layer}] must be a contiguous 2-D (out, {dims[layer]}) {dtype} tensor on "
                             f"{device}, got shape {tuple(w.shape)}, {w.dtype}, {w.device}")
    if biases:
        if len(biases) != len(weights):
            raise ValueError(f"{name} biases must be [] or one per layer ({len(weights)}), got {len(biases)}")
        for layer, b in enumerate(biases):
            if b.shape != (dims[layer + 1],) or b.dtype != dtype or b.device != device:
                raise ValueError(f"{name} biases[{layer}] must be ({dims[layer + 1]},) {dtype} on {device}, got "
                                 f"shape {tuple(b.shape)}, {b.dtype}, {b.device}")
    if len(activations) != len(weights) or len(activation_params) != len(weights):
        raise ValueError(f"{name}: activations and activation_params need one entry per layer ({len(weights)}), got "
                         f"{len(activations)} and {len(activation_params)}")
    for layer, code in enumerate(activations):
        if code not in host_codes.ACTIVATIONS.values():
            raise ValueError(f"{name} activations[{layer}] must be a code of fastlangevin.ops.codes.ACTIVATIONS "
                             f"{host_codes.ACTIVATIONS}, got {code}")
    return dims


def chain_limit(batch: int, energy, generator, dtype: torch.dtype) -> Optional[str]:
    """Why this kernel cannot run these networks (``MLPNetwork``s), or None."""
    try:
        launch_settings(batch, energy.dims, energy.activations, None if generator is None else generator.dims,
                        None if generator is None else generator.activations,
                        0 if generator is None else generator.dims[-1], dtype)
    except ValueError as error:
        return str(error)
    return None


def mlp_chain_triton(z: torch.Tensor, energy, output_sign: float, generator, target: Optional[torch.Tensor],
                     likelihood_scale: float, n_steps: int, step_size: float, noise_scale: float, prior_kind: int,
                     prior_mean: Optional[torch.Tensor], prior_inv_var: Optional[torch.Tensor],
                     rng_state: torch.Tensor, clip_grad: float, method: int, energies: Optional[torch.Tensor],
                     grad_norms: Optional[torch.Tensor], accepted: Optional[torch.Tensor], first_bad: torch.Tensor,
                     wrap: Optional[Callable] = None) -> None:
    """Run the whole chain in one launch; ``z`` (B, D) float32/float64, contiguous, is updated in place.

    energy: ``(weights, biases, activations, activation_params)`` as ``fastlangevin.ops.mlp_chain.MLPNetwork``,
    weights and biases in z's dtype, or bfloat16 with a float32 z (the mixed-precision chain: bfloat16 ``tl.dot``
    with float32 accumulation), on z's device, d_0 = D, d_L = 1, its last activation identity; output_sign ±1. generator: None,
    or such a network with d_0 = Dg ≤ D (it reads z[:, :Dg]); then target (B, P) in z's dtype, P = its d_L, and
    likelihood_scale ≥ 0 weighs ‖target − generator‖². ``prior_kind``: a ``codes`` prior (``prior_mean``,
    ``prior_inv_var``: 1-D length D in z's dtype for the diagonal one). rng_state: int64 ``[seed, counter]`` on z's
    device, read by the kernel (step k uses counter + k), not advanced. clip_grad: 0 = off. method: ``codes.ULA`` or
    ``codes.MALA``. Outputs (K, B) in z's dtype, or None when not wanted: ``energies`` and ``grad_norms`` (both or
    neither); ``accepted`` uint8 (MALA). ``first_bad`` (B,) int64, always written. ``wrap``: applied to the kernel
    before the launch (``utils.wrap_triton`` inside a ``triton_op``); None launches it directly.

    Raises ``ValueError`` for networks outside the limits (see ``launch_settings``) or inconsistent arguments.
    """
    if z.dim() != 2 or not z.is_contiguous() or z.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"z must be a contiguous 2-D float32 or float64 tensor (B, D), got shape {tuple(z.shape)}, "
                         f"{z.dtype}{'' if z.is_contiguous() else ', not contiguous'}")
    batch, n_features = z.shape
    weight_dtype = energy[0][0].dtype if energy[0] else z.dtype
    if weight_dtype != z.dtype and (weight_dtype, z.dtype) != (torch.bfloat16, torch.float32):
        raise ValueError(f"the networks' weights must be {z.dtype} like z, or bfloat16 with a float32 z (mixed "
                         f"precision), got {weight_dtype} weights for a {z.dtype} z")
    energy_dims = _check_network("energy", energy, n_features, weight_dtype, z.device)
    if energy_dims[-1] != 1 or energy.activations[-1] != host_codes.IDENTITY:
        raise ValueError(f"the energy network must end in one output with the identity activation, got dims "
                         f"{tuple(energy_dims)} and last activation code {energy.activations[-1]}")
    generator_dims, n_targets = None, 0
    if generator is not None:
        n_inputs = generator[0][0].shape[1] if generator[0] and generator[0][0].dim() == 2 else 0
        if not 1 <= n_inputs <= n_features:
            raise ValueError(f"the generator reads z[:, :Dg] with 1 <= Dg <= {n_features}, got Dg = {n_inputs}")
        generator_dims = _check_network("generator", generator, n_inputs, weight_dtype, z.device)
        n_targets = generator_dims[-1]
        if target is None or target.shape != (batch, n_targets) or target.dtype != z.dtype \
                or target.device != z.device or not target.is_contiguous():
            got = "None" if target is None else f"shape {tuple(target.shape)}, {target.dtype}, {target.device}"
            raise ValueError(f"target must be a contiguous ({batch}, {n_targets}) {z.dtype} tensor on {z.device} with "
                             f"a generator, got {got}")
    if output_sign not in (1.0, -1.0):
        raise ValueError(f"output_sign must be 1 or -1, got {output_sign}")
    if method not in host_codes.METHODS.values():
        raise ValueError(f"method must be a code of fastlangevin.ops.codes.METHODS {host_codes.METHODS}, got {method}")
    check_prior_args(prior_kind, prior_mean, prior_inv_var, n_features, z.dtype, z.device)
    check_rng_state(rng_state, z.device)
    out_shape = (n_steps, batch)
    if (energies is None) != (grad_norms is None):
        raise ValueError("energies and grad_norms are written together: pass both or neither")
    if energies is not None:
        _check_output("energies", energies, out_shape, z.dtype, z.device)
        _check_output("grad_norms", grad_norms, out_shape, z.dtype, z.device)
    if accepted is not None:
        _check_output("accepted", accepted, out_shape, torch.uint8, z.device)
    _check_output("first_bad", first_bad, (batch,), torch.int64, z.device)
    settings = launch_settings(batch, energy_dims, energy.activations, generator_dims,
                               None if generator is None else generator.activations, n_targets, z.dtype)
    if batch == 0:
        return
    if n_steps == 0:
        first_bad.fill_(-1)
        return

    networks = [(energy, settings.energy)] + ([] if generator is None else [(generator, settings.generator)])
    packed_w, packed_b, params = _pack(networks, settings, weight_dtype, z.dtype, z.device)
    scratch = torch.empty(settings.grid[0] * settings.n_slots * settings.block_b * settings.slot_width,
                          dtype=z.dtype, device=z.device)
    # Unused pointer slots get a real tensor, so the argument list is the same for every configuration.
    mean = prior_mean if prior_kind == host_codes.PRIOR_DIAGONAL else z
    inv_var = prior_inv_var if prior_kind == host_codes.PRIOR_DIAGONAL else z
    no_generator = NetworkLayout((0,), (0,), (0,), (0,))
    g_layout = settings.generator or no_generator
    kernel = mlp_chain_kernel if wrap is None else wrap(mlp_chain_kernel)
    kernel[settings.grid](
        z, packed_w, packed_b, params, z if target is None else target, mean, inv_var, rng_state,
        energies if energies is not None else z, grad_norms if grad_norms is not None else z,
        accepted if accepted is not None else rng_state, first_bad, scratch, batch, n_features, n_targets,
        loop_bound(mlp_chain_kernel, n_steps), float(step_size) / 2, float(noise_scale), 2 * float(step_size),
        float(clip_grad), float(output_sign), float(likelihood_scale),
        E_LAYERS=len(energy_dims) - 1, E_WIDTHS=settings.energy.widths, E_ACTS=settings.energy.activations,
        E_W_OFFSETS=settings.energy.weight_offsets, E_B_OFFSETS=settings.energy.bias_offsets,
        G_LAYERS=0 if generator is None else len(generator_dims) - 1, G_WIDTHS=g_layout.widths,
        G_ACTS=g_layout.activations, G_W_OFFSETS=g_layout.weight_offsets, G_B_OFFSETS=g_layout.bias_offsets,
        PRIOR_KIND=int(prior_kind), NOISE=noise_scale != 0.0, CLIP=clip_grad > 0, METHOD=int(method),
        STORE_INFO=energies is not None, STORE_ACCEPTED=accepted is not None, COMPUTE_F64=z.dtype == torch.float64,
        BLOCK_B=settings.block_b, D_PAD=settings.energy.widths[0], CHUNK=CHUNK, N_SLOTS=settings.n_slots,
        SLOT_W=settings.slot_width, INDEX_64=settings.index_64, num_warps=settings.num_warps)
