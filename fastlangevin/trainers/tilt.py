"""``tilt``, ``sample``, ``evaluate``: the latent EBM of the exponential-tilting paper on a frozen backbone.

Target: p_θ(z) ∝ N(z; 0, I)·exp(−E_θ(G(z))) — the energy acts on the generated sample G(z), so every Langevin
step back-propagates through the frozen generator. Learning (maximum likelihood with short-run chains):

    loss = mean E(x⁺) − mean E(G(z_K)) + reg · (mean E(x⁺)² + mean E(G(z_K))²)

x⁺ are real training data (the paper, ``positives="data"``) or the backbone's reconstructions G(encode(x))
(``positives="reconstruction"``, which keeps the energy from learning what the decoder can never produce). z_K comes
from ``fl.langevin`` with the Gaussian prior, started from fresh N(0, I) draws every step (non-persistent), ε = 0.01,
60 steps (the paper's App. B.2). Early stopping on sample quality: every ``eval_every`` steps the tilted model is
sampled with the sampling chain (100 steps) and scored against a validation draw (``stop_on``: MMD², energy distance,
for data with known modes the high-quality share, for images the Fréchet distance on fastlangevin's classifier
features); the best is kept in RUN_DIR/ebm_best.safetensors, the latest (with optimizer state, for ``resume``) in
RUN_DIR/ebm.safetensors.
"""

from __future__ import annotations

import math
import os
import time

import torch
from tqdm.auto import tqdm

from fastlangevin.data import TOY_DATASETS, make_dataset
from fastlangevin.trainers import distributed
from fastlangevin.trainers.base import batch_indices, load_base
from fastlangevin.trainers.chains import SAMPLERS, ChainTimer, run_chain
from fastlangevin.trainers.checkpoint import load_checkpoint, read_json, save_checkpoint, write_json
from fastlangevin.trainers.energy_nets import make_energy
from fastlangevin.trainers.quality import plot_panels, sample_quality

EBM_LAST, EBM_BEST = "ebm.safetensors", "ebm_best.safetensors"
POSITIVES = ("data", "reconstruction")
# early-stopping metrics, +1: higher is better
STOP_ON = {"mmd2": -1.0, "energy_distance": -1.0, "high_quality": 1.0, "frechet_distance": -1.0}


def tilted_energy(energy, base):
    """z ↦ E(G(z)): the latent energy ``fl.langevin`` samples (with its N(0, I) prior)."""
    return lambda z: energy(base.generate(z))


def sample_tilted(base, energy, z0: torch.Tensor, n_steps: int, step_size: float, seed: int,
                  batch_size: int = 1000, clip_grad: float | None = None) -> torch.Tensor:
    """G(z_K) for chains from ``z0`` (N, latent_dim), run in batches of ``batch_size``: (N, *data_shape)."""
    out = []
    for i, chunk in enumerate(z0.split(batch_size)):
        z = run_chain(tilted_energy(energy, base), chunk, n_steps, step_size, prior="normal", seed=seed + i,
                      clip_grad=clip_grad)
        with torch.no_grad():
            out.append(base.generate(z).cpu())
    return torch.cat(out)


def validation_set(name: str, data_dir: str | None, seed: int, n: int):
    """Held-out data for early stopping, kept apart from the test split that ``evaluate`` reports on: an
    independent draw for toys, the last n training samples for the other data sets."""
    if name in TOY_DATASETS:
        return make_dataset(name, split="test", seed=seed + 1, n_samples=n)
    train = make_dataset(name, data_dir, "train", seed=seed)
    return train.subset(slice(max(0, len(train) - n), None))


