"""Latent-space EBM priors (LEBM, its variational variant, the 2-layer joint model) and ``train-prior``: the chains'
targets against autograd and torch.distributions in float64, the losses against hand-written formulas, the fused
prior chain, a statistical check of the prior chain, the command's run directory and --resume, bad input."""

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from torch.distributions import Normal, kl_divergence

import fastlangevin as fl
import fastlangevin.sampler
from fastlangevin.models.lebm import JointLatentEBM, LatentEBM, VariationalLatentEBM, make_prior_model
from fastlangevin.priors import stationary_variance
from fastlangevin.trainers import commands, load_checkpoint
from fastlangevin.trainers.chains import Chains
from fastlangevin.trainers.lebm import train_lebm

SHAPE = (1, 3, 3)
TINY = ["--data", "digits", "--steps", "4", "--batch-size", "16", "--prior-steps", "5", "--eval-every", "2",
        "--n-eval", "40", "--latent-dim", "2", "--energy-width", "8", "--generator-width", "16",
        "--checkpoint-every", "2"]
MODEL_FLAGS = {"lebm": ["--posterior-steps", "3"], "lebm-vi": [],
               "joint-mle": ["--posterior-steps", "3", "--latent-dim2", "2", "--classes", "0", "1", "--latent-plot"]}


def small(cls, **kw):
    torch.manual_seed(0)
    return cls(SHAPE, 3, energy_width=6, generator_width=5, **kw).double()


def deterministic_step(energy, prior, z0, h):
    """One chain step without noise: z0 − h/2·∇(E − log prior)(z0), as the sampler computes it."""
    return fl.langevin(energy, z0, 1, h, prior=prior, noise_scale=0.0, seed=0)


def gradient(f, z):
    z = z.detach().requires_grad_(True)
    return torch.autograd.grad(f(z).sum(), z)[0]


def joint_prior_energy(net, u):
    """−log p_β(z₁, z₂) + E₁(z₁) + E₂(z₂), written with torch.distributions."""
    z1, z2 = u.split(net.layer_dims, dim=1)
    mean, std = net.conditional_normal(z2)
    log_p = Normal(mean, std).log_prob(z1).sum(1) + Normal(0.0, 1.0).log_prob(z2).sum(1)
    e1, e2 = net.energy.energies
    return e1(z1) + e2(z2) - log_p


def test_lebm_prior_and_posterior_chains_follow_the_analytic_gradients():
    net = small(LatentEBM)
    g = torch.Generator().manual_seed(1)
    z = torch.randn(4, 3, generator=g, dtype=torch.float64)
    x = torch.rand(4, *SHAPE, generator=g, dtype=torch.float64)
    h = 0.01
    # prior: ∇(E(z) + ‖z‖²/2)
    expected = z - h / 2 * (gradient(net.energy, z) + z)
    torch.testing.assert_close(deterministic_step(net.energy, net.prior, z, h), expected)
    # posterior: (G(z) − x)ᵀ J / σ² + ∇E + z, J the generator's Jacobian per sample
    jac = torch.stack([torch.autograd.functional.jacobian(lambda v: net.generate(v[None]).flatten(), zi) for zi in z])
    residual = (net.generate(z) - x).flatten(1).detach()
    analytic = torch.einsum("bd,bdk->bk", residual, jac) / net.llhd_sigma ** 2 + gradient(net.energy, z) + z
    torch.testing.assert_close(deterministic_step(net.posterior_energy(x), net.prior, z, h), z - h / 2 * analytic)


def test_joint_conditional_matches_torch_distributions():
    net = small(JointLatentEBM, latent_dim2=2)
    u = torch.randn(5, 5, dtype=torch.float64)
    z1, z2 = u.split((3, 2), dim=1)
    mean, std = net.conditional_normal(z2)
    assert bool((std > 0.01).all())
    reference = Normal(mean, std).log_prob(z1).sum(1)
    torch.testing.assert_close(net.conditional_log_prob(u), reference)
    # the chains' prior: log p(z₁|z₂) + log N(z₂; 0, I) up to log(2π)·dim(z₂)/2
    torch.testing.assert_close(net.prior(u), reference + Normal(0.0, 1.0).log_prob(z2).sum(1) + math.log(2 * math.pi))


def test_joint_chains_move_both_layers_with_the_conditional_drift():
    net = small(JointLatentEBM, latent_dim2=2)
    u = torch.randn(4, 5, dtype=torch.float64)
    x = torch.rand(4, *SHAPE, dtype=torch.float64)
    h = 0.16
    hand = gradient(lambda v: joint_prior_energy(net, v), u)
    assert hand[:, 3:].abs().min() > 0  # z₂ feels log p(z₁|z₂) too
    torch.testing.assert_close(deterministic_step(net.energy, net.prior, u, h), u - h / 2 * hand)
    post = gradient(lambda v: joint_prior_energy(net, v) + net.squared_error(x, v) / (2 * 0.15 ** 2), u)
    torch.testing.assert_close(deterministic_step(net.posterior_energy(x), net.prior, u, h), u - h / 2 * post)


