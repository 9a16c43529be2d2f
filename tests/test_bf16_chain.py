"""Mixed-precision (bfloat16) fused chains: the weights and the activations that feed the layer products in bfloat16,
accumulated in float32; z, prior, noise, energies and the update in float32.

bfloat16 is not bit-equal to float32, so equality is replaced by
(a) a per-step bound: the gradient the chain follows at each of its states against the float64 gradient of the same
    (bfloat16-valued) weights, within a running error bound derived from bfloat16's unit roundoff 2^-8 and the layer
    widths (``gradient_error_bound``; its docstring derives it). The same test checks that the bfloat16 units really
    round (their error exceeds the bound without bfloat16 rounding) and that the float32 level does not;
(b) statistics: for a Gaussian target (a posterior with a linear generator, moments in closed form) and for an MLP
    energy trained on the 25-Gaussian mixture, the bfloat16 chain's moments and mode weights agree with the float32
    chain's within standard errors;
(c) MALA's acceptance rate within 3 points of float32's.

Every test runs at every matrix-unit level this CPU has (``FASTLANGEVIN_MATRIX_UNIT``: AMX tiles, AVX512-BF16 dot
products, and the float32 kernel on upcast weights); a level the CPU lacks is skipped with the reason, or fails when
named in ``FASTLANGEVIN_REQUIRE_BACKENDS``.
"""

import copy
import math
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import fastlangevin as fl
from fastlangevin import _ext
from fastlangevin.backends import MATRIX_UNIT_ENV
from fastlangevin.energies import GaussianMixtureEnergy, grid_means
from fastlangevin.ops import codes
from fastlangevin.ops.langevin_step import make_rng_state
from tests.benchmark_scripts import load
from tests.lanes import require

UNITS = ("amx_bf16", "avx512_bf16", "vector")
TAGS = {"amx_bf16": "bf16-amx", "avx512_bf16": "bf16-avx512bf16", "vector": "bf16-fp32"}
U_BF16 = 2.0 ** -8  # unit roundoff of bfloat16 (8 significant bits): |bf16(t) - t| <= U_BF16 |t|
U_FP32 = 2.0 ** -24


def _cpu():
    module = _ext.load_cpu()
    if module is None:
        pytest.skip(f"CPU extension unavailable: {_ext.cpu_reason()}")
    return module


@pytest.fixture(params=UNITS)
def unit(request, monkeypatch):
    """A matrix-unit level, forced with FASTLANGEVIN_MATRIX_UNIT; skipped where this CPU lacks it."""
    name = request.param
    if name != "vector":
        why = _cpu().matrix_units()[name]
        if why:
            if name in os.environ.get("FASTLANGEVIN_REQUIRE_BACKENDS", "").split(","):
                pytest.fail(f"{name} is required here (FASTLANGEVIN_REQUIRE_BACKENDS): {why}")
            pytest.skip(f"{name} unavailable: {why}")
    monkeypatch.setenv(MATRIX_UNIT_ENV, name)
    return name


def bf16_energy(dims, activation="leaky_relu", seed=0, scale=1.0):
    torch.manual_seed(seed)
    energy = fl.MLPEnergy(dims, activation)
    with torch.no_grad():
        for p in energy.parameters():
            p.mul_(scale)
    return energy.to(torch.bfloat16)


# ---- The precision API -----------------------------------------------------------------------------------------

def test_bfloat16_energy_runs_the_fused_chain_with_the_unit_named(unit):
    energy = bf16_energy((100, 200, 200, 1))
    params = {k: v.clone() for k, v in energy.state_dict().items()}
    z0 = torch.randn(37, 100)
    z0_copy = z0.clone()
    z, info = fl.langevin(energy, z0, 5, 0.01, seed=3, return_info=True)
    assert info.backend == f"cpu:fused:{TAGS[unit]}"
    assert z.dtype == torch.float32 and info.energies.dtype == torch.float32 and torch.isfinite(z).all()
    assert torch.equal(z0, z0_copy)
    assert all(torch.equal(v, params[k]) for k, v in energy.state_dict().items())
    assert all(p.grad is None for p in energy.parameters())
    assert TAGS[unit] in fl.backend_info().bf16_chain["cpu"]


