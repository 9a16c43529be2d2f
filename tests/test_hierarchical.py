"""The hierarchical VAE and its joint EBM prior in ε-space (models/hierarchical.py) and ``train-prior gaussian|joint``
(trainers/hierarchical.py): T_β inverts to float64 rounding and its log-determinant equals the autograd Jacobian's,
the ε-space energy and its Langevin drift match plain autograd, the two ε-space targets differ by exactly the
log-determinant, the KL terms match torch.distributions, with f ≡ 0 the chain keeps N(0, I), re-sampling keeps the
fixed groups bit for bit, the commands write their run directories and resume, and bad input is named."""

import json
import math

import pytest
import torch
from torch.autograd.functional import jacobian

import fastlangevin as fl
from fastlangevin.models.hierarchical import EpsilonEnergy, Gaussian, HierarchicalVAE, JointEBMPrior, \
    channels_for_params
from fastlangevin.trainers import commands, load_checkpoint
from fastlangevin.trainers.hierarchical import generate, resample_lower, sample_epsilon
from fastlangevin.trainers.hierarchical_ebm import load_run, train_hierarchical
from tests.nets import one_thread, perturbed  # noqa: F401 (one_thread: an autouse fixture)

TINY = dict(data_shape=(1, 8, 8), latent_channels=(2, 2, 1), channels=8, n_cells=1)
TOL = dict(rtol=1e-10, atol=1e-10)


@pytest.fixture(scope="module")
def tiny():
    vae = perturbed(HierarchicalVAE(**TINY))
    ebm = perturbed(JointEBMPrior(vae.group_dims, nef=8), seed=1)
    return vae, ebm


def test_group_layout(tiny):
    vae, _ = tiny
    assert vae.group_shapes == [(2, 1, 1), (2, 2, 2), (1, 4, 4)] and vae.latent_dim == 2 + 8 + 16
    eps = torch.randn(3, vae.latent_dim, dtype=torch.float64)
    assert torch.equal(vae.flatten(vae.split(eps)), eps)
    assert vae.generate(eps).shape == (3, 1, 8, 8)


def test_transform_inverts_and_its_log_det_is_the_jacobian(tiny):
    vae, _ = tiny
    eps = torch.randn(4, vae.latent_dim, dtype=torch.float64)
    z, log_det = vae.transform(eps)
    back, log_det_inverse = vae.inverse(z)
    torch.testing.assert_close(vae.flatten(back), eps, **TOL)
    torch.testing.assert_close(log_det_inverse, log_det, **TOL)
    for i in range(eps.shape[0]):
        jac = jacobian(lambda e: vae.flatten(vae.transform(e.unsqueeze(0))[0])[0], eps[i])
        sign, expected = torch.linalg.slogdet(jac)
        assert sign > 0
        torch.testing.assert_close(log_det[i], expected, **TOL)
        assert torch.allclose(jac, jac.tril())  # z_i depends on ε_≤i only: a triangular Jacobian


def test_prior_log_prob_is_the_change_of_variables(tiny):
    """log p_β(T(ε)) = log N(ε; 0, I) − log|det ∂T/∂ε| (supplement eq. 9), also at a temperature."""
    vae, _ = tiny
    eps = torch.randn(5, vae.latent_dim, dtype=torch.float64)
    for t in (1.0, 0.7):
        z, log_det = vae.transform(eps, temperature=t)
        log_normal = torch.distributions.Normal(0.0, 1.0).log_prob(eps).sum(1)
        torch.testing.assert_close(vae.prior_log_prob(z, temperature=t), log_normal - log_det, **TOL)


def test_top_group_matches_the_reference_code(tiny):
    """σ_0 = (exp(0) + 0.01)·t (reference-code §2b): z_0 = 1.01·t·ε_0 whatever the network."""
    vae, _ = tiny
    eps = torch.randn(3, vae.latent_dim, dtype=torch.float64)
    z, _ = vae.transform(eps, temperature=0.5)
    torch.testing.assert_close(z[0].flatten(1), 1.01 * 0.5 * eps[:, :2], **TOL)


def test_gaussian_clamps():
    raw = torch.tensor([[[[40.0]], [[-40.0]]]], dtype=torch.float64)
    g = Gaussian.from_raw(raw, temperature=2.0)
    torch.testing.assert_close(g.mu, 5 * torch.tanh(torch.tensor(8.0, dtype=torch.float64)).reshape(1, 1, 1, 1))
    torch.testing.assert_close(g.sigma, 2 * (torch.exp(5 * torch.tanh(torch.tensor(-8.0, dtype=torch.float64)))
                                             + 0.01).reshape(1, 1, 1, 1))


