"""Launch each backend's kernels (the step, the fused chain) into caller-given output buffers, so tests can poison
them first."""

from fastlangevin.ops.langevin_step import launch_cpu, launch_cuda
from fastlangevin.ops.langevin_step_reference import langevin_step_reference
from fastlangevin.ops.mlp_chain import launch_cpu_chain


def launch_into(backend, out, z, grad, rng_state, step_size, noise_scale, prior_kind, mean, inv_var):
    args = (z, grad, rng_state, step_size, noise_scale, prior_kind, mean, inv_var)
    if backend == "reference":
        out.copy_(langevin_step_reference(*args))
    elif backend == "cpu":
        launch_cpu(out, *args)
    elif backend == "cuda":
        launch_cuda(out, *args)
    elif backend == "triton":
        from fastlangevin.ops.triton.langevin_step import langevin_step_triton
        langevin_step_triton(z, grad, out, *args[2:])
    else:
        raise ValueError(backend)


def _launch_triton_chain(*args):
    from fastlangevin.ops.triton.mlp_chain import mlp_chain_triton
    mlp_chain_triton(*args)


# the fused chain launched into caller-given outputs: (z, energy, output_sign, generator, target, likelihood_scale,
# n_steps, step_size, noise_scale, prior_kind, mean, inv_var, rng_state, clip_grad, method, energies, grad_norms,
# accepted, first_bad)
CHAIN_LAUNCHERS = {"cpu": launch_cpu_chain, "triton": _launch_triton_chain}