def test_autocast_is_the_same_chain_as_bfloat16_parameters(unit):
    """torch.autocast(cpu, bfloat16) around fl.langevin with a float32 energy rounds its weights to bfloat16 once per
    chain: bit-equal to the chain of the energy converted to bfloat16."""
    torch.manual_seed(1)
    energy = fl.MLPEnergy((30, 50, 40, 1), "silu")
    z0 = torch.randn(50, 30)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z_auto, info = fl.langevin(energy, z0, 6, 0.02, seed=5, return_info=True)
    assert info.backend == f"cpu:fused:{TAGS[unit]}"
    assert energy.layers[0].weight.dtype == torch.float32  # the module itself is not converted
    z_bf16 = fl.langevin(energy.to(torch.bfloat16), z0, 6, 0.02, seed=5)
    assert torch.equal(z_auto, z_bf16)
    z_fp32 = fl.langevin(energy.float(), z0, 6, 0.02, seed=5)  # the bfloat16-rounded weights, in float32
    # a bfloat16 unit also rounds the products' inputs; the float32 level is exactly the float32 kernel
    assert torch.equal(z_auto, z_fp32) == (unit == "vector")
    torch.testing.assert_close(z_auto, z_fp32, atol=0.05, rtol=0)


def test_autocast_float16_runs_the_float32_chain():
    energy = bf16_energy((8, 16, 1)).float()
    z0 = torch.randn(20, 8)
    with torch.autocast("cpu", dtype=torch.float16):
        z, info = fl.langevin(energy, z0, 3, 0.01, seed=1, return_info=True)
    assert info.backend == "cpu:fused"
    assert torch.equal(z, fl.langevin(energy, z0, 3, 0.01, seed=1))


def test_step_op_chain_of_a_bfloat16_energy_runs_under_autocast():
    """Off the fused chain (backend="reference") a bfloat16 energy with float32 z runs eagerly under autocast: z,
    energies and the update stay float32, and it samples what the fused chain samples."""
    energy = bf16_energy((6, 24, 24, 1), "tanh")
    z0 = torch.randn(4000, 6)
    z_ref, info = fl.langevin(energy, z0, 40, 0.05, seed=2, backend="reference", return_info=True)
    assert info.backend == "reference" and z_ref.dtype == torch.float32 and info.energies.dtype == torch.float32
    z_fused = fl.langevin(energy, z0, 40, 0.05, seed=2)
    # the same noise: the chains differ only by rounding (the eager one also rounds the activations to bfloat16)
    assert (z_ref - z_fused).abs().mean() < 0.02


def test_bad_matrix_unit_setting_is_a_clear_error(monkeypatch):
    monkeypatch.setenv(MATRIX_UNIT_ENV, "tpu")
    energy = bf16_energy((4, 8, 1))
    with pytest.raises(ValueError, match=MATRIX_UNIT_ENV):
        fl.langevin(energy, torch.randn(3, 4), 2, 0.01)
    assert "none (" in fl.backend_info().bf16_chain["cpu"]


def _raw_chain(module, z, weights, biases, dims, matrix_unit, dtype_code=codes.FLOAT32):
    first_bad = torch.empty(z.shape[0], dtype=torch.int64)
    network = (dims, [w.data_ptr() for w in weights], [b.data_ptr() for b in biases],
               [codes.TANH] * (len(dims) - 2) + [codes.IDENTITY], [0.0] * (len(dims) - 1))
    module.mlp_chain(z.data_ptr(), z.shape[0], network, 1.0, None, 0, 0.0, 2, 0.01, 0.0, codes.PRIOR_FLAT, 0, 0,
                     make_rng_state(0, 0).data_ptr(), 0.0, codes.ULA, 0, 0, 0, first_bad.data_ptr(), dtype_code, 1,
                     matrix_unit=matrix_unit)


