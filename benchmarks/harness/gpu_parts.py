"""The parts of ``gpu_validate.py``, each run in its own process: ``part_NAME(ctx)`` measures or tests one thing
and saves what it found through ``ctx.save`` as it goes (a part stopped by its budget still leaves its figures).

A part's status: ``ok``, ``failed`` (it ran and something is wrong), ``skipped`` (it cannot run here: no CUDA in a
dry run, no ncu). ``ctx.dry_run``: the CPU at tiny sizes, the same code as on the GPU wherever the CPU can run it.
"""

from __future__ import annotations

import itertools
import os
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ElementTree
from pathlib import Path

from harness.tables import write_json

ROOT = Path(__file__).resolve().parents[2]  # the checkout: pytest runs here
GPU_VALIDATE = ROOT / "benchmarks" / "gpu_validate.py"  # also the program ncu profiles (--profile-kernels)
ARTIFACTS = {"chains": "chains.png", "ncu": "kernels.ncu-rep"}  # a part's file in its work folder


class Context:
    """What a part's process knows: dry run or not, the torch device, its work folder, and ``save`` for its
    results (``WORK/NAME.json``; saved as it goes, so a part stopped by its budget still leaves its figures)."""

    def __init__(self, name: str, work: Path, dry_run: bool):
        self.name, self.work, self.dry_run = name, work, dry_run
        self.results: dict = {}
        self.status, self.summary = "running", ""

    @property
    def device(self):
        import torch
        return torch.device("cpu" if self.dry_run else "cuda")

    def save(self, status: str | None = None, summary: str | None = None, **results) -> None:
        self.results.update(results)
        self.status = status or self.status
        self.summary = summary if summary is not None else self.summary
        write_json(str(self.work / f"{self.name}.json"),
                   dict(status=self.status, summary=self.summary, results=self.results))


def part_install(ctx: Context) -> None:
    import torch

    import fastlangevin as fl
    from fastlangevin.backends import backend_status
    from harness.machine import machine

    info = fl.backend_info()
    print(info)
    ctx.save(backend_info=str(info), extension=info.extension, machine=machine(), nvidia_smi=_nvidia_smi())
    device = ctx.device
    required = ("cpu",) if device.type == "cpu" else ("cuda", "triton")
    missing = {b: backend_status(b, device.type).reason for b in required
               if not backend_status(b, device.type).available}
    chains, errors = {}, []
    for backend in ("reference", "cpu", "cuda", "triton"):
        if not backend_status(backend, device.type).available:
            continue
        z0 = torch.randn(8, 4, device=device)
        try:
            z, step = fl.langevin(lambda z: 0.5 * (z * z).sum(1), z0, 3, 0.1, seed=0, backend=backend,
                                  return_info=True)
            chains[backend] = step.backend if bool(torch.isfinite(z).all()) else "non-finite result"
        except Exception as error:  # recorded, and the part fails
            errors.append(f"{backend}: {type(error).__name__}: {error}")
    energy = fl.MLPEnergy((4, 16, 1), "leaky_relu", 0.2).to(device)
    try:
        _, fused = fl.langevin(energy, torch.randn(8, 4, device=device), 3, 0.1, seed=0, return_info=True)
        chains["fused (MLPEnergy)"] = fused.backend
    except Exception as error:
        errors.append(f"fused: {type(error).__name__}: {error}")
    problems = [f"{b} unavailable: {why}" for b, why in missing.items()] + errors
    route = info.extension.get("cuda_route")
    summary = f"chains ran: {', '.join(f'{k} -> {v}' for k, v in chains.items())}; CUDA route: {route}"
    ctx.save("failed" if problems else "ok", "; ".join(problems) or summary, chains=chains, errors=errors,
             missing=missing)


def _nvidia_smi() -> str | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    query = "name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,utilization.gpu"
    done = subprocess.run([smi, f"--query-gpu={query}", "--format=csv"], capture_output=True, text=True, timeout=30)
    return (done.stdout or done.stderr).strip()


