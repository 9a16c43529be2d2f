"""The sampler API: ``langevin(energy, z0, n_steps, step_size)`` and ``LangevinSampler``.

Target ``p(z) ∝ prior(z)·exp(−E(z))``, E = ``energy`` (low = likely; the papers' f_α is −E). Each step::

    z ← z − (ε/2)·(∇E(z) − ∇log prior(z)) + σ·ω,   ω ~ N(0, I),   ε = step_size, σ = noise_scale (default √ε)

Code written as ``z ← z − s²/2·∇ + s·ω`` (LEBM, the joint-EBM paper) passes ``step_size=s**2``.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Callable, NamedTuple

import torch
from torch import nn

from fastlangevin.backends import (bf16_chain, check_backend_name, fused_chain_backend, note_fallback,
                                   resolve_backend)
from fastlangevin.energies import FusedTerms, check_latents, fused_terms, mixed_precision
from fastlangevin.graphs import check_cuda_graph, run_graphed, use_graph
from fastlangevin.ops.codes import MATRIX_VECTOR, METHODS, PRIOR_FLAT, PRIOR_NORMAL
from fastlangevin.ops.mlp_chain import FUSED_DTYPES, MLPNetwork, chain_limit, run_mlp_chain
from fastlangevin.ops.langevin_step import (check_device, check_flag, check_hyper, check_int, check_real,
                                            make_rng_state, run_step)
from fastlangevin.ops.philox import MAX_SEED, acceptance_uniforms
from fastlangevin.priors import Prior, as_prior
from fastlangevin.profiling import nvtx_range


class NonFiniteEnergyError(FloatingPointError):
    """The energy (or its gradient) was not finite during a chain; the message names the step."""


@dataclasses.dataclass
class LangevinInfo:
    """What happened along a chain.

    energies: (n_steps, B), E(z_k) of the state before step k; grad_norms: (n_steps, B), per-sample ‖∇E(z_k)‖
    (the energy's gradient alone, before clipping); backend: what ran the chain;
    seed: the chain's noise seed (pass it back to reproduce the chain); accepted: (n_steps, B) bool for MALA;
    fallback: why the fused chain did not run an energy of a kind it runs (as ``fl.backend_info()`` says), else
    None.
    """

    energies: torch.Tensor | None
    grad_norms: torch.Tensor | None
    backend: str
    seed: int
    step_size: float
    noise_scale: float
    method: str = "ula"
    accepted: torch.Tensor | None = None
    fallback: str | None = None

    @property
    def acceptance_rate(self) -> float | None:
        """MALA's share of accepted proposals over all steps and samples; None for ULA and for a chain of no steps
        (no proposal was made)."""
        if self.accepted is None or self.accepted.numel() == 0:
            return None
        return self.accepted.float().mean().item()


def _per_sample(values, z: torch.Tensor, what: str, hint: str) -> torch.Tensor:
    """The one rule for what an energy or a prior returns: a tensor of B values (shape (B,) or (B, 1)), of z's
    dtype and device; returns it as (B,). ``what`` names the argument (``energy(z)``, ``prior: log_prob(z)``)."""
    batch = z.shape[0]
    if not isinstance(values, torch.Tensor):
        raise TypeError(f"{what} must return a tensor of shape ({batch},), got {type(values).__name__}")
    if values.dim() == 0 or values.shape[0] != batch or values.numel() != batch:
        raise ValueError(f"{what} must return per-sample values of shape ({batch},) for z of shape "
                         f"{tuple(z.shape)}, got {tuple(values.shape)}; reduce over the non-batch dimensions "
                         f"(and do not sum over the batch)")
    if values.device != z.device:
        raise ValueError(f"{what} returned a tensor on {values.device} for z on {z.device}")
    if values.dtype != z.dtype:
        raise TypeError(f"{what} returned {values.dtype} for z of {z.dtype}; {hint}")
    return values.reshape(batch)


def _check_energy_output(e, z: torch.Tensor) -> torch.Tensor:
    e = _per_sample(e, z, "energy(z)", "make the energy's parameters and z the same dtype (e.g. "
                    "energy.to(z.dtype)), or bfloat16 parameters with a float32 z (mixed precision)")
    if not e.requires_grad:
        raise ValueError("energy(z) returned a tensor that does not depend on z through autograd "
                         "(was it computed under torch.no_grad() or detached?)")
    return e


def _first_call(call, z: torch.Tensor, energy, mixed: bool):
    """``call(z)``, the first evaluation of ``energy`` in a chain. A module whose parameters do not match z (dtype,
    device) fails inside torch (``F.linear``: "mat1 and mat2 must have the same dtype"); name the argument and the
    fix. ``mixed``: a bfloat16 chain, whose parameters differ from z's dtype by design."""
    try:
        return call(z)
    except RuntimeError as error:
        for name, p in energy.named_parameters() if isinstance(energy, nn.Module) else ():
            if p.is_floating_point() and p.dtype != z.dtype and not mixed:
                raise TypeError(f"energy: parameter {name} is {p.dtype} but z is {z.dtype}; make them the same "
                                f"dtype (energy.to({z.dtype}) or z0.to({p.dtype})). The energy raised: {error}") \
                    from error
            if p.device != z.device:
                raise ValueError(f"energy: parameter {name} is on {p.device} but z is on {z.device}; move one of "
                                 f"them (energy.to(z0.device)). The energy raised: {error}") from error
        raise


def _check_z0(z0) -> None:
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"z0 must be a tensor of shape (B, *latent_shape), got {type(z0).__name__}")
    if not z0.is_floating_point():
        raise TypeError(f"z0 must be a floating-point tensor (Langevin moves a continuous state), got {z0.dtype}; "
                        f"convert it with z0.float()")
    check_device("z0", z0)
    if z0.dim() < 1 or z0.shape[0] == 0:
        raise ValueError(f"z0 must have shape (B, *latent_shape) with B >= 1, got {tuple(z0.shape)}")
    if not bool(torch.isfinite(z0).all()):
        raise ValueError("z0 has non-finite entries")