def contrastive_step(ctx, energy_loss, optimizer, x_pos: torch.Tensor, x_neg: torch.Tensor, reg: float,
                     where: str) -> tuple[float, float]:
    """One maximum-likelihood update of an energy on this rank's positives x⁺ and negatives x⁻ (B/N, ...):
    loss = mean E(x⁺) − mean E(x⁻) + reg·(mean E(x⁺)² + mean E(x⁻)²), one forward of ``energy_loss`` (the energy
    as ``ctx.wrap`` returns it) on both. Returns the loss and the gap mean E(x⁻) − mean E(x⁺), averaged over ranks;
    a non-finite loss raises FloatingPointError naming ``where`` on every rank."""
    e_pos, e_neg = energy_loss(torch.cat([x_pos, x_neg])).split([len(x_pos), len(x_neg)])
    loss = e_pos.mean() - e_neg.mean() + reg * (e_pos.pow(2).mean() + e_neg.pow(2).mean())
    loss_value = ctx.all_reduce_mean(loss.item())
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"{where}: the loss is {loss_value}; lower --lr or raise --reg")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss_value, ctx.all_reduce_mean((e_neg.mean() - e_pos.mean()).item())


def show_progress(bar, loss_value: float, gap: float, n_samples: int, elapsed: float, timer: ChainTimer) -> None:
    """Loss, energy gap, samples per second and the chains' share of the time on the progress bar."""
    bar.set_postfix(loss=f"{loss_value:.3f}", gap=f"{gap:.3f}", samples_s=f"{n_samples / elapsed:.0f}",
                    chain=f"{timer.seconds / elapsed:.0%}")


class EarlyStopping:
    """Early stopping on sample quality: ``update(step, quality)`` records an evaluation (``quality``: the dict of
    ``sample_quality``) and returns whether it is the best so far by ``stop_on`` (a key of ``STOP_ON``);
    ``stop(step)`` says whether ``patience`` evaluations (``eval_every`` steps apart) went by without a better one
    (never when ``patience`` is None). ``best`` = {"step", "metric", "value"} (resumable from metrics.json)."""

    def __init__(self, stop_on: str, patience: int | None, eval_every: int, best: dict | None = None):
        if stop_on not in STOP_ON:
            raise ValueError(f"stop_on must be one of {tuple(STOP_ON)}, got {stop_on!r}")
        self.stop_on, self.patience, self.eval_every = stop_on, patience, eval_every
        self.best = best or {"step": None, "metric": stop_on, "value": None}

    def check_data(self, val_set) -> None:
        """A clear error when the validation data cannot give ``stop_on``."""
        if self.stop_on == "high_quality" and val_set.modes is None:
            raise ValueError(f"stop_on='high_quality' needs data with known modes (25gaussians), not "
                             f"{val_set.name}; use 'mmd2' or 'energy_distance'")
        if self.stop_on == "frechet_distance" and len(val_set.sample_shape) != 3:
            raise ValueError(f"stop_on='frechet_distance' needs image data, not {val_set.name}; use 'mmd2' or "
                             f"'energy_distance'")

    def update(self, step: int, quality: dict) -> bool:
        value = quality[self.stop_on]
        if self.best["value"] is None or STOP_ON[self.stop_on] * (value - self.best["value"]) > 0:
            self.best = {"step": step, "metric": self.stop_on, "value": value}
            return True
        return False

    def stop(self, step: int, write=print) -> bool:
        """Whether to stop after the evaluation at ``step``; says why through ``write`` when it does."""
        stalled = self.best["step"] is not None and step - self.best["step"] >= (self.patience or 0) * self.eval_every
        if self.patience is not None and stalled:
            write(f"early stop at step {step}: no better validation {self.stop_on} in {self.patience} evaluations")
            return True
        return False

    def describe(self, step: int, quality: dict) -> str:
        """The progress line of an evaluation."""
        modes = (f", high-quality {quality['high_quality']:.1%}, modes {quality['modes_covered']}/{quality['n_modes']}"
                 if "high_quality" in quality else "")
        fcd = f", fcd {quality['frechet_distance']:.5g}" if "frechet_distance" in quality else ""
        return (f"step {step}: validation mmd2 {quality['mmd2']:.5f}, energy distance {quality['energy_distance']:.5f}"
                f"{modes}{fcd} (best {self.stop_on} {self.best['value']:.5g} at step {self.best['step']})")