def test_kl_terms_match_torch_distributions(tiny):
    vae, _ = tiny
    torch.manual_seed(3)
    q = Gaussian(torch.randn(4, 2, 2, 2, dtype=torch.float64), torch.rand(4, 2, 2, 2, dtype=torch.float64) + 0.1)
    p = Gaussian(torch.randn(4, 2, 2, 2, dtype=torch.float64), torch.rand(4, 2, 2, 2, dtype=torch.float64) + 0.1)
    expected = torch.distributions.kl_divergence(torch.distributions.Normal(*q), torch.distributions.Normal(*p))
    torch.testing.assert_close(q.kl(p), expected.flatten(1).sum(1), **TOL)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    torch.manual_seed(0)
    terms = vae.loss_terms(x)
    torch.manual_seed(0)
    post = vae.posterior(x)
    assert len(post.kl) == 3 and all(k.shape == (4,) and (k >= 0).all() for k in post.kl)
    torch.testing.assert_close(terms["kl_groups"], torch.stack([k.mean() for k in post.kl]), **TOL)
    log_lik = torch.distributions.Normal(torch.sigmoid(post.logits), 0.15).log_prob(x).flatten(1).sum(1)
    torch.testing.assert_close(terms["loss"], -log_lik.mean() + terms["kl"], **TOL)
    bernoulli = perturbed(HierarchicalVAE(**TINY, decoder="bernoulli"))
    expected = -torch.nn.functional.binary_cross_entropy_with_logits(post.logits, x, reduction="none").sum((1, 2, 3))
    torch.testing.assert_close(bernoulli.log_likelihood(x, post.logits), expected, **TOL)


def test_epsilon_energy_and_its_drift_match_plain_autograd(tiny):
    """E(ε) = −Σ_i f_i(T(ε)_i); one noiseless step of fl.langevin is ε − h/2·∇(E(ε) + ½‖ε‖²)."""
    vae, ebm = tiny
    eps = torch.randn(6, vae.latent_dim, dtype=torch.float64, requires_grad=True)
    energy = EpsilonEnergy(vae, ebm)
    z, _ = vae.transform(eps)
    nets = [lambda v, layer=e: layer.layers[-1](torch.nn.functional.leaky_relu(layer.layers[-2](
        torch.nn.functional.leaky_relu(layer.layers[0](v.flatten(1)), 0.2)), 0.2)).squeeze(1) for e in ebm.energies]
    expected = -sum(net(zi) for net, zi in zip(nets, z))  # f_i = the raw network output (high = likely)
    torch.testing.assert_close(energy(eps), expected, **TOL)
    grad = torch.autograd.grad((expected + 0.5 * eps.pow(2).sum(1)).sum(), eps)[0]
    h = 0.03
    stepped = fl.langevin(energy, eps.detach(), 1, h, noise_scale=0.0, prior="normal", seed=0)
    torch.testing.assert_close(stepped, eps.detach() - 0.5 * h * grad, **TOL)


def test_code_variant_differs_by_the_log_det(tiny):
    """The reference code's target exp f(T(ε))·p_β(T(ε)): its energy (with the sampler's N(0, I)) is
    −f − log p_β(T(ε)) + log N(ε), i.e. the paper's energy plus log|det ∂T/∂ε|."""
    vae, ebm = tiny
    eps = torch.randn(5, vae.latent_dim, dtype=torch.float64)
    paper, code = EpsilonEnergy(vae, ebm, "paper")(eps), EpsilonEnergy(vae, ebm, "code")(eps)
    z, log_det = vae.transform(eps)
    torch.testing.assert_close(code - paper, log_det, **TOL)
    log_normal = torch.distributions.Normal(0.0, 1.0).log_prob(eps).sum(1)
    torch.testing.assert_close(code, -ebm(z) - vae.prior_log_prob(z) + log_normal, **TOL)


def test_chain_with_zero_ebm_keeps_the_standard_normal():
    """f ≡ 0: the ε-space chain is ULA on N(0, I), whose stationary variance is 1/(1 − h/4); from ε_0 ~ N(0, I)
    the moments after 30 steps stay within 5 standard errors of it."""
    vae = HierarchicalVAE(**TINY).requires_grad_(False)
    ebm = JointEBMPrior(vae.group_dims, nef=4)
    with torch.no_grad():
        for e in ebm.energies:
            e.layers[-1].weight.zero_()
            e.layers[-1].bias.zero_()
    h, n = 0.1, 4000
    eps0 = torch.randn(n, vae.latent_dim, generator=torch.Generator().manual_seed(0))
    eps = sample_epsilon(EpsilonEnergy(vae, ebm), eps0, 30, h, seed=5).double()
    variance = 1 / (1 - h / 4)
    mean_se = math.sqrt(variance / n)
    assert eps.mean(0).abs().max() < 5 * mean_se  # per coordinate
    var_se = variance * math.sqrt(2 / n)
    assert (eps.var(0) - variance).abs().max() < 5 * var_se


