"""A small NVAE-style hierarchical VAE and the joint latent EBM prior of the multi-layer generator paper (Cui, Wu,
Han, CVPR 2023; its supplement §1.3 and the two-stage NVAE code, reference-code.md §2b), sampled in ε-space.

Latent groups z_0 (top, c_0×1×1), z_1 (c_1×2×2), z_2 (c_2×4×4), …: group i lives at side 2**i. The top-down
decoder gives the conditional Gaussians p_β(z_i | z_<i) = N(μ_i, σ_i) with NVAE's soft clamps (μ = 5·tanh(μ̃/5),
log σ = 5·tanh(s̃/5), σ = (exp(log σ) + 0.01)·t, t the temperature; the top group has μ̃ = s̃ = 0, so σ_0 = 1.01·t as in
the reference code). The deterministic map T_β(ε): z_i = μ_i(z_<i) + σ_i(z_<i)·ε_i sends ε ~ N(0, I) to p_β.

Sign conventions: the joint EBM prior is p(z) ∝ exp(f(z))·p_β(z) with f = Σ_i f_i(z_i) in the paper's sign
(f = −energy, high = likely). ``fl.langevin`` wants an energy (low = likely): ``EpsilonEnergy`` returns
E(ε) = −f(T_β(ε)) (+ Σ log σ_i for the reference code's variant) and is sampled with ``prior="normal"``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastlangevin.energies import MLPEnergy

SOFT_CLAMP = 5.0  # NVAE's bound on μ and log σ
SIGMA_FLOOR = 0.01  # NVAE's σ = exp(log σ) + 0.01
VARIANTS = ("paper", "code")
DECODERS = ("gaussian", "bernoulli")
LLHD_SIGMA = 0.15  # p(x|z) = N(sigmoid(logits), 0.15²) on [0, 1] pixels: LEBM's σ = 0.3 on [−1, 1]


def soft_clamp(x: torch.Tensor, bound: float = SOFT_CLAMP) -> torch.Tensor:
    return bound * torch.tanh(x / bound)


class Gaussian(NamedTuple):
    """A diagonal Gaussian over one latent group: mu, sigma (B, c, h, w)."""

    mu: torch.Tensor
    sigma: torch.Tensor

    @classmethod
    def from_raw(cls, raw: torch.Tensor, temperature: float = 1.0) -> "Gaussian":
        """NVAE's parametrisation of the network output ``raw`` (B, 2c, h, w) = (μ̃, s̃): soft-clamped μ and log σ,
        σ = (exp(log σ) + 0.01)·temperature."""
        raw_mu, raw_log_sigma = raw.chunk(2, dim=1)
        return cls(soft_clamp(raw_mu), (torch.exp(soft_clamp(raw_log_sigma)) + SIGMA_FLOOR) * temperature)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log N(z; μ, σ) summed over the group: (B,)."""
        eps = (z - self.mu) / self.sigma
        return (-0.5 * eps.pow(2) - self.sigma.log() - 0.5 * math.log(2 * math.pi)).flatten(1).sum(1)

    def kl(self, other: "Gaussian") -> torch.Tensor:
        """KL(self ‖ other) summed over the group: (B,)."""
        ratio = self.sigma / other.sigma
        kl = 0.5 * (ratio.pow(2) + ((self.mu - other.mu) / other.sigma).pow(2)) - 0.5 - ratio.log()
        return kl.flatten(1).sum(1)


class Posterior(NamedTuple):
    """One pass of the inference network: z (per group), KL(q(z_i|x, z_<i) ‖ p_β(z_i|z_<i)) per group (B,), and the
    decoder's logits (B, *data_shape)."""

    z: list[torch.Tensor]
    kl: list[torch.Tensor]
    logits: torch.Tensor


def _norm(channels: int) -> nn.GroupNorm:
    # one group: normalise over channels and space, so the 1×1 top of the hierarchy is normalised over its C values
    # (GroupNorm with one channel per group would make every 1×1 feature a constant)
    return nn.GroupNorm(1, channels)