def test_binding_refuses_bad_matrix_units():
    module = _cpu()
    dims = [4, 8, 1]
    weights = [torch.randn(8, 4).bfloat16(), torch.randn(1, 8).bfloat16()]
    biases = [torch.zeros(8).bfloat16(), torch.zeros(1).bfloat16()]
    z = torch.randn(3, 4)
    with pytest.raises(ValueError, match="matrix_unit must be"):
        _raw_chain(module, z, weights, biases, dims, 7)
    for name, why in module.matrix_units().items():
        unit = codes.MATRIX_UNITS[name]
        if why:
            with pytest.raises(ValueError, match="cannot run here"):
                _raw_chain(module, z, weights, biases, dims, unit)
        else:
            z64 = z.double()
            with pytest.raises(ValueError, match="float32 chain"):
                _raw_chain(module, z64, weights, biases, dims, unit, codes.FLOAT64)
            assert torch.equal(z64, z.double())  # refused before anything ran


# ---- (a) Each step's gradient within a bound derived from the unit roundoff -----------------------------------

# sup |act'| and sup |act''| (smooth activations), or the jump of act' at its kink (leaky ReLU, slope 0.2)
SLOPE_BOUNDS = {"tanh": (1.0, 4 / (3 * math.sqrt(3)), None), "silu": (1.0999, 0.5, None),
                "leaky_relu": (1.0, 0.0, 0.8)}
TORCH_ACTS = {"tanh": torch.tanh, "silu": nn.functional.silu, "leaky_relu": lambda a: nn.functional.leaky_relu(a, 0.2)}


def gradient_error_bound(weights, biases, activation, z, u):
    """The float64 gradient g of E(z) = w_L . act(... act(W_0 z + b_0) ...) + b_L at z (B, D), and a componentwise
    bound on |g~ - g| for the g~ the chain computes, where every input of a matrix product is rounded to a format
    of unit roundoff u (2^-8 for bfloat16) and everything else is float32 (unit roundoff v = 2^-24).

    Derivation (running error analysis; x_l, a_l, s_l = act'(a_l), delta_l are exact, e.g. bounds on |computed -
    exact|, |.| and inequalities componentwise, n = the inner width of the product):
      rounding a product input t~ = t + e_t:  |bf16(t~) - t| <= d(e_t) := e_t + u (|t| + e_t);
      forward layer:    alpha_l = |W_l| d(e_l) + (n + 2) v (|W_l| (|x_l| + d(e_l)) + |b_l|)   (float32 sums: gamma_n)
                        e_{l+1} = S1 alpha_l + 16 v (|x_{l+1}| + S1 alpha_l)      S1 = sup|act'| (activation in f32)
                        e_s,l   = S2 alpha_l + 16 v |s_l|, or at a kink J [|a_l| <= alpha_l]   S2 = sup|act''|
      top delta (scalar output layer, float32, its input not rounded): delta = w_L * s: e = |w_L| e_s + v |w_L s|;
      backward layer:   t = W_l^T delta_l: e_t = |W_l|^T d(e_delta) + (n + 2) v |W_l|^T (|delta_l| + d(e_delta)),
                        delta_{l-1} = t * s_{l-1}: e = e_t (|s| + e_s) + |t| e_s + v |t s|;
      gradient:         g = W_0^T delta_0: e_g = |W_0|^T d(e_delta0) + (n + 2) v |W_0|^T (|delta_0| + d(e_delta0)).
    Second-order terms are kept (the (|t| + e) factors), so the bound holds for any rounding, not only to first order;
    it is a worst case (all roundings aligned), so the observed errors sit an order of magnitude below it. With u =
    2^-8 it grows like u times the widths' |W||x| sums; with u = 0 it is the float32-only bound.
    """
    s1, s2, jump = SLOPE_BOUNDS[activation]
    act = TORCH_ACTS[activation]
    v = U_FP32

    def rounded(err, t):
        return err + u * (t.abs() + err)

    x, e = z, torch.zeros_like(z)
    slopes, slope_errs = [], []
    for W, b in zip(weights[:-1], biases[:-1]):
        d = rounded(e, x)
        a = x @ W.T + b
        n = W.shape[1]
        alpha = d @ W.abs().T + (n + 2) * v * ((x.abs() + d) @ W.abs().T + b.abs())
        a_req = a.detach().requires_grad_(True)
        h = act(a_req)
        (s,) = torch.autograd.grad(h.sum(), a_req)
        x = h.detach()
        e = s1 * alpha + 16 * v * (x.abs() + s1 * alpha)
        e_s = (s2 * alpha if jump is None else jump * (a.abs() <= alpha).double()) + 16 * v * s.abs()
        slopes.append(s)
        slope_errs.append(e_s)
    w_out = weights[-1][0]
    delta = w_out * slopes[-1]
    e_delta = w_out.abs() * slope_errs[-1] + v * delta.abs()
    for layer in range(len(weights) - 2, 0, -1):
        W = weights[layer]
        d = rounded(e_delta, delta)
        t = delta @ W
        n = W.shape[0]
        e_t = d @ W.abs() + (n + 2) * v * ((delta.abs() + d) @ W.abs())
        s, e_s = slopes[layer - 1], slope_errs[layer - 1]
        delta = t * s
        e_delta = e_t * (s.abs() + e_s) + t.abs() * e_s + v * delta.abs()
    W = weights[0]
    d = rounded(e_delta, delta)
    g = delta @ W
    e_g = d @ W.abs() + (W.shape[0] + 2) * v * ((delta.abs() + d) @ W.abs())
    return g, e_g + 1e-30  # + bfloat16 / float32 denormals flushed to zero


