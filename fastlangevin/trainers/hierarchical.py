"""``train-prior gaussian`` / ``train-prior joint``: the hierarchical VAE (``models.hierarchical``) with its
hierarchical Gaussian prior p_β (the baseline), and with the joint latent EBM prior p(z) ∝ exp(f(z))·p_β(z),
f = Σ_i f_i(z_i) (the paper's sign: high = likely), sampled in ε-space.

``gaussian``: the ELBO, rec + Σ_i KL(q(z_i|x, z_<i) ‖ p_β(z_i|z_<i)), KL weight warmed up linearly over the first
``kl_warmup`` share of the steps; Adam(lr_g).

``joint``: first the VAE as ``gaussian`` (or ``init_from`` a gaussian run: the same generator), then the EBMs.
Negatives z⁻ = T_β(ε_K), ε_K from a short-run, non-persistent ε-space chain ε_0 ~ N(0, I) → ``run_chain(
EpsilonEnergy, ε_0, prior_steps, prior_step_size, prior="normal")``; positives z⁺ ~ q(z|x).

* ``scheme="two-stage"`` (default; the reference code, reference-code.md §2b): the VAE is frozen and each f_i learns
  from loss_i = mean f_i(z⁻) − mean f_i(z⁺).
* ``scheme="joint"``: the ELBO with the EBM prior trains everything: rec + KL(q ‖ p_β) − mean f(z⁺) + log Z, with
  ∇ log Z estimated by the prior chain's samples (supplement eqs. 3–6): the surrogate mean f(z⁻) + mean log p_β(z⁻)
  (z⁻ detached) gives α the gradient E_{p}[∇f] and β the gradient E_{p}[∇ log p_β(z)].

Optimisers: one Adam param group per latent group's EBM (as the reference's one Adam per EBM; Adam is
per-parameter, so the two are the same), lr_e 5e-3, betas (0.99, 0.999), weight decay 3e-5 (the reference: lr 2e-5
to 1e-4 on GPUs for thousands of iterations; the CPU budget here is hundreds); the VAE Adam(lr_g, (0.9, 0.999)).

RUN_DIR: config.json {"vae", "ebm"}, vae.safetensors (the VAE + Adam, step), ebm.safetensors (VAE and EBMs + Adam,
step; ``resume``), metrics.json {"vae_training", "ebm_training"} with sample quality against the test split,
samples.png, hierarchical_resampling.png and, for ``joint``, langevin_transition.png.

Multi-process (``torchrun``, ``trainers.distributed``): each rank takes its B/N rows of the same global batch (and of
the global ε_0), runs its chains with its own seeds and draws its own reparametrisation noise (rank 0 keeps the
single-process ones), and the gradients are averaged over ranks before each Adam step — by DDP for the VAE stage,
by hand for the EBM stage, whose loss takes several forwards of the VAE and the EBMs. The logged losses and the
divergence checks are those of the global batch, so every rank stops together. Rank 0 evaluates and writes the run
directory. Equal to one process in distribution only (see ``trainers.distributed``); besides, the KL balancing of the
VAE's warm-up weights the groups by each rank's own batch KLs.
"""

from __future__ import annotations

import math
import os
import shutil
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from fastlangevin.data import make_dataset
from fastlangevin.models.hierarchical import EpsilonEnergy, HierarchicalVAE, JointEBMPrior, VARIANTS, \
    channels_for_params
from fastlangevin.trainers import distributed
from fastlangevin.trainers.base import batch_indices
from fastlangevin.trainers.chains import SAMPLERS, ChainTimer, run_chain
from fastlangevin.trainers.checkpoint import load_checkpoint, read_json, save_checkpoint, write_json
from fastlangevin.trainers.quality import plot_panels, sample_quality

VAE_CHECKPOINT, EBM_CHECKPOINT = "vae.safetensors", "ebm.safetensors"
MODELS = ("gaussian", "joint")
SCHEMES = ("two-stage", "joint")
DEFAULT_VAE = dict(latent_channels=[8, 4, 2], channels=16, n_cells=1)