def check_settings(n_steps, step_size, noise_scale, clip_grad, method, backend, cuda_graph) -> dict:
    """The chain settings, checked and normalised (ints, floats; ``noise_scale`` None stays None): one rule for
    ``langevin`` and ``LangevinSampler`` (which checks them at construction). Raises ``TypeError``/``ValueError``
    naming the setting."""
    n_steps = check_int("n_steps", n_steps)
    step, noise = check_hyper(step_size, noise_scale)
    if clip_grad is not None:
        clip_grad = check_real("clip_grad", clip_grad, "None or a finite real number > 0", low=0, strict=True)
    if not isinstance(method, str):
        raise TypeError(f"method must be one of {sorted(METHODS)}, got {type(method).__name__} {method!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {sorted(METHODS)}, got {method!r}")
    if method == "mala" and not math.isclose(noise, math.sqrt(step), rel_tol=1e-12):
        raise ValueError(f"method='mala' needs noise_scale = sqrt(step_size) = {math.sqrt(step):.6g} (its "
                         f"Metropolis test assumes it), got noise_scale={noise}")
    check_backend_name(backend)
    if cuda_graph is not None:
        cuda_graph = check_flag("cuda_graph", cuda_graph)
    return dict(n_steps=n_steps, step_size=step, noise_scale=None if noise_scale is None else noise,
                clip_grad=clip_grad, method=method, backend=backend, cuda_graph=cuda_graph)


def _check_info_fits(n_steps: int, z0: torch.Tensor) -> None:
    """``return_info`` keeps (n_steps, B) energies and gradient norms: where they cannot be allocated, say so before
    the chain runs (naming n_steps), not after hours of steps or with an allocator's message."""
    shape = (n_steps, z0.shape[0], 2)
    try:
        torch.empty(shape, dtype=z0.dtype, device=z0.device)  # freed at once; the chain allocates its own
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
        size = math.prod(shape) * z0.element_size() / 2**30
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(f"n_steps={n_steps} with return_info=True keeps ({n_steps}, {z0.shape[0]}) energies and "
                         f"gradient norms ({size:.3g} GiB), which cannot be allocated on {z0.device} ({reason}); run "
                         f"fewer steps per call or pass return_info=False") from None


def _check_energy(energy, z0: torch.Tensor | None) -> None:
    """A callable; fastlangevin's own energies also fit z0 (``energies.check_latents``), when there is one."""
    if not callable(energy):
        raise TypeError(f"energy must be callable (an nn.Module or a function), got {type(energy).__name__}")
    if z0 is not None:
        check_latents(energy, z0)  # the same rule whichever path runs the chain


