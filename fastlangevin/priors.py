"""Priors of the latent target ``p(z) ∝ prior(z)·exp(−E(z))``.

A prior contributes ``−∇log prior(z)`` to the Langevin drift. Diagonal Gaussians (``NormalPrior``,
``DiagonalNormalPrior``) and ``FlatPrior`` are evaluated inside the fused step kernel; any other prior (a
``CallablePrior`` or a subclass of ``Prior`` with ``kernel_params`` returning ``None``) is differentiated by autograd
and added to the energy gradient before the step.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from fastlangevin.ops.codes import PRIOR_DIAGONAL, PRIOR_FLAT, PRIOR_NORMAL
from fastlangevin.ops.philox import compute_dtype


class Prior(nn.Module):
    """Base class. ``log_prob(z)``: (B, *latent) → (B,), up to an additive constant."""

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def kernel_params(self, z: torch.Tensor) -> tuple[int, torch.Tensor | None, torch.Tensor | None] | None:
        """``(prior_kind, mean, inv_var)`` for the fused step, 1-D of length ``z[0].numel()`` in the compute dtype,
        or ``None`` if the kernel cannot evaluate this prior (its gradient then comes from autograd)."""
        return None

    def sample(self, n: int, latent_shape, *, dtype=torch.float32, device=None, generator=None) -> torch.Tensor:
        raise ValueError(f"prior {type(self).__name__} cannot be sampled; pass z0 explicitly")


class FlatPrior(Prior):
    """The improper flat prior: the target is ``exp(−E(z))`` alone."""

    def log_prob(self, z):
        return z.new_zeros(z.shape[0])

    def kernel_params(self, z):
        return PRIOR_FLAT, None, None

    def extra_repr(self):
        return "flat"


class NormalPrior(Prior):
    """N(0, I), the prior of the papers' latent EBMs (LEBM's ``z/σ_p²`` term with σ_p = 1)."""

    def log_prob(self, z):
        return -0.5 * z.flatten(1).pow(2).sum(1)

    def kernel_params(self, z):
        return PRIOR_NORMAL, None, None

    def sample(self, n, latent_shape, *, dtype=torch.float32, device=None, generator=None):
        return torch.randn((n, *tuple(latent_shape)), dtype=dtype, device=device, generator=generator)


class DiagonalNormalPrior(Prior):
    """N(mean, diag(exp(log_std)²)); ``mean`` and ``log_std`` broadcast to the latent shape (scalars allowed).

    Pass ``nn.Parameter``s to learn them: gradients reach them through the step op.
    """

    def __init__(self, mean, log_std):
        super().__init__()
        mean, log_std = _float_tensor("mean", mean), _float_tensor("log_std", log_std)
        if isinstance(mean, nn.Parameter):
            self.mean = mean
        else:
            self.register_buffer("mean", mean)
        if isinstance(log_std, nn.Parameter):
            self.log_std = log_std
        else:
            self.register_buffer("log_std", log_std)

    def _broadcast(self, latent_shape):
        try:
            mean = self.mean.expand(latent_shape)
            log_std = self.log_std.expand(latent_shape)
        except RuntimeError:
            raise ValueError(f"prior: DiagonalNormalPrior mean {tuple(self.mean.shape)} and log_std "
                             f"{tuple(self.log_std.shape)} do not broadcast to the latent shape "
                             f"{tuple(latent_shape)}") from None
        return mean, log_std

    def log_prob(self, z):
        mean, log_std = self._broadcast(z.shape[1:])
        return (-0.5 * ((z - mean) * torch.exp(-log_std)).pow(2) - log_std).flatten(1).sum(1)

    def kernel_params(self, z):
        mean, log_std = self._broadcast(z.shape[1:])
        ctype = compute_dtype(z.dtype)
        mean = mean.to(device=z.device, dtype=ctype).reshape(-1).contiguous()
        inv_var = torch.exp(-2 * log_std.to(device=z.device, dtype=ctype)).reshape(-1).contiguous()
        return PRIOR_DIAGONAL, mean, inv_var

    def sample(self, n, latent_shape, *, dtype=torch.float32, device=None, generator=None):
        mean, log_std = self._broadcast(tuple(latent_shape))
        eps = torch.randn((n, *tuple(latent_shape)), dtype=dtype, device=device, generator=generator)
        return (mean.to(eps) + torch.exp(log_std.to(eps)) * eps).detach()


def _float_tensor(name: str, value) -> torch.Tensor:
    """A DiagonalNormalPrior parameter: a finite floating-point tensor (or float, or nested list of them)."""
    if not torch.is_tensor(value):
        if isinstance(value, bool):
            raise TypeError(f"prior: DiagonalNormalPrior {name} must be a float or a float tensor, got {value!r}")
        try:
            value = torch.as_tensor(value, dtype=torch.get_default_dtype())
        except (TypeError, ValueError, RuntimeError) as error:
            raise TypeError(f"prior: DiagonalNormalPrior {name} must be a float or a float tensor, got "
                            f"{type(value).__name__} ({error})") from None
    if not value.is_floating_point():
        raise TypeError(f"prior: DiagonalNormalPrior {name} must be floating point, got {value.dtype}")
    if value.device.type != "meta" and not bool(torch.isfinite(value.detach()).all()):
        raise ValueError(f"prior: DiagonalNormalPrior {name} has non-finite entries")
    return value


class CallablePrior(Prior):
    """Wraps ``log_prob(z) -> (B,)``; its gradient is taken by autograd each step (no fused prior term)."""

    def __init__(self, log_prob: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        if not callable(log_prob):
            raise TypeError(f"prior: CallablePrior needs a log_prob callable, got {type(log_prob).__name__}")
        self._log_prob = log_prob

    def log_prob(self, z):
        return self._log_prob(z)

    def extra_repr(self) -> str:
        """The callable's qualified name (e.g. ``JointLatentEBM.prior``), so a log line says which prior it is."""
        return getattr(self._log_prob, "__qualname__", type(self._log_prob).__name__)


def as_prior(spec) -> Prior:
    """``"normal"`` → N(0, I); ``None`` or ``"flat"`` → flat; ``(mean, log_std)`` → diagonal Gaussian;
    a ``Prior`` → itself; any other callable → its ``log_prob``."""
    if isinstance(spec, Prior):
        return spec
    if spec is None or (isinstance(spec, str) and spec == "flat"):
        return FlatPrior()
    if isinstance(spec, str):
        if spec == "normal":
            return NormalPrior()
        raise ValueError(f"prior: unknown name {spec!r}; use 'normal', 'flat'/None, (mean, log_std), "
                         f"a fastlangevin.Prior or a log_prob callable")
    if isinstance(spec, tuple) and len(spec) == 2:
        return DiagonalNormalPrior(*spec)
    if callable(spec):
        return CallablePrior(spec)
    raise TypeError(f"prior: expected 'normal', None, (mean, log_std), a Prior or a callable, got {type(spec).__name__}")


def stationary_variance(precision: float, step_size: float) -> float:
    """Stationary variance of ULA on a 1-D Gaussian of ``precision`` λ with noise ``sqrt(ε)``: 1/(λ(1 − ελ/4))."""
    if not 0 < step_size * precision < 4:
        return math.inf
    return 1.0 / (precision * (1.0 - step_size * precision / 4.0))
