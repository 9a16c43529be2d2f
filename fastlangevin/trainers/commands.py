"""The trainer subcommands of ``fastlangevin``: ``train-base``, ``tilt``, ``sample``, ``evaluate``, ``train-prior``.

``add_commands(subparsers)`` registers them on the CLI's subparsers; ``run(args)`` runs the parsed command and
returns True when it was one of these (False otherwise, so the CLI can go on dispatching its own).
"""

from __future__ import annotations

import argparse
import contextlib
import inspect
import io
import json
import os

COMMANDS = ("train-base", "tilt", "sample", "evaluate", "train-prior", "train-pixel-ebm")
# train-prior MODEL -> its trainer in fastlangevin.trainers, called as fn(model, data, out, **the flags given);
# flags default to None, so each trainer fills in its own model's defaults.
PRIOR_MODELS = {
    "lebm": "train_lebm", "lebm-vi": "train_lebm", "joint-mle": "train_lebm",
    "gaussian": "train_hierarchical", "joint": "train_hierarchical",  # hierarchical VAE (+ joint EBM)
}


def add_commands(subparsers) -> None:
    base = subparsers.add_parser("train-base", help="train a backbone (vae, glow, glf) and write a run directory")
    base.add_argument("model", choices=("vae", "glow", "glf"))
    base.add_argument("--data", required=True, help="25gaussians, swissroll, digits, mnist, fashion-mnist, cifar10")
    base.add_argument("--data-dir", default=None, help="folder of the mnist / fashion-mnist / cifar10 files")
    base.add_argument("--out", required=True, help="the run directory (created)")
    length = base.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="training batches (default 2000)")
    length.add_argument("--epochs", type=float, default=None, help="passes over the training set")
    base.add_argument("--batch-size", type=int, default=256)
    base.add_argument("--lr", type=float, default=1e-3)
    base.add_argument("--seed", type=int, default=0)
    base.add_argument("--n-train", type=int, default=None, help="training set size (toys: default 10000)")
    base.add_argument("--latent-dim", type=int, default=None, help="vae/glf latent size (default by data)")
    base.add_argument("--width", type=int, default=None, help="network width (default by model and data)")
    base.add_argument("--checkpoint-every", type=int, default=500)
    base.add_argument("--resume", action="store_true", help="continue from RUN_DIR/base.safetensors")
    base.add_argument("--device", default="cpu")

    tilt = subparsers.add_parser("tilt", help="train the latent EBM E(G(z)) on a run's frozen backbone")
    tilt.add_argument("run_dir")
    tilt.add_argument("--steps", type=int, default=500)
    tilt.add_argument("--batch-size", type=int, default=256)
    tilt.add_argument("--lr", type=float, default=1e-4)
    tilt.add_argument("--beta1", type=float, default=0.5, help="Adam beta1 (beta2 0.999)")
    tilt.add_argument("--n-steps", type=int, default=60, help="Langevin steps per training iteration")
    tilt.add_argument("--step-size", type=float, default=0.01, help="Langevin step size epsilon")
    tilt.add_argument("--sample-steps", type=int, default=100, help="Langevin steps to sample / evaluate")
    tilt.add_argument("--reg", type=float, default=0.1, help="energy regulariser reg*(mean E+^2 + mean E-^2)")
    tilt.add_argument("--positives", choices=("data", "reconstruction"), default="data",
                      help="real x (the paper) or G(encode(x))")
    tilt.add_argument("--energy-width", type=int, default=None)
    tilt.add_argument("--energy-depth", type=int, default=None)
    tilt.add_argument("--eval-every", type=int, default=50, help="steps between early-stopping evaluations")
    tilt.add_argument("--n-eval", type=int, default=2000, help="samples per early-stopping evaluation")
    tilt.add_argument("--stop-on", choices=("mmd2", "energy_distance", "high_quality", "frechet_distance"),
                      default="mmd2", help="validation metric that picks ebm_best (high_quality: toy data with "
                                           "modes only; frechet_distance: images only)")
    tilt.add_argument("--patience", type=int, default=None,
                      help="stop after this many evaluations without improvement (default: run all steps)")
    tilt.add_argument("--seed", type=int, default=0)
    tilt.add_argument("--sampler", choices=("library", "eager"), default="library",
                      help="training chains: fl.langevin or the hand-written loop (chain-cost comparisons)")
    tilt.add_argument("--clip-grad", type=float, default=None,
                      help="bound each chain sample's gradient norm |grad_z E(G(z))| (default: no clipping)")
    tilt.add_argument("--resume", action="store_true", help="continue from RUN_DIR/ebm.safetensors")
    tilt.add_argument("--device", default="cpu")

    for name, helptext, n in (("sample", "draw from base and tilted model; write the before/after PNG", 2000),
                              ("evaluate", "base vs tilted metrics against the test split -> evaluation.json",
                               5000)):
        p = subparsers.add_parser(name, help=helptext)
        p.add_argument("run_dir")
        p.add_argument("--n", type=int, default=n, help=f"samples (default {n})")
        p.add_argument("--seed", type=int, default=0 if name == "sample" else 123)
        p.add_argument("--n-steps", type=int, default=None, help="Langevin steps (default: the run's 100)")
        p.add_argument("--which", choices=("best", "last"), default="best", help="ebm_best or the last EBM")
        p.add_argument("--device", default="cpu")

    _add_train_prior(subparsers)
    _add_train_pixel_ebm(subparsers)


