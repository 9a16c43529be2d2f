"""The trainers' chain door: the library and the hand-written eager loop sample the same target."""

import math

import pytest
import torch

from fastlangevin.trainers import ChainTimer, eager_langevin, run_chain


def quadratic(precision):
    return lambda z: 0.5 * precision * z.pow(2).sum(1)


@pytest.mark.parametrize("sampler", ["library", "eager"])
def test_stationary_variance_matches_ula_closed_form(sampler):
    # energy λ_E z²/2 plus the N(0, I) prior: precision λ = λ_E + 1; ULA's stationary variance is 1/(λ(1 − ελ/4)).
    lam_e, eps, n = 3.0, 0.1, 20_000
    lam = lam_e + 1
    z0 = torch.zeros(n, 2, dtype=torch.float64)
    z = run_chain(quadratic(lam_e), z0, 200, eps, seed=7, sampler=sampler)
    expected = 1 / (lam * (1 - eps * lam / 4))
    std_err = expected * math.sqrt(2 / (2 * n))  # variance of a variance estimate over 2n draws
    assert abs(z.var().item() - expected) < 5 * std_err
    assert abs(z.var().item() - 1 / lam) > 5 * std_err  # the ULA bias is resolved: this test can tell them apart


def test_eager_prior_forms_agree_and_z0_is_untouched():
    z0 = torch.randn(64, 3, dtype=torch.float64)
    before = z0.clone()
    energy = quadratic(2.0)
    a = eager_langevin(energy, z0, 10, 0.05, prior="normal", seed=3)
    b = eager_langevin(energy, z0, 10, 0.05, prior=lambda z: -0.5 * z.pow(2).sum(1), seed=3)
    c = eager_langevin(lambda z: energy(z) + 0.5 * z.pow(2).sum(1), z0, 10, 0.05, prior=None, seed=3)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)
    assert torch.equal(z0, before) and not a.requires_grad


def test_parameters_keep_their_grad():
    net = torch.nn.Linear(2, 1)
    net.weight.grad = torch.ones_like(net.weight)
    for sampler in ("library", "eager"):
        run_chain(lambda z: net(z).squeeze(1), torch.randn(8, 2), 5, 0.01, seed=1, sampler=sampler)
        assert torch.equal(net.weight.grad, torch.ones_like(net.weight)) and net.bias.grad is None


def test_unknown_sampler_and_timer():
    with pytest.raises(ValueError, match="sampler must be one of"):
        run_chain(quadratic(1.0), torch.zeros(2, 2), 1, 0.1, sampler="jax")
    timer = ChainTimer()
    with timer:
        run_chain(quadratic(1.0), torch.zeros(4, 2), 3, 0.1)
    assert timer.seconds > 0


@pytest.mark.parametrize("sampler", ["library", "eager"])
@pytest.mark.parametrize("prior", ["normal", "callable", None])
def test_clip_grad_bounds_the_energy_gradient_only(sampler, prior):
    # One step from a fixed z0 with a steep energy: the mean move is −ε/2·(clipped ∇E − ∇log p₀); noise averages out.
    n, eps, clip = 40_000, 0.01, 2.0
    z0 = torch.tensor([[3.0, -4.0]], dtype=torch.float64).expand(n, 2).contiguous()
    log_prior = {"normal": "normal", None: None, "callable": lambda z: -0.5 * (z - 1).pow(2).sum(1)}[prior]
    prior_grad = {"normal": z0[0], None: torch.zeros(2, dtype=torch.float64), "callable": z0[0] - 1}[prior]
    z1 = run_chain(quadratic(100.0), z0, 1, eps, prior=log_prior, seed=5, sampler=sampler, clip_grad=clip)
    grad_e = 100.0 * z0[0]
    expected = z0[0] - 0.5 * eps * (grad_e * clip / grad_e.norm() + prior_grad)
    std_err = math.sqrt(eps / n)
    assert (z1.mean(0) - expected).abs().max() < 5 * std_err