def load_energy(run_dir, data_shape, tilt_config: dict, which: str = "best", device="cpu"):
    """The run's energy: ``which="best"`` (ebm_best, falling back to the last) or ``"last"``; frozen, eval mode."""
    energy = make_energy(data_shape, tilt_config["energy_width"], tilt_config["energy_depth"])
    path = os.path.join(run_dir, EBM_BEST if which == "best" else EBM_LAST)
    if which == "best" and not os.path.exists(path):
        path = os.path.join(run_dir, EBM_LAST)
    meta = load_checkpoint(path, energy)
    return energy.to(device).eval().requires_grad_(False), meta


def train_tilt(run_dir: str | os.PathLike, *, steps: int = 500, batch_size: int = 256, lr: float = 1e-4,
               betas: tuple[float, float] = (0.5, 0.999), n_steps: int = 60, step_size: float = 0.01,
               sample_steps: int = 100, reg: float = 0.1, positives: str = "data", energy_width: int | None = None,
               energy_depth: int | None = None, eval_every: int = 50, n_eval: int = 2000,
               patience: int | None = None, stop_on: str = "mmd2", seed: int = 0, sampler: str = "library",
               clip_grad: float | None = None, resume: bool = False, device: str = "cpu",
               progress: bool = True) -> dict:
    """Train the latent EBM on RUN_DIR's frozen backbone; returns the training metrics (also in metrics.json).

    ``stop_on``: the validation metric that picks ebm_best (a key of ``STOP_ON``). ``patience``: stop after that many
    evaluations without a better one (None: run all ``steps``; the best checkpoint is kept either way).
    ``sampler``: "library" (``fl.langevin``) or "eager" (the hand-written loop) for the training chains.
    ``clip_grad``: bound each chain sample's ‖∇_z E(G(z))‖ (training, evaluation and ``sample``/``evaluate``
    chains; the paper mentions gradient clipping; a flow's inverse can otherwise throw a chain to where G overflows).
    Under ``torchrun`` each of N ranks takes B/N positives and runs B/N of the negative chains (its own noise seed,
    so the run equals the single-process one in distribution); DDP averages the gradients; rank 0 evaluates, writes
    the run directory and decides when to stop."""
    if positives not in POSITIVES:
        raise ValueError(f"positives must be one of {POSITIVES}, got {positives!r}")
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
    with distributed.setup(device) as ctx:
        return _train_tilt(ctx, run_dir, steps=steps, batch_size=batch_size, lr=lr, betas=betas, n_steps=n_steps,
                           step_size=step_size, sample_steps=sample_steps, reg=reg, positives=positives,
                           energy_width=energy_width, energy_depth=energy_depth, eval_every=eval_every,
                           n_eval=n_eval, patience=patience, stop_on=stop_on, seed=seed, sampler=sampler,
                           clip_grad=clip_grad, resume=resume, progress=progress)


