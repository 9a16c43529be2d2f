"""GLOW (Kingma & Dhariwal 2018): multi-scale flow on images, or a flow of couplings on vectors (2-D toys)."""

from __future__ import annotations

import functools
import math

import torch
from torch import nn

from fastlangevin.models.base import LatentGenerativeModel
from fastlangevin.models.flows import IMAGE_INVERSE_BOUND, FlowSequence, Squeeze, VectorFlow, flow_step
from fastlangevin.models.nets import coupling_convnet


class SplitPrior(nn.Module):
    """GLOW's multi-scale split with its learned Gaussian prior, written in standard-normal form.

    h (B, C, H, W) splits into h_a (the first C // 2 channels, which go on through the flow) and h_b. Under the
    learned prior h_b ~ N(μ, σ²) with (μ, log σ) = zero-initialised conv3×3(h_a); the layer outputs
    ε = (h_b − μ) / σ ~ N(0, I) instead of h_b, adding −Σ log σ to the log-determinant. The model's density is
    unchanged, and the whole latent (every ε and the last level's output) is N(0, I): the flat latent the latent
    EBM's prior assumes, with ``inverse`` an exact G(z).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.keep = channels // 2
        self.prior = nn.Conv2d(self.keep, 2 * (channels - self.keep), 3, padding=1)
        nn.init.zeros_(self.prior.weight)
        nn.init.zeros_(self.prior.bias)

    def _mean_log_std(self, h_a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.prior(h_a)
        return out[:, 0::2], out[:, 1::2]

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """h → (h_a, ε, logdet (B,))."""
        h_a, h_b = h[:, :self.keep], h[:, self.keep:]
        mean, log_std = self._mean_log_std(h_a)
        return h_a, (h_b - mean) * (-log_std).exp(), -log_std.flatten(1).sum(1)

    def inverse(self, h_a: torch.Tensor, eps: torch.Tensor, bound: float | None = None) -> torch.Tensor:
        """(h_a, ε) → h. ``bound``: σ at most ``bound`` and h clamped to ±bound (a finite G where h_a runs away,
        see ``MultiScaleFlow``; no inf reaches the backward pass, where it would turn 0·∞ into NaN)."""
        mean, log_std = self._mean_log_std(h_a)
        if bound is None:
            return torch.cat([h_a, mean + log_std.exp() * eps], 1)
        h_b = mean + log_std.clamp(max=math.log(bound)).exp() * eps
        return torch.cat([h_a, h_b], 1).clamp(-bound, bound)


class MultiScaleFlow(nn.Module):
    """x (B, C, H, W) ↔ z (B, C·H·W). Each of ``n_levels`` levels: squeeze, ``n_steps`` flow steps, then (except
    after the last level, and only if ``multiscale``) a SplitPrior that sends half the channels to the latent.
    z concatenates the flattened ε of every split, in order, then the last level's output (``latent_shapes``).
    The inverse is bounded (``flows.IMAGE_INVERSE_BOUND``: every coupling's and split's output, each level's
    output): G = flow⁻¹ and its gradient stay finite everywhere, and are unchanged where no value reaches the bound."""

    def __init__(self, image_shape, n_levels: int, n_steps: int, hidden: int, depth: int, multiscale: bool):
        super().__init__()
        c, h, w = image_shape
        if h % 2 ** n_levels or w % 2 ** n_levels:
            raise ValueError(f"GLOW with {n_levels} levels needs height and width divisible by {2 ** n_levels}, got "
                             f"{h}×{w} (use fewer levels or pad the images)")
        make_net = functools.partial(coupling_convnet, hidden=hidden, n_blocks=depth)
        self.inverse_bound = IMAGE_INVERSE_BOUND
        self.levels, self.splits, self.latent_shapes = nn.ModuleList(), nn.ModuleList(), []
        for level in range(n_levels):
            c, h, w = 4 * c, h // 2, w // 2
            self.levels.append(FlowSequence([Squeeze()] + [flow_step(c, make_net, self.inverse_bound)
                                                           for _ in range(n_steps)]))
            if multiscale and level < n_levels - 1:
                self.splits.append(SplitPrior(c))
                self.latent_shapes.append((c - c // 2, h, w))
                c = c // 2
        self.latent_shapes.append((c, h, w))

    def flatten_latent(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Per-scale latents (B, *latent_shapes[i]) → one flat latent (B, D)."""
        return torch.cat([p.flatten(1) for p in parts], 1)

    def unflatten_latent(self, z: torch.Tensor) -> list[torch.Tensor]:
        """The inverse of ``flatten_latent``: (B, D) → [(B, *shape) for shape in latent_shapes]."""
        sizes = [math.prod(s) for s in self.latent_shapes]
        return [p.reshape(-1, *s) for p, s in zip(z.split(sizes, 1), self.latent_shapes)]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logdet, parts = x.new_zeros(x.shape[0]), []
        for i, level in enumerate(self.levels):
            x, ld = level(x)
            logdet = logdet + ld
            if i < len(self.splits):
                x, eps, ld = self.splits[i](x)
                logdet = logdet + ld
                parts.append(eps)
        return self.flatten_latent(parts + [x]), logdet

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        parts = self.unflatten_latent(z)
        x = parts[-1]
        bound = self.inverse_bound
        for i in reversed(range(len(self.levels))):
            if i < len(self.splits):
                x = self.splits[i].inverse(x, parts[i], bound)
            x = self.levels[i].inverse(x)
            x = x if bound is None else x.clamp(-bound, bound)
        return x


