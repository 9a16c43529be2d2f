"""pytest-benchmark version of ``fastlangevin bench`` (``chain_bench.py``): one test per distinct chain, grouped by
model and batch so ``--benchmark-compare`` lines up runs and the implementations of one shape sit in one table.

    pytest benchmarks/test_chain.py --benchmark-only [--benchmark-autosave] [--benchmark-compare]
    pytest benchmarks/test_chain.py --benchmark-only -k "B64 or conv"         # a subset

``extra_info`` keeps what ran (``backend``: a fused row that fell back says so), the GFLOP per chain and the compile
seconds (left out of the timing).
"""

import time

import pytest
import torch

from harness.flops import chain_flop
from harness.implementations import Skip
from harness.measure import CASES, chain_specs, prepare
from harness.timing import sync

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SPECS = list({spec.key: spec for spec in chain_specs(CASES)}.values())


def _id(spec) -> str:
    shape = "x".join(map(str, spec.model[1])) if spec.model[0] == "mlp" else "conv"
    return f"{shape}-K{spec.n_steps}-B{spec.batch}-{spec.impl}"


@pytest.mark.parametrize("spec", SPECS, ids=[_id(s) for s in SPECS])
def test_chain(benchmark, spec):
    try:
        model, _, prepared = prepare(spec, DEVICE)
    except Skip as e:
        pytest.skip(str(e))

    def chain():
        prepared.run()
        sync(DEVICE)

    t0 = time.perf_counter()
    chain()  # warm-up, and a guess of how many rounds fit in about five seconds
    rounds = max(3, min(20, int(5.0 / (time.perf_counter() - t0))))
    benchmark.group = f"{spec.group} {DEVICE}"
    benchmark.extra_info.update(backend=prepared.backend, compile_s=prepared.compile_s, note=prepared.note,
                                gflop_per_chain=chain_flop(model.macs, spec.batch, spec.n_steps) / 1e9)
    benchmark.pedantic(chain, rounds=rounds, iterations=1)
