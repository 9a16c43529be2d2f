"""Loads a script of ``benchmarks/`` as a module, with ``benchmarks/`` on ``sys.path`` for its ``harness`` imports
(as when it runs as ``python benchmarks/NAME.py``)."""

import importlib.util
import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def load(name: str):
    """The module of ``benchmarks/{name}.py``, executed anew and registered as ``sys.modules[name]`` (dataclasses
    look their module up there)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
