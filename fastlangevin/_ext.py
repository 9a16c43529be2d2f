"""Lazy loading of the compiled backends ``fastlangevin._C`` (CPU) and ``fastlangevin._C_cuda`` (CUDA), the CPU
kernels' instruction-set level, and the route the CUDA kernels take.

Nothing is imported until a backend is first asked for, and a missing or broken module never raises here: the
loaders return ``None`` and ``cpu_reason()`` / ``cuda_reason()`` say why, e.g. ``"not built: ..."`` or
``"import failed: ..."``. The outcome is cached, so the import is tried once per process.

The CPU kernels are built once per level (``CPU_LEVELS``: ``_C`` baseline, ``_C_avx2``, ``_C_avx512``; a build
with ``FASTLANGEVIN_NATIVE=1`` has one ``_C`` for its own machine). ``cpu_build()`` loads the highest level that this
CPU and OS support (asked of ``_C``: cpuid and xgetbv) and that was built; ``FASTLANGEVIN_CPU_LEVEL=baseline|avx2|
avx512`` caps it, e.g. to test a lower level on a machine that has a higher one.

The CUDA kernels run by one of two routes (``cuda_route()``): the nvcc build ``fastlangevin._C_cuda``, or the same
kernel sources compiled at first use by NVRTC through CuPy (``fastlangevin.ops.nvrtc``) where that build is missing or
cannot reach the GPU. ``FASTLANGEVIN_CUDA_ROUTE=nvcc`` or ``=nvrtc`` allows only that route.
"""

from __future__ import annotations

import dataclasses
import importlib
import logging
import os
import threading
from types import ModuleType

_HINTS = {
    "_C": "reinstall with `pip install --no-build-isolation -e .` (needs cmake, pybind11 and a C++17 compiler)",
    "_C_avx2": "this compiler or platform builds the baseline only",
    "_C_avx512": "this compiler or platform builds the baseline only",
    "_C_cuda": "reinstall where nvcc is found (CUDA_HOME or PATH) and FASTLANGEVIN_NO_CUDA is unset",
}
# The CPU kernel levels, lowest first, and the module of each (CMakeLists.txt builds them).
CPU_LEVELS = {"baseline": "_C", "avx2": "_C_avx2", "avx512": "_C_avx512"}
CPU_LEVEL_ENV = "FASTLANGEVIN_CPU_LEVEL"

_lock = threading.Lock()
_cache: dict[str, tuple[ModuleType | None, str | None]] = {}
_runtime_status: list[str | None] = []  # filled once by _nvcc_runtime_reason()
ROUTE_ENV = "FASTLANGEVIN_CUDA_ROUTE"


def _load(name: str) -> tuple[ModuleType | None, str | None]:
    with _lock:
        if name not in _cache:
            try:
                _cache[name] = (importlib.import_module(f"fastlangevin.{name}"), None)
            except ModuleNotFoundError as e:
                if e.name == f"fastlangevin.{name}":
                    reason = f"not built: fastlangevin.{name} is not installed; {_HINTS[name]}"
                else:
                    reason = f"import failed: {type(e).__name__}: {e}"
                _cache[name] = (None, reason)
            except Exception as e:  # ImportError (e.g. undefined symbol, missing shared library) or anything else
                _cache[name] = (None, f"import failed: {type(e).__name__}: {e}")
        return _cache[name]


@dataclasses.dataclass(frozen=True)
class CpuBuild:
    """The CPU kernels that run here. ``module``: the extension module (``fastlangevin._C``, ``_C_avx2`` or
    ``_C_avx512``), None when none loads; ``level``: ``"baseline"``, ``"avx2"``, ``"avx512"`` or ``"native"``;
    ``description``: which module and level, and why that level; ``reason``: None when a module loads, else why not."""

    module: ModuleType | None
    level: str | None
    description: str
    reason: str | None


_cpu_build: list[CpuBuild] = []


