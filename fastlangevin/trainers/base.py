"""``train-base``: train a backbone (VAE, GLOW, GLF) on a data set and write a run directory.

RUN_DIR/config.json      {"base": settings, model_config}
RUN_DIR/base.safetensors model + Adam state + step (atomic; ``--resume`` continues from it)
RUN_DIR/metrics.json     {"base_training": final loss, speed, sample quality against the test split}
RUN_DIR/base_samples.png a scatter (toys) or image grid of G(z), z ~ N(0, I)

Under ``torchrun`` (``fastlangevin.trainers.distributed``) each of N ranks takes B/N rows of the same global batch
of ``batch_size`` B and DDP averages the gradients; rank 0 writes the run directory.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from fastlangevin.models import MODELS, LatentGenerativeModel, make_model
from fastlangevin.trainers import distributed
from fastlangevin.trainers.loop import train
from fastlangevin.trainers.quality import plot_panels, sample_quality
from fastlangevin.trainers.registry import register
from fastlangevin.trainers.run_folder import RunFolder
from fastlangevin.trainers.settings import setting
from fastlangevin.trainers.shared import DataSettings, SeedSettings
from fastlangevin.trainers.trainer import Trainer

BASE_CHECKPOINT = "base.safetensors"


def default_model_config(model: str, data_shape, latent_dim: int | None = None, width: int | None = None) -> dict:
    """Constructor arguments for ``make_model(model, **config)`` on data of ``data_shape``. Latent sizes: 2 for 2-D
    toys, 16 for the 8×8 digits, the paper's 100 (VAE) / 64 (GLF) for larger images; GLOW's latent is the data."""
    data_shape = list(data_shape)
    config: dict = {"data_shape": data_shape}
    if model in ("vae", "glf"):
        if latent_dim is None:
            latent_dim = 2 if len(data_shape) == 1 else 16 if data_shape[-1] <= 8 else (100 if model == "vae" else 64)
        config["latent_dim"] = latent_dim
        if width is not None:
            config["width"] = width
    elif model == "glow":
        if latent_dim is not None:
            raise ValueError("--latent-dim does not apply to glow (its latent is as large as the data)")
        if width is not None:
            config["hidden"] = width
        if len(data_shape) == 3 and data_shape[-1] <= 8:
            config["n_bins"] = 17  # the 8×8 digits take 17 grey levels
    else:
        raise ValueError(f"unknown model {model!r}; choose vae, glow or glf")
    return config


def load_base(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[LatentGenerativeModel, dict]:
    """The trained backbone of ``run_dir`` in eval mode (batch norms use their running statistics inside chains)
    with frozen parameters, and the run's config (its "base" section: the one the checkpoint was written with)."""
    folder = RunFolder(run_dir)
    base, section, _ = BaseTrainer.load(folder)
    return base.to(device), {**folder.config(), "base": section}


@dataclasses.dataclass
class BaseSettings(DataSettings, SeedSettings):
    model: str = setting(None, "the backbone", choices=tuple(MODELS), required=True, positional=True)
    steps: int = setting(2000, "training batches", low=1, resume="extend", exclusive="length")
    batch_size: int = setting(256, "rows per batch (the global batch under torchrun)", low=1)
    lr: float = setting(1e-3, "Adam learning rate", above=0)
    latent_dim: int | None = setting(None, "vae/glf latent size (default by data)", low=1)
    width: int | None = setting(None, "network width (default by model and data)", low=1)
    n_eval: int = setting(2000, "samples scored against the test split at the end", low=2)
    checkpoint_every: int = setting(500, "steps between checkpoints", low=1, resume="invocation")


@register("train-base")
class BaseTrainer(Trainer):
    """train a backbone (vae, glow, glf) and write a run directory

    Maximum likelihood (VAE: the ELBO) with Adam, the batches a function of (seed, step)."""

    Settings, section, checkpoint, log_every = BaseSettings, "base", BASE_CHECKPOINT, 50

    @classmethod
    def model_for(cls, folder, section: dict, checkpoint: str):
        return make_model(section["model"], **section["model_config"])

    def build(self) -> None:
        from fastlangevin.data import TOY_DATASETS
        settings = self.settings
        self.test_set = self.dataset("test", settings.n_eval if settings.data in TOY_DATASETS else None)
        shape = self.train_set.sample_shape
        config = (self.saved["model_config"] if self.saved is not None
                  else default_model_config(settings.model, shape, settings.latent_dim, settings.width))
        self.model = make_model(settings.model, **config).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.lr)

    def begin(self, start: int) -> None:
        self.model.train()
        if start < self.settings.steps:  # actnorms initialise on the first global batch, the same on every rank
            distributed.init_on_global_batch(self.model, self.global_batch(start))
        self.loss_terms = self.ctx.wrap(self.model, "loss_terms")  # DDP; checkpoints and sampling use the model

    def step(self, step: int) -> dict:
        terms = self.loss_terms(self.batch(step))
        loss = self.ctx.all_reduce_mean(terms["loss"].item())
        if not math.isfinite(loss):
            raise FloatingPointError(f"train-base: the loss is {loss} at step {step}; lower --lr")
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        self.optimizer.step()
        return {k: self.ctx.all_reduce_mean(v.item()) for k, v in terms.items()}

    def _samples(self) -> torch.Tensor:
        n = min(self.settings.n_eval, len(self.test_set))
        with torch.no_grad():
            return self.model.eval().sample(n, generator=torch.Generator().manual_seed(self.settings.seed)).cpu()

    def evaluate(self, step: int) -> dict:
        settings = self.settings
        self.samples = self._samples()
        quality = sample_quality(self.samples, self.test_set, data_dir=settings.data_dir, data_seed=settings.seed)
        return {"sample_quality": quality}

    def finish(self, state) -> None:
        samples = getattr(self, "samples", None)
        samples = self._samples() if samples is None else samples
        plot_panels([(f"{self.settings.model} samples", samples),
                     ("held-out data", self.test_set.tensors()[0][: len(samples)])],
                    self.folder.file("base_samples.png"), self.test_set)

    def architecture(self) -> dict:
        return {"model_config": self.model.config}

    def summary(self, state, last: dict) -> dict:
        final = state.history[-1] if state.history else {}
        return {"final_loss": final.get("loss", float("nan")), "sample_quality": final.get("sample_quality")}


def train_base(model: str, data: str, out: str | os.PathLike, **settings) -> dict:
    """``fastlangevin train-base MODEL --data DATA --out OUT``: settings by name (``BaseSettings``; ``resume``,
    ``device``, ``progress`` as ``loop.train``); returns the metrics."""
    return train(BaseTrainer, out, model=model, data=data, **settings)
