"""The sampler against targets whose answer is known in closed form. Tolerances are numbers of standard errors."""

import math

import pytest
import torch

import fastlangevin as fl
from fastlangevin.priors import stationary_variance
from tests.lanes import LANES, require

N_SE = 5  # every check allows 5 standard errors: a false alarm about once in 1.7 million runs


def _var_se(var, n):
    return var * math.sqrt(2.0 / (n - 1))


@pytest.mark.parametrize("backend, device", LANES)
def test_ula_stationary_variance_on_gaussian(backend, device):
    """E(z) = (λ−1)/2·‖z‖² with the N(0, I) prior: precision λ. ULA's stationary variance is 1/(λ(1 − ελ/4)),
    which differs from 1/λ by 14 % at ελ = 0.5 — far more than the 5-SE tolerance, so the test tells them apart."""
    require(backend, device)
    lam, eps = 2.0, 0.25
    chains, dim = (4000, 4) if backend != "triton" or device == "cuda" else (1000, 4)
    z0 = torch.randn(chains, dim, dtype=torch.float64, device=device)
    z = fl.langevin(lambda z: 0.5 * (lam - 1) * z.pow(2).sum(1), z0, 60, eps, seed=2024, backend=backend)
    n = z.numel()
    want = stationary_variance(lam, eps)
    var = z.var().item()
    assert abs(var - want) < N_SE * _var_se(want, n)
    assert abs(var - 1 / lam) > N_SE * _var_se(want, n)
    assert abs(z.mean().item()) < N_SE * math.sqrt(want / n)


def test_diagonal_prior_stationary_moments():
    """Flat energy, prior N(μ, diag(s²)): per-coordinate precision 1/s², mean μ (ULA keeps the mean exact)."""
    mean = torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    log_std = torch.tensor([0.0, math.log(0.5), math.log(2.0)], dtype=torch.float64)
    eps = 0.1
    z0 = torch.randn(20000, 3, dtype=torch.float64)
    z = fl.langevin(lambda z: 0.0 * z.sum(1), z0, 200, eps, prior=(mean, log_std), seed=7)
    for i in range(3):
        lam = math.exp(-2 * log_std[i].item())
        want = stationary_variance(lam, eps)
        assert abs(z[:, i].var().item() - want) < N_SE * _var_se(want, z.shape[0])
        assert abs(z[:, i].mean().item() - mean[i].item()) < N_SE * math.sqrt(want / z.shape[0])


def test_noise_scale_zero_is_gradient_descent_to_the_mode():
    """With σ = 0 the chain is deterministic gradient descent on E − log prior and converges to the mode."""
    target = torch.tensor([1.5, -0.5], dtype=torch.float64)
    energy = lambda z: 0.5 * (z - target).pow(2).sum(1)  # with N(0, I): mode at target / 2
    z = fl.langevin(energy, torch.randn(5, 2, dtype=torch.float64), 200, 0.2, noise_scale=0.0)
    torch.testing.assert_close(z, (target / 2).expand(5, 2), rtol=0, atol=1e-9)


def test_two_mode_mixture_weights():
    """1-D mixture ½N(−2, 0.5²) + ½N(2, 0.5²) as a flat-prior energy: small steps, many chains started from both
    modes; the share on the right must stay ½ within sampling error (both modes are kept, none is favoured)."""
    s2 = 0.25

    def energy(z):
        x = z[:, 0]
        return -torch.logsumexp(torch.stack([-(x - 2) ** 2 / (2 * s2), -(x + 2) ** 2 / (2 * s2)]), 0)

    n = 8000
    z0 = torch.cat([torch.full((n // 2, 1), -2.0), torch.full((n // 2, 1), 2.0)]).double()
    z = fl.langevin(energy, z0, 100, 0.01, prior=None, seed=11)
    share = (z[:, 0] > 0).double().mean().item()
    assert abs(share - 0.5) < N_SE * math.sqrt(0.25 / n)
    right = z[z[:, 0] > 0, 0]
    want = stationary_variance(1 / s2, 0.01)
    assert abs(right.var().item() - want) < N_SE * _var_se(want, right.numel()) + 0.01 * want


@pytest.mark.parametrize("lane", ["generic", "fused"])
def test_mala_is_exact_where_ula_is_biased(lane):
    """Gaussian target of precision λ at ελ = 1: ULA's stationary variance is 4/(3λ), a third too large; MALA's is
    exactly 1/λ. Each chain's last state is one independent sample."""
    chains, dim = 20000, 2
    if lane == "generic":
        lam, eps = 2.0, 0.5
        energy = lambda z: 0.5 * (lam - 1) * z.pow(2).sum(1)
    else:
        require("cpu", "cpu")
        # an MLPEnergy with a zero last layer is constant: the target is the N(0, I) prior alone
        lam, eps = 1.0, 1.0
        energy = fl.MLPEnergy((dim, 4, 1), "tanh").double()
        torch.nn.init.zeros_(energy.layers[-1].weight)
    z0 = torch.randn(chains, dim, dtype=torch.float64)
    z, info = fl.langevin(energy, z0, 150, eps, seed=99, method="mala", return_info=True)
    if lane == "fused" and hasattr(fl._ext.load_cpu(), "mlp_chain"):
        assert info.backend == "cpu:fused"
    n = z.numel()
    assert abs(z.var().item() - 1 / lam) < N_SE * _var_se(1 / lam, n)
    assert 0.3 < info.acceptance_rate < 1.0
    ula_var = stationary_variance(lam, eps)
    z_ula = fl.langevin(energy, z0, 150, eps, seed=99)
    assert abs(z_ula.var().item() - ula_var) < N_SE * _var_se(ula_var, n)
    assert abs(z.var().item() - ula_var) > N_SE * _var_se(ula_var, n)
