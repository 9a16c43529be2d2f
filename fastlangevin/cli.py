"""The ``fastlangevin`` command (also ``python -m fastlangevin``): ``demo``, ``info``, ``bench``, and the trainers'
``train-base``, ``tilt``, ``sample``, ``evaluate``.

A user's error (a bad option or value, a missing or broken run folder, a diverging run) is one line on stderr,
``fastlangevin: error: …``, with exit status 2, and the run folder is left as it was; ``--debug`` (anywhere on the
command line) shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys

from fastlangevin._version import __version__
from fastlangevin.trainers import commands as trainer_commands

# Import names of the optional packages that the commands need (``fl.langevin`` needs none of them): the `train`
# extra of pyproject.toml installs them all, the `bench` extra numpy and matplotlib (tests/test_packaging.py checks).
OPTIONAL_MODULES = ("numpy", "sklearn", "matplotlib", "safetensors", "tqdm")

# What a user's mistake raises (bad values, missing files, a checkpoint that does not fit, a run that diverged:
# NonFiniteEnergyError is a FloatingPointError); anything else is a bug and keeps its traceback.
USER_ERRORS = (ValueError, OSError, FloatingPointError)


class UsageError(ValueError):
    """The command line does not parse (argparse's message)."""


class _Parser(argparse.ArgumentParser):
    """argparse with its errors raised, so that they end in the CLI's one-line form."""

    def error(self, message):
        raise UsageError(f"{message} (see: {self.prog} --help)")


def main(argv=None) -> int:
    """Run the command line ``argv`` (default: sys.argv); returns the exit status (2: a user's error, told in one
    line on stderr; 130: interrupted)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        return _run([a for a in argv if a != "--debug"])
    except KeyboardInterrupt:
        if debug:
            raise
        print("fastlangevin: interrupted", file=sys.stderr)
        return 130
    except Exception as error:
        message = user_error(error, argv[:1])
        if debug or message is None:
            raise
        print(f"fastlangevin: error: {message}", file=sys.stderr)
        return 2


def user_error(error: Exception, command: list[str]) -> str | None:
    """The one-line message of a user's error (None: a bug, whose traceback is shown): a bad value, a missing file,
    a missing optional package (naming the extra that installs it, or what the data set needs)."""
    if isinstance(error, ModuleNotFoundError) and (error.name or "").split(".")[0] in OPTIONAL_MODULES:
        extra = "bench" if command == ["bench"] else "train"
        return (f"this command needs {error.name.split('.')[0]!r}, which is not installed: "
                f'pip install "fastlangevin[{extra}]"')
    data_files = sys.modules.get("fastlangevin.data.files")  # imported if a data set raised (not imported here:
    if data_files is not None and isinstance(error, data_files.MissingDataPackage):  # it needs scikit-learn)
        return " ".join(str(error).split())
    if isinstance(error, USER_ERRORS):
        return " ".join(str(error).split())
    if _out_of_memory(error):
        return (f"out of memory ({str(error).strip().splitlines()[-1][:200]}); lower --batch-size, --n-eval or "
                f"--n")
    return None


def _out_of_memory(error: Exception) -> bool:
    import torch
    # torch's CPU allocator raises a plain RuntimeError; its message is the only mark
    return isinstance(error, (MemoryError, torch.OutOfMemoryError)) or (
        isinstance(error, RuntimeError) and "can't allocate memory" in str(error))


def _run(argv: list[str]) -> int:
    parser = _Parser(prog="fastlangevin", description="Fast Langevin sampling for latent EBMs.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
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
    demo.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True,
                      help="progress bars on stderr (off when stderr is not a terminal; TQDM_DISABLE=1 too)")
    demo.add_argument("--overwrite", action="store_true",
                      help="replace the run a previous demo left in OUT/DATA (refused otherwise)")

    sub.add_parser("info", help="which backends are built and available here, and why")

    sub.add_parser("bench", add_help=False,  # its options are benchmarks/chain_bench.py's (fastlangevin bench -h)
                   help="time whole Langevin chains (eager, torch.compile, step op, CUDA graph, fused, JAX) from a "
                        "source checkout's benchmarks/; prints a table, writes JSON and a PNG")

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
            run_demo(args.out, args.data, args.seed, args.device, args.quick, progress=args.progress,
                     overwrite=args.overwrite)
    elif args.command == "info":
        import fastlangevin as fl
        print(fl.backend_info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