def test_loss_terms_match_the_references_formulas():
    g = torch.Generator().manual_seed(2)
    x = torch.rand(6, *SHAPE, generator=g, dtype=torch.float64)
    z_pos, z_neg = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g,
                                                                                     dtype=torch.float64)
    net = small(LatentEBM)
    sse = (x - net.generate(z_pos)).pow(2).sum((1, 2, 3))
    assert torch.allclose(net.generator_loss(x, z_pos, z_neg)["loss"], sse.sum() / 6)  # LEBM: no 1/(2σ²)
    assert torch.allclose(net.energy_loss(z_pos, z_neg), net.energy(z_pos).mean() - net.energy(z_neg).mean())

    joint = small(JointLatentEBM, latent_dim2=2)
    u_pos, u_neg = torch.randn(6, 5, generator=g, dtype=torch.float64), torch.randn(6, 5, generator=g,
                                                                                     dtype=torch.float64)

    def log_p(u):
        mean, std = joint.conditional_normal(u[:, 3:])
        return Normal(mean, std).log_prob(u[:, :3]).sum(1)

    sse = (x - joint.generate(u_pos)).pow(2).sum((1, 2, 3))
    expected = sse.mean() / (2 * 0.15 ** 2) + log_p(u_neg).mean() - log_p(u_pos).mean()
    assert torch.allclose(joint.generator_loss(x, u_pos, u_neg)["loss"], expected)
    e1, e2 = joint.energy.energies
    energy_loss = (e1(u_pos[:, :3]).mean() - e1(u_neg[:, :3]).mean()) + (e2(u_pos[:, 3:]).mean()
                                                                         - e2(u_neg[:, 3:]).mean())
    assert torch.allclose(joint.energy_loss(u_pos, u_neg), energy_loss)

    vi = small(VariationalLatentEBM)
    terms, z_q = vi.variational_loss(x, torch.Generator().manual_seed(3))
    mean, log_var = vi.posterior(x)
    noise = torch.randn(mean.shape, generator=torch.Generator().manual_seed(3)).double()  # drawn on the CPU
    z = mean + (0.5 * log_var).exp() * noise
    torch.testing.assert_close(z_q, z.detach())
    kl = kl_divergence(Normal(mean, (0.5 * log_var).exp()), Normal(0.0, 1.0)).sum(1).mean()
    rec = (x - vi.generate(z)).pow(2).sum((1, 2, 3)).mean() / (2 * 0.15 ** 2)
    torch.testing.assert_close(terms["loss"], rec + kl + vi.energy(z).mean())


@pytest.mark.parametrize("sampler", ["library", "eager"])
def test_prior_chain_with_zero_energy_samples_the_gaussian(sampler):
    """E ≡ 0: the prior chain targets N(0, I); ULA with h = 0.16 settles at variance 1/(1 − h/4) (within 4 s.e.).
    The joint model with E ≡ 0 and p(z₁|z₂) = N(0, 1.01²) targets that for z₁."""
    torch.manual_seed(0)
    n, h = 2000, 0.16
    for net, variances in ((LatentEBM(SHAPE, 2, energy_width=4, generator_width=4), [1.0, 1.0]),
                           (JointLatentEBM(SHAPE, 1, 1, energy_width=4, generator_width=4), [1.01 ** 2, 1.0])):
        with torch.no_grad():
            for module in net.modules():
                if isinstance(module, torch.nn.Linear) and module.out_features in (1, 2):  # last layers → 0
                    module.weight.zero_(), module.bias.zero_()
        z = Chains(sampler)("prior", 0, net.energy, net.initial_latents(n, torch.Generator().manual_seed(4)), 60, h,
                            prior=net.prior, seed=5 * 1_000_003 * 8)
        target = torch.tensor([stationary_variance(1 / v, h) for v in variances])
        assert (z.mean(0).abs() < 4 * (target / n).sqrt()).all(), z.mean(0)
        assert ((z.var(0) - target).abs() < 4 * target * math.sqrt(2 / n)).all(), (z.var(0), target)


