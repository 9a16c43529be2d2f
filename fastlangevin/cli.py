"""The ``fastlangevin`` command: ``demo``, ``info``."""

from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastlangevin", description="Fast Langevin sampling for latent EBMs.")
    sub = parser.add_subparsers(dest="command", required=True)

    demo = sub.add_parser("demo", help="sample a 25-Gaussian mixture with every available backend")
    demo.add_argument("--out", default="demo-out", help="folder for the PNG (default: demo-out)")
    demo.add_argument("--n-samples", type=int, default=10_000)
    demo.add_argument("--n-steps", type=int, default=200)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--device", default="cpu")

    sub.add_parser("info", help="which backends are built and available here, and why")

    args = parser.parse_args(argv)
    if args.command == "demo":
        from fastlangevin.demo import run_demo
        run_demo(args.out, args.n_samples, args.n_steps, args.seed, args.device)
    elif args.command == "info":
        import fastlangevin as fl
        print(fl.backend_info())
    return 0


if __name__ == "__main__":
    sys.exit(main())
