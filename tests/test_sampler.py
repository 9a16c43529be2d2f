"""fl.langevin and LangevinSampler: agreement with the hand-written loop, every backend, the user's parameters left
alone, gradients through a chain, info, and bad input."""

import copy
import math
import os

import numpy as np
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
            "'fastlangevin._C_avx2', 'fastlangevin._C_avx512', 'fastlangevin._C_cuda') if m in sys.modules]; "
            "print(heavy); assert not heavy")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_grad_norms_are_the_energys_alone_with_a_callable_prior():
    z0 = torch.randn(16, 3, dtype=torch.float64)
    energy = lambda z: 2.0 * z.pow(2).sum(1)  # ∇E = 4z
    _, info = fl.langevin(energy, z0, 1, 0.01, prior=lambda z: -(z - 5).pow(2).sum(1), seed=0, return_info=True)
    torch.testing.assert_close(info.grad_norms[0], 4 * z0.norm(dim=1))


# ---------------------------------------------------------------- issue 14: every error named, nothing touched

def test_gradients_through_clipping_pass_gradcheck():
    """The clip factor min(1, c/‖∇E‖) depends on z: with create_graph it is differentiated, not held constant."""
    energy, _ = mlp_energy()
    z0 = torch.randn(3, 6, dtype=torch.float64, requires_grad=True)
    _, info = fl.langevin(energy, z0.detach(), 2, 0.1, seed=5, return_info=True)
    clip = 0.5 * info.grad_norms.min().item()  # every sample clipped at every step, away from the kink
    f = lambda z: fl.langevin(energy, z, 2, 0.1, seed=5, clip_grad=clip, create_graph=True)
    assert torch.autograd.gradcheck(f, (z0,))
    g = lambda z: fl.langevin(energy, z, 2, 0.1, seed=5, clip_grad=clip, create_graph=True, prior=lambda u: -u.pow(
        2).sum(1))  # the unfused prior term is added after clipping
    assert torch.autograd.gradcheck(g, (z0,))


@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("n_steps", [0, 2])
def test_create_graph_leaves_z0_alone_and_returns_a_new_tensor(requires_grad, n_steps):
    energy, _ = mlp_energy()
    z0 = torch.randn(3, 6, dtype=torch.float64, requires_grad=requires_grad)
    keep = z0.detach().clone()
    z = fl.langevin(energy, z0, n_steps, 0.1, seed=1, create_graph=True)
    assert z0.requires_grad == requires_grad and z0.grad is None and z0.is_leaf
    assert torch.equal(z0.detach(), keep)
    assert z is not z0 and z.untyped_storage().data_ptr() != z0.untyped_storage().data_ptr()
    if requires_grad:  # still differentiable w.r.t. z0 (identity at n_steps=0)
        (grad,) = torch.autograd.grad(z.sum(), z0)
        if n_steps == 0:
            torch.testing.assert_close(grad, torch.ones_like(z0))


@pytest.mark.parametrize("kind", ["function", "mlp fused", "mlp reference", "mala"])
def test_zero_steps_return_a_new_tensor_on_every_path(kind):
    z0 = torch.randn(4, 6)
    energy = fl.MLPEnergy((6, 8, 1)) if kind.startswith("mlp") else (lambda z: z.pow(2).sum(1))
    backend = "reference" if kind == "mlp reference" else "auto"
    z, info = fl.langevin(energy, z0, 0, 0.1, backend=backend, return_info=True,
                          method="mala" if kind == "mala" else "ula")
    assert torch.equal(z, z0) and z.untyped_storage().data_ptr() != z0.untyped_storage().data_ptr()
    assert info.acceptance_rate is None  # no proposal was made (was NaN for MALA)


def test_meta_and_other_devices():
    """A meta tensor has no values: named error (was NameError in backend resolution). Devices other than CPU and
    CUDA run the reference backend (it is plain PyTorch), noted as a fallback."""
    with pytest.raises(ValueError, match="z0 is a meta tensor"):
        fl.langevin(lambda z: z.sum(1), torch.zeros(2, 3, device="meta"), 2, 0.1)
    with pytest.raises(ValueError, match="z is a meta tensor"):
        fl.ops.langevin_step(torch.zeros(2, 3, device="meta"), torch.zeros(2, 3, device="meta"), 0.1)
    from fastlangevin.backends import _choose, backend_status
    assert _choose("auto", "mps", torch.float32) == "reference"
    assert _choose("reference", "xpu", torch.float16) == "reference"
    for name in ("cpu", "cuda", "triton"):
        assert not backend_status(name, "mps").available
    with pytest.raises(fl.BackendUnavailableError, match="backend 'cpu' is not available for mps"):
        _choose("cpu", "mps", torch.float32)


