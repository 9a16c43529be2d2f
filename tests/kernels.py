"""Launch each backend's kernel into a caller-given output buffer, so tests can poison it first."""

from fastlangevin.ops.langevin_step import launch_cpu, launch_cuda
from fastlangevin.ops.langevin_step_reference import langevin_step_reference


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
