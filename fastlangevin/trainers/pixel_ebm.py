"""``train-pixel-ebm``: the pixel-space EBM baseline of the tilting paper's Table 1 (IGEBM, Du & Mordatch 2019): an
energy E_θ(x) on images, sampled by Langevin dynamics in pixel space with persistent chains kept in a replay buffer.

Target p_θ(x) ∝ exp(−E_θ(x) / T) on x (C, H, W), flat prior. Learning (maximum likelihood with short-run chains):

    loss = mean E(x⁺) − mean E(x⁻) + reg · (mean E(x⁺)² + mean E(x⁻)²)

x⁺ are training images; x⁻ come from persistent chains: each step draws ``batch_size`` chains (distinct entries)
from a replay buffer of ``buffer_size`` images (filled with U[0, 1] noise at the start), restarts each from fresh
U[0, 1] noise with probability ``reinit`` (Du & Mordatch: 5%), runs ``n_steps`` of ULA on E/T through
``run_chain`` (z ← z − ε/(2T)·∇E + √ε·ξ, ε = ``step_size``), clamps the result to [0, 1] (pixels; the chain itself is
not constrained) and writes it back where it came from. Energy: ``ConvEnergy`` (trainers/energy_nets.py); Adam.

Where this differs from IGEBM (``openai/ebm_code_release``): its update x ← x − λ∇E + σξ is this one with ε = σ² and
T = σ²/(2λ) (λ = 10, σ = 0.005 on CIFAR-10: T = 1.25e-6; here T is a setting); chains go back to the buffer entries
they came from (IGEBM appends to a FIFO buffer and draws at random); no spectral norm, no gradient clipping, no
data augmentation of the buffer.

Early stopping on sample quality, as ``tilt``: every ``eval_every`` steps fresh chains from U[0, 1] noise run
``sample_steps`` steps and are scored against a validation draw, and so are ``n_eval`` replay-buffer entries (the
persistent chains: IGEBM's samples); ``stop_from`` picks which of the two decides, the best model is kept.

RUN_DIR/config.json                 {"pixel_ebm": settings}
RUN_DIR/pixel_ebm.safetensors       energy + replay buffer + Adam state + step (``resume`` continues the buffer)
RUN_DIR/pixel_ebm_best.safetensors  the best energy (and its buffer) by the validation metric
RUN_DIR/metrics.json                {"pixel_ebm_training": history, best, chain time share}
RUN_DIR/pixel_ebm_samples.png       fresh chains, buffer entries, held-out data
"""

from __future__ import annotations

import math
import os
import time

import torch
from torch import nn
from tqdm.auto import tqdm

from fastlangevin.data import make_dataset
from fastlangevin.trainers import distributed
from fastlangevin.trainers.base import batch_indices
from fastlangevin.trainers.chains import SAMPLERS, ChainTimer, run_chain
from fastlangevin.trainers.checkpoint import load_checkpoint, read_json, save_checkpoint, write_json
from fastlangevin.trainers.energy_nets import make_energy
from fastlangevin.trainers.quality import plot_panels, sample_quality
from fastlangevin.trainers.tilt import EarlyStopping, contrastive_step, show_progress, validation_set

PIXEL_LAST, PIXEL_BEST = "pixel_ebm.safetensors", "pixel_ebm_best.safetensors"
STOP_FROM = ("chains", "buffer")  # early stopping on fresh chains from noise, or on the replay buffer


