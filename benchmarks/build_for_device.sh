#!/usr/bin/env bash
# Builds fastlangevin/_C and fastlangevin/_C_cuda for the GPU machines' CPython 3.12 into fastlangevin/ of this
# checkout, so the device tool can carry them instead of building there (see benchmarks/gpu_validate.py):
#   fastlangevin/_C{,_avx2,_avx512}.cpython-312-x86_64-linux-gnu.so  the CPU kernels per instruction-set level,
#                                                         picked at run time on the CPU there
#   fastlangevin/_C_cuda.cpython-312-x86_64-linux-gnu.so  nvcc, sm_90 SASS + compute_90 PTX, cudart linked statically
# Needs nvcc and a Python 3.12 with its headers: PY312=/path/to/python3.12 (default: the newest pyenv 3.12, else
# python3.12 on PATH). setuptools and pybind11 go into a scratch virtual environment (VENV312, default
# /tmp/fastlangevin-py312); cmake and ninja come from PATH. The build folder is build/cmake-Release-*-py312.
set -euo pipefail
cd "$(dirname "$0")/.."
py312=${PY312:-$(ls -d "$HOME"/.pyenv/versions/3.12*/bin/python3.12 2>/dev/null | sort -V | tail -1)}
py312=${py312:-$(command -v python3.12 || true)}
if [ -z "$py312" ]; then
  echo "build_for_device.sh: no Python 3.12 found: set PY312=/path/to/python3.12" >&2
  exit 2
fi
venv=${VENV312:-/tmp/fastlangevin-py312}
if [ ! -x "$venv/bin/python" ]; then
  "$py312" -m venv "$venv"
  "$venv/bin/pip" install --quiet setuptools pybind11
fi
FASTLANGEVIN_REQUIRE_CUDA=1 "$venv/bin/python" setup.py build_ext --inplace
ls -l fastlangevin/_C{,_avx2,_avx512,_cuda}.cpython-312-x86_64-linux-gnu.so