def cpu_build() -> CpuBuild:
    """The CPU kernels' module, chosen once per process: the highest level of ``CPU_LEVELS`` that this CPU and OS
    support, at most ``FASTLANGEVIN_CPU_LEVEL``, and that was built (a missing one falls back to the next lower)."""
    with _lock:
        if _cpu_build:
            return _cpu_build[0]
    base, reason = _load("_C")
    if base is None:
        return _keep_cpu(CpuBuild(None, None, "none", reason))
    forced = os.environ.get(CPU_LEVEL_ENV, "").strip().lower()
    if forced and forced not in CPU_LEVELS:
        return _keep_cpu(CpuBuild(None, None, "none", f"{CPU_LEVEL_ENV} must be one of {', '.join(CPU_LEVELS)} or "
                                                      f"unset, got {forced!r}"))
    built_for = base.build_info().get("cpu_level")
    if built_for not in CPU_LEVELS:  # one module: a -march=native build, or one from before the levels
        how = ("built with -march=native (FASTLANGEVIN_NATIVE=1): for the CPU that built it" if built_for == "native"
               else "built before the CPU levels: rebuild for run-time dispatch")
        note = f"; {CPU_LEVEL_ENV}={forced} ignored: no other level was built" if forced else ""
        return _keep_cpu(CpuBuild(base, built_for, f"C++ extension fastlangevin._C, {how}{note}", None))
    supported = cpu_features()["level"]
    levels = list(CPU_LEVELS)
    top = min(levels.index(supported), levels.index(forced) if forced else len(levels))
    if forced and levels.index(forced) <= levels.index(supported):
        why = f"{CPU_LEVEL_ENV}={forced}"
    else:
        why = "the best this CPU runs" + (f", not {forced}" if forced else "")
    skipped = []
    for level in reversed(levels[:top + 1]):
        module, missing = _load(CPU_LEVELS[level])
        if module is not None:
            note = f"; {'; '.join(skipped)}" if skipped else ""
            return _keep_cpu(CpuBuild(module, level, f"C++ extension fastlangevin.{CPU_LEVELS[level]}, CPU level "
                                                     f"{level} ({why}){note}", None))
        skipped.append(f"{level} unavailable ({missing})")
        why = "the best built"
    raise AssertionError("not reached: the baseline module is _C, which loaded")


def cpu_features() -> dict | None:
    """This CPU's instruction sets, the OS's support for their registers and ``"level"``, the highest of
    ``CPU_LEVELS`` it runs (asked of ``fastlangevin._C``); None when that module does not load."""
    base = _load("_C")[0]
    return base.cpu_features() if base is not None and hasattr(base, "cpu_features") else None


def _keep_cpu(build: CpuBuild) -> CpuBuild:
    with _lock:
        if not _cpu_build:
            _cpu_build.append(build)
        return _cpu_build[0]


def load_cpu() -> ModuleType | None:
    """The CPU extension module of ``cpu_build()``, or None when it is unavailable (see ``cpu_reason()``)."""
    return cpu_build().module


def cpu_reason() -> str | None:
    """None when the CPU extension loads, else why not."""
    return cpu_build().reason


def cuda_reason() -> str | None:
    """None when the CUDA extension loads, else why not."""
    return _load("_C_cuda")[1]


def _nvcc_runtime_reason() -> str | None:
    """None when the CUDA extension loads and its runtime reaches a GPU, else why not.

    The extension links the CUDA runtime of the nvcc it was built with statically, so it needs a driver at least that
    new (CUDA 13: driver 580+), which can differ from what torch needs. Asks the runtime once and caches the answer.
    """
    mod, reason = _load("_C_cuda")
    if mod is None:
        return reason
    with _lock:
        if not _runtime_status:
            status = mod.runtime_status()
            _runtime_status.append(None if status is None else f"CUDA runtime unusable: {status}")
        return _runtime_status[0]


_nvrtc: list[tuple[object | None, str | None]] = []  # filled once by load_nvrtc()


def load_nvrtc() -> tuple[object | None, str | None]:
    """``(fastlangevin.ops.nvrtc.NvrtcKernels(), None)``, or ``(None, why not)``: CuPy not importable, NVRTC not
    loadable, kernel sources or CUDA headers missing. Imports CuPy; tried once per process."""
    with _lock:
        if not _nvrtc:
            try:
                from fastlangevin.ops.nvrtc import NvrtcKernels

                _nvrtc.append((NvrtcKernels(), None))
            except ImportError as e:
                _nvrtc.append((None, f"CuPy not importable ({e}); pip install cupy-cuda13x (or cupy-cuda12x)"))
            except Exception as e:  # libnvrtc missing, sources or headers not found
                _nvrtc.append((None, f"{type(e).__name__}: {e}"))
        return _nvrtc[0]


