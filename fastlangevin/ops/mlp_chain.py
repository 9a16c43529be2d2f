"""The fully fused Langevin chain of MLP energies: all K steps (forward, analytic input gradient, prior, noise,
update — and for MALA the Metropolis test) in one kernel, with the weights loaded once and z kept on chip.

The kernels take tensors and codes (``fastlangevin.ops.codes``), never modules: the sampler turns an energy into
``MLPNetwork``s (``fastlangevin.energies``) and decides which backend runs (``fastlangevin.backends``). The reference
is the generic chain, ``fl.langevin(energy, z0, ..., backend="reference")`` (autograd through the energy module and
``langevin_step_reference``); the kernels draw the same Philox noise, so a fused chain and a step-by-step chain with
the same seed agree to float rounding.

Kernel contract (C++ ``_C.mlp_chain`` and Triton ``ops/triton/mlp_chain.py``), for z (B, D) updated in place:

* a network of L layers: weight W_l (d_{l+1}, d_l) row-major, bias b_l (d_{l+1},) or none, activation code act_l with
  its parameter; ``h_{l+1} = act_l(W_l h_l + b_l)``. The energy network maps D → 1 and its last code is identity;
* the total energy ``E(z) = output_sign · energy_net(z) + likelihood_scale · ‖target_b − generator_net(z[:, :Dg])‖²``,
  the second term only with a generator (Dg = its d_0 ≤ D; target (B, P), P = its d_L);
* step k (counter = rng_state[1] + k): g = ∇E(z_k), ``norm = ‖g‖``; if clip_grad > 0: g ·= min(1, clip/(norm+1e−12));
  ULA: ``z_{k+1} = z_k − (ε/2)(g + prior_term(z_k)) + σ·ω_k`` exactly as ``langevin_step_reference``;
  MALA (σ = √ε): the proposal is that ULA update, then E and g at the proposal, then
  ``log α = U(z) − U(z') − (‖z − z' + (ε/2)G'‖² − ‖z' − z + (ε/2)G‖²)/(2ε)`` with U = E + U_prior,
  G = g + prior_term, accepted where ``log u_k < log α`` (u: ``philox.acceptance_uniforms`` at counter + k), as
  in ``sampler._mala_accept``. The state (z, E, g, norm) keeps the accepted values; a proposal whose energy is not
  finite is rejected;
* outputs: ``first_bad`` (B,) int64, always: the first step k at which E(z_k) or its gradient was not finite, −1 when
  none; only when asked (``return_info``), (K, B): energies[k] = E(z_k) of the state before step k, grad_norms[k] =
  its unclipped ‖g‖, accepted[k] (MALA).
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from fastlangevin import _ext
from fastlangevin.ops import codes
from fastlangevin.ops.langevin_step import DTYPE_CODES, _ptr

FUSED_DTYPES = (torch.float32, torch.float64)


class MLPNetwork(NamedTuple):
    """An MLP as the kernels take it: L layers, ``h_{l+1} = act_l(W_l h_l + b_l)``. Tensors contiguous, in the
    chain's dtype and on its device."""

    weights: list[torch.Tensor]  # W_l (d_{l+1}, d_l)
    biases: list[torch.Tensor]  # b_l (d_{l+1},) for every layer, or [] for a network without biases
    activations: list[int]  # act_l: codes of fastlangevin.ops.codes
    activation_params: list[float]  # leaky ReLU's slope, ELU's alpha; ignored by the other activations

    @property
    def dims(self) -> list[int]:
        return [self.weights[0].shape[1]] + [w.shape[0] for w in self.weights]


class ChainOutputs(NamedTuple):
    """z shaped like z0; energies, grad_norms (K, B) and accepted (K, B) bool only when asked (else None);
    first_bad (B,) int64: the first step whose energy or gradient was not finite, −1 when none."""

    z: torch.Tensor
    energies: Optional[torch.Tensor]
    grad_norms: Optional[torch.Tensor]
    accepted: Optional[torch.Tensor]
    first_bad: torch.Tensor


def new_outputs(z0: torch.Tensor, n_steps: int, method: int, return_info: bool):
    """(energies, grad_norms, accepted, first_bad) for a chain from z0 (B, D): the (K, B) ones only with return_info
    (else (0, B), so nothing scales with K), accepted only for MALA; first_bad filled with −1."""
    batch = z0.shape[0]
    rows = n_steps if return_info else 0
    return (z0.new_empty((rows, batch)), z0.new_empty((rows, batch)),
            z0.new_zeros((rows if method == codes.MALA else 0, batch), dtype=torch.uint8),
            z0.new_full((batch,), -1, dtype=torch.int64))


