"""The fused Langevin step in plain PyTorch: the oracle every backend is tested against, and ``backend="reference"``.

One step, with ε = ``step_size``, σ = ``noise_scale`` and ω the Philox stream of ``fastlangevin.ops.philox``::

    z_new = z − (ε/2)·(grad + prior_inv_var·(z − prior_mean)) + σ·ω

``grad`` is ∇E(z) (E = energy, low = likely; the papers' f_α = −E). The prior term is −∇log prior(z) of a diagonal
Gaussian; ``prior_kind`` (``fastlangevin.ops.codes``) selects it:

* ``PRIOR_FLAT`` (0): no prior term;
* ``PRIOR_NORMAL`` (1): N(0, I), the term is ``z``;
* ``PRIOR_DIAGONAL`` (2): N(mean, diag(1/inv_var)); ``prior_mean`` and ``prior_inv_var`` are 1-D of length
  ``D = z[0].numel()`` (the latent features), element ``i`` of the flattened ``z`` uses feature ``i % D``.
"""

from __future__ import annotations

import torch

from fastlangevin.ops.codes import PRIOR_DIAGONAL, PRIOR_NORMAL
from fastlangevin.ops.philox import compute_dtype, normal_noise


def langevin_step_reference(z: torch.Tensor, grad: torch.Tensor, rng_state: torch.Tensor, step_size: float,
                            noise_scale: float, prior_kind: int = PRIOR_NORMAL,
                            prior_mean: torch.Tensor | None = None,
                            prior_inv_var: torch.Tensor | None = None) -> torch.Tensor:
    """One Langevin step. ``z``, ``grad``: (B, *latent) of one float dtype; ``rng_state``: int64 ``[seed, counter]``.

    Returns a new tensor of ``z``'s shape and dtype; differentiable in ``z``, ``grad`` and the prior parameters.
    """
    ctype = compute_dtype(z.dtype)
    zc = z.to(ctype)
    drift = grad.to(ctype)
    if prior_kind == PRIOR_NORMAL:
        drift = drift + zc
    elif prior_kind == PRIOR_DIAGONAL:
        features = z[0].shape if z.dim() > 0 else ()
        mean = prior_mean.to(ctype).reshape(features)
        inv_var = prior_inv_var.to(ctype).reshape(features)
        drift = drift + inv_var * (zc - mean)
    out = zc - (step_size / 2) * drift
    if noise_scale != 0.0:
        noise = normal_noise(z.numel(), rng_state, z.dtype, z.device).reshape(z.shape)
        out = out + noise_scale * noise
    return out.to(z.dtype)