@pytest.mark.parametrize("dims,activation,batch", [((100, 200, 200, 1), "leaky_relu", 64),
                                                   ((7, 13, 5, 1), "tanh", 37), ((33, 50, 1), "silu", 5),
                                                   ((20, 48, 33, 17, 1), "silu", 70)])
def test_each_step_gradient_within_the_bfloat16_bound(unit, dims, activation, batch):
    """At each state z_k of a bfloat16 chain (k = 0..K-1), the gradient the chain follows (read off one noiseless
    step with step_size 2 and a flat prior: z' = z - g~) against the float64 gradient of the same bfloat16-valued
    weights, within gradient_error_bound with u = 2^-8. The bfloat16 units' error also exceeds the bound without
    bfloat16 rounding (u = 0), so they really round; the float32 level stays within that tighter bound."""
    _check_gradient_bound(dims, activation, batch, "auto", f"cpu:fused:{TAGS[unit]}", rounds=unit != "vector")


def _check_gradient_bound(dims, activation, batch, backend, tag, rounds, n_steps=4):
    energy = bf16_energy(dims, activation, seed=len(dims) + batch)
    weights = [layer.weight.detach().double() for layer in energy.layers]
    biases = [layer.bias.detach().double() for layer in energy.layers]
    torch.manual_seed(7)
    z0 = torch.randn(batch, dims[0])
    worst, exceeds_f32 = 0.0, False
    for k in range(n_steps):
        z_k = fl.langevin(energy, z0, k, 0.05, seed=11, backend=backend) if k else z0
        z_next, info = fl.langevin(energy, z_k, 1, 2.0, noise_scale=0.0, prior=None, return_info=True,
                                   backend=backend)
        assert info.backend == tag
        g_chain = z_k.double() - z_next.double()  # exact in float64
        g, bound = gradient_error_bound(weights, biases, activation, z_k.double(), U_BF16 if rounds else 0)
        bound = bound + U_FP32 * (z_k.double().abs() + g_chain.abs())  # z' = fl(z - g~): one float32 rounding
        err = (g_chain - g).abs()
        assert (err <= bound).all(), f"step {k}: error/bound up to {(err / bound).max():.3g}"
        worst = max(worst, float((err / bound).max()))
        _, f32_bound = gradient_error_bound(weights, biases, activation, z_k.double(), 0.0)
        exceeds_f32 |= bool((err > f32_bound + U_FP32 * (z_k.double().abs() + g_chain.abs())).any())
    assert exceeds_f32 == rounds
    assert worst > 1e-3  # the bound is not vacuous: some error is within a factor 1000 of it