class ResidualCell(nn.Module):
    """h + 0.1·conv3×3(SiLU(GN(conv3×3(SiLU(GN(h)))))): NVAE's residual cell with GroupNorm instead of batch norm,
    so that a sample's output never depends on the rest of its batch (Langevin chains run per sample)."""

    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(_norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
                                  _norm(channels), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + 0.1 * self.body(h)


def _cells(channels: int, n_cells: int) -> list[nn.Module]:
    return [ResidualCell(channels) for _ in range(n_cells)]


def _up(channels: int) -> nn.Sequential:
    return nn.Sequential(nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(channels, channels, 3, padding=1))


class HierarchicalVAE(nn.Module):
    """NVAE-style hierarchical VAE on square images (C, S, S): a bottom-up encoder, a top-down decoder,
    ``len(latent_channels)`` latent groups (group i: latent_channels[i] × 2**i × 2**i). A side S that is not a power
    of two is zero-padded to the next one on the way in and the decoder's output cropped back to S × S (NVAE pads
    MNIST's 28 × 28 to 32 × 32 the same way); the likelihood covers the S × S pixels only. Decoder on [0, 1] pixels:
    ``"gaussian"`` (default), N(sigmoid(logits), obs_std²) with a fixed std (0.15, as the LEBM trainer), or
    ``"bernoulli"`` (binary cross-entropy with logits, as the repository's VAE: a pseudo-likelihood for grey levels,
    with which this VAE leaves its upper groups unused on the digits, KL ≈ 0).

    channels: the width of every cell; n_cells: residual cells per resolution. The posterior is NVAE's residual
    parametrisation: q(z_i | x, z_<i) has the raw (μ̃, s̃) of the prior plus a correction from the encoder.
    """

    name = "hvae"

    def __init__(self, data_shape=(1, 8, 8), latent_channels: Sequence[int] = (8, 4, 2), channels: int = 32,
                 n_cells: int = 1, decoder: str = "gaussian", obs_std: float = LLHD_SIGMA):
        super().__init__()
        if decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {DECODERS}, got {decoder!r}")
        if not 0 < obs_std < math.inf:
            raise ValueError(f"obs_std must be a finite float > 0, got {obs_std!r}")
        self.decoder, self.obs_std = decoder, float(obs_std)
        data_shape = tuple(int(d) for d in data_shape)
        if len(data_shape) != 3 or data_shape[1] != data_shape[2] or min(data_shape) < 1:
            raise ValueError(f"data_shape must be square images (C, S, S), e.g. (1, 8, 8), got {data_shape}")
        latent_channels = tuple(int(c) for c in latent_channels)
        side = 1 << (data_shape[1] - 1).bit_length()  # the network's side: S padded to a power of two
        self.pad_before = (side - data_shape[1]) // 2
        self.pad_after = side - data_shape[1] - self.pad_before
        if not latent_channels or any(c < 1 for c in latent_channels) or 2 ** (len(latent_channels) - 1) > side:
            raise ValueError(f"latent_channels must be 1 to {side.bit_length()} positive channel counts (group i is "
                             f"2**i × 2**i, at most the padded image side {side}), got {latent_channels}")
        if channels < 1 or n_cells < 0:
            raise ValueError(f"channels must be >= 1 and n_cells >= 0, got channels={channels}, n_cells={n_cells}")
        self.config = dict(data_shape=list(data_shape), latent_channels=list(latent_channels), channels=channels,
                           n_cells=n_cells, decoder=decoder, obs_std=self.obs_std)
        self.data_shape = data_shape
        self.group_shapes = [(c, 2 ** i, 2 ** i) for i, c in enumerate(latent_channels)]
        self.group_dims = [math.prod(s) for s in self.group_shapes]
        self.latent_dim = sum(self.group_dims)
        n_groups, levels = len(latent_channels), side.bit_length() - 1  # sides 1, 2, …, S: levels + 1 of them

        # Bottom-up: stem at S, then (cells, halve) down to 1×1; the features at side 2**i condition group i.
        self.stem = nn.Conv2d(data_shape[0], channels, 3, padding=1)
        self.down = nn.ModuleList(nn.Sequential(*_cells(channels, n_cells),
                                                nn.Conv2d(channels, channels, 3, stride=2, padding=1))
                                  for _ in range(levels))
        # Top-down: a learned 1×1 state; per group a prior net (none for the top), a posterior correction, a combiner
        # of state and sample, then cells and one doubling (the last group: doublings up to S).
        self.h0 = nn.Parameter(torch.randn(1, channels, 1, 1))
        self.prior_nets = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Conv2d(channels, 2 * c, 3, padding=1))
                                        for c in latent_channels[1:])
        self.posterior_nets = nn.ModuleList(nn.Sequential(nn.SiLU(), nn.Conv2d(2 * channels, 2 * c, 3, padding=1))
                                            for c in latent_channels)
        self.combiners = nn.ModuleList(nn.Conv2d(channels + c, channels, 1) for c in latent_channels)
        ups = []
        for i in range(n_groups):
            n_up = 1 if i < n_groups - 1 else levels - i
            ups.append(nn.Sequential(*_cells(channels, n_cells),
                                     *[m for _ in range(n_up) for m in (_up(channels), *_cells(channels, n_cells))]))
        self.ups = nn.ModuleList(ups)
        self.head = nn.Sequential(nn.SiLU(), nn.Conv2d(channels, data_shape[0], 3, padding=1))

    def param_count(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- flat ε / z vectors, as fl.langevin takes them ------------------------------------------------------------
    def flatten(self, groups: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-group tensors (B, c_i, h_i, w_i) → one (B, D) vector, top group first."""
        return torch.cat([g.flatten(1) for g in groups], 1)

    def split(self, flat: torch.Tensor, first: int = 0) -> list[torch.Tensor]:
        """(B, D') → per-group tensors of groups ``first``, ``first + 1``, … (D' = the sum of their sizes)."""
        dims, shapes = self.group_dims[first:], self.group_shapes[first:]
        if flat.dim() != 2 or flat.shape[1] != sum(dims):
            raise ValueError(f"expected a flat latent of shape (B, {sum(dims)}) for groups {first}.."
                             f"{len(self.group_dims) - 1}, got {tuple(flat.shape)}")
        return [part.reshape(-1, *s) for part, s in zip(flat.split(dims, 1), shapes)]

    def _groups(self, x, first: int = 0) -> list[torch.Tensor]:
        groups = self.split(x, first) if isinstance(x, torch.Tensor) else list(x)
        expected = self.group_shapes[first:]
        if len(groups) != len(expected) or any(tuple(g.shape[1:]) != s for g, s in zip(groups, expected)):
            raise ValueError(f"expected {len(expected)} latent groups of shapes {expected}, got "
                             f"{[tuple(g.shape[1:]) for g in groups]}")
        return groups

    # -- the top-down pass ---------------------------------------------------------------------------------------
    def _top_down(self, pick: Callable[[int, torch.Tensor, Gaussian, torch.Tensor], torch.Tensor], batch: int,
                  temperature: float = 1.0, output: bool = True):
        """Run the decoder; ``pick(i, state, prior_i, raw prior output)`` returns z_i. Returns (z list, prior list,
        logits or None)."""
        s = self.h0.expand(batch, -1, -1, -1)
        zs, priors, last = [], [], len(self.group_shapes) - 1
        for i, (c, h, w) in enumerate(self.group_shapes):
            raw = s.new_zeros(batch, 2 * c, h, w) if i == 0 else self.prior_nets[i - 1](s)
            prior = Gaussian.from_raw(raw, temperature)
            z = pick(i, s, prior, raw)
            zs.append(z)
            priors.append(prior)
            if i == last and not output:
                return zs, priors, None
            s = self.ups[i](self.combiners[i](torch.cat([s, z], 1)))
        crop = slice(self.pad_before, self.pad_before + self.data_shape[1])  # the padding back off
        return zs, priors, self.head(s)[..., crop, crop]

    def _transform(self, eps, temperature: float, fixed, output: bool):
        fixed = [] if fixed is None else list(fixed)
        k = len(fixed)
        if k >= len(self.group_shapes) or any(tuple(z.shape[1:]) != s for z, s in zip(fixed, self.group_shapes)):
            raise ValueError(f"fixed: expected z of 0 to {len(self.group_shapes) - 1} top groups of shapes "
                             f"{self.group_shapes[:-1]}, got {[tuple(z.shape[1:]) for z in fixed]}")
        eps = self._groups(eps, k)
        zs, priors, logits = self._top_down(
            lambda i, s, p, raw: fixed[i] if i < k else p.mu + p.sigma * eps[i - k], eps[0].shape[0], temperature,
            output)
        log_det = sum(p.sigma.log().flatten(1).sum(1) for p in priors[k:])
        return zs, log_det, logits

    def transform(self, eps, temperature: float = 1.0, fixed: Sequence[torch.Tensor] | None = None):
        """T_β(ε): z_i = μ_i(z_<i) + σ_i(z_<i)·ε_i. ``eps``: per-group tensors or a flat (B, D) vector.
        ``fixed``: z of the top k groups, held as given (bit for bit); ε then covers groups k, k+1, ….
        Returns (z per group, log|det ∂T/∂ε| = Σ log σ_i over the transformed groups, (B,))."""
        zs, log_det, _ = self._transform(eps, temperature, fixed, output=False)
        return zs, log_det

    def inverse(self, z, temperature: float = 1.0):
        """T_β⁻¹(z): ε_i = (z_i − μ_i(z_<i)) / σ_i(z_<i). Returns (ε per group, log|det ∂T/∂ε| at that ε, (B,))."""
        zs = self._groups(z)
        eps = []

        def pick(i, s, p, raw):
            eps.append((zs[i] - p.mu) / p.sigma)
            return zs[i]
        _, priors, _ = self._top_down(pick, zs[0].shape[0], temperature, output=False)
        return eps, sum(p.sigma.log().flatten(1).sum(1) for p in priors)

    def prior_log_prob(self, z, temperature: float = 1.0) -> torch.Tensor:
        """log p_β(z) = Σ_i log N(z_i; μ_i(z_<i), σ_i(z_<i)): (B,)."""
        zs = self._groups(z)
        _, priors, _ = self._top_down(lambda i, s, p, raw: zs[i], zs[0].shape[0], temperature, output=False)
        return sum(p.log_prob(zi) for p, zi in zip(priors, zs))

    def generate(self, eps, temperature: float = 1.0, fixed: Sequence[torch.Tensor] | None = None) -> torch.Tensor:
        """G(T_β(ε)): the decoder's mean image (B, *data_shape) in [0, 1] (arguments as ``transform``)."""
        return torch.sigmoid(self._transform(eps, temperature, fixed, output=True)[2])

    def decode(self, z) -> torch.Tensor:
        """The mean image of p(x | z) for z given per group or flat: (B, *data_shape)."""
        zs = self._groups(z)
        return torch.sigmoid(self._top_down(lambda i, s, p, raw: zs[i], zs[0].shape[0])[2])

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """n ancestral samples of the hierarchical Gaussian prior, decoded: (n, *data_shape)."""
        p = self.h0
        return self.generate(torch.randn(n, self.latent_dim, generator=generator, dtype=p.dtype).to(p.device),
                             temperature)

    # -- inference ------------------------------------------------------------------------------------------------
    def _features(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Bottom-up features at sides 1, 2, 4, … (index i = side 2**i)."""
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.data_shape))}), got {tuple(x.shape)}")
        x = F.pad(x, (self.pad_before, self.pad_after) * 2)  # zero = black, as MNIST's own border
        h, features = self.stem(2 * x - 1), []
        for down in self.down:
            h = down(h)
            features.append(h)
        return features[::-1]

    def posterior(self, x: torch.Tensor, mean: bool = False) -> Posterior:
        """z_i ~ q(z_i | x, z_<i) (reparametrised; ``mean=True``: z_i = the posterior mean), the KL per group against
        p_β(z_i | z_<i) at the same z_<i, and the decoder's logits."""
        features, kls = self._features(x), []

        def pick(i, s, prior, prior_raw):
            q = Gaussian.from_raw(prior_raw + self.posterior_nets[i](torch.cat([s, features[i]], 1)))
            kls.append(q.kl(prior))
            return q.mu if mean else q.mu + q.sigma * torch.randn_like(q.mu)
        zs, _, logits = self._top_down(pick, x.shape[0])
        return Posterior(zs, kls, logits)

    def log_likelihood(self, x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
        """log p(x | z) for the decoder's ``logits`` (B, *data_shape), summed over pixels: (B,)."""
        if self.decoder == "bernoulli":
            return -F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
        error = ((x - torch.sigmoid(logits)) / self.obs_std).pow(2).flatten(1).sum(1)
        return -0.5 * error - math.prod(self.data_shape) * (math.log(self.obs_std) + 0.5 * math.log(2 * math.pi))

    def loss_terms(self, x: torch.Tensor, kl_weight: float = 1.0) -> dict[str, torch.Tensor]:
        """The negative ELBO (nats per sample; KL scaled by ``kl_weight`` for a warm-up, and while ``kl_weight < 1``
        balanced across groups as NVAE: group i weighted ∝ (KL_i + 0.01)/(h_i·w_i), mean weight 1): {"loss",
        "reconstruction"
        (−log p(x|z)), "kl" (Σ_i KL_i), "kl_groups" (G,)}, batch means."""
        post = self.posterior(x)
        reconstruction = -self.log_likelihood(x, post.logits).mean()
        kl_groups = torch.stack([kl.mean() for kl in post.kl])
        kl = kl_groups.sum()
        penalty = kl
        if kl_weight < 1:  # NVAE's KL balancing during the warm-up: groups with little KL are penalised less
            spatial = torch.tensor([h * w for _, h, w in self.group_shapes], dtype=kl.dtype, device=kl.device)
            coeff = (kl_groups.detach().abs() + 0.01) / spatial
            penalty = (kl_groups * coeff / coeff.mean()).sum()
        return {"loss": reconstruction + kl_weight * penalty, "reconstruction": reconstruction, "kl": kl,
                "kl_groups": kl_groups}


def channels_for_params(factor: float, **config) -> int:
    """The cell width whose ``HierarchicalVAE(**config, channels=…)`` has the parameter count closest to ``factor``
    times that of ``config`` (the baselines with 2× and 4× the parameters of the paper's Table 2)."""
    if not factor > 0:
        raise ValueError(f"factor must be > 0, got {factor}")
    base = HierarchicalVAE(**config).param_count()
    best, width = None, max(1, int(config.get("channels", 32) * min(1.0, math.sqrt(factor)) / 2))
    while True:
        miss = abs(HierarchicalVAE(**{**config, "channels": width}).param_count() - factor * base)
        if best is not None and miss > best[0]:
            return best[1]
        best = (miss, width) if best is None or miss < best[0] else best
        width += 1


class JointEBMPrior(nn.Module):
    """f(z) = Σ_i f_i(z_i) (the paper's sign: high = likely), one MLP per latent group on the flattened z_i:
    ``n_layers`` × [Linear(nef), LReLU(0.2)] → Linear(1) (the reference's per-layer ``_netEzi`` on vectors).

    Each f_i is held as ``fl.MLPEnergy(..., output_sign=-1)`` — an energy E_i = −f_i in the library's sign, whose
    network outputs f_i — so ``energies[i]`` can be handed to ``fl.langevin`` as it is (z-space chain of one group).
    """

    def __init__(self, group_dims: Sequence[int], nef: int = 32, n_layers: int = 2):
        super().__init__()
        if nef < 1 or n_layers < 1:
            raise ValueError(f"nef and n_layers must be >= 1, got nef={nef}, n_layers={n_layers}")
        self.config = dict(group_dims=[int(d) for d in group_dims], nef=nef, n_layers=n_layers)
        self.energies = nn.ModuleList(MLPEnergy([d] + [nef] * n_layers + [1], "leaky_relu", 0.2, output_sign=-1.0)
                                      for d in self.config["group_dims"])

    def per_group(self, z: Sequence[torch.Tensor]) -> torch.Tensor:
        """f_i(z_i) for each group: (B, G)."""
        if len(z) != len(self.energies):
            raise ValueError(f"expected {len(self.energies)} latent groups, got {len(z)}")
        return -torch.stack([e(zi) for e, zi in zip(self.energies, z)], 1)

    def forward(self, z: Sequence[torch.Tensor]) -> torch.Tensor:
        """f(z) = Σ_i f_i(z_i): (B,)."""
        return self.per_group(z).sum(1)


class EpsilonEnergy(nn.Module):
    """The ε-space energy of the joint EBM prior, for ``fl.langevin(energy, ε0, …, prior="normal")`` on flat
    ε (B, D'):

    * ``variant="paper"``: E(ε) = −f(T_β(ε)), target ∝ exp f(T_β(ε))·N(ε; 0, I) (supplement §1.3, eq. after 10);
    * ``variant="code"``:  E(ε) = −f(T_β(ε)) + Σ_i log σ_i(z_<i), target ∝ exp f(T_β(ε))·p_β(T_β(ε)) — what the
      reference code (and VAEBM) samples: it adds log p_β(T(ε)) = log N(ε; 0, I) − log|det ∂T/∂ε| to the drift.

    ``fixed``: z of the top k groups held fixed (hierarchical re-sampling); ε then covers groups k, k+1, ….
    This energy composes T_β (the decoder's prior nets) with the MLPs, so ``fl.langevin`` runs it on the step-op
    (graph) path, not the fused MLP chain.
    """

    def __init__(self, vae: HierarchicalVAE, prior: JointEBMPrior, variant: str = "paper", temperature: float = 1.0,
                 fixed: Sequence[torch.Tensor] | None = None):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        self.vae, self.prior, self.variant, self.temperature = vae, prior, variant, temperature
        self.fixed = None if fixed is None else [z.detach() for z in fixed]

    def forward(self, eps: torch.Tensor) -> torch.Tensor:
        zs, log_det = self.vae.transform(eps, self.temperature, self.fixed)
        energy = -self.prior(zs)
        return energy + log_det if self.variant == "code" else energy

    def fused_energy(self) -> str:
        """Why ``fl.langevin`` runs this energy step by step."""
        return "E(ε) = −f(T_β(ε)) first maps ε through the hierarchical VAE's prior networks, not one MLP"