def _add_train_pixel_ebm(subparsers) -> None:
    """``train-pixel-ebm``: flags default to None, so ``train_pixel_ebm``'s own defaults apply."""
    p = subparsers.add_parser("train-pixel-ebm", help="the pixel-space EBM baseline (IGEBM: Langevin in pixel space, "
                                                      "persistent chains in a replay buffer)")
    p.add_argument("--data", required=True, help="digits, mnist, fashion-mnist, cifar10")
    p.add_argument("--data-dir", default=None, help="folder of the mnist / fashion-mnist / cifar10 files")
    p.add_argument("--out", required=True, help="the run directory (created)")
    for flag, kind, helptext in (
            ("--steps", int, "training steps (2000)"), ("--batch-size", int, "chains and data per step (64)"),
            ("--lr", float, "Adam learning rate (1e-4)"), ("--beta1", float, "Adam beta1 (0.0; beta2 0.999)"),
            ("--n-steps", int, "Langevin steps per training step (20)"),
            ("--step-size", float, "Langevin step size epsilon; noise sqrt(epsilon) (1e-4)"),
            ("--temperature", float, "chains sample exp(-E/T) (1e-4)"),
            ("--sample-steps", int, "Langevin steps of the evaluation chains from noise (default --n-steps)"),
            ("--reg", float, "energy regulariser reg*(mean E+^2 + mean E-^2) (1.0)"),
            ("--buffer-size", int, "replay buffer entries (10000)"),
            ("--reinit", float, "probability of restarting a chain from uniform noise (0.05)"),
            ("--energy-width", int, "ConvEnergy channels (32)"), ("--energy-depth", int, "blocks per stage (2)"),
            ("--eval-every", int, "steps between early-stopping evaluations (100)"),
            ("--n-eval", int, "samples per evaluation (1000)"),
            ("--patience", int, "stop after this many evaluations without improvement (default: run all steps)"),
            ("--seed", int, "(0)"), ("--n-train", int, "keep the first n training images")):
        p.add_argument(flag, type=kind, default=None, help=helptext)
    p.add_argument("--stop-on", choices=("mmd2", "energy_distance", "frechet_distance"), default=None,
                   help="validation metric that picks the best model (mmd2)")
    p.add_argument("--stop-from", choices=("chains", "buffer"), default=None,
                   help="early stopping on fresh chains from noise (default) or on the replay buffer")
    p.add_argument("--sampler", choices=("library", "eager"), default=None,
                   help="training chains: fl.langevin or the hand-written loop (chain-cost comparisons)")
    p.add_argument("--resume", action="store_true", default=None, help="continue from RUN_DIR/pixel_ebm.safetensors")
    p.add_argument("--device", default=None)