# ---- (b) Statistics: bfloat16 chains sample what float32 chains sample -----------------------------------------

def _z_scores(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|mean(a) - mean(b)| / standard error of the difference, per column (independent samples)."""
    se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
    return (a.mean(0) - b.mean(0)).abs() / se


def _moments(z: torch.Tensor) -> torch.Tensor:
    """Per sample: z, and the products z_i z_j (i <= j): the first and second moments as column means."""
    i, j = torch.triu_indices(z.shape[1], z.shape[1])
    return torch.cat([z, z[:, i] * z[:, j]], dim=1).double()


def test_gaussian_target_moments_match_float32(unit):
    """A Gaussian posterior: p(z) ∝ N(z; 0, I) exp(-||x - A z - c||^2 / (2 sigma^2)) with a linear generator (so the
    likelihood's products run through the bfloat16 unit): mean and covariance of 8192 ULA chains in bfloat16 against
    float32 (independent seeds), every first and second moment within 4 standard errors; and each chain against the
    closed form. ULA on a Gaussian target is a linear recursion, so its moments after K steps from z0 ~ N(0, I) are
    known exactly, step-size bias included: with precision L = I + A^T A / sigma^2, h = A^T (x - c) / sigma^2 and
    M = I - (eps/2) L, m_{k+1} = M m_k + (eps/2) h and C_{k+1} = M C_k M^T + eps I. Every first and second moment
    of each chain within 4.5 standard errors of m_K and C_K + m_K m_K^T (54 comparisons: about 4e-4 by chance)."""
    torch.manual_seed(4)
    D, P, batch = 6, 10, 8192
    generator = fl.MLP((D, P), output_activation="identity")
    with torch.no_grad():
        generator.layers[0].weight.mul_(1.5)
    energy = fl.MLPEnergy((D, 1))
    with torch.no_grad():
        energy.layers[0].weight.zero_()
        energy.layers[0].bias.zero_()
    posterior = fl.GaussianPosteriorEnergy(energy, generator, sigma=1.0).to(torch.bfloat16)
    x = torch.randn(1, P).expand(batch, P)
    posterior.set_target(x.float())
    z0 = torch.randn(batch, D)
    z_bf16, info = fl.langevin(posterior, z0, 150, 0.05, seed=1, return_info=True)
    assert info.backend == f"cpu:fused:{TAGS[unit]}"
    z_f32 = fl.langevin(posterior.float(), z0, 150, 0.05, seed=2)
    assert _z_scores(_moments(z_bf16), _moments(z_f32)).max() < 4
    A = generator.layers[0].weight.detach().double()  # the bfloat16 values both chains ran
    c = generator.layers[0].bias.detach().double()
    eye = torch.eye(D, dtype=torch.float64)
    M = eye - 0.025 * (eye + A.T @ A)
    shift = 0.025 * (A.T @ (x[0].double() - c))
    m, C = torch.zeros(D, dtype=torch.float64), eye
    for _ in range(150):
        m, C = M @ m + shift, M @ C @ M.T + 0.05 * eye
    i, j = torch.triu_indices(D, D)
    exact = torch.cat([m, (C + torch.outer(m, m))[i, j]])
    for z in (z_bf16, z_f32):
        features = _moments(z)
        se = features.std(0) / math.sqrt(batch)
        assert ((features.mean(0) - exact).abs() / se).max() < 4.5


@pytest.fixture(scope="module")
def mixture_energy():
    """An MLP energy (2-128-128-1, SiLU) fit by regression to the 25-Gaussian mixture's energy (modes on the integer
    grid of [-2, 2]^2, sigma 0.2) on [-2.5, 2.5]^2, float32 with bfloat16-valued parameters (so that the bfloat16
    and float32 chains run the same network). The target's variance there is 1.45; an MLP that has not left the
    plateau of fitting the mean sits at 1.3-1.4, so the fit must get below 0.5 (it reaches about 0.2). One thread:
    these small products only lose to a second one on a shared machine (about 10 s)."""
    torch.manual_seed(0)
    target = GaussianMixtureEnergy(grid_means(5, 1.0), 0.2)
    energy = fl.MLPEnergy((2, 128, 128, 1), "silu")
    optimizer = torch.optim.Adam(energy.parameters(), lr=1e-2)
    losses, threads = [], torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for _ in range(2000):
            z = torch.rand(512, 2) * 5 - 2.5
            loss = (energy(z) - target(z).clamp(max=12)).pow(2).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    assert sum(losses[-100:]) / 100 < 0.5
    return energy.requires_grad_(False).to(torch.bfloat16).float()


def _mode_weights(z: torch.Tensor) -> torch.Tensor:
    """Per sample, one-hot of the nearest of the 25 modes: column means are the mode weights."""
    nearest = torch.cdist(z, grid_means(5, 1.0)).argmin(1)
    return nn.functional.one_hot(nearest, 25).double()


def test_trained_mixture_energy_moments_and_mode_weights_match_float32(unit, mixture_energy):
    """8192 ULA chains on the trained 25-mode energy from uniform starts: the bfloat16 chain's mean, second moments
    and 25 mode weights against the float32 chain's (independent seeds), each within 4.5 standard errors (about
    one in 10^5 per comparison by chance, 30 comparisons)."""
    energy = copy.deepcopy(mixture_energy).to(torch.bfloat16)
    z0 = torch.rand(8192, 2) * 5 - 2.5
    z_bf16, info = fl.langevin(energy, z0, 120, 0.005, prior=None, seed=3, return_info=True)
    assert info.backend == f"cpu:fused:{TAGS[unit]}"
    z_f32 = fl.langevin(mixture_energy, z0, 120, 0.005, prior=None, seed=4)
    assert _z_scores(_moments(z_bf16), _moments(z_f32)).max() < 4.5
    weights = _mode_weights(z_f32).mean(0)
    assert (weights > 0.02).all()  # every mode is visited: the test sees all 25
    assert _z_scores(_mode_weights(z_bf16), _mode_weights(z_f32)).max() < 4.5


# ---- (c) MALA ---------------------------------------------------------------------------------------------------

def test_mala_acceptance_rate_within_three_points_of_float32(unit, mixture_energy):
    """4096 MALA chains of 60 steps on the trained mixture energy, the same noise and uniforms: the bfloat16 chain's
    acceptance rate within 3 points of the float32 chain's (it is within a few hundredths of a point here)."""
    energy = copy.deepcopy(mixture_energy).to(torch.bfloat16)
    z0 = torch.rand(4096, 2) * 5 - 2.5
    _, info_bf16 = fl.langevin(energy, z0, 60, 0.05, method="mala", prior=None, seed=5, return_info=True)
    _, info_f32 = fl.langevin(mixture_energy, z0, 60, 0.05, method="mala", prior=None, seed=5, return_info=True)
    assert info_bf16.backend == f"cpu:fused:{TAGS[unit]}"
    assert 0.3 < info_f32.acceptance_rate < 0.9  # a step that both accepts and rejects
    assert abs(info_bf16.acceptance_rate - info_f32.acceptance_rate) < 0.03


