"""The CUDA backend's NVRTC route (``fastlangevin.ops.nvrtc``).

Without a GPU: the exact kernel source compiles with NVRTC for sm_90 (through CuPy's binding, or libnvrtc by ctypes
where CuPy is missing; skipped when neither is here), with the same floating-point instructions as the nvcc build,
the disk cache keys on the headers, and route selection says why. On a GPU (marked ``gpu``): the NVRTC route agrees
with the nvcc build to the bit for the same seed, and with the reference, on poisoned outputs, a non-default stream
inside a CUDA graph, and the device of the tensors.
"""

import ctypes
import glob
import os
import re
import shutil
import site
import subprocess
import sys
from collections import Counter

import pytest
import torch

from fastlangevin import _ext
from fastlangevin.ops import nvrtc as rtc
from fastlangevin.ops.langevin_step import DTYPE_CODES, launch_cuda, make_rng_state
from fastlangevin.ops.codes import PRIOR_DIAGONAL, PRIOR_FLAT, PRIOR_NORMAL
from fastlangevin.ops.langevin_step_reference import langevin_step_reference
from fastlangevin.ops.philox import normal_noise


class CtypesNvrtc:
    """The functions of ``cupy.cuda.nvrtc`` that ``ops.nvrtc.compile_kernels`` calls, on libnvrtc through ctypes."""

    def __init__(self, lib: ctypes.CDLL):
        self.lib = lib

    def _check(self, rc: int, what: str) -> None:
        if rc != 0:
            raise RuntimeError(f"{what}: NVRTC error {rc}")

    def _bytes(self, prog, size_fn, get_fn) -> bytes:
        size = ctypes.c_size_t()
        self._check(size_fn(ctypes.c_void_p(prog), ctypes.byref(size)), size_fn.__name__)
        buf = ctypes.create_string_buffer(size.value)
        self._check(get_fn(ctypes.c_void_p(prog), buf), get_fn.__name__)
        return buf.raw

    def getVersion(self):
        major, minor = ctypes.c_int(), ctypes.c_int()
        self._check(self.lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
        return major.value, minor.value

    def createProgram(self, src, name, headers, include_names):
        prog = ctypes.c_void_p()
        self._check(self.lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), name.encode(), 0, None, None),
                    "nvrtcCreateProgram")
        return prog.value

    def addNameExpression(self, prog, name):
        self._check(self.lib.nvrtcAddNameExpression(ctypes.c_void_p(prog), name.encode()), "nvrtcAddNameExpression")

    def compileProgram(self, prog, options):
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        self._check(self.lib.nvrtcCompileProgram(ctypes.c_void_p(prog), len(options), opts), "nvrtcCompileProgram")

    def getProgramLog(self, prog):
        return self._bytes(prog, self.lib.nvrtcGetProgramLogSize, self.lib.nvrtcGetProgramLog).rstrip(b"\0").decode()

    def getLoweredName(self, prog, name):
        out = ctypes.c_char_p()
        self._check(self.lib.nvrtcGetLoweredName(ctypes.c_void_p(prog), name.encode(), ctypes.byref(out)),
                    "nvrtcGetLoweredName")
        return out.value.decode()

    def getPTX(self, prog):
        return self._bytes(prog, self.lib.nvrtcGetPTXSize, self.lib.nvrtcGetPTX)

    def getCUBIN(self, prog):
        return self._bytes(prog, self.lib.nvrtcGetCUBINSize, self.lib.nvrtcGetCUBIN)

    def destroyProgram(self, prog):
        self._check(self.lib.nvrtcDestroyProgram(ctypes.byref(ctypes.c_void_p(prog))), "nvrtcDestroyProgram")


def _find_nvrtc():
    """CuPy's NVRTC binding, else libnvrtc by ctypes (the loader's path, then pip's nvidia-cuda-nvrtc wheels)."""
    try:
        from cupy.cuda import nvrtc
        nvrtc.getVersion()
        return nvrtc
    except Exception:
        pass
    candidates = ["libnvrtc.so.13", "libnvrtc.so.12", "libnvrtc.so"]
    for folder in site.getsitepackages() + [site.getusersitepackages()]:
        candidates += sorted(glob.glob(os.path.join(folder, "nvidia", "*", "lib", "libnvrtc.so*")))
    for name in candidates:
        try:
            return CtypesNvrtc(ctypes.CDLL(name))
        except OSError:
            continue
    return None


