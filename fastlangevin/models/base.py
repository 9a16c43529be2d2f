"""What every backbone offers the latent EBM: a generator G from an N(0, I) latent to data, and its inverse map."""

from __future__ import annotations

import math

import torch
from torch import nn


class LatentGenerativeModel(nn.Module):
    """A generator ``G: z (B, latent_dim) → x (B, *data_shape)`` with the prior z ~ N(0, I).

    Subclasses define ``encode(x) -> z`` (the latent of data: a VAE's posterior mean, a flow's forward map),
    ``generate(z) -> x`` (= G(z)) and ``loss_terms(x) -> dict`` (the base model's training objective under "loss",
    a scalar to minimise, beside its parts for logging). ``config`` holds the constructor's arguments, so
    ``fastlangevin.models.make_model(model.name, **model.config)`` rebuilds the architecture (JSON-serialisable).
    """

    name: str
    prior = "normal"  # the prior of the latent, as ``fl.langevin(prior=...)`` names it

    def __init__(self, data_shape, latent_dim: int, config: dict):
        super().__init__()
        self.data_shape = tuple(int(d) for d in data_shape)
        self.latent_dim = int(latent_dim)
        self.config = config

    @property
    def latent_shape(self) -> tuple[int]:
        return (self.latent_dim,)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def generator_network(self) -> nn.Sequential | str:
        """G as an ``nn.Sequential`` of ``nn.Linear`` layers and activations sharing this model's layers (so a chain
        of E(G(z)) can run as one fused MLP, ``fl.MLPEnergy.from_sequential``), or a sentence saying why G is not
        one."""
        return f"the generator of {type(self).__name__} is not an MLP"

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        """The base model's training objective on a batch x (B, *data_shape): a scalar to minimise."""
        return self.loss_terms(x)["loss"]

    def dequantize(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Data x (B, *data_shape) as the model's likelihood sees it during training, in data space: x itself for
        a model of continuous data (a flow of discrete pixels overrides it). ``generator``: the noise's stream."""
        return x

    @staticmethod
    def prior_log_prob(z: torch.Tensor) -> torch.Tensor:
        """log N(z; 0, I) summed over the latent: z (B, latent_dim) → (B,)."""
        return -0.5 * z.pow(2).sum(1) - 0.5 * z.shape[1] * math.log(2 * math.pi)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """n samples G(temperature · ε), ε ~ N(0, I), on the model's device and dtype: (n, *data_shape)."""
        p = next(self.parameters())
        z = torch.randn(n, self.latent_dim, generator=generator, device=p.device, dtype=p.dtype)
        return self.generate(temperature * z)
