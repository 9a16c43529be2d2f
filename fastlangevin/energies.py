"""Energies with known answers, for demos and tests. Convention: E low = likely, ``forward(z)`` → (B,)."""

from __future__ import annotations

import math

import torch
from torch import nn


class GaussianMixtureEnergy(nn.Module):
    """E(z) = −log Σ_k w_k N(z; μ_k, std²·I), up to a constant. means: (K, D); weights: (K,) or None (uniform)."""

    def __init__(self, means: torch.Tensor, std: float, weights: torch.Tensor | None = None):
        super().__init__()
        if means.dim() != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(means.shape)}")
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        k = means.shape[0]
        weights = torch.full((k,), 1.0 / k) if weights is None else weights
        self.register_buffer("means", means)
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))
        self.std = float(std)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        means = self.means.to(z.dtype)
        sq = (z.unsqueeze(1) - means.unsqueeze(0)).pow(2).sum(-1)  # (B, K)
        return -torch.logsumexp(self.log_weights.to(z.dtype) - sq / (2 * self.std ** 2), dim=1)


def grid_means(n_per_side: int = 5, spacing: float = 1.0) -> torch.Tensor:
    """Centres of an ``n × n`` grid of modes centred at 0, shape (n², 2)."""
    axis = (torch.arange(n_per_side, dtype=torch.float32) - (n_per_side - 1) / 2) * spacing
    return torch.cartesian_prod(axis, axis)


def ring_means(n: int = 8, radius: float = 2.0) -> torch.Tensor:
    angles = torch.arange(n, dtype=torch.float32) * (2 * math.pi / n)
    return radius * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
