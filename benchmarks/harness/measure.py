"""The rows of a chain benchmark and how they are measured.

A row times one Langevin chain (K steps from z0 ~ N(0, I) under an N(0, I) prior) of one implementation
(``implementations.py``). Rows of one group (same model, batch and chain) are timed in interleaved rounds, so the
speed-ups over eager compare chains run side by side. FLOPs (``flops.py``) are set against a ``torch.mm`` float32
rate measured in the same rounds on the GEMM shape of the row, taken at its best.
"""

from __future__ import annotations

import dataclasses
import statistics
import sys
import time

import numpy as np
import torch

from harness.flops import chain_flop
from harness.implementations import IMPLEMENTATIONS, Prepared, Skip
from harness.machine import load_average
from harness.models import CONV_BATCH, CONV_STEP_SIZE, CONV_STEPS, MLP_DIMS, MLP_STEP_SIZE, MLP_STEPS, build_model
from harness.timing import Stopwatch, sync

MLP_IMPLS = ("eager", "compile", "step-op", "graph", "fused", "jax")
CONV_IMPLS = ("eager", "step-op", "graph")
CASES = ("mlp", "conv", "scaling")


@dataclasses.dataclass(frozen=True)
class ChainSpec:
    """One row to measure. ``case`` names the table section; model ``("mlp", dims)`` or ``("conv",)``;
    ``compiler``: the ``torch.compile`` backend of a ``compile`` row."""

    case: str
    impl: str
    model: tuple
    batch: int
    n_steps: int
    step_size: float
    compiler: str = "inductor"

    @property
    def key(self) -> tuple:  # the same chain measured for two sections is measured once
        return self.impl, self.model, self.batch, self.n_steps, self.step_size, self.compiler

    @property
    def group(self) -> str:
        """What rows compare against each other (pytest-benchmark's group, the x-eager denominator)."""
        shape = "-".join(map(str, self.model[1])) if self.model[0] == "mlp" else "conv"
        return f"chain {shape} K={self.n_steps} B={self.batch}"


def chain_specs(cases=CASES, quick: bool = False) -> list[ChainSpec]:
    """The rows of ``fastlangevin bench``, in order. ``quick``: a subset that runs in about a minute on two CPU
    cores."""
    mlp = ("mlp", MLP_DIMS)
    specs = []
    if "mlp" in cases:
        for batch in ((64, 1024) if quick else (64, 1024, 8192)):
            specs += [ChainSpec("mlp", impl, mlp, batch, MLP_STEPS, MLP_STEP_SIZE) for impl in MLP_IMPLS]
    if "conv" in cases:
        specs += [ChainSpec("conv", impl, ("conv",), CONV_BATCH, CONV_STEPS, CONV_STEP_SIZE) for impl in CONV_IMPLS]
    if "scaling" in cases:
        for batch in ((64, 256, 1024) if quick else (64, 256, 1024, 4096, 8192)):
            specs += [ChainSpec("scaling-batch", impl, mlp, batch, MLP_STEPS, MLP_STEP_SIZE)
                      for impl in ("eager", "fused")]
        for width in ((64, 512) if quick else (64, 128, 256, 512, 1024)):
            dims = ("mlp", (MLP_DIMS[0], width, width, 1))
            specs += [ChainSpec("scaling-width", impl, dims, 1024, MLP_STEPS, MLP_STEP_SIZE)
                      for impl in ("eager", "fused")]
    return specs


