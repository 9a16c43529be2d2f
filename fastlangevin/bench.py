"""Whole-chain benchmarks: the ``fastlangevin bench`` command and the timing helpers ``benchmarks/`` uses.

A row times one Langevin chain (K steps from z0 ~ N(0, I) under an N(0, I) prior) of one implementation:

* ``eager``: the loop as published latent-EBM code writes it (LEBM ``sample_langevin_prior_z``: ``requires_grad_``,
  ``autograd.grad(en.sum(), z)``, an update through ``z.data``) on an ``nn.Sequential``;
* ``compile``: ``torch.compile`` of that step (the step compiled, the Python loop around it; compile time is reported
  apart and left out of the time per chain);
* ``step-op``: ``fl.langevin`` of a plain callable, the generic chain with the fused step op;
* ``fused``: ``fl.langevin`` of an ``fl.MLPEnergy``, the fully fused chain where the build has it; the ``backend``
  column says which path really ran (``cpu:fused`` or a fallback such as ``cpu``);
* ``jax``: ``jax.jit`` + ``lax.fori_loop`` of the same model and weights (only when jax is installed; compile left out).

FLOPs count the forward and the input gradient of each layer, 4·MACs per sample per step (for an MLP
4·Σ d_in·d_out), and are set against a ``torch.mm`` float32 rate measured in the same run on the GEMM shape of the
row (for an MLP (B × H)·(H × H), H the hidden width), timed between the chains of each round and taken at its best.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import math
import os
import platform
import statistics
import sys
import time
from typing import Callable

import numpy as np
import torch
from torch import nn

# ---------------------------------------------------------------------------------------------------------------
# Timing helpers (shared with benchmarks/step_op.py)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_call(fn, device, repeats: int = 20, warmup: int = 3, min_seconds: float = 0.2,
              max_seconds: float | None = None, min_repeats: int = 3) -> dict:
    """Median, min and max seconds of ``fn()`` over at least ``repeats`` runs (more when one run is short, up to
    10·repeats); with ``max_seconds``, stops after ``min_repeats`` runs once that much time is spent (long chains)."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    started = time.perf_counter()
    while len(times) < repeats or time.perf_counter() - started < min_seconds:
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
        if len(times) >= 10 * repeats:
            break
        if max_seconds is not None and len(times) >= min_repeats and time.perf_counter() - started >= max_seconds:
            break
    return dict(median=statistics.median(times), min=min(times), max=max(times), runs=len(times))


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine() -> dict:
    """What the numbers were measured on: CPU model, cores, GPU, library versions, torch threads."""
    info = dict(python=platform.python_version(), torch=torch.__version__,
                cpu=platform.processor() or platform.machine(), cores=os.cpu_count(),
                torch_threads=torch.get_num_threads())
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    for package in ("triton", "jax", "jaxlib"):
        version = _version(package)
        if version:
            info[package] = version
    return info