@pytest.fixture(scope="module")
def nvrtc_api():
    api = _find_nvrtc()
    if api is None:
        pytest.skip("neither CuPy nor libnvrtc is installed here (pip install cupy-cuda13x or nvidia-cuda-nvrtc)")
    return api


@pytest.fixture(scope="module")
def cuda_include():
    include = rtc.cuda_include_dir()
    if include is None:
        pytest.skip("no CUDA include folder with cuda_fp16.h (CUDA_HOME, CUDA_PATH, /usr/local/cuda)")
    return include


@pytest.fixture(scope="module")
def ptx_sm90(nvrtc_api, cuda_include):
    ptx, lowered = rtc.compile_kernels(nvrtc_api, "compute_90", cuda_include)
    return ptx.rstrip(b"\0").decode(), lowered


def _entries(ptx: str) -> dict[str, str]:
    """Kernel name → PTX body."""
    return {m.group(1): m.group(0) for m in re.finditer(r"\.entry (\w+)\((.*?)\n\}", ptx, re.S)}


def _float_ops(body: str) -> Counter:
    """How often each floating-point instruction (with its rounding and flush modifiers) occurs."""
    ops = Counter()
    for line in body.splitlines():
        m = re.match(r"\s+(?:@!?%p\d+\s+)?([a-z][\w.]*)", line)
        if m and re.search(r"\.(f32|f64|rn|ftz|approx)\b", m.group(1)):
            ops[m.group(1)] += 1
    return ops


def test_launch_constants_and_grid_follow_the_header():
    constants = rtc.launch_constants()
    assert constants == {"kThreads": 256, "kBlocksPerSM": 16, "kVecAlignWide": 16, "kVecAlignHalf": 8}
    assert rtc.launch_blocks(1, 132, constants) == 1
    assert rtc.launch_blocks(4 * 256, 132, constants) == 1
    assert rtc.launch_blocks(4 * 256 + 1, 132, constants) == 2
    assert rtc.launch_blocks(10**9, 132, constants) == 132 * 16
    names = rtc.kernel_names()
    assert len(names) == len(set(names.values())) == 4 * (4 + 2)


def test_source_root_has_the_wrapper_and_it_only_includes_the_shared_header():
    root = rtc.source_root()
    includes = re.findall(r"^#include\s+(\S+)", (root / rtc.KERNEL_SOURCE).read_text(), re.MULTILINE)
    assert includes == ['"fastlangevin/langevin_step_kernels.cuh"']
    assert "langevin_step_kernels.cuh" in (root / "cuda" / "langevin_step.cu").read_text()  # the nvcc route's


def test_kernel_source_compiles_for_sm_90_with_nvcc_defaults(ptx_sm90):
    ptx, lowered = ptx_sm90
    entries = _entries(ptx)
    assert set(lowered) == set(rtc.kernel_names().values())
    assert set(lowered.values()) == set(entries)
    # float32 denormals kept, as nvcc's default (cupy.RawModule would add -ftz=true); no fast-math approximations
    # (float64 division seeds its Newton steps with rcp.approx.ftz.f64, in both routes)
    assert ".ftz.f32" not in ptx and ".approx.f32" not in ptx and ".approx.ftz.f32" not in ptx
    step_f32 = entries[lowered["fastlangevin::cuda::langevin_step_kernel<float, true, true>"]]
    ops = _float_ops(step_f32)
    assert ops["mul.rn.f32"] and ops["sub.rn.f32"] and ops["add.rn.f32"]  # the update's un-fused roundings
    assert ops["sqrt.rn.f32"]  # IEEE square root


def test_cubin_for_sm_90_without_a_gpu(nvrtc_api, cuda_include):
    cubin, lowered = rtc.compile_kernels(nvrtc_api, "sm_90", cuda_include)
    assert cubin[:4] == b"\x7fELF"
    for name in lowered.values():
        assert name.encode() in cubin


