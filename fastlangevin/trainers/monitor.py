"""Watching a run: its progress on stderr, its metrics as they come (metrics.jsonl, and TensorBoard where the
``tensorboard`` package is installed), and early stopping on sample quality."""

from __future__ import annotations

import os
import sys
import time

# early-stopping metrics, +1: higher is better
STOP_ON = {"mmd2": -1.0, "energy_distance": -1.0, "high_quality": 1.0, "frechet_distance": -1.0}


def progress_disabled_by_environment() -> bool:
    """tqdm's own switch: ``TQDM_DISABLE`` set to anything but "", "0", "false" or "no"."""
    return os.environ.get("TQDM_DISABLE", "").strip().lower() not in ("", "0", "false", "no")


class Progress:
    """A run's progress on ``stream`` (stderr). On a terminal: a tqdm bar, its postfix redrawn at most every
    ``interval`` seconds (a postfix set on every step would redraw the bar every step); elsewhere (a pipe, a log
    file): a plain line every ``log_interval`` seconds but at most ``max_lines`` over the run (a slow machine does
    not fill the log); nothing when disabled or with ``TQDM_DISABLE`` set.
    ``write`` prints a message line on stdout without breaking the bar."""

    def __init__(self, desc: str, total: int, enabled: bool = True, interval: float = 2.0,
                 log_interval: float = 30.0, max_lines: int = 50, stream=None):
        self.desc, self.total, self.interval, self.log_interval = desc, total, interval, log_interval
        self.line_steps = max(1, total // max_lines)  # the steps between two plain lines, at least
        self.stream = stream or sys.stderr
        self.enabled = enabled and not progress_disabled_by_environment()
        self.bar, self.begin, self.drawn, self.initial, self.logged = None, 0.0, 0.0, 0, 0

    def start(self, initial: int) -> None:
        self.begin = self.drawn = time.perf_counter()
        self.initial = self.logged = initial
        if self.enabled and getattr(self.stream, "isatty", lambda: False)():
            from tqdm.auto import tqdm
            self.bar = tqdm(total=self.total, initial=initial, desc=self.desc, file=self.stream,
                            mininterval=self.interval, dynamic_ncols=True)

    def update(self, done: int, postfix) -> None:
        """Step ``done`` finished; ``postfix()`` (called only when it is shown) describes it."""
        now = time.perf_counter()
        if self.bar is not None:
            if now - self.drawn >= self.interval:
                self.bar.set_postfix_str(postfix(), refresh=False)
                self.drawn = now
            self.bar.update(done - self.bar.n)
        elif self.enabled and now - self.drawn >= self.log_interval and done - self.logged >= self.line_steps:
            rate = (done - self.initial) / max(now - self.begin, 1e-9)
            left = (self.total - done) / rate if rate > 0 else float("nan")
            print(f"{self.desc}: step {done}/{self.total}, {now - self.begin:.0f} s, about {left:.0f} s left; "
                  f"{postfix()}", file=self.stream, flush=True)
            self.drawn, self.logged = now, done

    def write(self, line: str) -> None:
        if self.bar is not None:
            self.bar.write(line)
        else:
            print(line, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def check_stop_metric(stop_on: str, val_set) -> None:
    """A clear error when the validation data cannot give the early-stopping metric ``stop_on``."""
    if stop_on == "high_quality" and val_set.modes is None:
        raise ValueError(f"stop_on='high_quality' needs data with known modes (25gaussians), not {val_set.name}; use "
                         f"'mmd2' or 'energy_distance'")
    if stop_on == "frechet_distance" and len(val_set.sample_shape) != 3:
        raise ValueError(f"stop_on='frechet_distance' needs image data, not {val_set.name}; use 'mmd2' or "
                         f"'energy_distance'")


class MetricsLog:
    """Each history entry of a run, as it is made: a line of RUN/metrics.jsonl ({"stage", "run", "step", …}; a crash
    loses nothing) and, when ``tensorboard`` is importable (it is optional), its numbers as TensorBoard scalars under
    RUN/tensorboard/<stage> (nested keys joined by "/")."""

    def __init__(self, folder, stage: str, run: str, tensorboard: bool = True):
        self.folder, self.stage, self.run, self.writer = folder, stage, run, None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is not installed: the JSONL file alone
                return
            self.writer = SummaryWriter(folder.file(os.path.join("tensorboard", stage)))

    def add(self, entry: dict) -> None:
        self.folder.log({"stage": self.stage, "run": self.run, **entry})
        if self.writer is not None:
            for tag, value in _scalars(entry):
                self.writer.add_scalar(tag, value, entry["step"])
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _scalars(entry: dict, prefix: str = ""):
    for key, value in entry.items():
        if isinstance(value, dict):
            yield from _scalars(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and key != "step":
            yield prefix + key, value


class EarlyStopping:
    """Early stopping on sample quality: ``update(step, quality)`` records an evaluation (``quality``: the dict of
    ``sample_quality``) and returns whether it is the best so far by ``stop_on`` (a key of ``STOP_ON``);
    ``stop(step)`` says whether ``patience`` evaluations (``eval_every`` steps apart) went by without a better one
    (never when ``patience`` is None). ``best`` = {"step", "metric", "value"} (resumable)."""

    def __init__(self, stop_on: str, patience: int | None, eval_every: int, best: dict | None = None):
        if stop_on not in STOP_ON:
            raise ValueError(f"stop_on must be one of {tuple(STOP_ON)}, got {stop_on!r}")
        self.stop_on, self.patience, self.eval_every = stop_on, patience, eval_every
        self.best = best or {"step": None, "metric": stop_on, "value": None}

    def update(self, step: int, quality: dict) -> bool:
        value = quality[self.stop_on]
        if self.best["value"] is None or STOP_ON[self.stop_on] * (value - self.best["value"]) > 0:
            self.best = {"step": step, "metric": self.stop_on, "value": value}
            return True
        return False

    def stop(self, step: int, write=print) -> bool:
        """Whether to stop after the evaluation at ``step``; says why through ``write`` when it does."""
        stalled = self.best["step"] is not None and step - self.best["step"] >= (self.patience or 0) * self.eval_every
        if self.patience is not None and stalled:
            write(f"early stop at step {step}: no better validation {self.stop_on} in {self.patience} evaluations")
            return True
        return False

    def describe(self, step: int, quality: dict) -> str:
        """The progress line of an evaluation."""
        modes = (f", high-quality {quality['high_quality']:.1%}, modes {quality['modes_covered']}/{quality['n_modes']}"
                 if "high_quality" in quality else "")
        fcd = f", fcd {quality['frechet_distance']:.5g}" if "frechet_distance" in quality else ""
        return (f"step {step}: validation mmd2 {quality['mmd2']:.5f}, energy distance {quality['energy_distance']:.5f}"
                f"{modes}{fcd} (best {self.stop_on} {self.best['value']:.5g} at step {self.best['step']})")
