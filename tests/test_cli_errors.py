"""The command line's error contract: an expected error is one line on stderr, ``fastlangevin: error: …``, exit
status 2, and nothing is written; ``--debug`` shows the traceback instead."""

import json
import os
import shutil
import subprocess
import sys

import pytest

from fastlangevin.cli import main

BASE = ["train-base", "vae", "--data", "25gaussians", "--n-train", "64", "--width", "8", "--steps", "2",
        "--batch-size", "16", "--n-eval", "40", "--no-progress"]
TILT = ["--steps", "2", "--batch-size", "8", "--n-steps", "2", "--sample-steps", "2", "--eval-every", "2",
        "--n-eval", "40", "--energy-width", "8", "--energy-depth", "1", "--no-progress"]


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    pytest.importorskip("matplotlib")
    run = tmp_path_factory.mktemp("run")
    assert main([*BASE, "--out", str(run)]) == 0
    assert main(["tilt", str(run), *TILT]) == 0
    return run


def snapshot(folder):
    """Every file under ``folder`` with its size and modification time (None when the folder does not exist)."""
    if not os.path.isdir(folder):
        return None
    return {os.path.join(root, name): (os.stat(os.path.join(root, name)).st_size,
                                       os.stat(os.path.join(root, name)).st_mtime_ns)
            for root, _, names in os.walk(folder) for name in names}


def assert_one_line_error(capsys, argv, *, contains: str, folder=None):
    before = snapshot(folder) if folder is not None else None
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastlangevin: error: "), err
    assert contains in lines[0], lines[0]
    if folder is not None:
        assert snapshot(folder) == before, "the failed command changed the run folder"
    return lines[0]


@pytest.mark.parametrize("extra, contains", [
    (["--eval-every", "0"], "eval_every must be an int >= 1, got 0 (--eval-every)"),
    (["--steps", "0"], "steps must be an int >= 1, got 0 (--steps)"),
    (["--step-size", "-1"], "step_size must be a finite float > 0"),
    (["--step-size", "nan"], "step_size must be a finite float"),
    (["--betas", "0.5", "1.5"], "betas must be a finite float < 1"),
    (["--energy-width", "32", "--resume"], "--resume keeps the run's settings: energy_width is 8 in the run"),
    (["--steps", "1", "--resume"], "--resume cannot lower steps from 2 to 1"),
])
def test_bad_tilt_settings(base_run, capsys, extra, contains):
    assert_one_line_error(capsys, ["tilt", str(base_run), *TILT, *extra], contains=contains, folder=base_run)


@pytest.mark.parametrize("argv, contains", [
    (["train-base", "vae", "--data", "mnist-typo", "--steps", "2"], "mnist-typo"),
    (["train-base", "vae", "--data", "25gaussians", "--checkpoint-every", "0"], "checkpoint_every must be"),
    (["train-prior", "lebm", "--data", "digits", "--steps", "0"], "steps must be an int >= 1"),
    (["train-pixel-ebm", "--data", "digits", "--batch-size", "64", "--buffer-size", "8"], "buffer_size"),
    (["train-base", "vae", "--data", "25gaussians", "--resume"], "--resume: no base.safetensors"),
])
def test_bad_training_commands_write_nothing(tmp_path, capsys, argv, contains):
    out = tmp_path / "new"
    assert_one_line_error(capsys, [*argv, "--out", str(out)], contains=contains)
    assert not out.exists()


def test_missing_run_folder(tmp_path, capsys):
    for command in (["tilt"], ["sample"], ["evaluate"]):
        line = assert_one_line_error(capsys, [*command, str(tmp_path / "nowhere")], contains="no run folder")
        assert str(tmp_path / "nowhere") in line


