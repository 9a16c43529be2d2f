"""Two-sample distances between generated samples and held-out data: a Gaussian-kernel MMD and the energy distance.

Both flatten every sample to a vector and compute in float64 on the CPU; they are exact (no random features), so keep
N·M to a few tens of millions (5 000 × 5 000 takes about a second).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

BANDWIDTH_FACTORS = (0.0625, 0.125, 0.25, 0.5, 1.0)  # × the reference set's median pairwise distance


def _flat(x: torch.Tensor) -> torch.Tensor:
    return x.detach().reshape(x.shape[0], -1).double().cpu()


def median_distance(x: torch.Tensor, max_points: int = 2000) -> float:
    """The median pairwise Euclidean distance among the first ``max_points`` samples of x (N, ...)."""
    x = _flat(x)[:max_points]
    if x.shape[0] < 2:
        raise ValueError(f"median_distance needs at least 2 samples, got {x.shape[0]}")
    d = torch.cdist(x, x)
    return d[torch.triu_indices(x.shape[0], x.shape[0], 1).unbind()].median().item()


def default_bandwidths(reference: torch.Tensor) -> list[float]:
    """``BANDWIDTH_FACTORS`` × the median pairwise distance of ``reference``: from mode-sized to global scales."""
    median = median_distance(reference)
    return [f * median for f in BANDWIDTH_FACTORS]


def mmd2(x: torch.Tensor, y: torch.Tensor, bandwidths: Sequence[float], unbiased: bool = True) -> float:
    """Squared MMD between x (N, ...) and y (M, ...) with the kernel Σ_σ exp(−‖a − b‖² / (2σ²)) over
    ``bandwidths``. ``unbiased`` (default) drops the diagonals of the within-set terms (can be slightly negative);
    otherwise the biased V-statistic, which is exactly 0 for x equal to y."""
    x, y = _flat(x), _flat(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of features, got {x.shape[1]} and {y.shape[1]}")
    if not bandwidths or any(not s > 0 for s in bandwidths):
        raise ValueError(f"bandwidths must be a non-empty list of positive floats, got {bandwidths}")
    n, m = x.shape[0], y.shape[0]
    if unbiased and min(n, m) < 2:
        raise ValueError("the unbiased MMD needs at least 2 samples in each set")

    def kernel_sum(a, b):
        d2 = torch.cdist(a, b).pow(2)
        return sum(torch.exp(-d2 / (2 * s * s)) for s in bandwidths)

    kxx, kyy, kxy = kernel_sum(x, x), kernel_sum(y, y), kernel_sum(x, y)
    if unbiased:
        xx = (kxx.sum() - kxx.diagonal().sum()) / (n * (n - 1))
        yy = (kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
    else:
        xx, yy = kxx.mean(), kyy.mean()
    return (xx + yy - 2 * kxy.mean()).item()


def energy_distance(x: torch.Tensor, y: torch.Tensor) -> float:
    """The energy distance 2·E‖X − Y‖ − E‖X − X′‖ − E‖Y − Y′‖ (V-statistic: 0 for x equal to y, ≥ 0 always)."""
    x, y = _flat(x), _flat(y)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"x and y must have the same number of features, got {x.shape[1]} and {y.shape[1]}")
    cross, within_x, within_y = torch.cdist(x, y).mean(), torch.cdist(x, x).mean(), torch.cdist(y, y).mean()
    return (2 * cross - within_x - within_y).item()
