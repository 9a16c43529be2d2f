"""``fastlangevin bench``: runs the whole-chain benchmarks of the source checkout this package was imported from.

The harness (timing, machine, models, implementations, plots) lives in ``benchmarks/`` beside ``fastlangevin/``, not
in the installed package; an installation without that folder (a wheel) says so and exits with status 2.
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
ENTRY = "chain_bench.py"


def benchmarks_dir() -> Path | None:
    """``benchmarks/`` of the checkout holding this package (an editable install or PYTHONPATH), else None."""
    return BENCHMARKS if (BENCHMARKS / ENTRY).is_file() and (BENCHMARKS / "harness").is_dir() else None


def main(argv=None) -> int:
    """``fastlangevin bench [options]``: ``benchmarks/chain_bench.py``'s options and exit status."""
    folder = benchmarks_dir()
    if folder is None:
        print(f"fastlangevin bench: the benchmarks are not installed with the package (no {BENCHMARKS / ENTRY}); "
              f"run it from a source checkout: git clone the repository, pip install -e \".[bench]\"",
              file=sys.stderr)
        return 2
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    import chain_bench

    return chain_bench.main(argv, prog="fastlangevin bench")
