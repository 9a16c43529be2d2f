"""``fastlangevin demo``: the exponential-tilting paper's toy experiment (its Figure 1) in a few minutes on a CPU.

1. Train a VAE on 25-Gaussians (or the Swiss roll), 2-D latent.
2. Freeze it and train a latent EBM E(G(z)) with short-run Langevin chains run by ``fl.langevin``.
3. Score both against held-out data (high-quality share and modes covered for 25-Gaussians, MMD², energy distance)
   and write the Figure-1-style plot: data | VAE | VAE + latent EBM.

``fastlangevin demo --backends`` instead samples a fixed 25-Gaussian mixture with every available backend, to show
that they agree and what each costs.
"""

from __future__ import annotations

import os
import time

import torch

import fastlangevin as fl
from fastlangevin.backends import AUTO_ORDER, backend_status
from fastlangevin.energies import GaussianMixtureEnergy, grid_means
from fastlangevin.metrics import mode_coverage

# The toy experiment's settings, chosen by measurement (docs/RESULTS.md, "`fastlangevin demo`"): a VAE with 128-wide
# layers, then the latent EBM (64 wide) trained with short chains of small steps (ε = 2e-3, 40 steps: the paper's
# ε = 0.01 is too coarse for this latent geometry), 6 000 iterations of 256, Adam 5e-3, the paper's regulariser 0.1
# (0.01 learns faster but blew up on 2 of 3 seeds). Sampled as trained (40-step chains from N(0, I)), then 10
# noise-free steps that pull the last steps' noise off (+10 to +15 points of high-quality share). Early stopping on
# the high-quality share where the data has modes (MMD² and the energy distance wobble by ±30 % between evaluations
# while the tilt sharpens, and picked under-trained EBMs), else on MMD². The chains run fused: E(G(z)) is one MLP.
BASE = dict(steps=3000, width=128, batch_size=256, lr=1e-3)
TILT = dict(steps=6000, batch_size=256, lr=5e-3, n_steps=40, step_size=2e-3, sample_steps=40, denoise_steps=10,
            energy_width=64, energy_depth=3, eval_every=1000, n_eval=2000)
TOY = dict(base=BASE, tilt=TILT, n_test=5000)
QUICK = dict(base=dict(BASE, steps=100), tilt=dict(TILT, steps=10, batch_size=64, energy_width=16, eval_every=10,
                                                   n_eval=300), n_test=500)


def run_demo(out_dir: str = "demo-out", data: str = "25gaussians", seed: int = 0, device: str = "cpu",
             quick: bool = False, progress: bool = True, overwrite: bool = False) -> dict:
    """Train the VAE and its latent EBM in ``out_dir/<data>`` (a run directory the trainer commands can read),
    print both models' metrics, write ``out_dir/figure1_<data>.png``; returns the evaluation dict. A run folder
    that holds a run already is refused (ValueError, nothing written) unless ``overwrite``."""
    from fastlangevin.trainers import evaluate_run, format_evaluation, train_base, train_tilt
    from fastlangevin.trainers.base import BaseTrainer
    from fastlangevin.trainers.distributed import check_device
    from fastlangevin.trainers.loop import refuse_occupied
    from fastlangevin.trainers.run_folder import RunFolder

    check_device(device)  # before anything is printed or written
    settings = QUICK if quick else TOY
    base, tilt = settings["base"], settings["tilt"]
    run_dir = os.path.join(out_dir, data)
    refuse_occupied(BaseTrainer, RunFolder(run_dir), resume=False, overwrite=overwrite)
    stop_on = "high_quality" if data == "25gaussians" else "mmd2"
    print(f"The exponential-tilting paper's toy experiment on {data}: a VAE, then a latent EBM on it.")
    begin = time.perf_counter()
    print(f"\n[1/3] VAE, {base['steps']} steps")
    train_base("vae", data, run_dir, **base, seed=seed, checkpoint_every=base["steps"], device=device,
               progress=progress, overwrite=overwrite)
    print(f"\n[2/3] latent EBM E(G(z)), {tilt['steps']} steps of {tilt['n_steps']}-step chains (ε = "
          f"{tilt['step_size']:g}, batch {tilt['batch_size']}); the EBM with the best validation {stop_on} is kept")
    metrics = train_tilt(run_dir, **tilt, stop_on=stop_on, seed=seed, device=device, progress=progress,
                         overwrite=overwrite)
    print(f"\n[3/3] evaluation: base and tilted samples from the same z0 ({tilt['sample_steps']}-step chains, then "
          f"{tilt['denoise_steps']} noise-free steps) vs held-out data")
    figure = os.path.join(out_dir, f"figure1_{data}.png")
    result = evaluate_run(run_dir, n=settings["n_test"], seed=seed + 123, device=device, figure=figure)
    print(format_evaluation(result))
    chain_share = metrics["chain_seconds"] / max(metrics["seconds"], 1e-9)
    print(f"EBM training: {metrics['seconds']:.0f} s, {chain_share:.0%} of it inside fl.langevin "
          f"({metrics['chain_backends']['negative']}); total {time.perf_counter() - begin:.0f} s")
    if os.path.exists(figure):
        print(f"wrote {figure}")
    return result