def test_same_float_instructions_as_the_nvcc_build(ptx_sm90, tmp_path):
    """Kernel by kernel, the NVRTC PTX has the same floating-point instructions (counted with their rounding modifiers)
    as nvcc's PTX of langevin_step.cu: same contractions, roundings and math library paths. Register allocation and
    order may differ between compiler versions, so the bits are compared on a GPU."""
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc is None:
        pytest.skip("nvcc not found")
    root = rtc.source_root()
    out = tmp_path / "nvcc.ptx"
    # the build's options (CMakeLists.txt: -O3 -lineinfo, C++17), PTX for the one architecture
    subprocess.run([nvcc, "-ptx", "-arch=compute_90", "-O3", "-lineinfo", "-std=c++17", f"-I{root / 'include'}",
                    str(root / "cuda" / "langevin_step.cu"), "-o", str(out)], check=True, capture_output=True)

    def by_template(ptx):  # int64_t mangles as long (nvcc) or long long (NVRTC): key on the template arguments
        return {name.split("EEEv")[0]: body for name, body in _entries(ptx).items()}

    ours, theirs = by_template(ptx_sm90[0]), by_template(out.read_text())
    assert set(ours) == set(theirs) and len(ours) == 24
    for key in ours:
        assert _float_ops(ours[key]) == _float_ops(theirs[key]), key


class FakeNvrtc:
    """Records calls; 'compiles' to a binary naming the options. ``fail`` makes compileProgram raise."""

    def __init__(self, fail: bool = False):
        self.compiles, self.fail, self.options = 0, fail, None

    def getVersion(self):
        return (13, 0)

    def createProgram(self, src, name, headers, include_names):
        assert name == "langevin_step_nvrtc.cu" and "langevin_step_kernels.cuh" in src
        return 1

    def addNameExpression(self, prog, name):
        pass

    def compileProgram(self, prog, options):
        self.compiles += 1
        self.options = options
        if self.fail:
            raise RuntimeError("NVRTC_ERROR_COMPILATION")

    def getProgramLog(self, prog):
        return "error: something in the header"

    def getLoweredName(self, prog, name):
        return "_Z" + re.sub(r"\W", "", name)

    def getCUBIN(self, prog):
        return b"cubin:" + " ".join(self.options).encode()

    def getPTX(self, prog):
        return b"ptx"

    def destroyProgram(self, prog):
        pass


def _copy_sources(tmp_path):
    root = tmp_path / "csrc"
    shutil.copytree(rtc.source_root() / "include", root / "include")
    (root / "cuda").mkdir()
    shutil.copy(rtc.source_root() / rtc.KERNEL_SOURCE, root / rtc.KERNEL_SOURCE)
    return root


def test_disk_cache_hits_and_a_header_edit_recompiles(tmp_path):
    root, api, cache = _copy_sources(tmp_path), FakeNvrtc(), tmp_path / "cache"
    include = tmp_path / "cuda-include"
    first = rtc.cached_compile(api, "sm_90", include, cache, root)
    assert api.compiles == 1 and "--gpu-architecture=sm_90" in api.options and not any("ftz" in o for o in api.options)
    assert rtc.cached_compile(api, "sm_90", include, cache, root) == first and api.compiles == 1
    rtc.cached_compile(api, "sm_80", include, cache, root)
    assert api.compiles == 2
    header = root / "include" / "fastlangevin" / "philox.h"
    header.write_text(header.read_text() + "\n// edited\n")
    assert rtc.cached_compile(api, "sm_90", include, cache, root) == first and api.compiles == 3


def test_compile_error_shows_the_nvrtc_log(tmp_path):
    with pytest.raises(RuntimeError, match=r"could not compile .*sm_90.*\n.*something in the header"):
        rtc.compile_kernels(FakeNvrtc(fail=True), "sm_90", tmp_path)