def _chain_seed(seed: int, step: int) -> int:
    return seed * 1_000_003 + step


def _own_stream(ctx, seed: int, step: int) -> None:
    """Ranks other than 0 reseed torch's global generator (the reparametrisation noise) from ``step`` on with a seed
    of their own (+2**61: never one of their chains' seeds); rank 0 keeps the single-process stream."""
    if ctx.rank:
        torch.manual_seed(ctx.rank_seed(_chain_seed(seed, step) + 2 ** 61))


def load_run(run_dir: str | os.PathLike, device: str = "cpu") -> tuple[HierarchicalVAE, JointEBMPrior | None, dict]:
    """The run's VAE and (after ``joint``) EBM prior, frozen, and its config."""
    config = read_json(os.path.join(run_dir, "config.json"))
    vae = HierarchicalVAE(**config["vae"]["model_config"])
    ebm = None
    if "ebm" in config:
        ebm = JointEBMPrior(**config["ebm"]["prior_config"])
        load_checkpoint(os.path.join(run_dir, EBM_CHECKPOINT), nn.ModuleDict({"vae": vae, "ebm": ebm}))
        ebm.to(device).eval().requires_grad_(False)
    else:
        load_checkpoint(os.path.join(run_dir, VAE_CHECKPOINT), vae)
    return vae.to(device).eval().requires_grad_(False), ebm, config


def sample_epsilon(vae: HierarchicalVAE, ebm: JointEBMPrior | None, eps0: torch.Tensor, n_steps: int,
                   step_size: float, *, variant: str = "paper", fixed=None, seed: int = 0,
                   sampler: str = "library") -> torch.Tensor:
    """ε_K of the ε-space chain from ``eps0`` (B, D') (with ``fixed`` top groups, see ``EpsilonEnergy``); without
    an EBM (the Gaussian prior) ε_0 itself, already a sample of N(0, I)."""
    if ebm is None or n_steps == 0:
        return eps0
    energy = EpsilonEnergy(vae, ebm, variant, fixed=fixed)
    return run_chain(energy, eps0, n_steps, step_size, prior="normal", seed=seed, sampler=sampler)


def generate(vae, ebm, n: int, n_steps: int, step_size: float, *, variant: str = "paper", seed: int = 0,
             sampler: str = "library", batch_size: int = 500) -> torch.Tensor:
    """n images G(T_β(ε_K)) (ε_K = ε_0 ~ N(0, I) for the Gaussian prior), in batches: (n, *data_shape), CPU."""
    out, generator = [], torch.Generator().manual_seed(seed)
    p = vae.h0
    for i in range(0, n, batch_size):
        eps0 = torch.randn(min(batch_size, n - i), vae.latent_dim, generator=generator, dtype=p.dtype).to(p.device)
        eps = sample_epsilon(vae, ebm, eps0, n_steps, step_size, variant=variant, seed=seed + i, sampler=sampler)
        with torch.no_grad():
            out.append(vae.generate(eps).cpu())
    return torch.cat(out)


def resample_lower(vae, ebm, x: torch.Tensor, keep: int, n_steps: int, step_size: float, *, variant: str = "paper",
                   seed: int = 0, sampler: str = "library") -> tuple[list[torch.Tensor], torch.Tensor]:
    """Hierarchical re-sampling (supplement §2.3): the top ``keep`` groups from the inference network (posterior
    means for x), the groups below re-sampled from the prior given them — for the EBM prior by an ε-space chain
    over the lower groups only with the top fixed (``n_steps`` of ``step_size``), for the Gaussian prior
    ancestrally. Returns (z per group, the decoded images (B, *data_shape)); z[:keep] are the inference network's."""
    if not 0 <= keep < len(vae.group_shapes):
        raise ValueError(f"keep must be in [0, {len(vae.group_shapes) - 1}] (groups kept from the inference "
                         f"network), got {keep}")
    with torch.no_grad():
        fixed = vae.posterior(x, mean=True).z[:keep]
    n_free = sum(vae.group_dims[keep:])
    generator = torch.Generator().manual_seed(seed)
    eps0 = torch.randn(x.shape[0], n_free, generator=generator, dtype=x.dtype).to(x.device)
    eps = sample_epsilon(vae, ebm, eps0, n_steps, step_size, variant=variant, fixed=fixed, seed=seed,
                         sampler=sampler)
    with torch.no_grad():
        zs, _ = vae.transform(eps, fixed=fixed)
        return zs, vae.decode(zs)