class Glow(LatentGenerativeModel):
    """GLOW as a generator: z (B, D) ~ N(0, I) ↔ data, D = prod(data_shape) (the latent is as large as the data).

    Images (C, H, W) in [0, 1] with ``n_bins`` levels (default 256; 17 for the 8×8 digits): a MultiScaleFlow on
    y = x − 0.5 (dequantised with uniform noise for training); ``hidden`` (default 64) channels and ``depth``
    residual blocks in each coupling net (the paper: a 3-layer Highway net with 64 channels, 2 levels of 16 steps
    on MNIST). Vectors (D,): a VectorFlow of ``n_steps`` couplings with ``depth`` hidden layers of ``hidden``
    (default 256) units on y = x. Train with ``loss`` in training mode: the first batch initialises the actnorms.

    forward(y) -> (z, logdet) and inverse(z) -> y are the bijection on y; encode(x) / generate(z) add the
    conversion between data and y. ``loss`` is the negative log-likelihood of the data: in bits per dimension of
    the discrete pixels for images, in nats per sample for vectors.
    """

    name = "glow"

    def __init__(self, data_shape, *, n_levels: int = 2, n_steps: int = 8, hidden: int | None = None,
                 depth: int = 1, multiscale: bool = True, n_bins: int | None = None):
        data_shape = tuple(int(d) for d in data_shape)
        image = len(data_shape) == 3
        if len(data_shape) not in (1, 3):
            raise ValueError(f"data_shape must be (D,) or (C, H, W), got {data_shape}")
        if not image and n_bins is not None:
            raise ValueError("n_bins is for images (discrete pixels); vectors are continuous")
        hidden = hidden or (64 if image else 256)
        n_bins = (n_bins or 256) if image else None
        config = dict(data_shape=list(data_shape), n_levels=n_levels, n_steps=n_steps, hidden=hidden, depth=depth,
                      multiscale=multiscale, n_bins=n_bins)
        super().__init__(data_shape, math.prod(data_shape), config)
        self.n_bins = n_bins
        if image:
            self.flow = MultiScaleFlow(data_shape, n_levels, n_steps, hidden, depth, multiscale)
        else:
            self.flow = VectorFlow(data_shape[0], n_steps, hidden, depth)

    def forward(self, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """y (B, *data_shape) → z (B, D), log |det ∂z/∂y| (B,)."""
        return self.flow(y)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """z (B, D) → y (B, *data_shape)."""
        return self.flow.inverse(z)

    def log_prob(self, y: torch.Tensor) -> torch.Tensor:
        """Exact log-density of y (B, *data_shape) → (B,), in nats."""
        z, logdet = self(y)
        return self.prior_log_prob(z) + logdet

    def preprocess(self, x: torch.Tensor, dequantize: bool = False,
                   generator: torch.Generator | None = None) -> torch.Tensor:
        """Data → flow space. Images: pixel k/(n_bins − 1) → (k + u)/n_bins − 0.5 with u ~ U(0, 1) when
        dequantising (drawn from ``generator``, a CPU one, when given), else u = ½ (the bin centre). Vectors:
        unchanged."""
        if self.n_bins is None:
            return x
        k = torch.round(x * (self.n_bins - 1)).clamp(0, self.n_bins - 1)
        if not dequantize:
            u = torch.full_like(x, 0.5)
        elif generator is None:
            u = torch.rand_like(x)
        else:
            u = torch.rand(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        return (k + u) / self.n_bins - 0.5

    def postprocess(self, y: torch.Tensor) -> torch.Tensor:
        """Flow space → data: the affine inverse of ``preprocess`` at the bin centres (not clamped, so the map stays
        differentiable; clamp to [0, 1] for display)."""
        if self.n_bins is None:
            return y
        return ((y + 0.5) * self.n_bins - 0.5) / (self.n_bins - 1)

    def dequantize(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Images: each pixel k/(n_bins − 1) spread uniformly over its bin, x + (u − ½)/(n_bins − 1), u ~ U(0, 1):
        the dequantised data ``loss_terms`` trains on, mapped back to data space (where G(z) lives). Vectors:
        x."""
        return self.postprocess(self.preprocess(x, dequantize=True, generator=generator))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self(self.preprocess(x))[0]

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        return self.postprocess(self.inverse(z))

    def generator_network(self) -> str:
        return "GLOW's generator is the flow's inverse (affine couplings, invertible 1×1 maps), not an MLP"

    def loss_terms(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        nll = -self.log_prob(self.preprocess(x, dequantize=True))
        if self.n_bins is not None:  # discrete data: log p(x) ≥ E_u log p(y) − D log n_bins, in bits per dimension
            nll = (nll + self.latent_dim * math.log(self.n_bins)) / (self.latent_dim * math.log(2))
        return {"loss": nll.mean()}

    def flatten_latent(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """Images: per-scale latents → the flat latent (B, D)."""
        return self.flow.flatten_latent(parts)

    def unflatten_latent(self, z: torch.Tensor) -> list[torch.Tensor]:
        """Images: the flat latent (B, D) → per-scale latents, shapes ``flow.latent_shapes``."""
        return self.flow.unflatten_latent(z)