def _train_tilt(ctx: distributed.DistributedContext, run_dir, *, steps, batch_size, lr, betas, n_steps, step_size,
                sample_steps, reg, positives, energy_width, energy_depth, eval_every, n_eval, patience, stop_on, seed,
                sampler, clip_grad, resume, progress) -> dict:
    device = ctx.device
    base, config = load_base(run_dir, device)
    if resume:
        saved = config.get("tilt")
        if saved is None or not os.path.exists(os.path.join(run_dir, EBM_LAST)):
            raise FileNotFoundError(f"--resume: no tilt run in {run_dir}; start without --resume")
        # the saved settings win, so the resumed run is the one that was interrupted (steps may only grow)
        batch_size, lr, betas = saved["batch_size"], saved["lr"], tuple(saved["betas"])
        n_steps, step_size, sample_steps = saved["n_steps"], saved["step_size"], saved["sample_steps"]
        reg, positives, seed = saved["reg"], saved["positives"], saved["seed"]
        energy_width, energy_depth = saved["energy_width"], saved["energy_depth"]
        eval_every, n_eval, steps = saved["eval_every"], saved["n_eval"], max(steps, saved["steps"])
        patience, stop_on, clip_grad = saved.get("patience"), saved.get("stop_on", "mmd2"), saved.get("clip_grad")
    ctx.check_batch(batch_size)
    stopping = EarlyStopping(stop_on, patience, eval_every)
    torch.manual_seed(seed)
    b = config["base"]
    train_set = make_dataset(b["data"], b["data_dir"], "train", seed=b["seed"], n_samples=b["n_train"])
    val_set = validation_set(b["data"], b["data_dir"], b["seed"], n_eval)
    stopping.check_data(val_set)
    x_train = train_set.tensors()[0]
    energy = make_energy(base.data_shape, energy_width, energy_depth).to(device)
    tilt_config = dict(steps=steps, batch_size=batch_size, lr=lr, betas=list(betas), n_steps=n_steps,
                       step_size=step_size, sample_steps=sample_steps, reg=reg, positives=positives, seed=seed,
                       energy_width=energy_width, energy_depth=energy_depth, eval_every=eval_every, n_eval=n_eval,
                       patience=patience, stop_on=stop_on, sampler=sampler, clip_grad=clip_grad, energy=type(energy).__name__)
    optimizer = torch.optim.Adam(energy.parameters(), lr=lr, betas=tuple(betas))
    metrics_path = os.path.join(run_dir, "metrics.json")
    all_metrics = read_json(metrics_path) if os.path.exists(metrics_path) else {}
    start, history = 0, []
    if resume:
        start = load_checkpoint(os.path.join(run_dir, EBM_LAST), energy, optimizer)["step"]
        previous = all_metrics.get("tilt_training", {})
        history, stopping.best = previous.get("history", []), previous.get("best", stopping.best)
        if ctx.is_main:
            print(f"resuming tilt from step {start} of {steps}")
    config["tilt"] = tilt_config
    if ctx.is_main:
        write_json(os.path.join(run_dir, "config.json"), config)
    energy_loss = ctx.wrap(energy)  # the training step's forward; chains and evaluation use ``energy`` itself

    # Fixed starting points for the validation chains, so successive evaluations compare energies, not noise.
    z_val = torch.randn(len(val_set), base.latent_dim, generator=torch.Generator().manual_seed(seed + 7)).to(device)
    bandwidths, metrics = None, all_metrics.get("tilt_training", {"history": history, "best": stopping.best})
    timer, begin, eval_seconds = ChainTimer(device), time.perf_counter(), 0.0
    bar = tqdm(range(start, steps), initial=start, total=steps, desc="tilt", disable=not (progress and ctx.is_main),
               mininterval=2.0, dynamic_ncols=True)
    for step in bar:
        x_pos = ctx.shard(x_train[batch_indices(len(x_train), batch_size, seed + 1, step)]).to(device)
        if positives == "reconstruction":
            with torch.no_grad():
                x_pos = base.generate(base.encode(x_pos))
        g = torch.Generator().manual_seed(seed * 1_000_003 + step)
        z0 = ctx.shard(torch.randn(batch_size, base.latent_dim, generator=g)).to(device)
        with timer:
            z_neg = run_chain(tilted_energy(energy, base), z0, n_steps, step_size, prior="normal",
                              seed=ctx.rank_seed(seed * 1_000_003 + step), sampler=sampler, clip_grad=clip_grad)
        with torch.no_grad():
            x_neg = base.generate(z_neg)
        loss_value, gap = contrastive_step(ctx, energy_loss, optimizer, x_pos, x_neg, reg, f"tilt step {step}")
        show_progress(bar, loss_value, gap, (step + 1 - start) * batch_size, time.perf_counter() - begin, timer)
        if (step + 1) % eval_every == 0 or step + 1 == steps:
            stop, eval_start = False, time.perf_counter()
            if ctx.is_main:
                samples = sample_tilted(base, energy, z_val, sample_steps, step_size, seed=seed + 11,
                                        clip_grad=clip_grad)
                quality = sample_quality(samples, val_set, bandwidths, b["data_dir"], b["seed"])
                bandwidths = quality["mmd_bandwidths"]
                entry = {"step": step + 1, "loss": loss_value, "energy_gap": gap, **quality}
                entry.pop("mmd_bandwidths")
                history.append(entry)
                if stopping.update(step + 1, quality):
                    save_checkpoint(os.path.join(run_dir, EBM_BEST), energy, None, step + 1,
                                    extra={stop_on: quality[stop_on]})
                save_checkpoint(os.path.join(run_dir, EBM_LAST), energy, optimizer, step + 1)
                bar.write(stopping.describe(step + 1, quality))
                eval_seconds += time.perf_counter() - eval_start
                metrics = {"history": history, "best": stopping.best, "seconds": time.perf_counter() - begin,
                           "eval_seconds": eval_seconds, "steps_run": step + 1 - start,
                           "chain_seconds": timer.seconds, "positives": positives, "sampler": sampler,
                           "world_size": ctx.world_size}
                all_metrics["tilt_training"] = metrics
                write_json(metrics_path, all_metrics)
                stop = stopping.stop(step + 1, bar.write)
            if ctx.broadcast(stop):  # every rank stops at the same step
                break
    bar.close()
    return ctx.broadcast(metrics)


