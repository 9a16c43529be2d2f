"""The package as a user installs it: the CLI's entry points and version, the optional extras, the sdist's contents,
the installed metadata."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
from importlib import metadata
from pathlib import Path

import pytest

import fastlangevin
from fastlangevin import _ext, cli

ROOT = Path(__file__).resolve().parents[1]
IN_SOURCE_TREE = (ROOT / "pyproject.toml").is_file() and (ROOT / "setup.py").is_file()
# pip name -> import name, where they differ
IMPORT_NAMES = {"scikit-learn": "sklearn"}


def _pyproject() -> dict:
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    if not IN_SOURCE_TREE:
        pytest.skip("not run from a source tree (no pyproject.toml beside tests/)")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _requirement_names(requirements: list[str]) -> set[str]:
    names = set()
    for req in requirements:
        name = req.split(";")[0].split("[")[0]
        for sep in "<>=!~ ":
            name = name.split(sep)[0]
        names.add(IMPORT_NAMES.get(name.strip(), name.strip()))
    return names


def _installed_distribution():
    """The installed distribution the tests imported (editable or not), or None (e.g. PYTHONPATH points elsewhere)."""
    package = Path(fastlangevin.__file__).resolve().parent
    for dist in metadata.distributions(name="fastlangevin"):
        url = json.loads(dist.read_text("direct_url.json") or "{}")
        if url.get("dir_info", {}).get("editable"):
            if Path(url["url"].removeprefix("file://")).resolve() / "fastlangevin" == package:
                return dist
        elif dist.read_text("RECORD") and Path(dist.locate_file("fastlangevin")).resolve() == package:
            return dist  # installed (a source tree's egg-info, found when it is on sys.path, has no RECORD)
    return None


def _run(*args, env=None, cwd=None):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env, cwd=cwd)


def test_python_m_and_version():
    result = _run("-m", "fastlangevin", "--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"fastlangevin {fastlangevin.__version__}"
    result = _run("-m", "fastlangevin", "info")
    assert result.returncode == 0, result.stderr
    assert "fastlangevin backends" in result.stdout


def test_one_version():
    """fastlangevin/_version.py is the only place the version is written; everything else reports that one."""
    from fastlangevin._version import __version__

    assert fastlangevin.__version__ == __version__
    cpu = _ext.load_cpu()
    if cpu is not None:
        assert cpu.build_info()["version"] == __version__
    dist = _installed_distribution()
    if dist is not None:
        assert dist.version == __version__
    if IN_SOURCE_TREE:
        assert "version" in _pyproject()["project"]["dynamic"]
        for path in ("setup.py", "CMakeLists.txt", "fastlangevin/__init__.py"):
            assert __version__ not in (ROOT / path).read_text(), f"{path} writes the version again"


def test_extras_match_the_cli():
    """The train extra installs every optional module the CLI names; fl.langevin's own dependencies are torch only."""
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    assert _requirement_names(project["dependencies"]) == {"torch"}
    assert set(cli.OPTIONAL_MODULES) <= _requirement_names(extras["train"])
    assert {"numpy", "matplotlib"} <= _requirement_names(extras["bench"])
    assert "triton" in _requirement_names(extras["triton"])
    assert {"pytest", "hypothesis"} <= _requirement_names(extras["test"])
    assert any(r.startswith("fastlangevin[") and "train" in r and "triton" in r for r in extras["test"])


# In the child below these packages are not found (import fails, importlib.util.find_spec gives None), as if only
# torch were installed.
_WITHOUT_EXTRAS = textwrap.dedent("""
    import importlib.abc, sys
    BLOCKED = {"numpy", "sklearn", "matplotlib", "safetensors", "tqdm", "triton", "scipy", "jax", "cupy"}

    class Hide(importlib.abc.MetaPathFinder):
        def __init__(self, finder):
            self.finder = finder

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                return None
            return self.finder.find_spec(name, path, target)

        def invalidate_caches(self):
            getattr(self.finder, "invalidate_caches", lambda: None)()

    sys.meta_path[:] = [Hide(finder) for finder in sys.meta_path]
""")


def test_sampling_needs_no_extra(tmp_path):
    """import fastlangevin, fl.langevin (step op and fused chain) and `fastlangevin info` without the train extra, Triton
    or NumPy; a trainer command then fails with one line naming the extra, and writes nothing."""
    script = _WITHOUT_EXTRAS + textwrap.dedent(f"""
        import contextlib, io, torch
        import fastlangevin as fl
        from fastlangevin import cli
        z0 = torch.randn(8, 3)
        z = fl.langevin(lambda z: (z ** 2).sum(1), z0, 5, 0.1, seed=0)
        zf = fl.langevin(fl.MLPEnergy([3, 16, 1]), z0, 5, 0.1, seed=0)
        assert z.isfinite().all() and zf.isfinite().all()
        assert "fastlangevin backends" in str(fl.backend_info())
        assert cli.main(["info"]) == 0
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            code = cli.main(["train-base", "vae", "--data", "25gaussians", "--out", {str(tmp_path / "run")!r},
                             "--steps", "1"])
        print("RC", code)
        print("ERR", err.getvalue(), end="")
        print("LOADED", sorted(m for m in BLOCKED if m in sys.modules))
    """)
    result = _run("-c", script)
    assert result.returncode == 0, result.stderr
    out = dict(line.split(" ", 1) for line in result.stdout.splitlines() if line.split(" ")[0] in
               ("RC", "ERR", "LOADED"))
    assert out["RC"] == "2"
    assert out["ERR"].startswith("fastlangevin: error: this command needs ") and out["ERR"].endswith(
        'pip install "fastlangevin[train]"'), out["ERR"]
    assert out["LOADED"] == "[]"
    assert not (tmp_path / "run").exists()


