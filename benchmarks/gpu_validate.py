"""One command for a lent GPU (H100/H200): the install check, the GPU test lanes, the chain, step-op and training
benchmarks and an ncu pass, written as a report, JSON and the log into one folder.

    python benchmarks/gpu_validate.py --out DIR                      # on the GPU machine: about 6.5 minutes
    python benchmarks/gpu_validate.py --dry-run --out DIR            # any machine: the CPU, tiny sizes (about 40 s)
    python benchmarks/gpu_validate.py --out DIR --parts chains,ncu   # some parts again

Each part runs in its own process under its own time budget (the parts are in ``harness/gpu_parts.py``, the
targets and the report in ``harness/gpu_report.py``); a part that fails or runs out of time is recorded and the next
one runs. Exit status 1 when a part failed or timed out, else 0; skipped parts (no ncu; no CUDA in a dry run) and
missed speed targets are reported, not failures (speed is measured, never asserted). DIR receives five files at most
and no folder: ``report.md`` (the figures with issue 18's targets beside them), ``results.json``,
``gpu_validate.log`` (every part's output), ``chains.png`` and ``kernels.ncu-rep``. The report and the JSON are
rewritten after every part, so a run stopped from outside leaves what it had measured. ``--time-limit`` (default
420 s) bounds the whole run: a part gets its budget or, when earlier parts ran long, what is left after the later
parts' expected times, and is skipped below that. A dry run gives each part 300 s (1800 s in all): its times say
nothing about the GPU's.

Parts, their expected time on an H200 and their budget. The times are estimates (nothing here has run on a GPU yet;
the first run replaces them with measurements, in benchmarks/RESULTS.md):

    part            expected  budget  what
    install            10 s     60 s  fl.backend_info(), the CUDA route and build, nvidia-smi, a 3-step chain per
                                      backend and the fused chain
    gpu-tests         100 s    180 s  pytest -m gpu -x tests/ (FASTLANGEVIN_REQUIRE_BACKENDS=cuda,triton; 4
                                      pytest-xdist workers where installed)
    triton-compile     25 s     60 s  torch.compile(fullgraph=True) of the Triton and CUDA step ops against eager,
                                      opcheck of the Triton op, pytest -m gpu -k "compile or opcheck"
    nvrtc              45 s    120 s  FASTLANGEVIN_CUDA_ROUTE=nvrtc pytest -m gpu -x tests/test_langevin_step.py
                                      tests/test_graphs.py (the CUDA lane on the NVRTC route)
    step-op            20 s     60 s  the step op's GB/s against a device copy in the same run, float32 and
                                      bfloat16, 2^16 ... 2^26 elements (cuda, triton, eager, reference)
    chains             90 s    180 s  MLP 100-200-200-1, K = 60, B = 128, 1024, 8192: eager, torch.compile,
                                      step-op, CUDA graph, fused Triton; conv E(G(z)), K = 20, B = 64: eager,
                                      step-op, CUDA graph (torch.compile's compile time is most of it)
    training           60 s    150 s  one tilt and one LEBM training iteration, library vs eager, through the CLI
    ncu                45 s    120 s  ncu over the CUDA and Triton step kernels (2^24 floats) and the fused Triton
                                      chain (B = 1024, K = 60)

Add about a minute for the machine to start. Without a build, ``pip install -e .`` there takes about a minute
more; carry a prebuilt extension instead. Python on the GPU machines is 3.12, so the modules must be built for
CPython 3.12 (a cpython-311 build does not load there): ``benchmarks/build_for_device.sh`` builds
``fastlangevin/_C{,_avx2,_avx512}.cpython-312-x86_64-linux-gnu.so`` (the CPU levels, picked there at run time) and
``fastlangevin/_C_cuda.cpython-312-x86_64-linux-gnu.so`` (nvcc, sm_90 SASS + PTX, cudart linked statically) into
this checkout with a Python 3.12 found here (pyenv), and the device tool's ``run`` carries them (they are
git-ignored, so only ``carry`` takes them along):

    carry: ["fastlangevin/_C.cpython-312-x86_64-linux-gnu.so", "fastlangevin/_C_avx2.cpython-312-x86_64-linux-gnu.so",
            "fastlangevin/_C_avx512.cpython-312-x86_64-linux-gnu.so",
            "fastlangevin/_C_cuda.cpython-312-x86_64-linux-gnu.so"]
    command:
      export PYTHONPATH=$PWD PYTHONUNBUFFERED=1; python3 -c "import fastlangevin._C, fastlangevin._C_cuda" ||
      pip install --no-build-isolation --no-deps -e . > $OUT/build.log 2>&1 || { tail -30 $OUT/build.log; exit 1; };
      python3 benchmarks/gpu_validate.py --out $OUT --time-limit 420

with ``timeout_s`` 540. The import check falls back to building there when the carried modules do not load (another
glibc, a missing libgomp). ``python3`` there is the image's, with torch 2.11, Triton 3.6, CuPy and no package index.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(HERE) not in sys.path:  # harness/ and step_op.py, also when this file is loaded as a module
    sys.path.insert(0, str(HERE))

from harness.gpu_parts import ARTIFACTS  # noqa: E402  (these three import no torch)
from harness.gpu_report import FAILED_STATUSES, evaluate_targets, render_report, verdict
from harness.tables import format_table, write_json

REPORT, RESULTS, LOG = "report.md", "results.json", "gpu_validate.log"


@dataclasses.dataclass(frozen=True)
class Part:
    name: str
    expected_s: int  # on an H200 (an estimate until measured)
    budget_s: int
    what: str
    dry_run_budget_s: int = 300  # a dry run's tiny sizes on a slow, shared CPU (CI) are timed by nothing above


PARTS = (
    Part("install", 10, 60, "fl.backend_info(), the CUDA route and build, a 3-step chain per backend"),
    Part("gpu-tests", 100, 180, "pytest -m gpu -x tests/"),
    Part("triton-compile", 25, 60, "torch.compile of the Triton and CUDA step ops, opcheck, -k 'compile or opcheck'"),
    Part("nvrtc", 45, 120, "FASTLANGEVIN_CUDA_ROUTE=nvrtc pytest -m gpu -x (step op, graphs)"),
    Part("step-op", 20, 60, "step op GB/s vs a device copy, float32 and bfloat16, 2^16 ... 2^26"),
    Part("chains", 90, 180, "MLP chain B = 128, 1024, 8192 (5 implementations); conv E(G(z)) B = 64"),
    Part("training", 60, 150, "one tilt and one LEBM iteration, library vs eager (CLI)"),
    Part("ncu", 45, 120, "ncu over the step kernels and the fused Triton chain"),
)
PART_NAMES = tuple(p.name for p in PARTS)


# ---------------------------------------------------------------------------------------------------------------
# The parent: runs the parts, evaluates the targets, writes the report.


def run_process(command: list[str], log_path: Path, timeout: float, env: dict) -> int | None:
    """Runs ``command`` with its output appended to ``log_path``; the exit code, or None when it ran past
    ``timeout`` seconds and was killed with everything it started (its own process group)."""
    with open(log_path, "ab") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT,
                                   env=env, preexec_fn=os.setpgrp)  # its own group: killpg stops what it started
        try:
            return process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            return None
        except BaseException:  # interrupted: take the part's processes down too
            os.killpg(process.pid, signal.SIGKILL)
            raise


def time_for(part: Part, remaining: float, later: list[Part]) -> float:
    """Seconds ``part`` may run: its budget, or what is left once the later parts' expected times are kept."""
    return min(part.budget_s, remaining - sum(p.expected_s for p in later))


