"""NVTX ranges for Nsight, under one domain named ``fastlangevin``, at zero cost when off.

On with ``FASTLANGEVIN_NVTX=1`` in the environment or ``fl.profiling.nvtx(True)``; they need the ``nvtx`` package
(``pip install nvtx``) and are a no-op without it (a warning says so once). Ranges never synchronise the device.
"""

from __future__ import annotations

import contextlib
import logging
import os

_NULL = contextlib.nullcontext()
_domain = None
_enabled = False


def nvtx(enabled: bool = True) -> bool:
    """Switch the ranges on or off; returns whether they are on (False when the nvtx package is missing)."""
    global _enabled, _domain
    if not enabled:
        _enabled = False
        return False
    if _domain is None:
        try:
            import nvtx as nvtx_package
        except ImportError:
            logging.getLogger("fastlangevin").warning(
                "fastlangevin profiling: NVTX ranges asked for but the nvtx package is not installed "
                "(pip install nvtx); ranges are off")
            _enabled = False
            return False
        _domain = nvtx_package.get_domain("fastlangevin")
    _enabled = True
    return True


def nvtx_range(name: str):
    """A context manager marking ``name`` in the ``fastlangevin`` domain, or a shared no-op when off."""
    if not _enabled:
        return _NULL
    return _RangeContext(name)


class _RangeContext:
    __slots__ = ("name", "range")

    def __init__(self, name: str):
        self.name = name

    def __enter__(self):
        self.range = _domain.start_range(message=self.name)

    def __exit__(self, *exc):
        _domain.end_range(self.range)
        return False


if os.environ.get("FASTLANGEVIN_NVTX", "0") not in ("", "0"):
    nvtx(True)
