"""The fused Langevin step op: checks, backend dispatch and ``torch.library`` registration.

``langevin_step`` computes ``z − (ε/2)·(grad + prior_term) + σ·ω`` in one pass (see ``langevin_step_reference``
for the exact definition and ``philox`` for the noise). The compiled backends are registered as custom ops
(``torch.ops.fastlangevin.langevin_step_{cpu,cuda,triton}``) with fake implementations and one autograd formula:
the step is linear in ``z``, ``grad`` and the prior mean, so gradients reach all of them (and twice-differentiable
chains built with ``create_graph=True`` work). The reference backend is plain differentiable PyTorch.
"""

from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from fastlangevin import _ext
from fastlangevin.backends import on_resolve, resolve_backend
from fastlangevin.ops import codes
from fastlangevin.ops.codes import PRIOR_DIAGONAL, PRIOR_FLAT, PRIOR_NORMAL
from fastlangevin.ops.langevin_step_reference import langevin_step_reference
from fastlangevin.ops.philox import MAX_SEED

DTYPE_CODES = {getattr(torch, name): code for name, code in codes.DTYPES.items()}  # torch dtype -> binding code


def _ptr(t: Optional[torch.Tensor]) -> int:
    return 0 if t is None else t.data_ptr()


def launch_cpu(out, z, grad, rng_state, step_size, noise_scale, prior_kind, prior_mean, prior_inv_var) -> None:
    """The C++ kernel writing one step into ``out`` (contiguous CPU tensors; prior tensors in the compute dtype)."""
    _ext.require_cpu().langevin_step(z.data_ptr(), grad.data_ptr(), out.data_ptr(), z.numel(), _features(z),
                                     prior_kind, _ptr(prior_mean), _ptr(prior_inv_var), rng_state.data_ptr(),
                                     step_size, noise_scale, DTYPE_CODES[z.dtype], torch.get_num_threads())


def launch_cuda(out, z, grad, rng_state, step_size, noise_scale, prior_kind, prior_mean, prior_inv_var,
                kernels=None) -> None:
    """The CUDA kernel writing one step into ``out`` on the current stream of ``z``'s device. ``kernels``: the route
    (``fastlangevin._C_cuda`` or ``ops.nvrtc.NvrtcKernels``), default ``_ext.cuda_route()``'s."""
    with torch.cuda.device(z.device):
        stream = torch.cuda.current_stream(z.device).cuda_stream
        kernels = kernels or _ext.require_cuda()
        kernels.langevin_step(z.data_ptr(), grad.data_ptr(), out.data_ptr(), z.numel(), _features(z), prior_kind,
                              _ptr(prior_mean), _ptr(prior_inv_var), rng_state.data_ptr(), step_size, noise_scale,
                              DTYPE_CODES[z.dtype], 0, stream)