def write_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def format_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    """columns: (key, header, format spec); a missing value prints as ``-``."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        cells.append(["-" if row.get(key) is None else format(row[key], spec) for key, _, spec in columns])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


def print_table(rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    print(format_table(rows, columns))


def count_macs(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass for ONE sample, over Linear, Conv2d and ConvTranspose2d layers."""
    total = 0

    def hook(m, inputs, output):
        nonlocal total
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features * (output.numel() // output.shape[-1])
        elif isinstance(m, nn.Conv2d):
            total += output.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        elif isinstance(m, nn.ConvTranspose2d):  # each input element scatters into C_out·k·k outputs
            total += inputs[0].numel() * (m.out_channels // m.groups) * math.prod(m.kernel_size)

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]
    try:
        with torch.no_grad():
            module(example[:1])
    finally:
        for h in handles:
            h.remove()
    return total


# ---------------------------------------------------------------------------------------------------------------
# The models


class MLPModel:
    """``fl.MLPEnergy(dims, "leaky_relu", slope)`` and the ``nn.Sequential`` the published code would hold, sharing
    the same parameters (which keep ``requires_grad=True``, as during training)."""

    kind = "mlp"

    def __init__(self, dims, slope: float = 0.2, seed: int = 0, device="cpu"):
        import fastlangevin as fl

        torch.manual_seed(seed)
        self.dims, self.slope = tuple(dims), slope
        self.energy = fl.MLPEnergy(self.dims, "leaky_relu", slope).to(device)
        layers = []
        for i, linear in enumerate(self.energy.layers):
            layers.append(linear)
            if i < len(self.energy.layers) - 1:
                layers.append(nn.LeakyReLU(slope))
        self.seq = nn.Sequential(*layers)
        self.latent_shape = (self.dims[0],)
        self.macs = sum(a * b for a, b in zip(self.dims[:-1], self.dims[1:]))

    @property
    def label(self) -> str:
        return "-".join(map(str, self.dims))

    @property
    def width(self) -> int:
        return max(self.dims[1:-1], default=self.dims[0])

    def published_energy(self, z):
        return self.seq(z)  # (B, 1), as LEBM's _netE (summed over the batch before autograd.grad)

    def energy_fn(self, z):
        return self.energy(z)

    def gemm_shape(self, batch: int) -> tuple[int, int, int]:
        return batch, self.width, self.width


class ConvModel:
    """A small latent generator and image energy, E(G(z)): G maps z (B, 16) through three ConvTranspose2d layers to
    1×16×16 images; the energy is three Conv2d layers and a sum over the last feature map."""

    kind = "conv"
    label = "G:16->1x16x16, E:conv+sum"

    def __init__(self, seed: int = 0, device="cpu", nz: int = 16):
        torch.manual_seed(seed)
        act = lambda: nn.LeakyReLU(0.2)
        self.generator = nn.Sequential(
            nn.Unflatten(1, (nz, 1, 1)),
            nn.ConvTranspose2d(nz, 64, 4, 1, 0), act(),  # 4×4
            nn.ConvTranspose2d(64, 32, 4, 2, 1), act(),  # 8×8
            nn.ConvTranspose2d(32, 1, 4, 2, 1), nn.Tanh(),  # 16×16
        ).to(device)
        self.image_energy = nn.Sequential(
            nn.Conv2d(1, 32, 4, 2, 1), act(),  # 8×8
            nn.Conv2d(32, 64, 4, 2, 1), act(),  # 4×4
            nn.Conv2d(64, 1, 3, 1, 1),  # 1×4×4, summed
        ).to(device)
        self.latent_shape = (nz,)
        example = torch.zeros(1, nz, device=device)
        self.macs = count_macs(self.generator, example) + count_macs(self.image_energy, self.generator(example))
        self.width = 64

    def published_energy(self, z):
        return self.image_energy(self.generator(z)).sum((1, 2, 3))

    def energy_fn(self, z):
        return self.published_energy(z)

    def gemm_shape(self, batch: int) -> tuple[int, int, int]:
        return batch * 16, 32 * 16, 64  # im2col GEMM of the largest layer (Conv2d 32→64, 4×4 kernel, 4×4 out)


# ---------------------------------------------------------------------------------------------------------------
# The implementations: each prepares a chain and returns (run() -> z_K, what ran, compile seconds, note)


class Skip(Exception):
    """This implementation cannot run here; the message says why (it becomes the row's note)."""


@dataclasses.dataclass
class Prepared:
    run: Callable[[], object]  # returns z_K (a torch tensor, or a jax array for the JAX chain)
    backend: str
    compile_s: float | None = None
    note: str | None = None


def lebm_chain(energy, z, n_steps: int, s: float) -> torch.Tensor:
    """LEBM's ``sample_langevin_prior_z`` (σ_p = 1), line for line: the baseline every speed-up is measured against."""
    z = z.clone().detach()
    for _ in range(n_steps):
        z.requires_grad_(True)
        en = energy(z)
        z_grad = torch.autograd.grad(en.sum(), z)[0]
        z.data = z.data - 0.5 * s * s * (z_grad + z.data) + s * torch.randn_like(z).data
    return z.detach()


def _eager(model, z0, n_steps, step_size, seed):
    s = math.sqrt(step_size)
    return Prepared(lambda: lebm_chain(model.published_energy, z0, n_steps, s), "torch eager")


def _compile(model, z0, n_steps, step_size, seed):
    """The same step, written functionally (dynamo cannot trace an assignment to ``.data``), compiled whole with
    ``fullgraph=True``; ``torch.autograd.grad`` inside needs ``trace_autograd_ops``, without which it graph-breaks."""
    s = math.sqrt(step_size)
    energy = model.published_energy

    def step(z):
        z = z.detach().requires_grad_(True)
        en = energy(z)
        z_grad = torch.autograd.grad(en.sum(), z)[0]
        return (z - 0.5 * s * s * (z_grad + z) + s * torch.randn_like(z)).detach()

    import torch._dynamo

    patch = torch._dynamo.config.patch(trace_autograd_ops=True)
    torch._dynamo.reset()  # a fresh, static-shape compile per batch size, so compile_s is this shape's
    compiled = torch.compile(step, fullgraph=True, dynamic=False)
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
    return Prepared(run, "torch.compile (inductor)", compile_s, note)


def _step_op(model, z0, n_steps, step_size, seed):
    import fastlangevin as fl

    energy = model.energy_fn
    plain = lambda z: energy(z)  # a plain callable: the fused whole-chain path is not taken
    _, info = fl.langevin(plain, z0, 1, step_size, seed=seed, return_info=True)
    return Prepared(lambda: fl.langevin(plain, z0, n_steps, step_size, seed=seed), info.backend)


def _fused(model, z0, n_steps, step_size, seed):
    import fastlangevin as fl
    from fastlangevin.backends import resolve_backend
    from fastlangevin.ops.mlp_chain import fused_backend_for

    if model.kind != "mlp":
        raise Skip("the fused chain takes an fl.MLPEnergy")
    energy = model.energy
    _, info = fl.langevin(energy, z0, 1, step_size, seed=seed, return_info=True)
    note = None
    if not info.backend.endswith(":fused"):
        _, why = fused_backend_for(resolve_backend("auto", z0.device, z0.dtype))
        note = f"fell back to the step-op chain: {why}"
    return Prepared(lambda: fl.langevin(energy, z0, n_steps, step_size, seed=seed), info.backend, note=note)


def _jax(model, z0, n_steps, step_size, seed):
    if model.kind != "mlp":
        raise Skip("the JAX chain is written for the MLP energy")
    try:
        import jax
        import jax.numpy as jnp
    except ImportError:
        raise Skip("jax is not installed (pip install jax)") from None
    jax_device = jax.devices()[0]
    if z0.device.type != "cpu" and jax_device.platform == "cpu":
        raise Skip(f"jax runs on {jax_device.platform} here, the torch rows on {z0.device}")
    params = [(jnp.asarray(w.detach().cpu().numpy().T), None if b is None else jnp.asarray(b.detach().cpu().numpy()))
              for w, b in model.energy.kernel_weights()]
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

    zj, key = jnp.asarray(z0.detach().cpu().numpy()), jax.random.PRNGKey(seed)
    t0 = time.perf_counter()
    chain(zj, key).block_until_ready()
    compile_s = time.perf_counter() - t0

    def run():  # a jax array: the copy back to torch is left out of the time
        return chain(zj, key).block_until_ready()

    return Prepared(run, f"jax.jit ({jax_device.platform})", compile_s)


IMPLEMENTATIONS = {"eager": _eager, "compile": _compile, "step-op": _step_op, "fused": _fused, "jax": _jax}


# ---------------------------------------------------------------------------------------------------------------
# The cases


@dataclasses.dataclass(frozen=True)
class ChainSpec:
    """One row to measure. ``case`` names the table section; model ``("mlp", dims)`` or ``("conv",)``."""

    case: str
    impl: str
    model: tuple
    batch: int
    n_steps: int
    step_size: float

    @property
    def key(self) -> tuple:  # the same chain measured for two sections is measured once
        return self.impl, self.model, self.batch, self.n_steps, self.step_size

    @property
    def group(self) -> str:
        """What rows compare against each other (pytest-benchmark's group, the x-eager denominator)."""
        shape = "-".join(map(str, self.model[1])) if self.model[0] == "mlp" else "conv"
        return f"chain {shape} K={self.n_steps} B={self.batch}"


MLP_DIMS = (100, 200, 200, 1)
MLP_STEPS, MLP_STEP_SIZE = 60, 0.16  # LEBM prior chain: 60 steps, s = 0.4, ε = s²
CONV_STEPS, CONV_STEP_SIZE, CONV_BATCH = 20, 0.01, 64  # LEBM posterior-chain length and step (s = 0.1)
MLP_IMPLS = ("eager", "compile", "step-op", "fused", "jax")
CASES = ("mlp", "conv", "scaling")


def chain_specs(cases=CASES, quick: bool = False) -> list[ChainSpec]:
    """The rows of a run, in order. ``quick``: a subset that runs in about a minute on two CPU cores."""
    mlp = ("mlp", MLP_DIMS)
    specs = []
    if "mlp" in cases:
        for batch in ((64, 1024) if quick else (64, 1024, 8192)):
            specs += [ChainSpec("mlp", impl, mlp, batch, MLP_STEPS, MLP_STEP_SIZE) for impl in MLP_IMPLS]
    if "conv" in cases:
        specs += [ChainSpec("conv", impl, ("conv",), CONV_BATCH, CONV_STEPS, CONV_STEP_SIZE)
                  for impl in ("eager", "step-op")]
    if "scaling" in cases:
        for batch in ((64, 256, 1024) if quick else (64, 256, 1024, 4096, 8192)):
            specs += [ChainSpec("scaling-batch", impl, mlp, batch, MLP_STEPS, MLP_STEP_SIZE)
                      for impl in ("eager", "fused")]
        for width in ((64, 512) if quick else (64, 128, 256, 512, 1024)):
            dims = ("mlp", (MLP_DIMS[0], width, width, 1))
            specs += [ChainSpec("scaling-width", impl, dims, 1024, MLP_STEPS, MLP_STEP_SIZE)
                      for impl in ("eager", "fused")]
    return specs


_MODELS: dict[tuple, object] = {}


def build_model(model: tuple, device):
    key = model + (str(device),)
    if key not in _MODELS:
        _MODELS[key] = MLPModel(model[1], device=device) if model[0] == "mlp" else ConvModel(device=device)
    return _MODELS[key]


def prepare(spec: ChainSpec, device, seed: int = 0) -> tuple[object, torch.Tensor, Prepared]:
    """(model, z0, the prepared chain); raises ``Skip`` when the implementation cannot run here."""
    model = build_model(spec.model, device)
    z0 = torch.randn((spec.batch,) + model.latent_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    return model, z0, IMPLEMENTATIONS[spec.impl](model, z0, spec.n_steps, spec.step_size, seed)


def measure_group(specs: list[ChainSpec], device, repeats: int, max_seconds: float, min_seconds: float = 0.5,
                  min_repeats: int = 3) -> dict[tuple, dict]:
    """Rows of one group (same model, batch and chain), timed in interleaved rounds — eager, compile, …, eager,
    compile, … — so that load from other processes falls on every implementation alike and the speed-ups over
    eager compare chains run side by side. Rounds go on until ``repeats`` rounds and ``min_seconds`` are done, or
    stop after ``min_repeats`` rounds once ``max_seconds`` are spent."""
    rows, chains = {}, {}
    for spec in specs:
        row = dict(impl=spec.impl, batch=spec.batch, n_steps=spec.n_steps, step_size=spec.step_size,
                   group=spec.group)
        try:
            model, z0, prepared = prepare(spec, device)
            chains[spec.key] = (model, prepared)
            row.update(backend=prepared.backend, compile_s=prepared.compile_s, note=prepared.note)
        except Skip as e:
            model = build_model(spec.model, device)
            row.update(backend="skipped", note=str(e))
        row.update(model=model.label, width=model.width)
        rows[spec.key] = row
    # The sgemm ceiling is timed inside every round too, so it gets the same chances of a quiet moment as the chains.
    m, k, n = build_model(specs[0].model, device).gemm_shape(specs[0].batch)
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(m, k, generator=gen).to(device), torch.randn(k, n, generator=gen).to(device)
    gemm_out, gemm_times = torch.empty(m, n, device=device), []

    def time_gemm(reps: int = 5):
        for _ in range(reps):
            t0 = time.perf_counter()
            torch.mm(a, b, out=gemm_out)
            sync(device)
            gemm_times.append(time.perf_counter() - t0)

    time_gemm(3)  # warm-up
    gemm_times.clear()
    times = {key: [] for key in chains}
    last = {}
    for key, (_, prepared) in chains.items():  # warm-up
        last[key] = prepared.run()
    sync(device)
    started, rounds = time.perf_counter(), 0
    while chains:
        for key, (_, prepared) in chains.items():
            t0 = time.perf_counter()
            last[key] = prepared.run()
            sync(device)
            times[key].append(time.perf_counter() - t0)
        time_gemm()
        rounds += 1
        elapsed = time.perf_counter() - started
        if (rounds >= repeats and elapsed >= min_seconds) or rounds >= 10 * repeats or \
                (rounds >= min_repeats and elapsed >= max_seconds):
            break
    for key, (model, prepared) in chains.items():
        t, spec = times[key], next(s for s in specs if s.key == key)
        median = statistics.median(t)
        flop = 4 * model.macs * spec.batch * spec.n_steps
        gemm = (m, k, n)
        sgemm = 2 * m * k * n / min(gemm_times) / 1e9
        z_last = last[key] if isinstance(last[key], torch.Tensor) else torch.from_numpy(np.array(last[key]))
        with torch.no_grad():
            final_energy = model.energy_fn(z_last.to(device).float()).mean().item()
        rows[key].update(median_s=median, min_s=min(t), max_s=max(t), runs=len(t), gflop_per_chain=flop / 1e9,
                         gflops=flop / median / 1e9, sgemm_shape=list(gemm), sgemm_gflops=sgemm,
                         of_sgemm=flop / median / 1e9 / sgemm, final_energy=final_energy)
    load = os.getloadavg()[0]
    eager = rows.get(next((s.key for s in specs if s.impl == "eager"), None), {})
    for row in rows.values():
        row["load_average"] = load  # > cores: other processes took time from these rows
        if eager.get("median_s") and row.get("median_s"):
            row["vs_eager"] = eager["median_s"] / row["median_s"]
            row["vs_eager_of_min"] = eager["min_s"] / row["min_s"]
    return rows


def run_specs(specs: list[ChainSpec], device, repeats: int = 10, max_seconds: float = 8.0,
              log=lambda msg: print(msg, file=sys.stderr, flush=True)) -> list[dict]:
    """Measures each distinct chain once, group by group (a chain listed in two sections, e.g. ``mlp`` and
    ``scaling-batch``, is measured once and shown in both)."""
    groups: dict[str, list[ChainSpec]] = {}
    for spec in specs:
        members = groups.setdefault(spec.group, [])
        if all(m.key != spec.key for m in members):
            members.append(spec)
    measured = {}
    for group, members in groups.items():
        log(f"  {group}: {', '.join(m.impl for m in members)}")
        measured.update(measure_group(members, device, repeats, max_seconds))
    return [dict(measured[spec.key], case=spec.case) for spec in specs]


# ---------------------------------------------------------------------------------------------------------------
# Report: table, JSON, PNG

COLUMNS = [("case", "case", "s"), ("impl", "impl", "s"), ("backend", "ran", "s"), ("model", "model", "s"),
           ("batch", "B", "d"), ("median_ms", "median ms", ".1f"), ("min_ms", "min", ".1f"), ("max_ms", "max", ".1f"),
           ("runs", "runs", "d"), ("vs_eager", "x eager", ".2f"), ("gflops", "GFLOP/s", ".1f"),
           ("sgemm_gflops", "sgemm", ".0f"), ("of_sgemm", "of sgemm", ".0%"), ("compile_s", "compile s", ".1f"),
           ("final_energy", "E(z_K)", ".3f"), ("load_average", "load", ".1f")]


def table(rows: list[dict]) -> str:
    shown = [dict(r, **{f"{k}_ms": r[f"{k}_s"] * 1e3 for k in ("median", "min", "max") if r.get(f"{k}_s")})
             for r in rows]
    text = format_table(shown, COLUMNS)
    notes = sorted({f"{r['impl']}: {r['note']}" for r in rows if r.get("note")})
    return text + "".join(f"\n  note  {n}" for n in notes)


def plot(rows: list[dict], path: str) -> str | None:
    """Time per chain against batch (MLP 100-200-200-1, one line per implementation) and against hidden width."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG written (pip install matplotlib)")
        return None
    base = "-".join(map(str, MLP_DIMS))
    by_batch, by_width = {}, {}
    for r in rows:
        if r.get("median_s") is None:
            continue
        name = r["impl"]
        if r["impl"] == "fused":  # say which path ran, so a fallback is never read as the fused chain
            name += f" (ran {r['backend']})" if r["backend"].endswith(":fused") else \
                f" (fell back: ran {r['backend']} step-op)"
        if r["case"] in ("mlp", "scaling-batch") and r["model"] == base:
            by_batch.setdefault(name, {})[r["batch"]] = (r["median_s"], r["min_s"], r["max_s"])
        at_1024 = r["model"] == base and r["batch"] == 1024 and r["impl"] in ("eager", "fused")
        if r["case"] == "scaling-width" or at_1024:
            by_width.setdefault(name, {})[r["width"]] = (r["median_s"], r["min_s"], r["max_s"])
    panels = [(by_batch, "batch size B", f"MLP {base}, K={MLP_STEPS}: time per chain"),
              (by_width, "hidden width H", f"MLP 100-H-H-1, K={MLP_STEPS}, B=1024")]
    panels = [p for p in panels if p[0]]
    if not panels:
        return None
    fig, axes = plt.subplots(1, len(panels), figsize=(6.5 * len(panels), 4.5), squeeze=False)
    for ax, (series, xlabel, title) in zip(axes[0], panels):
        for name, points in series.items():
            xs = sorted(points)
            line, = ax.plot(xs, [points[x][0] for x in xs], marker="o", label=name)
            ax.fill_between(xs, [points[x][1] for x in xs], [points[x][2] for x in xs], color=line.get_color(),
                            alpha=0.15, linewidth=0)
        ax.set(xscale="log", yscale="log", xlabel=xlabel, ylabel="seconds per chain (median; band: min-max)",
               title=title)
        ticks = sorted({x for points in series.values() for x in points})
        ax.set_xticks(ticks, [str(x) for x in ticks])
        ax.minorticks_off()
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_bench(out_dir: str = "bench-out", cases=CASES, quick: bool = False, device: str | None = None,
              repeats: int | None = None) -> dict:
    """``fastlangevin bench``: measures, prints the table, writes ``chain_bench.json`` and ``chain_bench.png``."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    unknown = set(cases) - set(CASES)
    if unknown:
        raise ValueError(f"--cases: unknown {sorted(unknown)}; choose from {','.join(CASES)}")
    info = machine()
    info["load_average_at_start"] = os.getloadavg()[0]
    if info["load_average_at_start"] > 0.5:
        print(f"warning: the 1-minute load average is {info['load_average_at_start']:.1f} before the run: other "
              f"processes share these cores and the times will be noisy", flush=True)
    print(f"fastlangevin bench ({'quick' if quick else 'full'}, {device}): {info['cpu']}, {info['cores']} cores, "
          f"torch {info['torch']} ({info['torch_threads']} threads), jax {info.get('jax', 'not installed')}",
          flush=True)
    started = time.perf_counter()
    rows = run_specs(chain_specs(cases, quick), device, repeats or (5 if quick else 10),
                     max_seconds=3.0 if quick else 8.0)
    print()
    print(table(rows))
    info["load_average_at_end"] = os.getloadavg()[0]
    payload = dict(machine=info, device=str(device), quick=quick, cases=list(cases),
                   flop_count="4*MACs per sample per step (forward + input gradient of each layer)",
                   seconds=time.perf_counter() - started, rows=rows)
    json_path = os.path.join(out_dir, "chain_bench.json")
    write_json(json_path, payload)
    png = plot(rows, os.path.join(out_dir, "chain_bench.png"))
    print(f"\nwrote {json_path}" + (f" and {png}" if png else "") + f" ({payload['seconds']:.0f} s)")
    return payload
