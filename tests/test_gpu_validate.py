"""benchmarks/gpu_validate.py: the dry run on the CPU (what CI can run of the GPU script), a part that fails or runs
out of time while the others still run, the targets printed beside the figures, and the ncu summary."""

import json
import os
import subprocess
import sys
import time

import pytest

from tests.benchmark_scripts import BENCHMARKS, load

CUDA_PARTS = ("gpu-tests", "triton-compile", "nvrtc", "ncu")
CPU_PARTS = ("install", "step-op", "chains", "training")


@pytest.fixture(scope="module")
def gpu_validate():
    return load("gpu_validate")


def test_dry_run_runs_every_cpu_part_and_skips_the_cuda_ones(tmp_path):
    out = tmp_path / "out"
    done = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_validate.py"), "--dry-run", "--out", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert all((out / f).is_file() for f in files) and len(files) <= 8  # what comes back from the GPU machine
    assert {"report.md", "results.json", "gpu_validate.log", "chains.png"} <= set(files)
    state = json.loads((out / "results.json").read_text())
    assert state["dry_run"] and list(state["parts"]) == list(CPU_PARTS[:1] + CUDA_PARTS[:3] + CPU_PARTS[1:]
                                                             + CUDA_PARTS[3:])
    for name in CPU_PARTS:
        assert state["parts"][name]["status"] == "ok", (name, state["parts"][name]["summary"])
    for name in CUDA_PARTS:
        assert state["parts"][name]["status"] == "skipped" and "CUDA" in state["parts"][name]["summary"]
    parts = {name: part["results"] for name, part in state["parts"].items()}
    assert parts["gpu-tests"]["lanes"]["gpu"]["tests"] > 0  # the lane's pytest command ran (its tests skip here)
    chains = {(r["impl"], r["case"]): r for r in parts["chains"]["rows"]}
    assert chains[("fused", "mlp")]["backend"] in ("cpu:fused", "cpu") and chains[("eager", "conv")]["median_s"] > 0
    assert chains[("compile", "mlp")]["backend"] == "torch.compile (aot_eager)"
    assert chains[("graph", "mlp")]["backend"] == "skipped"
    steps = {(r["dtype"], r["impl"]) for r in parts["step-op"]["rows"]}
    assert {("float32", "cpu"), ("float32", "eager"), ("bfloat16", "eager")} <= steps
    tilt = parts["training"]["trainers"]["tilt (tiny)"]  # 3 - 1 iterations: noise may even make it negative
    assert {r["steps"] for r in tilt["library"]["runs"]} == {1, 3} and "eager_vs_library" in tilt
    assert all(isinstance(tilt[s]["iteration_s"], float) for s in ("library", "eager"))
    report = (out / "report.md").read_text()
    assert "## Targets (issue 18)" in report and "fused >= 50x eager" in report and "DRY RUN" in report
    assert all(f"| {name} |" in report for name in CPU_PARTS + CUDA_PARTS)
    assert "no part failed" in done.stdout


def test_a_failing_part_and_a_part_out_of_time_are_recorded_and_the_rest_runs(gpu_validate, monkeypatch, tmp_path,
                                                                            capsys):
    Part = gpu_validate.Part
    parts = (Part("bogus", 1, 30, "a part whose process fails"), Part("install", 1, 1, "runs past its 1 s", 1),
             Part("nvrtc", 1, 30, "skipped without CUDA"))
    monkeypatch.setattr(gpu_validate, "PARTS", parts)
    monkeypatch.setattr(gpu_validate, "PART_NAMES", tuple(p.name for p in parts))
    assert gpu_validate.main(["--dry-run", "--out", str(tmp_path), "--parts", "bogus,install,nvrtc"]) == 1
    state = json.loads((tmp_path / "results.json").read_text())
    statuses = {name: part["status"] for name, part in state["parts"].items()}
    assert statuses == {"bogus": "failed", "install": "timed out", "nvrtc": "skipped"}
    assert "exit 2" in state["parts"]["bogus"]["summary"]  # its process rejected --child bogus
    assert "FAILED: bogus, install" in capsys.readouterr().out
    assert "===== nvrtc" in (tmp_path / "gpu_validate.log").read_text()


