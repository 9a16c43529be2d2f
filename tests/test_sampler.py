"""fl.langevin and LangevinSampler: agreement with the hand-written loop, every backend, the user's parameters left
alone, gradients through a chain, info, and bad input."""

import copy

import pytest
import torch
from torch import nn

import fastlangevin as fl
from fastlangevin.ops.philox import normal_noise
from tests.lanes import LANES, require


def mlp_energy(dtype=torch.float64, device="cpu", d=6, seed=0):
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(d, 16), nn.GELU(), nn.Linear(16, 16), nn.LeakyReLU(0.2), nn.Linear(16, 1))
    net = net.to(device=device, dtype=dtype)
    return lambda z: net(z).squeeze(-1), net


def hand_written_chain(energy, z0, n_steps, step_size, noise_scale, seed):
    """The loop published latent-EBM code writes (LEBM's sample_langevin_prior_z), with fastlangevin's noise."""
    z = z0.clone()
    for k in range(n_steps):
        z = z.detach().requires_grad_(True)
        e = energy(z)
        grad = torch.autograd.grad(e.sum(), z)[0]
        noise = normal_noise(z.numel(), torch.tensor([seed, k]), z.dtype).reshape(z.shape)
        z = z - 0.5 * step_size * (grad + z) + noise_scale * noise
    return z.detach()


@pytest.mark.parametrize("backend, device", LANES)
def test_chain_matches_hand_written_loop(backend, device):
    require(backend, device)
    energy, _ = mlp_energy(device=device)
    z0 = torch.randn(13, 6, dtype=torch.float64, device=device)
    expected = hand_written_chain(energy, z0, 12, 0.05, 0.05 ** 0.5, seed=77)
    got = fl.langevin(energy, z0, n_steps=12, step_size=0.05, seed=77, backend=backend)
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("backend, device", LANES)
def test_float32_chain_close_to_float64(backend, device):
    require(backend, device)
    energy64, net64 = mlp_energy(device=device)
    net32 = copy.deepcopy(net64).float()
    z0 = torch.randn(9, 6, dtype=torch.float64, device=device)
    z64 = fl.langevin(energy64, z0, 10, 0.02, seed=1, backend="reference")
    z32 = fl.langevin(lambda z: net32(z).squeeze(-1), z0.float(), 10, 0.02, seed=1, backend=backend)
    torch.testing.assert_close(z32.double(), z64, rtol=1e-4, atol=1e-4)


def test_reproducible_and_seeds_differ():
    energy, _ = mlp_energy()
    z0 = torch.randn(4, 6, dtype=torch.float64)
    a = fl.langevin(energy, z0, 5, 0.1, seed=3)
    assert torch.equal(a, fl.langevin(energy, z0, 5, 0.1, seed=3))
    assert not torch.equal(a, fl.langevin(energy, z0, 5, 0.1, seed=4))
    z1, info = fl.langevin(energy, z0, 5, 0.1, return_info=True)  # seed=None draws one and reports it
    assert torch.equal(z1, fl.langevin(energy, z0, 5, 0.1, seed=info.seed))


def test_parameters_and_inputs_left_alone():
    energy, net = mlp_energy()
    net[0].weight.requires_grad_(False)
    net[2].weight.grad = torch.full_like(net[2].weight, 3.0)
    before = {n: (p.requires_grad, None if p.grad is None else p.grad.clone()) for n, p in net.named_parameters()}
    z0 = torch.randn(5, 6, dtype=torch.float64)
    z0_copy = z0.clone()
    z = fl.langevin(energy, z0, 4, 0.1, seed=0)
    assert not z.requires_grad and z.grad_fn is None
    assert torch.equal(z0, z0_copy)
    for name, p in net.named_parameters():
        req, grad = before[name]
        assert p.requires_grad == req
        assert (p.grad is None) if grad is None else torch.equal(p.grad, grad)


def test_chain_under_no_grad_and_inference_mode():
    energy, _ = mlp_energy()
    z0 = torch.randn(3, 6, dtype=torch.float64)
    expected = fl.langevin(energy, z0, 3, 0.1, seed=9)
    with torch.no_grad():
        torch.testing.assert_close(fl.langevin(energy, z0, 3, 0.1, seed=9), expected)
    with torch.inference_mode():
        torch.testing.assert_close(fl.langevin(energy, z0, 3, 0.1, seed=9), expected)


