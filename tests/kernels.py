"""Launch each backend's kernel into a caller-given output buffer, so tests can poison it first."""

import torch

from fastlangevin import _ext
from fastlangevin.ops.langevin_step import DTYPE_CODES, _features, _ptr
from fastlangevin.ops.langevin_step_reference import langevin_step_reference


def launch_into(backend, out, z, grad, rng_state, step_size, noise_scale, prior_kind, mean, inv_var):
    if backend == "reference":
        out.copy_(langevin_step_reference(z, grad, rng_state, step_size, noise_scale, prior_kind, mean, inv_var))
    elif backend == "cpu":
        _ext.require_cpu().langevin_step(z.data_ptr(), grad.data_ptr(), out.data_ptr(), z.numel(), _features(z),
                                         prior_kind, _ptr(mean), _ptr(inv_var), rng_state.data_ptr(), step_size,
                                         noise_scale, DTYPE_CODES[z.dtype], torch.get_num_threads())
    elif backend == "cuda":
        _ext.require_cuda().langevin_step(z.data_ptr(), grad.data_ptr(), out.data_ptr(), z.numel(), _features(z),
                                          prior_kind, _ptr(mean), _ptr(inv_var), rng_state.data_ptr(), step_size,
                                          noise_scale, DTYPE_CODES[z.dtype], 0,
                                          torch.cuda.current_stream(z.device).cuda_stream)
    elif backend == "triton":
        from fastlangevin.ops.triton.langevin_step import langevin_step_triton
        langevin_step_triton(z, grad, out, rng_state, step_size, noise_scale, prior_kind, mean, inv_var)
    else:
        raise ValueError(backend)
