"""Run-time dispatch of the CPU kernels (csrc/include/fastlangevin/cpu_features.h says how it works): the level is
the best this CPU and OS run, ``FASTLANGEVIN_CPU_LEVEL`` forces it down, every level this machine runs passes the
kernel tests against the reference, and the build runs its kernel tests on an emulated CPU without AVX-512 (qemu user
mode)."""

import ast
import os
import platform
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from fastlangevin import _ext

ROOT = Path(__file__).resolve().parents[1]
LEVELS = list(_ext.CPU_LEVELS)
BUILD = _ext.cpu_build()
DISPATCHED = BUILD.module is not None and BUILD.level in LEVELS  # not a -march=native build
SUPPORTED = _ext.cpu_features()["level"] if DISPATCHED else None
HERE = LEVELS[:LEVELS.index(SUPPORTED) + 1] if DISPATCHED else []  # the levels this machine runs
QEMU = shutil.which("qemu-x86_64-static") or shutil.which("qemu-x86_64")
# The kernels' own tests (step op, fused chain through the API and called directly, noise) against the reference,
# without the Triton lanes (the interpreter does not touch the C++ kernels).
KERNEL_TESTS = ["tests/test_langevin_step.py", "tests/test_mlp_chain.py", "tests/test_mlp_chain_kernel.py",
                "tests/test_philox.py"]

needs_dispatch = pytest.mark.skipif(not DISPATCHED, reason=f"no run-time dispatch in this build: {BUILD.description}")


def _env(level: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != _ext.CPU_LEVEL_ENV}
    if level is not None:
        env[_ext.CPU_LEVEL_ENV] = level
    return env


def _python(code: str, level: str | None, prefix=()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-c", code], capture_output=True, text=True, env=_env(level),
                          timeout=1800)


REPORT = textwrap.dedent("""
    import fastlangevin as fl
    from fastlangevin import _ext
    build = _ext.cpu_build()
    print("LEVEL", build.level)
    print("MODULE", build.module.__name__ if build.module else None)
    print("BUILT", build.module.build_info()["cpu_level"] if build.module else None)
    print("INFO", " ".join(str(fl.backend_info()).split()))
""")


def _report(level: str | None) -> dict:
    result = _python(REPORT, level)
    assert result.returncode == 0, result.stderr
    return dict(line.split(" ", 1) for line in result.stdout.splitlines())


@needs_dispatch
def test_default_is_the_best_level_this_cpu_runs():
    out = _report(None)
    assert out["LEVEL"] == SUPPORTED
    assert out["MODULE"] == f"fastlangevin.{_ext.CPU_LEVELS[SUPPORTED]}" and out["BUILT"] == SUPPORTED
    assert f"CPU level {SUPPORTED} (the best this CPU runs)" in out["INFO"]


@needs_dispatch
@pytest.mark.parametrize("level", LEVELS)
def test_the_level_can_be_forced_down(level):
    out = _report(level)
    expected = level if LEVELS.index(level) <= LEVELS.index(SUPPORTED) else SUPPORTED
    assert out["LEVEL"] == expected and out["BUILT"] == expected
    if expected == level:
        assert f"CPU level {level} ({_ext.CPU_LEVEL_ENV}={level})" in out["INFO"]
    else:  # asked above what this CPU runs: the best it runs, and the backend info says so
        assert f"CPU level {expected} (the best this CPU runs, not {level})" in out["INFO"]


@needs_dispatch
@pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="the AVX levels are built on x86-64 only")
def test_every_level_is_built_here():
    """Each level's module loads, whatever this CPU runs (importing runs no kernel), and reports its level."""
    for level, name in _ext.CPU_LEVELS.items():
        module, why = _ext._load(name)
        assert module is not None, why
        assert module.build_info()["cpu_level"] == level


def test_a_bad_level_is_a_clear_error():
    code = textwrap.dedent("""
        import torch, fastlangevin as fl
        from fastlangevin.backends import backend_status
        print("STATUS", backend_status("cpu", "cpu").reason)
        try:
            fl.langevin(lambda z: (z ** 2).sum(1), torch.zeros(2, 3), 2, 0.1, backend="cpu")
        except fl.BackendUnavailableError as error:
            print("ERROR", " ".join(str(error).split()))
    """)
    result = _python(code, "avx3")
    assert result.returncode == 0, result.stderr
    out = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    expected = f"{_ext.CPU_LEVEL_ENV} must be one of baseline, avx2, avx512 or unset, got 'avx3'"
    assert expected in out["STATUS"] and expected in out["ERROR"]


def _kernel_tests(tests: list[str], level: str | None, prefix=()) -> str:
    """Runs ``tests`` in a fresh interpreter (under ``prefix``, e.g. an emulator) with the CPU lane required and
    ``FASTLANGEVIN_CPU_LEVEL=level``; returns pytest's output after checking that they all passed."""
    env = {**_env(level), "FASTLANGEVIN_REQUIRE_BACKENDS": "cpu"}
    result = subprocess.run([*prefix, sys.executable, "-m", "pytest", "-p", "no:cacheprovider",
                             "-k", "not triton", *tests], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=3600)
    tail = f"rc {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-2000:]}"
    assert result.returncode == 0, tail
    assert re.search(r"\b\d+ passed", result.stdout) and " failed" not in result.stdout, tail
    return result.stdout