def run_part(part: Part, args, work: Path, out: Path, timeout: float, env: dict) -> dict:
    log_path = out / LOG
    with open(log_path, "a") as log:
        log.write(f"\n===== {part.name} ({datetime.datetime.now():%H:%M:%S}; up to {timeout:.0f} s) =====\n")
    offset = log_path.stat().st_size
    command = [sys.executable, str(Path(__file__).resolve()), "--child", part.name, "--work", str(work)]
    started = time.perf_counter()
    returncode = run_process(command + (["--dry-run"] if args.dry_run else []), log_path, timeout, env)
    seconds = time.perf_counter() - started
    saved = work / f"{part.name}.json"
    record = json.loads(saved.read_text()) if saved.exists() else dict(status="failed", summary="", results={})
    if returncode is None:
        record.update(status="timed out", summary=f"ran past its {timeout:.0f} s and was stopped; "
                                                  f"what it had measured is kept. {record['summary']}".strip())
    elif returncode != 0 or record["status"] == "running":
        record.update(status="failed", summary=f"exit {returncode}: {_last_error(log_path, offset)}")
    artifact = ARTIFACTS.get(part.name)
    if artifact and (work / artifact).exists():
        shutil.copy(work / artifact, out / artifact)
        record["artifact"] = artifact
    record.update(what=part.what, seconds=seconds, budget_s=part.budget_s, expected_s=part.expected_s,
                  limit_s=timeout)
    if record["status"] in FAILED_STATUSES:
        with open(log_path) as log:
            log.seek(offset)
            tail = log.read().splitlines()[-15:]
        print("\n".join(f"    | {line}" for line in tail))
    return record


def _last_error(log_path: Path, offset: int) -> str:
    with open(log_path) as log:
        log.seek(offset)
        lines = [line.strip() for line in log.read().splitlines() if line.strip()]
    return lines[-1][:300] if lines else "no output"


