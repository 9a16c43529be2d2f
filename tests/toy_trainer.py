"""A trainer in one file, as a third paper would add one: its settings, one training step, an evaluation.

It fits the mean μ of a toy data set by gradient descent on mean ‖x − μ‖² and is offered as ``fastlangevin
train-toy`` by one line: an entry point (``tests/test_trainer_api.py`` installs it) or a line in
``fastlangevin.trainers.registry.TRAINER_MODULES``. Everything else — run folder, config.json, ``--resume``,
checkpoints, evaluation, progress, torchrun — is the shared loop's.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from fastlangevin.trainers.registry import register
from fastlangevin.trainers.settings import setting
from fastlangevin.trainers.trainer import Trainer


@dataclasses.dataclass
class ToySettings:
    data: str = setting("25gaussians", "a 2-D toy data set", choices=("25gaussians", "swissroll"))
    data_dir: str | None = setting(None, "unused by toys", cli=False)
    n_train: int = setting(256, "training set size", low=1)
    steps: int = setting(6, "gradient steps", low=1, resume="extend")
    batch_size: int = setting(32, "rows per batch", low=1)
    lr: float = setting(0.5, "SGD learning rate", above=0)
    eval_every: int = setting(3, "steps between evaluations", low=1)
    seed: int = setting(0, "random seed", low=0)


class Mean(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.mu = nn.Parameter(torch.randn(dim))


@register("train-toy")
class ToyTrainer(Trainer):
    """fit the mean of a toy data set (an example of a trainer in one file)"""

    Settings, section, checkpoint = ToySettings, "toy", "toy.safetensors"

    def build(self) -> None:
        self.model = Mean(self.train_set.sample_shape[0]).to(self.device)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.settings.lr)

    def step(self, step: int) -> dict:
        loss = (self.batch(step) - self.model.mu).pow(2).sum(1).mean()
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()
        return {"loss": loss.item()}

    def evaluate(self, step: int) -> dict:
        return {"distance": (self.model.mu.detach() - self.x_train.mean(0)).norm().item()}
