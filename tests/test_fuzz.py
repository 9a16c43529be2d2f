"""The public API under Hypothesis: every call either returns a finite result equal to the reference backend's, or
raises TypeError / ValueError / fl.NonFiniteEnergyError whose message names the argument at fault; either way z0
(or z and grad), the energy's parameters, their ``requires_grad`` and their ``.grad`` are as they were.

An example is a valid call of ``fl.langevin``, ``fl.LangevinSampler`` or ``fl.ops.langevin_step`` (random shapes,
dtypes, strides, NumPy scalars, backends, priors, energies) with at most one fault injected into one argument: a
meta tensor, a bool, a NumPy float for an int, huge and negative values, NaN, energies of the wrong shape, dtype or
device, non-finite energies. The fault says which argument the error must name.

Profiles: ``ci`` (the default: 500 derandomised examples, no deadline, no example database) and ``dev``
(``FASTLANGEVIN_FUZZ=dev``: 5000 random examples).
"""

import math
import os
import re

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import fastlangevin as fl

settings.register_profile("ci", max_examples=500, deadline=None, derandomize=True, database=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", parent=settings.get_profile("ci"), max_examples=5000, derandomize=False)
PROFILE = settings.get_profile(os.environ.get("FASTLANGEVIN_FUZZ", "ci"))

FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
TOLERANCE = {torch.float64: 1e-9, torch.float32: 2e-4, torch.float16: 1e-2, torch.bfloat16: 5e-2}


class Quadratic(nn.Module):
    """E(z) = ½‖z‖² + 0.1·Σ softplus(W z + b): smooth, bounded curvature (no chain here diverges)."""

    def __init__(self, features, dtype):
        super().__init__()
        self.linear = nn.Linear(features, 3, dtype=dtype)

    def forward(self, z):
        flat = z.flatten(1)
        return 0.5 * flat.pow(2).sum(1) + 0.1 * nn.functional.softplus(self.linear(flat)).sum(1)


def half_square(z):
    return 0.5 * z.flatten(1).pow(2).sum(1)


def good_energy(kind, features, dtype, batch=1):
    if kind == "module":
        return Quadratic(features, dtype)
    if kind == "mlp":
        return fl.MLPEnergy((features, 6, 1), "silu").to(dtype)
    if kind == "posterior":
        return posterior(features, dtype, batch)
    return half_square


def posterior(features, dtype, batch, generator_inputs=None):
    """E(z) + ‖x − G(z[:, :Dg])‖²/(2σ²) of MLPs, with data for chains of ``batch`` samples (fused where it can)."""
    inputs = generator_inputs or max(1, features - 1)
    energy = fl.GaussianPosteriorEnergy(fl.MLPEnergy((features, 6, 1), "silu"), fl.MLP((inputs, 3), "tanh"), 0.7)
    data = torch.rand(batch, 3, generator=torch.Generator().manual_seed(features * 31 + batch)).to(dtype)
    return energy.to(dtype).set_target(data)


def _with_nan_weight(module):
    with torch.no_grad():
        next(module.parameters())[0, 0] = math.nan
    return module


# Each fault: (argument named by the error, builder of the bad value (features, dtype) → value, expected errors).
ARGUMENT_ERRORS = (TypeError, ValueError)
NON_FINITE = (fl.NonFiniteEnergyError,)
ENERGY_FAULTS = {
    "not callable": (lambda d, t: 3, ARGUMENT_ERRORS),
    "scalar": (lambda d, t: lambda z: z.sum(), ARGUMENT_ERRORS),
    "per element": (lambda d, t: lambda z: torch.cat([z.flatten(1)] * 2, 1), ARGUMENT_ERRORS),  # (B, 2D), never (B, 1)
    "batch + 1": (lambda d, t: lambda z: torch.cat([half_square(z), half_square(z)[:1]]), ARGUMENT_ERRORS),
    "other dtype": (lambda d, t: lambda z: half_square(z).to(torch.float64 if t != torch.float64 else torch.float32),
                    ARGUMENT_ERRORS),
    "detached": (lambda d, t: lambda z: half_square(z).detach(), ARGUMENT_ERRORS),
    "not a tensor": (lambda d, t: lambda z: 1.5, ARGUMENT_ERRORS),
    "meta output": (lambda d, t: lambda z: half_square(z).to("meta"), ARGUMENT_ERRORS),
    "mlp dtype": (lambda d, t: fl.MLPEnergy((d, 6, 1)).to(torch.float32 if t != torch.float32 else torch.float64),
                  ARGUMENT_ERRORS),
    "mlp features": (lambda d, t: fl.MLPEnergy((d + 1, 6, 1)).to(t), ARGUMENT_ERRORS),
    "mixture features": (lambda d, t: fl.GaussianMixtureEnergy(torch.zeros(2, d + 1, dtype=t), 1.0), ARGUMENT_ERRORS),
    "posterior batch": (lambda d, t: posterior(d, t, 7), ARGUMENT_ERRORS),  # no data for the chain's batch
    "posterior generator": (lambda d, t: posterior(d, t, 1, generator_inputs=d + 1), ARGUMENT_ERRORS),
    "module dtype": (lambda d, t: Quadratic(d, torch.float32 if t != torch.float32 else torch.float64),
                     ARGUMENT_ERRORS),
    "mlp device": (lambda d, t: fl.MLPEnergy((d, 6, 1)).to(device="meta", dtype=t), ARGUMENT_ERRORS),
    "inf for one sample": (lambda d, t: lambda z: half_square(z) + torch.where(
        torch.arange(z.shape[0]) == 0, math.inf, 0.0).to(z.dtype), NON_FINITE),
    "nan parameter": (lambda d, t: _with_nan_weight(Quadratic(d, t)), NON_FINITE),
    "nan mlp parameter": (lambda d, t: _with_nan_weight(fl.MLPEnergy((d, 6, 1)).to(t)), NON_FINITE),
}
PRIOR_FAULTS = {  # the last field: whether LangevinSampler can tell at construction (else at the call)
    "unknown name": (lambda d, t: "bogus", ARGUMENT_ERRORS, True),
    "a number": (lambda d, t: 5, ARGUMENT_ERRORS, True),
    "nan mean": (lambda d, t: (math.nan, 0.0), ARGUMENT_ERRORS, True),
    "bool mean": (lambda d, t: (True, 0.0), ARGUMENT_ERRORS, True),
    "strings": (lambda d, t: ("a", "b"), ARGUMENT_ERRORS, True),
    "wrong features": (lambda d, t: (torch.zeros(d + 1), torch.zeros(d + 1)), ARGUMENT_ERRORS, False),
    "log_prob (B, 2)": (lambda d, t: lambda z: -z.flatten(1)[:, :1].expand(-1, 2).pow(2), ARGUMENT_ERRORS, False),
    "log_prob scalar": (lambda d, t: lambda z: -z.pow(2).sum(), ARGUMENT_ERRORS, False),
    "log_prob not a tensor": (lambda d, t: lambda z: 0.0, ARGUMENT_ERRORS, False),
    "log_prob other dtype": (lambda d, t: lambda z: -half_square(z).to(
        torch.float64 if t != torch.float64 else torch.float32), ARGUMENT_ERRORS, False),
}
VALUE_FAULTS = {
    "n_steps": [-1, 2**63, 2**64, 2.0, 2.5, True, "3", None, np.float64(2.0), np.int64(-1)],
    "step_size": [0, 0.0, -0.1, math.inf, math.nan, True, "0.1", None, torch.tensor(0.1), complex(0.1, 0.0),
                  np.float64("nan"), np.bool_(True), 1e400],
    "noise_scale": [-0.1, math.nan, math.inf, True, "0.1", np.float32(-1.0), torch.tensor(0.1)],
    "clip_grad": [True, False, 0, 0.0, -1.0, math.inf, math.nan, "1", np.float64(-2.0)],
    "seed": [-1, 2**63, 2**64, True, 1.5, "1", np.float64(1.0), np.int64(-1), np.bool_(False)],
    "method": ["MALA", "", 3, None, ["ula"]],
    "backend": ["gpu", "", None, 3, "CPU", ["cpu"]] + ([] if torch.cuda.is_available() else ["cuda"]),
    "create_graph": ["yes", 1, None, 0.0],
    "return_info": ["yes", 1, None],
    "cuda_graph": [True, "yes", 1],
}
Z_FAULTS = ["int", "bool", "complex", "list", "empty batch", "0-dim", "inf", "nan", "meta"]
SETTINGS = ("n_steps", "step_size", "noise_scale", "clip_grad", "method", "backend", "cuda_graph")  # the sampler's


def names(argument: str, message: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(argument)}(?![\w])", message) is not None


@st.composite
def latent(draw, fault=None):
    """(z0, features) with a random shape, float dtype, layout and requires_grad; or the fault's bad z0."""
    batch = draw(st.integers(1, 4))
    shape = (batch,) + tuple(draw(st.lists(st.integers(1, 3), min_size=1, max_size=2)))
    dtype = draw(st.sampled_from(FLOATS))
    generator = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    layout = draw(st.sampled_from(["contiguous", "transposed", "expanded", "strided"]))
    if layout == "transposed" and len(shape) > 2:
        z0 = torch.randn(shape[::-1], generator=generator).permute(*reversed(range(len(shape))))
    elif layout == "expanded":
        z0 = torch.randn((1,) + shape[1:], generator=generator).expand(shape)
    elif layout == "strided":
        z0 = torch.randn((2 * batch,) + shape[1:], generator=generator)[::2]
    else:
        z0 = torch.randn(shape, generator=generator)
    z0 = z0.to(dtype)
    features = math.prod(shape[1:])
    if fault == "int":
        z0 = z0.to(torch.int32)
    elif fault == "bool":
        z0 = z0 > 0
    elif fault == "complex":
        z0 = z0.to(torch.complex64)
    elif fault == "list":
        z0 = z0.tolist()
    elif fault == "empty batch":
        z0 = z0[:0]
    elif fault == "0-dim":
        z0 = z0.flatten()[0]
    elif fault in ("inf", "nan"):
        z0 = z0.clone()  # keeps the strides; an expanded z0 becomes contiguous
        where = np.unravel_index(draw(st.integers(0, z0.numel() - 1)), tuple(z0.shape))
        z0[tuple(int(i) for i in where)] = math.inf if fault == "inf" else math.nan
    elif fault == "meta":
        z0 = z0.to("meta")
    if isinstance(z0, torch.Tensor) and z0.is_floating_point() and draw(st.booleans()):
        z0 = z0.requires_grad_(True) if z0.is_leaf else z0.detach().requires_grad_(True)
    return z0, features, dtype


def valid_settings(draw, dtype):
    step_size = draw(st.sampled_from([0.01, 0.05, 0.2, np.float32(0.05), np.float64(0.1), 1]))
    method = draw(st.sampled_from(["ula", "ula", "mala"]))
    noise = [None] if method == "mala" else [None, 0.0, 0, 0.3, np.float64(0.2)]
    backends = ["auto", "reference"] + (["cpu"] if dtype in (torch.float32, torch.float64) else [])
    return dict(
        n_steps=draw(st.sampled_from([0, 1, 2, 3, np.int64(2), np.int32(1), np.uint8(3)])),
        step_size=step_size,
        noise_scale=draw(st.sampled_from(noise)),
        clip_grad=draw(st.sampled_from([None, None, 0.5, 2.0, np.float64(1.5), 3])),
        seed=draw(st.sampled_from([None, 0, 1, 2**63 - 1, np.int64(9), np.uint32(5)])),
        method=method,
        backend=draw(st.sampled_from(backends)),
        create_graph=draw(st.sampled_from([False, False, True, np.bool_(True)])),
        return_info=draw(st.booleans()),
        cuda_graph=draw(st.sampled_from([None, False])),
    )


def valid_prior(draw, features, shape):
    kind = draw(st.sampled_from(["normal", "flat", "none", "diagonal", "scalars", "callable", "object"]))
    if kind == "diagonal":
        return (0.3 * torch.randn(shape[1:]), 0.2 * torch.randn(shape[1:]))
    return {"normal": "normal", "flat": "flat", "none": None, "scalars": (0.5, -0.2),
            "callable": lambda z: -0.5 * z.flatten(1).pow(2).sum(1), "object": fl.NormalPrior()}[kind]


def snapshot(*objects):
    """Everything a call must leave alone: tensors' values, requires_grad and .grad; modules' parameters likewise."""
    state = []
    for obj in objects:
        tensors = list(obj.parameters()) if isinstance(obj, nn.Module) else [obj]
        for t in tensors:
            if isinstance(t, torch.Tensor):
                state.append((t, t.detach().clone(), t.requires_grad, None if t.grad is None else t.grad.clone()))
    return state


def assert_unchanged(state):
    for t, values, requires_grad, grad in state:
        assert t.requires_grad == requires_grad
        if t.device.type != "meta":
            torch.testing.assert_close(t.detach(), values, rtol=0, atol=0, equal_nan=True)
        assert (t.grad is None) if grad is None else torch.equal(t.grad.nan_to_num(), grad.nan_to_num())


def check_outcome(run, fault, state):
    """Run ``run()``: with a fault it must raise the expected error naming the argument; ``state`` must be unchanged
    afterwards. Returns the result of a valid call."""
    if fault is None:
        got = run()
        assert_unchanged(state)
        return got
    argument, expected = fault
    with pytest.raises(expected) as error:
        run()
    assert names(argument, str(error.value)), f"{type(error.value).__name__} does not name {argument!r}: {error.value}"
    assert_unchanged(state)
    return None


def compare(got, expected, dtype, method):
    z, z_ref = (got[0], expected[0]) if isinstance(got, tuple) else (got, expected)
    assert bool(torch.isfinite(z).all())
    if method == "mala" and dtype != torch.float64:
        return  # an accept/reject decision at a rounding tie may differ between kernels in low precision
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(z.detach(), z_ref.detach(), rtol=tol, atol=tol)
    if isinstance(got, tuple) and got[1].energies is not None:
        torch.testing.assert_close(got[1].energies, expected[1].energies, rtol=tol, atol=tol)


def sampler_settings_fault(argument, value) -> bool:
    """Whether LangevinSampler must reject this bad setting at construction: every setting whose fault does not
    depend on the tensors of a call (a known backend unavailable for them, cuda_graph=True on CPU tensors)."""
    if argument == "backend":
        return value not in ("auto",) + fl.backends.BACKENDS if isinstance(value, str) else True
    if argument == "cuda_graph":
        return value is not True
    return argument in SETTINGS


@st.composite
def chain_call(draw):
    """(api, z0, energy, prior, settings, fault, at_construction, dtype) for fl.langevin or LangevinSampler."""
    api = draw(st.sampled_from(["langevin", "langevin", "sampler"]))
    where = draw(st.sampled_from(["none", "none", "z0", "energy", "prior", "value"]))
    z0, features, dtype = draw(latent(draw(st.sampled_from(Z_FAULTS)) if where == "z0" else None))
    latent_shape = z0.shape[1:] if isinstance(z0, torch.Tensor) and z0.dim() >= 1 else (features,)
    kwargs = valid_settings(draw, dtype)
    batch = z0.shape[0] if isinstance(z0, torch.Tensor) and z0.dim() >= 1 and z0.shape[0] else 1
    energy = good_energy(draw(st.sampled_from(["module", "mlp", "posterior", "function"])), features, dtype, batch)
    prior = valid_prior(draw, features, (1, *latent_shape))
    fault, at_construction = None, False
    if where == "z0":
        fault = ("z0", ARGUMENT_ERRORS)
    elif where == "energy":
        build, expected = ENERGY_FAULTS[draw(st.sampled_from(sorted(ENERGY_FAULTS)))]
        energy, fault = build(features, dtype), ("energy", expected)
        kwargs["n_steps"] = max(1, int(kwargs["n_steps"]))  # the energy is evaluated only by a step
    elif where == "prior":
        build, expected, at_construction = PRIOR_FAULTS[draw(st.sampled_from(sorted(PRIOR_FAULTS)))]
        prior, fault = build(features, dtype), ("prior", expected)
        kwargs["n_steps"] = max(1, int(kwargs["n_steps"]))
    elif where == "value":
        argument = draw(st.sampled_from(sorted(VALUE_FAULTS)))
        kwargs[argument] = draw(st.sampled_from(VALUE_FAULTS[argument]))
        if argument == "noise_scale":
            kwargs["method"] = "ula"
        fault, at_construction = (argument, ARGUMENT_ERRORS), sampler_settings_fault(argument, kwargs[argument])
    elif kwargs["method"] == "mala" and draw(st.booleans()):
        kwargs["noise_scale"] = 0.0  # the rule MALA adds: noise_scale must be sqrt(step_size)
        fault, at_construction = ("noise_scale", ARGUMENT_ERRORS), True
    return api, z0, energy, prior, kwargs, fault, at_construction, dtype


@PROFILE
@given(chain_call())
def test_chains_return_the_reference_result_or_name_the_fault(call):
    api, z0, energy, prior, kwargs, fault, at_construction, dtype = call
    if isinstance(energy, nn.Module) and any(True for _ in energy.parameters()):
        first = next(energy.parameters())
        if first.device.type != "meta":
            first.grad = torch.full_like(first, 7.0)
    state = snapshot(z0, energy) if isinstance(energy, nn.Module) else snapshot(z0)

    def run():
        torch.manual_seed(1234)  # seed=None draws the chain's seed from torch's generator
        if api == "langevin":
            return fl.langevin(energy, z0, prior=prior, **kwargs)
        settings_ = {k: kwargs[k] for k in SETTINGS}
        sampler = fl.LangevinSampler(energy, settings_.pop("n_steps"), settings_.pop("step_size"), prior=prior,
                                     **settings_)
        if at_construction:
            raise AssertionError(f"LangevinSampler accepted the bad setting {fault[0]}={kwargs.get(fault[0])!r}")
        return sampler(z0, seed=kwargs["seed"], return_info=kwargs["return_info"],
                       create_graph=kwargs["create_graph"])

    got = check_outcome(run, fault, state)
    if got is None:
        return
    z = got[0] if isinstance(got, tuple) else got
    assert isinstance(z, torch.Tensor) and z.shape == z0.shape and z.dtype == z0.dtype
    assert z.untyped_storage().data_ptr() != z0.untyped_storage().data_ptr()  # a new tensor, never z0's memory
    torch.manual_seed(1234)
    reference = fl.langevin(energy, z0, prior=prior, **{**kwargs, "backend": "reference", "cuda_graph": False})
    compare(got, reference, dtype, kwargs["method"])


STEP_PRIOR_FAULTS = [lambda d: lambda z: -z.pow(2).flatten(1).sum(1), lambda d: "bogus", lambda d: 5,
                     lambda d: fl.DiagonalNormalPrior(torch.zeros(d + 1), torch.zeros(d + 1)),
                     lambda d: (0.0, 0.0)]
RNG_STATE_FAULTS = [lambda: torch.tensor([1, 2], dtype=torch.int32), lambda: torch.tensor([1, 2, 3]),
                    lambda: torch.tensor([1, 0, 2, 0])[::2], lambda: torch.tensor([-1, 0]),
                    lambda: torch.tensor([0, -5]), lambda: torch.tensor([1.0, 2.0]),
                    lambda: torch.tensor([1, 2], device="meta"), lambda: [1, 2]]


@st.composite
def step_call(draw):
    """(z, grad, kwargs, fault) for fl.ops.langevin_step."""
    where = draw(st.sampled_from(["none", "none", "z", "grad", "prior", "value", "rng_state"]))
    # the step op, like torch's ops, takes an empty batch; it does not read values to check them (inf, nan)
    z_fault = draw(st.sampled_from([f for f in Z_FAULTS if f not in ("inf", "nan", "empty batch")])) \
        if where == "z" else None
    z, features, dtype = draw(latent(z_fault))
    z = z.detach() if isinstance(z, torch.Tensor) else z
    grad = torch.randn(z.shape if isinstance(z, torch.Tensor) else (1,)).to(
        z.dtype if isinstance(z, torch.Tensor) and z.is_floating_point() else dtype)
    if isinstance(z, torch.Tensor) and z.device.type == "meta":
        grad = grad.to("meta")
    backends = ["auto", "reference"] + (["cpu"] if dtype in (torch.float32, torch.float64) else [])
    shape = (1, *(z.shape[1:] if isinstance(z, torch.Tensor) and z.dim() >= 1 else (features,)))
    prior = valid_prior(draw, features, shape)
    if callable(prior) and not isinstance(prior, fl.Prior):
        prior = "normal"  # the step evaluates Gaussian and flat priors only (a callable one is a fault below)
    elif isinstance(prior, tuple):
        prior = fl.DiagonalNormalPrior(*prior)  # the step op takes prior objects, not fl.langevin's (mean, log_std)
    kwargs = dict(step_size=draw(st.sampled_from([0.01, 0.2, np.float32(0.05), 2])),
                  noise_scale=draw(st.sampled_from([None, 0.0, 0.5, np.float64(0.1)])), prior=prior,
                  seed=draw(st.sampled_from([0, 3, 2**63 - 1, np.int64(4)])),
                  counter=draw(st.sampled_from([0, 7, np.uint16(2)])), backend=draw(st.sampled_from(backends)))
    fault = None
    if where == "z":
        fault = ("z", ARGUMENT_ERRORS)
    elif where == "grad":
        kind = draw(st.sampled_from(["shape", "dtype", "meta", "list"]))
        grad = {"shape": lambda: torch.randn(grad.shape[0] + 1, *grad.shape[1:]).to(grad.dtype),
                "dtype": lambda: grad.to(torch.float64 if dtype != torch.float64 else torch.float32),
                "meta": lambda: grad.to("meta"), "list": lambda: grad.tolist()}[kind]()
        fault = ("grad", ARGUMENT_ERRORS)
    elif where == "prior":
        kwargs["prior"] = draw(st.sampled_from(STEP_PRIOR_FAULTS))(features)
        fault = ("prior", ARGUMENT_ERRORS)
    elif where == "value":
        argument = draw(st.sampled_from(["step_size", "noise_scale", "seed", "counter", "backend"]))
        kwargs[argument] = draw(st.sampled_from(VALUE_FAULTS.get(argument, VALUE_FAULTS["seed"])))
        fault = (argument, ARGUMENT_ERRORS)
    elif where == "rng_state":
        kwargs["rng_state"] = draw(st.sampled_from(RNG_STATE_FAULTS))()
        fault = ("rng_state", ARGUMENT_ERRORS)
    elif draw(st.booleans()):
        kwargs["rng_state"] = fl.ops.make_rng_state(int(kwargs.pop("seed")), int(kwargs.pop("counter")))
    return z, grad, kwargs, fault, dtype


@PROFILE
@given(step_call())
def test_the_step_op_returns_the_reference_result_or_names_the_fault(call):
    z, grad, kwargs, fault, dtype = call
    state = snapshot(z, grad)
    rng = kwargs.get("rng_state")
    rng_before = rng.clone() if isinstance(rng, torch.Tensor) and rng.device.type != "meta" else None
    got = check_outcome(lambda: fl.ops.langevin_step(z, grad, **kwargs), fault, state)
    if rng_before is not None:
        assert torch.equal(rng, rng_before)  # the step reads the noise state, never advances it
    if got is None:
        return
    assert got.shape == z.shape and got.dtype == z.dtype and bool(torch.isfinite(got).all())
    expected = fl.ops.langevin_step(z, grad, **{**kwargs, "backend": "reference"})
    tol = TOLERANCE[dtype]
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)