def _pytest(ctx: Context, lane: str, args: list[str], env: dict | None = None) -> dict:
    """Runs ``pytest ARGS`` (output into the log) and returns its counts from the JUnit XML: tests, passed, failed,
    errors, skipped, the first failures, the exit code."""
    junit = ctx.work / f"{ctx.name}-{lane}.xml"
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", f"--junitxml={junit}", *args]
    print(f"$ {' '.join(command)}", flush=True)
    returncode = subprocess.run(command, cwd=ROOT, env={**os.environ, **(env or {})}).returncode
    counts = dict(returncode=returncode, command=" ".join(["python", *command[1:]]), tests=0, failed=0, errors=0,
                  skipped=0, failures=[])
    if junit.exists():
        for suite in ElementTree.parse(junit).getroot().iter("testsuite"):
            for key, attribute in (("tests", "tests"), ("failed", "failures"), ("errors", "errors"),
                                   ("skipped", "skipped")):
                counts[key] += int(suite.get(attribute, 0))
            for case in suite.iter("testcase"):
                bad = case.find("failure") if case.find("failure") is not None else case.find("error")
                if bad is not None and len(counts["failures"]) < 10:
                    message = (bad.get("message") or "").splitlines()
                    counts["failures"].append(f"{case.get('classname')}::{case.get('name')}: "
                                              f"{message[0][:200] if message else ''}")
    counts["passed"] = counts["tests"] - counts["failed"] - counts["errors"] - counts["skipped"]
    return counts


def _lane_status(counts: dict) -> tuple[str, str]:
    text = (f"{counts['passed']} passed, {counts['failed']} failed, {counts['errors']} errors, "
            f"{counts['skipped']} skipped")
    if counts["returncode"] == 5 or counts["tests"] == 0:
        return "failed", f"no tests ran (pytest exit {counts['returncode']})"
    ok = counts["returncode"] == 0 and counts["failed"] == counts["errors"] == 0
    return ("ok" if ok else "failed"), text + ("" if ok else f" (pytest exit {counts['returncode']})")


def _xdist_workers() -> list[str]:
    import importlib.util
    return ["-n", "4"] if importlib.util.find_spec("xdist") is not None else []


def part_gpu_tests(ctx: Context) -> None:
    if ctx.dry_run:  # the lane's command on one file (its GPU tests skip here), so the code path cannot rot
        counts = _pytest(ctx, "gpu", ["-m", "gpu", "-x", "tests/test_graphs.py"])
        ctx.save("skipped", f"needs CUDA; dry run: the lane's pytest command ran on tests/test_graphs.py "
                            f"({counts['tests']} collected, {counts['skipped']} skipped)", lanes={"gpu": counts})
        return
    counts = _pytest(ctx, "gpu", ["-m", "gpu", "-x", *_xdist_workers(), "tests/"],
                     {"FASTLANGEVIN_REQUIRE_BACKENDS": "cuda,triton"})
    ctx.save(*_lane_status(counts), lanes={"gpu": counts})