@needs_dispatch
@pytest.mark.parametrize("level", LEVELS)
def test_kernel_tests_pass_at_every_level_this_cpu_runs(level):
    """The step op's, the fused chain's and the noise's tests, against the reference, with the kernels of ``level``
    (the pytest header names the module that ran). The best level is the default: the rest of the suite runs it."""
    if level not in HERE:
        pytest.skip(f"this CPU runs at most {SUPPORTED}")
    if level == SUPPORTED:
        pytest.skip("the default level: the rest of the suite runs it (test_default_is_the_best_level_this_cpu_runs)")
    out = _kernel_tests(KERNEL_TESTS, level)
    assert f"fastlangevin.{_ext.CPU_LEVELS[level]}, CPU level {level} (" in out, out[:2000]


def _emulator(cpu: str) -> tuple[str, ...]:
    """The command prefix that runs a program on an emulated ``cpu``; skips without qemu, unless
    FASTLANGEVIN_REQUIRE_QEMU=1 (.ci/run installs it)."""
    if QEMU is None:
        why = "qemu user mode is not installed (apt-get install qemu-user-static)"
        if os.environ.get("FASTLANGEVIN_REQUIRE_QEMU") == "1":
            pytest.fail(f"FASTLANGEVIN_REQUIRE_QEMU=1: {why}")
        pytest.skip(why)
    return (QEMU, "-cpu", cpu)


# Emulated CPUs (qemu user mode) without AVX-512: Haswell (x86-64-v3, the avx2 level) runs every kernel test; Nehalem
# (x86-64-v2: NumPy's wheels need it, so the oldest CPU torch runs on) the baseline level's step op and fused chain
# only, as emulation is slow (the noise's own tests run at that level natively, above).
EMULATED = [("Haswell", "avx2", KERNEL_TESTS),
            ("Nehalem", "baseline", ["tests/test_langevin_step.py", "tests/test_mlp_chain_kernel.py"])]


@needs_dispatch
@pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates an x86-64 CPU")
@pytest.mark.parametrize("cpu, level, tests", EMULATED, ids=[cpu for cpu, _, _ in EMULATED])
def test_kernel_tests_pass_on_an_emulated_cpu_without_avx512(cpu, level, tests):
    """The same build and its kernel tests on an emulated CPU without AVX-512 (a minute or two each): the dispatch
    picks the level that CPU runs, and the kernels match the reference. A -march=native build made on an AVX-512
    machine dies here with SIGILL (rc 132)."""
    out = _kernel_tests(tests, None, prefix=_emulator(cpu))
    assert f"fastlangevin.{_ext.CPU_LEVELS[level]}, CPU level {level} (the best this CPU runs)" in out, out[:2000]


BF16_WITHOUT_UNITS = textwrap.dedent("""
    import torch
    import fastlangevin as fl
    from fastlangevin import _ext
    print("UNITS", _ext.load_cpu().matrix_units())
    torch.manual_seed(0)
    energy = fl.MLPEnergy((30, 50, 40, 1), "silu").to(torch.bfloat16)
    z0 = torch.randn(20, 30)
    z, info = fl.langevin(energy, z0, 6, 0.02, seed=5, return_info=True)
    print("BACKEND", info.backend)
    print("CHAIN", " ".join(fl.backend_info().bf16_chain["cpu"].split()))
    assert torch.equal(z, fl.langevin(energy.float(), z0, 6, 0.02, seed=5))  # the float32 kernel, upcast weights
    print("OK")
""")


@needs_dispatch
@pytest.mark.skipif(platform.machine() != "x86_64", reason="emulates an x86-64 CPU")
def test_bfloat16_chain_on_an_emulated_cpu_without_bfloat16_units():
    """On a CPU without AVX512-BF16 and AMX-BF16 (emulated Haswell) a bfloat16 energy's chain runs the float32
    kernel on its upcast weights and says so (the bfloat16 units are built into the AVX-512 level's module only)."""
    result = _python(BF16_WITHOUT_UNITS, None, prefix=_emulator("Haswell"))
    assert result.returncode == 0, f"rc {result.returncode}\n{result.stdout}\n{result.stderr[-3000:]}"
    out = dict(line.split(" ", 1) for line in result.stdout.splitlines() if " " in line)
    assert out["BACKEND"] == "cpu:fused:bf16-fp32", result.stdout
    assert out["UNITS"].count("not in this module") == 2 and "amx_bf16:" in out["CHAIN"], result.stdout
    assert result.stdout.rstrip().endswith("OK")


def test_the_level_tables_agree():
    """The levels are named in cpu_features.h (C++), setup.py (the modules to build) and _ext.CPU_LEVELS (the order
    and module of each); CMakeLists.txt's are checked by test_every_level_is_built_here."""
    header = (ROOT / "csrc/include/fastlangevin/cpu_features.h").read_text()
    enum = re.search(r"enum CpuLevel \{([^}]*)\}", header).group(1)
    assert [int(v) for v in re.findall(r"= (\d+)", enum)] == list(range(len(LEVELS)))
    assert re.findall(r'"(\w+)"', header[header.index("cpu_level_name"):].split("}", 1)[0]) == LEVELS[::-1]
    setup = ast.parse((ROOT / "setup.py").read_text())
    modules = next(ast.literal_eval(node.value) for node in setup.body if isinstance(node, ast.Assign)
                   and getattr(node.targets[0], "id", None) == "CPU_LEVEL_MODULES")
    assert ["_C", *modules] == list(_ext.CPU_LEVELS.values())