def test_backend_unavailable_is_a_value_error():
    assert issubclass(fl.BackendUnavailableError, ValueError) and issubclass(fl.BackendUnavailableError, RuntimeError)
    with pytest.raises(ValueError, match="backend 'cuda'"):
        fl.langevin(lambda z: z.sum(1), torch.zeros(2, 3), 2, 0.1, backend="cuda") if not torch.cuda.is_available() \
            else (_ for _ in ()).throw(ValueError("backend 'cuda' (a GPU is present: nothing to check)"))


@pytest.mark.parametrize("energy_kind", ["mlp", "function"])
@pytest.mark.parametrize("n_steps", [2**63, 2**64, -1])
def test_huge_and_negative_n_steps_name_n_steps(energy_kind, n_steps):
    energy = fl.MLPEnergy((3, 4, 1)) if energy_kind == "mlp" else (lambda z: z.sum(1))
    with pytest.raises(ValueError, match=r"n_steps must be an int in \[0, 2\*\*63 - 1\]"):
        fl.langevin(energy, torch.zeros(2, 3), n_steps, 0.1)


@pytest.mark.parametrize("energy_kind", ["mlp", "function"])
@pytest.mark.parametrize("method", ["ula", "mala"])
def test_info_that_cannot_be_held_names_n_steps_before_the_chain_runs(energy_kind, method):
    """return_info keeps (n_steps, B) values: 2**40 steps failed with an allocator's RuntimeError on the fused path
    and ran for ever on the step-op path (collecting them)."""
    energy = fl.MLPEnergy((3, 4, 1)) if energy_kind == "mlp" else (lambda z: z.pow(2).sum(1))
    for n_steps in (2**40, 2**62):
        with pytest.raises(ValueError, match=r"n_steps=\d+ with return_info=True keeps .* return_info=False"):
            fl.langevin(energy, torch.zeros(2, 3), n_steps, 0.1, return_info=True, method=method)


def _resident_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.skipif(not os.path.exists("/proc/self/statm"), reason="reads the resident set size from /proc")
def test_a_long_chain_without_info_holds_no_per_step_values(monkeypatch):
    """Without return_info a chain's memory does not grow with n_steps: it held every step's (B,) energies to its
    end (10**4 samples, 10**4 steps: 800 MB of float64 energies never asked for)."""
    from fastlangevin import sampler
    monkeypatch.setattr(sampler, "FINITE_CHECK_STEPS", 16)
    batch, n_steps, resident = 50_000, 300, []

    def energy(z):
        resident.append(_resident_bytes())
        return 0.5 * z.pow(2).sum(1)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # on a busy machine two intra-op threads wait on each other at every op (30× slower)
    try:
        fl.langevin(energy, torch.zeros(batch, 1, dtype=torch.float64), n_steps, 0.1, backend="cpu")
    finally:
        torch.set_num_threads(threads)
    held = batch * 8 * n_steps  # what the chain used to hold at its end: 120 MB
    assert resident[-1] - resident[50] < held / 4, (resident[50], resident[-1])


@pytest.mark.parametrize("bad_step", [0, 5, 10, 13])
def test_the_first_non_finite_step_is_found_across_blocks(bad_step, monkeypatch):
    """The energies are reduced to the first bad step block by block (FINITE_CHECK_STEPS): the first block, a middle
    one, one that spans two, and the last, partial one."""
    from fastlangevin import sampler
    monkeypatch.setattr(sampler, "FINITE_CHECK_STEPS", 4)
    calls = []

    def energy(z):
        calls.append(None)
        e = z.pow(2).sum(1)
        if len(calls) - 1 >= bad_step:  # from bad_step on: 2 samples at bad_step, then all of them
            e = e + torch.tensor([0.0, math.inf, math.nan, 0.0] if len(calls) - 1 == bad_step else [math.inf] * 4)
        return e

    with pytest.raises(fl.NonFiniteEnergyError, match=rf"step {bad_step} \(0-based\) for 2 of 4 samples"):
        fl.langevin(energy, torch.zeros(4, 3), 14, 0.1)


def _posterior(energy_dims=(3, 5, 1), generator_dims=(2, 4), batch=4):
    posterior = fl.GaussianPosteriorEnergy(fl.MLPEnergy(energy_dims), fl.MLP(generator_dims, "tanh"), 0.5)
    return posterior.set_target(torch.rand(batch, generator_dims[-1], dtype=torch.float64))


