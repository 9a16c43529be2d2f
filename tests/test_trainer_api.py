"""The trainer API: a trainer added in one file and one registration line runs through the CLI with its run folder
and --resume; settings are declared once (options, checks, config.json); every chain's energy is one module for
the whole run."""

import dataclasses
import json

import pytest
import torch

import fastlangevin as fl
from fastlangevin.cli import main
from fastlangevin.metrics import frechet
from fastlangevin.metrics.classifier import ClassifierConfig
from fastlangevin.trainers import registry
from fastlangevin.trainers.checkpoint import load_checkpoint
from fastlangevin.trainers.settings import from_config, make_settings, setting, to_config


@pytest.fixture
def toy_entry_point(tmp_path, monkeypatch):
    """Installs tests/toy_trainer.py as an entry point of the group fastlangevin.trainers (a package's
    dist-info on sys.path); the registry is restored afterwards."""
    monkeypatch.setattr(registry, "_TRAINERS", registry.trainers())  # a copy: the toy leaves with the test
    dist = tmp_path / "site" / "toy_trainer-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: toy-trainer\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{registry.ENTRY_POINT_GROUP}]\ntoy = tests.toy_trainer\n")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))


def test_a_trainer_in_one_file_runs_through_the_cli(tmp_path, toy_entry_point, capsys):
    run, straight = tmp_path / "run", tmp_path / "straight"
    assert main(["train-toy", "--out", str(run), "--steps", "4", "--lr", "0.25", "--no-progress"]) == 0
    assert "train-toy" in {c for c in registry.trainers()}
    config = json.loads((run / "config.json").read_text())["toy"]
    assert config["steps"] == 4 and config["lr"] == 0.25 and config["batch_size"] == 32  # given and default
    metrics = json.loads((run / "metrics.json").read_text())["toy_training"]
    assert [h["step"] for h in metrics["history"]] == [3, 4] and "distance" in metrics["history"][-1]
    assert load_checkpoint(run / "toy.safetensors")["step"] == 4
    # --resume keeps the run's settings and continues: the same parameters as 6 steps in one go
    assert main(["train-toy", "--out", str(run), "--steps", "6", "--resume", "--no-progress"]) == 0
    assert main(["train-toy", "--out", str(straight), "--steps", "6", "--lr", "0.25", "--no-progress"]) == 0
    a, b = (load_checkpoint(path / "toy.safetensors") for path in (run, straight))
    assert a["step"] == b["step"] == 6
    assert a["extra"]["config"]["toy"]["lr"] == 0.25  # the checkpoint carries the settings that made it
    metrics = json.loads((run / "metrics.json").read_text())["toy_training"]
    assert [h["step"] for h in metrics["history"]] == [3, 4, 6]
    mu = [json.loads((p / "metrics.json").read_text())["toy_training"]["history"][-1]["distance"]
          for p in (run, straight)]
    assert mu[0] == mu[1]
    capsys.readouterr()
    assert main(["train-toy", "--out", str(run), "--steps", "8", "--resume", "--lr", "0.5"]) == 2
    assert "--resume keeps the run's settings: lr is 0.25 in the run, not 0.5" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train-toy", "--help"])
    assert "--batch-size" in capsys.readouterr().out


def test_without_its_registration_the_command_does_not_exist(capsys):
    assert main(["train-toy", "--out", "unused"]) == 2
    assert "invalid choice: 'train-toy'" in capsys.readouterr().err


@dataclasses.dataclass
class Example:
    steps: int = setting(10, "steps", low=1, resume="extend")
    rate: float = setting(0.5, "a rate", above=0, below=2)
    betas: tuple[float, float] = setting((0.5, 0.9), "two numbers", low=0, below=1)
    sizes: list[int] | None = setting(None, "one or more", low=1)
    mode: str = setting("a", "a choice", choices=("a", "b"))
    flag: bool = setting(False, "a switch")


@pytest.mark.parametrize("values, message", [
    ({"steps": 0}, r"steps must be an int >= 1, got 0 \(--steps\)"),
    ({"steps": True}, "steps must be an int, got True"),
    ({"steps": 2.5}, "steps must be an int, got 2.5"),
    ({"rate": float("nan")}, "rate must be a finite float"),
    ({"rate": 2}, "rate must be a finite float < 2, got 2.0"),
    ({"betas": (0.5,)}, "betas must be 2 values"),
    ({"betas": (0.5, 1.5)}, "betas must be a finite float < 1, got 1.5"),
    ({"sizes": []}, "sizes must be one or more values"),
    ({"mode": "c"}, r"mode must be one of \('a', 'b'\), got 'c'"),
    ({"flag": 1}, "flag must be True or False"),
    ({"speed": 1}, "speed is not a setting"),
])
def test_settings_are_checked_by_their_declaration(values, message):
    with pytest.raises(ValueError, match=message):
        make_settings(Example, values)