@torch.library.custom_op("fastlangevin::langevin_step_cpu", mutates_args=(), device_types="cpu")
def langevin_step_cpu(z: torch.Tensor, grad: torch.Tensor, rng_state: torch.Tensor, step_size: float,
                      noise_scale: float, prior_kind: int, prior_mean: Optional[torch.Tensor],
                      prior_inv_var: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.empty_like(z)
    launch_cpu(out, z.contiguous(), grad.contiguous(), rng_state, step_size, noise_scale, prior_kind, prior_mean,
               prior_inv_var)
    return out


@torch.library.custom_op("fastlangevin::langevin_step_cuda", mutates_args=(), device_types="cuda")
def langevin_step_cuda(z: torch.Tensor, grad: torch.Tensor, rng_state: torch.Tensor, step_size: float,
                       noise_scale: float, prior_kind: int, prior_mean: Optional[torch.Tensor],
                       prior_inv_var: Optional[torch.Tensor]) -> torch.Tensor:
    out = torch.empty_like(z)
    launch_cuda(out, z.contiguous(), grad.contiguous(), rng_state, step_size, noise_scale, prior_kind, prior_mean,
                prior_inv_var)
    return out


def _register_triton_op() -> None:
    """Registers ``fastlangevin::langevin_step_triton`` on first use: ``triton_op`` imports triton, which must not
    happen at ``import fastlangevin``. Runs eagerly even under ``torch.compile`` (from backend resolution)."""
    if "triton" in COMPILED_OPS:
        return
    from fastlangevin.ops.triton.langevin_step import langevin_step_triton as launch
    from fastlangevin.ops.triton.utils import wrap_triton

    @torch.library.triton_op("fastlangevin::langevin_step_triton", mutates_args=())
    def langevin_step_triton(z: torch.Tensor, grad: torch.Tensor, rng_state: torch.Tensor, step_size: float,
                             noise_scale: float, prior_kind: int, prior_mean: Optional[torch.Tensor],
                             prior_inv_var: Optional[torch.Tensor]) -> torch.Tensor:
        out = torch.empty_like(z)
        launch(z, grad, out, rng_state, step_size, noise_scale, prior_kind, prior_mean, prior_inv_var,
               wrap=wrap_triton)
        return out

    _register_formulas(langevin_step_triton)
    COMPILED_OPS["triton"] = langevin_step_triton


COMPILED_OPS = {"cpu": langevin_step_cpu, "cuda": langevin_step_cuda}
DIRECT_LAUNCH = {"cpu": launch_cpu, "cuda": launch_cuda}


def _features(z: torch.Tensor) -> int:
    return z[0].numel() if z.dim() > 0 and z.shape[0] > 0 else max(z.numel(), 1)


def _fake(z, grad, rng_state, step_size, noise_scale, prior_kind, prior_mean, prior_inv_var):
    return torch.empty_like(z)


def _setup_context(ctx, inputs, output):
    z, _, _, step_size, _, prior_kind, prior_mean, prior_inv_var = inputs
    ctx.half_step = step_size / 2
    ctx.prior_kind = prior_kind
    saved = (z, prior_mean, prior_inv_var) if prior_kind == PRIOR_DIAGONAL else ()
    ctx.save_for_backward(*saved)


def _backward(ctx, grad_out):
    """d out/d z = 1 − (ε/2)·inv_var, d out/d grad = −ε/2, d out/d mean = (ε/2)·inv_var,
    d out/d inv_var = −(ε/2)·(z − mean); the noise does not depend on any input."""
    h = ctx.half_step
    grad_mean = grad_inv_var = None
    if ctx.prior_kind == PRIOR_FLAT:
        grad_z = grad_out
    elif ctx.prior_kind == PRIOR_NORMAL:
        grad_z = grad_out * (1 - h)
    else:
        z, mean, inv_var = ctx.saved_tensors
        shape = z.shape[1:]
        g = grad_out.to(inv_var.dtype)
        grad_z = (g * (1 - h * inv_var.reshape(shape))).to(grad_out.dtype)
        if ctx.needs_input_grad[6]:
            grad_mean = (h * inv_var.reshape(shape) * g).sum(0).reshape(-1)
        if ctx.needs_input_grad[7]:
            grad_inv_var = (-h * (z.to(g.dtype) - mean.reshape(shape)) * g).sum(0).reshape(-1)
    return grad_z, -h * grad_out, None, None, None, None, grad_mean, grad_inv_var


def _register_formulas(op) -> None:
    op.register_fake(_fake)
    op.register_autograd(_backward, setup_context=_setup_context)


for _op in COMPILED_OPS.values():
    _register_formulas(_op)
on_resolve("triton", _register_triton_op)


def check_int(name: str, value, low: int = 0, high: int = MAX_SEED) -> int:
    """``value`` as an int in [low, high]: Python and NumPy integers, never bools (``TypeError`` / ``ValueError``
    naming ``name``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int in [{low}, {_show_bound(high)}], got {type(value).__name__} "
                        f"{value!r}")
    value = int(value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be an int in [{low}, {_show_bound(high)}], got {value}")
    return value


def check_real(name: str, value, what: str, *, low: float | None = None, strict: bool = False) -> float:
    """``value`` as a finite float, >= ``low`` (> ``low`` when ``strict``; no bound when None): Python and NumPy
    reals, never bools or tensors (``TypeError`` / ``ValueError`` saying ``name`` must be ``what``)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value) or (low is not None and (value < low or (strict and value == low))):
        raise ValueError(f"{name} must be {what}, got {value}")
    return value