@pytest.mark.parametrize("path", [dict(), dict(backend="reference"), dict(create_graph=True),
                                  dict(prior=lambda z: -z.pow(2).sum(1)), dict(method="mala")])
@pytest.mark.parametrize("kind", ["MLPEnergy", "GaussianPosteriorEnergy"])
def test_an_mlp_energy_of_another_dtype_or_device_fails_alike_on_every_path(path, kind):
    """One rule, one message: checked before a path is chosen (the fused path skipped a float32 energy for a
    float64 z0 and the autograd chain then crashed inside F.linear with a RuntimeError)."""
    z0 = torch.randn(4, 3, dtype=torch.float64)
    make = (lambda *dims: fl.MLPEnergy(dims[0])) if kind == "MLPEnergy" else _posterior
    with pytest.raises(TypeError, match=r"energy(\.energy)?: parameter layers\.0\.weight is torch\.float32 but "
                                        r"its input is torch\.float64"):
        fl.langevin(make((3, 5, 1)), z0, 2, 0.1, **path)
    with pytest.raises(ValueError, match=r"energy(\.energy)?: .* is on meta but (its input|z) is on cpu"):
        fl.langevin(make((3, 5, 1)).to(device="meta", dtype=torch.float64), z0, 2, 0.1, **path)
    with pytest.raises(ValueError, match="expects inputs with 4 features"):
        fl.langevin(make((4, 5, 1)).double(), z0, 2, 0.1, **path)
    if kind == "GaussianPosteriorEnergy":
        with pytest.raises(TypeError, match=r"energy\.generator: parameter layers\.0\.weight is torch\.float32"):
            posterior = _posterior().double()
            posterior.generator.float()
            fl.langevin(posterior, z0, 2, 0.1, **path)
        with pytest.raises(ValueError, match="the generator makes 4 values per sample but the data"):
            posterior = _posterior().double()
            posterior.set_target(torch.rand(4, 5, dtype=torch.float64))
            fl.langevin(posterior, z0, 2, 0.1, **path)
        with pytest.raises(ValueError, match="no data for chains of 4 samples"):
            fl.langevin(_posterior(batch=3).double(), z0, 2, 0.1, **path)
        with pytest.raises(ValueError, match="the generator reads the first 4 latent features"):
            fl.langevin(fl.GaussianPosteriorEnergy(fl.MLPEnergy((3, 1)), fl.MLP((4, 2)), 1.0).double().set_target(
                torch.rand(4, 2, dtype=torch.float64)), z0, 2, 0.1, **path)


@pytest.mark.parametrize("path", [dict(), dict(backend="reference"), dict(create_graph=True), dict(method="mala"),
                                  dict(prior=lambda z: -z.pow(2).sum(1))])
def test_any_module_of_another_dtype_names_the_energy(path):
    """A plain nn.Sequential of float32 layers with a float64 z0 crashed inside F.linear with a RuntimeError; the
    same rule as for fastlangevin's energies now names the energy, its parameter and the fix (torch's message
    kept), and the module's parameters and .grad are left alone."""
    net = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    net[0].weight.grad = torch.ones_like(net[0].weight)
    before = copy.deepcopy(net.state_dict())
    z0 = torch.randn(5, 3, dtype=torch.float64)
    with pytest.raises(TypeError, match=r"energy: parameter 0\.weight is torch\.float32 but z is torch\.float64"):
        fl.langevin(net, z0, 2, 0.1, **path)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert torch.equal(net[0].weight.grad, torch.ones_like(net[0].weight)) and net[2].weight.grad is None


@pytest.mark.parametrize("name, value", [
    ("n_steps", True), ("step_size", True), ("noise_scale", False), ("clip_grad", True), ("seed", True),
    ("create_graph", "yes"), ("return_info", 1), ("cuda_graph", "yes"), ("method", None), ("backend", None),
    ("n_steps", 2.0), ("seed", np.float64(1.0)), ("step_size", torch.tensor(0.1)), ("clip_grad", np.bool_(True)),
])
def test_bools_and_wrong_types_are_rejected_for_every_setting(name, value):
    """clip_grad=True used to run as clip_grad=1.0; a flag that is merely truthy is not a bool."""
    args = dict(n_steps=2, step_size=0.1)
    args[name] = value
    with pytest.raises(TypeError, match=name):
        fl.langevin(lambda z: z.pow(2).sum(1), torch.zeros(2, 3), **args)


