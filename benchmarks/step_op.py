"""The fused step op against an eager PyTorch step, 2^14 … 2^24 elements, with bandwidth against a measured copy.

    python benchmarks/step_op.py [--device cpu|cuda] [--dtype float32] [--max-log2 24] [--json out.json]

Effective bandwidth counts the minimum traffic of a step: z and grad read, z written (3·n·itemsize bytes); the
copy rate is ``out.copy_(z)`` (2·n·itemsize bytes) measured in the same run on the same device. Times are medians:
on a GPU of CUDA-event timings with the L2 cache flushed before each run (``triton.testing.do_bench``).
"""

from __future__ import annotations

import argparse
import sys

import torch

from fastlangevin.backends import AUTO_ORDER, SUPPORTED_DTYPES, backend_status
from fastlangevin.ops.langevin_step import make_rng_state, run_step
from harness.machine import machine
from harness.tables import print_table, write_json
from harness.timing import time_call

STEP_SIZE, NOISE_SCALE = 0.01, 0.1


def eager_step(z, grad):
    """How a hand-written loop does it: separate randn, mul and add kernels."""
    return z - 0.5 * STEP_SIZE * (grad + z) + NOISE_SCALE * torch.randn_like(z)


def implementations(device: str, dtype: torch.dtype = torch.float32) -> dict:
    """``{"eager": eager_step, backend name: backend name, ...}`` for every backend that runs ``dtype`` here."""
    impls = {"eager": eager_step}
    for backend in AUTO_ORDER[torch.device(device).type]:
        if dtype in SUPPORTED_DTYPES[backend] and backend_status(backend, torch.device(device).type).available:
            impls[backend] = backend
    return impls


def run(device: str, dtype: torch.dtype, log2_sizes, repeats: int) -> list[dict]:
    rows = []
    rng_state = make_rng_state(1, 0, device)
    for log2 in log2_sizes:
        n = 2 ** log2
        z = torch.randn(n // 64, 64, device=device, dtype=dtype)
        grad = torch.randn_like(z)
        out = torch.empty_like(z)
        itemsize = z.element_size()
        copy = time_call(lambda: out.copy_(z), device, repeats)
        copy_gbs = 2 * n * itemsize / copy["median"] / 1e9
        eager_time = None
        for name, impl in implementations(device, dtype).items():
            if callable(impl):
                fn = lambda: impl(z, grad)
            else:
                fn = lambda impl=impl: run_step(impl, z, grad, rng_state, STEP_SIZE, NOISE_SCALE, 1, None, None)
            t = time_call(fn, device, repeats)
            eager_time = t["median"] if name == "eager" else eager_time
            gbs = 3 * n * itemsize / t["median"] / 1e9
            rows.append(dict(n=f"2^{log2}", log2=log2, dtype=str(dtype).removeprefix("torch."), impl=name,
                             us=t["median"] * 1e6, us_min=t["min"] * 1e6,
                             us_max=t["max"] * 1e6, gbs=gbs, of_copy=gbs / copy_gbs,
                             vs_eager=eager_time / t["median"], copy_gbs=copy_gbs))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64", "bfloat16", "float16"])
    parser.add_argument("--min-log2", type=int, default=14)
    parser.add_argument("--max-log2", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", default=None, help="write the rows and the machine here")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    rows = run(args.device, dtype, range(args.min_log2, args.max_log2 + 1, 2), args.repeats)
    info = machine()
    print(f"step op, {args.dtype}, {args.device}: {info}")
    print_table(rows, [("n", "n", "s"), ("impl", "impl", "s"), ("us", "median us", ".1f"), ("us_min", "min us", ".1f"),
                       ("us_max", "max us", ".1f"), ("gbs", "GB/s", ".2f"), ("of_copy", "of copy", ".0%"),
                       ("copy_gbs", "copy GB/s", ".1f"), ("vs_eager", "x eager", ".2f")])
    if args.json:
        write_json(args.json, dict(machine=info, dtype=args.dtype, device=args.device, rows=rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