def chain_limit(backend: str, batch: int, energy: MLPNetwork, generator: Optional[MLPNetwork],
                dtype: torch.dtype) -> Optional[str]:
    """Why the fused chain of ``backend`` ("cpu" or "triton") cannot run these networks (a limit of the kernel), or
    None. The C++ chain runs any depth, widths and activations; the Triton chain has caps (``launch_settings``)."""
    if backend == "triton":
        from fastlangevin.ops.triton.mlp_chain import chain_limit as triton_chain_limit
        return triton_chain_limit(batch, energy, generator, dtype)
    return None


def _network_arg(network: MLPNetwork) -> tuple:
    """A network as the binding takes it: (dims, weight_ptrs, bias_ptrs, activations, activation_params)."""
    return (network.dims, [w.data_ptr() for w in network.weights], [b.data_ptr() for b in network.biases],
            list(network.activations), list(network.activation_params))


def launch_cpu_chain(z, energy: MLPNetwork, output_sign, generator, target, likelihood_scale, n_steps, step_size,
                     noise_scale, prior_kind, prior_mean, prior_inv_var, rng_state, clip_grad, method, energies,
                     grad_norms, accepted, first_bad, matrix_unit: int = codes.MATRIX_VECTOR) -> None:
    """The C++ chain on contiguous CPU tensors, z (B, D) updated in place; the arguments of ``mlp_chain_triton``
    (energies, grad_norms (K, B) and accepted may be None: not wanted; first_bad (B,) int64 is always written).
    matrix_unit (``codes.MATRIX_UNITS``): a bfloat16 unit takes the networks' weights and biases in bfloat16 with a
    float32 z; the vector unit, in z's dtype."""
    _ext.require_cpu().mlp_chain(
        z.data_ptr(), z.shape[0], _network_arg(energy), output_sign,
        None if generator is None else _network_arg(generator), _ptr(target), likelihood_scale, n_steps, step_size,
        noise_scale, prior_kind, _ptr(prior_mean), _ptr(prior_inv_var), rng_state.data_ptr(), clip_grad, method,
        _ptr(energies), _ptr(grad_norms), _ptr(accepted), first_bad.data_ptr(), DTYPE_CODES[z.dtype],
        torch.get_num_threads(), matrix_unit=matrix_unit)


def _wanted(energies, grad_norms, accepted, method, return_info):
    """The outputs to pass a launcher: None for those not asked for."""
    mala = method == codes.MALA
    return (energies if return_info else None, grad_norms if return_info else None,
            accepted if return_info and mala else None)