@pytest.mark.parametrize("energy_kind", ["mlp", "function"])
def test_numpy_scalars_are_accepted(energy_kind):
    energy = fl.MLPEnergy((3, 4, 1)) if energy_kind == "mlp" else (lambda z: z.pow(2).sum(1))
    z0 = torch.randn(5, 3)
    expected = fl.langevin(energy, z0, 3, 0.125, noise_scale=0.25, clip_grad=2.0, seed=7)
    got = fl.langevin(energy, z0, np.int64(3), np.float32(0.125), noise_scale=np.float64(0.25),
                      clip_grad=np.float32(2.0), seed=np.uint32(7), return_info=np.bool_(False))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    assert fl.LangevinSampler(energy, np.int8(3), np.float64(0.125), noise_scale=0.25, clip_grad=2.0)(
        z0, seed=np.int64(7)).equal(expected)
    rng = fl.ops.make_rng_state(np.int64(7), np.int16(2))
    assert rng.tolist() == [7, 2]


@pytest.mark.parametrize("kwargs, match", [
    (dict(clip_grad=-1), "clip_grad"), (dict(clip_grad=True), "clip_grad"), (dict(backend="gpu"), "backend"),
    (dict(method="hmc"), "method"), (dict(noise_scale=float("nan")), "noise_scale"), (dict(n_steps=-1), "n_steps"),
    (dict(step_size=0), "step_size"), (dict(method="mala", noise_scale=0.5), "noise_scale"),
    (dict(prior="bogus"), "prior"), (dict(prior=(True, 0.0)), "prior"), (dict(cuda_graph="yes"), "cuda_graph"),
    (dict(energy=3), "energy"),
])
def test_sampler_settings_fail_at_construction(kwargs, match):
    args = dict(energy=lambda z: z.sum(1), n_steps=3, step_size=0.1)
    args.update(kwargs)
    with pytest.raises((TypeError, ValueError), match=match):
        fl.LangevinSampler(**args)


def test_sampler_sample_checks_its_arguments():
    sampler = fl.LangevinSampler(lambda z: z.pow(2).flatten(1).sum(1), 2, 0.1)
    assert sampler.sample(np.int64(3), np.int64(4), seed=np.int64(1)).shape == (3, 4)
    faults = [(dict(n=0), ValueError, "n must"), (dict(n=True), TypeError, "n must"),
              (dict(latent_shape=(2, 0)), ValueError, "latent_shape"),
              (dict(latent_shape=2.5), TypeError, "latent_shape"),
              (dict(dtype=torch.int32), TypeError, "dtype"), (dict(device="meta"), ValueError, "device"),
              (dict(seed=-3), ValueError, "seed"), (dict(device="gpu"), ValueError, "device")]
    if not torch.cuda.is_available():
        faults.append((dict(device="cuda"), ValueError, "device"))
    for kwargs, error, match in faults:
        args = dict(n=2, latent_shape=(3,))
        args.update(kwargs)
        with pytest.raises(error, match=match):
            sampler.sample(**args)
    with pytest.raises(ValueError, match="prior FlatPrior cannot be sampled"):
        fl.LangevinSampler(lambda z: z.sum(1), 2, 0.1, prior=None).sample(2, 3)


@pytest.mark.parametrize("rng_state, match", [
    (torch.tensor([-1, 0]), r"\[0, 2\*\*63 - 1\]"), (torch.tensor([3, -2]), r"\[0, 2\*\*63 - 1\]"),
    (torch.tensor([1, 9, 2, 9])[::2], "contiguous"), (torch.tensor([1, 2], dtype=torch.int32), "int64"),
    (torch.tensor([1, 2, 3]), r"shape \(2,\)"), ([1, 2], "int64 tensor"),
])
def test_rng_state_is_checked(rng_state, match):
    z = torch.zeros(2, 3)
    with pytest.raises((TypeError, ValueError), match=match):
        fl.ops.langevin_step(z, z, 0.1, rng_state=rng_state)


@pytest.mark.parametrize("args, error, match", [
    ((-1, torch.tensor([1, 0])), ValueError, "n must"), ((True, torch.tensor([1, 0])), TypeError, "n must"),
    ((4, torch.tensor([1.0, 0.0])), TypeError, "rng_state"), ((4, [1, 0]), TypeError, "rng_state"),
    ((4, torch.tensor([1, 0, 2])), TypeError, "rng_state"), ((4, torch.tensor([1, 0]), torch.int32), TypeError, "dtype"),
])
def test_normal_noise_checks_its_arguments(args, error, match):
    """fl.ops.normal_noise returned an empty tensor for n=-1, one value for n=True, integers for dtype=int32 and
    noise of a truncated float state."""
    with pytest.raises(error, match=match):
        fl.ops.normal_noise(*args)
    assert fl.ops.normal_noise(np.int64(5), torch.tensor([1, 0])).equal(fl.ops.normal_noise(5, torch.tensor([1, 0])))


