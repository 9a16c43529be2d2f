"""pytest hooks: GPU tests skip without a CUDA device (markers in pyproject.toml; lanes in ``tests/lanes.py``);
the metrics' cache (trained classifiers, compiled kernels) goes to a folder of this test session, never the user's."""

import pytest

from tests.lanes import HAS_CUDA


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
