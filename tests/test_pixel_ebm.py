"""The pixel-space EBM baseline: replay-buffer semantics, checkpoint + resume of the buffer, the command on digits at a
tiny size, sample / evaluate on its run directory, bad input."""

import json
import math

import pytest
import torch

from fastlangevin.metrics import frechet
from fastlangevin.metrics.classifier import ClassifierConfig
from fastlangevin.trainers import commands, load_checkpoint
from fastlangevin.trainers.pixel_ebm import PixelEBM, ReplayBuffer, load_pixel_ebm, train_pixel_ebm
from fastlangevin.trainers.monitor import EarlyStopping

TINY = dict(steps=4, batch_size=16, n_steps=3, buffer_size=200, energy_width=4, energy_depth=1, eval_every=2,
            n_eval=40, progress=False)
TINY_FLAGS = ["--steps", "4", "--batch-size", "16", "--n-steps", "3", "--buffer-size", "200", "--energy-width", "4",
              "--energy-depth", "1", "--eval-every", "2", "--n-eval", "40"]


@pytest.fixture(scope="module", autouse=True)
def small_frechet_classifier():
    """The Fréchet features from a tiny, briefly trained classifier: these tests check the plumbing, not the metric
    (tests/test_metrics.py does), and the default one takes a minute to train on a busy machine."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(frechet, "ClassifierConfig", lambda: ClassifierConfig(width=4, feature_dim=8, min_steps=20,
                                                                            epochs=0.1))
        yield


def test_draw_takes_distinct_entries_and_copies_them():
    buffer = ReplayBuffer(50, (1, 2, 2), reinit=0.0, generator=torch.Generator().manual_seed(0))
    assert len(buffer) == 50 and buffer.samples.shape == (50, 1, 2, 2)
    assert 0 <= buffer.samples.min() and buffer.samples.max() <= 1
    x, index = buffer.draw(50, torch.Generator().manual_seed(1))
    assert sorted(index.tolist()) == list(range(50))  # the whole buffer, each entry once
    torch.testing.assert_close(x, buffer.samples[index], rtol=0, atol=0)
    x.fill_(7.0)
    assert buffer.samples.max() <= 1  # a copy: the chains do not write into the buffer until update


def test_draw_restarts_the_reinit_fraction_from_noise():
    n, p = 20_000, 0.05
    buffer = ReplayBuffer(n, (3,), reinit=p)
    buffer.samples.fill_(2.0)  # outside [0, 1]: a restarted chain is recognisable
    x, _ = buffer.draw(n, torch.Generator().manual_seed(2))
    fresh = (x <= 1).all(1)
    assert torch.equal(fresh, (x <= 1).any(1))  # whole chains restart, not single pixels
    share = fresh.double().mean().item()
    assert abs(share - p) < 5 * math.sqrt(p * (1 - p) / n)  # binomial standard errors
    assert 0 <= x[fresh].min() and x[fresh].max() <= 1


def test_update_writes_back_where_the_chains_came_from():
    buffer = ReplayBuffer(10, (2,), reinit=0.0)
    before = buffer.samples.clone()
    x, index = buffer.draw(4, torch.Generator().manual_seed(3))
    buffer.update(index, torch.full((4, 2), 0.5))
    assert torch.equal(buffer.samples[index], torch.full((4, 2), 0.5))
    untouched = torch.ones(10, dtype=torch.bool)
    untouched[index] = False
    assert torch.equal(buffer.samples[untouched], before[untouched])


def test_buffer_errors():
    with pytest.raises(ValueError, match="buffer_size must be an int >= 1, got 0"):
        ReplayBuffer(0, (1,))
    with pytest.raises(ValueError, match=r"reinit must be a probability in \[0, 1\], got 1.5"):
        ReplayBuffer(4, (1,), reinit=1.5)
    with pytest.raises(ValueError, match="batch_size must be <= buffer_size 4"):
        ReplayBuffer(4, (1,)).draw(5, torch.Generator())
    with pytest.raises(ValueError, match=r"for images \(C, H, W\), got samples of shape \(2,\)"):
        PixelEBM((2,), None, None, 10, 0.05, 0)


@pytest.fixture(scope="module")
def pixel_run(tmp_path_factory):
    """`train-pixel-ebm --data digits` for 4 steps through the command."""
    pytest.importorskip("matplotlib")
    run = tmp_path_factory.mktemp("pixel")
    commands.main(["train-pixel-ebm", "--data", "digits", "--out", str(run), *TINY_FLAGS])
    return run


def test_command_writes_the_run_directory(pixel_run):
    for name in ("config.json", "pixel_ebm.safetensors", "pixel_ebm_best.safetensors", "metrics.json",
                 "pixel_ebm_samples.png"):
        assert (pixel_run / name).exists(), name
    settings = json.loads((pixel_run / "config.json").read_text())["pixel_ebm"]
    assert settings["buffer_size"] == 200 and settings["reinit"] == 0.05 and settings["energy"] == "ConvEnergy"
    metrics = json.loads((pixel_run / "metrics.json").read_text())["pixel_ebm_training"]
    assert [h["step"] for h in metrics["history"]] == [2, 4]
    best = min(metrics["history"], key=lambda h: h["mmd2"])
    assert metrics["best"] == {"step": best["step"], "metric": "mmd2", "value": best["mmd2"]}
    assert all("frechet_distance" in h and "mmd2" in h["buffer"] for h in metrics["history"])
    assert 0 < metrics["chain_seconds"] < metrics["seconds"]
    model, _, meta = load_pixel_ebm(pixel_run, "last")
    assert meta["step"] == 4
    assert 0 <= model.replay.samples.min() and model.replay.samples.max() <= 1
    fresh = PixelEBM((1, 8, 8), 4, 1, 200, 0.05, settings["seed"])
    moved = (model.replay.samples != fresh.replay.samples).flatten(1).any(1)
    assert 0 < moved.sum() <= 4 * 16  # the chains of 4 steps of 16 went back into the buffer, nothing else


def test_resume_continues_the_buffer(pixel_run, tmp_path):
    """4 steps, then resume to 6, gives the same energy and buffer as 6 steps in one go (early stopping on the
    buffer's quality)."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    options = dict(TINY, eval_every=4, reinit=0.25, stop_from="buffer")
    train_pixel_ebm("digits", whole, **{**options, "steps": 6})
    train_pixel_ebm("digits", split, **options)
    train_pixel_ebm("digits", split, **{**options, "steps": 6}, resume=True)
    a, b = (load_checkpoint(path / "pixel_ebm.safetensors") for path in (whole, split))
    assert a["step"] == b["step"] == 6
    ma, _, _ = load_pixel_ebm(whole, "last")
    mb, _, _ = load_pixel_ebm(split, "last")
    for (name, x), y in zip(ma.state_dict().items(), mb.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)
    metrics = json.loads((split / "metrics.json").read_text())["pixel_ebm_training"]
    assert [h["step"] for h in metrics["history"]] == [4, 6]
    best = min(metrics["history"], key=lambda h: h["buffer"]["mmd2"])
    assert metrics["best"] == {"step": best["step"], "metric": "mmd2", "value": best["buffer"]["mmd2"]}


def test_sample_and_evaluate_a_pixel_run(pixel_run, capsys):
    commands.main(["sample", str(pixel_run), "--n", "16", "--n-steps", "2"])
    assert (pixel_run / "samples.png").read_bytes()[:4] == b"\x89PNG"
    commands.main(["evaluate", str(pixel_run), "--n", "40", "--n-steps", "2"])
    out = capsys.readouterr().out
    assert "chains" in out and "buffer" in out and "frechet_distance" in out
    result = json.loads((pixel_run / "evaluation.json").read_text())
    assert result["chains"]["n_samples"] == result["buffer"]["n_samples"] == 40
    assert result["chains"]["mmd_bandwidths"] == result["buffer"]["mmd_bandwidths"]


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="the pixel-space EBM is for images"):
        train_pixel_ebm("25gaussians", tmp_path, **TINY)
    with pytest.raises(ValueError, match="batch_size must be <= buffer_size 200"):
        train_pixel_ebm("digits", tmp_path, **{**TINY, "batch_size": 256})
    with pytest.raises(ValueError, match="temperature must be a finite float > 0, got 0"):
        train_pixel_ebm("digits", tmp_path, **TINY, temperature=0)
    with pytest.raises(ValueError, match="reg must be a finite float >= 0, got -1"):
        train_pixel_ebm("digits", tmp_path, **TINY, reg=-1)
    with pytest.raises(ValueError, match="n_steps must be an int >= 1, got 0"):
        train_pixel_ebm("digits", tmp_path, **{**TINY, "n_steps": 0})
    with pytest.raises(ValueError, match="sampler must be one of"):
        train_pixel_ebm("digits", tmp_path, **TINY, sampler="jax")
    with pytest.raises(ValueError, match="stop_on must be one of"):
        train_pixel_ebm("digits", tmp_path, **TINY, stop_on="fid")
    with pytest.raises(ValueError, match=r"stop_from must be one of \('chains', 'buffer'\), got 'data'"):
        train_pixel_ebm("digits", tmp_path, **TINY, stop_from="data")
    with pytest.raises(FileNotFoundError, match="--resume: no pixel_ebm.safetensors"):
        train_pixel_ebm("digits", tmp_path / "empty", **TINY, resume=True)


def test_early_stopping_keeps_the_best_and_stops_after_patience():
    messages = []
    stopping = EarlyStopping("mmd2", patience=2, eval_every=10)
    assert stopping.update(10, {"mmd2": 0.5}) and not stopping.stop(10, messages.append)
    assert stopping.update(20, {"mmd2": 0.3})
    assert not stopping.update(30, {"mmd2": 0.4}) and not stopping.stop(30, messages.append)
    assert not stopping.update(40, {"mmd2": 0.3}) and stopping.stop(40, messages.append)  # ties are not better
    assert stopping.best == {"step": 20, "metric": "mmd2", "value": 0.3}
    assert messages == ["early stop at step 40: no better validation mmd2 in 2 evaluations"]
    higher = EarlyStopping("high_quality", patience=None, eval_every=10)
    assert higher.update(10, {"high_quality": 0.2}) and higher.update(20, {"high_quality": 0.9})
    assert not higher.stop(1000, messages.append)  # no patience: never stops
