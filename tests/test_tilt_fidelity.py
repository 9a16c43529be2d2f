"""The trainers against the exponential-tilting paper and its data (issue 17, item 2): the validation draw that picks
the best checkpoint is disjoint from the EBM's positives (tilt and pixel EBM), the tilt's budget defaults to the
paper's per backbone (200 GLOW/GLF, 1 000 VAE), GLOW's positives are dequantised as GLOW is trained, and the
``--data`` choices come from the DATASETS registry without importing it to build the command line."""

import json
import math
import subprocess
import sys

import pytest
import torch

from fastlangevin.cli import main

DIGITS_WHOLE = ["--data", "digits", "--batch-size", "8", "--steps", "1", "--width", "4", "--n-eval", "20",
                "--no-progress"]
DIGITS_BASE = [*DIGITS_WHOLE, "--n-train", "64"]
TINY_TILT = dict(batch_size=8, n_steps=2, sample_steps=2, n_eval=20, energy_width=4, energy_depth=1, progress=False)


@pytest.fixture(autouse=True)
def tiny_frechet_classifier(monkeypatch):
    """The image runs' Fréchet distance with a tiny classifier: the plumbing, not the metric, is under test."""
    from fastlangevin.metrics import classifier, frechet
    monkeypatch.setattr(frechet, "ClassifierConfig", lambda: classifier.ClassifierConfig(
        width=4, feature_dim=8, min_steps=20, epochs=0.1))


def base_run(tmp_path, model: str, *args: str):
    pytest.importorskip("matplotlib")
    run = tmp_path / model
    assert main(["train-base", model, *args, "--out", str(run)]) == 0
    return run


def rows(x: torch.Tensor) -> set:
    return {bytes(r.numpy().tobytes()) for r in x.flatten(1)}


@pytest.mark.parametrize("trainer", ["tilt", "train-pixel-ebm"])
def test_validation_is_disjoint_from_the_positives(trainer, tmp_path, monkeypatch):
    """Image data: no validation image is one the EBM trains on (it was the last n training images). The whole
    training split (no --n-train, which would keep only its first images)."""
    from fastlangevin.trainers import registry
    from fastlangevin.trainers.loop import train
    cls = registry.trainers()[trainer]
    seen = []

    def built(self, start):  # the run as its first step would see it; no need to train
        seen.append(self)
        raise KeyboardInterrupt
    monkeypatch.setattr(cls, "begin", built)
    with pytest.raises(KeyboardInterrupt):
        if trainer == "tilt":
            train(cls, base_run(tmp_path, "vae", *DIGITS_WHOLE), steps=1, eval_every=1, **TINY_TILT)
        else:
            train(cls, tmp_path / "pixel", data="digits", steps=1, batch_size=8, n_steps=2,
                  buffer_size=16, energy_width=4, energy_depth=1, eval_every=1, n_eval=100, progress=False)
    trainer_run, = seen
    positives, validation = trainer_run.x_train, trainer_run.val_set.tensors()[0]
    assert len(validation) == (20 if trainer == "tilt" else 100) and len(positives) == 1257
    assert not rows(validation) & rows(positives)


def fast_tilt(monkeypatch, steps: bool = True):
    """Tilt evaluations (and ``steps``: training steps) that cost nothing: they are not under test."""
    from fastlangevin.trainers.tilt import TiltTrainer
    if steps:
        monkeypatch.setattr(TiltTrainer, "step", lambda self, step: {"loss": 0.0, "energy_gap": 0.0})
    monkeypatch.setattr(TiltTrainer, "evaluate", lambda self, step: {"mmd2": 1.0, "energy_distance": 1.0})


@pytest.mark.parametrize("model, steps", [("vae", 1000), ("glow", 200), ("glf", 200)])
def test_the_tilt_budget_is_the_papers_per_backbone(model, steps, tmp_path, monkeypatch):
    from fastlangevin.trainers import train_tilt
    run = base_run(tmp_path, model, "--data", "25gaussians", "--n-train", "64", "--batch-size", "16", "--steps", "1",
                   "--width", "8", "--n-eval", "40", "--no-progress")
    fast_tilt(monkeypatch)
    metrics = train_tilt(run, eval_every=10_000, **TINY_TILT)
    assert metrics["steps"] == steps
    assert json.loads((run / "config.json").read_text())["tilt"]["steps"] == steps
    metrics = train_tilt(run, steps=3, eval_every=10_000, overwrite=True, **TINY_TILT)  # --steps still rules
    assert metrics["steps"] == 3


