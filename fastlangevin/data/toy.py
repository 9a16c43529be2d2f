"""2-D toy data of the discriminator-optimal-transport code (Tanaka 2019, ``demo_2d.ipynb``), which the exponential
tilting paper follows: 25-Gaussians and the Swiss roll."""

from __future__ import annotations

import numpy as np
import sklearn.datasets
import torch

from fastlangevin.data.base import ArrayDataset, check_split

TOY_DATASETS = ("25gaussians", "swissroll")
_SCALE_25 = 2.828  # DOT divides by this ("stdev")
_STD_25 = 0.05  # per-mode standard deviation before the division
_SCALE_SWISS = 7.5  # DOT: "stdev plus a little"
_STREAM = {"train": 0, "test": 1, "validation": 2}  # each split's random stream (validation came last)


def twenty_five_gaussians_modes() -> tuple[torch.Tensor, float]:
    """Mode centres (25, 2) float32 — the grid {−4, −2, 0, 2, 4}² / 2.828 — and their common std 0.05 / 2.828."""
    axis = torch.arange(-4.0, 5.0, 2.0)
    return torch.cartesian_prod(axis, axis) / _SCALE_25, _STD_25 / _SCALE_25


def twenty_five_gaussians(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n points (n, 2) float32 and their mode index (n,) int64 (into ``twenty_five_gaussians_modes()``).

    As DOT: the same number of points on every mode (up to one when 25 does not divide n), N(0, 0.05²) noise around
    the grid point, shuffled, then divided by 2.828.
    """
    modes = np.arange(n) % 25
    rng.shuffle(modes)
    centres = np.stack(np.meshgrid(np.arange(-4, 5, 2), np.arange(-4, 5, 2), indexing="ij"), -1).reshape(25, 2)
    points = (centres[modes] + _STD_25 * rng.standard_normal((n, 2))) / _SCALE_25
    return torch.from_numpy(points.astype(np.float32)), torch.from_numpy(modes.astype(np.int64))


def swiss_roll(n: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n points (n, 2) float32 — ``make_swiss_roll(noise=0.25)[:, [0, 2]] / 7.5`` as DOT — and each point's position
    along the roll, t (n,) float32 (sklearn's second output)."""
    state = int(rng.integers(2 ** 31))
    points, t = sklearn.datasets.make_swiss_roll(n_samples=n, noise=0.25, random_state=state)
    points = points.astype(np.float32)[:, [0, 2]] / _SCALE_SWISS
    return torch.from_numpy(points), torch.from_numpy(t.astype(np.float32))


def toy_dataset(name: str, split: str = "train", n_samples: int = 10_000, seed: int = 0) -> ArrayDataset:
    """A fixed sample of a toy distribution. The train, validation and test splits of one seed are independent
    draws of ``n_samples`` each.

    targets: the mode index (int64) for 25-Gaussians, the position t along the roll (float32) for the Swiss roll.
    """
    if name not in TOY_DATASETS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {TOY_DATASETS}")
    if n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    rng = np.random.default_rng([seed, _STREAM[check_split(split)], TOY_DATASETS.index(name)])
    if name == "25gaussians":
        points, modes = twenty_five_gaussians(n_samples, rng)
        means, std = twenty_five_gaussians_modes()
        return ArrayDataset(points, modes, name=name, split=split, modes=means, mode_std=std)
    points, t = swiss_roll(n_samples, rng)
    return ArrayDataset(points, t, name=name, split=split)