def check_flag(name: str, value) -> bool:
    """``value`` as a bool: ``True``/``False`` or a NumPy bool, nothing merely truthy."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool_", "bool")):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {type(value).__name__} {value!r}")


def _show_bound(high: int) -> str:
    return "2**63 - 1" if high == MAX_SEED else str(high)


def make_rng_state(seed: int, counter: int = 0, device=None) -> torch.Tensor:
    """The int64 ``[seed, counter]`` tensor that kernels read (and a chain advances in place, graph-safely)."""
    seed, counter = check_int("seed", seed), check_int("counter", counter)
    return torch.tensor([seed, counter], dtype=torch.int64, device=device)


def check_rng_state(rng_state, z: torch.Tensor) -> None:
    """An int64, contiguous ``[seed, counter]`` on z's device; on the CPU its values are checked too (reading them
    from a GPU would synchronise every step; under ``torch.compile`` they are data the graph cannot branch on)."""
    if not isinstance(rng_state, torch.Tensor):
        raise TypeError(f"rng_state must be an int64 tensor [seed, counter], got {type(rng_state).__name__}")
    if rng_state.dtype != torch.int64 or rng_state.shape != (2,) or rng_state.device != z.device \
            or not rng_state.is_contiguous():
        raise ValueError(f"rng_state must be a contiguous int64 tensor [seed, counter] of shape (2,) on {z.device} "
                         f"(see fl.ops.make_rng_state), got {rng_state.dtype} {tuple(rng_state.shape)} "
                         f"{'' if rng_state.is_contiguous() else 'non-contiguous '}on {rng_state.device}")
    if rng_state.device.type == "cpu" and not torch.compiler.is_compiling() and bool((rng_state < 0).any()):
        raise ValueError(f"rng_state must hold a seed and a counter in [0, 2**63 - 1], got {rng_state.tolist()}")


def check_step_inputs(z: torch.Tensor, grad: torch.Tensor) -> None:
    """Shapes, dtypes and devices of the step's tensors; raises with the offending values."""
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"z must be a tensor of shape (B, *latent_shape), got {type(z).__name__}")
    if not isinstance(grad, torch.Tensor):
        raise TypeError(f"grad must be a tensor like z, got {type(grad).__name__}")
    if not z.is_floating_point():
        raise TypeError(f"z must be a floating-point tensor (Langevin moves a continuous state), got {z.dtype}; "
                        f"convert it with z.float()")
    check_device("z", z)
    if z.dim() < 1:
        raise ValueError("z must have a batch dimension: shape (B, *latent_shape)")
    if grad.shape != z.shape:
        raise ValueError(f"grad has shape {tuple(grad.shape)} but z has shape {tuple(z.shape)}")
    if grad.dtype != z.dtype:
        raise TypeError(f"grad has dtype {grad.dtype} but z has dtype {z.dtype}")
    if grad.device != z.device:
        raise ValueError(f"grad is on {grad.device} but z is on {z.device}")


def check_device(name: str, t: torch.Tensor) -> None:
    """A tensor with data: a meta tensor has none to sample."""
    if t.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (shapes only, no data); Langevin sampling needs values: pass a "
                         f"tensor on the CPU or a GPU")


def check_hyper(step_size, noise_scale) -> tuple[float, float]:
    """Validated ``(step_size, noise_scale)`` as floats; ``noise_scale=None`` means ``sqrt(step_size)``."""
    step_size = check_real("step_size", step_size, "a finite real number > 0", low=0, strict=True)
    if noise_scale is None:
        return step_size, math.sqrt(step_size)
    return step_size, check_real("noise_scale", noise_scale, "None or a finite real number >= 0", low=0)


