"""``train-prior lebm | lebm-vi | joint-mle``: a generator and its latent-space EBM prior learned together by
maximum likelihood with short-run Langevin chains (models in ``fastlangevin.models.lebm``; sign convention there:
E is an energy, low = likely).

Per batch x (the references' order, ``/work/shared/reference-code.md`` §1, §2a):

1. posterior chain  z⁺ ~ p(z | x) ∝ exp(−‖x − G(z)‖²/(2σ²) − E(z))·p_β(z)   (20 steps, h = 0.01; joint-mle 40)
   — ``lebm-vi`` draws z⁺ from its encoder q(z|x) instead;
2. prior chain      z⁻ ~ p_α(z) ∝ exp(−E(z))·p_β(z)                          (60 steps, h = 0.16)
   — for ``lebm`` the fused ``fl.MLPEnergy`` chain (one kernel for all steps);
3. one Adam step on generator loss + energy loss (mean E(z⁺) − mean E(z⁻)). The references take two optimisers,
   G then E; one Adam over two parameter groups is the same update, since Adam is per parameter and neither loss
   reaches the other's parameters (``backward(inputs=...)`` keeps the VI loss's E(z_q) term off the energy).

Both chains start from fresh z₀ ~ N(0, I) (non-persistent) and run through ``trainers.chains.run_chain``
(``sampler="library"``: ``fl.langevin``; ``"eager"``: the hand-written loop, to measure the chains' cost), timed by
``ChainTimer``. ``lebm-vi`` keeps LEBM's prior chain (the follow-up code it follows runs 100 steps with h = 0.09;
pass ``--prior-steps 100 --prior-step-size 0.09``). Every ``eval_every`` steps: sample quality against the test
split of the EBM prior (the prior chain) and of the generator with its Gaussian prior p_β alone, both through
``trainers.quality.sample_quality``.

Multi-process (``torchrun``, ``trainers.distributed``): each rank takes its share of the global batch, runs its
chains with its own seeds (rank 0 keeps the single-process ones), and the gradients are averaged over ranks before
the Adam step (what DDP does; done by hand because the two losses take two backward passes); rank 0 evaluates and
writes the run directory.
"""

from __future__ import annotations

import math
import os
import time

import torch
from tqdm.auto import tqdm

import fastlangevin as fl
from fastlangevin.data import make_dataset
from fastlangevin.models.lebm import PRIOR_MODELS, make_prior_model
from fastlangevin.trainers import distributed
from fastlangevin.trainers.base import batch_indices
from fastlangevin.trainers.chains import SAMPLERS, ChainTimer, run_chain
from fastlangevin.trainers.checkpoint import load_checkpoint, read_json, save_checkpoint, write_json
from fastlangevin.trainers.quality import _pyplot, plot_panels, sample_quality

CHECKPOINT = "prior_model.safetensors"
# Defaults for a few-minute CPU run on the 8×8 digits. The references' lrs (E 2e-5, G 1e-4) are tuned for 100-200
# epochs of 50k-image data sets; 2,000 batches of 100 digits are ~140 epochs of 1,437 images but far fewer updates,
# so both lrs are 5× higher here (pass --lr-e 2e-5 --lr-g 1e-4 for the references').
DEFAULTS = dict(steps=2000, batch_size=100, lr_e=1e-4, lr_g=5e-4, latent_dim=16, eval_every=500, n_eval=1000,
                checkpoint_every=500, sampler="library", seed=0)
MODEL_OPTIONS = ("latent_dim", "latent_dim2", "energy_width", "generator_width", "llhd_sigma")
CHAIN_OPTIONS = ("posterior_steps", "posterior_step_size", "prior_steps", "prior_step_size")


def _settings(model: str, given: dict) -> dict:
    """The run's settings: the given options over the model's chain/optimiser defaults over ``DEFAULTS``."""
    if model not in PRIOR_MODELS:
        raise ValueError(f"model must be one of {tuple(PRIOR_MODELS)}, got {model!r}")
    settings = {**DEFAULTS, **PRIOR_MODELS[model].defaults}
    settings.update({k: v for k, v in given.items() if v is not None})
    settings["betas"] = list(settings["betas"])
    if settings["sampler"] not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {settings['sampler']!r}")
    for name in ("batch_size", "eval_every", "n_eval", "checkpoint_every", *CHAIN_OPTIONS[::2]):
        value = settings[name]
        if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name.endswith("steps") else 1):
            raise ValueError(f"{name} must be an int >= {0 if name.endswith('steps') else 1}, got {value!r}")
    for name in ("lr_e", "lr_g", *CHAIN_OPTIONS[1::2]):
        if not 0 < settings[name] < math.inf:
            raise ValueError(f"{name} must be a finite float > 0, got {settings[name]!r}")
    if model == "lebm-vi" and given.get("posterior_steps") is not None:
        raise ValueError("posterior_steps does not apply to lebm-vi (its encoder replaces the posterior chain)")
    return settings