def langevin(energy: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, n_steps: int, step_size: float, *,
             noise_scale: float | None = None, prior="normal", seed: int | None = None, backend: str = "auto",
             clip_grad: float | None = None, return_info: bool = False, create_graph: bool = False,
             method: str = "ula", cuda_graph: bool | None = None):
    """Run ``n_steps`` of Langevin dynamics from ``z0``; returns ``z_K`` (and a ``LangevinInfo``).

    energy: maps z (B, *latent_shape) to per-sample energies (B,) (or (B, 1)) of z's dtype; an ``nn.Module`` or
        any callable. It runs in the mode it is in: a module in train mode updates its BatchNorm running statistics
        at every evaluation of a chain (and draws dropout masks); call ``energy.eval()`` to sample without that.
    z0: (B, *latent_shape) float tensor on the CPU or a GPU (not meta), finite; never modified (neither its values
        nor its ``requires_grad``), and the result is always a new tensor.
    n_steps: int >= 0 (Python or NumPy); step_size: ε > 0; noise_scale: σ ≥ 0 (default √ε; 0 gives gradient
        descent on E − log prior): real numbers (Python or NumPy), never bools.
    prior: ``"normal"`` (N(0, I), default), ``None`` (flat), ``(mean, log_std)`` or a ``fastlangevin.Prior``,
        or any ``log_prob`` callable (z ↦ (B,), differentiated by autograd).
    seed: int in [0, 2**63) for a reproducible chain; ``None`` draws one from torch's default generator.
    backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"`` (see ``fl.backend_info()``).
    clip_grad: optional bound > 0 on each sample's ‖∇E(z)‖ (the energy gradient, before the prior term).
    create_graph: keep the graph through the chain, so ``z_K`` is differentiable w.r.t. ``z0`` and the energy's
        parameters (through clipping too); by default the result is detached and no parameter collects gradients.
    method: ``"ula"`` (unadjusted, the papers' sampler) or ``"mala"`` (Metropolis-adjusted: exact stationary
        distribution, per-sample accept/reject, ``info.acceptance_rate``; noise_scale must be √ε). A MALA proposal
        whose energy is not finite is rejected.
    return_info, create_graph: bools (Python or NumPy).

    cuda_graph: capture the K steps (energy, autograd gradient, fused step) into one CUDA graph and replay it (fresh
        noise each replay: seed and counter live in device memory). A graph is cached under what it reads (z0's
        shape, dtype and device, the settings, the energy's and prior's parameter storage, attributes and train/eval
        flags; see ``fastlangevin.graphs``), so an optimiser step is seen by the next replay and anything else
        that changes captures anew. Default (None): on for CUDA tensors without ``create_graph`` when the energy
        and prior are ``nn.Module``s; a plain function is not graphed by default (said once in the log and
        ``fl.backend_info()``), ``cuda_graph=True`` graphs it too, keyed on its code, closure and the globals it
        names. A capture that fails, or one repeated every call because the energy changes, falls back to the
        eager chain with one warning naming the cause.

    An ``fl.MLPEnergy`` (or an ``fl.GaussianPosteriorEnergy`` of an ``MLPEnergy`` and an ``fl.MLP`` generator) runs
    the whole chain as one fused kernel where it can (not with ``create_graph``, a prior the kernel cannot evaluate,
    a network beyond the kernel's limits, or ``backend="reference"``); ``info.backend`` then says ``cpu:fused`` or
    ``triton:fused``; so does any energy module whose ``fused_energy()`` returns one of them (a composition it
    equals, see ``fastlangevin.energies.fused_terms``). Why it did not is logged once and shown by
    ``fl.backend_info()``.

    Dtypes, one rule on every path: the chain runs in z0's dtype. The energy (and a ``log_prob`` prior) returns
    values of z's dtype, and a module's parameters are of z0's dtype (or all bfloat16 with a float32 z0: mixed
    precision, below) and on its device. For fastlangevin's energies this is checked before a path is chosen, so
    the fused chain, the step-op chain, ``create_graph`` and a callable prior fail alike with the same
    ``TypeError``/``ValueError`` naming ``energy``; any other module is named by the same rule when its first
    evaluation fails. A Gaussian prior's mean and log_std are cast to the step's compute dtype.

    Mixed precision (bfloat16): a float32 z0 with an energy whose parameters are bfloat16
    (``energy.to(torch.bfloat16)``), or a float32 energy called under ``torch.autocast(device_type,
    dtype=torch.bfloat16)``, runs the chain with the weights and the activations that feed the matrix products in
    bfloat16, accumulated in float32; the state z, the prior, the noise, the energies and the update stay float32,
    and z_K is float32. The fused chain then says which matrix unit ran in ``info.backend``: ``cpu:fused:bf16-amx``
    (AMX tiles), ``cpu:fused:bf16-avx512bf16`` (AVX512-BF16), ``cpu:fused:bf16-fp32`` where the CPU has neither
    (the float32 kernel on the bfloat16 weights upcast), or ``triton:fused:bf16-dot`` (``tl.dot`` on bfloat16
    operands: tensor cores on a GPU); ``FASTLANGEVIN_MATRIX_UNIT`` caps the CPU's unit (amx_bf16, avx512_bf16,
    vector). Off the fused chain the energy runs under ``torch.autocast(bfloat16)``. Not bit-equal to float32: see
    tests/test_bf16_chain.py for the bounds and statistical tests that hold instead.

    The energy's parameters keep their ``requires_grad`` and ``.grad``. A non-finite energy raises
    ``NonFiniteEnergyError`` naming the first step and how many samples. Every other bad argument raises
    ``TypeError`` or ``ValueError`` naming it, before anything runs, whichever path would have run the chain
    (``fl.BackendUnavailableError``, a ``ValueError``, for a backend that cannot run these tensors).
    """
    _check_z0(z0)
    checked = check_settings(n_steps, step_size, noise_scale, clip_grad, method, backend, cuda_graph)
    n_steps, step_size, clip_grad, cuda_graph = (checked[k] for k in ("n_steps", "step_size", "clip_grad",
                                                                       "cuda_graph"))
    noise_scale = math.sqrt(step_size) if noise_scale is None else checked["noise_scale"]
    seed = None if seed is None else check_int("seed", seed)
    return_info, create_graph = check_flag("return_info", return_info), check_flag("create_graph", create_graph)
    _check_energy(energy, z0)
    prior = as_prior(prior)
    prior.kernel_params(z0)  # a Gaussian prior that does not fit the latent shape fails here, on every path
    check_cuda_graph(cuda_graph, z0, create_graph)
    if return_info:
        _check_info_fits(n_steps, z0)
    chosen = resolve_backend(backend, z0.device, z0.dtype)
    fused, fallback = _fused_plan(energy, z0, prior, chosen, create_graph)
    if seed is None:
        seed = int(torch.randint(0, MAX_SEED, (1,)).item())

    if fused is not None:
        with nvtx_range(f"fastlangevin.chain fused {n_steps} steps"):
            return _run_fused(fused, energy, z0, n_steps, step_size, noise_scale, prior, seed, clip_grad,
                              return_info, method)
    settings = dict(n_steps=n_steps, step_size=step_size, noise_scale=noise_scale, prior=prior, backend=chosen,
                    clip_grad=clip_grad, return_info=return_info, create_graph=create_graph, method=method)
    with torch.inference_mode(False), torch.enable_grad(), nvtx_range(f"fastlangevin.chain {n_steps} steps"):
        result = None
        if use_graph(cuda_graph, energy, prior, z0, create_graph, n_steps):
            result = run_graphed(run_chain_body, energy, z0, seed, settings)  # None: capture failed, warned
        if result is None:
            # the chain sets requires_grad on its state: never on the caller's z0 (an alias when it has none)
            z = ((z0 if z0.requires_grad else z0.detach()).contiguous() if create_graph
                 else z0.detach().clone(memory_format=torch.contiguous_format))
            result = run_chain_body(energy, z, make_rng_state(seed, 0, z0.device), **settings)
            if result.z.untyped_storage().data_ptr() == z0.untyped_storage().data_ptr():  # no step was taken
                result.z = result.z.clone()
    _raise_if_not_finite(result.first_bad, result.z, z0.shape[0])
    if return_info:
        backend_used = chosen + (":graph" if result.graphed else "")
        return result.z, LangevinInfo(result.energies, result.grad_norms, backend_used, seed, step_size,
                                      noise_scale, method, result.accepted, fallback)
    return result.z


