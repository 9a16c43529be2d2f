"""pytest hooks: GPU tests skip without a CUDA device (markers in pyproject.toml; lanes in ``tests/lanes.py``);
the metrics' cache (trained classifiers, compiled kernels) goes to a folder of this test session, never the user's;
the tests refuse to run a source tree that shadows the installed package (its CPU lanes would skip quietly)."""

import json
from importlib import metadata
from pathlib import Path

import pytest

import fastlangevin
from fastlangevin import _ext
from tests.lanes import HAS_CUDA


def _installed_packages() -> list[Path]:
    """The package folder of each installed fastlangevin distribution (an editable one: its source tree's)."""
    folders = []
    for dist in metadata.distributions(name="fastlangevin"):
        url = json.loads(dist.read_text("direct_url.json") or "{}")
        if url.get("dir_info", {}).get("editable"):
            folders.append(Path(url["url"].removeprefix("file://")) / "fastlangevin")
        else:
            folders.append(Path(dist.locate_file("fastlangevin")))
    return [folder.resolve() for folder in folders]


def _shadowed_install() -> str | None:
    """Where an installed fastlangevin with its compiled extension lives when the tests imported another copy without
    it instead (``python -m pytest`` in a checkout or an unpacked sdist puts ./fastlangevin first on sys.path), else
    None."""
    if not (_ext.cpu_reason() or "").startswith("not built"):
        return None
    imported = Path(fastlangevin.__file__).resolve().parent
    for package in _installed_packages():
        if package != imported and any(package.glob("_C.*")):
            return str(package)
    return None


def pytest_configure(config):
    installed = _shadowed_install()
    if installed:
        raise pytest.UsageError(
            f"the tests imported fastlangevin from {Path(fastlangevin.__file__).parent}, a source tree without the "
            f"compiled extension, instead of the installed package in {installed}: run `pytest` (not `python -m "
            f"pytest`, which puts the current folder first on sys.path), or build in place "
            f"(`python setup.py build_ext --inplace`) or install editable (`pip install -e .`)")


def pytest_report_header(config):
    cpu = _ext.cpu_build()
    return [f"fastlangevin {fastlangevin.__version__} from {Path(fastlangevin.__file__).parent}",
            f"CPU kernels: {cpu.description if cpu.module is not None else cpu.reason}"]


@pytest.fixture(scope="session", autouse=True)
def session_cache(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("FASTLANGEVIN_CACHE", str(tmp_path_factory.mktemp("fastlangevin-cache")))
        yield


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
