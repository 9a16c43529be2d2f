"""pytest hooks: the ``gpu`` and ``slow`` markers; lanes and skips live in ``tests/lanes.py``."""

import pytest

from tests.lanes import HAS_CUDA


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: long-running statistical or end-to-end test")


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords and not HAS_CUDA:
            item.add_marker(skip_gpu)
