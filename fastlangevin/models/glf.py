"""Generative latent flow (Xiao, Yan, Chen & Amit 2019): a deterministic auto-encoder with a flow on its latent."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastlangevin.models.base import LatentGenerativeModel
from fastlangevin.models.flows import VectorFlow
from fastlangevin.models.nets import decoder, encoder
from fastlangevin.models.vae import resolve_reconstruction


class GLF(LatentGenerativeModel):
    """x → code c = enc(x) (B, latent_dim) → z = flow(c) ~ N(0, I); G(z) = dec(flow⁻¹(z)).

    The encoder and decoder are the VAE's (MLPs for vectors, DCGAN conv nets for images); the flow is a VectorFlow
    of ``flow_steps`` affine couplings with ``flow_hidden_layers`` × ``flow_hidden`` units (the paper: 4 couplings,
    one FC-256 layer each, latent 64). Trained jointly on reconstruction + the flow's negative log-likelihood of
    the code, with the gradient of the likelihood stopped at the code (GLF's stop-gradient variant): the flow
    follows the encoder, and the encoder is shaped by reconstruction alone, so the codes cannot shrink to inflate
    the likelihood. As the two terms then train disjoint parameters, they need no relative weight.
    Reconstruction: "bce" (data in [0, 1], default for images) or "mse" (the sum of squared errors, default for
    vectors); decoded means go through a sigmoid except for "mse" on vectors.
    """

    name = "glf"

    def __init__(self, data_shape, latent_dim: int, *, reconstruction: str | None = None, width: int | None = None,
                 n_hidden_layers: int = 3, flow_steps: int = 4, flow_hidden: int = 256, flow_hidden_layers: int = 1):
        data_shape = tuple(int(d) for d in data_shape)
        reconstruction = resolve_reconstruction(reconstruction, data_shape)
        config = dict(data_shape=list(data_shape), latent_dim=latent_dim, reconstruction=reconstruction,
                      width=width, n_hidden_layers=n_hidden_layers, flow_steps=flow_steps, flow_hidden=flow_hidden,
                      flow_hidden_layers=flow_hidden_layers)
        super().__init__(data_shape, latent_dim, config)
        self.reconstruction = reconstruction
        self.encoder = encoder(data_shape, latent_dim, width, n_hidden_layers)
        self.decoder = decoder(latent_dim, data_shape, width, n_hidden_layers)
        self.flow = VectorFlow(latent_dim, flow_steps, flow_hidden, flow_hidden_layers)
        self.sigmoid_mean = reconstruction == "bce" or len(data_shape) == 3

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """The decoder's output for an auto-encoder code c: (B, latent_dim) → (B, *data_shape)."""
        return self._mean(self.decoder(code))

    def _mean(self, out: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(out) if self.sigmoid_mean else out

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """The N(0, I) latent of x: flow(enc(x)), (B, latent_dim)."""
        return self.flow(self.encoder(x))[0]

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        return self.decode(self.flow.inverse(z))

    def generator_network(self) -> str:
        return "GLF's generator decoder(flow⁻¹(z)) begins with the flow's inverse (affine couplings), not an MLP"

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Batch means of per-sample sums: {"loss" = reconstruction + flow_nll, "reconstruction" (BCE or squared
        error), "flow_nll" (−log p_flow(c), nats, with c detached)}."""
        code = self.encoder(x)
        out = self.decoder(code)
        if self.reconstruction == "bce":
            reconstruction = F.binary_cross_entropy_with_logits(out, x, reduction="none")
        else:
            reconstruction = (x - self._mean(out)).pow(2)
        reconstruction = reconstruction.flatten(1).sum(1).mean()
        flow_nll = -self.flow.log_prob(code.detach()).mean()
        return {"loss": reconstruction + flow_nll, "reconstruction": reconstruction, "flow_nll": flow_nll}
