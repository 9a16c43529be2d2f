"""The sampler API: ``langevin(energy, z0, n_steps, step_size)`` and ``LangevinSampler``.

Target ``p(z) ∝ prior(z)·exp(−E(z))``, E = ``energy`` (low = likely; the papers' f_α is −E). Each step::

    z ← z − (ε/2)·(∇E(z) − ∇log prior(z)) + σ·ω,   ω ~ N(0, I),   ε = step_size, σ = noise_scale (default √ε)

Code written as ``z ← z − s²/2·∇ + s·ω`` (LEBM, the joint-EBM paper) passes ``step_size=s**2``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Callable

import torch
from torch import nn

from fastlangevin.backends import resolve_backend
from fastlangevin.ops.langevin_step import check_hyper, make_rng_state, run_step
from fastlangevin.ops.philox import MAX_SEED
from fastlangevin.priors import Prior, as_prior


class NonFiniteEnergyError(FloatingPointError):
    """The energy (or its gradient) was not finite during a chain; the message names the step."""


@dataclasses.dataclass
class LangevinInfo:
    """What happened along a chain.

    energies: (n_steps, B), E(z_k) before step k; grad_norms: (n_steps, B), per-sample ‖∇E(z_k)‖ before clipping;
    backend: the step op's backend; seed: the chain's noise seed (pass it back to reproduce the chain).
    """

    energies: torch.Tensor
    grad_norms: torch.Tensor
    backend: str
    seed: int
    step_size: float
    noise_scale: float


def _check_energy_output(e, z: torch.Tensor) -> torch.Tensor:
    if not isinstance(e, torch.Tensor):
        raise TypeError(f"energy(z) must return a tensor of shape ({z.shape[0]},), got {type(e).__name__}")
    batch = z.shape[0]
    if e.dim() == 0 or e.shape[0] != batch or e.numel() != batch:
        raise ValueError(f"energy(z) must return per-sample energies of shape ({batch},) for z of shape "
                         f"{tuple(z.shape)}, got {tuple(e.shape)}; reduce over the non-batch dimensions "
                         f"(and do not sum over the batch)")
    if e.device != z.device:
        raise ValueError(f"energy(z) returned a tensor on {e.device} for z on {z.device}")
    if e.dtype != z.dtype:
        raise TypeError(f"energy(z) returned {e.dtype} for z of {z.dtype}; make the energy's parameters and "
                        f"z the same dtype (e.g. energy.to(z.dtype))")
    if not e.requires_grad:
        raise ValueError("energy(z) returned a tensor that does not depend on z through autograd "
                         "(was it computed under torch.no_grad() or detached?)")
    return e.reshape(batch)


def _check_z0(z0) -> None:
    if not isinstance(z0, torch.Tensor):
        raise TypeError(f"z0 must be a tensor of shape (B, *latent_shape), got {type(z0).__name__}")
    if not z0.is_floating_point():
        raise TypeError(f"z0 must be a floating-point tensor (Langevin moves a continuous state), got {z0.dtype}; "
                        f"convert it with z0.float()")
    if z0.dim() < 1 or z0.shape[0] == 0:
        raise ValueError(f"z0 must have shape (B, *latent_shape) with B >= 1, got {tuple(z0.shape)}")
    if not bool(torch.isfinite(z0).all()):
        raise ValueError("z0 has non-finite entries")


def langevin(energy: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, n_steps: int, step_size: float, *,
             noise_scale: float | None = None, prior="normal", seed: int | None = None, backend: str = "auto",
             clip_grad: float | None = None, return_info: bool = False, create_graph: bool = False):
    """Run ``n_steps`` of unadjusted Langevin dynamics from ``z0``; returns ``z_K`` (and a ``LangevinInfo``).

    energy: maps z (B, *latent_shape) to per-sample energies (B,); an ``nn.Module`` or any callable.
    z0: (B, *latent_shape) float tensor; never modified.
    step_size: ε > 0; noise_scale: σ ≥ 0 (default √ε; 0 gives gradient descent on E − log prior).
    prior: ``"normal"`` (N(0, I), default), ``None`` (flat), ``(mean, log_std)`` or a ``fastlangevin.Prior``,
        or any ``log_prob`` callable (differentiated by autograd).
    seed: int in [0, 2**63) for a reproducible chain; ``None`` draws one from torch's default generator.
    backend: ``"auto"``, ``"reference"``, ``"cpu"``, ``"cuda"`` or ``"triton"`` (see ``fl.backend_info()``).
    clip_grad: optional bound on each sample's ‖∇E(z)‖ (the energy gradient, before the prior term).
    create_graph: keep the graph through the chain, so ``z_K`` is differentiable w.r.t. ``z0`` and the energy's
        parameters; by default the result is detached and no parameter collects gradients.

    The energy's parameters keep their ``requires_grad`` and ``.grad``. A non-finite energy raises
    ``NonFiniteEnergyError`` naming the first step and how many samples.
    """
    _check_z0(z0)
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
        raise ValueError(f"n_steps must be an int >= 0, got {n_steps!r}")
    step_size, noise_scale = check_hyper(step_size, noise_scale)
    if clip_grad is not None and (not isinstance(clip_grad, (int, float)) or not 0 < clip_grad < math.inf):
        raise ValueError(f"clip_grad must be None or a finite float > 0, got {clip_grad!r}")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED):
        raise ValueError(f"seed must be None or an int in [0, 2**63), got {seed!r}")
    if not callable(energy):
        raise TypeError(f"energy must be callable (an nn.Module or a function), got {type(energy).__name__}")
    prior = as_prior(prior)
    chosen = resolve_backend(backend, z0.device, z0.dtype)
    if seed is None:
        seed = int(torch.randint(0, MAX_SEED, (1,)).item())

    with torch.inference_mode(False), torch.enable_grad():
        return _run_chain(energy, z0, n_steps, step_size, noise_scale, prior, seed, chosen, clip_grad,
                          return_info, create_graph)


def _run_chain(energy, z0, n_steps, step_size, noise_scale, prior: Prior, seed, backend, clip_grad, return_info,
               create_graph):
    batch = z0.shape[0]
    kernel_prior = prior.kernel_params(z0)
    prior_args = kernel_prior if kernel_prior is not None else (0, None, None)
    rng_state = make_rng_state(seed, 0, z0.device)
    z = z0.contiguous() if create_graph else z0.detach().contiguous().clone()
    track = return_info or clip_grad is not None
    energies = z0.new_empty((n_steps, batch)) if return_info else None
    grad_norms = z0.new_empty((n_steps, batch)) if return_info else None
    n_bad = torch.zeros(n_steps, dtype=torch.int64, device=z0.device)

    for k in range(n_steps):
        if not z.requires_grad:
            z.requires_grad_(True)
        e = _check_energy_output(energy(z), z) if k == 0 else energy(z).reshape(batch)
        target = e if kernel_prior is not None else e - prior.log_prob(z)
        grad = torch.autograd.grad(target.sum(), z, create_graph=create_graph, allow_unused=True)[0]
        if grad is None:
            grad = torch.zeros_like(z)
        n_bad[k] = (~torch.isfinite(e.detach())).sum()
        if track:
            norms = grad.detach().flatten(1).norm(dim=1)
            if return_info:
                energies[k] = e.detach()
                grad_norms[k] = norms
            if clip_grad is not None:
                grad = grad * (clip_grad / (norms + 1e-12)).clamp(max=1.0).reshape((batch,) + (1,) * (z.dim() - 1))
        if not create_graph:
            z, grad = z.detach(), grad.detach()
        z = run_step(backend, z, grad.contiguous(), rng_state, step_size, noise_scale, *prior_args)
        rng_state[1] += 1

    _raise_if_not_finite(n_bad, z, batch)
    if not create_graph:
        z = z.detach()
    if return_info:
        return z, LangevinInfo(energies, grad_norms, backend, seed, step_size, noise_scale)
    return z


def _raise_if_not_finite(n_bad: torch.Tensor, z: torch.Tensor, batch: int) -> None:
    """One host sync per chain (not per step): find the first step whose energy was not finite."""
    bad_steps = torch.nonzero(n_bad).flatten()
    if bad_steps.numel():
        k = int(bad_steps[0])
        raise NonFiniteEnergyError(f"energy was not finite at step {k} (0-based) for {int(n_bad[k])} of {batch} "
                                   f"samples; z0 was not modified. Try a smaller step_size or clip_grad.")
    if not bool(torch.isfinite(z).all()):
        raise NonFiniteEnergyError("the chain produced non-finite z although every energy was finite (the energy "
                                   "gradient overflowed); rerun with return_info=True to see the gradient norms, "
                                   "or use clip_grad / a smaller step_size.")


class LangevinSampler(nn.Module):
    """Holds an energy and the chain settings; ``sampler(z0)`` runs ``fl.langevin`` with them.

    ``sampler.sample(n, latent_shape)`` starts the chain from the prior (N(0, I) by default).
    """

    def __init__(self, energy: Callable[[torch.Tensor], torch.Tensor], n_steps: int, step_size: float, *,
                 noise_scale: float | None = None, prior="normal", backend: str = "auto",
                 clip_grad: float | None = None):
        super().__init__()
        if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 0:
            raise ValueError(f"n_steps must be an int >= 0, got {n_steps!r}")
        check_hyper(step_size, noise_scale)  # fail at construction, not at first use
        self.energy = energy
        self.prior = as_prior(prior)
        self.n_steps = n_steps
        self.step_size = step_size
        self.noise_scale = noise_scale
        self.backend = backend
        self.clip_grad = clip_grad

    def _kwargs(self) -> dict:
        return dict(noise_scale=self.noise_scale, prior=self.prior, backend=self.backend, clip_grad=self.clip_grad)

    def forward(self, z0: torch.Tensor, *, seed: int | None = None, return_info: bool = False,
                create_graph: bool = False):
        return langevin(self.energy, z0, self.n_steps, self.step_size, seed=seed, return_info=return_info,
                        create_graph=create_graph, **self._kwargs())

    def sample(self, n: int, latent_shape, *, dtype=torch.float32, device=None, seed: int | None = None,
               return_info: bool = False):
        generator = None
        if seed is not None:
            generator = torch.Generator(device=device or "cpu").manual_seed(seed)
        z0 = self.prior.sample(n, latent_shape, dtype=dtype, device=device, generator=generator)
        return self(z0, seed=seed, return_info=return_info)

    def extra_repr(self) -> str:
        return (f"n_steps={self.n_steps}, step_size={self.step_size}, noise_scale={self.noise_scale}, "
                f"backend={self.backend!r}, clip_grad={self.clip_grad}")