@pytest.mark.parametrize("backend, device", LANES)
def test_gradient_through_chain(backend, device):
    """create_graph=True: d(sum z_K)/d z0 and d/d weights equal those of the differentiable reference chain."""
    require(backend, device)
    energy, net = mlp_energy(device=device)
    z0 = torch.randn(4, 6, dtype=torch.float64, device=device, requires_grad=True)

    def grads(b):
        zk = fl.langevin(energy, z0, 3, 0.1, seed=5, backend=b, create_graph=True)
        return torch.autograd.grad(zk.pow(2).sum(), [z0, net[0].weight])

    for got, expected in zip(grads(backend), grads("reference")):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10)


def test_gradient_through_chain_matches_finite_differences():
    energy, _ = mlp_energy()
    z0 = torch.randn(2, 6, dtype=torch.float64, requires_grad=True)
    f = lambda z: fl.langevin(energy, z, 2, 0.1, seed=5, create_graph=True)
    assert torch.autograd.gradcheck(f, (z0,))


def test_return_info_and_clip_grad():
    energy, _ = mlp_energy()
    z0 = torch.randn(6, 6, dtype=torch.float64)
    z, info = fl.langevin(energy, z0, 7, 0.1, seed=2, return_info=True)
    assert info.energies.shape == (7, 6) and info.grad_norms.shape == (7, 6)
    torch.testing.assert_close(info.energies[0], energy(z0).detach())
    zz = z0.clone().requires_grad_(True)
    torch.testing.assert_close(info.grad_norms[0], torch.autograd.grad(energy(zz).sum(), zz)[0].norm(dim=1))
    assert info.seed == 2 and info.noise_scale == pytest.approx(0.1 ** 0.5)
    # clipping to a bound below every gradient norm changes the chain; a huge bound does not
    bound = 0.5 * info.grad_norms[0].min().item()
    assert not torch.allclose(fl.langevin(energy, z0, 7, 0.1, seed=2, clip_grad=bound), z)
    torch.testing.assert_close(fl.langevin(energy, z0, 7, 0.1, seed=2, clip_grad=1e9), z)


def test_clip_grad_bounds_the_drift():
    """With noise off and a flat prior, one clipped step moves each sample by at most step_size/2 * clip."""
    z0 = torch.randn(8, 3, dtype=torch.float64)
    energy = lambda z: 1e3 * z.pow(2).sum(1)
    z1 = fl.langevin(energy, z0, 1, 0.1, noise_scale=0.0, prior=None, clip_grad=2.0)
    torch.testing.assert_close((z1 - z0).norm(dim=1), torch.full((8,), 0.1, dtype=torch.float64), rtol=1e-9, atol=0)


def test_priors_are_equivalent():
    energy, _ = mlp_energy()
    z0 = torch.randn(5, 6, dtype=torch.float64)
    normal = fl.langevin(energy, z0, 4, 0.1, seed=1)
    diag = fl.langevin(energy, z0, 4, 0.1, seed=1, prior=(torch.zeros(6), torch.zeros(6)))
    scalar_diag = fl.langevin(energy, z0, 4, 0.1, seed=1, prior=fl.DiagonalNormalPrior(0.0, 0.0))
    callable_prior = fl.langevin(energy, z0, 4, 0.1, seed=1, prior=lambda z: -0.5 * z.pow(2).sum(1))
    for other in (diag, scalar_diag, callable_prior):
        torch.testing.assert_close(other, normal, rtol=1e-12, atol=1e-12)
    flat = fl.langevin(lambda z: energy(z) + 0.5 * z.pow(2).sum(1), z0, 4, 0.1, seed=1, prior=None)
    torch.testing.assert_close(flat, normal, rtol=1e-12, atol=1e-12)


def test_latent_with_spatial_shape():
    energy = lambda z: (z ** 2).sum(dim=(1, 2, 3)) * 0.3
    z0 = torch.randn(3, 2, 4, 4, dtype=torch.float64)
    got = fl.langevin(energy, z0, 3, 0.05, seed=4)
    flat = fl.langevin(lambda z: 0.3 * (z ** 2).sum(1), z0.reshape(3, -1), 3, 0.05, seed=4)
    torch.testing.assert_close(got.reshape(3, -1), flat)


def test_zero_steps_returns_a_copy():
    z0 = torch.randn(2, 3)
    z = fl.langevin(lambda z: z.sum(1), z0, 0, 0.1)
    assert torch.equal(z, z0) and z.data_ptr() != z0.data_ptr()