def test_a_truncated_checkpoint_is_named(base_run, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    for name in ("ebm_best.safetensors", "base.safetensors"):  # sample and evaluate take the best by default
        path = run / name
        path.write_bytes(path.read_bytes()[: os.path.getsize(path) // 2])
        for argv in (["sample", str(run), "--n", "20", "--n-steps", "2"], ["evaluate", str(run), "--n", "20"]):
            assert_one_line_error(capsys, argv, contains=str(path), folder=run)
    assert_one_line_error(capsys, ["tilt", str(run), *TILT, "--steps", "4", "--resume"], contains="base.safetensors",
                          folder=run)


def test_an_argument_error_is_one_line_too(capsys):
    assert main(["tilt"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("fastlangevin: error: "), lines


def test_debug_shows_the_traceback(tmp_path, capsys):
    with pytest.raises(FileNotFoundError, match="no run folder"):
        main(["--debug", "tilt", str(tmp_path / "nowhere")])
    with pytest.raises(FileNotFoundError, match="no run folder"):
        main(["sample", str(tmp_path / "nowhere"), "--debug"])


def test_sample_options_are_checked(base_run, capsys):
    for argv, contains in ((["--n", "1"], "n must be an int >= 2, got 1 (--n)"),
                           (["--n-steps", "-1"], "n_steps must be an int >= 0"),
                           (["--seed", "-3"], "seed must be an int >= 0")):
        assert_one_line_error(capsys, ["sample", str(base_run), *argv], contains=contains, folder=base_run)


def test_a_run_without_a_model_to_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main([*BASE, "--out", str(run)]) == 0
    line = assert_one_line_error(capsys, ["sample", str(run)], contains="holds no model")
    assert "base" in line and json.loads((run / "config.json").read_text()).keys() == {"base"}


def test_a_new_backbone_under_a_tilt_needs_overwrite(base_run, tmp_path, capsys):
    """train-base again would leave the folder's tilt on another backbone: refused, or with --overwrite the tilt is
    deleted first."""
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    line = assert_one_line_error(capsys, [*BASE, "--out", str(run), "--width", "16"], contains="--overwrite",
                                 folder=run)
    assert "already holds a run" in line and "--resume" in line
    assert main([*BASE, "--out", str(run), "--width", "16", "--overwrite"]) == 0
    assert not (run / "ebm.safetensors").exists() and not (run / "ebm_best.safetensors").exists()
    assert "tilt" not in json.loads((run / "config.json").read_text())
    assert json.loads((run / "config.json").read_text())["base"]["width"] == 16
    assert_one_line_error(capsys, ["sample", str(run)], contains="holds no model")


def test_a_folder_that_holds_a_run_is_refused_without_overwrite_or_resume(base_run, tmp_path, capsys):
    """A fresh run never mixes with what a folder holds: a second tilt on a tilted run, a backbone in a folder of
    the user's files, are refused (nothing changes); with --overwrite the tilt is replaced, the old best too (it
    is never left beside a new last checkpoint)."""
    from safetensors import safe_open
    run = tmp_path / "run"
    shutil.copytree(base_run, run)
    line = assert_one_line_error(capsys, ["tilt", str(run), *TILT, "--energy-width", "12"],
                                 contains="already holds a run (ebm.safetensors, ebm_best.safetensors)", folder=run)
    assert "--resume" in line and "--overwrite" in line
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("the user's")
    assert_one_line_error(capsys, [*BASE, "--out", str(mine)], contains="already holds a run (notes.txt)",
                          folder=mine)
    assert main(["tilt", str(run), *TILT, "--energy-width", "12", "--overwrite"]) == 0
    for name in ("ebm.safetensors", "ebm_best.safetensors"):
        with safe_open(str(run / name), "pt") as f:
            assert f.get_tensor("model.layers.0.weight").shape[0] == 12, name
    assert json.loads((run / "config.json").read_text())["tilt"]["energy_width"] == 12


def test_what_a_run_killed_before_its_first_checkpoint_leaves_is_no_run(tmp_path, capsys):
    """Its metrics.jsonl lines and a dead writer's temporary file do not make a folder hold a run; a live writer's
    temporary file does (another run is writing there)."""
    from fastlangevin.trainers.base import BaseTrainer
    from fastlangevin.trainers.loop import occupants
    from fastlangevin.trainers.run_folder import RunFolder
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"stage": "base", "step": 2}\n')
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (run / f".config.json.{dead.pid}.abc.tmp").write_text("{")
    assert occupants(BaseTrainer, RunFolder(run)) == []
    assert main([*BASE, "--out", str(run)]) == 0
    live = run / f".base.safetensors.{os.getppid()}.abc.tmp"
    live.write_text("")
    assert str(live.name) in occupants(BaseTrainer, RunFolder(run))


def test_the_demo_refuses_a_folder_that_holds_a_run(tmp_path, capsys):
    run = tmp_path / "25gaussians"
    run.mkdir()
    (run / "config.json").write_text("{}")
    assert_one_line_error(capsys, ["demo", "--quick", "--out", str(tmp_path)], contains="--overwrite",
                          folder=tmp_path)
    assert capsys.readouterr().out == ""


@pytest.mark.parametrize("argv, contains", [
    (["demo", "--device", "gpu"], "device must be cpu, cuda or cuda:N, got 'gpu'"),
    (["demo", "--device", "meta"], "device must be cpu, cuda or cuda:N, got 'meta'"),
    (["demo", "--backends", "--seed", "-1"], "seed must be an int >= 0"),
    (["train-base", "vae", "--data", "25gaussians", "--device", "mps"], "got 'mps'"),
    (["evaluate", "RUN", "--device", "cuda:x"], "device must be cpu, cuda or cuda:N"),
])
def test_bad_devices_and_seeds_write_nothing(tmp_path, capsys, argv, contains):
    """The audit's finds beyond the issue's list: devices other than cpu/cuda were taken and failed deep inside a
    run (or after the demo's folder was made), a negative demo seed inside torch."""
    out = tmp_path / "out"
    argv = [str(out) if a == "RUN" else a for a in argv]
    assert_one_line_error(capsys, [*argv, *([] if "RUN" in argv or argv[0] == "evaluate" else ["--out", str(out)])],
                          contains=contains)
    assert not out.exists()


def test_out_of_memory_is_one_line(monkeypatch, capsys):
    import torch
    from fastlangevin.trainers import commands

    def exhausted(args):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 32.00 GiB")
    monkeypatch.setattr(commands, "_train", exhausted)
    line = assert_one_line_error(capsys, ["train-base", "vae", "--data", "25gaussians", "--out", "x"],
                                 contains="out of memory")
    assert "--batch-size" in line