@torch.library.custom_op("fastlangevin::mlp_chain_cpu", mutates_args=(), device_types="cpu")
def mlp_chain_cpu(z0: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], activations: list[int],
                  activation_params: list[float], output_sign: float, generator_weights: list[torch.Tensor],
                  generator_biases: list[torch.Tensor], generator_activations: list[int],
                  generator_activation_params: list[float], target: Optional[torch.Tensor], likelihood_scale: float,
                  n_steps: int, step_size: float, noise_scale: float, prior_kind: int,
                  prior_mean: Optional[torch.Tensor], prior_inv_var: Optional[torch.Tensor], rng_state: torch.Tensor,
                  clip_grad: float, method: int, return_info: bool, matrix_unit: int = codes.MATRIX_VECTOR
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chain from z0 (B, D) on the C++ backend → (z, energies, grad_norms, accepted, first_bad); the (K, B)
    outputs are (0, B) unless return_info (accepted: MALA only). No generator: empty lists and target None.
    matrix_unit: as ``launch_cpu_chain`` (a bfloat16 unit: bfloat16 weights and biases, float32 z0)."""
    z = z0.clone()
    energies, grad_norms, accepted, first_bad = new_outputs(z0, n_steps, method, return_info)
    generator = (MLPNetwork(generator_weights, generator_biases, generator_activations, generator_activation_params)
                 if generator_weights else None)
    launch_cpu_chain(z, MLPNetwork(weights, biases, activations, activation_params), output_sign, generator, target,
                     likelihood_scale, n_steps, step_size, noise_scale, prior_kind, prior_mean, prior_inv_var,
                     rng_state, clip_grad, method, *_wanted(energies, grad_norms, accepted, method, return_info),
                     first_bad, matrix_unit)
    return z, energies, grad_norms, accepted, first_bad


def _fake_chain(z0, weights, biases, activations, activation_params, output_sign, generator_weights,
                generator_biases, generator_activations, generator_activation_params, target, likelihood_scale,
                n_steps, step_size, noise_scale, prior_kind, prior_mean, prior_inv_var, rng_state, clip_grad, method,
                return_info, matrix_unit=codes.MATRIX_VECTOR):
    return (torch.empty_like(z0), *new_outputs(z0, n_steps, method, return_info))


mlp_chain_cpu.register_fake(_fake_chain)


def _register_triton_op() -> None:
    """Registers ``fastlangevin::mlp_chain_triton`` on first use: ``triton_op`` imports triton, which must not happen
    at ``import fastlangevin``. The launch goes through ``utils.wrap_triton`` (``torch.library.wrap_triton`` for a
    compiled kernel; an interpreted one as it is, which torch < 2.13 would refuse), so ``torch.compile`` sees the
    kernel; the explicit fake keeps fake-tensor tracing off the kernel (the interpreter cannot run there)."""
    if "triton" in CHAIN_OPS:
        return
    from fastlangevin.ops.triton.mlp_chain import mlp_chain_triton as launch
    from fastlangevin.ops.triton.utils import wrap_triton

    @torch.library.triton_op("fastlangevin::mlp_chain_triton", mutates_args=())
    def mlp_chain_triton(z0: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor],
                         activations: list[int], activation_params: list[float], output_sign: float,
                         generator_weights: list[torch.Tensor], generator_biases: list[torch.Tensor],
                         generator_activations: list[int], generator_activation_params: list[float],
                         target: Optional[torch.Tensor], likelihood_scale: float, n_steps: int, step_size: float,
                         noise_scale: float, prior_kind: int, prior_mean: Optional[torch.Tensor],
                         prior_inv_var: Optional[torch.Tensor], rng_state: torch.Tensor, clip_grad: float,
                         method: int, return_info: bool
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The chain from z0 (B, D) on the Triton backend; arguments and outputs as ``mlp_chain_cpu``."""
        z = z0.clone()
        energies, grad_norms, accepted, first_bad = new_outputs(z0, n_steps, method, return_info)
        generator = (MLPNetwork(generator_weights, generator_biases, generator_activations,
                                generator_activation_params) if generator_weights else None)
        launch(z, MLPNetwork(weights, biases, activations, activation_params), output_sign, generator, target,
               likelihood_scale, n_steps, step_size, noise_scale, prior_kind, prior_mean, prior_inv_var, rng_state,
               clip_grad, method, *_wanted(energies, grad_norms, accepted, method, return_info), first_bad,
               wrap=wrap_triton)
        return z, energies, grad_norms, accepted, first_bad

    mlp_chain_triton.register_fake(_fake_chain)
    CHAIN_OPS["triton"] = mlp_chain_triton


CHAIN_OPS = {"cpu": mlp_chain_cpu}  # "triton" once registered


def chain_op(backend: str):
    """The registered op of the fused chain on ``backend`` ("cpu" or "triton")."""
    if backend == "triton":
        _register_triton_op()
    return CHAIN_OPS[backend]


def run_mlp_chain(backend: str, z0: torch.Tensor, energy: MLPNetwork, output_sign: float, n_steps: int,
                  step_size: float, noise_scale: float, prior_args, rng_state: torch.Tensor, clip_grad: float | None,
                  method: int, return_info: bool, generator: Optional[MLPNetwork] = None,
                  target: Optional[torch.Tensor] = None, likelihood_scale: float = 0.0,
                  matrix_unit: int = codes.MATRIX_VECTOR) -> ChainOutputs:
    """The fused chain on ``backend`` ("cpu" or "triton") from z0 (B, *latent), flattened to (B, D) for the kernel.

    energy, generator: ``MLPNetwork``s in z0's compute dtype and device; target (B, P) with a generator.
    prior_args: ``(prior_kind, mean, inv_var)``; method: a code of ``codes.METHODS``; clip_grad None or 0: off.
    matrix_unit: the CPU chain's unit for the layer products (``codes.MATRIX_UNITS``); a bfloat16 unit takes the
    networks in bfloat16 with a float32 z0 (mixed precision: see ``fl.langevin``).
    """
    kind, mean, inv_var = prior_args
    no_generator = MLPNetwork([], [], [], [])
    g = generator or no_generator
    z, energies, grad_norms, accepted, first_bad = chain_op(backend)(
        z0.detach().reshape(z0.shape[0], -1).contiguous(), *energy, float(output_sign), *g,
        None if target is None else target.contiguous(), float(likelihood_scale), n_steps, step_size, noise_scale,
        kind, mean, inv_var, rng_state, float(clip_grad or 0.0), method, return_info,
        *((matrix_unit,) if backend == "cpu" else ()))
    return ChainOutputs(z.reshape(z0.shape), energies if return_info else None,
                        grad_norms if return_info else None,
                        accepted.bool() if return_info and method == codes.MALA else None, first_bad)
