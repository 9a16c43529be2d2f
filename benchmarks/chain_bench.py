"""Whole-chain benchmarks (``fastlangevin bench`` runs this): eager PyTorch, torch.compile, the step op, the CUDA
graph, the fused chain and JAX, timed side by side; prints a table, writes JSON and a PNG.

    python benchmarks/chain_bench.py --quick --out bench-out    # or: fastlangevin bench --quick --out bench-out
    python benchmarks/chain_bench.py --cases mlp --device cuda

Rows and how they are timed: ``harness/measure.py``; the implementations: ``harness/implementations.py``. FLOPs
count the forward and the input gradient of each layer, 4·MACs per sample per step, and are set against a
``torch.mm`` float32 rate measured in the same rounds on the GEMM shape of the row.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch

from harness.flops import FLOP_COUNT
from harness.machine import load_average, machine
from harness.measure import CASES, chain_specs, run_specs
from harness.plots import plot
from harness.tables import chain_table, write_json


def run_bench(out_dir: str = "bench-out", cases=CASES, quick: bool = False, device: str | None = None,
              repeats: int | None = None) -> dict:
    """Measures, prints the table, writes ``chain_bench.json`` and ``chain_bench.png`` into ``out_dir``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = machine()
    info["load_average_at_start"] = load_average()
    if info["load_average_at_start"] > 0.5:
        print(f"warning: the 1-minute load average is {info['load_average_at_start']:.1f} before the run: other "
              f"processes share these cores and the times will be noisy", flush=True)
    print(f"fastlangevin bench ({'quick' if quick else 'full'}, {device}): {info.get('gpu', info['cpu'])}, "
          f"{info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads), "
          f"jax {info.get('jax', 'not installed')}", flush=True)
    started = time.perf_counter()
    rows = run_specs(chain_specs(cases, quick), device, repeats or (5 if quick else 10),
                     max_seconds=3.0 if quick else 8.0)
    print()
    print(chain_table(rows))
    info["load_average_at_end"] = load_average()
    payload = dict(machine=info, device=str(device), quick=quick, cases=list(cases), flop_count=FLOP_COUNT,
                   seconds=time.perf_counter() - started, rows=rows)
    json_path = os.path.join(out_dir, "chain_bench.json")
    write_json(json_path, payload)
    png = plot(rows, os.path.join(out_dir, "chain_bench.png"))
    print(f"\nwrote {json_path}" + (f" and {png}" if png else "") + f" ({payload['seconds']:.0f} s)")
    return payload


def main(argv=None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a subset that runs in about a minute")
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated: {', '.join(CASES)}")
    parser.add_argument("--out", default="bench-out", help="folder for chain_bench.json and .png (default: bench-out)")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed chains per row (default 10, quick 5; long chains stop after 3)")
    args = parser.parse_args(argv)
    cases = tuple(c.strip() for c in args.cases.split(",") if c.strip())
    unknown = sorted(set(cases) - set(CASES))
    if unknown or not cases:
        parser.error(f"--cases: unknown {unknown or args.cases!r}; choose from {','.join(CASES)}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    if args.device is not None:
        try:
            device = torch.device(args.device)
        except RuntimeError as error:
            parser.error(f"--device {args.device!r}: {error}")
        if device.type == "cuda" and not torch.cuda.is_available():
            parser.error(f"--device {args.device}: torch sees no CUDA device")
    run_bench(args.out, cases, args.quick, args.device, args.repeats)
    return 0


if __name__ == "__main__":
    sys.exit(main())
