"""The base class each paper's trainer fills in (the loop that runs it is ``trainers/loop.py``)."""

from __future__ import annotations

import functools
import json

import torch

from fastlangevin.trainers import distributed
from fastlangevin.trainers.chains import Chains
from fastlangevin.trainers.checkpoint import load_checkpoint
from fastlangevin.trainers.monitor import EarlyStopping
from fastlangevin.trainers.run_folder import RunFolder

SEED_STRIDE = 1_000_003  # seeds of step k: seed · SEED_STRIDE + k (batches, chain starts, chain noise)


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The indices of the batch at ``step``: a function of (seed, step) only, so a resumed run draws the same
    batches as an uninterrupted one."""
    generator = torch.Generator().manual_seed(seed * SEED_STRIDE + step)
    return torch.randint(0, n, (batch_size,), generator=generator)


class Trainer:
    """One paper's training run. A subclass, registered with ``@registry.register("command")`` (the first line of
    its docstring is the command's help), sets:

    ``Settings``       its settings dataclass (fields from ``settings.setting``)
    ``section``        its key in config.json (and ``<section>_training`` in metrics.json)
    ``checkpoint``     the latest checkpoint's file name (model, optimizer, step); ``best_checkpoint``: the best's
    ``folder_option``  "--out" (the command makes the run folder) or "run_dir" (an existing run, positional)
    ``log_every``      history entries every this many steps besides evaluations (None: at evaluations only)
    ``shown``          the step values on the progress bar
    ``inputs``         the config sections of other stages whose models it reads and its checkpoint does not hold
                       (a tilt reads the backbone): retraining those stages would leave it stale

    and implements ``build``, ``step`` and ``model_for`` (and, where it has them, ``prepare``, ``begin``,
    ``evaluate``, ``describe``, ``finish``, ``architecture``, ``companions``, ``summary``). ``build`` sets
    ``self.model`` (the module checkpoints hold) and ``self.optimizer``; chain energies are built there too, once
    per run, and reused every iteration.
    """

    command: str  # set by ``register``
    Settings: type
    section: str
    checkpoint: str
    best_checkpoint: str | None = None
    folder_option = "--out"
    log_every: int | None = None
    shown: tuple[str, ...] = ("loss",)
    batch_stream = 0  # batches are drawn with seed + batch_stream (kept per trainer: runs stay reproducible)
    inputs: tuple[str, ...] = ()

    def __init__(self, settings, ctx: distributed.DistributedContext, folder: RunFolder, saved: dict | None,
                 options):
        self.settings, self.ctx, self.folder, self.saved, self.options = settings, ctx, folder, saved, options
        self.device = ctx.device
        self.chains = Chains(getattr(settings, "sampler", "library"), ctx.device, self.command)
        self.model: torch.nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None

    @classmethod
    def help(cls) -> str:
        return (cls.__doc__ or cls.command).strip().split("\n\n")[0].replace("\n", " ")

    @property
    def metrics_key(self) -> str:
        return f"{self.section}_training"

    # -- what a paper supplies -------------------------------------------------------------------------------------
    @classmethod
    def preset(cls) -> dict:
        """Settings the command itself fixes (e.g. the model of "train-prior lebm")."""
        return {}

    @classmethod
    def upgrade(cls, section: dict) -> dict:
        """A config section as an earlier version wrote it, in today's layout."""
        return section

    @classmethod
    def model_for(cls, folder: RunFolder, section: dict, checkpoint: str) -> torch.nn.Module:
        """The module ``checkpoint`` holds, built from the config ``section`` it was written with."""
        raise NotImplementedError

    @classmethod
    def load(cls, folder: RunFolder, which: str = "last") -> tuple[torch.nn.Module, dict, dict]:
        """The trained model of ``folder`` (``which``: "last", or "best" falling back to the last) in eval mode with
        frozen parameters, the config section it was written with, and the checkpoint's metadata."""
        name = cls.best_checkpoint if which == "best" and cls.best_checkpoint and folder.has(cls.best_checkpoint) \
            else cls.checkpoint
        section = cls.upgrade(folder.require(cls.section, name, f"train it first: fastlangevin {cls.command}"))
        model = cls.model_for(folder, section, name)
        meta = load_checkpoint(folder.file(name), model)
        return model.eval().requires_grad_(False), section, meta

    @classmethod
    def resume_section(cls, folder: RunFolder) -> dict | None:
        """The saved config section ``--resume`` continues (None: nothing to load, start from the given settings)."""
        section = folder.section(cls.section, cls.checkpoint) if folder.has(cls.checkpoint) else None
        if section is None:
            raise FileNotFoundError(f"--resume: no {cls.checkpoint} in {folder.path}; start without --resume")
        return cls.upgrade(section)

    def prepare(self) -> None:
        """Inputs made before the run's seed is set: frozen models, an earlier stage."""

    def build(self) -> None:
        raise NotImplementedError

    def begin(self, start: int) -> None:
        """Called after a resumed checkpoint is loaded (or not), before the first step ``start``."""

    def step(self, step: int) -> dict:
        """One training iteration; returns its values (global-batch means) for the history and progress bar."""
        raise NotImplementedError

    def evaluate(self, step: int) -> dict:
        """Rank 0, at evaluations: what to add to the history entry of ``step``."""
        return {}

    def describe(self, step: int, entry: dict, stopping: EarlyStopping | None) -> str | None:
        """The line printed after an evaluation (None: nothing)."""
        return stopping.describe(step, self.stopping_quality(entry)) if stopping is not None else None

    def stopping_quality(self, entry: dict) -> dict:
        """The metrics early stopping compares."""
        return entry

    def finish(self, state) -> None:
        """Rank 0, after the last step: figures (``state``: the loop's ``LoopState``)."""

    def architecture(self) -> dict:
        """What config.json keeps beside the settings to rebuild the model (e.g. ``{"model_config": ...}``)."""
        return {}

    def companions(self) -> dict:
        """Other stages' config sections the checkpoints record beside this one's (the models it was trained on)."""
        return {}

    def summary(self, state, last: dict) -> dict:
        """Keys the metrics add to the loop's (``last``: the last step's values)."""
        return {}

    @staticmethod
    def report(metrics: dict) -> str:
        """What the command prints at the end."""
        if "best" in metrics:
            best = metrics["best"]
            return f"best validation {best['metric']} {best['value']:.5g} at step {best['step']}"
        return json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2)

    # -- helpers for the papers ------------------------------------------------------------------------------------
    def data_source(self) -> dict:
        """Where the data comes from: ``data``, ``data_dir``, ``seed``, ``n_train``, ``classes``."""
        settings = self.settings
        return dict(data=settings.data, data_dir=settings.data_dir, seed=settings.seed,
                    n_train=getattr(settings, "n_train", None), classes=getattr(settings, "classes", None))

    def dataset(self, split: str, n_samples: int | None = None):
        """The ``split`` of the run's data set (the training split: ``n_train`` samples)."""
        from fastlangevin.data import make_dataset
        source = self.data_source()
        n = source.get("n_train") if split == "train" else n_samples
        return make_dataset(source["data"], source["data_dir"], split, seed=source["seed"], n_samples=n,
                            classes=source.get("classes"))

    @functools.cached_property
    def train_set(self):
        return self.dataset("train")

    @functools.cached_property
    def x_train(self) -> torch.Tensor:
        return self.train_set.tensors()[0]

    def global_batch(self, step: int) -> torch.Tensor:
        """The training batch of ``step`` (every rank's rows), on the device."""
        settings = self.settings
        index = batch_indices(len(self.x_train), settings.batch_size, settings.seed + self.batch_stream, step)
        return self.x_train[index].to(self.device)

    def batch(self, step: int) -> torch.Tensor:
        """This rank's rows of the training batch of ``step``, on the device."""
        return self.ctx.shard(self.global_batch(step))

    def step_seed(self, step: int) -> int:
        return self.settings.seed * SEED_STRIDE + step