class _Chains:
    """The run's chains: ``run_chain`` with the run's sampler, a seed per (step, chain) (mapped by ``rank_seed`` to
    this rank's own), timed, and a non-finite energy reported with the chain's name and training iteration."""

    def __init__(self, sampler: str, seed: int, device, rank_seed=lambda seed: seed):
        self.sampler, self.seed, self.rank_seed, self.timer = sampler, seed, rank_seed, ChainTimer(device)

    def __call__(self, which: str, step: int, energy, z0, n_steps: int, step_size: float, prior, index: int = 0):
        seed = self.rank_seed((self.seed * 1_000_003 + step) * 8 + index)
        try:
            with self.timer:
                z = run_chain(energy, z0, n_steps, step_size, prior=prior, seed=seed, sampler=self.sampler)
        except fl.NonFiniteEnergyError as error:
            raise fl.NonFiniteEnergyError(f"train-prior: the {which} chain of training iteration {step}: {error}; "
                                          f"lower the learning rates or the chain's step size") from error
        if not bool(torch.isfinite(z).all()):  # the eager loop does not check as it goes
            raise fl.NonFiniteEnergyError(f"train-prior: the {which} chain of training iteration {step} ended with "
                                          f"non-finite latents; lower the learning rates or the chain's step size")
        return z


def _prior_chain(net, chains, s, step, z0, index=0, n_steps=None):
    return chains("prior", step, net.energy, z0, s["prior_steps"] if n_steps is None else n_steps,
                  s["prior_step_size"], net.prior, index)


def _posterior(net, chains, s, step, x, z0, index=0):
    """Posterior latents of x: the posterior chain from z0, or the encoder's mean for lebm-vi."""
    if net.name == "lebm-vi":
        with torch.no_grad():
            return net.posterior(x)[0]
    return chains("posterior", step, net.posterior_energy(x), z0, s["posterior_steps"], s["posterior_step_size"],
                  net.prior, index)


def _train_step(ctx, net, optimizer, chains, s, step, x) -> dict:
    """One iteration on this rank's batch x; returns the loss terms averaged over ranks."""
    g = torch.Generator().manual_seed(ctx.rank_seed(s["seed"] * 1_000_003 + step))
    device = x.device
    if net.name == "lebm-vi":
        terms, z_pos = net.variational_loss(x, g)
    else:
        z_pos = _posterior(net, chains, s, step, x, net.initial_latents(len(x), g, device), index=1)
    z_neg = _prior_chain(net, chains, s, step, net.initial_latents(len(x), g, device))
    if net.name != "lebm-vi":
        terms = net.generator_loss(x, z_pos, z_neg)
    loss_e = net.energy_loss(z_pos, z_neg)
    for name, value in (("generator loss", terms["loss"]), ("energy loss", loss_e)):
        if not math.isfinite(value.item()):
            raise FloatingPointError(f"train-prior {net.name}: the {name} is {value.item()} at iteration {step}; "
                                     f"lower --lr-g / --lr-e")
    optimizer.zero_grad(set_to_none=True)
    terms["loss"].backward(inputs=net.generator_parameters())
    loss_e.backward(inputs=net.energy_parameters())
    ctx.average_gradients(net.parameters())
    optimizer.step()
    out = {k: ctx.all_reduce_mean(v.item()) for k, v in terms.items()}
    loss_e = ctx.all_reduce_mean(loss_e.item())
    return {**out, "energy_loss": loss_e, "energy_gap": -loss_e}


def _evaluate(net, chains, s, step, test_set, z0, z_base, x_test, bandwidths, data_dir) -> dict:
    """Sample quality of the EBM prior (prior chain from z0) and of p_β alone (z_base), and the test images'
    posterior reconstruction error (mean ‖x − G(z⁺)‖² per image). The Fréchet distance's classifier trains on the
    run's training split (``data_seed``)."""
    z_ebm = _prior_chain(net, chains, s, step, z0, index=2)
    z_post = _posterior(net, chains, s, step, x_test, z0[: len(x_test)], index=3)
    with torch.no_grad():
        x_ebm, x_base = net.generate(z_ebm), net.generate(z_base)
        reconstruction = net.squared_error(x_test, z_post).mean().item()
    ebm = sample_quality(x_ebm, test_set, bandwidths, data_dir=data_dir, data_seed=s["seed"])
    base = sample_quality(x_base, test_set, ebm["mmd_bandwidths"], data_dir=data_dir, data_seed=s["seed"])
    return {"ebm_prior": ebm, "gaussian_prior": base, "test_reconstruction_sse": reconstruction}


