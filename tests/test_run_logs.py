"""What a run tells as it goes: a progress bar that is not redrawn every step and stays quiet in logs, metrics
appended to metrics.jsonl at every evaluation (and TensorBoard scalars when tensorboard is installed), run files
with the umask's permissions, and chains that never run through a batch norm in training mode."""

import io
import json
import os
import subprocess
import sys
import types

import pytest
import torch

from fastlangevin.cli import main
from fastlangevin.trainers.chains import Chains
from fastlangevin.trainers.monitor import Progress
from fastlangevin.trainers.run_folder import RunFolder

BASE = ["train-base", "vae", "--data", "25gaussians", "--n-train", "64", "--width", "8", "--steps", "6",
        "--batch-size", "16", "--n-eval", "40", "--no-progress"]


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_the_bar_is_not_redrawn_every_step(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    stream, described = Terminal(), []
    progress = Progress("train", 10_000, stream=stream, interval=3600)
    progress.start(0)
    for step in range(1, 10_001):
        progress.update(step, lambda: described.append(step) or "loss 1.0")
    progress.close()
    assert described == [] and stream.getvalue().count("\r") < 10  # no postfix, no redraw per step


def test_no_bar_off_a_terminal_and_tqdm_disable(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    pipe = io.StringIO()  # not a terminal: a plain line every log_interval seconds, no carriage returns
    progress = Progress("train", 50, stream=pipe, log_interval=0.0)
    progress.start(0)
    for step in range(1, 4):
        progress.update(step, lambda: "loss 1.0")
    assert pipe.getvalue().count("\n") == 3 and "\r" not in pipe.getvalue()
    assert "train: step 3/50" in pipe.getvalue()
    pipe = io.StringIO()  # however slow the machine, at most 50 lines a run: one per 10000 // 50 steps at most
    progress = Progress("train", 10_000, stream=pipe, log_interval=0.0)
    progress.start(100)
    for step in range(101, 10_001):
        progress.update(step, lambda: "loss 1.0")
    assert pipe.getvalue().count("\n") == 49 and "train: step 9900/10000" in pipe.getvalue()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    for stream in (Terminal(), io.StringIO()):
        progress = Progress("train", 1000, stream=stream, log_interval=0.0)
        progress.start(0)
        progress.update(1, lambda: "loss 1.0")
        progress.close()
        assert stream.getvalue() == ""


def test_a_piped_demo_writes_little_progress(tmp_path):
    pytest.importorskip("matplotlib")
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    result = subprocess.run([sys.executable, "-m", "fastlangevin.cli", "demo", "--quick", "--out", str(tmp_path)],
                            capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    assert len(result.stderr.encode()) < 20_000 and "\r" not in result.stderr


def test_metrics_are_appended_as_they_come(tmp_path):
    pytest.importorskip("matplotlib")
    run = tmp_path / "run"
    assert main([*BASE, "--out", str(run)]) == 0
    assert main(["tilt", str(run), "--steps", "4", "--batch-size", "8", "--n-steps", "2", "--sample-steps", "2",
                 "--eval-every", "2", "--n-eval", "40", "--energy-width", "8", "--energy-depth", "1",
                 "--no-progress"]) == 0
    records = RunFolder(run).read_log()
    assert [(r["stage"], r["step"]) for r in records] == [("base", 6), ("tilt", 2), ("tilt", 4)]
    assert "mmd2" in records[-1] and records[-1]["run"] == records[-2]["run"]
    history = json.loads((run / "metrics.json").read_text())["tilt_training"]["history"]
    assert [{k: r[k] for k in h} for r, h in zip(records[1:], history)] == history
    with open(run / "metrics.jsonl", "ab") as f:  # a crash cut the last line short: the next append is whole
        f.write(b'{"stage": "tilt", "st')
    assert main(["tilt", str(run), "--steps", "6", "--resume", "--no-progress"]) == 0
    records = RunFolder(run).read_log()
    assert [r["step"] for r in records if r["stage"] == "tilt"] == [2, 4, 6]
    assert records[-1]["run"] == records[-2]["run"]  # a resumed run keeps its name


def test_tensorboard_scalars_when_installed(tmp_path, monkeypatch):
    pytest.importorskip("matplotlib")
    scalars = []

    class SummaryWriter:  # what torch.utils.tensorboard offers when the tensorboard package is installed
        def __init__(self, log_dir):
            self.log_dir = log_dir

        def add_scalar(self, tag, value, step):
            scalars.append((os.path.relpath(self.log_dir, tmp_path), tag, step))

        def flush(self):
            pass

        def close(self):
            pass

    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", types.SimpleNamespace(SummaryWriter=SummaryWriter))
    assert main([*BASE, "--out", str(tmp_path / "run")]) == 0
    assert ("run/tensorboard/base", "loss", 6) in scalars
    assert ("run/tensorboard/base", "sample_quality/mmd2", 6) in scalars


def test_run_files_follow_the_umask(tmp_path):
    pytest.importorskip("matplotlib")
    old = os.umask(0o027)
    try:
        assert main([*BASE, "--out", str(tmp_path / "run")]) == 0
    finally:
        os.umask(old)
    for name in ("config.json", "metrics.json", "metrics.jsonl", "base.safetensors", "base_samples.png"):
        assert os.stat(tmp_path / "run" / name).st_mode & 0o777 == 0o640, name


def test_chains_refuse_batch_norms_in_training_mode():
    net = torch.nn.Sequential(torch.nn.Linear(2, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 1))
    energy = lambda z: net(z).squeeze(1)  # noqa: E731 (a callable is not inspected)
    module = torch.nn.Sequential(net, torch.nn.Flatten(0))
    before = net[1].running_mean.clone()
    with pytest.raises(ValueError, match=r"batch norms in training mode \(0.1, ...\); put the model"):
        Chains()("negative", 0, module, torch.randn(8, 2), 2, 0.1, seed=0)
    assert torch.equal(net[1].running_mean, before)
    module.eval()
    Chains()("negative", 0, module, torch.randn(8, 2), 2, 0.1, seed=0)
    assert torch.equal(net[1].running_mean, before) and energy is not None


def test_tilt_chains_read_the_backbone_in_eval_mode(tmp_path, monkeypatch):
    """The digits VAE has batch norms: a tilt's chains run through them in eval mode and leave them as trained."""
    pytest.importorskip("matplotlib")
    import fastlangevin as fl
    seen, real = [], fl.langevin

    def spy(energy, z0, *args, **kwargs):
        seen.extend(m.training for m in energy.modules() if isinstance(m, torch.nn.BatchNorm2d))
        return real(energy, z0, *args, **kwargs)

    run = tmp_path / "run"
    assert main(["train-base", "vae", "--data", "digits", "--steps", "2", "--batch-size", "8", "--width", "4",
                 "--n-eval", "20", "--out", str(run), "--no-progress"]) == 0
    monkeypatch.setattr(fl, "langevin", spy)
    assert main(["tilt", str(run), "--steps", "2", "--batch-size", "8", "--n-steps", "2", "--sample-steps", "2",
                 "--eval-every", "2", "--n-eval", "20", "--energy-width", "4", "--energy-depth", "1",
                 "--no-progress"]) == 0
    assert seen and not any(seen)