def test_route_override_is_checked(monkeypatch):
    monkeypatch.setattr(_ext, "_route", [])
    monkeypatch.setenv(_ext.ROUTE_ENV, "cupy")
    route = _ext.cuda_route()
    assert route.kernels is None
    assert "FASTLANGEVIN_CUDA_ROUTE must be 'nvcc', 'nvrtc' or unset, got 'cupy'" in route.reason


def test_backend_info_does_not_import_cupy_without_a_gpu():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the route may rightly import CuPy")
    code = ("import sys, fastlangevin as fl; info = fl.backend_info(); print(info.extension['cuda_route']); "
            "assert 'cupy' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, _ext.ROUTE_ENV: "nvrtc"})
    assert result.returncode == 0, result.stdout + result.stderr
    assert "torch sees no CUDA device" in result.stdout


# ---- on a GPU -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def routes():
    """(nvcc kernels, NVRTC kernels): both routes side by side, whichever cuda_route() picked."""
    nvcc_why = _ext._nvcc_runtime_reason()
    nvrtc, nvrtc_why = _ext.load_nvrtc()
    if nvcc_why or nvrtc_why:
        pytest.skip(f"both routes are needed: nvcc build: {nvcc_why or 'ok'}; NVRTC: {nvrtc_why or 'ok'}")
    return _ext._load("_C_cuda")[0], nvrtc


def _inputs(shape, dtype, device, seed, prior_kind):
    g = torch.Generator().manual_seed(seed)
    z, grad = (torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(2))
    if prior_kind != PRIOR_DIAGONAL:
        return z, grad, None, None
    ctype = torch.float64 if dtype == torch.float64 else torch.float32
    d = z[0].numel()
    return (z, grad, torch.randn(d, generator=g, dtype=ctype).to(device),
            torch.rand(d, generator=g, dtype=ctype).add(0.5).to(device))


def _step(kernels, z, grad, rng_state, noise_scale, prior_kind, mean, inv_var):
    out = torch.full_like(z, float("nan"))  # poisoned: an unwritten element stays NaN
    launch_cuda(out, z, grad, rng_state, 0.013, noise_scale, prior_kind, mean, inv_var, kernels=kernels)
    return out


TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-6, atol=2e-6),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 1), (3, 5), (64, 100), (33, 257), (5, 3, 4, 4)])
@pytest.mark.parametrize("prior_kind", [PRIOR_FLAT, PRIOR_NORMAL, PRIOR_DIAGONAL])
@pytest.mark.parametrize("noise_scale", [0.0, 0.37])
def test_nvrtc_route_equals_nvcc_route_bitwise(routes, dtype, shape, prior_kind, noise_scale):
    nvcc, nvrtc = routes
    z, grad, mean, inv_var = _inputs(shape, dtype, "cuda", 7, prior_kind)
    rng_state = make_rng_state(2**40 + 3, 2**33 + 5, "cuda")
    got = _step(nvrtc, z, grad, rng_state, noise_scale, prior_kind, mean, inv_var)
    assert torch.equal(got, _step(nvcc, z, grad, rng_state, noise_scale, prior_kind, mean, inv_var))
    expected = langevin_step_reference(z, grad, rng_state, 0.013, noise_scale, prior_kind, mean, inv_var)
    torch.testing.assert_close(got, expected, **TOL[dtype])
    # misaligned pointers take the scalar path
    zs, gs = z.reshape(-1)[1:], grad.reshape(-1)[1:]
    if zs.numel() and prior_kind != PRIOR_DIAGONAL:
        zs, gs = zs.reshape(1, -1), gs.reshape(1, -1)
        assert torch.equal(_step(nvrtc, zs, gs, rng_state, noise_scale, prior_kind, None, None),
                           _step(nvcc, zs, gs, rng_state, noise_scale, prior_kind, None, None))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_raw_noise_of_both_routes(routes, dtype):
    state = make_rng_state(2**40 + 5, 2**33 + 1, "cuda")
    n = 4099
    outs = []
    for kernels in routes:
        out = torch.full((n,), float("nan"), dtype=dtype, device="cuda")
        kernels.normal_noise(out.data_ptr(), n, state.data_ptr(), DTYPE_CODES[dtype], 0,
                             torch.cuda.current_stream().cuda_stream)
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    torch.testing.assert_close(outs[1], normal_noise(n, state, dtype), **TOL[dtype])