def train_lebm(model: str, data: str, out: str | os.PathLike, *, steps: int | None = None,
               epochs: float | None = None, batch_size: int | None = None, lr_e: float | None = None,
               lr_g: float | None = None, betas: tuple[float, float] | None = None, latent_dim: int | None = None,
               latent_dim2: int | None = None, energy_width: int | None = None, generator_width: int | None = None,
               llhd_sigma: float | None = None, prior_steps: int | None = None, prior_step_size: float | None = None,
               posterior_steps: int | None = None, posterior_step_size: float | None = None,
               sampler: str | None = None, eval_every: int | None = None, n_eval: int | None = None,
               checkpoint_every: int | None = None, latent_plot: bool = False, classes=None,
               n_train: int | None = None, data_dir: str | None = None, seed: int | None = None, resume: bool = False,
               device: str | None = None, progress: bool = True) -> dict:
    """Train ``model`` ("lebm", "lebm-vi", "joint-mle") on ``data``; writes RUN_DIR ``out`` and returns its training
    metrics (also under "prior_training" in metrics.json). None takes the model's default (see ``DEFAULTS`` and
    ``LatentEBM.defaults``); ``resume`` continues from RUN_DIR/prior_model.safetensors with the saved settings
    (``steps`` may grow), drawing the batches and chain seeds an uninterrupted run would have.
    ``latent_plot``: write latents.png, prior and posterior latents before and after their chains (2-D latents
    show exactly; larger ones their first two coordinates)."""
    device = device or "cpu"
    config_path, ckpt_path = os.path.join(out, "config.json"), os.path.join(out, CHECKPOINT)
    given = dict(steps=steps, batch_size=batch_size, lr_e=lr_e, lr_g=lr_g, betas=betas, latent_dim=latent_dim,
                 latent_dim2=latent_dim2, energy_width=energy_width, generator_width=generator_width,
                 llhd_sigma=llhd_sigma, prior_steps=prior_steps, prior_step_size=prior_step_size,
                 posterior_steps=posterior_steps, posterior_step_size=posterior_step_size, sampler=sampler,
                 eval_every=eval_every, n_eval=n_eval, checkpoint_every=checkpoint_every, seed=seed)
    saved = None  # the resumed run's config
    if resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no {CHECKPOINT} in {out}; start without --resume")
        saved = read_json(config_path)["prior"]
        model, data, data_dir, classes, n_train = (saved[k] for k in ("model", "data", "data_dir", "classes",
                                                                       "n_train"))
        s = dict(saved["settings"], steps=max(steps or 0, saved["settings"]["steps"]))
    else:
        s = _settings(model, given)
    if model != "joint-mle" and s.get("latent_dim2") is not None:
        raise ValueError(f"latent_dim2 applies to joint-mle only, not {model}")
    with distributed.setup(device) as ctx:
        return _train(ctx, model, data, out, s, saved, epochs=epochs, classes=classes,
                      n_train=n_train, data_dir=data_dir, latent_plot=latent_plot, progress=progress)