def write_outputs(state: dict, out: Path) -> None:
    state["targets"] = evaluate_targets(state["parts"])
    write_json(str(out / RESULTS), state)
    tmp = out / f"{REPORT}.tmp"
    tmp.write_text(render_report(state))
    os.replace(tmp, out / REPORT)


def _commit() -> str | None:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() or None


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=f"Parts: {', '.join(PART_NAMES)}. See the module docstring for times.")
    parser.add_argument("--out", help="folder for report.md, results.json, gpu_validate.log, chains.png, "
                                      "kernels.ncu-rep (created)")
    parser.add_argument("--dry-run", action="store_true",
                        help="on the CPU at tiny sizes; parts that need CUDA are reported as skipped")
    parser.add_argument("--parts", default=",".join(PART_NAMES), help="comma-separated subset, in any order")
    parser.add_argument("--time-limit", type=float, default=None,
                        help="seconds for the whole run (default 420; a dry run 1800)")
    parser.add_argument("--keep-work", action="store_true", help="keep the work folder (run folders, JUnit XML)")
    parser.add_argument("--child", choices=PART_NAMES, help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--profile-kernels", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        from harness.gpu_parts import run_part as run_here
        run_here(args.child, Path(args.work), args.dry_run)
        return 0
    if args.profile_kernels:
        from harness.gpu_parts import profile_kernels
        profile_kernels()
        return 0
    if not args.out:
        parser.error("--out DIR is required")
    chosen = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(chosen) - set(PART_NAMES))
    if unknown or not chosen:
        parser.error(f"--parts: unknown {unknown or args.parts!r}; choose from {','.join(PART_NAMES)}")
    if args.time_limit is None:
        args.time_limit = 1800.0 if args.dry_run else 420.0
    if args.time_limit <= 0:
        parser.error(f"--time-limit must be > 0 seconds, got {args.time_limit}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        parser.error(f"--out {args.out}: exists and is not a folder")
    import torch  # after the argument checks: a user error costs no torch import

    if not args.dry_run and not torch.cuda.is_available():
        parser.error("torch sees no CUDA device: on a machine without a GPU run with --dry-run")
    out.mkdir(parents=True, exist_ok=True)
    from harness.machine import machine

    deadline = time.perf_counter() + args.time_limit
    work = Path(tempfile.mkdtemp(prefix="gpu_validate-"))
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if args.dry_run:  # tiny problems gain nothing from threads, and a shared CPU loses to them
        env.update(OMP_NUM_THREADS="1")
    state = dict(dry_run=args.dry_run, started=f"{datetime.datetime.now():%Y-%m-%d %H:%M:%S}", commit=_commit(),
                 time_limit_s=args.time_limit, seconds=0.0, machine=machine(), parts={})
    (out / LOG).write_text(f"gpu_validate {'--dry-run ' if args.dry_run else ''}{state['started']}: parts "
                           f"{', '.join(chosen)}\n")
    started = time.perf_counter()
    selected = [p for p in PARTS if p.name in chosen]
    if args.dry_run:  # the budgets and expected times are the GPU's
        selected = [dataclasses.replace(p, budget_s=p.dry_run_budget_s, expected_s=0) for p in selected]
    print(f"gpu_validate{' (dry run)' if args.dry_run else ''}: {len(selected)} parts, {args.time_limit:.0f} s; "
          f"writing {out}", flush=True)
    try:
        for i, part in enumerate(selected):
            timeout = time_for(part, deadline - time.perf_counter(), selected[i + 1:])
            if timeout < max(1, min(part.expected_s, 15)):
                record = dict(status="skipped", summary=f"out of time ({timeout:.0f} s left for it)", results={})
            else:
                print(f"  {part.name:<15} up to {timeout:3.0f} s ...", end="", flush=True)
                record = run_part(part, args, work, out, timeout, env)
                print(f" {record['status']} ({record['seconds']:.0f} s) {record['summary'][:150]}", flush=True)
            state["parts"][part.name] = record
            state["seconds"] = time.perf_counter() - started
            write_outputs(state, out)
    finally:
        if not args.keep_work:
            shutil.rmtree(work, ignore_errors=True)
    print()
    print(format_table([dict(part=n, status=p["status"], seconds=p.get("seconds"), summary=p["summary"][:110])
                        for n, p in state["parts"].items()],
                       [("part", "part", "s"), ("status", "status", "s"), ("seconds", "s", ".0f"),
                        ("summary", "summary", "s")]))
    print()
    print(format_table([dict(t, verdict=verdict(t["met"])) for t in state["targets"]],
                       [("target", "target (issue 18)", "s"), ("figure", "figure", "s"), ("verdict", "", "s")]))
    failed = [n for n, p in state["parts"].items() if p["status"] in FAILED_STATUSES]
    print(f"\n{'FAILED: ' + ', '.join(failed) if failed else 'no part failed'}; report: {out / REPORT}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

