"""Run folders survive SIGKILL. Each trainer command runs on tiny settings and is killed with SIGKILL at random
moments (``KILLS`` times, each time resuming what the last one left): after every kill each checkpoint in the folder
loads with the settings it was written with; the next command removes the killed one's temporary files; ``--resume``
finally runs to the end and gives the checkpoint an uninterrupted run gives, bit for bit; ``sample`` and ``evaluate``
work on the result where the trainer offers them.

Commands run in processes forked from one server that has imported torch and the trainers already
(``multiprocessing``'s forkserver), so a kill costs no interpreter start. ``FASTLANGEVIN_CRASH_KILLS`` sets the
number of kills per command (default 8; the issue's 20 is ``FASTLANGEVIN_CRASH_KILLS=20``, about 2.5× longer).
"""

import glob
import multiprocessing
import os
import random
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

KILLS = int(os.environ.get("FASTLANGEVIN_CRASH_KILLS", "8"))
TOY = ["--data", "25gaussians", "--n-train", "64"]
DIGITS = ["--data", "digits", "--n-train", "96", "--batch-size", "8"]
# command: (arguments after the run folder option, whether it needs a backbone run first)
COMMANDS = {
    "train-base": (["train-base", "vae", *TOY, "--width", "8", "--steps", "12", "--batch-size", "16",
                    "--n-eval", "40", "--checkpoint-every", "2"], False),
    "tilt": (["--steps", "8", "--batch-size", "8", "--n-steps", "3", "--sample-steps", "3", "--eval-every", "2",
              "--n-eval", "40", "--energy-width", "8", "--energy-depth", "1"], True),
    "train-pixel-ebm": (["train-pixel-ebm", *DIGITS, "--steps", "8", "--n-steps", "3", "--buffer-size", "40",
                         "--energy-width", "4", "--energy-depth", "1", "--eval-every", "4", "--n-eval", "20"], False),
    "train-prior lebm": (["train-prior", "lebm", *DIGITS, "--steps", "8", "--prior-steps", "3", "--posterior-steps",
                          "2", "--eval-every", "4", "--n-eval", "20", "--latent-dim", "2", "--energy-width", "8",
                          "--generator-width", "8", "--checkpoint-every", "2"], False),
    "train-prior gaussian": (["train-prior", "gaussian", *DIGITS, "--steps", "8", "--channels", "4",
                              "--latent-channels", "2", "1", "--checkpoint-every", "2"], False),
    "train-prior joint": (["train-prior", "joint", *DIGITS, "--vae-steps", "4", "--steps", "6", "--channels", "4",
                           "--latent-channels", "2", "1", "--prior-steps", "2", "--energy-width", "4",
                           "--checkpoint-every", "2"], False),
}