class ReplayBuffer(nn.Module):
    """``size`` persistent chain states (size, *sample_shape), started as U[0, 1] noise (a module buffer, so
    checkpoints hold it). ``draw`` takes distinct entries and restarts each with probability ``reinit``; ``update``
    writes the chains' new states back."""

    def __init__(self, size: int, sample_shape, reinit: float = 0.05, generator: torch.Generator | None = None):
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"buffer_size must be an int >= 1, got {size!r}")
        if not 0 <= reinit <= 1:
            raise ValueError(f"reinit must be a probability in [0, 1], got {reinit!r}")
        self.reinit = float(reinit)
        self.register_buffer("samples", torch.rand(size, *sample_shape, generator=generator))

    def __len__(self) -> int:
        return self.samples.shape[0]

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n distinct entries (n, *sample_shape) — a copy, each replaced by U[0, 1] noise with probability
        ``reinit`` — and their indices (n,)."""
        if n > len(self):
            raise ValueError(f"batch_size must be <= buffer_size {len(self)} (distinct chains), got {n}")
        index = torch.randperm(len(self), generator=generator)[:n]
        x = self.samples[index.to(self.samples.device)].clone()
        fresh = torch.rand(n, generator=generator) < self.reinit
        noise = torch.rand(int(fresh.sum()), *x.shape[1:], generator=generator)
        x[fresh.to(x.device)] = noise.to(x)
        return x, index

    def update(self, index: torch.Tensor, x: torch.Tensor) -> None:
        """Entries ``index`` (n,) become x (n, *sample_shape)."""
        self.samples[index.to(self.samples.device)] = x.detach().to(self.samples)


class PixelEBM(nn.Module):
    """The energy (``make_energy``: a ConvEnergy for images) and its replay buffer, one checkpoint for both."""

    def __init__(self, image_shape, energy_width: int | None, energy_depth: int | None, buffer_size: int,
                 reinit: float, seed: int):
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"the pixel-space EBM is for images (C, H, W), got samples of shape {tuple(image_shape)}")
        self.energy = make_energy(image_shape, energy_width, energy_depth)
        self.replay = ReplayBuffer(buffer_size, image_shape, reinit, torch.Generator().manual_seed(seed + 5))


def tempered(energy, temperature: float):
    """x ↦ E(x)/T: the energy ``run_chain`` samples (flat prior)."""
    return energy if temperature == 1 else lambda x: energy(x) / temperature


def sample_pixel_chains(energy, x0: torch.Tensor, n_steps: int, step_size: float, temperature: float, seed: int,
                        batch_size: int = 500) -> torch.Tensor:
    """Chains from x0 (N, C, H, W) in batches of ``batch_size``, clamped to [0, 1]: (N, C, H, W) on the CPU."""
    out = []
    for i, chunk in enumerate(x0.split(batch_size)):
        x = run_chain(tempered(energy, temperature), chunk, n_steps, step_size, prior=None, seed=seed + i)
        out.append(x.clamp_(0, 1).cpu())
    return torch.cat(out)


def train_pixel_ebm(data: str, out: str | os.PathLike, *, steps: int = 2000, batch_size: int = 64, lr: float = 1e-4,
                    betas: tuple[float, float] = (0.0, 0.999), n_steps: int = 20, step_size: float = 1e-4,
                    temperature: float = 1e-4, sample_steps: int | None = None, reg: float = 1.0,
                    buffer_size: int = 10_000, reinit: float = 0.05, energy_width: int | None = None,
                    energy_depth: int | None = None, eval_every: int = 100, n_eval: int = 1000,
                    patience: int | None = None, stop_on: str = "mmd2", stop_from: str = "chains", seed: int = 0,
                    sampler: str = "library", data_dir: str | None = None, n_train: int | None = None,
                    resume: bool = False, device: str = "cpu", progress: bool = True) -> dict:
    """Train the pixel-space EBM on ``data`` (an image data set); returns the training metrics (also in
    metrics.json). ``sample_steps``: steps of the evaluation chains from noise (default ``n_steps``). ``stop_on`` and
    ``patience`` as in ``train_tilt``; ``stop_from``: whether the fresh chains (``"chains"``) or the replay buffer
    (``"buffer"``) decide. ``resume``: continue from RUN_DIR/pixel_ebm.safetensors (energy, buffer, optimizer) with
    the saved settings. Under ``torchrun`` every rank holds the whole buffer, runs B/N of the chains
    (its own noise seed) and gathers the others' results, so the buffers stay identical."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    if stop_from not in STOP_FROM:
        raise ValueError(f"stop_from must be one of {STOP_FROM}, got {stop_from!r}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("n_steps", n_steps), ("eval_every", eval_every),
                        ("n_eval", n_eval)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    for name, value in (("step_size", step_size), ("temperature", temperature), ("lr", lr)):
        if not 0 < value < math.inf:
            raise ValueError(f"{name} must be a finite float > 0, got {value!r}")
    if not 0 <= reg < math.inf:
        raise ValueError(f"reg must be a finite float >= 0, got {reg!r}")
    with distributed.setup(device) as ctx:
        return _train_pixel_ebm(ctx, data, out, steps=steps, batch_size=batch_size, lr=lr, betas=betas,
                                n_steps=n_steps, step_size=step_size, temperature=temperature,
                                sample_steps=sample_steps or n_steps, reg=reg, buffer_size=buffer_size, reinit=reinit,
                                energy_width=energy_width, energy_depth=energy_depth, eval_every=eval_every,
                                n_eval=n_eval, patience=patience, stop_on=stop_on, stop_from=stop_from, seed=seed,
                                sampler=sampler, data_dir=data_dir, n_train=n_train, resume=resume,
                                progress=progress)


def _train_pixel_ebm(ctx: distributed.DistributedContext, data, out, *, steps, batch_size, lr, betas, n_steps,
                     step_size, temperature, sample_steps, reg, buffer_size, reinit, energy_width, energy_depth,
                     eval_every, n_eval, patience, stop_on, stop_from, seed, sampler, data_dir, n_train, resume,
                     progress) -> dict:
    device = ctx.device
    os.makedirs(out, exist_ok=True)
    config_path, last_path = os.path.join(out, "config.json"), os.path.join(out, PIXEL_LAST)
    if resume:
        if not os.path.exists(last_path):
            raise FileNotFoundError(f"--resume: no {PIXEL_LAST} in {out}; start without --resume")
        saved = read_json(config_path)["pixel_ebm"]  # the saved settings win (steps may only grow)
        data, data_dir, n_train, seed = saved["data"], saved["data_dir"], saved["n_train"], saved["seed"]
        batch_size, lr, betas, reg = saved["batch_size"], saved["lr"], tuple(saved["betas"]), saved["reg"]
        n_steps, step_size, temperature = saved["n_steps"], saved["step_size"], saved["temperature"]
        sample_steps, buffer_size, reinit = saved["sample_steps"], saved["buffer_size"], saved["reinit"]
        energy_width, energy_depth = saved["energy_width"], saved["energy_depth"]
        eval_every, n_eval, patience = saved["eval_every"], saved["n_eval"], saved["patience"]
        stop_on, stop_from = saved["stop_on"], saved["stop_from"]
        steps = max(steps, saved["steps"])
    ctx.check_batch(batch_size)
    if batch_size > buffer_size:
        raise ValueError(f"batch_size must be <= buffer_size {buffer_size} (distinct chains), got {batch_size}")
    stopping = EarlyStopping(stop_on, patience, eval_every)
    torch.manual_seed(seed)
    train_set = make_dataset(data, data_dir, "train", seed=seed, n_samples=n_train)
    model = PixelEBM(train_set.sample_shape, energy_width, energy_depth, buffer_size, reinit, seed).to(device)
    val_set = validation_set(data, data_dir, seed, n_eval)
    stopping.check_data(val_set)
    x_train = train_set.tensors()[0]
    optimizer = torch.optim.Adam(model.energy.parameters(), lr=lr, betas=tuple(betas))
    metrics_path = os.path.join(out, "metrics.json")
    all_metrics = read_json(metrics_path) if os.path.exists(metrics_path) else {}
    start, history = 0, []
    if resume:
        start = load_checkpoint(last_path, model, optimizer)["step"]
        previous = all_metrics.get("pixel_ebm_training", {})
        history, stopping.best = previous.get("history", []), previous.get("best", stopping.best)
        if ctx.is_main:
            print(f"resuming the pixel EBM from step {start} of {steps}")
    settings = dict(data=data, data_dir=data_dir, n_train=n_train, seed=seed, steps=steps, batch_size=batch_size,
                    lr=lr, betas=list(betas), reg=reg, n_steps=n_steps, step_size=step_size, temperature=temperature,
                    sample_steps=sample_steps, buffer_size=buffer_size, reinit=reinit, energy_width=energy_width,
                    energy_depth=energy_depth, eval_every=eval_every, n_eval=n_eval, patience=patience,
                    stop_on=stop_on, stop_from=stop_from, sampler=sampler, energy=type(model.energy).__name__)
    config = read_json(config_path) if os.path.exists(config_path) else {}
    config["pixel_ebm"] = settings
    if ctx.is_main:
        write_json(config_path, config)
    energy_loss = ctx.wrap(model.energy)  # the training step's forward; chains and evaluation use model.energy
    target = tempered(model.energy, temperature)

    # Fixed starting noise for the validation chains, so successive evaluations compare energies, not noise.
    x_val = torch.rand(n_eval, *train_set.sample_shape, generator=torch.Generator().manual_seed(seed + 7)).to(device)
    bandwidths = None
    metrics = all_metrics.get("pixel_ebm_training", {"history": history, "best": stopping.best})
    timer, begin = ChainTimer(device), time.perf_counter()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="pixel-ebm",
               disable=not (progress and ctx.is_main), mininterval=2.0, dynamic_ncols=True)
    for step in bar:
        # the same draw on every rank: the global batch of chains, the rank runs its share
        x0, index = model.replay.draw(batch_size, torch.Generator().manual_seed(seed * 1_000_003 + step))
        with timer:
            x_neg = run_chain(target, ctx.shard(x0).to(device), n_steps, step_size, prior=None,
                              seed=ctx.rank_seed(seed * 1_000_003 + step), sampler=sampler).clamp_(0, 1)
        model.replay.update(index, ctx.all_gather(x_neg))
        x_pos = ctx.shard(x_train[batch_indices(len(x_train), batch_size, seed + 1, step)]).to(device)
        loss_value, gap = contrastive_step(ctx, energy_loss, optimizer, x_pos, x_neg, reg, f"pixel-ebm step {step}")
        show_progress(bar, loss_value, gap, (step + 1 - start) * batch_size, time.perf_counter() - begin, timer)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            stop = False
            if ctx.is_main:
                samples = sample_pixel_chains(model.energy, x_val, sample_steps, step_size, temperature, seed + 11)
                quality = sample_quality(samples, val_set, bandwidths, data_dir, seed)
                bandwidths = quality.pop("mmd_bandwidths")
                picked = torch.randperm(len(model.replay), generator=torch.Generator().manual_seed(seed + 13))
                buffer_quality = sample_quality(model.replay.samples[picked[:n_eval]], val_set, bandwidths, data_dir,
                                                seed)
                buffer_quality.pop("mmd_bandwidths")
                history.append({"step": step + 1, "loss": loss_value, "energy_gap": gap, **quality,
                                "buffer": buffer_quality})
                decides = quality if stop_from == "chains" else buffer_quality
                if stopping.update(step + 1, decides):
                    save_checkpoint(os.path.join(out, PIXEL_BEST), model, None, step + 1,
                                    extra={stop_on: decides[stop_on], "stop_from": stop_from})
                save_checkpoint(last_path, model, optimizer, step + 1)
                bar.write(f"{stop_from}: " + stopping.describe(step + 1, decides)
                          + f"; chains mmd2 {quality['mmd2']:.5f}, buffer mmd2 {buffer_quality['mmd2']:.5f}")
                metrics = {"history": history, "best": stopping.best, "seconds": time.perf_counter() - begin,
                           "chain_seconds": timer.seconds, "sampler": sampler, "world_size": ctx.world_size}
                all_metrics["pixel_ebm_training"] = metrics
                write_json(metrics_path, all_metrics)
                stop = stopping.stop(step + 1, bar.write)
                if stop or step + 1 == steps:
                    plot_panels([(f"chains from noise ({sample_steps} steps)", samples),
                                 ("replay buffer", model.replay.samples[picked[:64]]),
                                 ("held-out data", val_set.tensors()[0][:64])],
                                os.path.join(out, "pixel_ebm_samples.png"))
            if ctx.broadcast(stop):  # every rank stops at the same step
                break
    bar.close()
    return ctx.broadcast(metrics)


