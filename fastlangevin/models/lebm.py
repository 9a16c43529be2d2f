"""Generators learned together with a latent-space EBM prior by maximum likelihood with short-run Langevin chains:
LEBM (Pang et al. 2020), its variational variant with an inference network, and the 2-layer joint EBM prior
(Cui, Wu & Han 2023, the ``joint-training`` code; ``/work/shared/reference-code.md`` §1, §2a, §2b).

Sign convention: every energy here is E, *low = likely* (the papers' f_α is −E). A model's prior is

    p_α(z) ∝ exp(−E(z)) · p_β(z),

p_β the generator's Gaussian prior: N(0, I) for LEBM (``prior == "normal"``: ``fl.langevin`` fuses it, so the prior
chain of the ``fl.MLPEnergy`` runs as one kernel), p(z₁|z₂)·N(z₂; 0, I) for the joint model (``prior`` is a
log-density callable, differentiated by autograd on the step-op path). The posterior target adds the likelihood:

    E_post(z | x) = ‖x − G(z)‖² / (2σ²) + E(z)    with the same prior p_β,

an ``fl.GaussianPosteriorEnergy`` of the model's energy and its generator sigmoid(MLP(z)) as an ``fl.MLP`` (sharing
the layers): LEBM's posterior chain runs as one fused kernel too; the joint model's runs on the step-op path (its
prior). Latents are flat vectors (B, latent_dim); the joint model concatenates [z₁, z₂] into one vector so that one
chain moves both layers.

Data are images in [0, 1], so G(z) = sigmoid(MLP(z)) and σ defaults to 0.15: LEBM's tanh generator with σ = 0.3 on
[−1, 1] data, mapped to [0, 1] (tanh(a) = 2·sigmoid(2a) − 1 halves every distance).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastlangevin.energies import MLP, GaussianPosteriorEnergy, MLPEnergy
from fastlangevin.models.nets import mlp

LLHD_SIGMA = 0.15


def _check_size(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    return value


def _check_images(data_shape) -> tuple[int, int, int]:
    data_shape = tuple(int(d) for d in data_shape)
    if len(data_shape) != 3:
        raise ValueError(f"data_shape must be an image shape (C, H, W) with pixels in [0, 1], got {data_shape}")
    return data_shape


class LatentEBM(nn.Module):
    """LEBM: z ~ p_α(z) ∝ exp(−E(z))·N(z; 0, I), x | z ~ N(G(z), σ²I).

    E = ``fl.MLPEnergy`` latent_dim → energy_width → energy_width → 1, GELU (LEBM's ``_netE``); G: an MLP
    latent_dim → generator_width → generator_width → C·H·W with leaky ReLU(0.2) and a sigmoid (LEBM: a no-BN conv
    generator; an MLP keeps the 8×8 digits fast and has no batch norm that would couple a chain's samples).
    ``config`` holds the constructor's arguments (``make_prior_model(model.name, **model.config)`` rebuilds it).
    """

    name = "lebm"
    prior = "normal"  # p_β, as fl.langevin names it
    # The reference's chains and optimiser (LEBM train_svhn.py defaults; h = s²).
    defaults = dict(posterior_steps=20, posterior_step_size=0.01, prior_steps=60, prior_step_size=0.16,
                    betas=(0.5, 0.999))

    def __init__(self, data_shape, latent_dim: int = 16, *, energy_width: int = 200, generator_width: int = 256,
                 llhd_sigma: float = LLHD_SIGMA):
        super().__init__()
        self.data_shape = _check_images(data_shape)
        for name, value in (("latent_dim", latent_dim), ("energy_width", energy_width),
                            ("generator_width", generator_width)):
            _check_size(name, value)
        if not (isinstance(llhd_sigma, (int, float)) and 0 < llhd_sigma < math.inf):
            raise ValueError(f"llhd_sigma must be a finite float > 0, got {llhd_sigma!r}")
        self.config = dict(data_shape=list(self.data_shape), latent_dim=latent_dim, energy_width=energy_width,
                           generator_width=generator_width, llhd_sigma=float(llhd_sigma))
        self.llhd_sigma = float(llhd_sigma)
        self.layer_dims = (latent_dim,)
        self.energy = MLPEnergy((latent_dim, energy_width, energy_width, 1), "gelu")
        self.generator = mlp([self.layer_dims[0], generator_width, generator_width, math.prod(self.data_shape)])

    @property
    def latent_dim(self) -> int:
        """Size of the flat latent vector the chains move (all layers together)."""
        return sum(self.layer_dims)

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """The mean of p(x|z): (B, latent_dim) → (B, C, H, W) in (0, 1)."""
        out = self.generator(z[:, : self.layer_dims[0]])
        return torch.sigmoid(out).reshape(z.shape[0], *self.data_shape)

    def generator_network(self) -> nn.Sequential:
        """G on z₁ = z[:, :layer_dims[0]] as Linear layers and activations, flattened output: sigmoid(MLP(z₁)),
        sharing the model's layers (the state dict keeps its keys)."""
        return nn.Sequential(self.generator, nn.Sigmoid())

    def squared_error(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """‖x − G(z)‖² per sample: x (B, C, H, W), z (B, latent_dim) → (B,)."""
        if x.shape[0] != z.shape[0] or tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"x must have shape ({z.shape[0]}, {', '.join(map(str, self.data_shape))}) for z of "
                             f"shape {tuple(z.shape)}, got {tuple(x.shape)}")
        return (x - self.generate(z)).pow(2).flatten(1).sum(1)

    def posterior_energy(self, x: torch.Tensor) -> "PosteriorEnergy":
        """The posterior chain's energy for the batch x (its prior is ``self.prior``); a trainer keeps one
        ``PosteriorEnergy`` for the whole run and refreshes its data instead."""
        return PosteriorEnergy(self).refresh(x)

    def initial_latents(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Chain starts z₀ ~ N(0, I), (n, latent_dim), fresh every iteration (the references are non-persistent;
        the joint model's code also draws z₁ independently of z₂)."""
        return torch.randn(n, self.latent_dim, generator=generator).to(device)

    def sample_base_prior(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Latents from p_β alone (the generator without its EBM): (n, latent_dim)."""
        return self.initial_latents(n, generator, device)

    def energy_loss(self, z_pos: torch.Tensor, z_neg: torch.Tensor) -> torch.Tensor:
        """mean E(z⁺) − mean E(z⁻): z⁺ posterior (or encoder) latents, z⁻ prior-chain latents, both (B, latent_dim).
        Its negative is the energy gap the progress bar shows."""
        return self.energy(z_pos.detach()).mean() - self.energy(z_neg.detach()).mean()

    def generator_loss(self, x: torch.Tensor, z_pos: torch.Tensor, z_neg: torch.Tensor) -> dict[str, torch.Tensor]:
        """LEBM's G loss: Σ‖x − G(z⁺)‖²/B (no 1/(2σ²), as the code; Adam is blind to the scale). {"loss",
        "reconstruction"}."""
        reconstruction = self.squared_error(x, z_pos.detach()).mean()
        return {"loss": reconstruction, "reconstruction": reconstruction}

    def energy_parameters(self) -> list[nn.Parameter]:
        return list(self.energy.parameters())

    def generator_parameters(self) -> list[nn.Parameter]:
        """Everything but the energies: generator, conditional prior, encoder."""
        ids = {id(p) for p in self.energy_parameters()}
        return [p for p in self.parameters() if id(p) not in ids]


class PosteriorEnergy(GaussianPosteriorEnergy):
    """z ↦ E(z) + ‖x − G(z)‖²/(2σ²), (B, latent_dim) → (B,): the posterior chain's energy of ``model`` (its prior
    is ``model.prior``) for a batch x held as a buffer: an ``fl.GaussianPosteriorEnergy`` of the model's energy and
    its generator as an ``fl.MLP`` (sharing the model's layers), so ``fl.langevin`` runs LEBM's posterior chain as
    one fused kernel. A training run builds one and calls ``refresh(x)`` with each batch: the data is copied in
    place (one buffer per batch size), so the energy handed to ``fl.langevin`` is the same module every iteration
    and a captured CUDA graph reads the new batch."""

    def __init__(self, model: "LatentEBM"):
        super().__init__(model.energy, MLP.from_sequential(model.generator_network()), model.llhd_sigma)
        self.data_shape = model.data_shape

    def refresh(self, x: torch.Tensor) -> "PosteriorEnergy":
        """Hold x (B, C, H, W) (detached) as the data of the chains of B samples; returns self."""
        if tuple(x.shape[1:]) != self.data_shape:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, self.data_shape))}), got {tuple(x.shape)}")
        return self.set_target(x)


class VariationalLatentEBM(LatentEBM):
    """LEBM with an inference network q(z|x) = N(μ(x), diag exp(log_var(x))) instead of the posterior chain (the
    variational scheme of the joint-EBM supplement §1.2, as coded in ``hierarchical-representation-ebm``
    ``train_fid.py`` L170-187). Encoder: the generator's mirror, C·H·W → width → width → 2·latent_dim."""

    name = "lebm-vi"

    def __init__(self, data_shape, latent_dim: int = 16, *, energy_width: int = 200, generator_width: int = 256,
                 llhd_sigma: float = LLHD_SIGMA):
        super().__init__(data_shape, latent_dim, energy_width=energy_width, generator_width=generator_width,
                         llhd_sigma=llhd_sigma)
        self.encoder = mlp([math.prod(self.data_shape), generator_width, generator_width, 2 * latent_dim])

    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q(z|x): mean and log-variance, each (B, latent_dim)."""
        return self.encoder(x.flatten(1)).chunk(2, dim=1)

    def variational_loss(self, x: torch.Tensor, generator: torch.Generator | None = None):
        """The encoder + generator loss, a negative ELBO under the prior exp(−E)·N(0, I) without its log Z:

            ‖x − G(z_q)‖²/(2σ²) + KL(q(z|x) ‖ N(0, I)) + E(z_q),   z_q = μ + exp(log_var/2)·ξ,

        batch means. (The follow-up code weighs an MSE by 10 where this takes the Gaussian −log p(x|z).) log Z's
        gradient reaches only the energy, through ``energy_loss(z_q, z_prior)``. Returns ({"loss",
        "reconstruction", "kl", "energy"}, z_q detached)."""
        mean, log_var = self.posterior(x)
        noise = torch.randn(mean.shape, generator=generator).to(mean)
        z = mean + torch.exp(0.5 * log_var) * noise
        reconstruction = self.squared_error(x, z).mean() / (2 * self.llhd_sigma ** 2)
        kl = 0.5 * (mean.pow(2) + log_var.exp() - 1 - log_var).sum(1).mean()
        energy = self.energy(z).mean()
        terms = {"loss": reconstruction + kl + energy, "reconstruction": reconstruction, "kl": kl, "energy": energy}
        return terms, z.detach()


class LayerEnergies(nn.Module):
    """E(u) = Σ_i E_i(u_i) for a latent u = [u_1, …, u_n] (B, Σ sizes) cut into layers of ``sizes``: (B,)."""

    def __init__(self, energies, sizes):
        super().__init__()
        self.energies, self.sizes = nn.ModuleList(energies), tuple(sizes)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return sum(e(part) for e, part in zip(self.energies, u.split(self.sizes, dim=1)))

    def fused_energy(self) -> str:
        """Why ``fl.langevin`` runs this energy step by step."""
        return "it is a sum of per-layer energies E_i(z_i), not one fl.MLPEnergy"


class JointLatentEBM(LatentEBM):
    """The 2-layer generator with a joint EBM prior (joint-training code, §2a):

        z₂ ~ N(0, I),  z₁ | z₂ ~ N(μ(z₂), σ(z₂)²) with σ = exp(log σ) + 0.01,  x | z₁ ~ N(G(z₁), σ_x² I),
        p_α(z₁, z₂) ∝ exp(−E₁(z₁) − E₂(z₂)) · p(z₁|z₂) · N(z₂; 0, I).

    The latent vector is u = [z₁, z₂], (B, latent_dim + latent_dim2). E₁: ``fl.MLPEnergy`` with 3 hidden layers of
    ``energy_width``, E₂: 2 of ``energy_width // 2`` (the code's 200 and 100), leaky ReLU(0.2); p(z₁|z₂): 4 hidden
    layers of ``conditional_width`` (200), leaky ReLU(0.2); G as LEBM's, on z₁.
    """

    name = "joint-mle"
    defaults = dict(LatentEBM.defaults, posterior_steps=40, betas=(0.9, 0.999))

    def __init__(self, data_shape, latent_dim: int = 16, latent_dim2: int = 8, *, energy_width: int = 200,
                 generator_width: int = 256, conditional_width: int = 200, llhd_sigma: float = LLHD_SIGMA):
        super().__init__(data_shape, latent_dim, energy_width=energy_width, generator_width=generator_width,
                         llhd_sigma=llhd_sigma)
        _check_size("latent_dim2", latent_dim2)
        _check_size("conditional_width", conditional_width)
        if energy_width < 2:
            raise ValueError(f"energy_width must be >= 2 for the joint model (E₂ takes half of it), got {energy_width}")
        self.config.update(latent_dim2=latent_dim2, conditional_width=conditional_width)
        self.layer_dims = (latent_dim, latent_dim2)
        width2 = energy_width // 2
        self.energy = LayerEnergies([MLPEnergy((latent_dim, *[energy_width] * 3, 1), "leaky_relu"),
                                     MLPEnergy((latent_dim2, width2, width2, 1), "leaky_relu")], self.layer_dims)
        self.conditional = mlp([latent_dim2, *[conditional_width] * 4, 2 * latent_dim])

    def conditional_normal(self, z2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and std of p(z₁|z₂): z₂ (B, latent_dim2) → two (B, latent_dim); std = exp(log σ) + 0.01."""
        mean, log_std = self.conditional(z2).chunk(2, dim=1)
        return mean, torch.exp(log_std) + 0.01

    def conditional_log_prob(self, u: torch.Tensor) -> torch.Tensor:
        """log p(z₁|z₂), normalised, summed over z₁: u = [z₁, z₂] (B, latent_dim) → (B,)."""
        z1, z2 = u.split(self.layer_dims, dim=1)
        mean, std = self.conditional_normal(z2)
        return (-0.5 * ((z1 - mean) / std).pow(2) - torch.log(std)).sum(1) - 0.5 * z1.shape[1] * math.log(2 * math.pi)

    def prior(self, u: torch.Tensor) -> torch.Tensor:
        """log p_β(z₁, z₂) = log p(z₁|z₂) − ‖z₂‖²/2 (up to a constant): (B, latent_dim) → (B,). The chains' prior."""
        return self.conditional_log_prob(u) - 0.5 * u[:, self.layer_dims[0]:].pow(2).sum(1)

    def sample_base_prior(self, n: int, generator: torch.Generator | None = None, device=None) -> torch.Tensor:
        """Ancestral draws from p_β: z₂ ~ N(0, I), z₁ ~ p(z₁|z₂); (n, latent_dim)."""
        noise = self.initial_latents(n, generator, device)
        z1_noise, z2 = noise.split(self.layer_dims, dim=1)
        with torch.no_grad():
            mean, std = self.conditional_normal(z2)
        return torch.cat([mean + std * z1_noise, z2], dim=1)

    def generator_loss(self, x: torch.Tensor, z_pos: torch.Tensor, z_neg: torch.Tensor) -> dict[str, torch.Tensor]:
        """The code's two generator losses, summed (their parameters are disjoint): Σ‖x − G(z₁⁺)‖²/(2σ²)/B and
        mean log p(z₁⁻|z₂⁻) − mean log p(z₁⁺|z₂⁺) (the MLE gradient of p(z₁|z₂) with its log Z term taken from the
        prior chain's samples). {"loss", "reconstruction", "conditional"}."""
        z_pos, z_neg = z_pos.detach(), z_neg.detach()
        reconstruction = self.squared_error(x, z_pos).mean() / (2 * self.llhd_sigma ** 2)
        conditional = self.conditional_log_prob(z_neg).mean() - self.conditional_log_prob(z_pos).mean()
        return {"loss": reconstruction + conditional, "reconstruction": reconstruction, "conditional": conditional}


PRIOR_MODELS = {"lebm": LatentEBM, "lebm-vi": VariationalLatentEBM, "joint-mle": JointLatentEBM}


def make_prior_model(name: str, **config) -> LatentEBM:
    """``make_prior_model("lebm", data_shape=(1, 8, 8), latent_dim=16)``; the keyword arguments are the class's."""
    if name not in PRIOR_MODELS:
        raise ValueError(f"unknown latent-EBM-prior model {name!r}; choose one of {tuple(PRIOR_MODELS)}")
    return PRIOR_MODELS[name](**config)
