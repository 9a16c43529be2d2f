"""Timing: medians over repeats, on the device's own clock where it has one.

* ``time_call(fn, device)`` times one function over many runs: on CUDA with ``triton.testing.do_bench`` (CUDA events
  around each run, the L2 cache flushed before each, so a buffer smaller than L2 is not measured hot), on the CPU
  with the host clock after a warm-up.
* ``Stopwatch(device)`` times one run at a time, for rounds that interleave several implementations
  (``measure.py``): CUDA events on CUDA, the host clock otherwise (also for work on other streams, e.g. JAX's).
"""

from __future__ import annotations

import statistics
import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def summarize(seconds: list[float]) -> dict:
    return dict(median=statistics.median(seconds), min=min(seconds), max=max(seconds), runs=len(seconds))


class Stopwatch:
    """``seconds, result = Stopwatch(device).time(fn)``: the time of one call of ``fn``, device work included."""

    def __init__(self, device, host_clock: bool = False):
        self.device = torch.device(device)
        self.events = self.device.type == "cuda" and not host_clock

    def time(self, fn):
        if self.events:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            result = fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3, result
        sync(self.device)
        t0 = time.perf_counter()
        result = fn()
        sync(self.device)
        return time.perf_counter() - t0, result


def time_call(fn, device, repeats: int = 20, warmup: int = 3, min_seconds: float = 0.2,
              max_seconds: float | None = None, min_repeats: int = 3) -> dict:
    """Median, min and max seconds of ``fn()`` and the number of runs.

    CUDA: ``do_bench`` runs ``fn`` for at least ``max(100 ms, min_seconds)`` after 25 ms of warm-up (at least
    ``repeats`` runs when one run is longer). CPU: at least ``repeats`` runs (more when one run is short, up to
    10·repeats); with ``max_seconds``, stops after ``min_repeats`` runs once that much time is spent (long chains).
    """
    if torch.device(device).type == "cuda":
        return _time_cuda(fn, device, repeats, min_seconds)
    for _ in range(warmup):
        fn()
    times = []
    started = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeats:
            break
        if max_seconds is not None and len(times) >= min_repeats and time.perf_counter() - started >= max_seconds:
            break
    return summarize(times)


def _time_cuda(fn, device, repeats: int, min_seconds: float) -> dict:
    try:
        from triton.testing import do_bench
    except ImportError:  # CUDA without Triton: events around each run, no L2 flush
        watch = Stopwatch(device)
        for _ in range(3):
            fn()
        return summarize([watch.time(fn)[0] for _ in range(max(repeats, 20))])
    with torch.cuda.device(torch.device(device)):
        one = do_bench(fn, warmup=5, rep=1, return_mode="median")  # ms, a first estimate
        rep_ms = max(100.0, min_seconds * 1e3, repeats * one)
        times_ms = do_bench(fn, warmup=25, rep=rep_ms, return_mode="all")
    return summarize([t / 1e3 for t in times_ms])


def alternated(impls: dict, repeats: int, each_round=None) -> dict[str, list[float]]:
    """Host-clock seconds of each ``impls[name][0]()`` over ``repeats`` rounds that run every implementation once in
    turn (after one warm-up call each), so a load change on a shared machine hits all of them alike;
    ``each_round()`` runs after every round (a reference rate measured in the same run)."""
    for fn, *_ in impls.values():
        fn()
    times = {name: [] for name in impls}
    for _ in range(repeats):
        for name, (fn, *_) in impls.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
        if each_round is not None:
            each_round()
    return times
