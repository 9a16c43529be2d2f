"""The command line: demo (the toy experiment at a tiny budget, and the backend comparison), info."""

import json
import subprocess
import sys

import pytest

from fastlangevin.cli import main
from fastlangevin.demo import run_backend_demo

PNG = b"\x89PNG\r\n\x1a\n"


def test_demo_runs_the_toy_experiment(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    main(["demo", "--out", str(tmp_path), "--quick"])
    out = capsys.readouterr().out
    assert "base" in out and "tilted" in out and "inside fl.langevin (cpu:fused)" in out
    assert out.count("tilt: the negative chain runs on cpu:fused") == 1  # E(G(z)) of the MLP VAE: one fused chain
    assert (tmp_path / "figure1_25gaussians.png").read_bytes()[:8] == PNG
    evaluation = json.loads((tmp_path / "25gaussians" / "evaluation.json").read_text())
    for model in ("base", "tilted"):
        assert 0 <= evaluation[model]["high_quality"] <= 1 and evaluation[model]["n_samples"] == 500
    # base and tilted are scored on samples from the same z0, so they differ only by the chain
    assert evaluation["base"]["mmd2"] != evaluation["tilted"]["mmd2"]


def test_demo_backends_writes_png_and_reports_modes(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    run_backend_demo(str(tmp_path), n_samples=2000, n_steps=60)
    out = capsys.readouterr().out
    assert "reference" in out and "N(0,I)" in out
    assert (tmp_path / "demo_backends.png").read_bytes()[:8] == PNG
    # the chain moves samples onto the modes: the reference row reports far more high-quality samples than the start
    share = {line.split()[0]: float(next(w for w in line.split() if w.endswith("%")).rstrip("%"))
             for line in out.splitlines() if "%" in line}
    assert share["reference"] > 2 * share["N(0,I)"]


def test_demo_backends_flag_is_wired(tmp_path, monkeypatch):
    import fastlangevin.demo
    calls = []
    monkeypatch.setattr(fastlangevin.demo, "run_backend_demo", lambda *a, **k: calls.append((a, k)))
    main(["demo", "--backends", "--out", str(tmp_path)])
    assert calls and calls[0][0][0] == str(tmp_path)


def test_info_command():
    result = subprocess.run([sys.executable, "-m", "fastlangevin.cli", "info"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "cpu tensors (auto ->" in result.stdout