class _FusedPlan(NamedTuple):
    """A chain the fused kernel runs: the backend and the energy's terms as the kernel takes them; for a bfloat16
    chain, the CPU's matrix unit and the tag ``info.backend`` gets (``backends.Bf16Chain``)."""

    backend: str
    energy: MLPNetwork
    output_sign: float
    generator: MLPNetwork | None
    target: torch.Tensor | None
    likelihood_scale: float
    matrix_unit: int = MATRIX_VECTOR
    tag: str | None = None


def _bfloat16_chain(modules, z0: torch.Tensor) -> bool:
    """Whether a chain of these modules from z0 runs in mixed precision: bfloat16 parameters for float32 z0
    (``energies.mixed_precision``), or float32 z0 and parameters under ``torch.autocast(z0's device, bfloat16)``."""
    if mixed_precision(modules, z0):
        return True
    device_type = z0.device.type
    return (z0.dtype == torch.float32 and torch.is_autocast_enabled(device_type)
            and torch.get_autocast_dtype(device_type) == torch.bfloat16)


def _in_dtype(network: MLPNetwork, dtype: torch.dtype) -> MLPNetwork:
    return network._replace(weights=[w.to(dtype) for w in network.weights],
                            biases=[b.to(dtype) for b in network.biases])


def _fused_plan(energy, z0, prior: Prior, step_backend: str,
                create_graph: bool) -> tuple[_FusedPlan | None, str | None]:
    """(the fused chain for this call, None) or (None, why it cannot be used: noted once), or (None, None) for an
    energy of a kind the fused chain does not run."""
    terms = fused_terms(energy, z0.shape[0])
    if terms is None:
        return None, None
    backend, why = fused_chain_backend(step_backend)
    if backend is not None:
        if create_graph:
            backend, why = None, "create_graph=True needs the autograd chain"
        elif prior.kernel_params(z0) is None:
            backend, why = None, f"the prior {prior} is not one the kernel evaluates (N(0, I), flat, diagonal normal)"
        elif z0.dtype not in FUSED_DTYPES:
            backend, why = None, f"the fused chain runs float32/float64, not {z0.dtype}"
        elif isinstance(terms, str):
            backend, why = None, terms
        else:  # the terms fit z0: energies.check_latents ran first
            plan = _plan_networks(backend, terms, z0, type(energy).__name__)
            why = chain_limit(backend, z0.shape[0], plan.energy, plan.generator, z0.dtype)
            if why is None:
                return plan, None
            backend = None
    note_fallback(f"{type(energy).__name__} chain on {z0.device.type}", f"step-op chain ({step_backend})", why)
    return None, why


