"""The reference trainers at tiny sizes: train-base, tilt, sample, evaluate (through the commands), atomic
checkpoints, --resume, and the two-sample metrics on known inputs."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from fastlangevin.metrics import energy_distance, mmd2
from fastlangevin.trainers import commands, evaluate_run, load_base, load_checkpoint, save_checkpoint, train_base, \
    train_tilt
from fastlangevin.trainers.energy_nets import ConvEnergy, make_energy

TINY_BASE = ["--data", "25gaussians", "--n-train", "512", "--batch-size", "64", "--width", "32"]
TINY_TILT = ["--steps", "4", "--batch-size", "32", "--n-steps", "5", "--sample-steps", "5", "--eval-every", "2",
             "--n-eval", "200", "--energy-width", "16", "--energy-depth", "2"]


@pytest.fixture(scope="module")
def tilted_run(tmp_path_factory):
    """A run directory after `train-base vae` (30 steps) and `tilt` (4 steps)."""
    pytest.importorskip("matplotlib")
    run = tmp_path_factory.mktemp("run")
    commands.main(["train-base", "vae", "--out", str(run), "--steps", "30", *TINY_BASE])
    commands.main(["tilt", str(run), *TINY_TILT])
    return run


def test_train_base_writes_the_run_directory(tilted_run):
    for name in ("config.json", "base.safetensors", "metrics.json", "base_samples.png"):
        assert (tilted_run / name).exists(), name
    config = json.loads((tilted_run / "config.json").read_text())
    assert config["base"]["model"] == "vae" and config["base"]["model_config"]["latent_dim"] == 2
    metrics = json.loads((tilted_run / "metrics.json").read_text())["base_training"]
    assert metrics["steps"] == 30 and metrics["sample_quality"]["n_modes"] == 25
    assert (tilted_run / "base_samples.png").read_bytes()[:4] == b"\x89PNG"


def test_tilt_keeps_the_best_checkpoint(tilted_run):
    metrics = json.loads((tilted_run / "metrics.json").read_text())["tilt_training"]
    assert [h["step"] for h in metrics["history"]] == [2, 4]
    best = min(metrics["history"], key=lambda h: h["mmd2"])
    assert metrics["best"] == {"step": best["step"], "metric": "mmd2", "value": best["mmd2"]}
    assert load_checkpoint(tilted_run / "ebm_best.safetensors")["step"] == best["step"]
    assert load_checkpoint(tilted_run / "ebm.safetensors")["step"] == 4
    assert 0 <= metrics["chain_seconds"] <= metrics["seconds"]


def test_sample_and_evaluate(tilted_run, capsys):
    commands.main(["sample", str(tilted_run), "--n", "100", "--n-steps", "5"])
    assert (tilted_run / "samples_before_after.png").read_bytes()[:4] == b"\x89PNG"
    assert (tilted_run / "langevin_transition.png").read_bytes()[:4] == b"\x89PNG"
    commands.main(["evaluate", str(tilted_run), "--n", "200", "--n-steps", "5"])
    out = capsys.readouterr().out
    assert "base" in out and "tilted" in out and "high_quality" in out
    result = json.loads((tilted_run / "evaluation.json").read_text())
    for name in ("base", "tilted"):
        assert result[name]["n_samples"] == 200 and result[name]["n_modes"] == 25
        assert 0 <= result[name]["high_quality"] <= 1
    assert result["base"]["mmd_bandwidths"] == result["tilted"]["mmd_bandwidths"]  # the same kernel for both


def test_checkpoint_round_trip_is_atomic(tmp_path):
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.randn(8, 3)).pow(2).sum().backward()
    optimizer.step()
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, net, optimizer, step=7, extra={"note": "x"})
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors"]  # no temporary file left behind
    net2 = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    optimizer2 = torch.optim.Adam(net2.parameters(), lr=1e-3)
    meta = load_checkpoint(path, net2, optimizer2)
    assert meta["step"] == 7 and meta["extra"] == {"note": "x"}
    for a, b in zip(net.state_dict().values(), net2.state_dict().values()):
        assert torch.equal(a, b)
    s1, s2 = optimizer.state_dict(), optimizer2.state_dict()
    assert s1["param_groups"][0]["lr"] == s2["param_groups"][0]["lr"]
    for k in s1["state"]:
        for name, v in s1["state"][k].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(s2["state"][k][name]))


def test_interrupted_write_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    net = torch.nn.Linear(2, 2)
    path = tmp_path / "ckpt.safetensors"
    save_checkpoint(path, net, step=1)

    def fail(*args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, net, step=2)
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["ckpt.safetensors"]


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        load_checkpoint(tmp_path / "missing.safetensors")
    save_checkpoint(tmp_path / "c.safetensors", torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="no optimizer state"):
        load_checkpoint(tmp_path / "c.safetensors", torch.nn.Linear(2, 2),
                        torch.optim.Adam(torch.nn.Linear(2, 2).parameters()))


def test_resume_continues_from_the_saved_step(tmp_path):
    """10 steps, then --resume to 20, gives the same weights as 20 steps in one go."""
    pytest.importorskip("matplotlib")
    kwargs = dict(batch_size=32, lr=1e-3, seed=3, n_train=256, width=16, checkpoint_every=10, n_eval=100,
                  progress=False)
    train_base("vae", "25gaussians", tmp_path / "whole", steps=20, **kwargs)
    train_base("vae", "25gaussians", tmp_path / "split", steps=10, **kwargs)
    assert load_checkpoint(tmp_path / "split" / "base.safetensors")["step"] == 10
    train_base("vae", "25gaussians", tmp_path / "split", steps=20, resume=True, **kwargs)
    assert load_checkpoint(tmp_path / "split" / "base.safetensors")["step"] == 20
    a = load_file(tmp_path / "whole" / "base.safetensors")
    b = load_file(tmp_path / "split" / "base.safetensors")
    for key in a:
        if key.startswith("model."):
            torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_resume_without_checkpoint_says_so(tmp_path):
    with pytest.raises(FileNotFoundError, match="--resume"):
        train_base("vae", "25gaussians", tmp_path, steps=5, resume=True, progress=False)


def test_tilt_resume_continues(tilted_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(tilted_run, run)
    metrics = train_tilt(run, steps=6, resume=True, progress=False)
    assert load_checkpoint(run / "ebm.safetensors")["step"] == 6
    assert [h["step"] for h in metrics["history"]] == [2, 4, 6]


def test_mmd_and_energy_distance_on_known_inputs():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 2, generator=g)
    y = torch.randn(400, 2, generator=g)
    bandwidths = [0.25, 0.5, 1.0]
    assert mmd2(x, x, bandwidths, unbiased=False) == pytest.approx(0.0, abs=1e-12)
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)
    same = mmd2(x, y, bandwidths)  # two draws of one distribution: ≈ 0 (unbiased)
    shifted = mmd2(x, y + 1.0, bandwidths)
    assert shifted > 0.2 and abs(same) < 0.05 * shifted
    assert mmd2(x, y + 0.5, bandwidths) < shifted  # grows with the shift
    assert energy_distance(x, y + 1.0) > 10 * abs(energy_distance(x, y))
    with pytest.raises(ValueError, match="bandwidths"):
        mmd2(x, y, [])
    with pytest.raises(ValueError, match="features"):
        mmd2(x, torch.randn(4, 3), bandwidths)


def test_energies_return_one_value_per_sample():
    assert make_energy((2,), 8, 2)(torch.randn(5, 2)).shape == (5,)
    conv = make_energy((1, 8, 8), 4, 1)
    assert isinstance(conv, ConvEnergy) and conv(torch.rand(3, 1, 8, 8)).shape == (3,)
    with pytest.raises(ValueError, match="data_shape"):
        make_energy((2, 2))


@pytest.mark.parametrize("model", ["vae", "glow", "glf"])
def test_train_base_each_backbone(tmp_path, model):
    pytest.importorskip("matplotlib")
    metrics = train_base(model, "25gaussians", tmp_path, steps=3, batch_size=16, n_train=64, width=8, n_eval=50,
                         progress=False)
    assert metrics["steps"] == 3 and metrics["sample_quality"]["n_samples"] == 50
    base, config = load_base(tmp_path)
    assert config["base"]["model"] == model and not base.training
    assert not any(p.requires_grad for p in base.parameters())  # frozen for the chains


def test_image_run_uses_the_conv_energy(tmp_path, capsys):
    """digits (8×8): a conv VAE, the ConvEnergy on G(z), image grids, validation from the training split."""
    pytest.importorskip("matplotlib")
    commands.main(["train-base", "vae", "--data", "digits", "--out", str(tmp_path), "--steps", "3",
                   "--batch-size", "16", "--width", "8"])
    commands.main(["tilt", str(tmp_path), "--steps", "2", "--batch-size", "8", "--n-steps", "2", "--sample-steps", "2",
                   "--eval-every", "2", "--n-eval", "40", "--energy-width", "4", "--energy-depth", "1"])
    assert json.loads((tmp_path / "config.json").read_text())["tilt"]["energy"] == "ConvEnergy"
    commands.main(["evaluate", str(tmp_path), "--n", "40", "--n-steps", "2"])
    result = json.loads((tmp_path / "evaluation.json").read_text())
    assert "high_quality" not in result["base"] and result["tilted"]["n_samples"] == 40
    commands.main(["sample", str(tmp_path), "--n", "16", "--n-steps", "4"])
    assert (tmp_path / "samples_before_after.png").exists() and (tmp_path / "langevin_transition.png").exists()


def test_tilt_samples_with_the_library_sampler(tilted_run, tmp_path, monkeypatch):
    """Negatives come from fl.langevin with the paper's defaults: 60 steps, ε = 0.01, N(0, I) prior, N(0, I) starts."""
    import fastlangevin as fl
    calls = []
    real = fl.langevin

    def spy(energy, z0, n_steps, step_size, **kwargs):
        calls.append((tuple(z0.shape), n_steps, step_size, kwargs.get("prior"), kwargs.get("clip_grad")))
        return real(energy, z0, n_steps, step_size, **kwargs)

    monkeypatch.setattr(fl, "langevin", spy)
    run = tmp_path / "run"
    shutil.copytree(tilted_run, run)
    for name in ("ebm.safetensors", "ebm_best.safetensors"):
        (run / name).unlink()
    train_tilt(run, steps=1, batch_size=16, eval_every=10, n_eval=50, energy_width=8, energy_depth=1,
               progress=False)
    assert calls[0] == ((16, 2), 60, 0.01, "normal", None)  # the training chain
    assert calls[1][1:] == (100, 0.01, "normal", None) and calls[1][0][0] == 50  # the early-stopping evaluation
    calls.clear()  # --clip-grad reaches the training, evaluation and sample/evaluate chains
    train_tilt(run, steps=1, batch_size=16, eval_every=10, n_eval=50, energy_width=8, energy_depth=1,
               clip_grad=3.0, progress=False, overwrite=True)
    evaluate_run(run, n=20)
    assert [c[-1] for c in calls] == [3.0, 3.0, 3.0]


