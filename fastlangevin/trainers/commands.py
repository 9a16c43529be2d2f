"""The trainer subcommands of ``fastlangevin``: one per registered trainer (``trainers.registry``; a two-word command
such as "train-prior lebm" goes under its group), and ``sample`` / ``evaluate`` for the runs of trainers that can
draw from their model.

``add_commands(subparsers)`` registers them on the CLI's subparsers; ``run(args)`` runs the parsed command and
returns True when it was one of these (False otherwise, so the CLI can go on dispatching its own).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os

from fastlangevin.trainers import registry, settings
from fastlangevin.trainers.distributed import check_device
from fastlangevin.trainers.loop import RunOptions, train
from fastlangevin.trainers.run_folder import RunFolder
from fastlangevin.trainers.settings import setting

GROUPS = {"train-prior": "learn a generator with a latent-space EBM prior by maximum likelihood (posterior and "
                         "prior Langevin chains)"}


@dataclasses.dataclass
class DrawOptions:
    """The options of ``sample`` and ``evaluate``."""

    n: int | None = setting(None, "samples (default: sample 2000, evaluate 5000)", low=2)
    seed: int | None = setting(None, "random seed of the draws (default: sample 0, evaluate 123)", low=0)
    n_steps: int | None = setting(None, "Langevin steps (default: the run's)", low=0)
    which: str = setting("best", "the best model (by the run's validation metric) or the last",
                         choices=("best", "last"))
    device: str = setting("cpu", "cpu, cuda or cuda:N")

    def __post_init__(self):
        check_device(self.device)


DRAW_DEFAULTS = {"sample": dict(n=2000, seed=0), "evaluate": dict(n=5000, seed=123)}


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
    for name, helptext in (("sample", "draw from a run's model(s); write the run's sample figures"),
                           ("evaluate", "a run's sample quality against the test split -> evaluation.json")):
        parser = subparsers.add_parser(name, help=helptext, description=helptext)
        parser.add_argument("run_dir")
        settings.add_options(parser, DrawOptions)
        parser.set_defaults(run=_sample if name == "sample" else _evaluate)


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


def _draw_options(args: argparse.Namespace, command: str) -> dict:
    """The checked options of ``sample`` / ``evaluate``, their defaults filled in."""
    options = settings.make_settings(DrawOptions, settings.given_values(args, DrawOptions), f"fastlangevin {command}")
    return {k: DRAW_DEFAULTS[command].get(k) if v is None and k in DRAW_DEFAULTS[command] else v
            for k, v in dataclasses.asdict(options).items()}


def _sample(args: argparse.Namespace) -> None:
    options = _draw_options(args, "sample")
    trainer = trainer_of_run(args.run_dir, "sample_run")
    RunFolder(args.run_dir).clean()
    path = trainer.sample_run(args.run_dir, **options)
    if path:
        print(f"wrote {path}")


def _evaluate(args: argparse.Namespace) -> None:
    options = _draw_options(args, "evaluate")
    trainer = trainer_of_run(args.run_dir, "evaluate_run")
    RunFolder(args.run_dir).clean()
    print(trainer.format_evaluation(trainer.evaluate_run(args.run_dir, **options)))


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