def _train(ctx, model, data, out, s, saved, *, epochs, classes, n_train, data_dir, latent_plot, progress) -> dict:
    """The training run of ``train_lebm`` on this rank (``saved``: the resumed run's config, or None)."""
    device, resume = ctx.device, saved is not None
    config_path, ckpt_path = os.path.join(out, "config.json"), os.path.join(out, CHECKPOINT)
    ctx.check_batch(s["batch_size"])
    if ctx.is_main:
        os.makedirs(out, exist_ok=True)
    train_set = make_dataset(data, data_dir, "train", seed=s["seed"], n_samples=n_train, classes=classes)
    test_set = make_dataset(data, data_dir, "test", seed=s["seed"], classes=classes)
    x_train = train_set.tensors()[0]
    if epochs is not None and not resume:
        s["steps"] = max(1, math.ceil(epochs * len(train_set) / s["batch_size"]))
    if isinstance(s["steps"], bool) or not isinstance(s["steps"], int) or s["steps"] < 1:
        raise ValueError(f"steps must be an int >= 1 (or give epochs), got {s['steps']!r}")
    torch.manual_seed(s["seed"])
    model_config = (saved["model_config"] if resume else
                    {"data_shape": list(train_set.sample_shape),
                     **{k: s[k] for k in MODEL_OPTIONS if s.get(k) is not None}})
    net = make_prior_model(model, **model_config).to(device)
    optimizer = torch.optim.Adam([{"params": net.generator_parameters(), "lr": s["lr_g"]},
                                  {"params": net.energy_parameters(), "lr": s["lr_e"]}], betas=tuple(s["betas"]))
    metrics_path = os.path.join(out, "metrics.json")
    all_metrics = read_json(metrics_path) if os.path.exists(metrics_path) else {}
    start, previous = 0, {}
    if resume:
        start = load_checkpoint(ckpt_path, net, optimizer, restore_rng=True)["step"]
        previous = all_metrics.get("prior_training", {})
        if ctx.is_main:
            print(f"resuming {model} on {data} from step {start} of {s['steps']}")
    if ctx.is_main:
        config = read_json(config_path) if os.path.exists(config_path) else {}
        config["prior"] = dict(model=model, model_config=net.config, data=data, data_dir=data_dir, classes=classes,
                               n_train=n_train, settings=s)
        write_json(config_path, config)

    chains = _Chains(s["sampler"], s["seed"], device, ctx.rank_seed)
    chains.timer.seconds = previous.get("chain_seconds", 0.0)
    fixed = torch.Generator().manual_seed(s["seed"] + 7)  # the same evaluation latents at every evaluation
    z_eval = net.initial_latents(s["n_eval"], fixed, device)
    z_base = net.sample_base_prior(s["n_eval"], fixed, device)
    x_test = test_set.tensors()[0][: min(100, s["n_eval"])].to(device)
    history = previous.get("history", [])
    bandwidths = history[0]["ebm_prior"]["mmd_bandwidths"] if history else None
    train_seconds, last = previous.get("train_seconds", 0.0), {}
    bar = tqdm(range(start, s["steps"]), initial=start, total=s["steps"], desc=f"train-prior {model}",
               disable=not (progress and ctx.is_main), mininterval=2.0, dynamic_ncols=True)
    for step in bar:
        begin = time.perf_counter()
        x = ctx.shard(x_train[batch_indices(len(x_train), s["batch_size"], s["seed"], step)]).to(device)
        last = _train_step(ctx, net, optimizer, chains, s, step, x)
        train_seconds += time.perf_counter() - begin
        bar.set_postfix(loss=f"{last['loss']:.3f}", gap=f"{last['energy_gap']:.3f}",
                        samples_s=f"{(step + 1) * s['batch_size'] / train_seconds:.0f}",
                        chain=f"{chains.timer.seconds / train_seconds:.0%}")
        if ctx.is_main and ((step + 1) % s["eval_every"] == 0 or step + 1 == s["steps"]):
            chain_seconds = chains.timer.seconds  # evaluation chains are not training time
            entry = {"step": step + 1, **last,
                     **_evaluate(net, chains, s, step, test_set, z_eval, z_base, x_test, bandwidths, data_dir)}
            chains.timer.seconds = chain_seconds
            bandwidths = entry["ebm_prior"]["mmd_bandwidths"]
            history.append(entry)
            metric = "frechet_distance" if "frechet_distance" in entry["ebm_prior"] else "mmd2"
            bar.write(f"step {step + 1}: {metric} EBM prior {entry['ebm_prior'][metric]:.5g} vs Gaussian prior "
                      f"{entry['gaussian_prior'][metric]:.5g}; test reconstruction SSE "
                      f"{entry['test_reconstruction_sse']:.3f}")
        if ctx.is_main and ((step + 1) % s["checkpoint_every"] == 0 or step + 1 == s["steps"]):
            save_checkpoint(ckpt_path, net, optimizer, step + 1, extra={"model": model})
            all_metrics["prior_training"] = _summary(s, history, train_seconds, chains.timer.seconds, step + 1)
            write_json(metrics_path, all_metrics)
    bar.close()
    if ctx.is_main:
        _plots(net, chains, s, train_set, test_set, out, latent_plot)
    return ctx.broadcast(all_metrics.get("prior_training",
                                         _summary(s, history, train_seconds, chains.timer.seconds, start)))


def _summary(s: dict, history: list, train_seconds: float, chain_seconds: float, steps_done: int) -> dict:
    return {"history": history, "steps": steps_done, "sampler": s["sampler"], "train_seconds": train_seconds,
            "chain_seconds": chain_seconds, "chain_share": chain_seconds / max(train_seconds, 1e-9),
            "seconds_per_iteration": train_seconds / max(steps_done, 1),
            "samples_per_second": steps_done * s["batch_size"] / max(train_seconds, 1e-9),
            "final": history[-1] if history else None}