def test_lebm_runs_both_chains_fused_and_joint_mle_says_why_not(monkeypatch, tmp_path, capsys):
    """LEBM's prior chain (its MLPEnergy) and posterior chain (a GaussianPosteriorEnergy of the MLP generator) run
    fused, every iteration; the joint model's conditional Gaussian prior cannot be, and the run says so once."""
    net = LatentEBM(SHAPE, 4, energy_width=8, generator_width=8)
    _, info = fl.langevin(net.energy, torch.randn(8, 4), 5, 0.16, prior=net.prior, return_info=True)
    assert info.backend == "cpu:fused"
    calls = []
    original = fastlangevin.sampler.run_mlp_chain
    monkeypatch.setattr(fastlangevin.sampler, "run_mlp_chain", lambda *a, **k: calls.append(1) or original(*a, **k))
    tiny = dict(steps=3, batch_size=8, latent_dim=2, energy_width=8, generator_width=8, prior_steps=4,
                posterior_steps=2, eval_every=3, n_eval=20, progress=False)
    metrics = train_lebm("lebm", "digits", tmp_path / "lebm", **tiny)
    assert len(calls) >= 6  # both chains of every training iteration, then evaluation and plots
    assert metrics["chain_backends"] == {"posterior": "cpu:fused", "prior": "cpu:fused"}
    calls.clear()
    metrics = train_lebm("joint-mle", "digits", tmp_path / "joint", **{**tiny, "steps": 2, "eval_every": 2},
                         latent_dim2=2)
    assert not calls  # a conditional Gaussian prior: the step-op path
    for which in ("posterior", "prior"):
        assert metrics["chain_backends"][which].startswith("cpu (not fused: the prior")
        assert "JointLatentEBM.prior" in metrics["chain_backends"][which]
    out = capsys.readouterr().out
    assert out.count("train-prior lebm: the posterior chain runs on cpu:fused") == 1
    assert out.count("train-prior joint-mle: the prior chain runs on cpu (not fused: the prior") == 1
    assert any("JointLatentEBM.prior" in line for line in fl.backend_info().fallbacks)


@pytest.fixture(scope="module", params=list(MODEL_FLAGS))
def run(request, tmp_path_factory):
    """A train-prior run directory after 4 tiny steps, for each model."""
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp(request.param)
    commands.main(["train-prior", request.param, "--out", str(out), *TINY, *MODEL_FLAGS[request.param]])
    return request.param, out


def test_train_prior_writes_the_run_directory(run):
    model, out = run
    names = ["config.json", "prior_model.safetensors", "metrics.json", "samples.png", "reconstructions.png",
             "langevin_transition.png"] + (["latents.png"] if model == "joint-mle" else [])
    for name in names:
        assert (out / name).exists(), name
    for name in names[3:]:
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    config = json.loads((out / "config.json").read_text())["prior"]
    assert config["model"] == model and config["steps"] == 4
    assert config["posterior_steps"] == (3 if model != "lebm-vi" else None)  # lebm-vi has no posterior chain
    metrics = json.loads((out / "metrics.json").read_text())["prior_training"]
    assert [h["step"] for h in metrics["history"]] == [2, 4]
    assert 0 < metrics["chain_seconds"] <= metrics["train_seconds"] and 0 < metrics["chain_share"] <= 1
    for prior in ("ebm_prior", "gaussian_prior"):
        assert metrics["final"][prior]["n_samples"] == 40 and math.isfinite(metrics["final"][prior]["mmd2"])
    assert load_checkpoint(out / "prior_model.safetensors")["step"] == 4


def test_resume_continues_from_the_saved_step(run, tmp_path):
    model, out = run
    commands.main(["train-prior", model, "--data", "digits", "--out", str(out), "--steps", "6", "--resume"])
    metrics = json.loads((out / "metrics.json").read_text())["prior_training"]
    assert [h["step"] for h in metrics["history"]] == [2, 4, 6]
    assert load_checkpoint(out / "prior_model.safetensors")["step"] == 6
    # the resumed run is the uninterrupted one: same batches, chain seeds and noise
    straight = tmp_path / "straight"
    commands.main(["train-prior", model, "--out", str(straight), *TINY, *MODEL_FLAGS[model], "--steps", "6"])
    config = json.loads((out / "config.json").read_text())["prior"]
    a = make_prior_model(model, **config["model_config"])
    b = make_prior_model(model, **config["model_config"])
    load_checkpoint(out / "prior_model.safetensors", a)
    load_checkpoint(straight / "prior_model.safetensors", b)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, msg=name)


def test_non_finite_energy_names_the_chain_and_iteration():
    bad = lambda z: z.sum(1) * float("nan")  # noqa: E731
    with pytest.raises(fl.NonFiniteEnergyError, match="train-prior: the prior chain of training iteration 7"):
        Chains("library", "cpu", "train-prior")("prior", 7, bad, torch.zeros(3, 2), 2, 0.1, seed=0)
    with pytest.raises(fl.NonFiniteEnergyError, match="posterior chain of training iteration 3 ended"):
        Chains("eager")("posterior", 3, bad, torch.zeros(3, 2), 2, 0.1, seed=0)