def test_sampler_module():
    energy, net = mlp_energy(dtype=torch.float32)
    sampler = fl.LangevinSampler(net, n_steps=5, step_size=0.1)
    z0 = torch.randn(4, 6)
    wrapped = fl.LangevinSampler(energy, n_steps=5, step_size=0.1)
    torch.testing.assert_close(wrapped(z0, seed=1), fl.langevin(energy, z0, 5, 0.1, seed=1))
    assert sampler.sample(7, (6,), seed=3).shape == (7, 6)
    torch.testing.assert_close(sampler.sample(7, (6,), seed=3), sampler.sample(7, (6,), seed=3))
    assert "n_steps=5" in repr(sampler)
    with pytest.raises(ValueError, match="step_size"):
        fl.LangevinSampler(net, n_steps=5, step_size=-1.0)


def test_energy_errors_name_the_problem_and_change_nothing():
    z0 = torch.randn(4, 3)
    keep = z0.clone()
    cases = [
        (lambda z: z.sum(), "shape \\(4,\\)"),
        (lambda z: z, "shape \\(4,\\)"),
        (lambda z: z.sum(1).double(), "float64"),
        (lambda z: z.sum(1).detach(), "does not depend on z"),
        (lambda z: 3, "must return a tensor"),
    ]
    for energy, match in cases:
        with pytest.raises((ValueError, TypeError), match=match):
            fl.langevin(energy, z0, 3, 0.1)
        assert torch.equal(z0, keep)


def test_non_finite_energy_names_the_step():
    z0 = torch.zeros(6, 2)

    def energy(z):  # finite for 3 steps, then NaN for two samples
        energy.calls += 1
        e = z.pow(2).sum(1)
        if energy.calls > 3:
            e = e + torch.tensor([float("nan"), float("nan"), 0, 0, 0, 0], dtype=z.dtype)
        return e

    energy.calls = 0
    with pytest.raises(fl.NonFiniteEnergyError, match=r"step 3 .*2 of 6 samples"):
        fl.langevin(energy, z0, 10, 0.1)
    assert torch.equal(z0, torch.zeros(6, 2))


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_steps=-1), "n_steps"), (dict(n_steps=2.5), "n_steps"), (dict(step_size=0), "step_size"),
    (dict(noise_scale=float("nan")), "noise_scale"), (dict(clip_grad=0.0), "clip_grad"),
    (dict(seed=2**63), "seed"), (dict(backend="tpu"), "unknown"),
])
def test_bad_hyper_parameters(kwargs, match):
    args = dict(n_steps=3, step_size=0.1)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError, fl.BackendUnavailableError), match=match):
        fl.langevin(lambda z: z.sum(1), torch.zeros(2, 2), **args)


def test_bad_z0():
    with pytest.raises(TypeError, match="floating-point"):
        fl.langevin(lambda z: z.sum(1), torch.zeros(2, 2, dtype=torch.int32), 3, 0.1)
    with pytest.raises(ValueError, match="non-finite"):
        fl.langevin(lambda z: z.sum(1), torch.tensor([[float("inf")]]), 3, 0.1)
    with pytest.raises(ValueError, match="B >= 1"):
        fl.langevin(lambda z: z.sum(1), torch.zeros(0, 2), 3, 0.1)


def test_backend_info_reports_every_backend():
    info = fl.backend_info()
    assert set(info.backends["cpu"]) == {"reference", "cpu", "cuda", "triton"}
    assert info.backends["cpu"]["reference"].available
    assert info.auto["cpu"] in ("cpu", "reference")
    text = str(info)
    for name in ("reference", "cpu", "cuda", "triton"):
        assert name in text
    if not torch.cuda.is_available():
        assert "cuda" not in info.auto and not info.backends["cuda"]["cuda"].available


def test_import_is_light():
    import subprocess
    import sys
    code = ("import sys, fastlangevin; heavy = [m for m in ('triton', 'cupy', 'jax', 'fastlangevin._C', "
            "'fastlangevin._C_cuda') if m in sys.modules]; print(heavy); assert not heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grad_norms_are_the_energys_alone_with_a_callable_prior():
    z0 = torch.randn(16, 3, dtype=torch.float64)
    energy = lambda z: 2.0 * z.pow(2).sum(1)  # ∇E = 4z
    _, info = fl.langevin(energy, z0, 1, 0.01, prior=lambda z: -(z - 5).pow(2).sum(1), seed=0, return_info=True)
    torch.testing.assert_close(info.grad_norms[0], 4 * z0.norm(dim=1))
