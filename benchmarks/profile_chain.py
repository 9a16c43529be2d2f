"""Profile one warmed-up Langevin chain with Nsight Systems, Nsight Compute or the PyTorch profiler.

    # Nsight Systems: the timeline of the chain, with fastlangevin's NVTX ranges (chain, step k, energy, update)
    nsys profile --capture-range=cudaProfilerApi --capture-range-end=stop -t cuda,nvtx -o chain \\
        python benchmarks/profile_chain.py --mode nsys --energy mlp-step
    # Nsight Compute: each kernel of one step, once, after warm-up
    ncu --profile-from-start off --set full -o step python benchmarks/profile_chain.py --mode ncu --energy mlp-step
    # PyTorch profiler (no Nsight needed, CPU too): a Chrome/Perfetto trace and a table of the top ops
    python benchmarks/profile_chain.py --mode torch --energy conv --trace chain-trace.json

Modes: ``nsys`` runs the chain ``--repeats`` times between ``cudaProfilerStart``/``Stop`` (for
``--capture-range=cudaProfilerApi``) with NVTX ranges on (``--emit-nvtx`` adds one range per ATen op); ``ncu`` runs a
one-step chain once between them (for ``--profile-from-start off``); ``torch`` records the chain with
``torch.profiler`` under ``record_function("profile_chain ...")`` labels and writes the trace JSON. Every mode warms
the chain up first (compilation, cuBLAS handles, caches), outside the profiled range.

Energies (the models of ``fastlangevin bench``): ``mlp-fused`` — ``fl.MLPEnergy`` 100-200-200-1, the fully fused chain
where the build has it; ``mlp-step`` — the same MLP as an ``nn.Module``: autograd gradient + fused step op per step
(no CUDA graph); ``conv`` — E(G(z)) with conv layers, step op per step; ``eager`` — LEBM's published loop on the MLP
(the baseline).
"""

from __future__ import annotations

import argparse
import sys

import torch

import fastlangevin as fl
from harness.implementations import IMPLEMENTATIONS, Prepared
from harness.models import (CONV_BATCH, CONV_STEP_SIZE, CONV_STEPS, MLP_DIMS, MLP_STEP_SIZE, MLP_STEPS, ConvModel,
                            MLPModel)
from harness.timing import sync

ENERGIES = {"mlp-fused": ("mlp", "fused"), "mlp-step": ("mlp", "step-op"), "conv": ("conv", "step-op"),
            "eager": ("mlp", "eager")}
DTYPES = {"float32": torch.float32, "float64": torch.float64}


def build(energy: str, device: str, dtype: torch.dtype, seed: int = 0):
    """(model, step_size, default steps, default batch) of one of ``ENERGIES``, its weights in ``dtype``."""
    if ENERGIES[energy][0] == "mlp":
        model = MLPModel(MLP_DIMS, seed=seed, device=device)
        model.energy.to(dtype)  # the nn.Sequential shares these layers
        return model, MLP_STEP_SIZE, MLP_STEPS, 1024
    model = ConvModel(seed=seed, device=device)
    model.generator.to(dtype)
    model.image_energy.to(dtype)
    return model, CONV_STEP_SIZE, CONV_STEPS, CONV_BATCH


def prepare_chain(model, energy: str, batch: int, n_steps: int, step_size: float, device: str, dtype: torch.dtype,
                  seed: int = 0) -> Prepared:
    """The chain of ``energy`` from z0 ~ N(0, I): ``run()`` returns z_K (preparing it runs one step)."""
    z0 = torch.randn((batch,) + model.latent_shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)
    return IMPLEMENTATIONS[ENERGIES[energy][1]](model, z0.to(device), n_steps, step_size, seed)


def warm_up(chain: Prepared, runs: int, device: str) -> None:
    for _ in range(runs):
        chain.run()
    sync(device)