# ---- Triton: tl.dot on bfloat16 operands (under the interpreter here; tensor cores on a GPU) ----------------------

def _triton_cpu():
    require("triton", "cpu")


@pytest.mark.parametrize("dims,activation,batch", [((7, 13, 5, 1), "tanh", 37), ((33, 50, 1), "silu", 70)])
def test_triton_each_step_gradient_within_the_bfloat16_bound(dims, activation, batch):
    """The Triton chain's bfloat16 products (every layer product a bfloat16 tl.dot, float32 accumulation) within
    the same derived bound as the CPU's units, and beyond the float32-only bound (they really round)."""
    _triton_cpu()
    _check_gradient_bound(dims, activation, batch, "triton", "triton:fused:bf16-dot", rounds=True, n_steps=3)


@pytest.mark.parametrize("method", ["ula", "mala"])
def test_triton_bfloat16_chain_matches_the_cpu_bfloat16_chain(method):
    """A posterior chain (MLP energy and MLP generator, diagonal prior, clipping) in bfloat16 on Triton and on the
    CPU's best unit: the same bfloat16 roundings of the same values, so they differ only by float32 accumulation
    order (and a rare bfloat16 rounding it flips), far less than either differs from the float32 chain. The CPU
    chain's statistical tests above therefore carry over to the Triton chain."""
    _triton_cpu()
    torch.manual_seed(3)
    energy = fl.MLPEnergy((12, 40, 24, 1), "silu")
    generator = fl.MLP((8, 30, 20), "tanh", "sigmoid")
    posterior = fl.GaussianPosteriorEnergy(energy, generator, sigma=0.5).to(torch.bfloat16)
    posterior.set_target(torch.rand(45, 20))
    z0 = torch.randn(45, 12)
    prior = fl.DiagonalNormalPrior(torch.linspace(-0.5, 0.5, 12), torch.full((12,), -0.3))
    kwargs = dict(method=method, seed=9, clip_grad=5.0, prior=prior, return_info=True)
    z_triton, info_triton = fl.langevin(posterior, z0, 5, 0.01, backend="triton", **kwargs)
    z_cpu, info_cpu = fl.langevin(posterior, z0, 5, 0.01, backend="cpu", **kwargs)
    z_f32, _ = fl.langevin(posterior.float(), z0, 5, 0.01, backend="cpu", **kwargs)
    assert info_triton.backend == "triton:fused:bf16-dot" and info_cpu.backend.startswith("cpu:fused:bf16-")
    rounding = (z_cpu - z_f32).abs().max()
    assert rounding > 1e-5  # bfloat16 rounding shows
    assert (z_triton - z_cpu).abs().max() < 0.05 * rounding
    torch.testing.assert_close(info_triton.energies, info_cpu.energies, rtol=1e-3, atol=1e-3)
    if method == "mala":
        assert torch.equal(info_triton.accepted, info_cpu.accepted)