def part_triton_compile(ctx: Context) -> None:
    if ctx.dry_run:
        ctx.save("skipped", "needs CUDA (torch.compile of a Triton op does not trace under TRITON_INTERPRET=1)")
        return
    import torch

    import fastlangevin as fl

    checks, problems = {}, []
    z = torch.randn(1000, 100, device="cuda")
    grad = torch.randn_like(z)
    for backend in ("triton", "cuda"):
        step = lambda z, g, backend=backend: fl.ops.langevin_step(z, g, 0.01, seed=7, counter=3, backend=backend)
        try:
            torch._dynamo.reset()
            compiled = torch.compile(step, fullgraph=True)
            torch.testing.assert_close(compiled(z, grad), step(z, grad), rtol=0, atol=0)  # one kernel: same bits
            checks[f"compile {backend}"] = "ok: fullgraph, bit-equal to eager"
        except Exception as error:
            checks[f"compile {backend}"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
            problems.append(f"torch.compile of the {backend} step op")
    try:
        from fastlangevin.ops.langevin_step import PRIOR_NORMAL, make_rng_state
        op = torch.ops.fastlangevin.langevin_step_triton.default
        torch.library.opcheck(op, (z, grad, make_rng_state(7, 3, "cuda"), 0.01, 0.1, PRIOR_NORMAL, None, None))
        checks["opcheck langevin_step_triton"] = "ok"
    except Exception as error:
        checks["opcheck langevin_step_triton"] = f"{type(error).__name__}: {str(error).splitlines()[0][:300]}"
        problems.append("opcheck of the Triton step op")
    ctx.save(checks=checks)
    counts = _pytest(ctx, "compile", ["-m", "gpu", "-k", "compile or opcheck", "tests/"])
    lane_status, lane_text = _lane_status(counts)
    if counts["returncode"] == 5:
        lane_status, lane_text = "ok", "pytest -m gpu -k 'compile or opcheck' selected no test"
    if lane_status != "ok":
        problems.append(f"pytest: {lane_text}")
    ctx.save("failed" if problems else "ok", "; ".join(problems) or f"{len(checks)} checks ok; {lane_text}",
             lanes={"compile": counts})


def part_nvrtc(ctx: Context) -> None:
    if ctx.dry_run:
        ctx.save("skipped", "needs CUDA")
        return
    counts = _pytest(ctx, "nvrtc", ["-m", "gpu", "-x", *_xdist_workers(), "tests/test_langevin_step.py",
                                    "tests/test_graphs.py"],
                     {"FASTLANGEVIN_CUDA_ROUTE": "nvrtc", "FASTLANGEVIN_REQUIRE_BACKENDS": "cuda"})
    ctx.save(*_lane_status(counts), lanes={"nvrtc": counts})


def part_step_op(ctx: Context) -> None:
    import torch

    import step_op

    sizes = range(10, 13, 2) if ctx.dry_run else range(16, 27, 2)
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        rows += step_op.run(str(ctx.device), dtype, sizes, repeats=3 if ctx.dry_run else 15)
        ctx.save(rows=rows)
    compiled = sorted({r["impl"] for r in rows} - {"eager", "reference"})
    ctx.save("ok", f"{len(rows)} rows; compiled backends: {', '.join(compiled) or 'none'}")


def part_chains(ctx: Context) -> None:
    from harness.measure import ChainSpec, run_specs
    from harness.models import CONV_STEP_SIZE, MLP_DIMS, MLP_STEP_SIZE
    from harness.plots import plot

    mlp, compiler = ("mlp", MLP_DIMS), "aot_eager" if ctx.dry_run else "inductor"
    batches, mlp_steps = ((8,), 2) if ctx.dry_run else ((128, 1024, 8192), 60)
    conv_batch, conv_steps = (2, 1) if ctx.dry_run else (64, 20)
    specs = [ChainSpec("mlp", impl, mlp, batch, mlp_steps, MLP_STEP_SIZE, compiler)
             for batch in batches for impl in ("eager", "compile", "step-op", "graph", "fused")]
    specs += [ChainSpec("conv", impl, ("conv",), conv_batch, conv_steps, CONV_STEP_SIZE)
              for impl in ("eager", "step-op", "graph")]
    rows = run_specs(specs, ctx.device, repeats=2 if ctx.dry_run else 10, max_seconds=0.5 if ctx.dry_run else 5.0,
                     min_seconds=0.0 if ctx.dry_run else 0.5, log=print, on_group=lambda rows: ctx.save(rows=rows))
    plot(rows, str(ctx.work / ARTIFACTS["chains"]))
    ran = [r for r in rows if r.get("median_s")]
    ctx.save("ok", f"{len(ran)} of {len(rows)} rows ran", rows=rows)


def part_training(ctx: Context) -> None:
    from harness.training import iteration_seconds, time_command

    work = ctx.work / "training"
    os.environ["FASTLANGEVIN_CACHE"] = str(work / "cache")  # a metric's classifier, trained once in this part
    device = str(ctx.device)
    numbers = itertools.count()
    fresh = lambda: str(work / f"run{next(numbers)}")  # a new run folder per command
    base = str(work / "base")
    time_command(["train-base", "vae", "--data", "25gaussians", "--out", base, "--steps", "2" if ctx.dry_run
                  else "50", "--batch-size", "32" if ctx.dry_run else "256", "--device", device], device)
    once = str(10**6)  # evaluation only at the end of a run (the same in every run: it cancels)

    def tilt(sampler: str, steps: int) -> list[str]:
        out = fresh()
        shutil.copytree(base, out)
        tiny = ["--batch-size", "8", "--n-steps", "2"] if ctx.dry_run else []
        return ["tilt", out, "--steps", str(steps), "--sampler", sampler, "--device", device, "--eval-every", once,
                "--n-eval", "32" if ctx.dry_run else "256", "--sample-steps", "2" if ctx.dry_run else "20", *tiny]

    def lebm(sampler: str, steps: int) -> list[str]:
        return ["train-prior", "lebm", "--data", "digits", "--out", fresh(), "--steps", str(steps), "--sampler",
                sampler, "--device", device, "--eval-every", once, "--n-eval", "100"]

    small, big = (1, 3) if ctx.dry_run else (2, 32)
    trainers = {"tilt (25gaussians VAE, B = 256, K = 60)": tilt, "lebm (digits, B = 100, K = 20 + 60)": lebm}
    if ctx.dry_run:
        trainers = {"tilt (tiny)": tilt}
        ctx.save(skipped={"lebm": "left out of the dry run: its evaluation trains the digits feature classifier "
                                  "(minutes on 2 cores)"})
    measured, problems, warm_up = {}, [], not ctx.dry_run
    ctx.save(small_steps=small, big_steps=big, warm_up=warm_up)
    for trainer, command in trainers.items():
        try:
            measured[trainer] = iteration_seconds(command, device, small, big, warm_up=warm_up)
        except Exception as error:
            measured[trainer] = {"error": f"{type(error).__name__}: {error}"}
            problems.append(f"{trainer.split()[0]}: {type(error).__name__}: {str(error)[:300]}")
        ctx.save(trainers=measured)
    summary = "; ".join(f"{name.split()[0]}: eager / library {m['eager_vs_library']:.2f}x"
                        for name, m in measured.items() if m.get("eager_vs_library"))
    ctx.save("failed" if problems else "ok", "; ".join(problems) or summary)


def part_ncu(ctx: Context) -> None:
    from harness import ncu

    if ctx.dry_run:
        ctx.save("skipped", "needs CUDA")
        return
    exe = ncu.find_ncu()
    if exe is None:
        ctx.save("skipped", "ncu not found (PATH, /usr/local/cuda/bin, /opt/nvidia/nsight-compute)")
        return
    report = str(ctx.work / ARTIFACTS["ncu"])
    command = ncu.profile_command(exe, report, [sys.executable, str(GPU_VALIDATE), "--profile-kernels"])
    print(f"$ {' '.join(command)}", flush=True)
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output = []
    for line in process.stdout:  # into the log as it comes, and kept to read why it failed
        print(line, end="", flush=True)
        output.append(line)
    returncode, output = process.wait(), "".join(output)
    if returncode != 0 or not Path(report).exists():
        why = ncu.unavailable_reason(output)
        if why is not None and "Traceback" not in output:
            ctx.save("skipped", f"ncu could not profile: {why}")
        else:
            ctx.save("failed", f"the profiled program failed under ncu (exit {returncode}); see the log")
        return
    exported = subprocess.run(ncu.export_command(exe, report), capture_output=True, text=True)
    kernels = ncu.summarize(exported.stdout)
    if not kernels:
        print(exported.stdout[:4000] + exported.stderr[:2000])
        ctx.save("failed", "ncu ran, but its raw CSV export gave no kernel (kernels.ncu-rep has the report)")
        return
    ctx.save("ok", f"{len(kernels)} kernels profiled", kernels=kernels)


def profile_kernels() -> None:
    """The program ncu profiles: after warm-up, one launch each between cudaProfilerStart/Stop of the CUDA and Triton
    step kernels on 2^24 float32 elements and of the fused Triton chain (MLP 100-200-200-1, B = 1024, K = 60)."""
    import torch

    import fastlangevin as fl
    from fastlangevin.backends import backend_status
    from harness.models import MLP_STEP_SIZE, MLP_STEPS, MLPModel

    z = torch.randn(2**24 // 64, 64, device="cuda")
    grad = torch.randn_like(z)
    backends = [b for b in ("cuda", "triton") if backend_status(b, "cuda").available]
    steps = {b: (lambda b=b: fl.ops.langevin_step(z, grad, 0.01, 0.1, seed=1, backend=b)) for b in backends}
    model, z0 = MLPModel(device="cuda"), torch.randn(1024, 100, device="cuda")
    chain = lambda: fl.langevin(model.energy, z0, MLP_STEPS, MLP_STEP_SIZE, seed=0)
    for run in (*steps.values(), chain, *steps.values(), chain):  # compile, then warm
        run()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    for run in (*steps.values(), chain):
        run()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled: the step op ({', '.join(backends)}) on 2^24 float32 elements, then the fused chain")


PART_FUNCTIONS = {"install": part_install, "gpu-tests": part_gpu_tests, "triton-compile": part_triton_compile,
                  "nvrtc": part_nvrtc, "step-op": part_step_op, "chains": part_chains, "training": part_training,
                  "ncu": part_ncu}


def run_part(name: str, work: Path, dry_run: bool) -> None:
    """Runs part ``name`` in this process; its results land in ``work/NAME.json``."""
    ctx = Context(name, work, dry_run)
    ctx.save()
    PART_FUNCTIONS[name](ctx)
    if ctx.status == "running":
        ctx.save("ok")

