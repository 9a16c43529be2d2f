"""Builds fastlangevin's compiled backends with CMake: ``fastlangevin._C`` (CPU; on x86-64 also ``_C_avx2`` and
``_C_avx512``, the same kernels per instruction-set level, picked at run time) and ``fastlangevin._C_cuda``.

Metadata lives in pyproject.toml; this file only drives CMake (one configure and one parallel build for both modules).
Needs setuptools >= 77, pybind11, cmake (the binary or the ``cmake`` pip package) and a C++17 compiler; nvcc for CUDA
(pyproject.toml's ``[build-system]``). Nothing depends on torch at build time. The sdist's contents: MANIFEST.in.

Environment switches:
  FASTLANGEVIN_NO_CUDA=1      skip the CUDA backend even where nvcc exists
  FASTLANGEVIN_REQUIRE_CUDA=1 fail the build when the CUDA backend cannot be built (default: warn, build CPU only)
  FASTLANGEVIN_CUDA_ARCH      CUDA architectures besides 90, e.g. "80;90"
  FASTLANGEVIN_NATIVE=1       one CPU module compiled with -march=native (this machine only; no run-time dispatch)
  FASTLANGEVIN_VEC_REPORT=1   print the compiler's vectorisation report for the CPU kernels
  FASTLANGEVIN_BUILD_TYPE     CMake build type (default Release)
  FASTLANGEVIN_BUILD_DIR      where CMake builds (default: build/ in the source tree, kept for incremental rebuilds)
  CMAKE_BUILD_PARALLEL_LEVEL  parallel build jobs (default: all cores)
  CMAKE_GENERATOR             CMake generator (default: Ninja when found, else CMake's default)
  CUDACXX / CUDA_HOME         which nvcc to use
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import setuptools
from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
# The CPU kernels per instruction-set level besides the baseline _C (CMakeLists.txt; fastlangevin/_ext.py picks one).
CPU_LEVEL_MODULES = ("_C_avx2", "_C_avx512")
MIN_SETUPTOOLS = (77, 0)  # as pyproject.toml's [build-system]; a build without isolation does not check it

if tuple(int(p) for p in setuptools.__version__.split(".")[:2] if p.isdigit()) < MIN_SETUPTOOLS:
    sys.exit(f"fastlangevin: building needs setuptools >= {'.'.join(map(str, MIN_SETUPTOOLS))} (found "
             f"{setuptools.__version__}): pip install 'setuptools>=77' pybind11 cmake ninja, then retry")


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in ("", "0", "false", "no", "off")


def _find_cmake() -> str:
    exe = shutil.which("cmake")
    if exe:
        return exe
    try:  # the cmake pip package
        import cmake  # type: ignore[import-not-found]

        exe = os.path.join(cmake.CMAKE_BIN_DIR, "cmake")
        if os.path.exists(exe):
            return exe
    except ImportError:
        pass
    raise RuntimeError("fastlangevin: building needs CMake >= 3.18: install it (`pip install cmake` or the system "
                       "package) and retry")


def _find_ninja() -> str | None:
    exe = shutil.which("ninja")
    if exe:
        return exe
    try:  # the ninja pip package
        import ninja  # type: ignore[import-not-found]

        exe = os.path.join(ninja.BIN_DIR, "ninja")
        if os.path.exists(exe):
            return exe
    except ImportError:
        pass
    return None


def _find_nvcc() -> str | None:
    """nvcc to build with, or None when CUDA is off or absent."""
    if _env_flag("FASTLANGEVIN_NO_CUDA"):
        return None
    candidates = [os.environ.get("CUDACXX")]
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "bin", "nvcc"))
    candidates += ["/usr/local/cuda/bin/nvcc", shutil.which("nvcc")]
    for c in candidates:
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _build_dir(build_temp: Path, build_type: str, generator: str) -> Path:
    """A CMake build folder that survives between builds (pip's build_temp is a fresh temporary folder each time, which
    would make every rebuild a full one): ``build/`` in the source tree (git-ignored) when writable, else build_temp.
    FASTLANGEVIN_BUILD_DIR overrides. A cache made for another source folder (a copied tree) is discarded."""
    name = f"cmake-{build_type}-{generator}-py{sys.version_info[0]}{sys.version_info[1]}"
    base = os.environ.get("FASTLANGEVIN_BUILD_DIR") or (ROOT / "build" if os.access(ROOT, os.W_OK) else build_temp)
    build_dir = Path(base).resolve() / name
    cache = build_dir / "CMakeCache.txt"
    if cache.exists():
        home = [ln.split("=", 1)[1].strip() for ln in cache.read_text().splitlines()
                if ln.startswith("CMAKE_HOME_DIRECTORY:")]
        if not home or Path(home[0]).resolve() != ROOT:
            shutil.rmtree(build_dir)
    build_dir.mkdir(parents=True, exist_ok=True)
    return build_dir


class CMakeExtension(Extension):
    """A module built by CMakeLists.txt (target = the last component of ``name``). ``optional``: a build that does
    not produce it warns instead of failing."""

    def __init__(self, name: str, optional: bool = False):
        super().__init__(name, sources=[])
        self.target = name.rsplit(".", 1)[-1]
        self.optional = optional


class CMakeBuild(build_ext):
    def build_extensions(self) -> None:
        exts = [e for e in self.extensions if isinstance(e, CMakeExtension)]
        if not exts:
            return super().build_extensions()
        out_dir = Path(self.get_ext_fullpath(exts[0].name)).resolve().parent
        cmake = _find_cmake()
        # CMAKE_GENERATOR (CMake's own variable) wins; else Ninja where found, else CMake's default (make).
        generator = os.environ.get("CMAKE_GENERATOR")
        ninja = None if generator else _find_ninja()
        nvcc = _find_nvcc() if any(e.target == "_C_cuda" for e in exts) else None
        build_type = os.environ.get("FASTLANGEVIN_BUILD_TYPE", "Release")
        gen_tag = (generator or ("Ninja" if ninja else "default")).replace(" ", "").lower()
        build_dir = _build_dir(Path(self.build_temp), build_type, gen_tag)

        args = [
            f"-DCMAKE_BUILD_TYPE={build_type}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}",
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY_{build_type.upper()}={out_dir}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DFASTLANGEVIN_NATIVE={'ON' if _env_flag('FASTLANGEVIN_NATIVE') else 'OFF'}",
            f"-DFASTLANGEVIN_VEC_REPORT={'ON' if _env_flag('FASTLANGEVIN_VEC_REPORT') else 'OFF'}",
            f"-DFASTLANGEVIN_CUDA={'ON' if nvcc else 'OFF'}",
            f"-DFASTLANGEVIN_CUDA_ARCH={os.environ.get('FASTLANGEVIN_CUDA_ARCH', '')}",
        ]
        try:
            import pybind11

            args.append(f"-Dpybind11_DIR={pybind11.get_cmake_dir()}")
        except ImportError:
            pass  # CMakeLists.txt asks the interpreter itself and explains the failure
        if nvcc:
            args.append(f"-DCMAKE_CUDA_COMPILER={nvcc}")
        if ninja:
            args += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]

        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(self.parallel or os.cpu_count() or 1)
        targets = [e.target for e in exts if e.target != "_C_cuda" or nvcc]
        if not (self.inplace or getattr(self, "editable_mode", False)):
            # A wheel packs all of build/lib: drop a module left there by an earlier build that is not rebuilt now.
            for stale in out_dir.glob("_C_cuda.*"):
                if "_C_cuda" not in targets:
                    stale.unlink()
        subprocess.run([cmake, "-S", str(ROOT), "-B", str(build_dir), *args], check=True)
        build = [cmake, "--build", str(build_dir), "--config", build_type, "-j", jobs]
        cache = (build_dir / "CMakeCache.txt").read_text()
        if "_C_cuda" in targets and "FASTLANGEVIN_CUDA_ENABLED:INTERNAL=ON" not in cache:
            targets.remove("_C_cuda")  # CMake found no working nvcc and said so
        configured = next((ln.split("=", 1)[1].split(";") for ln in cache.splitlines()
                           if ln.startswith("FASTLANGEVIN_CPU_LEVEL_MODULES:INTERNAL=")), [])
        for ext in [e for e in exts if e.target in CPU_LEVEL_MODULES and e.target not in configured]:
            # Not configured here (FASTLANGEVIN_NATIVE, another architecture): not a failure; an old copy would be
            # a module of another build, so it goes.
            targets.remove(ext.target)
            exts.remove(ext)
            self.extensions.remove(ext)
            Path(self.get_ext_fullpath(ext.name)).unlink(missing_ok=True)
        try:
            subprocess.run([*build, "--target", *targets], check=True)
        except subprocess.CalledProcessError:
            if "_C_cuda" not in targets or _env_flag("FASTLANGEVIN_REQUIRE_CUDA"):
                raise
            self.warn("fastlangevin: building the CUDA backend failed (see above); building the CPU backend only. "
                      "Set FASTLANGEVIN_NO_CUDA=1 to skip it, or FASTLANGEVIN_REQUIRE_CUDA=1 to make this an error.")
            subprocess.run([*build, "--target", *[t for t in targets if t != "_C_cuda"]], check=True)

        for ext in list(exts):
            if Path(self.get_ext_fullpath(ext.name)).exists():
                continue
            if ext.optional and not _env_flag("FASTLANGEVIN_REQUIRE_CUDA"):
                self.warn(f"fastlangevin: {ext.name} not built; that backend will report itself unavailable")
                self.extensions.remove(ext)
            else:
                raise RuntimeError(f"fastlangevin: CMake did not produce {self.get_ext_fullpath(ext.name)}")


class BuildPy(build_py):
    """Also puts the kernel sources that the NVRTC route compiles at run time (fastlangevin/ops/nvrtc.py) into the
    package, as fastlangevin/_csrc/{include/fastlangevin/*, cuda/langevin_step_nvrtc.cu}: an installed package has no
    csrc/ beside it. Editable installs read csrc/ in the source tree instead."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        dest = Path(self.build_lib) / "fastlangevin" / "_csrc"
        sources = sorted((ROOT / "csrc" / "include" / "fastlangevin").glob("*.*"))
        for path in sources + [ROOT / "csrc" / "cuda" / "langevin_step_nvrtc.cu"]:
            target = dest / path.relative_to(ROOT / "csrc")
            self.mkpath(str(target.parent))
            self.copy_file(str(path), str(target), preserve_mode=False)


ext_modules = [CMakeExtension("fastlangevin._C")] + [CMakeExtension(f"fastlangevin.{m}") for m in CPU_LEVEL_MODULES]
if _find_nvcc():
    ext_modules.append(CMakeExtension("fastlangevin._C_cuda", optional=True))

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild, "build_py": BuildPy})
