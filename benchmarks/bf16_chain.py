"""Mixed-precision fused chains (issue 16): the fused bfloat16 chain against the fused float32 chain, the eager float32
loop and the eager loop under ``torch.autocast(bfloat16)``, with the matrix unit named and ``torch.mm`` in both
precisions at the chain's main GEMM shape timed in the same rounds.

    python benchmarks/bf16_chain.py                               # B = 64, 1024, 8192, every bfloat16 unit here
    python benchmarks/bf16_chain.py --batches 1024 --repeats 20 --out bf16.json
    python benchmarks/bf16_chain.py --threads 1 --batches 1024 --no-eager --dims 100,16,16,1   # the width-free cost

The chain: an MLP energy 100 → 200 → 200 → 1 (leaky ReLU 0.2), K = 60 ULA steps, ε = 0.01, N(0, I) prior, noise on,
no clipping; z0 float32. Rows:

* ``fused bf16 <unit>``: ``fl.langevin`` of the energy in bfloat16, once per CPU matrix unit this machine runs
  (``FASTLANGEVIN_MATRIX_UNIT``: amx_bf16, avx512_bf16), its ``info.backend`` printed, so a fallback cannot pass
  for the unit it names;
* ``fused f32``: ``fl.langevin`` of the float32 energy (the float32 fused chain);
* ``eager f32`` and ``eager autocast``: the loop as latent-EBM code writes it (autograd through the energy), in float32
  and under ``torch.autocast("cpu", dtype=torch.bfloat16)``.

Implementations run in interleaved rounds (each round runs every row once), so the ratios compare chains run side by
side; times are medians over rounds. FLOPs: 4·MACs per sample per step (each layer's forward and input gradient).
``torch.mm`` (B × 200)·(200 × 200), the chain's largest product, is timed in each round in float32 and bfloat16 (its
best run per round, median over rounds) as the rate this machine reaches at that shape. The targets of issue 16
(fused bfloat16 ≥ 3.5× fused float32 and ≥ 1 TFLOP/s at B = 1024, ≥ 2× at B = 64) are checked and printed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import statistics
import sys
import time

import torch

import fastlangevin as fl
from fastlangevin.backends import MATRIX_UNIT_ENV

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.flops import FLOP_COUNT  # noqa: E402
from harness.machine import load_average, machine  # noqa: E402
from harness.timing import alternated  # noqa: E402

DIMS = (100, 200, 200, 1)
N_STEPS, STEP_SIZE = 60, 0.01
UNITS = ("amx_bf16", "avx512_bf16")
# issue 16's targets on a CPU with AMX: batch -> (minimum fused bf16 / fused f32, minimum GFLOP/s or None)
TARGETS = {1024: (3.5, 1000.0), 64: (2.0, None)}


def macs_per_sample(dims=DIMS) -> int:
    return sum(a * b for a, b in zip(dims[:-1], dims[1:]))


def eager_chain(energy, z0: torch.Tensor, autocast: bool) -> torch.Tensor:
    """The published prior loop (LEBM sample_langevin_prior_z): autograd through the energy each step."""
    s = math.sqrt(STEP_SIZE)
    z = z0.clone()
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        for _ in range(N_STEPS):
            z.requires_grad_(True)
            z_grad = torch.autograd.grad(energy(z).sum(), z)[0].float()
            z.data = z.data - 0.5 * s * s * (z_grad + z.data) + s * torch.randn_like(z).data
    return z.detach()


def fused_chain(energy, z0: torch.Tensor, unit: str | None):
    """(call, what ran): fl.langevin of ``energy`` with FASTLANGEVIN_MATRIX_UNIT = unit for its calls."""

    def call():
        old = os.environ.get(MATRIX_UNIT_ENV)
        if unit is not None:
            os.environ[MATRIX_UNIT_ENV] = unit
        try:
            return fl.langevin(energy, z0, N_STEPS, STEP_SIZE, seed=1, return_info=True)
        finally:
            if old is None:
                os.environ.pop(MATRIX_UNIT_ENV, None)
            else:
                os.environ[MATRIX_UNIT_ENV] = old

    _, info = call()
    return (lambda: call()[0]), info.backend


def mm_best(batch: int, dtype: torch.dtype, tries: int = 5) -> float:
    """Best seconds of torch.mm (batch × 200)·(200 × 200) in dtype."""
    a, b = torch.randn(batch, 200).to(dtype), torch.randn(200, 200).to(dtype)
    torch.mm(a, b)
    best = math.inf
    for _ in range(tries):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return best


def measure(batch: int, repeats: int, units, dims=DIMS, eager: bool = True) -> list[dict]:
    torch.manual_seed(0)
    energy = fl.MLPEnergy(dims, "leaky_relu").requires_grad_(False)
    energy_bf16 = copy.deepcopy(energy).to(torch.bfloat16)
    z0 = torch.randn(batch, dims[0])
    impls = {}
    for unit in units:
        impls[f"fused bf16 {unit}"] = fused_chain(energy_bf16, z0, unit)
    impls["fused f32"] = fused_chain(energy, z0, None)
    if eager:
        impls["eager f32"] = (lambda: eager_chain(energy, z0, False)), "torch eager"
        impls["eager autocast"] = (lambda: eager_chain(energy, z0, True)), "torch eager, autocast bf16"
    mm = {torch.float32: [], torch.bfloat16: []}
    times = alternated(impls, repeats, lambda: [mm[dtype].append(mm_best(batch, dtype)) for dtype in mm])
    gflop = 4 * macs_per_sample(dims) * batch * N_STEPS / 1e9
    mm_rate = {dtype: 2 * batch * 200 * 200 / statistics.median(s) / 1e9 for dtype, s in mm.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    rows = []
    for name, (_, ran) in impls.items():
        rows.append(dict(batch=batch, impl=name, ran=ran, median_ms=median[name] * 1e3,
                         min_ms=min(times[name]) * 1e3, max_ms=max(times[name]) * 1e3,
                         vs_fused_f32=median["fused f32"] / median[name],
                         vs_eager_f32=median["eager f32"] / median[name] if eager else None,
                         gflops=gflop / median[name],
                         of_mm_bf16=gflop / median[name] / mm_rate[torch.bfloat16],
                         mm_f32_gflops=mm_rate[torch.float32], mm_bf16_gflops=mm_rate[torch.bfloat16],
                         repeats=repeats))
    return rows


def check_targets(rows: list[dict]) -> list[str]:
    """One line per target of issue 16 that this run can check: met or missed, with the numbers."""
    lines = []
    for row in rows:
        if not row["impl"].startswith("fused bf16") or row["batch"] not in TARGETS:
            continue
        ratio, rate = TARGETS[row["batch"]]
        met = row["vs_fused_f32"] >= ratio and (rate is None or row["gflops"] >= rate)
        want = f">= {ratio}x fused f32" + (f" and >= {rate:.0f} GFLOP/s" if rate else "")
        lines.append(f"B = {row['batch']}, {row['impl']} ({row['ran']}): {row['vs_fused_f32']:.2f}x fused f32, "
                     f"{row['gflops']:.0f} GFLOP/s; target {want}: {'met' if met else 'MISSED'}")
    return lines


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batches", nargs="+", type=int, default=[64, 1024, 8192])
    parser.add_argument("--repeats", type=int, default=10, help="interleaved rounds (default 10)")
    parser.add_argument("--threads", type=int, default=None, help="torch and kernel threads (default: torch's)")
    parser.add_argument("--dims", default=",".join(map(str, DIMS)),
                        help="the energy's widths, D,...,1 (default %(default)s; e.g. 100,16,16,1 for a chain whose "
                             "products are negligible: the cost that does not depend on the hidden widths)")
    parser.add_argument("--no-eager", action="store_true", help="skip the eager rows (slow at large B)")
    parser.add_argument("--out", default=None, help="write the rows and the machine as JSON here")
    args = parser.parse_args(argv)
    if args.repeats < 1 or any(b < 1 for b in args.batches):
        parser.error("--repeats and --batches must be >= 1")
    try:
        dims = tuple(int(d) for d in args.dims.split(","))
    except ValueError:
        dims = ()
    if len(dims) < 2 or dims[-1] != 1 or min(dims) < 1:
        parser.error(f"--dims must be positive widths ending in 1, e.g. 100,200,200,1; got {args.dims!r}")
    if args.threads:
        torch.set_num_threads(args.threads)
    status = fl.backend_info().bf16_chain.get("cpu", "none")
    units = [u for u in UNITS if _runs(u)]
    info = machine()
    info["load_average_at_start"] = load_average()
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']} ({info['torch_threads']} threads); "
          f"load average {info['load_average_at_start']:.2f} at the start")
    print(f"bfloat16 chain here: {status}")
    print(f"MLP {'-'.join(map(str, dims))}, K = {N_STEPS}, {args.repeats} interleaved rounds; FLOPs: {FLOP_COUNT}")
    print(f"{'B':>5s} {'impl':24s} {'ran':28s} {'median ms':>10s} {'x fused f32':>11s} {'x eager':>8s} "
          f"{'GFLOP/s':>8s} {'of mm bf16':>10s}")
    rows = []
    for batch in args.batches:
        batch_rows = measure(batch, args.repeats, units, dims, not args.no_eager)
        rows.extend(batch_rows)
        for row in batch_rows:
            vs_eager = "" if row["vs_eager_f32"] is None else f"{row['vs_eager_f32']:.2f}"
            print(f"{row['batch']:5d} {row['impl']:24s} {row['ran']:28s} {row['median_ms']:10.2f} "
                  f"{row['vs_fused_f32']:11.2f} {vs_eager:>8s} {row['gflops']:8.1f} "
                  f"{row['of_mm_bf16']:10.0%}")
        row = batch_rows[0]
        print(f"{batch:5d} torch.mm ({batch}x200)(200x200): float32 {row['mm_f32_gflops']:.0f} GFLOP/s, "
              f"bfloat16 {row['mm_bf16_gflops']:.0f} GFLOP/s", flush=True)
    info["load_average_at_end"] = load_average()
    print(f"load average {info['load_average_at_end']:.2f} at the end")
    targets = check_targets(rows) if dims == DIMS else []  # the targets are for its network
    for line in targets:
        print(line)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(machine=info, bf16_chain=status, dims=dims, n_steps=N_STEPS, flop_count=FLOP_COUNT,
                           rows=rows, targets=targets), f, indent=1)
    return rows


def _runs(unit: str) -> bool:
    from fastlangevin import _ext

    module = _ext.load_cpu()
    return module is not None and hasattr(module, "matrix_units") and module.matrix_units()[unit] == ""


if __name__ == "__main__":
    main()