def test_resampling_keeps_the_fixed_groups_bit_identical(tiny):
    vae, ebm = tiny
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    top = vae.posterior(x, mean=True).z
    for energy in (None, EpsilonEnergy(vae, ebm)):
        for keep in (1, 2):
            z, images = resample_lower(vae, energy, x, keep, 3, 0.05, seed=keep)
            assert images.shape == (3, 1, 8, 8)
            for i in range(keep):
                assert torch.equal(z[i], top[i])
            assert not torch.equal(z[keep], top[keep])
    z0, _ = resample_lower(vae, None, x, 0, 3, 0.05)  # keep 0: a plain prior sample
    assert len(z0) == 3


def test_param_factor_configs_hit_their_targets():
    config = dict(data_shape=(1, 8, 8), latent_channels=(8, 4, 2), channels=16, n_cells=1)
    base = HierarchicalVAE(**config).param_count()
    for factor in (2, 4):
        width = channels_for_params(factor, **config)
        ratio = HierarchicalVAE(**{**config, "channels": width}).param_count() / base
        assert abs(ratio / factor - 1) < 0.15, (factor, width, ratio)


@pytest.mark.parametrize("side", [28, 7])
def test_a_side_not_a_power_of_two_is_padded_in_and_cropped_out(side):
    """MNIST's 28 × 28 runs as NVAE runs it, zero-padded to 32: the same weights on a power-of-two side given the
    padded image encode identically, and the S × S model's logits are the crop of that model's."""
    torch.manual_seed(0)
    vae = HierarchicalVAE(data_shape=(1, side, side), latent_channels=(4, 2), channels=4).double()
    full_side = side + vae.pad_before + vae.pad_after
    assert full_side == 1 << (side - 1).bit_length() and full_side > side
    full = HierarchicalVAE(data_shape=(1, full_side, full_side), latent_channels=(4, 2), channels=4).double()
    full.load_state_dict(vae.state_dict())
    x = torch.rand(3, 1, side, side, dtype=torch.float64)
    padded = torch.nn.functional.pad(x, (vae.pad_before, vae.pad_after) * 2)
    for a, b in zip(vae._features(x), full._features(padded)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    eps = torch.randn(3, vae.latent_dim, dtype=torch.float64)
    crop = slice(vae.pad_before, vae.pad_before + side)
    # sigmoid of a cropped view vs of the whole may round differently in the last bit (vectorised tails)
    torch.testing.assert_close(vae.generate(eps), full.generate(eps)[..., crop, crop], rtol=1e-13, atol=1e-15)
    assert vae.posterior(x).logits.shape == (3, 1, side, side) and torch.isfinite(vae.loss_terms(x)["loss"])


def test_bad_input_is_named(tiny):
    vae, ebm = tiny
    with pytest.raises(ValueError, match="decoder"):
        HierarchicalVAE(decoder="logistic")
    with pytest.raises(ValueError, match="square images"):
        HierarchicalVAE(data_shape=(1, 7, 8))
    with pytest.raises(ValueError, match="latent_channels"):
        HierarchicalVAE(data_shape=(1, 8, 8), latent_channels=(2, 2, 2, 2, 2))
    with pytest.raises(ValueError, match=r"\(B, 26\)"):
        vae.transform(torch.zeros(2, 25, dtype=torch.float64))
    with pytest.raises(ValueError, match="x must have shape"):
        vae.posterior(torch.zeros(2, 1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="variant"):
        EpsilonEnergy(vae, ebm, "exact")
    with pytest.raises(ValueError, match="keep"):
        resample_lower(vae, EpsilonEnergy(vae, ebm), torch.rand(1, 1, 8, 8, dtype=torch.float64), 3, 1, 0.1)
    with pytest.raises(ValueError, match="expected 3 latent groups"):
        ebm([torch.zeros(1, 2, 1, 1)])
    with pytest.raises(ValueError, match="train-prior gaussian: prior_steps is not a setting"):
        train_hierarchical("gaussian", "digits", "unused", prior_steps=3)
    with pytest.raises(ValueError, match="scheme"):
        train_hierarchical("joint", "digits", "unused", scheme="both")


TINY_CLI = ["--data", "digits", "--batch-size", "16", "--channels", "8", "--latent-channels", "2", "2", "1",
            "--checkpoint-every", "2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    pytest.importorskip("matplotlib")
    root = tmp_path_factory.mktemp("hierarchical")
    commands.main(["train-prior", "gaussian", "--out", str(root / "g"), "--steps", "4", *TINY_CLI])
    commands.main(["train-prior", "joint", "--out", str(root / "j"), "--data", "digits", "--init-from",
                   str(root / "g"), "--steps", "3", "--batch-size", "16", "--prior-steps", "3", "--energy-width", "8",
                   "--checkpoint-every", "2"])
    return root


def test_gaussian_run_directory(runs):
    g = runs / "g"
    for name in ("config.json", "vae.safetensors", "metrics.json", "samples.png", "hierarchical_resampling.png"):
        assert (g / name).exists(), name
    metrics = json.loads((g / "metrics.json").read_text())["vae_training"]
    assert metrics["steps"] == 4 and metrics["sample_quality"]["n_samples"] == 360
    assert load_checkpoint(g / "vae.safetensors")["step"] == 4


def test_decoder_option_reaches_the_model_and_the_saved_config(tmp_path):
    out = tmp_path / "bernoulli"
    commands.main(["train-prior", "gaussian", "--out", str(out), "--steps", "2", "--decoder", "bernoulli",
                   "--no-progress", *TINY_CLI])
    config = json.loads((out / "config.json").read_text())["vae"]
    assert config["decoder"] == "bernoulli" and config["model_config"]["decoder"] == "bernoulli"
    vae, _, _ = load_run(out)
    assert vae.decoder == "bernoulli"
    with pytest.raises(SystemExit) as refused:
        commands.main(["train-prior", "gaussian", "--out", str(tmp_path / "bad"), "--decoder", "laplace", *TINY_CLI])
    assert refused.value.code == 2 and not (tmp_path / "bad").exists()


def test_joint_run_directory_and_resume(runs, tmp_path):
    j = runs / "j"
    for name in ("config.json", "vae.safetensors", "ebm.safetensors", "metrics.json", "samples.png",
                 "hierarchical_resampling.png", "langevin_transition.png"):
        assert (j / name).exists(), name
    config = json.loads((j / "config.json").read_text())
    assert config["vae"]["init_from"] == str(runs / "g") and config["ebm"]["scheme"] == "two-stage"
    metrics = json.loads((j / "metrics.json").read_text())["ebm_training"]
    assert 0 < metrics["chain_seconds"] <= metrics["seconds"] and metrics["sampler"] == "library"
    assert [h["step"] for h in metrics["history"]] == [3]
    vae, ebm, _ = load_run(j)
    assert ebm is not None and not any(p.requires_grad for p in ebm.parameters())
    assert generate(vae, EpsilonEnergy(vae, ebm), 5, 2, 0.05).shape == (5, 1, 8, 8)
    # resume: continue to 5 steps from the step-3 checkpoint; the frozen VAE is untouched
    vae_before = load_checkpoint(j / "vae.safetensors")
    commands.main(["train-prior", "joint", "--out", str(j), "--data", "digits", "--steps", "5", "--resume"])
    assert load_checkpoint(j / "ebm.safetensors")["step"] == 5
    metrics = json.loads((j / "metrics.json").read_text())["ebm_training"]
    assert [h["step"] for h in metrics["history"]] == [3, 5]
    assert load_checkpoint(j / "vae.safetensors") == vae_before


def test_joint_scheme_trains_the_vae_too(tmp_path):
    """scheme="joint" from scratch (VAE stage, then the ELBO with the EBM prior), with the eager sampler."""
    out = tmp_path / "joint"
    commands.main(["train-prior", "joint", "--out", str(out), "--vae-steps", "2", "--steps", "2", "--scheme", "joint",
                   "--prior-steps", "2", "--energy-width", "8", "--sampler", "eager", "--variant", "code", *TINY_CLI])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["vae_training"]["steps"] == 2 and metrics["ebm_training"]["sampler"] == "eager"
    history = metrics["ebm_training"]["history"][-1]
    assert {"reconstruction", "kl", "energy_gap"} <= set(history)
    from safetensors.torch import load_file
    before, after = load_file(out / "vae.safetensors"), load_file(out / "ebm.safetensors")
    assert not torch.equal(before["model.h0"], after["model.vae.h0"])  # the VAE moved with the EBMs
