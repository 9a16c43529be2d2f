"""Lazy loading of the compiled backends ``fastlangevin._C`` (CPU) and ``fastlangevin._C_cuda`` (CUDA).

Nothing is imported until a backend is first asked for, and a missing or broken module never raises here: the
loaders return ``None`` and ``cpu_reason()`` / ``cuda_reason()`` say why, e.g. ``"not built: ..."`` or
``"import failed: ..."``. The outcome is cached, so the import is tried once per process.
"""

from __future__ import annotations

import importlib
import threading
from types import ModuleType

_HINTS = {
    "_C": "reinstall with `pip install --no-build-isolation -e .` (needs cmake, pybind11 and a C++17 compiler)",
    "_C_cuda": "reinstall where nvcc is found (CUDA_HOME or PATH) and FASTLANGEVIN_NO_CUDA is unset",
}

_lock = threading.Lock()
_cache: dict[str, tuple[ModuleType | None, str | None]] = {}
_runtime_status: list[str | None] = []  # filled once by cuda_runtime_reason()


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


def load_cpu() -> ModuleType | None:
    """The CPU extension module, or None when it is unavailable (see ``cpu_reason()``)."""
    return _load("_C")[0]


def cpu_reason() -> str | None:
    """None when the CPU extension loads, else why not."""
    return _load("_C")[1]


def cuda_reason() -> str | None:
    """None when the CUDA extension loads, else why not."""
    return _load("_C_cuda")[1]


def cuda_runtime_reason() -> str | None:
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


def require_cpu() -> ModuleType:
    """The CPU extension module; raises RuntimeError with the reason when it is unavailable."""
    mod, reason = _load("_C")
    if mod is None:
        raise RuntimeError(f"fastlangevin CPU extension unavailable ({reason}); use backend='reference' instead")
    return mod


def require_cuda() -> ModuleType:
    """The CUDA extension module; raises RuntimeError with the reason when it is unavailable."""
    mod, reason = _load("_C_cuda")
    if mod is None:
        raise RuntimeError(f"fastlangevin CUDA extension unavailable ({reason}); use backend='triton' or "
                           "backend='reference' instead")
    return mod


def build_info() -> dict[str, object]:
    """``build_info()`` of each backend that loads, else its reason: ``{"cpu": {...} | str, "cuda": {...} | str}``."""
    out: dict[str, object] = {}
    for key, name in (("cpu", "_C"), ("cuda", "_C_cuda")):
        mod, reason = _load(name)
        out[key] = mod.build_info() if mod is not None else reason
    return out
