"""The one training loop, which runs every paper's ``Trainer`` (``trainers/trainer.py``).

The loop owns the mechanism: the run folder and its config.json, settings (checked before anything is written),
``--resume``, the data sets and batches, the progress bar, checkpoints, evaluation and early stopping, rank-0
writing and the broadcast of rank 0's decisions under ``torchrun`` (``trainers.distributed``). A trainer supplies
its settings dataclass and the few functions that differ: ``build`` (models, optimizer, chain energies), ``step``
(one training iteration), ``evaluate``, ``finish`` (figures) and what its summary adds.

Settings the loop reads by name: ``seed``, ``steps``, ``batch_size`` (every trainer) and, where a trainer declares
them, ``epochs`` (sets ``steps`` from the training set's size), ``eval_every`` (evaluations between the last step's),
``checkpoint_every`` (checkpoints besides those at evaluations and the last step), ``stop_on`` and ``patience``
(early stopping: the best model goes to ``best_checkpoint``), ``sampler`` (the training chains' sampler).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time

import torch

from fastlangevin.trainers import distributed
from fastlangevin.trainers.checkpoint import load_checkpoint, save_checkpoint
from fastlangevin.trainers.monitor import EarlyStopping, Progress
from fastlangevin.trainers.run_folder import RunFolder
from fastlangevin.trainers.settings import make_settings, resume_values, setting, to_config
from fastlangevin.trainers.trainer import Trainer


@dataclasses.dataclass
class RunOptions:
    """How a command runs, whatever the trainer: not part of what it learns, not saved with the run."""

    resume: bool = setting(False, "continue from the run's checkpoint with the run's settings (--steps may grow)")
    device: str = setting("cpu", "cpu, cuda or cuda:N")
    progress: bool = setting(True, "the progress bar on stderr (off when stderr is not a terminal: a line every "
                                   "30 s instead; TQDM_DISABLE=1 turns it off too)")


@dataclasses.dataclass
class LoopState:
    """What the loop carries across steps and into checkpoints: the history, early stopping's best, and the time
    spent (over every session of a resumed run)."""

    history: list = dataclasses.field(default_factory=list)
    best: dict | None = None
    seconds: float = 0.0  # wall time in the loop, evaluations included
    eval_seconds: float = 0.0
    chain_seconds: float = 0.0  # training chains
    steps_run: int = 0

    @classmethod
    def restore(cls, meta: dict, metrics: dict) -> "LoopState":
        """The state saved in a checkpoint's metadata, or (a checkpoint written before they held it) rebuilt from
        the run's metrics, cut at the checkpoint's step."""
        saved = meta.get("extra", {}).get("loop")
        if saved is None:
            saved = {k: metrics[k] for k in ("history", "best", "chain_seconds") if metrics.get(k) is not None}
            saved["history"] = [h for h in saved.get("history", []) if h["step"] <= meta["step"]]
        return cls(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(cls)}})


def run_settings(trainer_cls, folder: RunFolder, given: dict, resume: bool):
    """The checked settings of a run (``given`` by name; with ``resume``, over the saved ones) and the saved config
    section (None for a fresh start). Raises before anything is written."""
    where = f"fastlangevin {trainer_cls.command}"
    given = {**given, **trainer_cls.preset()}
    saved = trainer_cls.resume_section(folder) if resume else None
    values = resume_values(trainer_cls.Settings, saved, given, where) if saved is not None else given
    return make_settings(trainer_cls.Settings, values, where), saved


def train(trainer_cls, folder, *, resume: bool = False, device: str = "cpu", progress: bool = True,
          **given) -> dict:
    """Run ``trainer_cls`` in the run folder ``folder`` with the settings ``given`` by name (the others: their
    defaults; with ``resume``: the run's); returns the metrics (also in metrics.json). Under ``torchrun`` every rank
    calls this; rank 0 writes and returns what it wrote on every rank."""
    folder = RunFolder(folder)
    settings, saved = run_settings(trainer_cls, folder, given, resume)
    options = RunOptions(resume=resume, device=device, progress=progress)
    with distributed.setup(device) as ctx:
        return _Loop(trainer_cls(settings, ctx, folder, saved, options)).run()


class _Loop:
    def __init__(self, trainer: Trainer):
        self.trainer, self.settings, self.ctx = trainer, trainer.settings, trainer.ctx

    def run(self) -> dict:
        trainer, settings, ctx = self.trainer, self.settings, self.ctx
        trainer.prepare()
        torch.manual_seed(settings.seed)
        trainer.build()
        if getattr(settings, "epochs", None) is not None and trainer.saved is None:
            settings.steps = max(1, math.ceil(settings.epochs * len(trainer.train_set) / settings.batch_size))
        ctx.check_batch(settings.batch_size)
        self.state, start = LoopState(), 0
        self.progress = Progress(trainer.command, settings.steps, enabled=trainer.options.progress and ctx.is_main)
        if trainer.saved is not None:
            meta = load_checkpoint(trainer.folder.file(trainer.checkpoint), trainer.model, trainer.optimizer,
                                   restore_rng=True)
            start = meta["step"]
            self.state = LoopState.restore(meta, trainer.folder.metrics().get(trainer.metrics_key, {}))
            if ctx.is_main:
                self.progress.write(f"resuming {trainer.command} from step {start} of {settings.steps}")
        if ctx.rank:  # rank 0 keeps the single-process random stream; the others draw their own
            torch.manual_seed(ctx.rank_seed(trainer.step_seed(start) + 2 ** 61))
        trainer.chains.timer.seconds = self.state.chain_seconds
        stopping = None
        if hasattr(settings, "stop_on"):
            stopping = EarlyStopping(settings.stop_on, settings.patience, settings.eval_every, self.state.best)
        trainer.begin(start)
        self.session_start, self.seconds_before, self.reached, last = time.perf_counter(), self.state.seconds, start, {}
        self.progress.start(start)
        for step in range(start, settings.steps):
            last = trainer.step(step)
            self.state.steps_run, self.reached = self.state.steps_run + 1, step + 1
            if self._after_step(step + 1, last, stopping):
                break
        self.progress.close()
        metrics = None
        if ctx.is_main:
            trainer.finish(self.state)
            metrics = self._metrics(last, stopping)
            trainer.folder.write_metrics(trainer.metrics_key, metrics)
        return ctx.broadcast(metrics)

    def _after_step(self, done: int, values: dict, stopping: EarlyStopping | None) -> bool:
        """History, evaluation, early stopping, checkpoint and progress after step ``done``; whether to stop."""
        trainer, settings, ctx = self.trainer, self.settings, self.ctx
        eval_every = getattr(settings, "eval_every", None)
        evaluating = done == settings.steps or bool(eval_every and done % eval_every == 0)
        stop = False
        if evaluating or (trainer.log_every and done % trainer.log_every == 0):
            entry = {"step": done, **values}
            if evaluating and ctx.is_main:
                begin = time.perf_counter()
                devices = [self.trainer.device] if self.trainer.device.type == "cuda" else []
                with torch.random.fork_rng(devices):  # evaluation leaves the training's random stream alone
                    entry.update(trainer.evaluate(done))
                if stopping is not None and stopping.update(done, trainer.stopping_quality(entry)):
                    self._save(trainer.best_checkpoint, done, optimizer=False,
                               extra={settings.stop_on: stopping.best["value"]})
                self.state.best = stopping.best if stopping is not None else None
                line = trainer.describe(done, entry, stopping)
                if line:
                    self.progress.write(line)
                stop = stopping is not None and stopping.stop(done, self.progress.write)
                self.state.eval_seconds += time.perf_counter() - begin
            self.state.history.append(entry)
        self.progress.update(done, lambda: self._postfix(values))
        checkpoint_every = getattr(settings, "checkpoint_every", None)
        if ctx.is_main and (evaluating or (checkpoint_every and done % checkpoint_every == 0)):
            self._save(trainer.checkpoint, done, optimizer=True)
            trainer.folder.write_metrics(trainer.metrics_key, self._metrics(values, stopping))
        return evaluating and bool(ctx.broadcast(stop))  # every rank stops at the same step

    def _save(self, name: str, step: int, optimizer: bool, extra: dict | None = None) -> None:
        """The checkpoint ``name`` with the config section it belongs to, then that section in config.json."""
        trainer = self.trainer
        self.state.seconds = self.seconds_before + time.perf_counter() - self.session_start
        self.state.chain_seconds = trainer.chains.timer.seconds
        section = {**to_config(trainer.settings), **trainer.architecture()}
        os.makedirs(trainer.folder.path, exist_ok=True)
        save_checkpoint(trainer.folder.file(name), trainer.model, trainer.optimizer if optimizer else None, step,
                        extra={"config": {trainer.section: section}, "loop": dataclasses.asdict(self.state),
                               **(extra or {})})
        trainer.folder.write_config(trainer.section, section)

    def _postfix(self, values: dict) -> str:
        train_seconds = max(time.perf_counter() - self.session_start - self.state.eval_seconds, 1e-9)
        shown = [f"{k} {values[k]:.3f}" for k in self.trainer.shown if k in values]
        rate = (self.state.steps_run * self.settings.batch_size) / (self.seconds_before + train_seconds)
        chains = self.trainer.chains.timer.seconds / (self.seconds_before + train_seconds)
        return ", ".join(shown + [f"{rate:.0f} samples/s"] + ([f"chains {chains:.0%}"] if chains else []))

    def _metrics(self, last: dict, stopping: EarlyStopping | None) -> dict:
        trainer, state = self.trainer, self.state
        seconds = self.seconds_before + time.perf_counter() - self.session_start
        train_seconds = max(seconds - state.eval_seconds, 1e-9)
        chain_seconds = trainer.chains.timer.seconds
        metrics = {"history": state.history, "steps": self.reached,
                   "steps_run": state.steps_run, "seconds": seconds, "train_seconds": train_seconds,
                   "eval_seconds": state.eval_seconds, "chain_seconds": chain_seconds,
                   "chain_share": chain_seconds / train_seconds,
                   "seconds_per_iteration": train_seconds / max(state.steps_run, 1),
                   "samples_per_second": state.steps_run * self.settings.batch_size / train_seconds,
                   "world_size": self.ctx.world_size}
        if hasattr(self.settings, "sampler"):
            metrics["sampler"] = self.settings.sampler
        if stopping is not None:
            metrics["best"] = stopping.best
        metrics.update(trainer.summary(state, last))
        return metrics
