"""The chains being compared. Each ``prepare_*(model, z0, n_steps, step_size, seed)`` returns a ``Prepared`` chain
(``run()`` -> z_K) or raises ``Skip`` saying why it cannot run here.

* ``eager``: the loop as published latent-EBM code writes it (LEBM ``sample_langevin_prior_z``: ``requires_grad_``,
  ``autograd.grad(en.sum(), z)``, an update through ``z.data``) on an ``nn.Sequential``;
* ``compile``: ``torch.compile`` of that step (the step compiled, the Python loop around it; compile time is reported
  apart and left out of the time per chain);
* ``step-op``: ``fl.langevin`` of the energy as an ``nn.Module``, step by step with the fused step op
  (``cuda_graph=False``);
* ``graph``: the same chain captured once into a CUDA graph and replayed (``cuda_graph=True``; CUDA only);
* ``fused``: ``fl.langevin`` of an ``fl.MLPEnergy``, the fully fused chain where the build has it; ``backend`` says
  which path really ran (``cpu:fused``, ``triton:fused`` or a fallback such as ``cpu``);
* ``jax``: ``jax.jit`` + ``lax.fori_loop`` of the same model and weights (when jax is installed; compile left out).
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
from typing import Callable

import torch

from harness.timing import sync


class Skip(Exception):
    """This implementation cannot run here; the message says why (it becomes the row's note)."""


@dataclasses.dataclass
class Prepared:
    run: Callable[[], object]  # returns z_K (a torch tensor, or a jax array for the JAX chain)
    backend: str  # what ran, as the library reports it
    compile_s: float | None = None  # one-time cost left out of the time per chain (compile, graph capture)
    note: str | None = None
    host_clock: bool = False  # its work runs outside torch's current stream: time it with the host clock


def lebm_chain(energy, z, n_steps: int, s: float) -> torch.Tensor:
    """LEBM's ``sample_langevin_prior_z`` (σ_p = 1), line for line: the baseline every speed-up is measured against."""
    z = z.clone().detach()
    for _ in range(n_steps):
        z.requires_grad_(True)
        en = energy(z)
        z_grad = torch.autograd.grad(en.sum(), z)[0]
        z.data = z.data - 0.5 * s * s * (z_grad + z.data) + s * torch.randn_like(z).data
    return z.detach()


def prepare_eager(model, z0, n_steps, step_size, seed):
    s = math.sqrt(step_size)
    return Prepared(lambda: lebm_chain(model.published_energy, z0, n_steps, s), "torch eager")


def prepare_compile(model, z0, n_steps, step_size, seed, backend: str = "inductor"):
    """The same step, written functionally (dynamo cannot trace an assignment to ``.data``), compiled whole with
    ``fullgraph=True``; ``torch.autograd.grad`` inside needs ``trace_autograd_ops`` (torch >= 2.11), without which
    it graph-breaks. ``backend``: the torch.compile backend (``aot_eager`` traces the same graph without code
    generation: the quick lane of ``gpu_validate.py --dry-run``)."""
    import torch._dynamo

    s = math.sqrt(step_size)
    energy = model.published_energy

    def step(z):
        z = z.detach().requires_grad_(True)
        en = energy(z)
        z_grad = torch.autograd.grad(en.sum(), z)[0]
        return (z - 0.5 * s * s * (z_grad + z) + s * torch.randn_like(z)).detach()

    if not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        raise Skip(f"torch {torch.__version__} has no torch._dynamo.config.trace_autograd_ops (torch >= 2.11): "
                   f"autograd.grad would break the graph")
    patch = torch._dynamo.config.patch(trace_autograd_ops=True)
    torch._dynamo.reset()  # a fresh, static-shape compile per batch size, so compile_s is this shape's
    compiled = torch.compile(step, fullgraph=True, dynamic=False, backend=backend)
    counters = torch._dynamo.utils.counters
    hits_before = counters["inductor"]["fxgraph_cache_hit"]
    try:
        with patch:
            t0 = time.perf_counter()
            compiled(z0)
            sync(z0.device)
            compile_s = time.perf_counter() - t0
    except Exception as e:  # no C++ compiler, an unsupported op, ...
        raise Skip(f"torch.compile failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None
    cached = counters["inductor"]["fxgraph_cache_hit"] > hits_before

    def run():
        with patch:
            z = z0
            for _ in range(n_steps):
                z = compiled(z)
            return z

    note = "compile s is a warm inductor cache's (the FX-graph cache hit)" if cached else None
    return Prepared(run, f"torch.compile ({backend})", compile_s, note)


def prepare_step_op(model, z0, n_steps, step_size, seed):
    import fastlangevin as fl

    energy = model.module  # an nn.Module, not an fl.MLPEnergy: the fused whole-chain path is not taken
    _, info = fl.langevin(energy, z0, 1, step_size, seed=seed, return_info=True, cuda_graph=False)
    return Prepared(lambda: fl.langevin(energy, z0, n_steps, step_size, seed=seed, cuda_graph=False), info.backend)


def prepare_graph(model, z0, n_steps, step_size, seed):
    import fastlangevin as fl

    if z0.device.type != "cuda":
        raise Skip("CUDA graphs need a CUDA device")
    energy = model.module
    run = lambda: fl.langevin(energy, z0, n_steps, step_size, seed=seed, cuda_graph=True)
    t0 = time.perf_counter()
    run()  # captures the K-step chain (warm-up chains and the capture): a one-time cost
    sync(z0.device)
    capture_s = time.perf_counter() - t0
    _, info = fl.langevin(energy, z0, 1, step_size, seed=seed, return_info=True, cuda_graph=True)
    note = None
    if not info.backend.endswith(":graph"):
        note = "the capture failed (see the warning and fl.backend_info()): ran the step-op chain"
    return Prepared(run, info.backend, capture_s, note)


def prepare_fused(model, z0, n_steps, step_size, seed):
    import fastlangevin as fl

    if model.kind != "mlp":
        raise Skip("the fused chain takes an fl.MLPEnergy")
    energy = model.energy
    t0 = time.perf_counter()
    _, info = fl.langevin(energy, z0, 1, step_size, seed=seed, return_info=True)  # compiles the kernel (Triton)
    sync(z0.device)
    compile_s = time.perf_counter() - t0
    note = None
    if not info.backend.endswith(":fused"):  # fl.backend_info() lists why
        why = [f for f in fl.backend_info().fallbacks if "MLPEnergy" in f]
        note = "fell back to the step-op chain" + (f": {why[-1]}" if why else "")
    return Prepared(lambda: fl.langevin(energy, z0, n_steps, step_size, seed=seed), info.backend,
                    compile_s, note=note)


def prepare_jax(model, z0, n_steps, step_size, seed):
    if model.kind != "mlp":
        raise Skip("the JAX chain is written for the MLP energy")
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # else XLA takes 75 % of the GPU from torch
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        raise Skip("jax is not installed (pip install jax)") from None
    platform = "cpu" if z0.device.type == "cpu" else "gpu"  # the device the torch rows run on
    try:
        jax_device = jax.devices(platform)[0]
    except RuntimeError:
        raise Skip(f"jax has no {platform} device here (the torch rows run on {z0.device})") from None
    put = lambda t: jax.device_put(t.detach().cpu().numpy(), jax_device)
    params = [(put(layer.weight.T), None if layer.bias is None else put(layer.bias))
              for layer in model.energy.layers]
    slope, sigma = model.slope, math.sqrt(step_size)

    def energy_sum(z):
        h = z
        for i, (w, b) in enumerate(params):
            h = h @ w if b is None else h @ w + b
            if i < len(params) - 1:
                h = jnp.where(h > 0, h, slope * h)
        return h.sum()

    grad = jax.grad(energy_sum)

    @jax.jit
    def chain(z, key):
        def body(k, z):
            noise = jax.random.normal(jax.random.fold_in(key, k), z.shape, z.dtype)
            return z - 0.5 * step_size * (grad(z) + z) + sigma * noise
        return jax.lax.fori_loop(0, n_steps, body, z)

    zj, key = put(z0), jax.device_put(jax.random.PRNGKey(seed), jax_device)
    t0 = time.perf_counter()
    chain(zj, key).block_until_ready()
    compile_s = time.perf_counter() - t0

    def run():  # a jax array: the copy back to torch is left out of the time
        return chain(zj, key).block_until_ready()

    return Prepared(run, f"jax.jit ({jax_device.platform})", compile_s, host_clock=True)


IMPLEMENTATIONS = {"eager": prepare_eager, "compile": prepare_compile, "step-op": prepare_step_op,
                   "graph": prepare_graph, "fused": prepare_fused, "jax": prepare_jax}
