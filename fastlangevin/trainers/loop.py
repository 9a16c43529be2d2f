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

from fastlangevin._io import is_stale_temporary
from fastlangevin.trainers import distributed, registry
from fastlangevin.trainers.checkpoint import load_checkpoint, save_checkpoint
from fastlangevin.trainers.monitor import EarlyStopping, MetricsLog, Progress
from fastlangevin.trainers.run_folder import LOG, RunFolder
from fastlangevin.trainers.settings import make_settings, resume_values, setting, to_config
from fastlangevin.trainers.trainer import Trainer


@dataclasses.dataclass
class RunOptions:
    """How a command runs, whatever the trainer: not part of what it learns, not saved with the run."""

    resume: bool = setting(False, "continue from the run's checkpoint with the run's settings (--steps may grow)")
    overwrite: bool = setting(False, "start anew in a folder that holds a run (refused otherwise), and delete what "
                                     "later stages trained on this stage's model there (a tilt on its backbone), "
                                     "which a new run would leave stale")
    device: str = setting("cpu", "cpu, cuda or cuda:N")
    progress: bool = setting(True, "the progress bar on stderr (off when stderr is not a terminal: a line every "
                                   "30 s instead, at most 50 a run; TQDM_DISABLE=1 turns it off too)")

    def __post_init__(self):
        distributed.check_device(self.device)


@dataclasses.dataclass
class LoopState:
    """What the loop carries across steps and into checkpoints: the history, early stopping's best, the time spent
    (over every session of a resumed run) and the run's name in metrics.jsonl."""

    history: list = dataclasses.field(default_factory=list)
    best: dict | None = None
    seconds: float = 0.0  # wall time in the loop, evaluations included
    eval_seconds: float = 0.0
    chain_seconds: float = 0.0  # training chains
    steps_run: int = 0
    run: str = dataclasses.field(default_factory=lambda: time.strftime("%Y-%m-%dT%H:%M:%S") + f"-{os.getpid()}")

    @classmethod
    def restore(cls, meta: dict, metrics: dict) -> "LoopState":
        """The state saved in a checkpoint's metadata, or (a checkpoint written before they held it) rebuilt from
        the run's metrics, cut at the checkpoint's step."""
        saved = meta.get("extra", {}).get("loop")
        if saved is None:
            saved = {k: metrics[k] for k in ("history", "best", "chain_seconds") if metrics.get(k) is not None}
            saved["history"] = [h for h in saved.get("history", []) if h["step"] <= meta["step"]]
        return cls(**{k: v for k, v in saved.items() if k in {f.name for f in dataclasses.fields(cls)}})


def stale_by(trainer_cls, folder: RunFolder) -> list:
    """The trainers whose checkpoints in ``folder`` read ``trainer_cls``'s model without holding it."""
    return [t for t in registry.trainers().values() if trainer_cls.section in t.inputs and folder.has(t.checkpoint)]


# What a run writes before its first checkpoint: all that a run killed that early leaves (a fresh start may go on).
BEFORE_FIRST_CHECKPOINT = (LOG, "tensorboard")


def occupants(trainer_cls, folder: RunFolder) -> list[str]:
    """What in ``folder`` a fresh run of ``trainer_cls`` would replace or mix with: for a command that makes its
    folder (``--out``), every entry but those a run killed before its first checkpoint leaves; for one that works
    in an existing run (``tilt RUN_DIR``), its own checkpoints."""
    if not os.path.isdir(folder.path):
        return []
    if trainer_cls.folder_option.startswith("-"):
        return sorted(name for name in os.listdir(folder.path)
                      if name not in BEFORE_FIRST_CHECKPOINT and not is_stale_temporary(name))
    # the latest checkpoint only: a run killed between writing its best and its latest checkpoint (the best is
    # written first) cannot be resumed, and a fresh run replaces that orphan best at its first evaluation
    if not folder.has(trainer_cls.checkpoint):
        return []
    return [name for name in (trainer_cls.checkpoint, trainer_cls.best_checkpoint) if name and folder.has(name)]


