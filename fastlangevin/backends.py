"""Which backend runs, and why: availability of each backend, the ``"auto"`` choice, and ``backend_info()``.

Backends of the fused step op:

* ``reference`` — plain PyTorch, every device and float dtype; the oracle of the tests.
* ``cpu`` — C++ (pybind11 extension ``fastlangevin._C``), CPU tensors, float32/float64.
* ``cuda`` — CUDA C++, CUDA tensors, float16/bfloat16/float32/float64: the nvcc build (extension
  ``fastlangevin._C_cuda``), or the same kernel sources compiled at first use by NVRTC through CuPy where that
  build is missing (``fastlangevin.ops.nvrtc``); the status says which route runs (``_ext.cuda_route()``).
* ``triton`` — a Triton kernel, CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (for testing).

``"auto"`` takes the first available backend of ``AUTO_ORDER[device type]`` that supports the dtype; tensors on any
other device with data (mps, xpu, …) run the reference backend. A fallback (the preferred backend is missing) is
logged once and recorded; ``backend_info()`` reports it. Nothing is silent.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata
import importlib.util
import logging
import os

import torch

from fastlangevin import _ext
from fastlangevin.ops import codes

logger = logging.getLogger("fastlangevin")

BACKENDS = ("reference", "cpu", "cuda", "triton")
# Preference for "auto": the compiled C++/CUDA kernels launch without Python overhead, which dominates for the
# small latents (B x 100) of latent EBMs; Triton is the next choice on a GPU.
AUTO_ORDER = {"cpu": ("cpu", "reference"), "cuda": ("cuda", "triton", "reference")}
OTHER_DEVICES_ORDER = ("reference",)  # plain PyTorch runs wherever torch does
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
SUPPORTED_DTYPES = {
    "reference": FLOAT_DTYPES,
    "cpu": (torch.float32, torch.float64),
    "cuda": FLOAT_DTYPES,
    "triton": FLOAT_DTYPES,
}


class BackendUnavailableError(RuntimeError, ValueError):
    """A backend was asked for that cannot run these tensors here; the message says why and what is available.
    A ``ValueError`` too: it is the ``backend=`` argument that cannot be honoured."""


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is unavailable, or what it runs on


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# tl.add / tl.mul with sanitize_overflow (the Philox rounds) are public from Triton 3.6 (torch >= 2.10 brings it).
MIN_TRITON = (3, 6)


@functools.lru_cache(maxsize=None)
def _triton_importable() -> str | None:
    """None when a recent enough Triton is installed, else why not (read from its metadata: nothing is imported)."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton; Linux x86_64 only)"
    try:
        version = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return None  # a differently named build (e.g. pytorch-triton): assume it is recent
    release = tuple(int(part) for part in version.split("+")[0].split(".")[:2] if part.isdigit())
    if release < MIN_TRITON:
        return (f"Triton {version} is too old: the kernels need >= {'.'.join(map(str, MIN_TRITON))} "
                f"(pip install 'triton>=3.6'; torch's CUDA builds bring it from torch 2.10)")
    return None


def check_backend_name(name) -> None:
    """``ValueError`` unless ``name`` is ``"auto"`` or one of ``BACKENDS`` (``TypeError`` for a non-string)."""
    if not isinstance(name, str):
        raise TypeError(f"backend must be a string, one of {('auto',) + BACKENDS}, got {type(name).__name__} "
                        f"{name!r}")
    if name != "auto" and name not in BACKENDS:
        raise ValueError(f"backend: unknown {name!r}; choose one of {('auto',) + BACKENDS}")


def backend_status(name: str, device_type: str) -> BackendStatus:
    """Whether backend ``name`` can run on tensors of ``device_type`` ('cpu', 'cuda', …) here, and why (not)."""
    check_backend_name(name)
    if name == "reference":
        return BackendStatus(name, True, "plain PyTorch")
    if name == "cpu":
        if device_type != "cpu":
            return BackendStatus(name, False, "runs on CPU tensors only")
        why = _ext.cpu_reason()
        return BackendStatus(name, why is None, why or _ext.cpu_build().description)
    if name == "cuda":
        if device_type != "cuda":
            return BackendStatus(name, False, "runs on CUDA tensors only")
        if not torch.cuda.is_available():
            return BackendStatus(name, False, "torch sees no CUDA device")
        route = _ext.cuda_route()  # the nvcc build must load and reach the driver, else NVRTC via CuPy
        return BackendStatus(name, route.reason is None, route.reason or f"CUDA kernels, {route.description}")
    if name == "triton":
        why = _triton_importable()
        if why:
            return BackendStatus(name, False, why)
        if device_type == "cuda":
            if not torch.cuda.is_available():
                return BackendStatus(name, False, "torch sees no CUDA device")
            return BackendStatus(name, True, "Triton, compiled for the GPU")
        if device_type != "cpu":
            return BackendStatus(name, False, "runs on CUDA tensors (and CPU tensors under TRITON_INTERPRET=1)")
        if triton_interpret():
            return BackendStatus(name, True, "Triton interpreter (TRITON_INTERPRET=1), for testing: slow")
        return BackendStatus(name, False, "CPU tensors need TRITON_INTERPRET=1 (the interpreter, for tests only)")
    raise AssertionError(name)  # pragma: no cover (check_backend_name)


