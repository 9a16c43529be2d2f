"""Energies on generated samples E(G(z)) for the latent EBM of the exponential-tilting paper (Seed A).

Toy vectors: an ``fl.MLPEnergy`` on the 2-D point (the paper: fully connected, as DOT's 2→512→512→512→1
discriminator; the width is configurable). Images: a small conv energy after the paper's appendix B.2 — a simplified
Du & Mordatch net: residual blocks at ``width`` then ``2·width`` channels (downsampling between the two stages),
global **sum** pooling, one fully connected layer. Both return (B,) energies, low = likely.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from fastlangevin.energies import MLPEnergy


class ResBlock(nn.Module):
    """x + conv(act(conv(act(x)))), with a 1×1 projection when the channel count changes."""

    def __init__(self, c_in: int, c_out: int, negative_slope: float = 0.2):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, padding=1)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1)
        self.act = nn.LeakyReLU(negative_slope)
        self.skip = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x):
        return self.skip(x) + self.conv2(self.act(self.conv1(self.act(x))))


class ConvEnergy(nn.Module):
    """(B, C, H, W) images in [0, 1] → (B,) energies. ``n_blocks`` residual blocks at ``width`` channels, an average
    pool halving the side, ``n_blocks`` at ``2·width``, global sum pooling over space, Linear(2·width → 1).
    The paper's net is n_blocks = 3, width = 64; the defaults here are smaller for CPU runs."""

    def __init__(self, image_shape, width: int = 32, n_blocks: int = 2):
        super().__init__()
        channels = int(image_shape[0])
        self.config = dict(image_shape=list(image_shape), width=width, n_blocks=n_blocks)
        self.stem = nn.Conv2d(channels, width, 3, padding=1)
        stage1 = [ResBlock(width, width) for _ in range(n_blocks)]
        stage2 = [ResBlock(width if i == 0 else 2 * width, 2 * width) for i in range(n_blocks)]
        self.body = nn.Sequential(*stage1, nn.AvgPool2d(2), *stage2, nn.LeakyReLU(0.2))
        self.fc = nn.Linear(2 * width, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(self.stem(2 * x - 1))  # centre [0, 1] pixels
        return self.fc(h.sum((2, 3))).squeeze(1)

    def fused_energy(self) -> str:
        """Why ``fl.langevin`` runs this energy step by step."""
        return "ConvEnergy is a conv net; the fused chain runs MLPs"


def make_energy(data_shape, width: int | None = None, depth: int | None = None) -> nn.Module:
    """The energy for samples of ``data_shape``: an MLPEnergy (D, width×depth, 1) for vectors (defaults 128, 3),
    a ConvEnergy for images (defaults 32 channels, 2 blocks per stage)."""
    data_shape = tuple(int(d) for d in data_shape)
    if len(data_shape) == 1:
        width, depth = width or 128, depth or 3
        return MLPEnergy((data_shape[0],) + (width,) * depth + (1,), "leaky_relu", 0.2)
    if len(data_shape) == 3:
        return ConvEnergy(data_shape, width or 32, depth or 2)
    raise ValueError(f"data_shape must be (D,) or (C, H, W), got {data_shape}")


class TiltedEnergy(nn.Module):
    """z ↦ E(G(z)), (B, latent_dim) → (B,): the latent energy ``fl.langevin`` samples (with its N(0, I) prior).

    Where G and E are MLPs (a VAE on vectors with an ``fl.MLPEnergy``) E(G(z)) is one deeper ``fl.MLPEnergy``
    sharing their layers, which ``fused_energy`` hands to ``fl.langevin``: the chains run fused, the energy's
    optimiser steps are seen by the next chain and the frozen generator stays frozen. Otherwise ``fused_energy``
    says why not (a flow's inverse, a conv net), and ``fl.langevin`` logs it and runs the step-op chain."""

    def __init__(self, energy: nn.Module, base: nn.Module):
        super().__init__()
        self.energy, self.base = energy, base

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.energy(self.base.generate(z))

    @functools.cached_property
    def _composition(self) -> MLPEnergy | str:
        generator = self.base.generator_network()
        if isinstance(generator, str):
            return generator
        if not isinstance(self.energy, MLPEnergy):
            return f"its energy is a {type(self.energy).__name__}, not an fl.MLPEnergy"
        try:
            return MLPEnergy.from_sequential(nn.Sequential(generator, self.energy))
        except ValueError as error:
            return f"E(G(z)) is not one MLP: {error}"

    def fused_energy(self) -> MLPEnergy | str:
        """E(G(z)) as one ``fl.MLPEnergy`` (built once, sharing the layers), or why it is not one."""
        return self._composition