@pytest.mark.gpu
def test_nvrtc_route_on_a_side_stream_inside_a_cuda_graph(routes):
    """Captured on a non-default stream (a launch on any other stream would break the capture); each replay reads
    the counter that the graph advances on the device, so the steps differ and match the reference."""
    _, nvrtc = routes
    z, grad, _, _ = _inputs((64, 100), torch.float32, "cuda", 3, PRIOR_NORMAL)
    rng_state = make_rng_state(11, 0, "cuda")
    out = torch.empty_like(z)
    launch_cuda(out, z, grad, rng_state, 0.013, 0.37, PRIOR_NORMAL, None, None, kernels=nvrtc)  # compiles, loads
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.stream(side), torch.cuda.graph(graph, stream=side):
        launch_cuda(out, z, grad, rng_state, 0.013, 0.37, PRIOR_NORMAL, None, None, kernels=nvrtc)
        rng_state[1] += 1
    for counter in range(3):
        graph.replay()
        torch.cuda.synchronize()
        expected = langevin_step_reference(z, grad, make_rng_state(11, counter, "cuda"), 0.013, 0.37, PRIOR_NORMAL,
                                           None, None)
        torch.testing.assert_close(out, expected, **TOL[torch.float32])


@pytest.mark.gpu
def test_nvrtc_route_runs_on_the_tensors_device(routes):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two GPUs")
    _, nvrtc = routes
    z, grad, _, _ = _inputs((8, 33), torch.float32, "cuda:1", 4, PRIOR_NORMAL)
    rng_state = make_rng_state(5, 1, "cuda:1")
    with torch.cuda.device(0):  # the launcher makes cuda:1 current for the kernel
        got = _step(nvrtc, z, grad, rng_state, 0.37, PRIOR_NORMAL, None, None)
    assert got.device == torch.device("cuda:1")
    torch.testing.assert_close(got, langevin_step_reference(z, grad, rng_state, 0.013, 0.37, PRIOR_NORMAL, None, None),
                               **TOL[torch.float32])


@pytest.mark.gpu
@pytest.mark.parametrize("route, says", [("nvrtc", "NVRTC via CuPy"), ("nvcc", "nvcc build")])
def test_backend_info_names_the_forced_route(routes, route, says):
    code = ("import torch, fastlangevin as fl; print(fl.backend_info()); z = torch.randn(4, 9, device='cuda'); "
            "a = fl.ops.langevin_step(z, z, 0.1, seed=3, backend='cuda'); "
            "b = fl.ops.langevin_step(z, z, 0.1, seed=3, backend='reference'); "
            "torch.testing.assert_close(a, b, rtol=2e-6, atol=2e-6)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env={**os.environ, _ext.ROUTE_ENV: route})
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(rf"cuda\s+yes\s+CUDA kernels, {says}", result.stdout), result.stdout


def test_nvrtc_kernels_reject_bad_arguments_before_touching_the_device():
    pytest.importorskip("cupy")
    kernels, why = _ext.load_nvrtc()
    if kernels is None:
        pytest.skip(why)
    good = dict(z_ptr=16, grad_ptr=16, out_ptr=16, n=8, D=4, prior_kind=PRIOR_NORMAL, mean_ptr=0, inv_var_ptr=0,
                rng_state_ptr=32, step_size=0.1, noise_scale=0.5, dtype=0, n_threads=0, stream=0)
    for bad, match in ((dict(dtype=7), "dtype must be"), (dict(n=-1), "n must be >= 0"),
                       (dict(prior_kind=5), "prior_kind must be"), (dict(prior_kind=PRIOR_DIAGONAL), "mean_ptr"),
                       (dict(rng_state_ptr=0), "needs rng_state_ptr")):
        with pytest.raises(ValueError, match=match):
            kernels.langevin_step(**{**good, **bad})
    with pytest.raises(ValueError, match="rng_state_ptr is 0"):
        kernels.normal_noise(16, 8, 0, 0, 0, 0)
