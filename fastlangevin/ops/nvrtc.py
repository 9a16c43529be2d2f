"""The CUDA backend without a build step: the nvcc route's kernels compiled at first use by NVRTC through CuPy.

Where fastlangevin was installed without nvcc (no ``fastlangevin._C_cuda``), or with ``FASTLANGEVIN_CUDA_ROUTE=nvrtc``,
the CUDA backend runs the same device code: ``csrc/cuda/langevin_step_nvrtc.cu`` only includes
``csrc/include/fastlangevin/langevin_step_kernels.cuh``, whose kernel templates ``langevin_step.cu`` launches in the
nvcc build. NVRTC (``cupy.cuda.nvrtc``) compiles them for the device's architecture, CuPy loads the cubin once per
device, and ``NvrtcKernels`` launches them on the caller's stream with the interface of ``fastlangevin._C_cuda``
(device pointers and a ``cudaStream_t`` as ints), so the op's launcher does not know which route runs.

The compile options are nvcc's defaults (no ``-ftz``, IEEE division and square root, FMA contraction on), not those
of ``cupy.RawModule``, which adds ``-ftz=true``: with the same seed the two routes agree to the bit. Compiled code is
cached on disk under ``$FASTLANGEVIN_CACHE/nvrtc`` (default ``~/.cache/fastlangevin/nvrtc``), keyed by the sources,
the options and the NVRTC version. CuPy is imported only when this route is first asked for.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import threading
from pathlib import Path

import numpy as np
import torch

KERNEL_SOURCE = "cuda/langevin_step_nvrtc.cu"  # relative to source_root()
KERNEL_HEADER = "include/fastlangevin/langevin_step_kernels.cuh"
# C++ element type of each dtype code of the bindings (fastlangevin.ops.langevin_step.DTYPE_CODES; enum DtypeCode).
CTYPES = ("float", "double", "__half", "__nv_bfloat16")
CACHE_ENV = "FASTLANGEVIN_CACHE"


def source_root() -> Path:
    """The folder holding ``include/`` and ``cuda/``: the copy an installed package carries (``fastlangevin/_csrc``,
    written by setup.py), else the source tree's ``csrc/`` (editable installs)."""
    package = Path(__file__).resolve().parents[1]
    candidates = (package / "_csrc", package.parent / "csrc")
    for root in candidates:
        if (root / KERNEL_SOURCE).is_file():
            return root
    raise FileNotFoundError(f"fastlangevin NVRTC route: kernel sources not found (looked for {KERNEL_SOURCE} under "
                            f"{', '.join(map(str, candidates))}); reinstall fastlangevin")


def launch_constants(root: Path | None = None) -> dict[str, int]:
    """The ``constexpr int k... = N;`` launch settings of the kernel header: kThreads, kBlocksPerSM, kVecAlignWide,
    kVecAlignHalf (the nvcc route compiles the same lines)."""
    text = ((root or source_root()) / KERNEL_HEADER).read_text()
    values = {name: int(v) for name, v in re.findall(r"^constexpr int (k\w+) = (\d+);$", text, re.MULTILINE)}
    missing = {"kThreads", "kBlocksPerSM", "kVecAlignWide", "kVecAlignHalf"} - set(values)
    if missing:
        raise RuntimeError(f"{KERNEL_HEADER}: launch settings {sorted(missing)} not found as `constexpr int k = N;`")
    return values


