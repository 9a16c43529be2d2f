"""benchmarks/profile_chain.py: the torch.profiler trace on the CPU at a tiny size; the Nsight modes on a GPU."""

import json
from pathlib import Path

import pytest

from tests.benchmark_scripts import load


@pytest.fixture(scope="module")
def profile_chain():
    return load("profile_chain")


def _events(path):
    trace = json.loads(Path(path).read_text())
    return [e for e in trace["traceEvents"] if e.get("ph") == "X"]


@pytest.mark.parametrize("energy, expected_op", [
    ("mlp-step", "AddmmBackward0"),  # autograd's energy gradient, then the step op
    ("mlp-fused", "fastlangevin::mlp_chain_cpu"),  # the whole chain in one op (where the build has it)
    ("conv", "aten::convolution"),
    ("eager", "aten::randn_like"),
])
def test_torch_mode_writes_a_trace_with_the_chain_labelled(profile_chain, tmp_path, capsys, energy, expected_op):
    trace = tmp_path / "trace.json"
    assert profile_chain.main(["--mode", "torch", "--energy", energy, "--batch", "4", "--steps", "2", "--warmup", "1",
                               "--repeats", "2", "--device", "cpu", "--trace", str(trace)]) == 0
    events = _events(trace)
    label = f"profile_chain {energy} chain, B=4, K=2, cpu float32"
    chains = [e for e in events if e["name"] == label]
    assert len(chains) == 2 and all(e["dur"] > 0 for e in chains)
    out = capsys.readouterr().out
    if energy == "mlp-fused" and "(cpu:fused)" not in out:
        expected_op = "AddmmBackward0"  # a build without the fused chain runs the step-op chain (and says so)
    assert expected_op in {e["name"] for e in events}
    # every op of the chain lies inside one of the labelled ranges (nothing profiled outside the chains)
    ops = [e for e in events if e["name"].startswith("aten::") and e.get("tid") == chains[0].get("tid")]
    inside = lambda e: any(c["ts"] <= e["ts"] and e["ts"] + e["dur"] <= c["ts"] + c["dur"] + 1 for c in chains)
    assert ops and all(inside(e) for e in ops)
    assert f"trace written to {trace}" in out


def test_torch_mode_float64(profile_chain, tmp_path):
    trace = tmp_path / "trace.json"
    profile_chain.main(["--mode", "torch", "--energy", "mlp-step", "--dtype", "float64", "--batch", "3", "--steps",
                        "1", "--warmup", "0", "--device", "cpu", "--trace", str(trace)])
    assert any(e["name"].endswith("cpu float64") for e in _events(trace))


@pytest.mark.parametrize("argv, message", [
    (["--mode", "nsys", "--device", "cpu"], "--mode nsys profiles CUDA kernels: it needs --device cuda, got 'cpu'"),
    (["--mode", "ncu", "--device", "cpu"], "--mode ncu profiles CUDA kernels"),
    (["--mode", "torch", "--device", "cpu", "--steps", "0"], "--steps must be >= 1, got 0"),
    (["--mode", "torch", "--device", "cpu", "--energy", "mlp"], "invalid choice: 'mlp'"),
])
def test_bad_arguments_are_rejected_clearly(profile_chain, capsys, argv, message):
    with pytest.raises(SystemExit) as exit_info:
        profile_chain.main(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["nsys", "ncu"])
@pytest.mark.parametrize("energy", ["mlp-fused", "mlp-step", "conv"])
def test_nsight_modes_run_on_a_gpu(profile_chain, capsys, mode, energy):
    """Outside Nsight, cudaProfilerStart/Stop are no-ops: the modes must run and say what they profiled."""
    assert profile_chain.main(["--mode", mode, "--energy", energy, "--batch", "16", "--steps", "3", "--warmup",
                               "1"]) == 0
    assert any(line.startswith(f"{mode}: ") for line in capsys.readouterr().out.splitlines())


@pytest.mark.gpu
def test_torch_mode_on_a_gpu_records_kernels(profile_chain, tmp_path):
    trace = tmp_path / "trace.json"
    profile_chain.main(["--mode", "torch", "--energy", "mlp-step", "--batch", "16", "--steps", "3", "--warmup", "1",
                        "--trace", str(trace)])
    kernels = [e for e in _events(trace) if e.get("cat") == "kernel"]
    assert kernels, "no CUDA kernel events in the trace"