def test_settings_round_trip_through_config():
    import numpy as np
    settings = make_settings(Example, {"steps": np.int64(3), "sizes": [2, 3], "betas": [0.1, 0.2], "rate": 1})
    assert settings.steps == 3 and type(settings.steps) is int and settings.betas == (0.1, 0.2)
    assert settings.rate == 1.0 and type(settings.rate) is float
    config = to_config(settings)
    assert json.loads(json.dumps(config)) == config
    assert from_config(Example, {**config, "unknown_key": 1}) == settings


# --- each chain's energy is one module, built once per run --------------------------------------------------------


@pytest.fixture
def chain_calls(monkeypatch):
    """Every fl.langevin call's (energy, z0 shape, n_steps, a snapshot of a data buffer's address if any)."""
    calls, real = [], fl.langevin

    def spy(energy, z0, n_steps, step_size, **kwargs):
        buffers = {name: b.data_ptr() for name, b in energy.named_buffers() if name.startswith("target_")} \
            if isinstance(energy, torch.nn.Module) else {}
        calls.append((energy, tuple(z0.shape), n_steps, buffers))
        return real(energy, z0, n_steps, step_size, **kwargs)

    monkeypatch.setattr(fl, "langevin", spy)
    with pytest.MonkeyPatch.context() as patch:  # a tiny Fréchet classifier: the plumbing, not the metric
        patch.setattr(frechet, "ClassifierConfig", lambda: ClassifierConfig(width=4, feature_dim=8, min_steps=20,
                                                                            epochs=0.1))
        yield calls


def training_chain(calls, shape, n_steps):
    energies = [c[0] for c in calls if c[1] == shape and c[2] == n_steps]
    assert len(energies) >= 3, calls
    return energies


def assert_one_module(energies):
    first = energies[0]
    assert isinstance(first, torch.nn.Module)
    assert all(e is first for e in energies), [type(e).__name__ for e in energies]


def test_tilt_hands_langevin_one_energy(tmp_path, chain_calls):
    pytest.importorskip("matplotlib")
    main(["train-base", "vae", "--data", "25gaussians", "--n-train", "128", "--width", "8", "--steps", "2",
          "--batch-size", "16", "--n-eval", "50", "--out", str(tmp_path), "--no-progress"])
    main(["tilt", str(tmp_path), "--steps", "4", "--batch-size", "8", "--n-steps", "3", "--sample-steps", "3",
          "--eval-every", "2", "--n-eval", "40", "--energy-width", "8", "--energy-depth", "1", "--no-progress"])
    energies = training_chain(chain_calls, (8, 2), 3)
    assert_one_module(energies)
    assert all(c[0] is energies[0] for c in chain_calls)  # the evaluation chains too


def test_lebm_hands_langevin_one_energy_per_chain(tmp_path, chain_calls):
    pytest.importorskip("matplotlib")
    main(["train-prior", "lebm", "--data", "digits", "--out", str(tmp_path), "--steps", "4", "--batch-size", "8",
          "--prior-steps", "5", "--posterior-steps", "4", "--eval-every", "2", "--n-eval", "20", "--latent-dim", "2",
          "--energy-width", "8", "--generator-width", "8", "--no-progress"])  # (figures' chain segments: 1, 1, 3)
    prior, posterior = training_chain(chain_calls, (8, 2), 5), training_chain(chain_calls, (8, 2), 4)
    assert_one_module(prior)
    assert_one_module(posterior)
    assert prior[0] is not posterior[0]
    assert {id(c[0]) for c in chain_calls} == {id(prior[0]), id(posterior[0])}  # evaluation and figures too
    # the batch is a buffer of the posterior energy, refreshed in place: one address for every iteration
    addresses = {c[3]["target_8"] for c in chain_calls if c[0] is posterior[0] and c[1] == (8, 2)}
    assert len(addresses) == 1


def test_hierarchical_hands_langevin_one_energy(tmp_path, chain_calls):
    pytest.importorskip("matplotlib")
    main(["train-prior", "joint", "--data", "digits", "--out", str(tmp_path), "--vae-steps", "2", "--steps", "4",
          "--batch-size", "8", "--channels", "4", "--latent-channels", "2", "1", "--prior-steps", "3",
          "--energy-width", "4", "--no-progress"])
    energies = training_chain(chain_calls, (8, 2 + 4), 3)
    assert_one_module(energies)
    # evaluation and figures use it as well; only the re-sampling with top groups held fixed (another target, over
    # fewer coordinates) has its own
    assert all(c[0] is energies[0] for c in chain_calls if c[1][1] == 6)


def test_pixel_ebm_hands_langevin_one_energy(tmp_path, chain_calls):
    pytest.importorskip("matplotlib")
    main(["train-pixel-ebm", "--data", "digits", "--out", str(tmp_path), "--steps", "4", "--batch-size", "8",
          "--n-steps", "3", "--buffer-size", "50", "--energy-width", "4", "--energy-depth", "1", "--eval-every", "2",
          "--n-eval", "20", "--no-progress"])
    energies = training_chain(chain_calls, (8, 1, 8, 8), 3)
    assert_one_module(energies)
    assert all(c[0] is energies[0] for c in chain_calls)