@dataclasses.dataclass(frozen=True)
class CudaRoute:
    """How the CUDA kernels run here. ``kernels`` has the interface of ``fastlangevin._C_cuda`` (that module, or the
    NVRTC route's ``NvrtcKernels``); ``description`` says which, e.g. ``"nvcc build"`` or ``"NVRTC via CuPy 14.2.0
    (NVRTC 13.5)"``; ``reason`` is None when a route runs, else why none does."""

    kernels: object | None
    description: str
    reason: str | None


_route: list[CudaRoute] = []


def cuda_route() -> CudaRoute:
    """The route of the CUDA kernels, chosen once per process: the nvcc build when it loads and reaches the GPU, else
    the NVRTC route when CuPy is importable, else none (``reason`` names what each lacks). Imports CuPy only when
    torch sees a GPU and the nvcc build cannot run (or ``FASTLANGEVIN_CUDA_ROUTE=nvrtc``)."""
    if _route:
        return _route[0]
    import torch

    forced = os.environ.get(ROUTE_ENV, "").strip().lower()
    failed = []
    if forced not in ("", "nvcc", "nvrtc"):
        failed.append(f"{ROUTE_ENV} must be 'nvcc', 'nvrtc' or unset, got {forced!r}")
    elif not torch.cuda.is_available():
        failed.append("torch sees no CUDA device")
    else:
        if forced != "nvrtc":
            why = _nvcc_runtime_reason()
            if why is None:
                return _keep(CudaRoute(_load("_C_cuda")[0], "nvcc build (fastlangevin._C_cuda)", None))
            failed.append(f"nvcc build: {why}")
        if forced != "nvcc":
            kernels, why = load_nvrtc()
            if kernels is not None:
                if failed:
                    logging.getLogger("fastlangevin").warning("fastlangevin: CUDA kernels compiled by NVRTC because "
                                                              "the %s", failed[0])
                return _keep(CudaRoute(kernels, kernels.description, None))
            failed.append(f"NVRTC route: {why}")
        if forced:
            failed.append(f"{ROUTE_ENV}={forced} allows only that route")
    return _keep(CudaRoute(None, "none", "; ".join(failed)))


def _keep(route: CudaRoute) -> CudaRoute:
    with _lock:
        if not _route:
            _route.append(route)
        return _route[0]


def require_cpu() -> ModuleType:
    """The CPU extension module of ``cpu_build()``; raises RuntimeError with the reason when it is unavailable."""
    build = cpu_build()
    if build.module is None:
        raise RuntimeError(f"fastlangevin CPU extension unavailable ({build.reason}); use backend='reference' "
                           f"instead")
    return build.module


def require_cuda():
    """The CUDA kernels of ``cuda_route()`` (the nvcc module or the NVRTC route, one interface); raises RuntimeError
    with the reason when neither runs."""
    route = cuda_route()
    if route.kernels is None:
        raise RuntimeError(f"fastlangevin CUDA kernels unavailable ({route.reason}); use backend='triton' or "
                           "backend='reference' instead")
    return route.kernels


def build_info() -> dict[str, object]:
    """``build_info()`` of each compiled backend that loads, else its reason, and the CUDA kernels' route:
    ``{"cpu": {...} | str, "cuda": {...} | str, "cuda_route": str}`` (the CPU one of the module ``cpu_build()``
    chose, with ``"dispatch"``: why that level)."""
    out: dict[str, object] = {}
    cpu = cpu_build()
    out["cpu"] = {**cpu.module.build_info(), "dispatch": cpu.description} if cpu.module is not None else cpu.reason
    mod, reason = _load("_C_cuda")
    out["cuda"] = mod.build_info() if mod is not None else reason
    route = cuda_route()
    out["cuda_route"] = route.reason if route.kernels is None else route.description
    return out
