"""Nsight Compute (``ncu``) over a few kernels: the command, why it could not run, and a summary per kernel.

The profiled program brackets the kernels of interest with ``cudaProfilerStart``/``Stop`` after warming them up, so
``--profile-from-start off`` records each of them once. Clocks are left as they are (``--clock-control none``). The
report (``.ncu-rep``) is exported as the raw page in CSV (a header row of metric names, a row of units, a row per
kernel) and reduced to the figures below; a metric this ncu does not report is left out.
"""

from __future__ import annotations

import csv
import glob
import io
import os
import shutil

SECTIONS = ("SpeedOfLight", "MemoryWorkloadAnalysis", "Occupancy", "LaunchStats")
# summary key: (raw metric name, what it is)
METRICS = {
    "duration_us": ("gpu__time_duration.sum", "kernel duration"),
    "dram_gbs": ("dram__bytes.sum.per_second", "achieved DRAM bandwidth"),
    "dram_pct": ("gpu__dram_throughput.avg.pct_of_peak_sustained_elapsed", "DRAM throughput, % of peak"),
    "memory_pct": ("gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed", "memory throughput, % of peak"),
    "sm_pct": ("sm__throughput.avg.pct_of_peak_sustained_elapsed", "SM throughput, % of peak"),
    "achieved_occupancy_pct": ("sm__warps_active.avg.pct_of_peak_sustained_active", "achieved occupancy"),
    "theoretical_occupancy_pct": ("sm__maximum_warps_per_active_cycle_pct", "theoretical occupancy"),
    "registers": ("launch__registers_per_thread", "registers per thread"),
    "block_size": ("launch__block_size", "threads per block"),
    "grid_size": ("launch__grid_size", "blocks"),
    "static_shared_kib": ("launch__shared_mem_per_block_static", "static shared memory per block"),
    "dynamic_shared_kib": ("launch__shared_mem_per_block_dynamic", "dynamic shared memory per block"),
    "waves": ("launch__waves_per_multiprocessor", "waves per SM"),
}
# Unit scales into the summary's units: microseconds, GB/s, KiB; everything else as printed.
_SCALES = {
    "duration_us": {"nsecond": 1e-3, "ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3,
                    "second": 1e6, "s": 1e6},
    "dram_gbs": {"byte/second": 1e-9, "byte/s": 1e-9, "Kbyte/second": 1e-6, "Kbyte/s": 1e-6, "Mbyte/second": 1e-3,
                 "Mbyte/s": 1e-3, "Gbyte/second": 1.0, "Gbyte/s": 1.0, "Tbyte/second": 1e3, "Tbyte/s": 1e3},
}
_SCALES["static_shared_kib"] = _SCALES["dynamic_shared_kib"] = {"byte": 1 / 1024, "Kbyte": 1000 / 1024,
                                                                 "Mbyte": 1e6 / 1024}


def find_ncu() -> str | None:
    """The ncu executable: on PATH, in CUDA's bin folder, or in an Nsight Compute installation."""
    found = shutil.which("ncu")
    if found:
        return found
    for pattern in ("/usr/local/cuda/bin/ncu", "/usr/local/cuda-*/bin/ncu", "/opt/nvidia/nsight-compute/*/ncu"):
        hits = sorted(glob.glob(pattern))
        if hits and os.access(hits[-1], os.X_OK):
            return hits[-1]
    return None


def profile_command(ncu: str, report: str, target: list[str]) -> list[str]:
    """``ncu`` recording SECTIONS of every kernel launched between cudaProfilerStart/Stop of ``target`` into
    ``report`` (.ncu-rep)."""
    sections = [arg for name in SECTIONS for arg in ("--section", name)]
    return [ncu, "--profile-from-start", "off", "--clock-control", "none", "--target-processes", "all",
            *sections, "--force-overwrite", "--export", report, *target]


def export_command(ncu: str, report: str) -> list[str]:
    return [ncu, "--import", report, "--csv", "--page", "raw"]


def unavailable_reason(output: str) -> str | None:
    """Why ncu could not profile (no permission for the counters, a profiler library that would not load, ...),
    from its output; None when it says nothing of the kind."""
    if "ERR_NVGPUCTRPERM" in output:
        return "no permission to read the GPU's performance counters (ERR_NVGPUCTRPERM)"
    errors = [line.strip() for line in output.splitlines() if line.startswith("==ERROR==")]
    return errors[0] if errors else None


def _number(text: str) -> float | None:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def summarize(raw_csv: str) -> list[dict]:
    """One dict per profiled kernel from ``ncu --csv --page raw``: ``kernel`` (its name), ``id`` and the keys of
    METRICS that the report has, in the summary's units."""
    lines = [line for line in raw_csv.splitlines() if line.startswith('"')]  # drop ncu's own messages
    if len(lines) < 3:
        return []
    header, units, *rows = list(csv.reader(io.StringIO("\n".join(lines))))
    column = {name: i for i, name in enumerate(header)}
    kernels = []
    for row in rows:
        if len(row) != len(header):
            continue
        kernel = {"id": row[column["ID"]] if "ID" in column else None,
                  "kernel": row[column["Kernel Name"]] if "Kernel Name" in column else "?"}
        for key, (metric, _) in METRICS.items():
            if metric not in column:
                continue
            value = _number(row[column[metric]])
            if value is not None:
                kernel[key] = value * _SCALES.get(key, {}).get(units[column[metric]], 1.0)
        kernels.append(kernel)
    return kernels