def langevin_transition(vae, ebm, eps0: torch.Tensor, at_steps, step_size: float, *, variant: str = "paper",
                        seed: int = 0, sampler: str = "library") -> list[tuple[int, torch.Tensor]]:
    """The ε-space chains from ``eps0`` recorded at ``at_steps`` (increasing): a list of (k, G(T_β(ε_k))). The chain
    runs in segments between the recorded steps (a new noise seed per segment)."""
    out, eps, done = [], eps0, 0
    for i, k in enumerate(at_steps):
        eps = sample_epsilon(vae, ebm, eps, k - done, step_size, variant=variant, seed=seed + 1 + i, sampler=sampler)
        done = k
        with torch.no_grad():
            out.append((k, vae.generate(eps).cpu()))
    return out


def _figures(out, vae, ebm, test_set, samples, n_steps: int, step_size: float, variant: str, seed: int,
             sampler: str) -> None:
    """samples.png, hierarchical_resampling.png and (EBM prior) langevin_transition.png."""
    label = "joint EBM prior" if ebm is not None else "hierarchical Gaussian prior"
    plot_panels([(label, samples), ("held-out data", test_set.tensors()[0][: len(samples)])],
                os.path.join(out, "samples.png"), test_set)
    p = vae.h0
    x = test_set.tensors()[0][:8].to(device=p.device, dtype=p.dtype)
    with torch.no_grad():
        columns = [x.cpu(), vae.decode(vae.posterior(x, mean=True).z).cpu()]
    groups = len(vae.group_shapes)
    columns += [resample_lower(vae, ebm, x, keep, n_steps, step_size, variant=variant, seed=seed + keep,
                               sampler=sampler)[1].cpu() for keep in range(groups - 1, -1, -1)]
    grid = torch.stack(columns, 1).flatten(0, 1)
    plot_panels([(f"data | recon. | top {groups - 1}..0 groups kept", grid)],
                os.path.join(out, "hierarchical_resampling.png"), n_cols=len(columns))
    if ebm is not None:
        at_steps = sorted({0, n_steps // 4, n_steps // 2, n_steps, 2 * n_steps})
        eps0 = torch.randn(8, vae.latent_dim, generator=torch.Generator().manual_seed(seed + 1), dtype=p.dtype)
        snapshots = langevin_transition(vae, ebm, eps0.to(p.device), at_steps, step_size, variant=variant,
                                        seed=seed, sampler=sampler)
        grid = torch.stack([img for _, img in snapshots], 1).flatten(0, 1)
        plot_panels([(f"ε-space chains at steps {', '.join(map(str, at_steps))}", grid)],
                    os.path.join(out, "langevin_transition.png"), n_cols=len(at_steps))


def _evaluate(vae, ebm, test_set, n_steps, step_size, variant, seed, sampler):
    samples = generate(vae, ebm, len(test_set), n_steps, step_size, variant=variant, seed=seed + 12345,
                       sampler=sampler)
    quality = sample_quality(samples, test_set)
    quality.pop("mmd_bandwidths")
    return samples, quality


def _data(vae_config: dict):
    train = make_dataset(vae_config["data"], vae_config["data_dir"], "train", seed=vae_config["seed"],
                         n_samples=vae_config["n_train"], classes=vae_config["classes"])
    test = make_dataset(vae_config["data"], vae_config["data_dir"], "test", seed=vae_config["seed"],
                        classes=vae_config["classes"])
    return train, test


def _update_metrics(out, key: str, metrics: dict) -> None:
    path = os.path.join(out, "metrics.json")
    all_metrics = read_json(path) if os.path.exists(path) else {}
    all_metrics[key] = metrics
    write_json(path, all_metrics)


def _check_finite(value: float, what: str, step: int, hint: str) -> None:
    if not math.isfinite(value) or abs(value) > 1e9:  # the reference's stop condition
        raise FloatingPointError(f"{what} is {value} at step {step}; {hint}")


def train_gaussian(data: str, out: str | os.PathLike, *, steps: int = 1500, batch_size: int = 64, lr_g: float = 1e-3,
                   kl_warmup: float = 0.3, channels: int | None = None, param_factor: float | None = None,
                   latent_channels=None, n_cells: int | None = None, seed: int = 0, data_dir: str | None = None,
                   n_train: int | None = None, classes=None, checkpoint_every: int = 500, resume: bool = False,
                   device: str = "cpu", progress: bool = True, figures: bool = True) -> dict:
    """Train the hierarchical VAE by its ELBO; returns (and writes under "vae_training") the metrics.

    ``param_factor``: pick the cell width whose parameter count is closest to that multiple of the default width's
    (the 2× / 4× baselines); excludes ``channels``. Under ``torchrun``: ``batch_size`` is the global batch."""
    if not 0 <= kl_warmup <= 1:
        raise ValueError(f"kl_warmup must be a share of the steps in [0, 1], got {kl_warmup}")
    with distributed.setup(device) as ctx:
        return _train_gaussian(ctx, data, out, steps=steps, batch_size=batch_size, lr_g=lr_g, kl_warmup=kl_warmup,
                               channels=channels, param_factor=param_factor, latent_channels=latent_channels,
                               n_cells=n_cells, seed=seed, data_dir=data_dir, n_train=n_train, classes=classes,
                               checkpoint_every=checkpoint_every, resume=resume, progress=progress, figures=figures)


def _train_gaussian(ctx, data, out, *, steps, batch_size, lr_g, kl_warmup, channels, param_factor, latent_channels,
                    n_cells, seed, data_dir, n_train, classes, checkpoint_every, resume, progress, figures) -> dict:
    """``train_gaussian`` on this rank."""
    device = ctx.device
    config_path, ckpt_path = os.path.join(out, "config.json"), os.path.join(out, VAE_CHECKPOINT)
    if resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no {VAE_CHECKPOINT} in {out}; start without --resume")
        saved = read_json(config_path)["vae"]
        model_config, batch_size, lr_g, kl_warmup = saved["model_config"], saved["batch_size"], saved["lr_g"], \
            saved["kl_warmup"]
        data, data_dir, seed, n_train, classes = saved["data"], saved["data_dir"], saved["seed"], saved["n_train"], \
            saved["classes"]
        steps = max(steps, saved["steps"])
    else:
        if channels is not None and param_factor is not None:
            raise ValueError("give channels or param_factor, not both")
        model_config = {**DEFAULT_VAE, "data_shape": None}
        for key, value in (("latent_channels", latent_channels), ("channels", channels), ("n_cells", n_cells)):
            if value is not None:
                model_config[key] = list(value) if key == "latent_channels" else value
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    ctx.check_batch(batch_size)
    vae_config = dict(model="hvae", data=data, data_dir=data_dir, seed=seed, n_train=n_train,
                      classes=None if classes is None else list(classes), steps=steps, batch_size=batch_size,
                      lr_g=lr_g, kl_warmup=kl_warmup, param_factor=param_factor)
    torch.manual_seed(seed)
    train_set, test_set = _data(vae_config)
    if model_config["data_shape"] is None:
        model_config["data_shape"] = list(train_set.sample_shape)
        if param_factor is not None:
            model_config["channels"] = channels_for_params(param_factor, **model_config)
    vae = HierarchicalVAE(**model_config).to(device)
    vae_config["model_config"] = vae.config  # every constructor argument, defaults included
    optimizer = torch.optim.Adam(vae.parameters(), lr=lr_g)
    start = load_checkpoint(ckpt_path, vae, optimizer, restore_rng=True)["step"] if resume else 0
    _own_stream(ctx, seed, start)
    if ctx.is_main:
        os.makedirs(out, exist_ok=True)
        config = read_json(config_path) if os.path.exists(config_path) else {}
        config["vae"] = vae_config
        write_json(config_path, config)

    x_train = train_set.tensors()[0]
    warmup_steps = max(1, round(kl_warmup * steps))
    history, begin = [], time.perf_counter()
    vae.train()
    loss_terms = ctx.wrap(vae, "loss_terms")  # the training step; evaluation and checkpoints use ``vae`` itself
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="train-prior gaussian",
               disable=not (progress and ctx.is_main), mininterval=2.0, dynamic_ncols=True)
    for step in bar:
        x = ctx.shard(x_train[batch_indices(len(x_train), batch_size, seed, step)]).to(device)
        terms = loss_terms(x, kl_weight=min(1.0, (step + 1) / warmup_steps))
        logged = dict(zip(terms, ctx.mean_over_ranks(list(terms.values()))))  # the global batch's batch means
        _check_finite(logged["loss"].item(), "the negative ELBO", step, "lower --lr-g")
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        bar.set_postfix(loss=f"{logged['loss'].item():.2f}", kl=f"{logged['kl'].item():.2f}",
                        samples_s=f"{(step + 1 - start) * batch_size / (time.perf_counter() - begin):.0f}")
        if (step + 1) % 50 == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": logged["loss"].item(),
                            "reconstruction": logged["reconstruction"].item(), "kl": logged["kl"].item(),
                            "kl_groups": logged["kl_groups"].tolist()})
        if ctx.is_main and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(ckpt_path, vae, optimizer, step + 1)
    seconds = time.perf_counter() - begin
    bar.close()

    metrics = None
    if ctx.is_main:
        vae.eval()
        samples, quality = _evaluate(vae, None, test_set, 0, 1.0, "paper", seed, "library")
        metrics = {"steps": steps, "seconds": seconds, "param_count": vae.param_count(),
                   "samples_per_second": (steps - start) * batch_size / max(seconds, 1e-9), "history": history,
                   "sample_quality": quality, "world_size": ctx.world_size}
        _update_metrics(out, "vae_training", metrics)
        if figures:
            _figures(out, vae, None, test_set, samples, 0, 1.0, "paper", seed, "library")
    return ctx.broadcast(metrics)