def test_triton_bfloat16_chain_compiles_to_bfloat16_tensor_core_products():
    """The mixed-precision kernel as an H100/H200 would build it (triton.compile for sm_90 with the bundled ptxas,
    no GPU needed): its layer products are bfloat16 tensor-core instructions with float32 accumulators."""
    pytest.importorskip("triton")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    result = subprocess.run([sys.executable, "-m", "tests.triton_compile", "mlp_chain_mala_bf16"], cwd=root, env=env,
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "sm_90 ok" in result.stdout and ".f32.bf16.bf16" in result.stdout, result.stdout


# ---- benchmarks/bf16_chain.py ---------------------------------------------------------------------------------------

def test_benchmark_rows_name_what_ran_and_compare_within_one_run():
    """The benchmark's rows at a small batch, one round: each fused bfloat16 row ran the unit it names (its
    info.backend), ratios are to the fused float32 and eager rows of the same run, the targets are checked."""
    _cpu()
    bench = load("bf16_chain")
    units = [u for u in bench.UNITS if bench._runs(u)]
    rows = bench.measure(16, 1, units)
    by_impl = {row["impl"]: row for row in rows}
    assert set(by_impl) == {f"fused bf16 {u}" for u in units} | {"fused f32", "eager f32", "eager autocast"}
    for unit in units:
        assert by_impl[f"fused bf16 {unit}"]["ran"] == f"cpu:fused:{TAGS[unit]}"
    assert by_impl["fused f32"]["ran"] == "cpu:fused" and by_impl["fused f32"]["vs_fused_f32"] == 1.0
    assert by_impl["eager f32"]["vs_eager_f32"] == 1.0
    for row in rows:
        assert 0 < row["min_ms"] <= row["median_ms"] <= row["max_ms"] and row["mm_bf16_gflops"] > 0
    lines = bench.check_targets([dict(row, batch=1024) for row in rows])
    assert len(lines) == len(units) and all("target >= 3.5x fused f32 and >= 1000 GFLOP/s" in x for x in lines)