@pytest.mark.parametrize("call, match", [
    (lambda: make_prior_model("nope", data_shape=SHAPE), "choose one of"),
    (lambda: LatentEBM((64,), 2), r"data_shape must be an image shape \(C, H, W\)"),
    (lambda: LatentEBM(SHAPE, 0), "latent_dim must be an int >= 1, got 0"),
    (lambda: LatentEBM(SHAPE, 2, llhd_sigma=-1.0), "llhd_sigma must be a finite float > 0, got -1.0"),
    (lambda: JointLatentEBM(SHAPE, 2, 0), "latent_dim2 must be an int >= 1, got 0"),
    (lambda: LatentEBM(SHAPE, 2).squared_error(torch.zeros(3, 1, 3, 3), torch.zeros(2, 2)),
     r"x must have shape \(2, 1, 3, 3\)"),
    (lambda: train_lebm("lebm", "digits", "/nonexistent/x", sampler="fast"), "sampler must be one of"),
    (lambda: train_lebm("lebm-vi", "digits", "/nonexistent/x", posterior_steps=3), "does not apply to lebm-vi"),
    (lambda: train_lebm("lebm", "digits", "/nonexistent/x", latent_dim2=3), "latent_dim2 applies to joint-mle"),
    (lambda: train_lebm("lebm", "digits", "/nonexistent/x", prior_step_size=0.0), "prior_step_size must be"),
    (lambda: train_lebm("gauss", "digits", "/nonexistent/x"), "model must be one of"),
])
def test_bad_input_is_named(call, match):
    with pytest.raises(ValueError, match=match):
        call()


def test_resume_without_a_run_and_flags_that_do_not_apply(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no prior_model.safetensors"):
        train_lebm("lebm", "digits", tmp_path, resume=True)
    with pytest.raises(ValueError, match="train-prior lebm: gamma is not a setting of this command"):
        train_lebm("lebm", "digits", tmp_path, gamma=1.0)
    for flag in ("--gamma", "--init-from"):  # another trainer's option is not one of this command's
        with pytest.raises(SystemExit):
            commands.main(["train-prior", "lebm", "--data", "digits", "--out", str(tmp_path), flag, "1"])
        assert f"unrecognized arguments: {flag}" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_two_processes_under_torchrun(tmp_path):
    """train-prior lebm on two gloo ranks: each takes half the global batch, gradients are averaged, rank 0 writes."""
    pytest.importorskip("matplotlib")
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone", "-m",
               "fastlangevin.cli", "train-prior", "lebm", "--out", str(out), *TINY, *MODEL_FLAGS["lebm"]]
    launch = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"}, start_new_session=True)
    try:
        stdout, stderr = launch.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)  # the launcher and both ranks
        stdout, stderr = launch.communicate()
        pytest.fail(f"torchrun did not finish in 180 s:\n{stderr[-3000:]}")
    assert launch.returncode == 0, stdout[-3000:] + stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())["prior_training"]
    assert [h["step"] for h in metrics["history"]] == [2, 4]
    assert load_checkpoint(out / "prior_model.safetensors")["step"] == 4
    assert stdout.count('"steps": 4') == 1  # only rank 0 prints the summary


def test_one_adam_over_two_groups_is_the_references_two_optimisers():
    """The trainer's single Adam (generator and energy groups, backward restricted to each group) takes the step of
    the references' two Adams run one after the other; lebm-vi's E(z_q) term must not reach the energy."""
    x = torch.rand(8, *SHAPE, dtype=torch.float64)
    z_neg = torch.randn(8, 3, dtype=torch.float64)
    ours, theirs = small(VariationalLatentEBM), small(VariationalLatentEBM)
    optimizer = torch.optim.Adam([{"params": ours.generator_parameters(), "lr": 1e-2},
                                  {"params": ours.energy_parameters(), "lr": 1e-3}], betas=(0.5, 0.999))
    opt_g = torch.optim.Adam(theirs.generator_parameters(), lr=1e-2, betas=(0.5, 0.999))
    opt_e = torch.optim.Adam(theirs.energy_parameters(), lr=1e-3, betas=(0.5, 0.999))
    for step in range(3):
        terms, z_q = ours.variational_loss(x, torch.Generator().manual_seed(step))
        optimizer.zero_grad()
        terms["loss"].backward(inputs=ours.generator_parameters())
        ours.energy_loss(z_q, z_neg).backward(inputs=ours.energy_parameters())
        optimizer.step()
        terms, z_q = theirs.variational_loss(x, torch.Generator().manual_seed(step))
        opt_g.zero_grad()
        terms["loss"].backward()
        opt_g.step()
        opt_e.zero_grad()
        theirs.energy_loss(z_q, z_neg).backward()
        opt_e.step()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, msg=name)
