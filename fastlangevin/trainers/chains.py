"""The trainers' one door to Langevin sampling: ``run_chain`` runs a chain with the library (``fl.langevin``) or with
the loop people write by hand (``sampler="eager"``), so a trainer can measure what the library saves it.

Both run the same ULA update, z ← z − ε/2·∇(E(z) − log p₀(z)) + √ε·ξ, with the per-sample gradient (the gradient of
the batch sum), and leave the energy's parameters' ``.grad`` untouched. They differ in the noise: the library draws its
counter-based Philox stream from ``seed``, the eager loop ``torch.randn`` from a generator seeded with ``seed``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable

import torch
from torch.nn.modules.batchnorm import _BatchNorm

import fastlangevin as fl

SAMPLERS = ("library", "eager")
SEED_RANGE = 2 ** 63  # fl.langevin takes seeds in [0, 2**63); any int is folded into it


def eager_langevin(energy: Callable[[torch.Tensor], torch.Tensor], z0: torch.Tensor, n_steps: int, step_size: float,
                   prior="normal", seed: int = 0, clip_grad: float | None = None,
                   noise_scale: float | None = None) -> torch.Tensor:
    """The hand-written loop (as in the papers' code): ``prior`` is ``"normal"`` (N(0, I)), ``None`` (flat) or a
    callable z ↦ log p₀(z) of shape (B,); ``clip_grad`` bounds each sample's ‖∇E(z)‖ (before the prior term, as
    ``fl.langevin`` does); ``noise_scale`` defaults to √ε. Returns z_K detached, (B, *latent_shape)."""
    generator = torch.Generator(z0.device).manual_seed(seed)
    noise = math.sqrt(step_size) if noise_scale is None else noise_scale
    z = z0.detach().clone()
    with torch.enable_grad():
        for _ in range(n_steps):
            z.requires_grad_(True)
            target = energy(z)
            if clip_grad is not None:
                grad = torch.autograd.grad(target.sum(), z)[0]
                norm = grad.flatten(1).norm(dim=1).view((-1,) + (1,) * (z.dim() - 1))
                grad = grad * (clip_grad / norm).clamp(max=1.0)
                target = torch.zeros_like(target)  # the prior term is added below, unclipped
            else:
                grad = 0.0
            if prior == "normal":
                grad = grad + z.detach()
            elif prior is not None:
                target = target - prior(z)
            if clip_grad is None or prior not in ("normal", None):
                grad = grad + torch.autograd.grad(target.sum(), z)[0]
            z = (z.detach() - 0.5 * step_size * grad
                 + noise * torch.randn(z.shape, generator=generator, device=z.device, dtype=z.dtype))
    return z.detach()


def run_chain(energy, z0: torch.Tensor, n_steps: int, step_size: float, *, prior="normal", seed: int = 0,
              sampler: str = "library", clip_grad: float | None = None, noise_scale: float | None = None,
              describe: bool = False):
    """z_K after ``n_steps`` of ULA from ``z0`` with ``sampler`` ("library": ``fl.langevin``; "eager": the loop);
    ``clip_grad`` bounds each sample's ‖∇E‖; ``noise_scale`` defaults to √ε (0: gradient descent). With
    ``describe``: (z_K, what ran the chain), e.g. "cpu:fused", or "cpu (not fused: why)" as ``fl.langevin`` says,
    or "eager loop"."""
    if sampler == "library":
        out = fl.langevin(energy, z0, n_steps, step_size, prior=prior, seed=seed % SEED_RANGE, clip_grad=clip_grad,
                          noise_scale=noise_scale, return_info=describe)
        if not describe:
            return out
        z, info = out
        return z, info.backend + (f" (not fused: {info.fallback})" if info.fallback else "")
    if sampler == "eager":
        z = eager_langevin(energy, z0, n_steps, step_size, prior, seed % SEED_RANGE, clip_grad, noise_scale)
        return (z, "eager loop") if describe else z
    raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")


class Chains:
    """A training run's chains: ``run_chain`` with the run's ``sampler``; ``timed`` chains add to ``timer`` (the
    training chains, not evaluation); a non-finite energy or result raises ``fl.NonFiniteEnergyError`` naming
    ``command``, the chain and the training iteration. ``backends``: what ran each chain (by name) the first time,
    the fused kernel or why not, also handed to ``announce`` (the run's log) once per chain."""

    def __init__(self, sampler: str = "library", device: torch.device | str = "cpu", command: str = "train"):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.sampler, self.command, self.timer = sampler, command, ChainTimer(device)
        self.backends: dict[str, str] = {}
        self.announce: Callable[[str], None] | None = None

    def __call__(self, which: str, step: int, energy, z0: torch.Tensor, n_steps: int, step_size: float, *,
                 prior="normal", seed: int, clip_grad: float | None = None, timed: bool = True) -> torch.Tensor:
        """z_K of the ``which`` chain ("prior", "posterior", …) of training iteration ``step``. The papers sample
        with their generators in eval mode: an energy with a batch norm in training mode is refused (the chain would
        normalise each sample with its batch and overwrite the running statistics at every step)."""
        if isinstance(energy, torch.nn.Module):
            training = [name for name, m in energy.named_modules() if isinstance(m, _BatchNorm) and m.training]
            if training:
                raise ValueError(f"{self.command}: the {which} chain's energy has batch norms in training mode "
                                 f"({training[0]}, ...); put the model it reads through in eval mode")
        hint = "lower the learning rates or the chain's step size"
        first = which not in self.backends
        try:
            with self.timer if timed else contextlib.nullcontext():
                out = run_chain(energy, z0, n_steps, step_size, prior=prior, seed=seed, sampler=self.sampler,
                                clip_grad=clip_grad, describe=first)
        except fl.NonFiniteEnergyError as error:
            raise fl.NonFiniteEnergyError(f"{self.command}: the {which} chain of training iteration {step}: {error}; "
                                          f"{hint}") from error
        z = out[0] if first else out
        if first:
            self.backends[which] = out[1]
            if self.announce is not None:
                self.announce(f"{self.command}: the {which} chain runs on {self.backends[which]}")
        if not bool(torch.isfinite(z).all()):  # the eager loop does not check as it goes
            raise fl.NonFiniteEnergyError(f"{self.command}: the {which} chain of training iteration {step} ended "
                                          f"with non-finite latents; {hint}")
        return z


def langevin_transition(energy, z0: torch.Tensor, at_steps, step_size: float, decode, *, seed: int = 0,
                        **chain) -> list[tuple[int, torch.Tensor]]:
    """Chains from ``z0`` recorded at ``at_steps`` (increasing, e.g. 0, 10, 25, 50, 100): [(k, decode(z_k) on the
    CPU)]. The chain runs in segments between the recorded steps, segment i with noise seed ``seed + 1 + i``;
    ``chain``: ``run_chain``'s keywords (prior, clip_grad, sampler)."""
    out, z, done = [], z0, 0
    for i, k in enumerate(at_steps):
        if k > done:
            z = run_chain(energy, z, k - done, step_size, seed=seed + 1 + i, **chain)
            done = k
        with torch.no_grad():
            out.append((k, decode(z).cpu()))
    return out


class ChainTimer:
    """Wall time spent in chains: ``with timer: z = run_chain(...)``; ``timer.seconds`` accumulates (CUDA work is
    synchronised at exit, so the time is the chain's, not its launch's)."""

    def __init__(self, device: torch.device | str = "cpu"):
        self.device, self.seconds, self._start = torch.device(device), 0.0, 0.0

    def __enter__(self):
        self._start = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.seconds += time.perf_counter() - self._start
