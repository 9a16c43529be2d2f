"""The trainers' chains on the fused kernel (issue 12 item 4): the tilt's E(G(z)) and LEBM's posterior are what
``backend="auto"`` runs fused for MLP backbones, equal to the autograd chain in float64 with the same noise; the
composition shares the networks' parameters (an optimiser step is seen, the frozen decoder stays frozen); where
fusion is impossible the reason is in ``info.fallback``, ``fl.backend_info()`` and the run's log. (LEBM's runs:
tests/test_lebm.py.)"""

import json

import pytest
import torch

import fastlangevin as fl
from fastlangevin.models import GLF, VAE, Glow
from fastlangevin.models.lebm import LatentEBM, PosteriorEnergy
from fastlangevin.trainers import commands, train_tilt
from fastlangevin.trainers.energy_nets import ConvEnergy, make_energy
from fastlangevin.trainers.tilt import TiltedEnergy


def chains_agree(energy, z0, **kwargs):
    """The auto chain (asserted fused) and the reference chain from z0, the same seed: equal in float64."""
    fused, info = fl.langevin(energy, z0, 7, 0.01, seed=11, return_info=True, **kwargs)
    eager, ref_info = fl.langevin(energy, z0, 7, 0.01, seed=11, return_info=True, backend="reference", **kwargs)
    assert info.backend == "cpu:fused" and info.fallback is None and ref_info.backend == "reference"
    torch.testing.assert_close(info.energies, ref_info.energies, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(fused, eager, rtol=1e-10, atol=1e-10)
    return fused


@pytest.mark.parametrize("reconstruction", ["mse", "bce"])  # bce: a sigmoid after the decoder
def test_the_tilted_energy_of_mlps_is_one_fused_chain(reconstruction):
    torch.manual_seed(0)
    base = VAE((2,), 3, reconstruction=reconstruction, width=7, n_hidden_layers=2).double().eval()
    base.requires_grad_(False)
    energy = make_energy((2,), 5, 2).double()
    tilted = TiltedEnergy(energy, base)
    assert tilted.fused_energy() is tilted.fused_energy()  # built once
    z0 = torch.randn(13, 3, dtype=torch.float64)
    before = chains_agree(tilted, z0, prior="normal")
    chains_agree(tilted, z0, prior="normal", clip_grad=0.5)
    optimizer = torch.optim.Adam(energy.parameters(), lr=0.1)
    energy(torch.randn(8, 2, dtype=torch.float64)).mean().backward()
    optimizer.step()
    after = chains_agree(tilted, z0, prior="normal")  # the step is seen by the next chain
    assert not torch.allclose(before, after)
    assert all(not p.requires_grad and p.grad is None for p in base.parameters())  # the decoder stays frozen


def test_the_lebm_posterior_is_one_fused_chain():
    torch.manual_seed(0)
    net = LatentEBM((1, 3, 3), 3, energy_width=6, generator_width=5).double()
    posterior = PosteriorEnergy(net)
    z0 = torch.randn(11, 3, dtype=torch.float64)
    first = chains_agree(posterior.refresh(torch.rand(11, 1, 3, 3, dtype=torch.float64)), z0, prior=net.prior)
    buffer = posterior.target_for(11)
    second = chains_agree(posterior.refresh(torch.rand(11, 1, 3, 3, dtype=torch.float64)), z0, prior=net.prior)
    assert posterior.target_for(11) is buffer and not torch.allclose(first, second)  # the batch, in place


@pytest.mark.parametrize("make", [
    lambda: TiltedEnergy(ConvEnergy((1, 8, 8), 4, 1), VAE((1, 8, 8), 4, width=4)),
    lambda: TiltedEnergy(make_energy((2,), 4, 1), Glow((2,), hidden=4)),
    lambda: TiltedEnergy(make_energy((2,), 4, 1), GLF((2,), 2, width=4, flow_hidden=4)),
    lambda: TiltedEnergy(torch.nn.Sequential(torch.nn.Linear(2, 1), torch.nn.Flatten(0)), VAE((2,), 2, width=4)),
], ids=["conv", "glow", "glf", "not-an-MLPEnergy"])
def test_where_fusion_is_impossible_the_reason_is_told(make):
    tilted = make()
    tilted.base.eval()
    why = tilted.fused_energy()
    assert isinstance(why, str) and why
    _, info = fl.langevin(tilted, torch.randn(4, tilted.base.latent_dim), 2, 0.01, seed=0, return_info=True)
    assert info.backend == "cpu" and info.fallback == why
    assert any(why in line for line in fl.backend_info().fallbacks)


def test_a_tilt_run_reports_its_fused_chain(tmp_path, capsys):
    run = tmp_path / "run"
    commands.main(["train-base", "vae", "--out", str(run), "--data", "25gaussians", "--n-train", "256",
                   "--batch-size", "64", "--width", "16", "--steps", "5"])
    metrics = train_tilt(run, steps=2, batch_size=16, n_steps=3, sample_steps=3, eval_every=2, n_eval=50,
                         energy_width=8, energy_depth=1, progress=False)
    assert metrics["chain_backends"] == {"negative": "cpu:fused"}
    assert capsys.readouterr().out.count("tilt: the negative chain runs on cpu:fused") == 1
    assert json.loads((run / "metrics.json").read_text())["tilt_training"]["chain_backends"] == \
        {"negative": "cpu:fused"}


def test_denoise_steps_descend_the_tilted_energy():
    """sample_tilted's noise-free steps are gradient descent on U(z) = E(G(z)) + ‖z‖²/2: U falls at every sample
    (ε small), and with none the samples are the chain's own."""
    from fastlangevin.trainers.chains import run_chain
    from fastlangevin.trainers.tilt import sample_tilted
    torch.manual_seed(0)
    base = VAE((2,), 2, width=8, n_hidden_layers=2).double().eval().requires_grad_(False)
    tilted = TiltedEnergy(make_energy((2,), 8, 2).double(), base)
    z0 = torch.randn(64, 2, dtype=torch.float64)
    z = run_chain(tilted, z0, 5, 1e-3, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(sample_tilted(tilted, z0, 5, 1e-3, seed=3), base.generate(z))
    z_d = run_chain(tilted, z, 10, 1e-3, noise_scale=0.0)
    with torch.no_grad():
        u = lambda v: tilted(v) + 0.5 * v.pow(2).sum(1)  # noqa: E731
        assert (u(z_d) < u(z)).all()
        torch.testing.assert_close(sample_tilted(tilted, z0, 5, 1e-3, seed=3, denoise_steps=10), base.generate(z_d))
