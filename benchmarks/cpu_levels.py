"""The fused chain's speed at each CPU kernel level of this build, and against a ``-march=native`` build.

    python benchmarks/cpu_levels.py                       # every level this CPU runs (FASTLANGEVIN_CPU_LEVEL)
    python benchmarks/cpu_levels.py --native DIR          # and the native build whose fastlangevin package is DIR/

The native build: the same sources built with ``FASTLANGEVIN_NATIVE=1`` (one ``_C`` compiled with -march=native,
what every build was before the run-time dispatch), e.g. a copy of the checkout built in place there.

A process loads one CPU module, so each row runs in its own processes; the rows take turns round by round, so that
the machine's load (shared machines) falls on all of them alike. A row's time is the median over rounds of each
round's median chain. The chain: ``fl.langevin`` on ``MLPEnergy((100, 200, 200, 1), "leaky_relu", 0.2)``, K = 60,
float32, the C++ fused kernel, torch's default threads. Prints a table; ``--json`` writes the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

DIMS = (100, 200, 200, 1)
N_STEPS = 60


def child(batches: list[int], repeats: int) -> None:
    """Times the fused chain in this process; prints {"level": ..., "times": {batch: [seconds...]}} as JSON."""
    import torch

    import fastlangevin as fl
    from fastlangevin import _ext

    torch.manual_seed(0)
    energy = fl.MLPEnergy(DIMS, "leaky_relu", 0.2)
    times = {}
    for batch in batches:
        z0 = torch.randn(batch, DIMS[0])
        fl.langevin(energy, z0, N_STEPS, 0.01, seed=0, backend="cpu")  # warm-up
        runs = []
        for i in range(repeats):
            t0 = time.perf_counter()
            fl.langevin(energy, z0, N_STEPS, 0.01, seed=i, backend="cpu")
            runs.append(time.perf_counter() - t0)
        times[batch] = runs
    assert not fl.backend_info().fallbacks, fl.backend_info().fallbacks  # the fused kernel ran
    print(json.dumps({"level": _ext.cpu_build().level, "threads": torch.get_num_threads(), "times": times}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--native", help="folder holding the fastlangevin package of a FASTLANGEVIN_NATIVE=1 build")
    parser.add_argument("--batches", default="64,1024")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=10, help="chains per row and round")
    parser.add_argument("--json", help="write the rows here")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    batches = [int(b) for b in args.batches.split(",")]
    if args.child:
        return child(batches, args.repeats)

    from fastlangevin import _ext
    from harness.machine import machine

    build = _ext.cpu_build()
    if build.level not in _ext.CPU_LEVELS:
        sys.exit(f"this build has no CPU levels to compare: {build.description}")
    top = list(_ext.CPU_LEVELS).index(_ext.cpu_features()["level"])
    rows = {f"dispatch {level}": {_ext.CPU_LEVEL_ENV: level} for level in list(_ext.CPU_LEVELS)[:top + 1]}
    if args.native:
        rows["native"] = {"PYTHONPATH": os.path.abspath(args.native), _ext.CPU_LEVEL_ENV: ""}
    medians: dict[str, dict[int, list[float]]] = {row: {b: [] for b in batches} for row in rows}
    load_before = os.getloadavg()[0]
    for _ in range(args.rounds):
        for row, env in rows.items():
            out = subprocess.run([sys.executable, __file__, "--child", "--batches", args.batches, "--repeats",
                                  str(args.repeats)], env={**os.environ, **env}, capture_output=True, text=True,
                                 check=True)
            result = json.loads(out.stdout.strip().splitlines()[-1])
            assert result["level"] == (row.split()[-1]), (row, result["level"])  # the build and level asked for
            for b in batches:
                medians[row][b].append(statistics.median(result["times"][str(b)]))
    ref = "native" if args.native else f"dispatch {list(_ext.CPU_LEVELS)[top]}"
    info = machine()
    print(f"{info['cpu']}, {info['cores']} cores, torch {info['torch']}; CPU features level "
          f"{_ext.cpu_features()['level']}")
    print(f"fused chain, MLP {'-'.join(map(str, DIMS))}, K = {N_STEPS}, float32, {args.rounds} rounds x "
          f"{args.repeats} chains; load average before: {load_before:.2f}")
    print(f"{'row':<18}" + "".join(f"{'B=' + str(b) + ' ms':>14}{'x ' + ref:>18}" for b in batches))
    table = {}
    for row in rows:
        cells = ""
        for b in batches:
            t = statistics.median(medians[row][b])
            r = t / statistics.median(medians[ref][b])
            cells += f"{t * 1e3:>14.2f}{r:>18.3f}"
            table.setdefault(row, {})[b] = {"median_s": t, "round_medians_s": medians[row][b], "ratio": r}
        print(f"{row:<18}{cells}")
    print(f"load average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": info, "load_average_before": load_before, "reference": ref, "rows": table}, f,
                      indent=1)


if __name__ == "__main__":
    main()