def test_a_prior_log_prob_of_the_wrong_shape_is_named_not_broadcast():
    """log_prob returning (B, 1) used to broadcast against the energies into (B, B): a silently wrong drift."""
    energy, _ = mlp_energy()
    z0 = torch.randn(5, 6, dtype=torch.float64)
    column = fl.langevin(energy, z0, 3, 0.1, seed=2, prior=lambda z: -0.5 * z.pow(2).sum(1, keepdim=True))
    torch.testing.assert_close(column, fl.langevin(energy, z0, 3, 0.1, seed=2), rtol=1e-12, atol=1e-12)
    for log_prob, error in [(lambda z: -z.pow(2), ValueError), (lambda z: -z.pow(2).sum(), ValueError),
                            (lambda z: 0.0, TypeError), (lambda z: -z.pow(2).sum(1).float(), TypeError)]:
        with pytest.raises(error, match="prior: log_prob"):
            fl.langevin(energy, z0, 2, 0.1, prior=log_prob)
    with pytest.raises(TypeError, match="prior: CallablePrior needs a log_prob callable"):
        fl.CallablePrior(3)
    with pytest.raises(ValueError, match="prior: DiagonalNormalPrior mean"):
        fl.langevin(energy, z0, 2, 0.1, prior=(torch.zeros(7), torch.zeros(7)))


def test_energy_constructors_check_their_arguments():
    for args, error in [(((3, 2.7, 1),), TypeError), (((3, True, 1),), TypeError), (((3, 4, 2),), ValueError),
                        ((3,), TypeError), (((3, 1), "swish", float("nan")), ValueError), (((3, 1), 3), TypeError),
                        (((3, 5, 1), ("elu", "x")), TypeError), (((3, 1), "relu", None, True, True), ValueError)]:
        with pytest.raises(error):  # the activation is checked even where no hidden layer uses it
            fl.MLPEnergy(*args)
    means = torch.zeros(2, 2)
    for args, error in [(([[0.0, 1.0]], 1.0), TypeError), ((means, True), TypeError),
                        ((means, float("inf")), ValueError),
                        ((means, 1.0, torch.tensor([1.0, -1.0])), ValueError),
                        ((means, 1.0, torch.ones(3)), ValueError), ((torch.full((2, 2), math.nan), 1.0), ValueError),
                        ((torch.zeros(0, 2), 1.0), ValueError)]:
        with pytest.raises(error):
            fl.GaussianMixtureEnergy(*args)
    generator = fl.MLP((2, 3))
    for args, kwargs, error, match in [((fl.MLPEnergy((2, 1)), generator, True), {}, TypeError, "sigma"),
                                       ((fl.MLPEnergy((2, 1)), generator, np.float32(0.0)), {}, ValueError, "sigma"),
                                       ((3, generator, 1.0), {}, TypeError, "energy"),
                                       ((fl.MLPEnergy((2, 1)), None, 1.0), {}, TypeError, "generator"),
                                       ((fl.MLPEnergy((2, 1)), generator, 1.0), dict(generator_inputs=True), TypeError,
                                        "generator_inputs")]:
        with pytest.raises(error, match=match):
            fl.GaussianPosteriorEnergy(*args, **kwargs)
    posterior = fl.GaussianPosteriorEnergy(fl.MLPEnergy((2, 1)), generator, np.float64(0.5),
                                           generator_inputs=np.int64(2))
    assert posterior.sigma == 0.5 and posterior.generator_inputs == 2
    for x, error in [([[1.0, 2.0, 3.0]], TypeError), (torch.ones(2, 3, dtype=torch.int64), TypeError),
                     (torch.full((2, 3), math.inf), ValueError), (torch.ones(0, 3), ValueError)]:
        with pytest.raises(error, match="x "):
            posterior.set_target(x)
    mixture = fl.GaussianMixtureEnergy(torch.zeros(2, 2), 1.0)
    for z in (torch.zeros(3, 5), torch.zeros(3, 1, 2)):  # used to broadcast into torch's error about tensor sizes
        with pytest.raises(ValueError, match=r"energy: GaussianMixtureEnergy expects z of shape \(B, 2\)"):
            fl.langevin(mixture, z, 2, 0.1)
    with pytest.raises(ValueError, match="holds no nn.Linear"):
        fl.MLPEnergy.from_sequential(nn.Sequential())
    with pytest.raises(TypeError, match="nn.Sequential"):
        fl.MLPEnergy.from_sequential([nn.Linear(2, 1)])
