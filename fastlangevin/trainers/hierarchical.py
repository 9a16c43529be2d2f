"""``train-prior gaussian``: the hierarchical VAE (``models.hierarchical``) with its hierarchical Gaussian prior
p_β, the baseline of the multi-layer generator paper and the generator its joint EBM prior (``train-prior joint``,
``trainers/hierarchical_ebm.py``) is learned on; and the ε-space sampling and figures both use.

The ELBO, rec + Σ_i KL(q(z_i|x, z_<i) ‖ p_β(z_i|z_<i)), KL weight warmed up linearly over the first ``kl_warmup``
share of the steps; Adam(lr_g). RUN_DIR: config.json {"vae"}, vae.safetensors (the VAE + Adam, step),
metrics.json {"vae_training"} with sample quality against the test split, samples.png,
hierarchical_resampling.png.

Multi-process (``torchrun``): each rank takes its B/N rows of the same global batch and draws its own
reparametrisation noise (rank 0 keeps the single-process one); DDP averages the gradients; the logged losses and the
divergence checks are those of the global batch. Rank 0 evaluates and writes. Equal to one process in distribution
only (see ``trainers.distributed``); besides, the KL balancing of the warm-up weights the groups by each rank's own
batch KLs.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from fastlangevin.models.hierarchical import DECODERS, EpsilonEnergy, HierarchicalVAE, channels_for_params
from fastlangevin.trainers.chains import langevin_transition, run_chain
from fastlangevin.trainers.loop import train
from fastlangevin.trainers.quality import plot_panels, plot_transition, sample_quality
from fastlangevin.trainers.registry import register
from fastlangevin.trainers.run_folder import RunFolder
from fastlangevin.trainers.settings import setting
from fastlangevin.trainers.shared import DataSettings, SeedSettings
from fastlangevin.trainers.trainer import Trainer

VAE_CHECKPOINT = "vae.safetensors"


def sample_epsilon(energy: EpsilonEnergy | None, eps0: torch.Tensor, n_steps: int, step_size: float, *,
                   seed: int = 0, sampler: str = "library") -> torch.Tensor:
    """ε_K of the ε-space chain on ``energy`` from ``eps0`` (B, D'); without an EBM (``energy`` None: the Gaussian
    prior) ε_0 itself, already a sample of N(0, I)."""
    if energy is None or n_steps == 0:
        return eps0
    return run_chain(energy, eps0, n_steps, step_size, prior="normal", seed=seed, sampler=sampler)


def generate(vae: HierarchicalVAE, energy: EpsilonEnergy | None, n: int, n_steps: int, step_size: float, *,
             seed: int = 0, sampler: str = "library", batch_size: int = 500) -> torch.Tensor:
    """n images G(T_β(ε_K)) (ε_K = ε_0 ~ N(0, I) for the Gaussian prior), in batches: (n, *data_shape), CPU."""
    out, generator = [], torch.Generator().manual_seed(seed)
    h0 = vae.h0  # the VAE's device and dtype
    for i in range(0, n, batch_size):
        eps0 = torch.randn(min(batch_size, n - i), vae.latent_dim, generator=generator, dtype=h0.dtype).to(h0.device)
        eps = sample_epsilon(energy, eps0, n_steps, step_size, seed=seed + i, sampler=sampler)
        with torch.no_grad():
            out.append(vae.generate(eps).cpu())
    return torch.cat(out)


def resample_lower(vae: HierarchicalVAE, energy: EpsilonEnergy | None, x: torch.Tensor, keep: int, n_steps: int,
                   step_size: float, *, seed: int = 0, sampler: str = "library"):
    """Hierarchical re-sampling (supplement §2.3): the top ``keep`` groups from the inference network (posterior
    means for x), the groups below re-sampled from the prior given them — for the EBM prior (``energy``) by an
    ε-space chain over the lower groups only with the top fixed (``n_steps`` of ``step_size``), for the Gaussian
    prior ancestrally. Returns (z per group, the decoded images (B, *data_shape)); z[:keep] are the inference
    network's."""
    if not 0 <= keep < len(vae.group_shapes):
        raise ValueError(f"keep must be in [0, {len(vae.group_shapes) - 1}] (groups kept from the inference "
                         f"network), got {keep}")
    with torch.no_grad():
        fixed = vae.posterior(x, mean=True).z[:keep]
    eps0 = torch.randn(x.shape[0], sum(vae.group_dims[keep:]), generator=torch.Generator().manual_seed(seed),
                       dtype=x.dtype).to(x.device)
    if energy is not None and keep:  # a chain conditioned on the kept groups: another target
        energy = EpsilonEnergy(vae, energy.prior, energy.variant, fixed=fixed)
    eps = sample_epsilon(energy, eps0, n_steps, step_size, seed=seed, sampler=sampler)
    with torch.no_grad():
        zs, _ = vae.transform(eps, fixed=fixed)
        return zs, vae.decode(zs)