def run_command(argv: list[str], errors: str) -> None:
    """The child: the CLI with its output discarded but stderr kept in the file ``errors`` (the reason of a failure),
    and a tiny Fréchet classifier (the plumbing, not the metric)."""
    from fastlangevin.cli import main
    from fastlangevin.metrics import classifier, frechet
    frechet.ClassifierConfig = lambda: classifier.ClassifierConfig(width=4, feature_dim=8, min_steps=20, epochs=0.1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    os.dup2(os.open(errors, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644), 2)
    sys.exit(main(argv))


@pytest.fixture(scope="module")
def forkserver():
    pytest.importorskip("matplotlib")
    context = multiprocessing.get_context("forkserver")
    from fastlangevin.trainers import registry
    # What every command imports (torch.optim's first optimizer imports torch._dynamo: seconds), so that a child
    # starts in a fraction of a second and most kills land while it trains and writes.
    context.set_forkserver_preload(["torch", "torch._dynamo", "triton", "safetensors.torch", "sklearn.datasets",
                                    "matplotlib.pyplot", "fastlangevin.cli", "fastlangevin.data",
                                    *registry.TRAINER_MODULES, "tests.test_run_folder_crash"])
    os.environ["OMP_NUM_THREADS"] = "1"  # before the server starts: its children inherit it
    warm = context.Process(target=len, args=((),))  # starts the server (and its imports) outside any timing
    warm.start()
    warm.join()
    return context


def start(context, argv):
    process = context.Process(target=run_command, args=(argv, _errors(argv)))
    process.start()
    return process


def _errors(argv) -> str:
    """The stderr file of a command: beside its run folder (the argument that follows --out, or the positional)."""
    folder = argv[argv.index("--out") + 1] if "--out" in argv else next(a for a in argv[1:] if os.sep in a)
    return os.path.join(os.path.dirname(folder), f"stderr-{os.path.basename(folder)}.txt")


def finish(context, argv) -> float:
    begin = time.perf_counter()
    process = start(context, argv)
    process.join()
    if process.exitcode != 0:
        with open(_errors(argv)) as f:
            pytest.fail(f"{argv} exited with {process.exitcode}: {f.read()[-2000:]}")
    return time.perf_counter() - begin


def trainers_in(folder):
    """The registered trainers whose latest checkpoint is in ``folder`` (tilt and joint both name theirs
    ebm.safetensors: the settings it holds tell which)."""
    from fastlangevin.trainers import registry
    from fastlangevin.trainers.run_folder import RunFolder
    found = RunFolder(folder)
    return [t for t in registry.trainers().values()
            if found.has(t.checkpoint) and found.section(t.section, t.checkpoint) is not None]


def check_loadable(folder, where):
    """Every checkpoint of the folder loads into the model its own settings describe."""
    from fastlangevin.trainers.run_folder import RunFolder
    for trainer in trainers_in(folder):
        for which in ("last", "best"):
            try:
                trainer.load(RunFolder(folder), which)
            except Exception as error:  # noqa: BLE001 (the message says which kill left what)
                pytest.fail(f"{where}: {trainer.command} {which} checkpoint does not load: {error!r}")


def temporaries(folder):
    return glob.glob(os.path.join(folder, ".*.tmp"))


@pytest.mark.parametrize("command", list(COMMANDS))
def test_sigkill_at_random_moments(forkserver, command, tmp_path):
    args, needs_backbone = COMMANDS[command]
    reference, run = str(tmp_path / "reference"), str(tmp_path / "run")
    if needs_backbone:  # tilt: on a copy of one backbone run
        finish(forkserver, COMMANDS["train-base"][0] + ["--out", run])
        import shutil
        shutil.copytree(run, reference)
        argv = lambda folder: ["tilt", folder, *args]  # noqa: E731
    else:
        argv = lambda folder: [*args, "--out", folder]  # noqa: E731
    duration = finish(forkserver, argv(reference))
    from fastlangevin.trainers import registry
    own = {registry.trainers()[command].checkpoint, *(["vae.safetensors"] if command.endswith("joint") else [])}

    def resume():  # what the command has written so far: continue it
        return ["--resume"] if any(os.path.exists(os.path.join(run, name)) for name in own) else []
    rng = random.Random(sum(map(ord, command)))
    for kill in range(KILLS):
        process = start(forkserver, argv(run) + resume())
        process.join(timeout=rng.uniform(0.0, duration))
        if process.is_alive():
            process.kill()
        process.join()
        assert process.exitcode in (0, -9), f"kill {kill}: {command} exited with {process.exitcode}"
        check_loadable(run, f"after kill {kill}")
    finish(forkserver, argv(run) + resume())
    assert not temporaries(run), "a killed run's temporary file stayed"  # (removed when a command starts its run)
    check_loadable(run, "at the end")
    for trainer in trainers_in(reference):
        a, b = (load_file(os.path.join(folder, trainer.checkpoint)) for folder in (reference, run))
        assert a.keys() == b.keys()
        for key in a:
            if key.startswith("model."):
                assert torch.equal(a[key], b[key]), f"{trainer.command}: {key} differs from the uninterrupted run"
    from fastlangevin.trainers.commands import trainer_of_run
    for name, need in (("sample", "sample_run"), ("evaluate", "evaluate_run")):
        try:
            trainer_of_run(run, need)
        except FileNotFoundError:
            continue
        finish(forkserver, [name, run, "--n", "20", "--n-steps", "2"])  # (a child: the tiny Fréchet classifier)


def test_new_settings_in_a_finished_run_keep_it_loadable(forkserver, tmp_path):
    """A finished backbone and tilt; then, each killed at random moments, a new tilt with another energy width and a
    new backbone with another width (--overwrite: a new backbone deletes the tilt trained on the old one). The folder loads at
    every instant (the old checkpoints with their settings until the new run's first checkpoint replaces them), and
    a tilt in the folder is always one trained on the folder's backbone."""
    from fastlangevin.trainers.run_folder import RunFolder
    from fastlangevin.trainers.tilt import EBM_LAST, _load_tilted
    run = str(tmp_path / "run")
    base = COMMANDS["train-base"][0] + ["--out", run]
    tilt = ["tilt", run, *COMMANDS["tilt"][0]]
    durations = [finish(forkserver, argv) for argv in (base, tilt)]
    rng, widths = random.Random(7), set()
    for argv, duration in ((tilt + ["--energy-width", "12", "--overwrite"], durations[1]),
                           (base + ["--width", "12", "--overwrite"], durations[0])):
        for kill in range(max(3, KILLS // 2)):
            process = start(forkserver, argv)
            process.join(timeout=rng.uniform(0.0, duration))
            if process.is_alive():
                process.kill()
            process.join()
            check_loadable(run, f"{argv[0]}, after kill {kill}")
            if RunFolder(run).has(EBM_LAST):
                for which in ("best", "last"):
                    widths.add(_load_tilted(run, which, "cpu")[2]["tilt"]["energy_width"])
    assert widths <= {8, 12}