def chain_snapshots(net, chains, s, z0: torch.Tensor, at_steps) -> list[tuple[int, torch.Tensor]]:
    """The prior chain from z0 (N, latent_dim) recorded at ``at_steps`` (increasing): [(k, G(z_k))]. It runs in
    segments between the recorded steps, a noise seed per segment."""
    out, z, done = [], z0, 0
    for i, k in enumerate(at_steps):
        if k > done:
            z = _prior_chain(net, chains, s, s["steps"], z, index=4 + i % 4, n_steps=k - done)
            done = k
        with torch.no_grad():
            out.append((k, net.generate(z).cpu()))
    return out


def _plots(net, chains, s, train_set, test_set, out, latent_plot: bool) -> None:
    """samples.png (G(z₀) vs G(z_K) of the prior chain, p_β samples, data), reconstructions.png (test images and
    G of their posterior latents), langevin_transition.png (8 prior chains as rows) and, if asked, latents.png."""
    device = next(net.parameters()).device
    g = torch.Generator().manual_seed(s["seed"] + 13)
    z0 = net.initial_latents(64, g, device)
    z_k = _prior_chain(net, chains, s, s["steps"], z0, index=2)
    x_test = test_set.tensors()[0][:64].to(device)
    z_post = _posterior(net, chains, s, s["steps"], x_test, net.initial_latents(64, g, device), index=3)
    with torch.no_grad():
        panels = [("G(z0), prior chain start", net.generate(z0)),
                  (f"G(zK) after {s['prior_steps']} prior steps", net.generate(z_k)),
                  ("G(z), z ~ Gaussian prior p_beta", net.generate(net.sample_base_prior(64, g, device))),
                  ("held-out data", x_test)]
        plot_panels(panels, os.path.join(out, "samples.png"))
        how = "encoder mean" if net.name == "lebm-vi" else f"{s['posterior_steps']} posterior steps"
        plot_panels([("test images", x_test), (f"G(z+), {how}", net.generate(z_post))],
                    os.path.join(out, "reconstructions.png"))
    k = s["prior_steps"]
    at_steps = sorted({0, k // 10, k // 4, k // 2, k})
    snapshots = chain_snapshots(net, chains, s, net.initial_latents(8, g, device), at_steps)
    grid = torch.stack([x for _, x in snapshots], 1).flatten(0, 1)
    plot_panels([(f"prior chains at steps {', '.join(map(str, at_steps))}", grid)],
                os.path.join(out, "langevin_transition.png"), n_cols=len(at_steps))
    if latent_plot:
        latent_figure(net, chains, s, train_set, os.path.join(out, "latents.png"))


def latent_figure(net, chains, s, dataset, path, n: int = 500) -> str:
    """The papers' latent visualisation: a row per latent layer (z₁, z₂), columns prior chain start / end and
    posterior chain start / end for the first ``n`` images of ``dataset`` (coloured by label); first two
    coordinates of each layer."""
    device = next(net.parameters()).device
    g = torch.Generator().manual_seed(s["seed"] + 17)
    x, labels = (t[:n] for t in dataset.tensors())
    z_prior0, z_post0 = net.initial_latents(len(x), g, device), net.initial_latents(len(x), g, device)
    columns = [("prior z0", z_prior0, None), (f"prior zK ({s['prior_steps']} steps)",
                                               _prior_chain(net, chains, s, s["steps"], z_prior0, index=2), None)]
    if net.name != "lebm-vi":
        columns.append(("posterior z0", z_post0, labels))
    columns.append((f"posterior zK ({s['posterior_steps']} steps)" if net.name != "lebm-vi" else "encoder mean",
                    _posterior(net, chains, s, s["steps"], x.to(device), z_post0, index=3), labels))
    plt = _pyplot()
    layers = net.layer_dims
    fig, axes = plt.subplots(len(layers), len(columns), figsize=(3.2 * len(columns), 3.2 * len(layers)),
                             squeeze=False)
    for col, (title, z, colour) in enumerate(columns):
        for row, part in enumerate(z.detach().cpu().split(layers, dim=1)):
            ax = axes[row][col]
            y = part[:, min(1, part.shape[1] - 1)]
            if colour is None:
                ax.scatter(part[:, 0], y, s=3, alpha=0.5)
            else:
                for label in colour.unique().tolist():
                    pick = colour == label
                    ax.scatter(part[pick, 0], y[pick], s=3, alpha=0.6, color=f"C{label % 10}", label=str(label))
                ax.legend(fontsize=7, markerscale=3, loc="upper right")
            ax.set_title(f"{title}: z{row + 1}" if len(layers) > 1 else title, fontsize=9)
            ax.set_aspect("equal", adjustable="datalim")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return os.fspath(path)