def is_pixel_run(run_dir: str | os.PathLike) -> bool:
    """Whether RUN_DIR holds a pixel-space EBM (``train-pixel-ebm``) rather than a backbone (+ tilt)."""
    path = os.path.join(run_dir, "config.json")
    return os.path.exists(path) and "pixel_ebm" in read_json(path)


def load_pixel_ebm(run_dir: str | os.PathLike, which: str = "best", device: str = "cpu"):
    """The run's PixelEBM (``which="best"``, falling back to the last, or ``"last"``) in eval mode with frozen
    parameters, its settings and the checkpoint's metadata."""
    config = read_json(os.path.join(run_dir, "config.json"))
    if "pixel_ebm" not in config:
        raise FileNotFoundError(f"{run_dir} has no pixel-space EBM; run `fastlangevin train-pixel-ebm` first")
    s = config["pixel_ebm"]
    shape = make_dataset(s["data"], s["data_dir"], "test", seed=s["seed"]).sample_shape
    model = PixelEBM(shape, s["energy_width"], s["energy_depth"], s["buffer_size"], s["reinit"], s["seed"])
    path = os.path.join(run_dir, PIXEL_BEST if which == "best" else PIXEL_LAST)
    if which == "best" and not os.path.exists(path):
        path = os.path.join(run_dir, PIXEL_LAST)
    meta = load_checkpoint(path, model)
    return model.to(device).eval().requires_grad_(False), s, meta