def _adopt_vae(init_from, out) -> None:
    """Copy a gaussian run's VAE (config and weights) into ``out``: the joint run starts from the same generator."""
    source = read_json(os.path.join(init_from, "config.json"))
    if "vae" not in source or not os.path.exists(os.path.join(init_from, VAE_CHECKPOINT)):
        raise FileNotFoundError(f"--init-from: {init_from} is not a `train-prior gaussian` run (no VAE)")
    os.makedirs(out, exist_ok=True)
    config_path = os.path.join(out, "config.json")
    config = read_json(config_path) if os.path.exists(config_path) else {}
    config["vae"] = {**source["vae"], "init_from": os.fspath(init_from)}
    write_json(config_path, config)
    if os.path.abspath(init_from) != os.path.abspath(out):
        shutil.copyfile(os.path.join(init_from, VAE_CHECKPOINT), os.path.join(out, VAE_CHECKPOINT))


def train_joint(data: str, out: str | os.PathLike, *, init_from: str | None = None, scheme: str = "two-stage",
                steps: int = 200, batch_size: int = 64, lr_e: float = 5e-3, lr_g: float = 1e-4,
                betas: tuple[float, float] = (0.99, 0.999), weight_decay: float = 3e-5, energy_width: int = 32,
                energy_layers: int = 2, prior_steps: int = 20, prior_step_size: float = 0.05,
                sample_steps: int | None = None, variant: str = "paper", sampler: str = "library", seed: int = 0,
                checkpoint_every: int = 100, resume: bool = False, device: str = "cpu", progress: bool = True,
                vae_options: dict | None = None) -> dict:
    """The joint EBM prior on the hierarchical VAE (module docstring). The VAE comes from ``init_from`` (a gaussian
    run) or is trained first in ``out`` with ``vae_options`` (``train_gaussian``'s keywords). ``steps``: EBM
    iterations; ``sample_steps``: chain length for evaluation and figures (default ``prior_steps``). Under
    ``torchrun``: ``batch_size`` is the global batch."""
    if scheme not in SCHEMES:
        raise ValueError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if steps < 1 or prior_steps < 1 or not prior_step_size > 0:
        raise ValueError(f"steps and prior_steps must be >= 1 and prior_step_size > 0, got {steps}, {prior_steps}, "
                         f"{prior_step_size}")
    with distributed.setup(device) as ctx:
        return _train_joint(ctx, data, out, init_from=init_from, scheme=scheme, steps=steps, batch_size=batch_size,
                            lr_e=lr_e, lr_g=lr_g, betas=betas, weight_decay=weight_decay, energy_width=energy_width,
                            energy_layers=energy_layers, prior_steps=prior_steps, prior_step_size=prior_step_size,
                            sample_steps=sample_steps, variant=variant, sampler=sampler, seed=seed,
                            checkpoint_every=checkpoint_every, resume=resume, progress=progress,
                            vae_options=vae_options)


