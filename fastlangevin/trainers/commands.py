"""The trainer subcommands of ``fastlangevin``: one per registered trainer (``trainers.registry``; a two-word command
such as "train-prior lebm" goes under its group), and ``sample`` / ``evaluate`` for the runs of trainers that can
draw from their model.

``add_commands(subparsers)`` registers them on the CLI's subparsers; ``run(args)`` runs the parsed command and
returns True when it was one of these (False otherwise, so the CLI can go on dispatching its own).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os

from fastlangevin.trainers import registry, settings
from fastlangevin.trainers.loop import RunOptions, train
from fastlangevin.trainers.run_folder import RunFolder

GROUPS = {"train-prior": "learn a generator with a latent-space EBM prior by maximum likelihood (posterior and "
                         "prior Langevin chains)"}


def add_commands(subparsers) -> None:
    groups = {}
    for command, trainer in registry.trainers().items():
        *group, name = command.split()
        parent = subparsers
        if group:
            if group[0] not in groups:
                help_text = GROUPS.get(group[0], f"{group[0]} MODEL")
                groups[group[0]] = subparsers.add_parser(group[0], help=help_text, description=help_text) \
                    .add_subparsers(dest="group_command", required=True, metavar="MODEL")
            parent = groups[group[0]]
        parser = parent.add_parser(name, help=trainer.help(), description=trainer.__doc__)
        if trainer.folder_option.startswith("-"):
            parser.add_argument(trainer.folder_option, dest="folder", required=True, help="the run directory (created)")
        else:
            parser.add_argument("folder", metavar=trainer.folder_option.upper(), help="a run directory")
        settings.add_options(parser, trainer.Settings)
        settings.add_options(parser.add_argument_group("how it runs"), RunOptions)
        parser.set_defaults(run=_train, trainer=trainer)
    for name, helptext, n in (("sample", "draw from a run's model(s); write the run's sample figures", 2000),
                              ("evaluate", "a run's sample quality against the test split -> evaluation.json",
                               5000)):
        p = subparsers.add_parser(name, help=helptext, description=helptext)
        p.add_argument("run_dir")
        p.add_argument("--n", type=int, default=n, help=f"samples (default {n})")
        p.add_argument("--seed", type=int, default=0 if name == "sample" else 123)
        p.add_argument("--n-steps", type=int, default=None, help="Langevin steps (default: the run's)")
        p.add_argument("--which", choices=("best", "last"), default="best", help="the best or the last model")
        p.add_argument("--device", default="cpu")
        p.set_defaults(run=_sample if name == "sample" else _evaluate)


def _train(args: argparse.Namespace) -> None:
    trainer = args.trainer
    options = settings.given_values(args, RunOptions)
    metrics = train(trainer, args.folder, **options, **settings.given_values(args, trainer.Settings))
    print(trainer.report(metrics))


def trainer_of_run(run_dir: str, need: str):
    """The registered trainer whose model RUN_DIR holds and that offers ``need`` ("sample_run",
    "evaluate_run")."""
    if not os.path.isdir(run_dir):
        raise FileNotFoundError(f"no run folder at {run_dir}")
    config = RunFolder(run_dir).config()
    for trainer in registry.trainers().values():
        if getattr(trainer, need, None) is not None and trainer.section in config:
            return trainer
    raise FileNotFoundError(f"{run_dir} holds no model that `{need.split('_')[0]}` can draw from (its config.json "
                            f"has {', '.join(config) or 'nothing'})")


def _draw_options(args: argparse.Namespace) -> dict:
    return dict(n=args.n, seed=args.seed, n_steps=args.n_steps, which=args.which, device=args.device)


def _sample(args: argparse.Namespace) -> None:
    path = trainer_of_run(args.run_dir, "sample_run").sample_run(args.run_dir, **_draw_options(args))
    if path:
        print(f"wrote {path}")


def _evaluate(args: argparse.Namespace) -> None:
    trainer = trainer_of_run(args.run_dir, "evaluate_run")
    print(trainer.format_evaluation(trainer.evaluate_run(args.run_dir, **_draw_options(args))))


def run(args: argparse.Namespace) -> bool:
    """Run ``args.command`` if it is a trainer command (under torchrun only rank 0 prints); False otherwise."""
    if not hasattr(args, "run"):
        return False
    quiet = os.environ.get("RANK", "0") != "0"
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        args.run(args)
    return True


def main(argv=None) -> int:
    """Run the trainer subcommands alone (``python -m fastlangevin.trainers.commands tilt RUN_DIR``), as the
    ``fastlangevin`` CLI would once it registers them."""
    parser = argparse.ArgumentParser(prog="fastlangevin", description="Latent EBM trainers.")
    add_commands(parser.add_subparsers(dest="command", required=True))
    run(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