def figures(folder: RunFolder, vae, energy: EpsilonEnergy | None, test_set, samples, n_steps: int,
            step_size: float, seed: int, sampler: str) -> None:
    """samples.png, hierarchical_resampling.png and (EBM prior) langevin_transition.png."""
    label = "joint EBM prior" if energy is not None else "hierarchical Gaussian prior"
    plot_panels([(label, samples), ("held-out data", test_set.tensors()[0][: len(samples)])],
                folder.file("samples.png"), test_set)
    h0 = vae.h0  # the VAE's device and dtype
    x = test_set.tensors()[0][:8].to(device=h0.device, dtype=h0.dtype)
    with torch.no_grad():
        columns = [x.cpu(), vae.decode(vae.posterior(x, mean=True).z).cpu()]
    groups = len(vae.group_shapes)
    columns += [resample_lower(vae, energy, x, keep, n_steps, step_size, seed=seed + keep, sampler=sampler)[1].cpu()
                for keep in range(groups - 1, -1, -1)]
    grid = torch.stack(columns, 1).flatten(0, 1)
    plot_panels([(f"data | recon. | top {groups - 1}..0 groups kept", grid)],
                folder.file("hierarchical_resampling.png"), n_cols=len(columns))
    if energy is not None:
        eps0 = torch.randn(8, vae.latent_dim, generator=torch.Generator().manual_seed(seed + 1), dtype=h0.dtype)
        at_steps = sorted({0, n_steps // 4, n_steps // 2, n_steps, 2 * n_steps})
        snapshots = langevin_transition(energy, eps0.to(h0.device), at_steps, step_size, vae.generate, seed=seed,
                                        prior="normal", sampler=sampler)
        plot_transition(snapshots, folder.file("langevin_transition.png"), "ε-space chains")


def check_finite(value: float, what: str, step: int, hint: str) -> None:
    if not math.isfinite(value) or abs(value) > 1e9:  # the reference's stop condition
        raise FloatingPointError(f"{what} is {value} at step {step}; {hint}")


@dataclasses.dataclass
class VAESettings(DataSettings, SeedSettings):
    """The hierarchical VAE's settings: ``gaussian``'s, and the VAE stage's of ``joint``."""

    batch_size: int = setting(64, "rows per batch (the global batch under torchrun)", low=1)
    lr_g: float = setting(1e-3, "Adam lr of the VAE (its own stage)", above=0)
    kl_warmup: float = setting(0.3, "share of the VAE steps warming up the KL", low=0, high=1)
    latent_channels: list[int] = setting([8, 4, 2], "channels per latent group, top first", low=1)
    channels: int = setting(16, "cell width", low=1, exclusive="width")
    param_factor: float | None = setting(None, "instead of --channels: the width for this multiple of the "
                                               "parameters (the 2x / 4x baselines)", above=0, exclusive="width")
    n_cells: int = setting(1, "residual cells per resolution", low=0)
    decoder: str = setting("gaussian", "p(x|z): N(sigmoid(logits), 0.15^2) or Bernoulli(logits) (binary-ish "
                                       "data: on MNIST the Gaussian's saturates to black at lr 1e-3)",
                           choices=DECODERS)

    def vae_config(self, data_shape) -> dict:
        config = dict(data_shape=list(data_shape), latent_channels=list(self.latent_channels), channels=self.channels,
                      n_cells=self.n_cells, decoder=self.decoder)
        if self.param_factor is not None:
            config["channels"] = channels_for_params(self.param_factor, **config)
        return config


@dataclasses.dataclass
class GaussianSettings(VAESettings):
    steps: int = setting(1500, "training batches", low=1, resume="extend", exclusive="length")
    checkpoint_every: int = setting(500, "steps between checkpoints", low=1, resume="invocation")


@register("train-prior gaussian")
class GaussianTrainer(Trainer):
    """the NVAE-style hierarchical VAE with its Gaussian prior (the baseline), by its ELBO"""

    Settings, section, checkpoint = GaussianSettings, "vae", VAE_CHECKPOINT
    log_every, shown, figures = 50, ("loss", "kl"), True

    @classmethod
    def model_for(cls, folder, section: dict, checkpoint: str) -> HierarchicalVAE:
        return HierarchicalVAE(**section["model_config"])

    def build(self) -> None:
        settings = self.settings
        self.test_set = self.dataset("test")
        config = (self.saved["model_config"] if self.saved is not None
                  else settings.vae_config(self.train_set.sample_shape))
        self.model = HierarchicalVAE(**config).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.lr_g)

    def begin(self, start: int) -> None:
        self.warmup_steps = max(1, round(self.settings.kl_warmup * self.settings.steps))
        self.model.train()
        self.loss_terms = self.ctx.wrap(self.model, "loss_terms")  # DDP; evaluation and checkpoints use the VAE

    def step(self, step: int) -> dict:
        terms = self.loss_terms(self.batch(step), kl_weight=min(1.0, (step + 1) / self.warmup_steps))
        logged = dict(zip(terms, self.ctx.mean_over_ranks(list(terms.values()))))  # the global batch's means
        check_finite(logged["loss"].item(), "the negative ELBO", step, "lower --lr-g")
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.optimizer.step()
        return {k: v.item() if v.dim() == 0 else v.tolist() for k, v in logged.items()}

    def evaluate(self, step: int) -> dict:
        self.model.eval()
        self.samples = generate(self.model, None, len(self.test_set), 0, 1.0, seed=self.settings.seed + 12345)
        quality = sample_quality(self.samples, self.test_set)
        quality.pop("mmd_bandwidths")
        return {"sample_quality": quality}

    def finish(self, state) -> None:
        if self.figures:
            samples = getattr(self, "samples", None)
            samples = generate(self.model.eval(), None, len(self.test_set), 0, 1.0,
                               seed=self.settings.seed + 12345) if samples is None else samples
            figures(self.folder, self.model, None, self.test_set, samples, 0, 1.0, self.settings.seed, "library")

    def architecture(self) -> dict:
        return {"model": "hvae", "model_config": self.model.config}

    def summary(self, state, last: dict) -> dict:
        final = state.history[-1] if state.history else {}
        return {"param_count": self.model.param_count(), "sample_quality": final.get("sample_quality")}


class VAEStage(GaussianTrainer):
    """The VAE stage of ``joint``: ``gaussian`` without its figures (not a command)."""

    figures = False



def train_gaussian(data: str, out: str | os.PathLike, **settings) -> dict:
    """``fastlangevin train-prior gaussian --data DATA --out OUT``: settings by name (``GaussianSettings``;
    ``resume``, ``device``, ``progress`` as ``loop.train``); returns the metrics."""
    return train(GaussianTrainer, out, data=data, **settings)
