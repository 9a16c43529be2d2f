"""Compile a Triton kernel for a GPU that is not here (``triton.compile`` with a ``GPUTarget``): the launch the
launcher would make is recorded (its ``wrap`` hook), its arguments turned into a signature, and Triton compiles
it down to a cubin with its bundled ptxas. Nothing runs; no driver is needed. Not under ``TRITON_INTERPRET=1``
(jitted functions are interpreted objects there): ``python -m tests.triton_compile NAME ...`` compiles the named
launches of ``LAUNCHES`` in a fresh interpreter and prints ``NAME sm_90 ok`` with the registers and spills, and the
shapes and types of the tensor-core instructions in its PTX (``m64n16k16.f32.bf16.bf16``: bfloat16 operands, float32
accumulators).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import torch

SM_90 = ("cuda", 90, 32)  # H100/H200: backend, compute capability, warp size
POINTER_TYPES = {torch.float32: "*fp32", torch.float64: "*fp64", torch.float16: "*fp16", torch.bfloat16: "*bf16",
                 torch.int64: "*i64", torch.int32: "*i32", torch.uint8: "*u8"}
OPTIONS = ("num_warps", "num_stages")


class LaunchRecorder:
    """Pass as a launcher's ``wrap``: ``wrap(kernel)[grid](*args, **kwargs)`` records instead of launching."""

    def __call__(self, kernel):
        self.kernel = kernel
        return self

    def __getitem__(self, grid):
        self.grid = grid
        return self._record

    def _record(self, *args, **kwargs):
        self.args, self.kwargs = args, kwargs


def compile_recorded(recorder: LaunchRecorder, target=SM_90):
    """The recorded launch compiled for ``target`` (backend, capability, warp size): a ``CompiledKernel`` with
    ``asm["ptx"]`` and ``asm["cubin"]``. Float scalars are taken as fp64 (the kernels annotate them so)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = recorder.kernel
    values = dict(zip(fn.arg_names, recorder.args))
    values.update({k: v for k, v in recorder.kwargs.items() if k not in OPTIONS})
    signature, constexprs = {}, {}
    for name in fn.arg_names:
        value = values[name]
        if name in recorder.kwargs:
            signature[name], constexprs[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            signature[name] = POINTER_TYPES[value.dtype]
        elif isinstance(value, float):
            signature[name] = "fp64"
        elif isinstance(value, int):
            signature[name] = "i32" if -2**31 <= value < 2**31 else "i64"
        else:
            raise TypeError(f"{name}: cannot type {value!r}")
    options = {k: v for k, v in recorder.kwargs.items() if k in OPTIONS}
    return triton.compile(ASTSource(fn, signature, constexprs=constexprs), target=GPUTarget(*target), options=options)


def resource_usage(compiled) -> str:
    """Registers, stack and shared memory of a compiled kernel, read from its cubin with the bundled cuobjdump."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        usage = subprocess.run([tool, "--dump-resource-usage", cubin.name], capture_output=True, text=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:(\d+) LOCAL:(\d+)", usage)
    return "registers {} stack {} shared {} local {}".format(*found.groups()) if found else usage.strip()


def record_mlp_chain(method: str, dtype: torch.dtype, weight_dtype: torch.dtype | None = None) -> LaunchRecorder:
    """The fused chain of a posterior energy (energy 5 → 9 → 7 → 1, generator 3 → 6 → 11 with a sigmoid output),
    diagonal prior, clipping, every output, 37 samples; weights in weight_dtype (default: dtype; bfloat16 with a
    float32 chain: the mixed-precision kernel, bfloat16 tl.dot on tensor cores)."""
    weight_dtype = weight_dtype or dtype
    import fastlangevin as fl
    from fastlangevin.ops import codes
    from fastlangevin.ops.langevin_step import make_rng_state
    from fastlangevin.ops.mlp_chain import new_outputs
    from fastlangevin.ops.triton.mlp_chain import mlp_chain_triton

    energy = fl.MLPEnergy((5, 9, 7, 1), ["gelu", "tanh"]).to(dtype)
    generator = fl.MLP((3, 6, 11), "silu", "sigmoid").to(dtype)
    z = torch.randn(37, 5, dtype=dtype)
    target = torch.rand(37, 11, dtype=dtype)
    code = codes.METHODS[method]
    energies, grad_norms, accepted, first_bad = new_outputs(z, 3, code, True)
    recorder = LaunchRecorder()
    mlp_chain_triton(z, energy.kernel_network(weight_dtype, "cpu"), 1.0, generator.kernel_network(weight_dtype, "cpu"),
                     target, 0.5, 3, 0.01, 0.1, codes.PRIOR_DIAGONAL, torch.zeros(5, dtype=dtype), torch.ones(5, dtype=dtype),
                     make_rng_state(0, 0), 1.0, code, energies, grad_norms, accepted if code == codes.MALA else None,
                     first_bad, wrap=recorder)
    return recorder


LAUNCHES = {
    "mlp_chain_ula_f32": lambda: record_mlp_chain("ula", torch.float32),
    "mlp_chain_mala_f64": lambda: record_mlp_chain("mala", torch.float64),
    "mlp_chain_mala_bf16": lambda: record_mlp_chain("mala", torch.float32, torch.bfloat16),
}


if __name__ == "__main__":
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        sys.exit("unset TRITON_INTERPRET: the interpreter's jitted functions cannot be compiled")
    for name in sys.argv[1:]:
        compiled = compile_recorded(LAUNCHES[name]())
        assert ".target sm_90" in compiled.asm["ptx"] and compiled.asm["cubin"]
        products = sorted(set(re.findall(r"\b(?:wgmma\.mma_async|mma)\.sync\.aligned\.(\S+?);?\s", compiled.asm["ptx"])))
        print(f"{name} sm_90 ok: {resource_usage(compiled)}; matrix products: {' '.join(products) or 'none'}")
