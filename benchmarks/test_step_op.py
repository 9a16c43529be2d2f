"""pytest-benchmark version of step_op.py, grouped by size so ``--benchmark-compare`` lines up runs.

    pytest benchmarks/test_step_op.py --benchmark-only [--benchmark-autosave] [--benchmark-compare]
"""

import pytest
import torch

from fastlangevin.ops.langevin_step import make_rng_state, run_step
from step_op import NOISE_SCALE, STEP_SIZE, eager_step, implementations

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = [14, 16, 18, 20, 22, 24]


@pytest.mark.parametrize("log2", SIZES)
@pytest.mark.parametrize("impl", list(implementations(DEVICE)))
def test_step_op(benchmark, impl, log2):
    n = 2 ** log2
    z = torch.randn(n // 64, 64, device=DEVICE)
    grad = torch.randn_like(z)
    rng_state = make_rng_state(1, 0, DEVICE)
    backend = implementations(DEVICE)[impl]
    if callable(backend):
        step = lambda: eager_step(z, grad)
    else:
        step = lambda: run_step(backend, z, grad, rng_state, STEP_SIZE, NOISE_SCALE, 1, None, None)

    def timed():
        step()
        if DEVICE == "cuda":
            torch.cuda.synchronize()

    benchmark.group = f"step op {DEVICE} n=2^{log2}"
    benchmark.extra_info["bytes"] = 3 * n * z.element_size()
    benchmark(timed)
