"""What the library's sampler saves the tilt trainer: the same ``tilt`` run with ``--sampler library`` (fl.langevin)
and ``--sampler eager`` (the hand-written loop), alternated, on a trained backbone.

    fastlangevin train-base vae --data 25gaussians --out runs/toy --steps 3000
    python benchmarks/tilt_chain_cost.py runs/toy --steps 40 --repeats 3 --batch-size 128

Each repeat copies the backbone into a fresh folder and trains a new EBM for ``--steps`` iterations with each sampler
in turn (library, eager, library, eager, ...; evaluation only at the end and left out of the time). Prints, as the
median over repeats: seconds per training iteration, seconds in chains per iteration, the chains' share of the
iteration, and the speed-ups library vs eager of the chain and of the whole iteration; writes the raw repeats as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile

import torch

from fastlangevin.trainers import train_tilt
from fastlangevin.trainers.chains import SAMPLERS
from harness.machine import machine

BACKBONE_FILES = ("config.json", "base.safetensors")


def measure(run_dir: str, sampler: str, steps: int, batch_size: int, energy_width, energy_depth, seed: int) -> dict:
    """One fresh ``tilt`` of ``steps`` iterations on a copy of ``run_dir``'s backbone: seconds per iteration."""
    with tempfile.TemporaryDirectory() as tmp:
        for name in BACKBONE_FILES:
            shutil.copy(os.path.join(run_dir, name), tmp)
        m = train_tilt(tmp, steps=steps, batch_size=batch_size, eval_every=steps, n_eval=100, seed=seed,
                       energy_width=energy_width, energy_depth=energy_depth, sampler=sampler, progress=False)
    train_seconds = m["seconds"] - m["eval_seconds"]
    return {"sampler": sampler, "iteration_s": train_seconds / m["steps_run"],
            "chain_s": m["chain_seconds"] / m["steps_run"], "chain_share": m["chain_seconds"] / train_seconds}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", help="a run directory with a trained backbone (fastlangevin train-base)")
    parser.add_argument("--steps", type=int, default=40, help="training iterations per measurement")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--energy-width", type=int, default=None)
    parser.add_argument("--energy-depth", type=int, default=None)
    parser.add_argument("--out", default="bench-out/tilt_chain_cost.json")
    args = parser.parse_args(argv)
    for name in BACKBONE_FILES:
        if not os.path.exists(os.path.join(args.run_dir, name)):
            raise SystemExit(f"{args.run_dir} has no {name}: train a backbone first (fastlangevin train-base ...)")
    rows = [measure(args.run_dir, sampler, args.steps, args.batch_size, args.energy_width, args.energy_depth, seed)
            for seed in range(args.repeats) for sampler in SAMPLERS]
    median = {s: {k: statistics.median(r[k] for r in rows if r["sampler"] == s)
                  for k in ("iteration_s", "chain_s", "chain_share")} for s in SAMPLERS}
    lib, eager = median["library"], median["eager"]
    summary = {"chain_speedup": eager["chain_s"] / lib["chain_s"],
               "iteration_speedup": eager["iteration_s"] / lib["iteration_s"]}
    print(f"tilt on {args.run_dir}: {args.steps} iterations × {args.repeats} repeats per sampler, batch "
          f"{args.batch_size}, torch threads {torch.get_num_threads()} (medians)")
    print(f"{'sampler':<9} {'s/iteration':>12} {'chain s/it':>11} {'chain share':>12}")
    for s in SAMPLERS:
        print(f"{s:<9} {median[s]['iteration_s']:>12.4f} {median[s]['chain_s']:>11.4f} {median[s]['chain_share']:>12.0%}")
    print(f"library vs eager: chain {summary['chain_speedup']:.2f}×, whole iteration {summary['iteration_speedup']:.2f}×")
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    result = {"machine": machine(), "run_dir": args.run_dir, "args": vars(args), "repeats": rows,
              "median": median, **summary}
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
