"""``fastlangevin bench`` (a thin entry point into benchmarks/) and the benchmark harness's own logic: timing and the
chain rows on a CPU at a tiny size."""

import subprocess
import sys
import time

import pytest
import torch

from fastlangevin import bench
from fastlangevin.cli import main
from tests.benchmark_scripts import BENCHMARKS, load


def test_bench_without_benchmarks_folder_says_so_in_one_line(monkeypatch, tmp_path, capsys):
    """An installed wheel has no benchmarks/ beside the package: a one-line error and exit status 2."""
    monkeypatch.setattr(bench, "BENCHMARKS", tmp_path / "benchmarks")
    assert main(["bench", "--quick"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "source checkout" in err and "benchmarks" in err


def test_bench_runs_the_checkouts_chain_benchmark_with_its_options(monkeypatch, tmp_path):
    chain_bench = load("chain_bench")  # what ``import chain_bench`` in fastlangevin/bench.py finds
    calls = []
    monkeypatch.setattr(chain_bench, "run_bench", lambda *args: calls.append(args))
    assert main(["bench", "--cases", "conv,mlp", "--quick", "--out", str(tmp_path), "--repeats", "2"]) == 0
    assert calls == [(str(tmp_path), ("conv", "mlp"), True, None, 2)]


@pytest.mark.parametrize("argv, message", [
    (["--cases", "mlp,nope"], "--cases: unknown ['nope']"),
    (["--repeats", "0"], "--repeats must be >= 1, got 0"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nonsense"], "--device"),
])
def test_bench_rejects_bad_options_in_one_line(argv, message):
    done = subprocess.run([sys.executable, "-m", "fastlangevin.cli", "bench", *argv], capture_output=True,
                          text=True)
    assert done.returncode == 2 and message in done.stderr and "Traceback" not in done.stderr


def test_time_call_takes_medians_of_at_least_the_repeats():
    load("chain_bench")  # benchmarks/ on sys.path
    from harness import timing

    result = timing.time_call(lambda: time.sleep(0.002), "cpu", repeats=5, warmup=1, min_seconds=0.0)
    assert result["runs"] >= 5 and 0.002 <= result["min"] <= result["median"] <= result["max"]


def test_chain_rows_on_the_cpu_compare_implementations_run_side_by_side():
    load("chain_bench")  # benchmarks/ on sys.path
    from harness.measure import ChainSpec, run_specs
    from harness.tables import chain_table

    specs = [ChainSpec("mlp", impl, ("mlp", (6, 8, 1)), 3, 2, 0.1) for impl in ("eager", "step-op", "graph", "fused")]
    rows = run_specs(specs, "cpu", repeats=2, max_seconds=0.1, min_seconds=0.0, log=lambda msg: None)
    by_impl = {r["impl"]: r for r in rows}
    assert by_impl["graph"]["backend"] == "skipped" and "CUDA" in by_impl["graph"]["note"]
    assert by_impl["eager"]["vs_eager"] == 1.0
    for impl in ("eager", "step-op", "fused"):
        row = by_impl[impl]
        assert row["runs"] >= 2 and 0 < row["min_s"] <= row["median_s"] <= row["max_s"]
        assert row["gflop_per_chain"] == pytest.approx(4 * (6 * 8 + 8 * 1) * 3 * 2 / 1e9)
    assert by_impl["step-op"]["backend"] == "cpu"  # the nn.Module energy: the step op, not the fused chain
    assert by_impl["fused"]["backend"] in ("cpu:fused", "cpu")
    table = chain_table(rows)
    assert "note  graph: CUDA graphs need a CUDA device" in table


def test_benchmark_scripts_import_their_harness_from_benchmarks():
    """The harness left the installed package: the scripts import it from benchmarks/harness."""
    for script in ("step_op", "profile_chain", "tilt_chain_cost", "chain_bench"):
        source = (BENCHMARKS / f"{script}.py").read_text()
        assert "fastlangevin.bench" not in source and "from harness" in source