def _plan_networks(backend: str, terms: FusedTerms, z0: torch.Tensor, energy_name: str) -> _FusedPlan:
    """The networks as the kernel takes them: in z0's dtype, or for a mixed-precision chain in bfloat16 (rounded
    once per chain under autocast) with the matrix unit of ``bf16_chain``, upcast where no unit takes bfloat16."""
    networks = [terms.energy] + ([] if terms.generator is None else [terms.generator])
    dtype, unit, tag, upcast = z0.dtype, MATRIX_VECTOR, None, False
    if _bfloat16_chain(networks, z0):
        chain = bf16_chain(backend)
        dtype, unit, tag, upcast = torch.bfloat16, chain.matrix_unit, chain.tag, chain.upcast
        if chain.reason:
            note_fallback(f"bfloat16 {energy_name} chain on {z0.device.type}", f"{backend}:fused:{tag}", chain.reason)
    kernel = [net.kernel_network(dtype, z0.device) for net in networks]
    if upcast:  # rounded to bfloat16 once (autocast's rounding), then run by the float32 kernel
        kernel = [_in_dtype(net, z0.dtype) for net in kernel]
    return _FusedPlan(backend, kernel[0], terms.energy.output_sign, kernel[1] if len(kernel) > 1 else None,
                      None if terms.target is None else terms.target.to(z0.dtype), terms.likelihood_scale, unit, tag)


def _run_fused(plan: _FusedPlan, energy, z0, n_steps, step_size, noise_scale, prior, seed, clip_grad, return_info,
               method):
    rng_state = make_rng_state(seed, 0, z0.device)
    out = run_mlp_chain(plan.backend, z0, plan.energy, plan.output_sign, n_steps, step_size, noise_scale,
                        prior.kernel_params(z0), rng_state, clip_grad, METHODS[method], return_info, plan.generator,
                        plan.target, plan.likelihood_scale, plan.matrix_unit)
    bad = out.first_bad >= 0
    if bool(bad.any()):  # one host sync per chain
        step = int(out.first_bad[bad].min())
        raise NonFiniteEnergyError(_non_finite_message(step, int((out.first_bad == step).sum()), z0.shape[0]))
    _check_final_z(out.z)
    if return_info:
        backend = f"{plan.backend}:fused" + (f":{plan.tag}" if plan.tag else "")
        return out.z, LangevinInfo(out.energies, out.grad_norms, backend, seed, step_size,
                                   noise_scale, method, out.accepted)
    return out.z


