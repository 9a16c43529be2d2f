"""Toy-data metrics of the discriminator-optimal-transport / DDLS papers: modes covered, high-quality share."""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass
class ModeCoverage:
    modes_covered: int  # modes holding at least ``min_count`` high-quality samples
    n_modes: int
    high_quality: float  # share of samples within ``n_std`` standard deviations of their nearest mode
    counts: torch.Tensor  # (K,) high-quality samples per mode


def mode_coverage(samples: torch.Tensor, means: torch.Tensor, std: float, n_std: float = 3.0,
                  min_count: int | None = None) -> ModeCoverage:
    """samples: (N, D); means: (K, D). A mode is covered when ``min_count`` (default: 1 % of N/K, at least 1)
    high-quality samples fall on it."""
    samples, means = samples.detach().double().cpu(), means.double().cpu()
    dist = torch.cdist(samples, means)  # (N, K)
    nearest_dist, nearest = dist.min(1)
    good = nearest_dist <= n_std * std
    counts = torch.bincount(nearest[good], minlength=means.shape[0])
    if min_count is None:
        min_count = max(1, int(0.01 * samples.shape[0] / means.shape[0]))
    return ModeCoverage(int((counts >= min_count).sum()), means.shape[0], good.double().mean().item(), counts)