_fallbacks: dict[tuple[str, str, str], str] = {}


def resolve_backend(requested: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend that runs the step op for tensors on ``device`` of ``dtype``.

    An explicit request that cannot run raises ``BackendUnavailableError`` naming the reason and the alternatives.
    Under ``torch.compile`` the answer is computed once at trace time and baked into the graph.
    """
    return _resolve(requested, device.type, dtype)


_on_resolve: dict[str, list] = {}


def on_resolve(name: str, prepare) -> None:
    """Run ``prepare()`` whenever backend ``name`` is chosen (lazy op registration); it must be idempotent."""
    _on_resolve.setdefault(name, []).append(prepare)


def _resolve(requested: str, device_type: str, dtype: torch.dtype) -> str:
    chosen = _choose(requested, device_type, dtype)
    for prepare in _on_resolve.get(chosen, ()):
        prepare()
    return chosen


# torch.compile runs _resolve once at trace time and bakes the answer in; this is what
# torch.compiler.assume_constant_result sets, without importing torch._dynamo at `import fastlangevin`.
_resolve._dynamo_marked_constant = True


def _choose(requested: str, device_type: str, dtype: torch.dtype) -> str:
    order = AUTO_ORDER.get(device_type, OTHER_DEVICES_ORDER)
    if requested != "auto":
        status = backend_status(requested, device_type)
        if not status.available:
            usable = [b for b in order if backend_status(b, device_type).available]
            raise BackendUnavailableError(
                f"backend {requested!r} is not available for {device_type} tensors: {status.reason}. "
                f"Available here: {usable}; backend='auto' picks the best of them.")
        if dtype not in SUPPORTED_DTYPES[requested]:
            raise BackendUnavailableError(
                f"backend {requested!r} supports {[str(d) for d in SUPPORTED_DTYPES[requested]]}, got {dtype}; "
                f"use backend='reference' or convert z")
        return requested
    skipped = [] if device_type in AUTO_ORDER else [f"{device_type} tensors run the plain-PyTorch reference only"]
    for name in order:
        status = backend_status(name, device_type)
        if status.available and dtype in SUPPORTED_DTYPES[name]:
            if skipped:
                note_fallback(f"{device_type} {dtype}", repr(name), "; ".join(skipped))
            return name
        skipped.append(f"{name}: {status.reason if not status.available else f'no {dtype} support'}")
    raise AssertionError("the reference backend is always available")  # pragma: no cover


def fused_chain_backend(step_backend: str) -> tuple[str | None, str]:
    """The fused whole-chain backend that goes with a resolved step backend, or ``(None, why not)``: the C++ chain
    beside the C++ step op, the Triton chain on GPUs (and under the interpreter)."""
    if step_backend == "reference":
        return None, "backend 'reference' runs the plain autograd chain"
    if step_backend == "cuda":
        status = backend_status("triton", "cuda")
        if status.available:
            return "triton", "the fused chain is a Triton kernel on GPUs"
        return None, f"the fused chain on GPUs needs Triton: {status.reason}"
    if step_backend == "cpu" and not hasattr(_ext.require_cpu(), "mlp_chain"):
        return None, "the C++ extension was built without the fused chain (rebuild: pip install -e .)"
    return step_backend, "fused"


# Caps the CPU's bfloat16 matrix unit (e.g. to test a lower one on a machine that has AMX): amx_bf16 (default: the
# best there is), avx512_bf16, or vector (the float32 kernel on the bfloat16 weights, upcast).
MATRIX_UNIT_ENV = "FASTLANGEVIN_MATRIX_UNIT"
_BF16_UNITS = ("amx_bf16", "avx512_bf16")  # best first
_BF16_TAGS = {"amx_bf16": "bf16-amx", "avx512_bf16": "bf16-avx512bf16", "vector": "bf16-fp32"}


@dataclasses.dataclass(frozen=True)
class Bf16Chain:
    """How a fused chain of a bfloat16 energy runs on a backend. ``tag``: what ``info.backend`` appends to
    ``"<backend>:fused"``: ``bf16-amx`` (AMX tiles), ``bf16-avx512bf16`` (AVX512-BF16 dot products), ``bf16-dot``
    (Triton ``tl.dot`` on bfloat16, tensor cores on a GPU), or ``bf16-fp32`` (no bfloat16 unit: the float32 kernel
    on the bfloat16 weights upcast). ``matrix_unit``: the CPU code (``codes.MATRIX_UNITS``); ``reason``: why not a
    better unit ("" when the best one runs)."""

    tag: str
    matrix_unit: int
    reason: str

    @property
    def upcast(self) -> bool:
        return self.tag == "bf16-fp32"


def bf16_chain(chain_backend: str) -> Bf16Chain:
    """How the fused chain ``chain_backend`` ("cpu" or "triton") runs a bfloat16 energy here. Triton: ``tl.dot`` on
    bfloat16 operands. On the CPU: the best bfloat16 unit the CPU, the OS and the build allow, capped by
    ``FASTLANGEVIN_MATRIX_UNIT``, else the float32 kernel on upcast weights. Raises ``ValueError`` for an unknown ``FASTLANGEVIN_MATRIX_UNIT``."""
    if chain_backend == "triton":
        return Bf16Chain("bf16-dot", codes.MATRIX_VECTOR, "")
    cap = os.environ.get(MATRIX_UNIT_ENV, "").strip().lower() or _BF16_UNITS[0]
    if cap not in codes.MATRIX_UNITS:
        raise ValueError(f"{MATRIX_UNIT_ENV} must be one of {', '.join(codes.MATRIX_UNITS)} or unset, got {cap!r}")
    module = _ext.require_cpu()
    status = module.matrix_units() if hasattr(module, "matrix_units") else {
        name: "the C++ extension predates the bfloat16 units (rebuild: pip install -e .)" for name in _BF16_UNITS}
    allowed = _BF16_UNITS[_BF16_UNITS.index(cap):] if cap in _BF16_UNITS else ()
    skipped = []
    for name in _BF16_UNITS:
        if name not in allowed:
            skipped.append(f"{name}: {MATRIX_UNIT_ENV}={cap}")
        elif status[name]:
            skipped.append(f"{name}: {status[name]}")
        else:
            return Bf16Chain(_BF16_TAGS[name], codes.MATRIX_UNITS[name], "; ".join(skipped))
    return Bf16Chain(_BF16_TAGS["vector"], codes.MATRIX_VECTOR, "; ".join(skipped))


def note_fallback(what: str, used: str, why: str) -> None:
    """Record (and log once) that ``what`` runs on ``used`` instead of the preferred path, and ``why``."""
    key = (what, used, why)
    if key not in _fallbacks:
        _fallbacks[key] = f"{what}: using {used} because {why}"
        logger.warning("fastlangevin fallback: %s", _fallbacks[key])


@dataclasses.dataclass
class BackendInfo:
    """What runs here: ``backends[device_type][name]`` statuses, ``auto[device_type]`` choices for float32,
    and the fallbacks taken so far in this process."""

    backends: dict[str, dict[str, BackendStatus]]
    auto: dict[str, str]
    fallbacks: list[str]
    extension: dict
    fused_chain: dict[str, str] = dataclasses.field(default_factory=dict)  # device type -> fused chain, or why none
    # device type -> what the fused chain of a bfloat16 energy (or one under torch.autocast(bfloat16)) runs, and why
    bf16_chain: dict[str, str] = dataclasses.field(default_factory=dict)

    def __str__(self) -> str:
        lines = ["fastlangevin backends"]
        for device_type, statuses in self.backends.items():
            lines.append(f"  {device_type} tensors (auto -> {self.auto.get(device_type, 'n/a')}):")
            for s in statuses.values():
                lines.append(f"    {s.name:<10} {'yes' if s.available else 'no ':<4} {s.reason}")
            if device_type in self.fused_chain:
                lines.append(f"    fused MLP chain: {self.fused_chain[device_type]}")
            if device_type in self.bf16_chain:
                lines.append(f"    bfloat16 chain:  {self.bf16_chain[device_type]}")
        if self.fallbacks:
            lines.append("  fallbacks taken:")
            lines.extend(f"    {f}" for f in self.fallbacks)
        return "\n".join(lines)


def backend_info() -> BackendInfo:
    """Which backends are built and available for CPU and CUDA tensors, what ``"auto"`` picks, and why."""
    backends, auto, fused, bf16 = {}, {}, {}, {}
    for device_type in ("cpu", "cuda"):
        backends[device_type] = {name: backend_status(name, device_type) for name in BACKENDS}
        if device_type == "cpu" or torch.cuda.is_available():
            auto[device_type] = next(b for b in AUTO_ORDER[device_type] if backends[device_type][b].available)
            chain, why = fused_chain_backend(auto[device_type])
            fused[device_type] = f"{chain}:fused" if chain else f"none ({why})"
            if chain:
                bf16[device_type] = _describe_bf16_chain(chain)
    return BackendInfo(backends, auto, list(_fallbacks.values()), _ext.build_info(), fused, bf16)


def _describe_bf16_chain(chain_backend: str) -> str:
    try:
        plan = bf16_chain(chain_backend)
    except ValueError as error:
        return f"none ({error})"
    what = {"bf16-amx": "AMX tiles", "bf16-avx512bf16": "AVX512-BF16 dot products",
            "bf16-dot": "tl.dot on bfloat16 operands, float32 accumulation",
            "bf16-fp32": "the float32 kernel on the bfloat16 weights upcast"}[plan.tag]
    return f"{chain_backend}:fused:{plan.tag} ({what}" + (f"; not {plan.reason}" if plan.reason else "") + ")"
