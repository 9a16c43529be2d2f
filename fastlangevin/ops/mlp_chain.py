"""The fully fused chain for ``MLPEnergy``: all K steps (forward, analytic input gradient, prior, noise, update —
and for MALA the Metropolis test) in one kernel, with the weights loaded once and z kept on chip.

Its reference is the generic chain: ``fl.langevin(energy, z0, ..., backend="reference")`` (autograd through the
``MLPEnergy`` module and ``langevin_step_reference``); the kernels draw the same Philox noise, so a fused chain and
a step-by-step chain with the same seed agree to float rounding.

Kernel contract (C++ ``_C.mlp_chain`` and Triton ``ops/triton/mlp_chain.py``), for z (B, D) updated in place:

* layers ``l = 0..L−1``: weight (d_{l+1}, d_l) row-major, optional bias (d_{l+1},), in the compute dtype;
  ``h_{l+1} = act(W_l h_l + b_l)`` for hidden layers, ``E = output_sign · (W_{L−1} h_{L−1} + b_{L−1})`` (d_L = 1);
* step k (counter = rng_state[1] + k): g = ∇E(z_k), ``norm = ‖g‖``; if clip_grad > 0: g ·= min(1, clip/(norm+1e−12));
  ULA: ``z_{k+1} = z_k − (ε/2)(g + prior_term(z_k)) + σ·ω_k`` exactly as ``langevin_step_reference``;
  MALA (σ = √ε): the proposal is that ULA update, then E and g at the proposal, then
  ``log α = U(z) − U(z') − (‖z − z' + (ε/2)G'‖² − ‖z' − z + (ε/2)G‖²)/(2ε)`` with U = E + U_prior,
  G = g + prior_term, accepted where ``log u_k < log α`` (u: ``philox.acceptance_uniforms`` at counter + k), as
  in ``sampler._mala_accept``. The state (z, E, g, norm) keeps the accepted values;
* outputs (K, B) when asked: energies[k] = E(z_k) of the state before step k, grad_norms[k] = its unclipped ‖g‖,
  accepted[k] (MALA).
"""

from __future__ import annotations

from typing import Optional

import torch

from fastlangevin import _ext
from fastlangevin.ops.langevin_step import DTYPE_CODES, _ptr
from fastlangevin.ops.philox import compute_dtype

# Activation codes of the fused-chain kernels (C++ and Triton); derivatives follow torch's backward formulas.
ACTIVATIONS = {
    "relu": 0,
    "leaky_relu": 1,  # param: negative slope
    "silu": 2,  # = swish
    "gelu": 3,  # exact (erf), nn.GELU() default
    "gelu_tanh": 4,  # nn.GELU(approximate="tanh")
    "elu": 5,  # param: alpha
    "softplus": 6,  # beta = 1, threshold = 20, as nn.Softplus()
    "tanh": 7,
}
ULA, MALA = 0, 1
METHODS = {"ula": ULA, "mala": MALA}
FUSED_DTYPES = (torch.float32, torch.float64)


def _outputs(z0, n_steps, return_info):
    rows = n_steps  # energies are always produced: the non-finite check needs them
    energies = z0.new_empty((rows, z0.shape[0]))
    grad_norms = z0.new_empty((rows if return_info else 0, z0.shape[0]))
    return energies, grad_norms


@torch.library.custom_op("fastlangevin::mlp_chain_cpu", mutates_args=(), device_types="cpu")
def mlp_chain_cpu(z0: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], activation: int,
                  activation_param: float, output_sign: float, n_steps: int, step_size: float, noise_scale: float,
                  prior_kind: int, prior_mean: Optional[torch.Tensor], prior_inv_var: Optional[torch.Tensor],
                  rng_state: torch.Tensor, clip_grad: float, method: int,
                  return_info: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    z = z0.clone()
    energies, grad_norms = _outputs(z0, n_steps, return_info)
    accepted = torch.zeros((n_steps if method == MALA else 0, z0.shape[0]), dtype=torch.uint8)
    dims = [z.shape[1]] + [w.shape[0] for w in weights]
    n_layers, identity = len(weights), 8  # the v2 binding: an activation code per layer, identity (8) after the last
    energy = (dims, [w.data_ptr() for w in weights], [b.data_ptr() for b in biases],
              [activation] * (n_layers - 1) + [identity], [activation_param] * n_layers)
    first_bad = torch.empty(z.shape[0], dtype=torch.int64)  # not read yet: the sampler checks the energies
    _ext.require_cpu().mlp_chain(
        z.data_ptr(), z.shape[0], energy, output_sign, None, 0, 0.0, n_steps, step_size, noise_scale, prior_kind,
        _ptr(prior_mean), _ptr(prior_inv_var), rng_state.data_ptr(), clip_grad, method, energies.data_ptr(),
        grad_norms.data_ptr() if return_info else 0, accepted.data_ptr() if method == MALA else 0,
        first_bad.data_ptr(), DTYPE_CODES[z.dtype], torch.get_num_threads())
    return z, energies, grad_norms, accepted


