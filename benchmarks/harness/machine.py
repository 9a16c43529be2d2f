"""What the numbers were measured on: CPU, GPU, library versions, threads, load."""

from __future__ import annotations

import importlib.metadata
import os
import platform

import torch


def version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """CPU model and cores, torch threads, the GPU (name, multiprocessors, L2, memory) and library versions."""
    info = dict(python=platform.python_version(), torch=torch.__version__,
                cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                torch_threads=torch.get_num_threads())
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, cuda=torch.version.cuda, sm_count=props.multi_processor_count,
                    compute_capability=f"{props.major}.{props.minor}", gpu_memory_gib=props.total_memory / 2**30)
        l2 = getattr(props, "L2_cache_size", None)
        if l2:
            info["l2_mib"] = l2 / 2**20
    for package in ("triton", "jax", "jaxlib", "cupy-cuda13x", "cupy-cuda12x"):
        found = version(package)
        if found:
            info[package] = found
    return info


def load_average() -> float:
    """The 1-minute load average (> cores: other processes took time from the measurements)."""
    return os.getloadavg()[0]
