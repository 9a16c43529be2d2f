"""Variational auto-encoder: MLP encoder/decoder on vectors (2-D toys), DCGAN conv encoder/decoder on images."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from fastlangevin.models.base import LatentGenerativeModel
from fastlangevin.models.nets import decoder, encoder

RECONSTRUCTIONS = ("bce", "mse")


def resolve_reconstruction(reconstruction: str | None, data_shape) -> str:
    """The reconstruction loss to use: the one given, else BCE for images and MSE for vectors."""
    if reconstruction is None:
        return "bce" if len(data_shape) == 3 else "mse"
    if reconstruction not in RECONSTRUCTIONS:
        raise ValueError(f"reconstruction must be one of {RECONSTRUCTIONS}, got {reconstruction!r}")
    return reconstruction


class VAE(LatentGenerativeModel):
    """q(z|x) = N(μ(x), diag σ²(x)), p(z) = N(0, I), p(x|z) Bernoulli ("bce", data in [0, 1]) or Gaussian ("mse").

    data_shape (D,) → MLPs (``width`` default 256, ``n_hidden_layers`` 3, leaky ReLU: the toy networks of the
    discriminator-optimal-transport code); (C, H, H) → DCGAN conv nets derived from H (``width`` default 64).
    For "mse" the observation std starts at ``obs_std`` and, if ``learn_obs_std``, is one learned scalar (kept
    ≥ e⁻⁶); starting well below the data's spread keeps a 2-D VAE from collapsing onto the prior in its first steps
    (from σ = 1 it stays there). A fixed ``obs_std = 1/√2`` makes the reconstruction term the plain sum of squared
    errors. Both are ignored for "bce". Decoded means go through a sigmoid except for "mse" on vectors.
    The decoder's batch norms use batch statistics in training mode: call ``eval()`` before using G in a Langevin
    chain, so that each sample's drift depends on that sample only.
    """

    name = "vae"

    def __init__(self, data_shape, latent_dim: int, *, reconstruction: str | None = None, width: int | None = None,
                 n_hidden_layers: int = 3, obs_std: float = 0.1, learn_obs_std: bool = True):
        data_shape = tuple(int(d) for d in data_shape)
        reconstruction = resolve_reconstruction(reconstruction, data_shape)
        if not obs_std > 0:
            raise ValueError(f"obs_std must be > 0, got {obs_std}")
        config = dict(data_shape=list(data_shape), latent_dim=latent_dim, reconstruction=reconstruction,
                      width=width, n_hidden_layers=n_hidden_layers, obs_std=obs_std,
                      learn_obs_std=learn_obs_std)
        super().__init__(data_shape, latent_dim, config)
        self.reconstruction = reconstruction
        self.encoder = encoder(data_shape, 2 * latent_dim, width, n_hidden_layers)
        self.decoder = decoder(latent_dim, data_shape, width, n_hidden_layers)
        self.sigmoid_mean = reconstruction == "bce" or len(data_shape) == 3
        if reconstruction == "mse":
            log_std = torch.tensor(math.log(obs_std))
            if learn_obs_std:
                self.log_obs_std = nn.Parameter(log_std)
            else:
                self.register_buffer("log_obs_std", log_std)

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x): mean and log-variance, each (B, latent_dim)."""
        mean, log_var = self.encoder(x).chunk(2, dim=1)
        return mean, log_var

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mean (B, latent_dim)."""
        return self.posterior(x)[0]

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The mean of p(x|z): (B, latent_dim) → (B, *data_shape)."""
        return self._mean(self.decoder(z))

    def _mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out) if self.sigmoid_mean else out

    generate = decode

    def generator_network(self) -> nn.Sequential | str:
        if len(self.data_shape) != 1:
            return "the VAE's decoder is a DCGAN conv net, not an MLP"
        return nn.Sequential(self.decoder, nn.Sigmoid()) if self.sigmoid_mean else self.decoder

    def _log_likelihood(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """log p(x|z) summed over the data dimensions: (B,)."""
        out = self.decoder(z)
        if self.reconstruction == "bce":
            return -F.binary_cross_entropy_with_logits(out, x, reduction="none").flatten(1).sum(1)
        mean = self._mean(out)
        log_std = self.log_obs_std.clamp(min=-6.0)
        squared_error = (x - mean).pow(2).flatten(1).sum(1)
        normaliser = math.prod(self.data_shape) * (log_std + 0.5 * math.log(2 * math.pi))
        return -0.5 * squared_error * torch.exp(-2 * log_std) - normaliser

    def _elbo_terms(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(x|z) at one reparametrised z ~ q(z|x), and KL(q(z|x) ‖ N(0, I)): each (B,)."""
        mean, log_var = self.posterior(x)
        z = mean + torch.randn_like(mean) * (0.5 * log_var).exp()
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum(1)
        return self._log_likelihood(x, z), kl

    def elbo(self, x: torch.Tensor) -> torch.Tensor:
        """A one-sample estimate of the ELBO of each sample: (B,), nats."""
        log_likelihood, kl = self._elbo_terms(x)
        return log_likelihood - kl

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """The negative ELBO averaged over the batch (nats per sample): {"loss", "reconstruction" (−log p(x|z)),
        "kl"}."""
        log_likelihood, kl = self._elbo_terms(x)
        reconstruction, kl = -log_likelihood.mean(), kl.mean()
        return {"loss": reconstruction + kl, "reconstruction": reconstruction, "kl": kl}