def test_a_timed_out_part_takes_the_processes_it_started_with_it(gpu_validate, tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    starts_a_grandchild = ("import subprocess, sys, time; p = subprocess.Popen([sys.executable, '-c', "
                           "'import time; time.sleep(60)']); open(sys.argv[1], 'w').write(str(p.pid)); time.sleep(60)")
    started = time.perf_counter()
    returncode = gpu_validate.run_process([sys.executable, "-c", starts_a_grandchild, str(pid_file)],
                                          tmp_path / "log", timeout=3, env=dict(os.environ))
    assert returncode is None and time.perf_counter() - started < 30
    grandchild = int(pid_file.read_text())
    for _ in range(50):  # killed; reaped by init shortly after
        try:
            os.kill(grandchild, 0)
        except ProcessLookupError:
            break
        if open(f"/proc/{grandchild}/stat").read().split()[2] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail(f"process {grandchild}, started by the timed-out part, still runs")


def test_targets_are_evaluated_and_printed_beside_the_figures(gpu_validate):
    step = lambda impl, log2, of_copy: dict(dtype="float32", impl=impl, log2=log2, n=f"2^{log2}", of_copy=of_copy,
                                            us=1.0, gbs=1.0, copy_gbs=1.0, vs_eager=1.0)
    chain = lambda case, impl, batch, vs_eager, vs_graph=None: dict(
        case=case, impl=impl, batch=batch, n_steps=60, backend="triton:fused", median_s=1e-3, min_s=1e-3,
        max_s=1e-3, vs_eager=vs_eager, vs_graph=vs_graph)
    parts = {"step-op": dict(status="ok", summary="", results=dict(rows=[
                 step("cuda", 20, 0.50), step("cuda", 22, 0.95), step("cuda", 24, 0.85), step("eager", 24, 0.30)])),
             "chains": dict(status="ok", summary="", results=dict(rows=[
                 chain("mlp", "fused", 128, 60.0, 4.0), chain("conv", "graph", 64, 3.5)]))}
    targets = {t["key"]: t for t in gpu_validate.evaluate_targets(parts)}
    assert targets["step_of_copy"]["value"] == 0.85 and targets["step_of_copy"]["met"] is False  # the worst size
    assert "2^24" in targets["step_of_copy"]["figure"]
    assert targets["fused_vs_eager_b128"]["met"] and not targets["fused_vs_graph_b128"]["met"]
    assert targets["conv_graph_vs_eager"]["met"]
    state = dict(parts=parts, targets=list(targets.values()), machine={"gpu": "NVIDIA H200"}, dry_run=False,
                 seconds=1.0, time_limit_s=420, started="now", commit="abc")
    report = gpu_validate.render_report(state)
    fused_line = next(line for line in report.splitlines() if "| fused |" in line)
    assert ">= 50x: met" in fused_line and ">= 5x: MISSED" in fused_line
    assert ">= 90%: MISSED" in next(line for line in report.splitlines() if "| 2^24 | cuda |" in line)
    assert "90%" not in next(line for line in report.splitlines() if "| 2^20 | cuda |" in line)  # below 2^22


RAW_CSV = '''==PROF== Disconnected from process 1234
"ID","Process ID","Kernel Name","gpu__time_duration.sum","dram__bytes.sum.per_second","launch__registers_per_thread","sm__warps_active.avg.pct_of_peak_sustained_active","launch__shared_mem_per_block_static"
"","","","usecond","Tbyte/second","register/thread","%","Kbyte"
"0","1234","langevin_step_kernel","61.50","4.12","32","88.5","0"
"1","1234","mlp_chain_kernel","1,210.00","0.05","168","12.40","49.152"
'''


def test_ncu_summary_reads_the_raw_page_in_the_summary_units(gpu_validate):  # benchmarks/ on sys.path
    from harness import ncu

    step, chain = ncu.summarize(RAW_CSV)
    assert step == dict(id="0", kernel="langevin_step_kernel", duration_us=61.5, dram_gbs=pytest.approx(4120.0),
                        registers=32.0, achieved_occupancy_pct=88.5, static_shared_kib=0.0)
    assert chain["duration_us"] == 1210.0 and chain["static_shared_kib"] == pytest.approx(48.0)
    assert ncu.summarize("==ERROR== nothing\n") == []


@pytest.mark.parametrize("output, reason", [
    ("==ERROR== ERR_NVGPUCTRPERM - The user does not have permission", "no permission"),
    ("==PROF== x\n==ERROR== Failed to initialize the profiler: LibraryNotLoaded\n", "LibraryNotLoaded"),
    ("profiled: the step op", None),
])
def test_ncu_says_why_it_could_not_profile(gpu_validate, output, reason):
    from harness import ncu

    found = ncu.unavailable_reason(output)
    assert found is None if reason is None else reason in found