def test_sdist_has_what_its_tests_need(tmp_path):
    """The sdist builds and tests itself: it holds the build files and every file of csrc/, tests/ and benchmarks/."""
    if not IN_SOURCE_TREE:
        pytest.skip("not run from a source tree")
    pytest.importorskip("setuptools")
    src = tmp_path / "src"
    outputs = shutil.ignore_patterns("__pycache__", "*.pyc", "*.so", "*.egg-info")

    def skip(folder, names):  # at the top: hidden folders (.git, venvs) and what builds and runs write
        top = Path(folder) == ROOT
        return {n for n in names if top and (n.startswith(".") or n in ("build", "dist", "runs", "demo-out",
                                                                          "bench-out"))} | outputs(folder, names)

    shutil.copytree(ROOT, src, ignore=skip)
    result = _run("-c", f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))",
                  cwd=src, env={**os.environ, "FASTLANGEVIN_NO_CUDA": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    sdist = tmp_path / result.stdout.strip().splitlines()[-1]
    with tarfile.open(sdist) as tar:
        names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
    wanted = {"pyproject.toml", "setup.py", "CMakeLists.txt", "LICENSE", "README.md", "MANIFEST.in",
              "fastlangevin/py.typed", "fastlangevin/_version.py", "fastlangevin/__main__.py"}
    for folder in ("csrc", "tests", "benchmarks"):
        wanted |= {p.relative_to(src).as_posix() for p in (src / folder).rglob("*") if p.is_file()}
    assert not wanted - names, f"missing from the sdist: {sorted(wanted - names)}"
    assert not [n for n in names if n.endswith((".so", ".pyc"))]


def test_installed_metadata():
    """License, typing marker and the console script, as installed (skipped when the tests import another copy)."""
    dist = _installed_distribution()
    if dist is None:
        pytest.skip("the tests do not import the installed fastlangevin")
    meta = dist.metadata
    if meta.get("License-Expression") is None:
        pytest.skip("installed by an older build (no License-Expression); reinstall")
    assert meta["License-Expression"] == "MIT"
    assert (Path(fastlangevin.__file__).parent / "py.typed").is_file()
    assert any(ep.name == "fastlangevin" and ep.value == "fastlangevin.cli:main" for ep in dist.entry_points)
    extras = meta.get_all("Provides-Extra")
    assert {"train", "test", "triton", "bench"} <= set(extras)


def test_a_triton_older_than_the_kernels_need_is_reported(monkeypatch):
    """Triton < 3.6 (torch 2.7-2.9's own) lacks what the kernels use: the backend says so instead of failing inside."""
    from fastlangevin import backends

    if importlib.util.find_spec("triton") is None:
        pytest.skip("triton is not installed")
    monkeypatch.setattr(metadata, "version", lambda name: "3.5.1" if name == "triton" else "0")
    backends._triton_importable.cache_clear()
    try:
        status = backends.backend_status("triton", "cpu")
        assert not status.available
        assert "Triton 3.5.1 is too old" in status.reason and ">= 3.6" in status.reason
    finally:
        monkeypatch.undo()
        backends._triton_importable.cache_clear()
    assert backends._triton_importable() is None


def test_python_m_pytest_refuses_a_source_tree_without_the_extension(tmp_path):
    """`python -m pytest` in a checkout puts ./fastlangevin first on sys.path: without its compiled extension the CPU
    lanes would skip quietly, so the tests stop with a message naming the installed copy instead."""
    if _installed_distribution() is None or _ext.cpu_reason() is not None:
        pytest.skip("needs the tests to import an installed fastlangevin with its compiled extension")
    package = Path(fastlangevin.__file__).resolve().parent
    shutil.copytree(package, tmp_path / "fastlangevin", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (tmp_path / "tests").mkdir()
    for helper in ("__init__.py", "conftest.py", "lanes.py"):
        shutil.copy(Path(__file__).parent / helper, tmp_path / "tests" / helper)
    (tmp_path / "tests" / "test_nothing.py").write_text("def test_nothing():\n    pass\n")
    copy_reason = _run("-c", "from fastlangevin import _ext; print(_ext.cpu_reason())", cwd=tmp_path)
    if copy_reason.stdout.strip() == "None":
        # setuptools' editable finder (a meta-path hook) hands the copy the installed tree's fastlangevin._C: the copy
        # is not missing its extension, so there is nothing to refuse. CI's lane 2 (a regular install) runs this.
        pytest.skip("an editable install's finder supplies the compiled extension to any copy of the package")
    result = _run("-m", "pytest", "-p", "no:cacheprovider", "--collect-only", "-q", "tests", cwd=tmp_path)
    assert result.returncode == 4, result.stdout + result.stderr
    assert f"imported fastlangevin from {tmp_path / 'fastlangevin'}, a source tree without the compiled extension" \
        in result.stderr, result.stderr
