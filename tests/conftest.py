"""pytest hooks: GPU tests skip without a CUDA device (markers in pyproject.toml; lanes in ``tests/lanes.py``)."""

import pytest

from tests.lanes import HAS_CUDA


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