def refuse_occupied(trainer_cls, folder: RunFolder, resume: bool, overwrite: bool) -> None:
    """ValueError when a fresh run of ``trainer_cls`` (neither ``resume`` nor ``overwrite``) would replace or mix
    with what ``folder`` holds, or would leave a later stage's checkpoint there stale (even with ``resume``: it
    trains the model further)."""
    where = f"fastlangevin {trainer_cls.command}"
    if os.path.exists(folder.path) and not os.path.isdir(folder.path):
        raise NotADirectoryError(f"{where}: {folder.path} is a file, not a run folder")
    # Rank 0 alone decides (it writes; under torchrun a failed rank ends them all): another rank may look only
    # after rank 0 has begun writing this very run.
    found = [] if resume or overwrite or distributed.launched_rank() else occupants(trainer_cls, folder)
    if found:
        shown = ", ".join(found[:4]) + (", ..." if len(found) > 4 else "")
        raise ValueError(f"{where}: {folder.path} already holds a run ({shown}): continue it with --resume, "
                         f"replace it with --overwrite, or use another folder")
    stale = stale_by(trainer_cls, folder)  # a fresh run replaces the model, a resumed one trains it further
    if stale and not overwrite:
        names = ", ".join(t.checkpoint for t in stale)
        raise ValueError(f"{where}: {folder.path} holds {names}, trained on its {trainer_cls.section} model: a new "
                         f"one would leave it stale; use another folder, or --overwrite to delete it first")


def run_settings(trainer_cls, folder: RunFolder, given: dict, resume: bool, overwrite: bool = False):
    """The checked settings of a run (``given`` by name; with ``resume``, over the saved ones) and the saved config
    section (None for a fresh start). Raises before anything is written."""
    where = f"fastlangevin {trainer_cls.command}"
    given = {**given, **trainer_cls.preset()}
    saved = trainer_cls.resume_section(folder) if resume else None
    values = resume_values(trainer_cls.Settings, saved, given, where) if saved is not None else given
    settings = make_settings(trainer_cls.Settings, values, where)
    refuse_occupied(trainer_cls, folder, resume, overwrite)
    return settings, saved


def train(trainer_cls, folder, *, resume: bool = False, overwrite: bool = False, device: str = "cpu",
          progress: bool = True, **given) -> dict:
    """Run ``trainer_cls`` in the run folder ``folder`` with the settings ``given`` by name (the others: their
    defaults; with ``resume``: the run's); returns the metrics (also in metrics.json). Under ``torchrun`` every rank
    calls this; rank 0 writes and returns what it wrote on every rank."""
    folder = RunFolder(folder)
    options = make_settings(RunOptions, dict(resume=resume, overwrite=overwrite, device=device, progress=progress),
                            f"fastlangevin {trainer_cls.command}")
    settings, saved = run_settings(trainer_cls, folder, given, resume, overwrite)
    with distributed.setup(device) as ctx:
        return _Loop(trainer_cls(settings, ctx, folder, saved, options)).run()


