"""Test lanes: every backend that can run here, on every device that exists here.

Without a GPU, Triton kernels run on CPU tensors under the interpreter (TRITON_INTERPRET=1 is set here before
anything imports triton); GPU-only cases carry the ``gpu`` marker and skip cleanly. Nothing here touches CUDA at
import time except ``torch.cuda.is_available()``.
"""

import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

from fastlangevin.backends import backend_status  # noqa: E402  (after TRITON_INTERPRET is set)


def lanes():
    """(backend, device) pairs to test: each compiled backend on its device, the reference on each device."""
    out = [("reference", "cpu"), ("cpu", "cpu"), ("triton", "cpu")]
    out += [pytest.param(b, "cuda", marks=pytest.mark.gpu) for b in ("reference", "cuda", "triton")]
    return out


def require(backend: str, device: str) -> None:
    """Skip (with the reason) when ``backend`` cannot run on ``device`` here; a built-but-broken backend fails."""
    if device == "cuda" and not HAS_CUDA:
        pytest.skip("no CUDA device")
    if device == "cpu" and backend == "triton" and not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("Triton on CPU needs TRITON_INTERPRET=1")
    status = backend_status(backend, device)
    if not status.available:
        if backend in os.environ.get("FASTLANGEVIN_REQUIRE_BACKENDS", "").split(","):
            pytest.fail(f"backend {backend!r} is required here (FASTLANGEVIN_REQUIRE_BACKENDS): {status.reason}")
        pytest.skip(f"{backend} unavailable: {status.reason}")


LANES = lanes()