def _run_pixel_ebm(args: argparse.Namespace) -> dict:
    from fastlangevin import trainers
    options = {k: v for k, v in vars(args).items() if k not in ("command", "data", "out", "beta1") and v is not None}
    if args.beta1 is not None:
        options["betas"] = (args.beta1, 0.999)
    return trainers.train_pixel_ebm(args.data, args.out, **options)


def _add_train_prior(subparsers) -> None:
    """``train-prior MODEL``: a generator learned with a latent EBM prior. Defaults (None here) are the trainer's."""
    p = subparsers.add_parser("train-prior", help="learn a generator with a latent-space EBM prior by maximum "
                                                  "likelihood (posterior and prior Langevin chains)")
    p.add_argument("model", choices=tuple(PRIOR_MODELS))
    p.add_argument("--data", required=True, help="digits, mnist, fashion-mnist, cifar10")
    p.add_argument("--data-dir", default=None, help="folder of the mnist / fashion-mnist / cifar10 files")
    p.add_argument("--out", required=True, help="the run directory (created)")
    p.add_argument("--classes", type=int, nargs="+", default=None, help="keep only these labels (e.g. 0 1)")
    p.add_argument("--n-train", type=int, default=None, help="keep only the first N training images")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, default=None, help="training batches (default 2000)")
    length.add_argument("--epochs", type=float, default=None, help="passes over the training set")
    p.add_argument("--batch-size", type=int, default=None, help="default 100 (the papers')")
    p.add_argument("--lr-e", type=float, default=None, help="Adam lr of the energies")
    p.add_argument("--lr-g", type=float, default=None, help="Adam lr of the generator (and encoder)")
    p.add_argument("--betas", type=float, nargs=2, default=None, metavar=("BETA1", "BETA2"),
                   help="Adam betas (default: lebm 0.5 0.999, joint-mle 0.9 0.999)")
    p.add_argument("--latent-dim", type=int, default=None, help="z size (z1 for joint-mle)")
    p.add_argument("--latent-dim2", type=int, default=None, help="z2 size (joint-mle)")
    p.add_argument("--energy-width", type=int, default=None, help="hidden width of the energy MLP(s)")
    p.add_argument("--generator-width", type=int, default=None, help="hidden width of the generator MLPs")
    p.add_argument("--llhd-sigma", type=float, default=None, help="std of the Gaussian p(x|z) on [0, 1] pixels")
    p.add_argument("--prior-steps", type=int, default=None, help="prior chain length (default 60)")
    p.add_argument("--prior-step-size", type=float, default=None, help="prior chain step h = s^2 (default 0.16)")
    p.add_argument("--posterior-steps", type=int, default=None, help="posterior chain (default 20; joint-mle 40)")
    p.add_argument("--posterior-step-size", type=float, default=None, help="posterior chain h (default 0.01)")
    p.add_argument("--sampler", choices=("library", "eager"), default=None,
                   help="chains by fl.langevin (default) or the hand-written loop, for cost comparisons")
    p.add_argument("--eval-every", type=int, default=None, help="steps between sample-quality evaluations")
    p.add_argument("--n-eval", type=int, default=None, help="samples per evaluation")
    p.add_argument("--checkpoint-every", type=int, default=None)
    p.add_argument("--latent-plot", action="store_true", default=None,
                   help="write latents.png: prior and posterior latents before and after their chains")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--resume", action="store_true", default=None, help="continue from RUN_DIR's checkpoint")
    p.add_argument("--device", default=None)
    h = p.add_argument_group("gaussian / joint (hierarchical VAE; docs: fastlangevin/trainers/hierarchical.py)")
    h.add_argument("--init-from", default=None, help="joint: start from this gaussian run's VAE")
    h.add_argument("--scheme", choices=("two-stage", "joint"), default=None, help="joint: frozen VAE (default) "
                   "or the ELBO with the EBM prior training everything")
    h.add_argument("--variant", choices=("paper", "code"), default=None,
                   help="epsilon-space target: exp f(T(eps)) N(eps) (default) or the reference code's p_beta(T(eps))")
    h.add_argument("--vae-steps", type=int, default=None, help="joint without --init-from: VAE steps (1500)")
    h.add_argument("--kl-warmup", type=float, default=None, help="share of the VAE steps warming up the KL (0.3)")
    h.add_argument("--channels", type=int, default=None, help="cell width (16)")
    h.add_argument("--param-factor", type=float, default=None, help="width for this multiple of the parameters")
    h.add_argument("--latent-channels", type=int, nargs="+", default=None, help="channels per group (8 4 2)")
    h.add_argument("--energy-layers", type=int, default=None, help="hidden layers of each f_i (2)")
    h.add_argument("--sample-steps", type=int, default=None, help="chain steps for evaluation and figures")


