"""A training iteration timed through the command line, the library's sampler against the hand-written loop.

Only the trainers' commands are used (``fastlangevin.cli.main``, in this process), never their internals. The time of
one iteration is a difference of two runs of the same command, ``(T(big) - T(small)) / (big - small)``: what every
run pays once (data, model, evaluation and plots at the end, a graph capture, the Triton JIT, a metric's classifier)
cancels. A first run of each sampler, not counted, fills the caches that a later run would otherwise not pay for.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch

SAMPLERS = ("library", "eager")


def time_command(argv: list[str], device) -> float:
    """Seconds of ``fastlangevin ARGV`` run in this process; raises RuntimeError when it fails."""
    from fastlangevin.cli import main

    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    try:
        status = main(argv)
    except SystemExit as stop:  # a command's user error (one line) or argparse's
        status = stop.code
    if cuda:
        torch.cuda.synchronize()
    if status not in (0, None):
        raise RuntimeError(f"fastlangevin {' '.join(argv)} failed: {status}")
    return time.perf_counter() - t0


def iteration_seconds(command: Callable[[str, int], list[str]], device, small: int, big: int, repeats: int = 1,
                      warm_up: bool = True) -> dict:
    """Seconds per training iteration with each sampler, and eager / library.

    command(sampler, steps) -> argv: a fresh run of ``steps`` iterations with that sampler (its own run folder).
    Runs, samplers alternated so that load falls on both alike: a warm-up of each (``small`` steps), then
    ``repeats`` × (small, big). Returns ``{sampler: {"iteration_s", "runs": [{"steps", "seconds"}]},
    "eager_vs_library"}``, the ratio None when the library's difference is not positive (lost in noise).
    """
    if not 0 < small < big:
        raise ValueError(f"need 0 < small < big, got small={small}, big={big}")
    runs = {sampler: [] for sampler in SAMPLERS}
    if warm_up:
        for sampler in SAMPLERS:
            time_command(command(sampler, small), device)
    for _ in range(repeats):
        for steps in (small, big):
            for sampler in SAMPLERS:
                runs[sampler].append({"steps": steps, "seconds": time_command(command(sampler, steps), device)})
    result = {}
    for sampler, timed in runs.items():
        smalls = [r["seconds"] for r in timed if r["steps"] == small]
        bigs = [r["seconds"] for r in timed if r["steps"] == big]
        per_iteration = [(b - s) / (big - small) for s, b in zip(smalls, bigs)]
        result[sampler] = {"iteration_s": statistics.median(per_iteration), "runs": timed}
    library, eager = result["library"]["iteration_s"], result["eager"]["iteration_s"]
    result["eager_vs_library"] = eager / library if library > 0 else None
    return result