def test_tilt_patience_stops_early(tilted_run, tmp_path, monkeypatch):
    """With patience 1, the run stops at the first evaluation that does not beat the best."""
    import fastlangevin.trainers.tilt as tilt
    scores = iter([0.5, 0.7, 0.1, 0.1])
    real = tilt.sample_quality
    monkeypatch.setattr(tilt, "sample_quality", lambda *a: {**real(*a), "mmd2": next(scores)})
    run = tmp_path / "run"
    shutil.copytree(tilted_run, run)
    metrics = train_tilt(run, steps=8, batch_size=8, n_steps=2, sample_steps=2, eval_every=1, n_eval=20,
                         energy_width=4, energy_depth=1, patience=1, progress=False, overwrite=True)
    assert [h["step"] for h in metrics["history"]] == [1, 2]
    assert metrics["best"]["step"] == 1 and load_checkpoint(run / "ebm_best.safetensors")["step"] == 1


def test_tilt_stop_on_high_quality(tilted_run, tmp_path, monkeypatch):
    """stop_on="high_quality" keeps the checkpoint with the largest share (higher is better), and is refused for data
    without modes."""
    import fastlangevin.trainers.tilt as tilt
    shares = iter([0.2, 0.5, 0.3])
    real = tilt.sample_quality
    monkeypatch.setattr(tilt, "sample_quality", lambda *a: {**real(*a), "high_quality": next(shares)})
    run = tmp_path / "run"
    shutil.copytree(tilted_run, run)
    metrics = train_tilt(run, steps=3, batch_size=8, n_steps=2, sample_steps=2, eval_every=1, n_eval=20,
                         energy_width=4, energy_depth=1, stop_on="high_quality", progress=False, overwrite=True)
    assert metrics["best"] == {"step": 2, "metric": "high_quality", "value": 0.5}
    assert load_checkpoint(run / "ebm_best.safetensors")["step"] == 2
    with pytest.raises(ValueError, match="stop_on"):
        train_tilt(run, steps=1, stop_on="fid", progress=False)


def test_langevin_transition_records_the_chain(tilted_run):
    """Snapshots at the requested steps; step 0 is G(z0); the segments add up to the last step's chain length."""
    from fastlangevin.trainers.base import load_base
    from fastlangevin.trainers.chains import langevin_transition
    from fastlangevin.trainers.checkpoint import read_json
    from fastlangevin.trainers.run_folder import RunFolder
    from fastlangevin.trainers.tilt import TiltedEnergy, TiltTrainer
    base, _ = load_base(tilted_run)
    energy, _, _ = TiltTrainer.load(RunFolder(tilted_run), "best")
    z0 = torch.randn(6, 2, generator=torch.Generator().manual_seed(0))
    snaps = langevin_transition(TiltedEnergy(energy, base), z0, [0, 2, 5], 0.01, base.generate, seed=1)
    assert [k for k, _ in snaps] == [0, 2, 5] and all(x.shape == (6, 2) for _, x in snaps)
    with torch.no_grad():
        torch.testing.assert_close(snaps[0][1], base.generate(z0))
    assert not torch.equal(snaps[1][1], snaps[2][1])
    assert read_json(tilted_run / "config.json")["tilt"]["step_size"] == 0.01