def _draw_pixel(run_dir, n: int, seed: int, n_steps: int | None, which: str, device: str):
    model, s, meta = load_pixel_ebm(run_dir, which, device)
    test = make_dataset(s["data"], s["data_dir"], "test", seed=s["seed"])
    x0 = torch.rand(n, *test.sample_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    samples = sample_pixel_chains(model.energy, x0, n_steps or s["sample_steps"], s["step_size"], s["temperature"],
                                  seed)
    picked = torch.randperm(len(model.replay), generator=torch.Generator().manual_seed(seed + 1))[:n]
    return samples, model.replay.samples[picked].cpu(), test, s, meta


def sample_pixel_run(run_dir: str | os.PathLike, *, n: int = 64, seed: int = 0, n_steps: int | None = None,
                     which: str = "best", device: str = "cpu") -> str | None:
    """Chains from noise (``n_steps``, default the run's ``sample_steps``), replay-buffer entries and test images
    side by side in RUN_DIR/samples.png; returns its path."""
    samples, buffer, test, s, meta = _draw_pixel(run_dir, n, seed, n_steps, which, device)
    return plot_panels([(f"pixel EBM step {meta['step']}: chains", samples), ("replay buffer", buffer),
                        ("held-out data", test.tensors()[0][:n])], os.path.join(run_dir, "samples.png"))


def evaluate_pixel_run(run_dir: str | os.PathLike, *, n: int = 1000, seed: int = 123, n_steps: int | None = None,
                       which: str = "best", device: str = "cpu") -> dict:
    """Sample quality of n chains from noise and of n replay-buffer entries against the test split; written to
    RUN_DIR/evaluation.json and returned."""
    samples, buffer, test, s, meta = _draw_pixel(run_dir, n, seed, n_steps, which, device)
    chains_q = sample_quality(samples, test, None, s["data_dir"], s["seed"])
    buffer_q = sample_quality(buffer, test, chains_q["mmd_bandwidths"], s["data_dir"], s["seed"])
    result = {"data": s["data"], "model": "pixel-ebm", "ebm_step": meta["step"], "which": which, "seed": seed,
              "n_steps": n_steps or s["sample_steps"], "chains": chains_q, "buffer": buffer_q}
    write_json(os.path.join(run_dir, "evaluation.json"), result)
    return result


def format_pixel_evaluation(result: dict) -> str:
    """A table of the chains' and the buffer's metrics."""
    keys = [k for k in ("mmd2", "energy_distance", "frechet_distance") if k in result["chains"]]
    lines = [f"pixel EBM on {result['data']} (step {result['ebm_step']}, chains of {result['n_steps']} Langevin steps "
             f"from noise; {result['chains']['n_samples']} samples vs {result['chains']['n_reference']} test images)",
             f"{'':<8}" + "".join(f"{k:>18}" for k in keys)]
    lines += [f"{name:<8}" + "".join(f"{result[name][k]:>18.5f}" for k in keys) for name in ("chains", "buffer")]
    if "frechet_features" in result["chains"]:
        lines.append(result["chains"]["frechet_features"])
    return "\n".join(lines)