def _load_tilted(run_dir, which: str, device: str):
    """The run's frozen backbone and energy: (base, energy, config, energy checkpoint metadata)."""
    base, config = load_base(run_dir, device)
    if "tilt" not in config:
        raise FileNotFoundError(f"{run_dir} has no tilted model; run `fastlangevin tilt {run_dir}` first")
    energy, meta = load_energy(run_dir, base.data_shape, config["tilt"], which, device)
    return base, energy, config, meta


def _draw(base, energy, tilt_config: dict, n: int, seed: int, n_steps: int | None, device: str):
    """n samples of the base and of the tilted model from the same z0: (before, after), each (n, *data_shape)."""
    z0 = torch.randn(n, base.latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        before = base.generate(z0).cpu()
    after = sample_tilted(base, energy, z0, n_steps or tilt_config["sample_steps"], tilt_config["step_size"],
                          seed=seed, clip_grad=tilt_config.get("clip_grad"))
    return before, after


def langevin_transition(base, energy, z0: torch.Tensor, at_steps, step_size: float, seed: int,
                        clip_grad: float | None = None):
    """One tilted chain per row of z0, recorded at ``at_steps`` (increasing, e.g. 0, 10, 25, 50, 100): a list of
    (k, G(z_k)). The chain runs in segments between the recorded steps (a new noise seed per segment)."""
    out, z, done = [], z0, 0
    for i, k in enumerate(at_steps):
        if k > done:
            z = run_chain(tilted_energy(energy, base), z, k - done, step_size, prior="normal", seed=seed + 1 + i,
                          clip_grad=clip_grad)
            done = k
        with torch.no_grad():
            out.append((k, base.generate(z).cpu()))
    return out


def sample_run(run_dir: str | os.PathLike, *, n: int = 2000, seed: int = 0, n_steps: int | None = None,
               which: str = "best", device: str = "cpu") -> str | None:
    """Draw n samples from the base and the tilted model (the same z0; the tilted chain runs ``n_steps``, default
    the run's 100) and write RUN_DIR/samples_before_after.png side by side, and RUN_DIR/langevin_transition.png:
    the tilted chains at a few steps from 0 to ``n_steps`` (the paper's Figure 3; for images 8 chains as rows).
    Returns the first PNG's path."""
    base, energy, config, meta = _load_tilted(run_dir, which, device)
    b, t = config["base"], config["tilt"]
    before, after = _draw(base, energy, t, n, seed, n_steps, device)
    data = make_dataset(b["data"], b["data_dir"], "test", seed=b["seed"],
                        n_samples=n if b["data"] in TOY_DATASETS else None)
    path = plot_panels([(f"base {b['model']}", before), (f"tilted (EBM step {meta['step']})", after),
                        ("held-out data", data.tensors()[0][:n])],
                       os.path.join(run_dir, "samples_before_after.png"), data)
    total = n_steps or t["sample_steps"]
    at_steps = sorted({0, total // 10, total // 4, total // 2, total})
    image = len(base.data_shape) == 3
    z0 = torch.randn(8 if image else min(n, 1000), base.latent_dim,
                     generator=torch.Generator().manual_seed(seed + 1)).to(device)
    snapshots = langevin_transition(base, energy, z0, at_steps, t["step_size"], seed, t.get("clip_grad"))
    path_t = os.path.join(run_dir, "langevin_transition.png")
    if image:  # one grid: a chain per row, a recorded step per column
        grid = torch.stack([x for _, x in snapshots], 1).flatten(0, 1)
        plot_panels([(f"tilted chains at steps {', '.join(map(str, at_steps))}", grid)], path_t,
                    n_cols=len(at_steps))
    else:
        plot_panels([(f"step {k}", x) for k, x in snapshots], path_t, data)
    return path


def evaluate_run(run_dir: str | os.PathLike, *, n: int = 5000, seed: int = 123, n_steps: int | None = None,
                 which: str = "best", device: str = "cpu", figure: str | os.PathLike | None = None) -> dict:
    """Sample quality of the base and the tilted model against the test split (n samples each, the same z0);
    written to RUN_DIR/evaluation.json and returned. ``figure``: also plot the scored samples there, as the paper's
    Figure 1 (held-out data | base | base + latent EBM)."""
    base, energy, config, meta = _load_tilted(run_dir, which, device)
    before, after = _draw(base, energy, config["tilt"], n, seed, n_steps, device)
    b = config["base"]
    test = make_dataset(b["data"], b["data_dir"], "test", seed=b["seed"],
                        n_samples=n if b["data"] in TOY_DATASETS else None)
    kwargs = dict(data_dir=b["data_dir"], data_seed=b["seed"], inception=True)
    base_q = sample_quality(before, test, **kwargs)
    tilted_q = sample_quality(after, test, base_q["mmd_bandwidths"], **kwargs)
    result = {"data": b["data"], "model": b["model"], "ebm_step": meta["step"], "which": which, "seed": seed,
              "n_steps": n_steps or config["tilt"]["sample_steps"], "base": base_q, "tilted": tilted_q}
    write_json(os.path.join(run_dir, "evaluation.json"), result)
    if figure is not None:
        plot_panels([("data (held out)", test.tensors()[0][:n]), (b["model"].upper(), before),
                     (f"{b['model'].upper()} + latent EBM", after)], figure, test)
    return result


def format_evaluation(result: dict) -> str:
    """A table of base vs tilted metrics."""
    keys = [k for k in ("high_quality", "modes_covered", "mmd2", "energy_distance", "frechet_distance",
                        "inception_fid") if k in result["base"]]
    lines = [f"{result['model']} on {result['data']}: base vs tilted (EBM step {result['ebm_step']}, "
             f"{result['n_steps']} Langevin steps, {result['base']['n_samples']} samples vs "
             f"{result['base']['n_reference']} test points)",
             f"{'':<8}" + "".join(f"{k:>18}" for k in keys)]
    for name in ("base", "tilted"):
        row = result[name]
        cells = []
        for k in keys:
            v = row[k]
            cells.append(f"{v:>18.1%}" if k == "high_quality" else f"{str(v) + '/' + str(row['n_modes']):>18}"
                         if k == "modes_covered" else f"{v:>18.5f}")
        lines.append(f"{name:<8}" + "".join(cells))
    lines += [result["base"][k] for k in ("frechet_features", "inception_features", "inception_fid_skipped")
              if k in result["base"]]
    return "\n".join(lines)