def prepare(spec: ChainSpec, device, seed: int = 0) -> tuple[object, torch.Tensor, Prepared]:
    """(model, z0, the prepared chain); raises ``Skip`` when the implementation cannot run here."""
    model = build_model(spec.model, device)
    z0 = torch.randn((spec.batch,) + model.latent_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    options = {"backend": spec.compiler} if spec.impl == "compile" else {}
    return model, z0, IMPLEMENTATIONS[spec.impl](model, z0, spec.n_steps, spec.step_size, seed, **options)


def measure_group(specs: list[ChainSpec], device, repeats: int, max_seconds: float, min_seconds: float = 0.5,
                  min_repeats: int = 3) -> dict[tuple, dict]:
    """Rows of one group (same model, batch and chain), timed in interleaved rounds — eager, compile, …, eager,
    compile, … — so that load from other processes falls on every implementation alike. Rounds go on until
    ``repeats`` rounds and ``min_seconds`` are done, or stop after ``min_repeats`` rounds once ``max_seconds`` are
    spent. Times: CUDA events on a GPU (the host clock for work outside torch's stream), the host clock on a CPU."""
    device = torch.device(device)
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
    device_clock = Stopwatch(device)

    def time_gemm(reps: int = 5):
        for _ in range(reps):
            gemm_times.append(device_clock.time(lambda: torch.mm(a, b, out=gemm_out))[0])

    time_gemm(3)  # warm-up
    gemm_times.clear()
    clocks = {key: Stopwatch(device, prepared.host_clock) for key, (_, prepared) in chains.items()}
    times = {key: [] for key in chains}
    last = {}
    for key, (_, prepared) in chains.items():  # warm-up
        last[key] = prepared.run()
    sync(device)
    started, rounds = time.perf_counter(), 0
    while chains:
        for key, (_, prepared) in chains.items():
            seconds, last[key] = clocks[key].time(prepared.run)
            times[key].append(seconds)
        time_gemm()
        rounds += 1
        elapsed = time.perf_counter() - started
        if (rounds >= repeats and elapsed >= min_seconds) or rounds >= 10 * repeats or \
                (rounds >= min_repeats and elapsed >= max_seconds):
            break
    for key, (model, prepared) in chains.items():
        t, spec = times[key], next(s for s in specs if s.key == key)
        median = statistics.median(t)
        flop = chain_flop(model.macs, spec.batch, spec.n_steps)
        sgemm = 2 * m * k * n / min(gemm_times) / 1e9
        z_last = last[key] if isinstance(last[key], torch.Tensor) else torch.from_numpy(np.array(last[key]))
        with torch.no_grad():
            final_energy = model.energy_fn(z_last.to(device).float()).mean().item()
        rows[key].update(median_s=median, min_s=min(t), max_s=max(t), runs=len(t), gflop_per_chain=flop / 1e9,
                         gflops=flop / median / 1e9, sgemm_shape=[m, k, n], sgemm_gflops=sgemm,
                         of_sgemm=flop / median / 1e9 / sgemm, final_energy=final_energy)
    load = load_average()
    baselines = {name: rows.get(next((s.key for s in specs if s.impl == name), None), {})
                 for name in ("eager", "graph")}
    for row in rows.values():
        row["load_average"] = load  # > cores: other processes took time from these rows
        for name, base in baselines.items():
            if base.get("median_s") and row.get("median_s"):
                row[f"vs_{name}"] = base["median_s"] / row["median_s"]
        if baselines["eager"].get("min_s") and row.get("min_s"):
            row["vs_eager_of_min"] = baselines["eager"]["min_s"] / row["min_s"]
    return rows


def run_specs(specs: list[ChainSpec], device, repeats: int = 10, max_seconds: float = 8.0, min_seconds: float = 0.5,
              log=lambda msg: print(msg, file=sys.stderr, flush=True), on_group=None) -> list[dict]:
    """Measures each distinct chain once, group by group (a chain listed in two sections, e.g. ``mlp`` and
    ``scaling-batch``, is measured once and shown in both). ``on_group(rows so far)`` is called after each group
    (to save partial results)."""
    groups: dict[str, list[ChainSpec]] = {}
    for spec in specs:
        members = groups.setdefault(spec.group, [])
        if all(m.key != spec.key for m in members):
            members.append(spec)
    measured = {}
    for group, members in groups.items():
        log(f"  {group}: {', '.join(m.impl for m in members)}")
        measured.update(measure_group(members, device, repeats, max_seconds, min_seconds))
        if on_group is not None:
            on_group([dict(measured[s.key], case=s.case) for s in specs if s.key in measured])
    return [dict(measured[spec.key], case=spec.case) for spec in specs]