@pytest.fixture
def positives(monkeypatch):
    """A spy: ``positives.seen`` the x⁺ of every tilt step run since the last ``clear()``, ``positives.batches``
    the training batches they were made from."""
    import fastlangevin.trainers.tilt as tilt

    class Spy:
        seen, batches = [], []

        def clear(self):
            self.seen.clear()
            self.batches.clear()
    spy = Spy()
    real_step, real_batch = tilt.contrastive_step, tilt.TiltTrainer.global_batch
    monkeypatch.setattr(tilt, "contrastive_step", lambda ctx, f, opt, x_pos, *a: spy.seen.append(x_pos.clone()) or
                        real_step(ctx, f, opt, x_pos, *a))
    monkeypatch.setattr(tilt.TiltTrainer, "global_batch", lambda self, step: spy.batches.append(
        real_batch(self, step)) or spy.batches[-1])
    return spy


def test_glow_positives_are_dequantised_as_glow_is_trained(tmp_path, positives, monkeypatch):
    """GLOW on the digits (17 grey levels): x⁺ = x + (u − ½)/16 with u ~ U(0, 1), a fresh draw every step, the same
    on a resumed run; the VAE's positives are the data themselves."""
    import shutil
    from fastlangevin.trainers import train_tilt
    glow = base_run(tmp_path, "glow", *DIGITS_BASE)
    fast_tilt(monkeypatch, steps=False)
    resumed = tmp_path / "resumed"
    shutil.copytree(glow, resumed)
    train_tilt(glow, steps=2, eval_every=1, **TINY_TILT)
    for x_pos, x in zip(positives.seen, positives.batches):
        residual = (x_pos - x) * 16  # u − ½
        assert residual.abs().max() <= 0.5 + 1e-5 and not torch.equal(x_pos, x)
        n = residual.numel()  # U(−½, ½): mean 0, variance 1/12; tolerances in standard errors
        assert abs(residual.mean().item()) < 5 * math.sqrt(1 / 12 / n)
        assert abs(residual.var().item() - 1 / 12) < 5 * math.sqrt(1 / 180 / n)
    assert len(positives.seen) == 2 and not torch.equal(positives.seen[0] - positives.batches[0],
                                                        positives.seen[1] - positives.batches[1])
    uninterrupted = positives.seen[1]
    train_tilt(resumed, steps=1, eval_every=1, **TINY_TILT)
    positives.clear()
    train_tilt(resumed, steps=2, eval_every=1, resume=True, progress=False)
    assert len(positives.seen) == 1 and torch.equal(positives.seen[0], uninterrupted)
    vae = base_run(tmp_path, "vae", *DIGITS_BASE)
    positives.clear()
    train_tilt(vae, steps=2, eval_every=2, **TINY_TILT)
    assert len(positives.seen) == 2
    assert all(torch.equal(x_pos, x) for x_pos, x in zip(positives.seen, positives.batches))


def test_data_choices_come_from_the_registry_lazily(capsys):
    """--data takes exactly fastlangevin.data.DATASETS (named in --help and in the error), and building the command
    line imports neither the data sets nor scikit-learn."""
    from fastlangevin.data import DATASETS
    with pytest.raises(SystemExit):
        main(["train-base", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert all(name in help_text for name in DATASETS)
    assert main(["train-base", "vae", "--data", "mnist-typo", "--out", "unused"]) == 2
    assert "mnist5k" in capsys.readouterr().err
    loaded = subprocess.run([sys.executable, "-c", "import sys; from fastlangevin.cli import main; main(['info']); "
                             "print(sorted(m for m in sys.modules if m.startswith(('sklearn', 'fastlangevin.data'))))"],
                            capture_output=True, text=True, timeout=300)
    assert loaded.returncode == 0 and loaded.stdout.strip().splitlines()[-1] == "[]", loaded.stdout + loaded.stderr
