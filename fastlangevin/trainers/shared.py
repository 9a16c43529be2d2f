"""What more than one trainer uses (a trainer never imports another paper's trainer): settings several trainers
share (declared here once), and helpers."""

from __future__ import annotations

import dataclasses
import math

import torch

from fastlangevin.trainers.chains import SAMPLERS
from fastlangevin.trainers.settings import LazyChoices, setting


def _datasets() -> tuple[str, ...]:
    from fastlangevin.data import DATASETS
    return DATASETS


@dataclasses.dataclass
class DataSettings:
    """The data set a trainer learns from (``Trainer.dataset``); ``epochs`` sets the trainer's ``steps``."""

    data: str = setting(None, "the data set: %(choices)s (fastlangevin.data.DATASETS)", required=True,
                        choices=LazyChoices(_datasets), metavar="DATA")
    data_dir: str | None = setting(None, "folder of the mnist / fashion-mnist / cifar10 files (nothing is downloaded; "
                                         "fashion-mnist and fashion5k default to Debian's /usr/share/datasets)")
    n_train: int | None = setting(None, "keep the first N training samples (toys: draw N; default 10000)", low=1)
    classes: list[int] | None = setting(None, "keep only these labels (image data sets)", low=0)
    epochs: float | None = setting(None, "passes over the training set (instead of --steps)", above=0,
                                   exclusive="length")


@dataclasses.dataclass
class SeedSettings:
    seed: int = setting(0, "random seed (initialisation, batches, chains)", low=0, high=2 ** 32)


@dataclasses.dataclass
class ChainSettings:
    sampler: str = setting("library", "chains by fl.langevin or by the hand-written loop (chain-cost comparisons)",
                           choices=SAMPLERS, resume="invocation")


def validation_set(source: dict, n: int):
    """Held-out data for early stopping: the data set's validation split (disjoint from the training split the
    batches come from and from the test split that ``evaluate`` reports on; for toys an independent draw), at most n
    samples. ``source``: ``data``, ``data_dir``, ``seed``, ``classes`` (a trainer's ``data_source()``)."""
    from fastlangevin.data import make_dataset
    return make_dataset(source["data"], source["data_dir"], "validation", seed=source["seed"], n_samples=n,
                        classes=source.get("classes"))


def contrastive_step(ctx, energy_loss, optimizer, x_pos: torch.Tensor, x_neg: torch.Tensor, reg: float,
                     where: str) -> dict:
    """One maximum-likelihood update of an energy on this rank's positives x⁺ and negatives x⁻ (B/N, ...):
    loss = mean E(x⁺) − mean E(x⁻) + reg·(mean E(x⁺)² + mean E(x⁻)²), one forward of ``energy_loss`` (the energy
    as ``ctx.wrap`` returns it) on both. Returns {"loss", "energy_gap": mean E(x⁻) − mean E(x⁺)}, averaged over
    ranks; a non-finite loss raises FloatingPointError naming ``where`` on every rank."""
    e_pos, e_neg = energy_loss(torch.cat([x_pos, x_neg])).split([len(x_pos), len(x_neg)])
    loss = e_pos.mean() - e_neg.mean() + reg * (e_pos.pow(2).mean() + e_neg.pow(2).mean())
    loss_value = ctx.all_reduce_mean(loss.item())
    if not math.isfinite(loss_value):
        raise FloatingPointError(f"{where}: the loss is {loss_value}; lower --lr or raise --reg")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return {"loss": loss_value, "energy_gap": ctx.all_reduce_mean((e_neg.mean() - e_pos.mean()).item())}


def transition_steps(total: int) -> list[int]:
    """The chain steps a Langevin-transition figure records: 0, a tenth, a quarter, half and all of ``total``."""
    return sorted({0, total // 10, total // 4, total // 2, total})