class _Evaluator:
    """E(z) and the drift gradient of one chain: ``∇E`` clipped per sample (plus ``−∇log prior``, unclipped, for
    priors the kernel cannot fuse); remembers what ``LangevinInfo`` and the finiteness check need. A mixed-precision
    chain (``_bfloat16_chain``) evaluates the energy under ``torch.autocast(bfloat16)`` and its energies in z's
    dtype, so that z, the gradient and the update stay float32."""

    def __init__(self, energy, prior: Prior, fused_prior: bool, clip_grad, create_graph: bool, track: bool):
        self.energy, self.prior, self.fused_prior = energy, prior, fused_prior
        self.clip_grad, self.create_graph, self.track = clip_grad, create_graph, track
        self.checked = False
        self.mixed = False

    def _energy(self, z):
        if not self.mixed:
            return self.energy(z)
        with torch.autocast(z.device.type, dtype=torch.bfloat16):
            e = self.energy(z)
        return e.to(z.dtype) if isinstance(e, torch.Tensor) and e.is_floating_point() else e

    def __call__(self, z):
        """→ (energy E(z) (B,), target U(z) − U_fused_prior(z) (B,), drift gradient, gradient norms or None)."""
        batch = z.shape[0]
        if not z.requires_grad:
            z.requires_grad_(True)
        with nvtx_range("energy"):
            if self.checked:
                e = self._energy(z).reshape(batch)
            else:
                self.mixed = _bfloat16_chain([self.energy], z)
                e = _check_energy_output(_first_call(self._energy, z, self.energy, self.mixed), z)
            self.checked = True
            neg_log_prior = None
            if not self.fused_prior:
                neg_log_prior = -_per_sample(self.prior.log_prob(z), z, "prior: log_prob(z)",
                                             "make the prior's parameters and z the same dtype")
            target = e if neg_log_prior is None else e + neg_log_prior
        need_norms = self.track or self.clip_grad is not None
        with nvtx_range("energy gradient"):
            # ∇E alone where its norm is needed (clipping, info) and the prior is not fused; otherwise one backward
            separate = need_norms and neg_log_prior is not None
            grad = _grad_or_zeros(e if separate else target, z, self.create_graph)
        # with create_graph the clip factor is differentiated too (it depends on z through the norm)
        norms = grad.flatten(1).norm(dim=1) if need_norms else None
        if self.clip_grad is not None:
            grad = grad * (self.clip_grad / (norms + 1e-12)).clamp(max=1.0).reshape((batch,) + (1,) * (z.dim() - 1))
        if separate:
            grad = grad + _grad_or_zeros(neg_log_prior, z, self.create_graph)
        if not self.create_graph:
            target, grad = target.detach(), grad.detach()
        return e.detach(), target, grad.contiguous(), None if norms is None else norms.detach()


def _grad_or_zeros(values: torch.Tensor, z: torch.Tensor, create_graph: bool) -> torch.Tensor:
    """∇_z Σ values (zeros where the values do not depend on z)."""
    grad = torch.autograd.grad(values.sum(), z, create_graph=create_graph, allow_unused=True)[0]
    return torch.zeros_like(z) if grad is None else grad


def _fused_prior_energy(prior_args, z):
    """U_prior(z) = −log prior(z) (up to a constant) and its gradient, for the priors the kernel evaluates."""
    kind, mean, inv_var = prior_args
    if kind == PRIOR_FLAT:
        return torch.zeros(z.shape[0], dtype=z.dtype, device=z.device), torch.zeros_like(z)
    diff = z if kind == PRIOR_NORMAL else z - mean.to(z.dtype).reshape(z.shape[1:])
    grad = diff if kind == PRIOR_NORMAL else inv_var.to(z.dtype).reshape(z.shape[1:]) * diff
    return 0.5 * (diff * grad).flatten(1).sum(1), grad


@dataclasses.dataclass
class ChainResult:
    """A chain's outputs before the host looks at them (no sync yet): z (like z0), energies/grad_norms (K, B) or
    None, accepted (K, B) bool or None, first_bad (2,) int64: [the first step whose energy was not finite, for how
    many samples], [-1, 0] when none; graphed: replayed from a CUDA graph."""

    z: torch.Tensor
    energies: torch.Tensor | None
    grad_norms: torch.Tensor | None
    accepted: torch.Tensor | None
    first_bad: torch.Tensor
    graphed: bool = False


