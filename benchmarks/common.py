"""Timing helpers shared by the benchmark scripts: medians over repeats, device sync, the machine's description."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import torch


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, repeats: int = 20, warmup: int = 3, min_seconds: float = 0.2) -> dict:
    """Median, min and max seconds of ``fn()`` over at least ``repeats`` runs (more when one run is short)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    started = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeats:
            break
    return dict(median=statistics.median(times), min=min(times), max=max(times), runs=len(times))


def machine() -> dict:
    info = dict(python=platform.python_version(), torch=torch.__version__, cpu=platform.processor() or platform.machine(),
                cores=os.cpu_count(), torch_threads=torch.get_num_threads())
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        pass
    return info


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    """columns: (key, header, format spec)."""
    widths = [max(len(h), 10) for _, h, _ in columns]
    print("  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths)))
    for row in rows:
        cells = []
        for (key, _, spec), w in zip(columns, widths):
            value = row.get(key)
            cells.append(("-" if value is None else format(value, spec)).rjust(w))
        print("  ".join(cells))
