"""Sample quality of a run: metrics against held-out data and the plots (scatter for 2-D toys, grids for images)."""

from __future__ import annotations

import io
import os

import torch

from fastlangevin._io import atomic_write_bytes

from fastlangevin.metrics import default_bandwidths, energy_distance, mmd2, mode_coverage


def sample_quality(samples: torch.Tensor, reference, bandwidths: list[float] | None = None,
                   data_dir: str | os.PathLike | None = None, data_seed: int = 0, *, inception: bool = False) -> dict:
    """Metrics of ``samples`` (N, *data_shape) against ``reference`` (an ArrayDataset of held-out data).

    Always: ``mmd2`` (unbiased squared MMD, Gaussian kernels at ``bandwidths``; default: fractions of the reference's
    median pairwise distance, see ``fastlangevin.metrics.mmd``) and ``energy_distance`` — on raw coordinates for
    toys, on flattened pixels for images. Where the data has known modes (25-Gaussians): ``modes_covered``,
    ``n_modes`` and ``high_quality`` (share within 3 std of a mode). Images: ``frechet_distance`` on the features of
    fastlangevin's classifier for the data set (trained on ``make_dataset(reference.name, data_dir, "train",
    seed=data_seed)`` once and cached; ``frechet_features`` names it) and, with ``inception``, the standard
    ``inception_fid`` where a backend runs offline, else ``inception_fid_skipped`` with the reason.
    Images are scored as they would be saved, clamped to the data's [0, 1] pixel range (GLOW's G(z) is not clamped
    inside the model, so that its chains keep their gradients; a few runaway pixels would otherwise decide the
    Fréchet distance); ``out_of_range`` is the share of pixel values that were outside it.
    """
    from fastlangevin.metrics.frechet import frechet_classifier_distance
    from fastlangevin.metrics.inception import InceptionUnavailable, inception_fid

    x_ref = reference.tensors()[0]
    samples = samples.detach().cpu().float()
    image = len(reference.sample_shape) == 3
    out = {"n_samples": int(samples.shape[0]), "n_reference": int(x_ref.shape[0])}
    if image:
        out["out_of_range"] = float(((samples < 0) | (samples > 1)).float().mean())
        samples = samples.clamp(0, 1)
    if bandwidths is None:
        bandwidths = default_bandwidths(x_ref)
    out.update(mmd2=mmd2(samples, x_ref, bandwidths), energy_distance=energy_distance(samples, x_ref),
               mmd_bandwidths=[float(b) for b in bandwidths])
    if getattr(reference, "modes", None) is not None:
        cov = mode_coverage(samples, reference.modes, reference.mode_std)
        out.update(modes_covered=cov.modes_covered, n_modes=cov.n_modes, high_quality=cov.high_quality)
    if image:
        out["frechet_distance"], out["frechet_features"] = frechet_classifier_distance(samples, reference, data_dir,
                                                                                       data_seed=data_seed)
        if inception:
            try:
                out["inception_fid"], out["inception_features"] = inception_fid(samples, x_ref)
            except InceptionUnavailable as e:
                out["inception_fid_skipped"] = str(e)
    return out


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path: str | os.PathLike) -> str:
    """Write the matplotlib figure ``fig`` as a PNG at ``path`` atomically (a killed run leaves the previous figure,
    never a torn one), close it, and return the path."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    _pyplot().close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return os.fspath(path)


def image_grid(x: torch.Tensor, n_cols: int = 8):
    """(N, C, H, W) in [0, 1] → an (rows·H, n_cols·W, C) numpy array (C squeezed for grey)."""
    x = x.detach().cpu().float().clamp(0, 1)[: n_cols * max(1, min(8, x.shape[0] // n_cols))]
    n, c, h, w = x.shape
    rows = -(-n // n_cols)
    grid = torch.ones(c, rows * h, n_cols * w)
    for i in range(n):
        r, k = divmod(i, n_cols)
        grid[:, r * h:(r + 1) * h, k * w:(k + 1) * w] = x[i]
    grid = grid.permute(1, 2, 0).numpy()
    return grid[..., 0] if c == 1 else grid


def plot_panels(panels: list[tuple[str, torch.Tensor]], path: str | os.PathLike, reference=None,
                n_cols: int = 8) -> str | None:
    """Side-by-side panels (title, samples): scatter plots for 2-D samples (the reference's modes marked as red
    crosses), image grids of ``n_cols`` columns otherwise. Returns the path, or None when matplotlib is missing."""
    try:
        plt = _pyplot()
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)")
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 4), squeeze=False)
    for ax, (title, x) in zip(axes[0], panels):
        x = x.detach().cpu().float()
        if x.dim() == 2:
            ax.scatter(x[:, 0], x[:, 1], s=1, alpha=0.3)
            if reference is not None and getattr(reference, "modes", None) is not None:
                ax.scatter(reference.modes[:, 0], reference.modes[:, 1], s=12, c="red", marker="x")
            ax.set(xlim=(-2.2, 2.2), ylim=(-2.2, 2.2), aspect="equal")
        else:
            ax.imshow(image_grid(x, n_cols), cmap="gray", vmin=0, vmax=1)
            ax.axis("off")
        ax.set_title(title)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_transition(snapshots: list[tuple[int, torch.Tensor]], path: str | os.PathLike, what: str,
                    reference=None) -> str | None:
    """The Langevin-transition figure of ``snapshots`` [(step k, samples at k)]: for images one grid, a chain per
    row and a recorded step per column (titled "``what`` at steps …"); for 2-D points a scatter per step."""
    steps = [k for k, _ in snapshots]
    if snapshots[0][1].dim() == 4:
        grid = torch.stack([x for _, x in snapshots], 1).flatten(0, 1)
        return plot_panels([(f"{what} at steps {', '.join(map(str, steps))}", grid)], path, n_cols=len(steps))
    return plot_panels([(f"step {k}", x) for k, x in snapshots], path, reference)