# Steps whose energies are held before they are reduced to ``first_bad``: a chain keeps O(B·FINITE_CHECK_STEPS)
# values without return_info, whatever n_steps, and pays one reduction per block (no per-step bookkeeping kernels).
FINITE_CHECK_STEPS = 256


def _note_first_bad(first_bad: torch.Tensor, energies: list, offset: int) -> torch.Tensor:
    """``first_bad`` updated with the energies (B,) of steps offset, offset + 1, …: kernels only, no host sync."""
    bad = (~torch.isfinite(torch.stack(energies))).sum(1)  # (steps,)
    has = bad > 0
    k = torch.argmax(has.to(torch.int32)).reshape(1)  # the first step with a non-finite energy (0 when none)
    candidate = torch.cat([k + offset, bad.gather(0, k)])  # gather: indexing by a tensor would read it on the host
    return torch.where((first_bad[0] < 0) & has.any(), candidate, first_bad)


def run_chain_body(energy, z, rng_state, n_steps, step_size, noise_scale, prior: Prior, backend, clip_grad,
                   return_info, create_graph, method) -> ChainResult:
    """The step-op chain from ``z`` (contiguous; detached unless ``create_graph``) with the noise stream at
    ``rng_state`` (advanced in place, one per step). Launches kernels only: safe to capture in a CUDA graph.
    Per-step outputs are collected in lists and stacked once, so a step costs no bookkeeping kernels; without
    ``return_info`` only the last ``FINITE_CHECK_STEPS`` energies are held (memory does not grow with n_steps)."""
    kernel_prior = prior.kernel_params(z)
    prior_args = kernel_prior if kernel_prior is not None else (PRIOR_FLAT, None, None)
    evaluate = _Evaluator(energy, prior, kernel_prior is not None, clip_grad, create_graph, return_info)
    energies, grad_norms, accepted, unchecked = [], [], [], []
    first_bad = torch.tensor([-1, 0], dtype=torch.int64, device=z.device)
    counter = rng_state.narrow(0, 1, 1)  # a view: advancing it is one in-place kernel (graph-safe, no host sync)
    if method == "mala" and n_steps:
        e, target, grad, norms = evaluate(z)
    for k in range(n_steps):
        with nvtx_range(f"step {k}"):
            if method == "ula":
                e, _, grad, norms = evaluate(z)
            unchecked.append(e)
            if return_info:
                energies.append(e)
                grad_norms.append(norms)
            if len(unchecked) == FINITE_CHECK_STEPS or k == n_steps - 1:
                first_bad = _note_first_bad(first_bad, unchecked, k + 1 - len(unchecked))
                unchecked = []
            z_now = z if create_graph else z.detach()
            with nvtx_range("update"):
                proposal = run_step(backend, z_now, grad, rng_state, step_size, noise_scale, *prior_args)
            if method == "ula":
                z = proposal
            else:
                e_new, target_new, grad_new, norms_new = evaluate(proposal)
                accept = _mala_accept(z_now, proposal, target, target_new, grad, grad_new, prior_args, step_size,
                                      rng_state)
                if return_info:
                    accepted.append(accept)
                z, e, target, grad = (_where(accept, new, old) for new, old in
                                      ((proposal, z_now), (e_new, e), (target_new, target), (grad_new, grad)))
                norms = None if norms is None else _where(accept, norms_new, norms)
            counter.add_(1)

    empty = z.new_empty((0, z.shape[0]))
    stacked = {name: (torch.stack(values) if values else empty) if return_info else None
               for name, values in (("energies", energies), ("grad_norms", grad_norms))}
    accepted = (torch.stack(accepted) if accepted else empty.bool()) if method == "mala" and return_info else None
    return ChainResult(z if create_graph else z.detach(), stacked["energies"], stacked["grad_norms"], accepted,
                       first_bad)


def _where(mask, a, b):
    return torch.where(mask.reshape((-1,) + (1,) * (a.dim() - 1)), a, b)


def _mala_accept(z, proposal, target, target_new, grad, grad_new, prior_args, step_size, rng_state):
    """Metropolis-Hastings test of the Langevin proposal: log α = U(z) − U(z') − [‖z − z' + (ε/2)∇U(z')‖² −
    ‖z' − z + (ε/2)∇U(z)‖²]/(2ε), U = E − log prior; accept where log u < log α (u: ``acceptance_uniforms``).
    A proposal with a non-finite energy is rejected."""
    u_prior, g_prior = _fused_prior_energy(prior_args, z)
    u_prior_new, g_prior_new = _fused_prior_energy(prior_args, proposal)
    half = step_size / 2
    backward = (z - proposal + half * (grad_new + g_prior_new)).flatten(1).pow(2).sum(1)
    forward = (proposal - z + half * (grad + g_prior)).flatten(1).pow(2).sum(1)
    log_alpha = (target + u_prior) - (target_new + u_prior_new) - (backward - forward) / (2 * step_size)
    u = acceptance_uniforms(z.shape[0], rng_state, z.dtype)
    return torch.log(u).to(log_alpha.dtype) < log_alpha.detach()