def profile_nsys(chain: Prepared, repeats: int, device: str, emit_nvtx: bool) -> None:
    """``repeats`` chains between cudaProfilerStart and Stop, NVTX ranges on."""
    if not fl.profiling.nvtx(True):
        print("note: the nvtx package is missing (pip install nvtx): no fastlangevin ranges in the timeline")
    torch.cuda.profiler.start()
    with torch.autograd.profiler.emit_nvtx(enabled=emit_nvtx):
        for _ in range(repeats):
            chain.run()
    sync(device)
    torch.cuda.profiler.stop()


def profile_ncu(step: Prepared, device: str) -> None:
    """One one-step chain between cudaProfilerStart and Stop: each of its kernels is launched once in the range."""
    fl.profiling.nvtx(True)
    torch.cuda.profiler.start()
    step.run()
    sync(device)
    torch.cuda.profiler.stop()


def profile_torch(chain: Prepared, repeats: int, device: str, label: str, trace: str):
    """``repeats`` chains under torch.profiler, each in ``record_function(label)``; writes the Chrome trace."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(repeats):
            with torch.profiler.record_function(label):
                chain.run()
            sync(device)
    prof.export_chrome_trace(trace)
    return prof


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n".join(__doc__.splitlines()[2:9]))
    parser.add_argument("--mode", choices=("nsys", "ncu", "torch"), required=True)
    parser.add_argument("--energy", choices=tuple(ENERGIES), default="mlp-step")
    parser.add_argument("--batch", type=int, default=None, help="chains (default 1024 for the MLP, 64 for conv)")
    parser.add_argument("--steps", type=int, default=None, help="Langevin steps K (default 60 MLP, 20 conv)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
    parser.add_argument("--warmup", type=int, default=3, help="chains run before the profiled range")
    parser.add_argument("--repeats", type=int, default=1, help="chains in the profiled range (nsys, torch)")
    parser.add_argument("--trace", default="chain-trace.json", help="torch mode: where the Chrome/Perfetto JSON goes")
    parser.add_argument("--emit-nvtx", action="store_true", help="nsys mode: also an NVTX range per ATen op")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    device = torch.device(args.device)
    if args.mode in ("nsys", "ncu") and device.type != "cuda":
        parser.error(f"--mode {args.mode} profiles CUDA kernels: it needs --device cuda, got {args.device!r} "
                     f"(--mode torch works on the CPU)")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device")
    for name in ("batch", "steps", "warmup", "repeats"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "warmup" else 1):
            parser.error(f"--{name} must be >= {0 if name == 'warmup' else 1}, got {value}")
    dtype = DTYPES[args.dtype]
    model, step_size, default_steps, default_batch = build(args.energy, args.device, dtype, args.seed)
    batch, n_steps = args.batch or default_batch, args.steps or default_steps
    what = f"{args.energy} chain, B={batch}, K={n_steps}, {args.device} {args.dtype}"

    chain = prepare_chain(model, args.energy, batch, n_steps, step_size, args.device, dtype, args.seed)
    warm_up(chain, args.warmup, args.device)
    if args.mode == "nsys":
        profile_nsys(chain, args.repeats, args.device, args.emit_nvtx)
        print(f"nsys: {args.repeats} x {what} ({chain.backend}) between cudaProfilerStart/Stop")
    elif args.mode == "ncu":
        step = prepare_chain(model, args.energy, batch, 1, step_size, args.device, dtype, args.seed)
        warm_up(step, args.warmup, args.device)
        profile_ncu(step, args.device)
        print(f"ncu: the kernels of one step of the {what} ({step.backend}), once, between cudaProfilerStart/Stop")
    else:
        label = f"profile_chain {what}"
        prof = profile_torch(chain, args.repeats, args.device, label, args.trace)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        print(prof.key_averages().table(sort_by=sort, row_limit=12))
        print(f"torch: {args.repeats} x {what} ({chain.backend}); trace written to {args.trace} (open it in "
              f"https://ui.perfetto.dev or chrome://tracing)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
