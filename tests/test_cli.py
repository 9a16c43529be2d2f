"""The command line: demo (small), info."""

import subprocess
import sys

import pytest

from fastlangevin.cli import main


def test_demo_writes_png_and_reports_modes(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    main(["demo", "--out", str(tmp_path), "--n-samples", "2000", "--n-steps", "60"])
    out = capsys.readouterr().out
    assert "reference" in out and "N(0,I)" in out
    png = tmp_path / "demo_25gaussians.png"
    assert png.exists() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the chain moves samples onto the modes: the reference row reports far more high-quality samples than the start
    share = {line.split()[0]: float(next(w for w in line.split() if w.endswith("%")).rstrip("%"))
             for line in out.splitlines() if "%" in line}
    assert share["reference"] > 2 * share["N(0,I)"]


def test_info_command():
    result = subprocess.run([sys.executable, "-m", "fastlangevin.cli", "info"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "cpu tensors (auto ->" in result.stdout