def _raise_if_not_finite(first_bad: torch.Tensor, z: torch.Tensor, batch: int) -> None:
    """One host sync per chain (not per step): the first step whose energy was not finite, if any."""
    step, count = first_bad.tolist()
    if step >= 0:
        raise NonFiniteEnergyError(_non_finite_message(step, count, batch))
    _check_final_z(z)


def _non_finite_message(step: int, count: int, batch: int) -> str:
    return (f"energy was not finite at step {step} (0-based) for {count} of {batch} samples; z0 was not modified. "
            f"Try a smaller step_size or clip_grad.")


def _check_final_z(z: torch.Tensor) -> None:
    if not bool(torch.isfinite(z).all()):
        raise NonFiniteEnergyError("the chain produced non-finite z although every energy was finite (the energy "
                                   "gradient overflowed); rerun with return_info=True to see the gradient norms, "
                                   "or use clip_grad / a smaller step_size.")


class LangevinSampler(nn.Module):
    """Holds an energy and the chain settings; ``sampler(z0)`` runs ``fl.langevin`` with them.

    ``sampler.sample(n, latent_shape)`` starts the chain from the prior (N(0, I) by default). Every setting is
    checked here, at construction, by the rule ``fl.langevin`` applies (``TypeError``/``ValueError`` naming it);
    what depends on the tensors of a call (a backend that cannot run them, ``cuda_graph=True`` on CPU tensors) is
    checked at the call.
    """

    def __init__(self, energy: Callable[[torch.Tensor], torch.Tensor], n_steps: int, step_size: float, *,
                 noise_scale: float | None = None, prior="normal", backend: str = "auto",
                 clip_grad: float | None = None, method: str = "ula", cuda_graph: bool | None = None):
        super().__init__()
        settings = check_settings(n_steps, step_size, noise_scale, clip_grad, method, backend, cuda_graph)
        _check_energy(energy, None)
        self.energy = energy
        self.prior = as_prior(prior)
        for name, value in settings.items():
            setattr(self, name, value)

    def _kwargs(self) -> dict:
        return dict(noise_scale=self.noise_scale, prior=self.prior, backend=self.backend, clip_grad=self.clip_grad,
                    method=self.method, cuda_graph=self.cuda_graph)

    def forward(self, z0: torch.Tensor, *, seed: int | None = None, return_info: bool = False,
                create_graph: bool = False):
        return langevin(self.energy, z0, self.n_steps, self.step_size, seed=seed, return_info=return_info,
                        create_graph=create_graph, **self._kwargs())

    def sample(self, n: int, latent_shape, *, dtype=torch.float32, device=None, seed: int | None = None,
               return_info: bool = False):
        """``n`` chains from ``z0 ~ prior`` of shape (n, *latent_shape); ``seed`` seeds both z0 and the chain."""
        n = check_int("n", n, 1)
        shape = (latent_shape,) if isinstance(latent_shape, numbers.Integral) else latent_shape
        try:
            shape = tuple(check_int("latent_shape", d, 1) for d in shape)
        except TypeError:
            raise TypeError(f"latent_shape must be an int or a sequence of ints >= 1, got {latent_shape!r}") from None
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
        try:
            device = torch.device("cpu" if device is None else device)
        except (TypeError, RuntimeError) as error:
            raise ValueError(f"device: {error}") from None
        if device.type == "meta":
            raise ValueError("device: a meta device holds no values to sample; use the CPU or a GPU")
        if device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {device} was asked for but torch sees no CUDA device")
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device).manual_seed(check_int("seed", seed))
        z0 = self.prior.sample(n, shape, dtype=dtype, device=device, generator=generator)
        return self(z0, seed=seed, return_info=return_info)

    def extra_repr(self) -> str:
        return (f"n_steps={self.n_steps}, step_size={self.step_size}, noise_scale={self.noise_scale}, "
                f"backend={self.backend!r}, clip_grad={self.clip_grad}, method={self.method!r}")