def launch_blocks(n: int, sms: int, constants: dict[str, int]) -> int:
    """Blocks for ``n`` elements on ``sms`` SMs: ``launch_blocks`` of the kernel header, with its constants."""
    needed = -(-((n + 3) // 4) // constants["kThreads"])
    return min(needed, sms * constants["kBlocksPerSM"])


def kernel_names() -> dict[tuple, str]:
    """Name expressions of every instantiation the launcher may pick: ``("step", dtype_code, noise, vec)`` and
    ``("noise", dtype_code, vec)`` → the C++ template name."""
    flag = {False: "false", True: "true"}
    names = {}
    for code, ctype in enumerate(CTYPES):
        for vec in (False, True):
            names["noise", code, vec] = f"fastlangevin::cuda::normal_noise_kernel<{ctype}, {flag[vec]}>"
            for noise in (False, True):
                names["step", code, noise, vec] = (f"fastlangevin::cuda::langevin_step_kernel<{ctype}, {flag[noise]}, "
                                                   f"{flag[vec]}>")
    return names


def cuda_include_dir(*roots: str | None) -> Path | None:
    """A CUDA include folder with ``cuda_fp16.h`` (NVRTC needs it for the 16-bit types): under the first of ``roots``,
    ``$CUDA_HOME``, ``$CUDA_PATH``, ``/usr/local/cuda`` that has it; None when none has."""
    for root in (*roots, os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root and (Path(root) / "include" / "cuda_fp16.h").is_file():
            return Path(root) / "include"
    return None


def compile_options(arch: str, cuda_include: Path, root: Path | None = None) -> list[str]:
    """NVRTC options: the architecture (``sm_90`` → cubin, ``compute_90`` → PTX), C++17, the two include folders.
    Nothing else: nvcc's defaults are NVRTC's (``-ftz=false -prec-div=true -prec-sqrt=true -fmad=true``)."""
    return [f"--gpu-architecture={arch}", "-std=c++17", f"-I{(root or source_root()) / 'include'}",
            f"-I{cuda_include}"]


def compile_kernels(nvrtc, arch: str, cuda_include: Path, root: Path | None = None) -> tuple[bytes, dict[str, str]]:
    """Compile the kernel source with NVRTC → (cubin for ``sm_XX`` or PTX for ``compute_XX``, {name expression:
    lowered name}). ``nvrtc``: ``cupy.cuda.nvrtc`` or an object with its functions (createProgram, addNameExpression,
    compileProgram, getProgramLog, getLoweredName, getCUBIN, getPTX, destroyProgram). Needs no GPU."""
    root = root or source_root()
    names = list(kernel_names().values())
    prog = nvrtc.createProgram((root / KERNEL_SOURCE).read_text(), Path(KERNEL_SOURCE).name, (), ())
    try:
        for name in names:
            nvrtc.addNameExpression(prog, name)
        try:
            nvrtc.compileProgram(prog, compile_options(arch, cuda_include, root))
        except Exception as e:
            raise RuntimeError(f"NVRTC could not compile {root / KERNEL_SOURCE} for {arch} ({e}):\n"
                               f"{nvrtc.getProgramLog(prog)}") from None
        binary = nvrtc.getCUBIN(prog) if arch.startswith("sm_") else nvrtc.getPTX(prog)
        return binary, {name: nvrtc.getLoweredName(prog, name) for name in names}
    finally:
        nvrtc.destroyProgram(prog)


def cached_compile(nvrtc, arch: str, cuda_include: Path, cache_dir: Path | None = None,
                   root: Path | None = None) -> tuple[bytes, dict[str, str]]:
    """``compile_kernels`` through the disk cache (``cache_dir``, default ``$FASTLANGEVIN_CACHE/nvrtc``): the key hashes
    the kernel source, every header of ``include/fastlangevin``, the options and the NVRTC version (an edited header
    compiles afresh)."""
    root = root or source_root()
    if cache_dir is None:
        cache_dir = Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fastlangevin") / "nvrtc"
    cache_dir = Path(cache_dir).expanduser()
    key = hashlib.sha256(repr((nvrtc.getVersion(), compile_options(arch, cuda_include, root))).encode())
    for path in [root / KERNEL_SOURCE] + sorted((root / "include" / "fastlangevin").iterdir()):
        key.update(path.name.encode() + b"\0" + path.read_bytes())
    stem = cache_dir / f"langevin_step-{arch}-{key.hexdigest()[:32]}"
    binary_path, names_path = stem.with_suffix(".bin"), stem.with_suffix(".json")
    if binary_path.is_file() and names_path.is_file():
        return binary_path.read_bytes(), json.loads(names_path.read_text())
    binary, lowered = compile_kernels(nvrtc, arch, cuda_include, root)
    try:
        from fastlangevin._io import atomic_write_bytes

        cache_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(binary_path, binary)
        atomic_write_bytes(names_path, json.dumps(lowered).encode())  # written last: it marks the entry complete
    except OSError:
        pass  # a read-only cache folder only costs a compile per process
    return binary, lowered


class NvrtcKernels:
    """The NVRTC route with the interface of ``fastlangevin._C_cuda`` (``langevin_step``, ``normal_noise``,
    ``build_info``). Construction imports CuPy and checks sources and headers (raises ImportError or RuntimeError
    saying what is missing); kernels compile on the first launch on each device."""

    def __init__(self):
        import cupy
        from cupy.cuda import function, nvrtc

        self._cupy, self._function, self._nvrtc = cupy, function, nvrtc
        self.nvrtc_version = nvrtc.getVersion()  # raises when libnvrtc cannot be loaded
        self.root = source_root()
        self.cuda_include = cuda_include_dir(cupy.cuda.get_cuda_path())
        if self.cuda_include is None:
            raise RuntimeError("no CUDA include folder with cuda_fp16.h (CuPy's CUDA path, CUDA_HOME, CUDA_PATH, "
                               "/usr/local/cuda); install the CUDA headers, e.g. pip install 'cupy-cuda13x[ctk]'")
        self.constants = launch_constants(self.root)
        self._names = kernel_names()
        self._devices: dict[int, tuple] = {}  # index -> (kernels by key, SM count, arch, the loaded module)
        self._streams: dict[tuple[int, int], object] = {}
        self._lock = threading.Lock()

    @property
    def description(self) -> str:
        major, minor = self.nvrtc_version
        return f"NVRTC via CuPy {self._cupy.__version__} (NVRTC {major}.{minor})"

    def _arch(self, index: int) -> str:
        """``sm_XY`` of the device when NVRTC can emit its cubin, else PTX for the newest architecture it knows."""
        major, minor = torch.cuda.get_device_capability(index)
        cc = 10 * major + minor
        supported = [a for a in self._nvrtc.getSupportedArchs() if a <= cc]
        if not supported:
            raise RuntimeError(f"NVRTC {self.nvrtc_version} supports no architecture <= sm_{cc} of cuda:{index}")
        return f"sm_{cc}" if cc in supported else f"compute_{max(supported)}"

    def _device(self, index: int) -> tuple[dict, int]:
        entry = self._devices.get(index)
        if entry is None:
            with self._lock:
                entry = self._devices.get(index)
                if entry is None:
                    arch = self._arch(index)
                    binary, lowered = cached_compile(self._nvrtc, arch, self.cuda_include, root=self.root)
                    with self._cupy.cuda.Device(index):
                        module = self._function.Module()
                        module.load(binary)
                        kernels = {key: module.get_function(lowered[name]) for key, name in self._names.items()}
                    sms = torch.cuda.get_device_properties(index).multi_processor_count
                    entry = self._devices[index] = (kernels, sms, arch, module)
        return entry[0], entry[1]

    def _stream(self, handle: int, index: int):
        stream = self._streams.get((handle, index))
        if stream is None:
            stream = self._streams[handle, index] = self._cupy.cuda.ExternalStream(handle, index)
        return stream

    def _launch(self, key: tuple, n: int, args: tuple, stream: int) -> None:
        index = torch.cuda.current_device()  # the caller makes the tensors' device current, as for _C_cuda
        kernels, sms = self._device(index)
        grid = launch_blocks(n, sms, self.constants)
        with self._cupy.cuda.Device(index):
            kernels[key]((grid,), (self.constants["kThreads"],), args, stream=self._stream(stream, index))

    def _vec(self, dtype: int, *ptrs: int) -> bool:
        align = self.constants["kVecAlignHalf" if dtype >= 2 else "kVecAlignWide"]
        return all(p % align == 0 for p in ptrs)

    def langevin_step(self, z_ptr: int, grad_ptr: int, out_ptr: int, n: int, D: int, prior_kind: int, mean_ptr: int,
                      inv_var_ptr: int, rng_state_ptr: int, step_size: float, noise_scale: float, dtype: int,
                      n_threads: int, stream: int) -> None:
        """``fastlangevin._C_cuda.langevin_step``: out = z − (step_size/2)(grad + prior_term) + noise_scale·noise on
        ``stream`` of the current device; dtype codes 0 float32, 1 float64, 2 float16, 3 bfloat16 (n_threads unused)."""
        _check_dtype("langevin_step", dtype)
        if n < 0:
            raise ValueError(f"langevin_step: n must be >= 0, got {n}")
        if prior_kind not in (0, 1, 2):
            raise ValueError(f"langevin_step: prior_kind must be 0 (flat), 1 (normal) or 2 (diagonal), "
                             f"got {prior_kind}")
        if prior_kind == 2 and (D <= 0 or not mean_ptr or not inv_var_ptr):
            raise ValueError(f"langevin_step: the diagonal prior (prior_kind=2) needs D >= 1 (got {D}), mean_ptr and "
                             f"inv_var_ptr (float32 for 16-bit dtypes)")
        if noise_scale != 0.0 and not rng_state_ptr:
            raise ValueError("langevin_step: noise_scale != 0 needs rng_state_ptr")
        if n == 0:
            return
        noise = noise_scale != 0.0
        real = np.float64 if dtype == 1 else np.float32  # the compute type, as (C)(step_size / 2) in the nvcc route
        args = (np.uint64(z_ptr), np.uint64(grad_ptr), np.uint64(out_ptr), np.int64(n), np.int64(D),
                np.int32(prior_kind), np.uint64(mean_ptr), np.uint64(inv_var_ptr), np.uint64(rng_state_ptr),
                real(step_size / 2), real(noise_scale))
        self._launch(("step", dtype, noise, self._vec(dtype, z_ptr, grad_ptr, out_ptr)), n, args, stream)

    def normal_noise(self, out_ptr: int, n: int, rng_state_ptr: int, dtype: int, n_threads: int, stream: int) -> None:
        """``fastlangevin._C_cuda.normal_noise``: the first n values of the stream at rng_state into out."""
        _check_dtype("normal_noise", dtype)
        if n < 0:
            raise ValueError(f"normal_noise: n must be >= 0, got {n}")
        if n == 0:
            return
        if not rng_state_ptr:
            raise ValueError("normal_noise: rng_state_ptr is 0")
        args = (np.uint64(out_ptr), np.int64(n), np.uint64(rng_state_ptr))
        self._launch(("noise", dtype, self._vec(dtype, out_ptr)), n, args, stream)

    def build_info(self) -> dict[str, object]:
        """What this route runs: CuPy and NVRTC versions, the sources, and the architecture compiled per device."""
        return {"backend": "cuda", "route": "nvrtc", "cupy_version": self._cupy.__version__,
                "nvrtc_version": "%d.%d" % self.nvrtc_version, "sources": str(self.root),
                "cuda_include": str(self.cuda_include),
                "archs": {f"cuda:{i}": entry[2] for i, entry in sorted(self._devices.items())},
                "dtypes": ("float32", "float64", "float16", "bfloat16")}


def _check_dtype(fn: str, dtype: int) -> None:
    if dtype not in range(len(CTYPES)):
        raise ValueError(f"{fn}: dtype must be 0 (float32), 1 (float64), 2 (float16) or 3 (bfloat16), got {dtype}")