def run_backend_demo(out_dir: str = "demo-out", n_samples: int = 5_000, n_steps: int = 200, seed: int = 0,
                     device: str = "cpu") -> dict:
    """Sample a 2-D mixture of 25 Gaussians (std 0.1, grid spacing 1) from N(0, I) starts with every available
    backend; print each chain's time and modes covered, write ``out_dir/demo_backends.png``."""
    from fastlangevin.trainers.distributed import check_device

    mode_std, step_size = 0.1, 0.002  # ε·λ = 0.2 at the modes' precision λ = 1/0.1²: stable, small ULA bias
    device = check_device(device)
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"seed must be an int >= 0, got {seed!r} (--seed)")
    os.makedirs(out_dir, exist_ok=True)
    means = grid_means(5, 1.0)
    energy = GaussianMixtureEnergy(means, mode_std).to(device)
    z0 = torch.randn(n_samples, 2, generator=torch.Generator().manual_seed(seed)).to(device)
    print(f"25-Gaussian mixture (grid spacing 1, std {mode_std}), {n_samples} chains from N(0, I), "
          f"{n_steps} steps, step_size {step_size}, flat prior, device {device}")
    print(f"{'backend':<10} {'time (s)':>9} {'modes':>6} {'high-quality':>13}")
    results, samples = {}, {}
    for backend in AUTO_ORDER[device.type]:
        status = backend_status(backend, device.type)
        if not status.available:
            print(f"{backend:<10} skipped: {status.reason}")
            continue
        fl.langevin(energy, z0[:16], 2, step_size, prior=None, seed=seed, backend=backend)  # warm-up
        start = time.perf_counter()
        z = fl.langevin(energy, z0, n_steps, step_size, prior=None, seed=seed, backend=backend)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        cov = mode_coverage(z, means, mode_std)
        results[backend] = dict(seconds=seconds, modes_covered=cov.modes_covered, high_quality=cov.high_quality)
        samples[backend] = z.cpu()
        print(f"{backend:<10} {seconds:>9.3f} {cov.modes_covered:>3}/{cov.n_modes} {cov.high_quality:>12.1%}")
    start_cov = mode_coverage(z0, means, mode_std)
    print(f"{'N(0,I)':<10} {'':>9} {start_cov.modes_covered:>3}/{start_cov.n_modes} "
          f"{start_cov.high_quality:>12.1%}   (the starting points)")
    path = _plot_backends(z0.cpu(), samples, means, os.path.join(out_dir, "demo_backends.png"))
    if path:
        print(f"wrote {path}")
    return results


def _plot_backends(z0, samples: dict, means, path: str) -> str | None:
    from fastlangevin.trainers.quality import _pyplot, save_figure
    try:
        plt = _pyplot()
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)")
        return None
    panels = [("start: N(0, I)", z0)] + [(f"after Langevin ({b})", z) for b, z in samples.items()]
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (title, z) in zip(axes[0], panels):
        ax.scatter(z[:, 0], z[:, 1], s=1, alpha=0.3)
        ax.scatter(means[:, 0], means[:, 1], s=12, c="red", marker="x")
        ax.set(xlim=(-3, 3), ylim=(-3, 3), title=title, aspect="equal")
    fig.tight_layout()
    return save_figure(fig, path)
