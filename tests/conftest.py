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


def _shadowed_install() -> str | None:
    """Where the installed (not editable) fastlangevin lives when the tests imported another copy without its compiled
    extension instead: ``python -m pytest`` in a checkout puts ./fastlangevin first on sys.path. Else None."""
    try:
        dist = metadata.distribution("fastlangevin")
    except metadata.PackageNotFoundError:
        return None
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable"):
        return None  # an editable install imports its source tree, wherever that is
    installed = Path(dist.locate_file("fastlangevin")).resolve()
    imported = Path(fastlangevin.__file__).resolve().parent
    if installed == imported or not installed.is_dir() or not (_ext.cpu_reason() or "").startswith("not built"):
        return None
    return str(installed)


def pytest_configure(config):
    installed = _shadowed_install()
    if installed:
        raise pytest.UsageError(
            f"the tests imported fastlangevin from {Path(fastlangevin.__file__).parent}, a source tree without the "
            f"compiled extension, instead of the installed package in {installed}: run `pytest` (not `python -m "
            f"pytest`, which puts the current folder first on sys.path), or build in place "
            f"(`python setup.py build_ext --inplace`) or install editable (`pip install -e .`)")


def pytest_report_header(config):
    return f"fastlangevin {fastlangevin.__version__} from {Path(fastlangevin.__file__).parent}"


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