def _run_train_prior(args: argparse.Namespace) -> dict:
    from fastlangevin import trainers
    train = getattr(trainers, PRIOR_MODELS[args.model])
    skip = {"command", "model", "data", "out"}
    options = {k: v for k, v in vars(args).items() if k not in skip and v is not None}
    accepted = inspect.signature(train).parameters
    for name in options:
        if name not in accepted:
            raise SystemExit(f"train-prior {args.model}: --{name.replace('_', '-')} does not apply to this model")
    return train(args.model, args.data, args.out, **options)


def run(args: argparse.Namespace) -> bool:
    """Run ``args.command`` if it is a trainer command (under torchrun only rank 0 prints); False otherwise."""
    quiet = os.environ.get("RANK", "0") != "0"
    with contextlib.redirect_stdout(io.StringIO()) if quiet else contextlib.nullcontext():
        return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> bool:
    if args.command not in COMMANDS:
        return False
    from fastlangevin import trainers
    if args.command == "train-base":
        steps = args.steps if args.steps is not None or args.epochs is not None else 2000
        metrics = trainers.train_base(args.model, args.data, args.out, steps=steps, epochs=args.epochs,
                                      batch_size=args.batch_size, lr=args.lr, seed=args.seed, data_dir=args.data_dir,
                                      n_train=args.n_train, latent_dim=args.latent_dim, width=args.width,
                                      checkpoint_every=args.checkpoint_every, resume=args.resume, device=args.device)
        print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    elif args.command == "tilt":
        metrics = trainers.train_tilt(args.run_dir, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                                      betas=(args.beta1, 0.999), n_steps=args.n_steps, step_size=args.step_size,
                                      sample_steps=args.sample_steps, reg=args.reg, positives=args.positives,
                                      energy_width=args.energy_width, energy_depth=args.energy_depth,
                                      eval_every=args.eval_every, n_eval=args.n_eval, patience=args.patience,
                                      stop_on=args.stop_on, seed=args.seed, sampler=args.sampler,
                                      clip_grad=args.clip_grad,
                                      resume=args.resume, device=args.device)
        best = metrics["best"]
        print(f"best validation {best['metric']} {best['value']:.5g} at step {best['step']}")
    elif args.command == "train-prior":
        metrics = _run_train_prior(args)
        print(json.dumps({k: v for k, v in metrics.items() if k != "history"}, indent=2))
    elif args.command == "train-pixel-ebm":
        best = _run_pixel_ebm(args)["best"]
        print(f"best validation {best['metric']} {best['value']:.5g} at step {best['step']}")
    elif args.command == "sample":
        sample = trainers.sample_pixel_run if trainers.is_pixel_run(args.run_dir) else trainers.sample_run
        path = sample(args.run_dir, n=args.n, seed=args.seed, n_steps=args.n_steps, which=args.which,
                      device=args.device)
        if path:
            print(f"wrote {path}")
    elif trainers.is_pixel_run(args.run_dir):
        result = trainers.evaluate_pixel_run(args.run_dir, n=args.n, seed=args.seed, n_steps=args.n_steps,
                                             which=args.which, device=args.device)
        print(trainers.format_pixel_evaluation(result))
    else:
        result = trainers.evaluate_run(args.run_dir, n=args.n, seed=args.seed, n_steps=args.n_steps,
                                       which=args.which, device=args.device)
        print(trainers.format_evaluation(result))
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
