"""NVTX ranges: off by default at no cost, on with a domain named fastlangevin, balanced around chain, steps,
energy gradient and update."""

import subprocess
import sys
import types

import torch

import fastlangevin as fl
from fastlangevin import profiling


class FakeDomain:
    def __init__(self):
        self.events = []

    def start_range(self, message):
        self.events.append(("start", message))
        return message

    def end_range(self, handle):
        self.events.append(("end", handle))


def test_ranges_cover_chain_steps_gradient_and_update(monkeypatch):
    domain = FakeDomain()
    fake = types.SimpleNamespace(get_domain=lambda name: domain if name == "fastlangevin" else None)
    monkeypatch.setitem(sys.modules, "nvtx", fake)
    monkeypatch.setattr(profiling, "_domain", None)
    try:
        assert profiling.nvtx(True)
        fl.langevin(lambda z: z.pow(2).sum(1), torch.randn(3, 2), 2, 0.1, seed=0, backend="reference")
    finally:
        profiling.nvtx(False)
    names = [m for kind, m in domain.events if kind == "start"]
    assert names[0] == "fastlangevin.chain 2 steps"
    for expected in ("step 0", "step 1", "energy", "energy gradient", "update"):
        assert expected in names
    depth = 0
    for kind, _ in domain.events:  # every range that starts also ends, properly nested
        depth += 1 if kind == "start" else -1
        assert depth >= 0
    assert depth == 0
    domain.events.clear()
    fl.langevin(lambda z: z.pow(2).sum(1), torch.randn(3, 2), 2, 0.1, seed=0)
    assert domain.events == []  # off again: nothing recorded


def test_missing_nvtx_package_is_reported_not_raised(monkeypatch, caplog):
    monkeypatch.setitem(sys.modules, "nvtx", None)  # makes `import nvtx` raise ImportError
    monkeypatch.setattr(profiling, "_domain", None)
    assert profiling.nvtx(True) is False
    assert "nvtx package is not installed" in caplog.text
    assert profiling.nvtx_range("x") is profiling._NULL


def test_environment_switch():
    code = "import fastlangevin.profiling as p; print(p._enabled)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**__import__("os").environ, "FASTLANGEVIN_NVTX": "1"})
    assert out.returncode == 0, out.stderr
    have_nvtx = subprocess.run([sys.executable, "-c", "import nvtx"], capture_output=True).returncode == 0
    assert out.stdout.strip() == str(have_nvtx)