class _Loop:
    def __init__(self, trainer: Trainer):
        self.trainer, self.settings, self.ctx = trainer, trainer.settings, trainer.ctx

    def run(self) -> dict:
        trainer, settings, ctx = self.trainer, self.settings, self.ctx
        if ctx.is_main:
            trainer.folder.clean()
        # What this run replaces (given --overwrite: the checkpoints later stages trained on the old model, and the
        # old run's best) is deleted just before its first checkpoint: until then the folder loads as it was.
        self.replaced = [([stale.best_checkpoint or stale.checkpoint, stale.checkpoint],
                          [stale.section, f"{stale.section}_training"])
                         for stale in stale_by(type(trainer), trainer.folder)]
        if trainer.saved is None and trainer.best_checkpoint is not None:
            self.replaced.append(([trainer.best_checkpoint], []))
        if not ctx.is_main:
            self.replaced = []
        trainer.prepare()
        torch.manual_seed(settings.seed)
        trainer.build()
        if getattr(settings, "epochs", None) is not None and trainer.saved is None:
            settings.steps = max(1, math.ceil(settings.epochs * len(trainer.train_set) / settings.batch_size))
        ctx.check_batch(settings.batch_size)
        self.state, start = LoopState(), 0
        self.progress = Progress(trainer.command, settings.steps, enabled=trainer.options.progress and ctx.is_main)
        trainer.chains.announce = self.progress.write if ctx.is_main else None  # what runs each chain, once
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
        self.log = MetricsLog(trainer.folder, trainer.section, self.state.run) if ctx.is_main else None
        trainer.begin(start)
        self.begin, self.start, self.reached, last = time.perf_counter(), start, start, {}
        self.before = dataclasses.replace(self.state)  # the previous sessions' totals
        self.progress.start(start)
        try:
            for step in range(start, settings.steps):
                last = trainer.step(step)
                self.state.steps_run, self.reached = self.state.steps_run + 1, step + 1
                if self._after_step(step + 1, last, stopping):
                    break
        finally:
            self.progress.close()
            if self.log is not None:
                self.log.close()
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
                devices = [trainer.device] if trainer.device.type == "cuda" else []
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
            if self.log is not None:
                self.log.add(entry)
        self.progress.update(done, lambda: self._postfix(values))
        checkpoint_every = getattr(settings, "checkpoint_every", None)
        if ctx.is_main and (evaluating or (checkpoint_every and done % checkpoint_every == 0)):
            self._save(trainer.checkpoint, done, optimizer=True)
            trainer.folder.write_metrics(trainer.metrics_key, self._metrics(values, stopping))
        return evaluating and bool(ctx.broadcast(stop))  # every rank stops at the same step

    def _save(self, name: str, step: int, optimizer: bool, extra: dict | None = None) -> None:
        """The checkpoint ``name`` with the config sections it belongs to, then its section in config.json."""
        trainer = self.trainer
        for names, sections in self.replaced:  # the last checkpoint goes last: until then the old run loads
            trainer.folder.remove(names, sections)
        self.replaced = []
        self.state.seconds = self.before.seconds + time.perf_counter() - self.begin
        self.state.chain_seconds = trainer.chains.timer.seconds
        section = {**to_config(trainer.settings), **trainer.architecture()}
        os.makedirs(trainer.folder.path, exist_ok=True)
        save_checkpoint(trainer.folder.file(name), trainer.model, trainer.optimizer if optimizer else None, step,
                        extra={"config": {trainer.section: section, **trainer.companions()},
                               "loop": dataclasses.asdict(self.state), **(extra or {})})
        trainer.folder.write_config(trainer.section, section)

    def _postfix(self, values: dict) -> str:
        """This session's speed and the step's values, for the progress bar."""
        seconds = max(time.perf_counter() - self.begin - (self.state.eval_seconds - self.before.eval_seconds), 1e-9)
        rate = (self.reached - self.start) * self.settings.batch_size / seconds
        chains = (self.trainer.chains.timer.seconds - self.before.chain_seconds) / seconds
        shown = [f"{k} {values[k]:.3f}" for k in self.trainer.shown if k in values]
        return ", ".join(shown + [f"{rate:.0f} samples/s"] + ([f"chains {chains:.0%}"] if chains else []))

    def _metrics(self, last: dict, stopping: EarlyStopping | None) -> dict:
        trainer, state = self.trainer, self.state
        seconds = self.before.seconds + time.perf_counter() - self.begin
        train_seconds = max(seconds - state.eval_seconds, 1e-9)
        chain_seconds = trainer.chains.timer.seconds
        metrics = {"history": state.history, "steps": self.reached, "steps_run": state.steps_run,
                   "seconds": seconds, "train_seconds": train_seconds, "eval_seconds": state.eval_seconds,
                   "chain_seconds": chain_seconds, "chain_share": chain_seconds / train_seconds,
                   "chain_backends": dict(trainer.chains.backends),
                   "seconds_per_iteration": train_seconds / max(state.steps_run, 1),
                   "samples_per_second": state.steps_run * self.settings.batch_size / train_seconds,
                   "world_size": self.ctx.world_size}
        if hasattr(self.settings, "sampler"):
            metrics["sampler"] = self.settings.sampler
        if stopping is not None:
            metrics["best"] = stopping.best
        metrics.update(trainer.summary(state, last))
        return metrics