def _train_joint(ctx, data, out, *, init_from, scheme, steps, batch_size, lr_e, lr_g, betas, weight_decay,
                 energy_width, energy_layers, prior_steps, prior_step_size, sample_steps, variant, sampler, seed,
                 checkpoint_every, resume, progress, vae_options) -> dict:
    """``train_joint`` on this rank (the VAE stage, if any, first)."""
    device = ctx.device
    ctx.check_batch(batch_size)
    config_path, ckpt_path = os.path.join(out, "config.json"), os.path.join(out, EBM_CHECKPOINT)
    if resume and not os.path.exists(ckpt_path):  # interrupted in the VAE stage: finish it, then start the EBMs
        if not os.path.exists(os.path.join(out, VAE_CHECKPOINT)):
            raise FileNotFoundError(f"--resume: no {EBM_CHECKPOINT} or {VAE_CHECKPOINT} in {out}; start without "
                                    f"--resume")
        if "init_from" not in read_json(config_path)["vae"]:
            train_gaussian(data, out, resume=True, device=device, progress=progress, figures=False)
        resume = False
    elif resume:
        saved = read_json(config_path)["ebm"]
        scheme, batch_size, lr_e, lr_g = saved["scheme"], saved["batch_size"], saved["lr_e"], saved["lr_g"]
        betas, weight_decay, variant = tuple(saved["betas"]), saved["weight_decay"], saved["variant"]
        prior_steps, prior_step_size, sample_steps = saved["prior_steps"], saved["prior_step_size"], \
            saved["sample_steps"]
        seed, steps = saved["seed"], max(steps, saved["steps"])
        energy_width, energy_layers = saved["prior_config"]["nef"], saved["prior_config"]["n_layers"]
        ctx.check_batch(batch_size)
    elif init_from is not None:
        if ctx.is_main:
            _adopt_vae(init_from, out)
        ctx.barrier()  # the others read what rank 0 wrote
    else:
        train_gaussian(data, out, seed=seed, device=device, progress=progress, figures=False, **(vae_options or {}))
    sample_steps = prior_steps if sample_steps is None else sample_steps
    config = read_json(config_path)
    if config["vae"]["data"] != data:
        raise ValueError(f"data: the VAE of {out} was trained on {config['vae']['data']!r}, not {data!r}")
    vae = HierarchicalVAE(**config["vae"]["model_config"]).to(device)
    load_checkpoint(os.path.join(out, VAE_CHECKPOINT), vae)
    torch.manual_seed(seed)  # the EBMs' initialisation, the same on every rank (torch seeds each process at random)
    ebm = JointEBMPrior(vae.group_dims, energy_width, energy_layers).to(device)
    both = nn.ModuleDict({"vae": vae, "ebm": ebm})
    groups = [{"params": list(e.parameters())} for e in ebm.energies]
    if scheme == "joint":
        groups.append({"params": list(vae.parameters()), "lr": lr_g, "betas": (0.9, 0.999), "weight_decay": 0.0})
    optimizer = torch.optim.Adam(groups, lr=lr_e, betas=tuple(betas), weight_decay=weight_decay)
    vae.eval().requires_grad_(scheme == "joint")  # GroupNorm only: eval and train compute the same function
    ebm_config = dict(scheme=scheme, steps=steps, batch_size=batch_size, lr_e=lr_e, lr_g=lr_g, betas=list(betas),
                      weight_decay=weight_decay, prior_steps=prior_steps, prior_step_size=prior_step_size,
                      sample_steps=sample_steps, variant=variant, sampler=sampler, seed=seed,
                      prior_config=ebm.config, ebm_param_count=sum(p.numel() for p in ebm.parameters()))
    start, history = 0, []
    if resume:
        start = load_checkpoint(ckpt_path, both, optimizer, restore_rng=True)["step"]
        history = read_json(os.path.join(out, "metrics.json")).get("ebm_training", {}).get("history", [])
    _own_stream(ctx, seed, start)
    config["ebm"] = ebm_config
    if ctx.is_main:
        write_json(config_path, config)
    train_set, test_set = _data(config["vae"])
    x_train = train_set.tensors()[0]

    timer, begin, gap = ChainTimer(device), time.perf_counter(), float("nan")
    energy = EpsilonEnergy(vae, ebm, variant)
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"train-prior joint ({scheme})",
               disable=not (progress and ctx.is_main), mininterval=2.0, dynamic_ncols=True)
    for step in bar:
        x = ctx.shard(x_train[batch_indices(len(x_train), batch_size, seed + 1, step)]).to(device)
        g = torch.Generator().manual_seed(_chain_seed(seed, step))
        eps0 = ctx.shard(torch.randn(batch_size, vae.latent_dim, generator=g)).to(device)
        with timer:
            eps = run_chain(energy, eps0, prior_steps, prior_step_size, prior="normal",
                            seed=ctx.rank_seed(_chain_seed(seed, step)), sampler=sampler)
        with torch.no_grad():
            z_neg, _ = vae.transform(eps)
        f_neg = ebm.per_group(z_neg)
        if scheme == "two-stage":
            with torch.no_grad():
                z_pos = vae.posterior(x).z
            f_pos = ebm.per_group(z_pos)
            loss = (f_neg.mean(0) - f_pos.mean(0)).sum()  # Σ_i loss_i; each EBM sees only its own term
            terms = {}
        else:
            post = vae.posterior(x)
            f_pos = ebm.per_group(post.z)
            terms = {"reconstruction": -vae.log_likelihood(x, post.logits).mean(),
                     "kl": torch.stack(post.kl, 1).sum(1).mean()}
            log_z = f_neg.sum(1).mean() + vae.prior_log_prob(z_neg).mean()  # ∇: E_p[∇f] and E_p[∇ log p_β]
            loss = terms["reconstruction"] + terms["kl"] - f_pos.sum(1).mean() + log_z
        gap = f_pos.sum(1).mean() - f_neg.sum(1).mean()  # f(z⁺) − f(z⁻): > 0 while the EBM separates them
        # the global batch's values, on every rank (batch means: the mean over ranks; |f|: the max over ranks)
        loss_value, gap, f_groups_pos, f_groups_neg, *term_values = (
            t.tolist() for t in ctx.mean_over_ranks([loss, gap, f_pos.mean(0), f_neg.mean(0), *terms.values()]))
        f_max = ctx.all_gather(torch.stack([f_neg.abs().max(), f_pos.abs().max()]).detach()[None]).max(0).values
        _check_finite(loss_value, "the loss", step, "lower --lr-e or --prior-step-size")
        _check_finite(f_max.sum().item(), "|f|", step, "lower --lr-e")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ctx.average_gradients(p for group in optimizer.param_groups for p in group["params"])
        optimizer.step()
        elapsed = time.perf_counter() - begin
        bar.set_postfix(loss=f"{loss_value:.3f}", gap=f"{gap:.3f}",
                        samples_s=f"{(step + 1 - start) * batch_size / elapsed:.0f}",
                        chain=f"{timer.seconds / elapsed:.0%}")
        if (step + 1) % 10 == 0 or step + 1 == steps:
            history.append({"step": step + 1, "loss": loss_value, "energy_gap": gap, "f_groups_pos": f_groups_pos,
                            "f_groups_neg": f_groups_neg, **dict(zip(terms, term_values))})
        if ctx.is_main and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(ckpt_path, both, optimizer, step + 1)
    seconds = time.perf_counter() - begin
    bar.close()

    metrics = None
    if ctx.is_main:
        vae.requires_grad_(False)
        ebm.eval().requires_grad_(False)
        samples, quality = _evaluate(vae, ebm, test_set, sample_steps, prior_step_size, variant, seed, sampler)
        n_iter = max(steps - start, 1)
        metrics = {"steps": steps, "seconds": seconds, "chain_seconds": timer.seconds,
                   "chain_share": timer.seconds / max(seconds, 1e-9),
                   "chain_seconds_per_iteration": timer.seconds / n_iter, "seconds_per_iteration": seconds / n_iter,
                   "sampler": sampler, "energy_gap": gap, "history": history, "sample_quality": quality,
                   "world_size": ctx.world_size}
        _update_metrics(out, "ebm_training", metrics)
        _figures(out, vae, ebm, test_set, samples, sample_steps, prior_step_size, variant, seed, sampler)
    return ctx.broadcast(metrics)


