"""The ``fastlangevin`` command (also ``python -m fastlangevin``): ``demo``, ``info``, ``bench``, and the trainers'
``train-base``, ``tilt``, ``sample``, ``evaluate``."""

from __future__ import annotations

import argparse
import sys

from fastlangevin._version import __version__
from fastlangevin.trainers import commands as trainer_commands

# Import names of the optional packages that the commands need (``fl.langevin`` needs none of them): the `train`
# extra of pyproject.toml installs them all, the `bench` extra numpy and matplotlib (tests/test_packaging.py checks).
OPTIONAL_MODULES = ("numpy", "sklearn", "matplotlib", "safetensors", "tqdm")


def main(argv=None) -> int:
    """Runs the command; a missing optional package is one line on stderr naming the extra to install (exit 2)."""
    try:
        return _main(argv)
    except ModuleNotFoundError as error:
        missing = (error.name or "").split(".")[0]
        if missing not in OPTIONAL_MODULES:
            raise
        command = (sys.argv[1:] if argv is None else list(argv))[:1]
        extra = "bench" if command == ["bench"] else "train"
        print(f"fastlangevin: this command needs {missing!r}, which is not installed: "
              f"pip install \"fastlangevin[{extra}]\"", file=sys.stderr)
        return 2


def _main(argv) -> int:
    parser = argparse.ArgumentParser(prog="fastlangevin", description="Fast Langevin sampling for latent EBMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    trainer_commands.add_commands(sub)

    demo = sub.add_parser("demo", help="the exponential-tilting paper's toy experiment: a VAE on 25-Gaussians, then "
                                       "a latent EBM on it; prints both models' metrics, writes the Figure-1 plot")
    demo.add_argument("--out", default="demo-out", help="folder for the run directory and PNG (default: demo-out)")
    demo.add_argument("--data", choices=("25gaussians", "swissroll"), default="25gaussians")
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu")
    demo.add_argument("--quick", action="store_true", help="tiny budgets (seconds; for smoke tests, not results)")
    demo.add_argument("--backends", action="store_true",
                      help="instead: sample a fixed 25-Gaussian mixture with every available backend")

    sub.add_parser("info", help="which backends are built and available here, and why")

    sub.add_parser("bench", add_help=False,  # its options are benchmarks/chain_bench.py's (fastlangevin bench -h)
                   help="time whole Langevin chains (eager, torch.compile, step op, CUDA graph, fused, JAX) from a "
                        "source checkout's benchmarks/; prints a table, writes JSON and a PNG")

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:
        from fastlangevin.bench import main as bench
        return bench(argv[1:])
    args = parser.parse_args(argv)
    if trainer_commands.run(args):
        return 0
    if args.command == "demo":
        from fastlangevin.demo import run_backend_demo, run_demo
        if args.backends:
            run_backend_demo(args.out, seed=args.seed, device=args.device)
        else:
            run_demo(args.out, args.data, args.seed, args.device, args.quick)
    elif args.command == "info":
        import fastlangevin as fl
        print(fl.backend_info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