def run_step(backend: str, z, grad, rng_state, step_size: float, noise_scale: float, prior_kind: int,
             prior_mean, prior_inv_var) -> torch.Tensor:
    """One step on an already resolved backend with already checked, contiguous inputs."""
    if backend == "reference":
        return langevin_step_reference(z, grad, rng_state, step_size, noise_scale, prior_kind, prior_mean,
                                       prior_inv_var)
    if backend in DIRECT_LAUNCH and not torch.compiler.is_compiling() and not (
            torch.is_grad_enabled() and any(t is not None and t.requires_grad
                                            for t in (z, grad, prior_mean, prior_inv_var))):
        out = torch.empty_like(z)  # nothing to differentiate: skip the custom op's dispatch (~20 µs a call)
        DIRECT_LAUNCH[backend](out, z, grad, rng_state, step_size, noise_scale, prior_kind, prior_mean,
                               prior_inv_var)
        return out
    if backend not in COMPILED_OPS:  # a caller that skipped resolve_backend (tests, benchmarks)
        _register_triton_op()
    return COMPILED_OPS[backend](z, grad, rng_state, step_size, noise_scale, prior_kind, prior_mean, prior_inv_var)


def kernel_prior_args(prior, z: torch.Tensor) -> tuple[int, torch.Tensor | None, torch.Tensor | None]:
    """``(prior_kind, mean, inv_var)`` for the kernels from ``prior``: ``None`` or a parameter-free kind's name
    (``"flat"``, ``"normal"``), or an object whose ``kernel_params(z)`` gives them (``fastlangevin.priors.Prior``)."""
    parameter_free = ("flat", "normal")
    if prior is None or isinstance(prior, str):
        if prior is not None and prior not in parameter_free:
            raise ValueError(f"prior: unknown name {prior!r}; use one of {parameter_free}, None or a fastlangevin "
                             f"prior object such as fl.DiagonalNormalPrior(mean, log_std)")
        return codes.PRIORS[prior or "flat"], None, None
    params = prior.kernel_params(z) if hasattr(prior, "kernel_params") else None
    if params is None:
        raise ValueError(f"prior: the step op evaluates 'normal', 'flat'/None and fastlangevin's Gaussian priors "
                         f"(fl.DiagonalNormalPrior(mean, log_std)), got {type(prior).__name__}; for another prior "
                         f"add −∇log prior(z) to grad and pass prior=None")
    return params


def langevin_step(z: torch.Tensor, grad: torch.Tensor, step_size: float, noise_scale: float | None = None, *,
                  prior="normal", seed: int = 0, counter: int = 0, rng_state: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """One fused Langevin step ``z − (ε/2)·(grad − ∇log prior(z)) + σ·ω`` → a new tensor like ``z``.

    z, grad: (B, *latent_shape), same float dtype and device; ``grad`` is ∇E(z) of the energy E (low = likely).
    step_size: ε > 0 (for the ``s²/2`` convention pass ``s**2``); noise_scale: σ ≥ 0, default ``sqrt(ε)``.
    prior: ``"normal"`` (N(0, I)), ``None``/``"flat"``, or a ``fastlangevin`` prior the kernel evaluates
    (``fl.DiagonalNormalPrior(mean, log_std)``); for any other prior add −∇log prior(z) to grad and pass None (the
    chain API ``fl.langevin`` does that by autograd).
    seed, counter: ints in [0, 2**63); the noise is ``philox.normal_noise`` at ``[seed, counter]``; or pass
    ``rng_state`` (a contiguous int64 ``[seed, counter]`` on z's device, see ``make_rng_state``), which
    graph-captured chains advance in place; on the CPU its values are checked, on a GPU they are not read.
    backend: ``"auto"`` or a name of ``fl.backend_info()``. Bad arguments raise ``TypeError``/``ValueError``
    naming them (``fl.BackendUnavailableError``, a ``ValueError``, for a backend that cannot run z); z and grad are
    not checked for finiteness (that would synchronise every step).
    """
    check_step_inputs(z, grad)
    step_size, noise_scale = check_hyper(step_size, noise_scale)
    seed, counter = check_int("seed", seed), check_int("counter", counter)
    params = kernel_prior_args(prior, z)
    chosen = resolve_backend(backend, z.device, z.dtype)
    if rng_state is None:
        rng_state = make_rng_state(seed, counter, z.device)
    else:
        check_rng_state(rng_state, z)
    return run_step(chosen, z.contiguous(), grad.contiguous(), rng_state, step_size, noise_scale, *params)