@mlp_chain_cpu.register_fake
def _(z0, weights, biases, activation, activation_param, output_sign, n_steps, step_size, noise_scale, prior_kind,
      prior_mean, prior_inv_var, rng_state, clip_grad, method, return_info):
    energies, grad_norms = _outputs(z0, n_steps, return_info)
    return (torch.empty_like(z0), energies, grad_norms,
            z0.new_empty((n_steps if method == MALA else 0, z0.shape[0]), dtype=torch.uint8))


def _mlp_chain_triton(z0, weights, biases, activation, activation_param, output_sign, n_steps, step_size,
                      noise_scale, prior_kind, prior_mean, prior_inv_var, rng_state, clip_grad, method, return_info):
    from fastlangevin.ops.triton.mlp_chain import mlp_chain_triton

    z = z0.clone()
    energies, grad_norms = _outputs(z0, n_steps, return_info)
    accepted = torch.zeros((n_steps if method == MALA else 0, z0.shape[0]), dtype=torch.uint8, device=z0.device)
    mlp_chain_triton(z, weights, biases if biases else None, activation, activation_param, output_sign, n_steps,
                     step_size, noise_scale, prior_kind, prior_mean, prior_inv_var, rng_state, clip_grad, method,
                     energies, grad_norms if return_info else None, accepted if method == MALA else None)
    return z, energies, grad_norms, accepted


FUSED_CHAINS = {"cpu": mlp_chain_cpu, "triton": _mlp_chain_triton}


def fused_backend_for(step_backend: str) -> tuple[str | None, str]:
    """The fused-chain backend that goes with a resolved step backend, or (None, why not)."""
    if step_backend == "reference":
        return None, "backend 'reference' runs the plain autograd chain"
    if step_backend == "cuda":
        from fastlangevin.backends import backend_status
        status = backend_status("triton", "cuda")
        if status.available:
            return "triton", "the fused MLP chain is a Triton kernel on GPUs"
        return None, f"the fused MLP chain on GPUs needs Triton: {status.reason}"
    if step_backend == "cpu" and not hasattr(_ext.require_cpu(), "mlp_chain"):
        return None, "the C++ extension was built without the fused chain (rebuild: pip install -e .)"
    return step_backend, "fused"


def unsupported_reason(backend: str, energy, z0: torch.Tensor) -> str | None:
    """Why this network cannot run on the fused ``backend`` (a size limit of the kernel), or None."""
    if backend == "triton":
        from fastlangevin.ops.triton.mlp_chain import launch_settings
        try:
            launch_settings(z0.shape[0], energy.dims, z0.dtype)
        except ValueError as error:
            return str(error)
    return None


def run_mlp_chain(backend: str, energy, z0: torch.Tensor, n_steps: int, step_size: float, noise_scale: float,
                  prior_args, rng_state: torch.Tensor, clip_grad: float | None, method: str, return_info: bool):
    """Runs the fused chain; z0: (B, *latent) is flattened to (B, D). Returns (z, energies, grad_norms, accepted)
    with z shaped like z0, energies (K, B), grad_norms (K, B) or empty, accepted (K, B) bool or None."""
    ctype = compute_dtype(z0.dtype)
    weights, biases = [], []
    for w, b in energy.kernel_weights():
        weights.append(w.to(device=z0.device, dtype=ctype).contiguous())
        if b is not None:
            biases.append(b.to(device=z0.device, dtype=ctype).contiguous())
    kind, mean, inv_var = prior_args
    z, energies, grad_norms, accepted = FUSED_CHAINS[backend](
        z0.detach().reshape(z0.shape[0], -1).contiguous(), weights, biases, ACTIVATIONS[energy.activation],
        energy.activation_param, energy.output_sign, n_steps, step_size, noise_scale, kind, mean, inv_var,
        rng_state, float(clip_grad or 0.0), METHODS[method], return_info)
    return (z.reshape(z0.shape), energies, grad_norms if return_info else None,
            accepted.bool() if method == "mala" else None)