def train_hierarchical(model: str, data: str, out: str | os.PathLike, *, init_from: str | None = None,
                       scheme: str | None = None, steps: int | None = None, vae_steps: int | None = None,
                       batch_size: int | None = None, lr_e: float | None = None, lr_g: float | None = None,
                       betas=None, weight_decay: float | None = None, kl_warmup: float | None = None,
                       channels: int | None = None, param_factor: float | None = None, latent_channels=None,
                       n_cells: int | None = None, energy_width: int | None = None, energy_layers: int | None = None,
                       prior_steps: int | None = None, prior_step_size: float | None = None,
                       sample_steps: int | None = None, variant: str | None = None, sampler: str | None = None,
                       seed: int | None = None, data_dir: str | None = None, n_train: int | None = None,
                       classes=None, checkpoint_every: int | None = None, resume: bool | None = None,
                       device: str | None = None) -> dict:
    """``train-prior gaussian|joint`` (the dispatch target of ``fastlangevin.trainers.commands``; None = the
    trainer's default). ``gaussian``: ``train_gaussian`` (``steps`` = VAE steps). ``joint``: ``train_joint``
    (``steps`` = EBM iterations); without ``init_from`` its VAE is trained first with the VAE options
    (``vae_steps``, ``kl_warmup``, ``channels``, …; ``lr_g`` goes to the VAE unless ``scheme="joint"``)."""
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    given = {k: v for k, v in locals().items() if v is not None and k not in ("model", "data", "out")}
    common = {k: given.pop(k) for k in ("seed", "resume", "device", "checkpoint_every", "batch_size")
              if k in given}
    vae_keys = ("kl_warmup", "channels", "param_factor", "latent_channels", "n_cells", "n_train", "classes",
                "data_dir")
    if model == "gaussian":
        extra = sorted(set(given) - set(vae_keys) - {"steps", "lr_g"})
        if extra:
            raise ValueError(f"train-prior gaussian: {', '.join(extra)} apply to the joint model only")
        return train_gaussian(data, out, **given, **common)
    vae_options = {k: given.pop(k) for k in vae_keys if k in given}
    if "vae_steps" in given:
        vae_options["steps"] = given.pop("vae_steps")
    if "lr_g" in given and given.get("scheme") != "joint":
        vae_options["lr_g"] = given.pop("lr_g")
    if init_from is not None and vae_options.keys() - {"data_dir"}:
        raise ValueError(f"init_from: the VAE comes from {init_from}; drop "
                         f"{', '.join(sorted(vae_options.keys() - {'data_dir'}))}")
    if "batch_size" in common:
        vae_options.setdefault("batch_size", common["batch_size"])
    return train_joint(data, out, vae_options=vae_options, **given, **common)
