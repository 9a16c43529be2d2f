"""The fused step op on every backend against the reference, its autograd formula, compile, and bad input."""

import pytest
import torch

import fastlangevin as fl
from fastlangevin.backends import BackendUnavailableError
from fastlangevin.ops.langevin_step import COMPILED_OPS, make_rng_state, run_step
from fastlangevin.ops.codes import PRIOR_DIAGONAL, PRIOR_FLAT, PRIOR_NORMAL
from fastlangevin.ops.langevin_step_reference import langevin_step_reference
from tests.lanes import LANES, require
from tests.kernels import launch_into

SHAPES = [(1, 1), (3, 5), (7, 100), (64, 100), (5, 3, 4, 4), (33, 257)]
TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=2e-6, atol=2e-6),
       torch.bfloat16: dict(rtol=1.6e-2, atol=1.6e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def _prior_args(kind, z, generator):
    if kind != PRIOR_DIAGONAL:
        return kind, None, None
    ctype = torch.float64 if z.dtype == torch.float64 else torch.float32
    d = z[0].numel()
    mean = torch.randn(d, generator=generator, dtype=ctype).to(z.device)
    inv_var = torch.rand(d, generator=generator, dtype=ctype).add(0.5).to(z.device)
    return kind, mean, inv_var


def _inputs(shape, dtype, device, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    grad = torch.randn(shape, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return z, grad, g


@pytest.mark.parametrize("backend, device", LANES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("prior_kind", [PRIOR_FLAT, PRIOR_NORMAL, PRIOR_DIAGONAL])
@pytest.mark.parametrize("noise_scale", [0.0, 0.37])
def test_kernel_matches_reference(backend, device, dtype, shape, prior_kind, noise_scale):
    require(backend, device)
    if dtype not in fl.backends.SUPPORTED_DTYPES[backend]:
        pytest.skip(f"{backend} has no {dtype}")
    seed = torch.randint(0, 2**62, (1,)).item()
    z, grad, g = _inputs(shape, dtype, device, seed % 2**31)
    prior = _prior_args(prior_kind, z, g)
    rng_state = make_rng_state(seed, torch.randint(0, 2**40, (1,)).item(), device)
    expected = langevin_step_reference(z, grad, rng_state, 0.013, noise_scale, *prior)
    out = torch.full_like(z, float("nan"))  # poisoned: an unwritten element stays NaN
    launch_into(backend, out, z, grad, rng_state, 0.013, noise_scale, *prior)
    torch.testing.assert_close(out, expected, **TOL[dtype])
    # the op (fresh output) agrees with the kernel launched into a poisoned buffer
    torch.testing.assert_close(run_step(backend, z, grad, rng_state, 0.013, noise_scale, *prior), expected,
                               **TOL[dtype])


@pytest.mark.parametrize("backend, device", LANES)
def test_public_op_same_noise_on_every_backend(backend, device):
    require(backend, device)
    z, grad, _ = _inputs((9, 11), torch.float64, device, 3)
    expected = fl.ops.langevin_step(z, grad, 0.1, seed=42, counter=7, backend="reference")
    got = fl.ops.langevin_step(z, grad, 0.1, seed=42, counter=7, backend=backend)
    torch.testing.assert_close(got, expected, **TOL[torch.float64])
    assert not torch.equal(got, fl.ops.langevin_step(z, grad, 0.1, seed=42, counter=8, backend=backend))
    assert not torch.equal(got, fl.ops.langevin_step(z, grad, 0.1, seed=43, counter=7, backend=backend))


@pytest.mark.parametrize("backend, device", LANES)
def test_autograd_formula(backend, device):
    """gradcheck in float64 through z, grad, the prior mean and inverse variance (noise is a fixed input)."""
    require(backend, device)
    z, grad, g = _inputs((3, 4), torch.float64, device, 5)
    _, mean, inv_var = _prior_args(PRIOR_DIAGONAL, z, g)
    rng_state = make_rng_state(11, 2, device)
    args = [t.clone().requires_grad_(True) for t in (z, grad, mean, inv_var)]
    step = lambda z, grad, mean, inv_var: run_step(backend, z, grad, rng_state, 0.2, 0.5, PRIOR_DIAGONAL, mean,
                                                   inv_var)
    assert torch.autograd.gradcheck(step, args)
    assert torch.autograd.gradgradcheck(step, args)
    for kind in (PRIOR_FLAT, PRIOR_NORMAL):
        zz, gg = (t.clone().requires_grad_(True) for t in (z, grad))
        assert torch.autograd.gradcheck(lambda a, b: run_step(backend, a, b, rng_state, 0.2, 0.5, kind, None, None),
                                        (zz, gg))


@pytest.mark.parametrize("name", ["cpu", "triton"])
def test_opcheck(name):
    require(name, "cpu")
    z, grad, g = _inputs((4, 6), torch.float64, "cpu", 1)
    _, mean, inv_var = _prior_args(PRIOR_DIAGONAL, z, g)
    rng_state = make_rng_state(1, 0)
    fl.backends.resolve_backend(name, z.device, z.dtype)  # registers the Triton op on first use
    op = COMPILED_OPS[name]
    # the Triton interpreter cannot run under fake-tensor tracing (STYLE.md): check it eagerly only
    tests = None if name == "cpu" else ("test_schema", "test_autograd_registration", "test_faketensor")
    for kind, m, v in ((PRIOR_NORMAL, None, None), (PRIOR_DIAGONAL, mean.requires_grad_(), inv_var)):
        kwargs = {} if tests is None else {"test_utils": tests}
        torch.library.opcheck(op, (z.requires_grad_(), grad, rng_state, 0.1, 0.3, kind, m, v), **kwargs)


def test_compile_fullgraph_cpu_op():
    require("cpu", "cpu")
    z, grad, _ = _inputs((8, 10), torch.float32, "cpu", 2)
    rng_state = make_rng_state(5, 1)

    def two_steps(z, grad):
        z = fl.ops.langevin_step(z, grad, 0.05, rng_state=rng_state, backend="cpu")
        return fl.ops.langevin_step(z, grad, 0.05, rng_state=rng_state, prior=None, backend="cpu")

    compiled = torch.compile(two_steps, fullgraph=True, backend="inductor")
    torch.testing.assert_close(compiled(z, grad), two_steps(z, grad), rtol=1e-6, atol=1e-6)


def test_noncontiguous_inputs_work():
    z, grad, _ = _inputs((12, 7), torch.float64, "cpu", 8)
    zt, gt = z.t().contiguous().t(), grad.t().contiguous().t()
    assert not zt.is_contiguous()
    torch.testing.assert_close(fl.ops.langevin_step(zt, gt, 0.1, seed=3), fl.ops.langevin_step(z, grad, 0.1, seed=3))


@pytest.mark.parametrize("bad, match", [
    (dict(grad=torch.zeros(4, 3)), "shape"),
    (dict(grad=torch.zeros(4, 5, dtype=torch.float64)), "dtype"),
    (dict(grad=torch.zeros(4, 5, device="meta")), "meta"),
    (dict(z=torch.zeros(4, 5, dtype=torch.int64), grad=torch.zeros(4, 5, dtype=torch.int64)), "floating-point"),
    (dict(step_size=0.0), "step_size"),
    (dict(step_size=-1.0), "step_size"),
    (dict(step_size=float("nan")), "step_size"),
    (dict(noise_scale=float("inf")), "noise_scale"),
    (dict(noise_scale=-0.1), "noise_scale"),
    (dict(seed=-1), "seed"),
    (dict(backend="cuda"), "not available"),
    (dict(backend="magic"), "unknown"),
    (dict(prior="laplace"), "unknown name"),
])
def test_bad_input_is_rejected_clearly(bad, match):
    args = dict(z=torch.zeros(4, 5), grad=torch.zeros(4, 5), step_size=0.1)
    args.update(bad)
    z_before = args["z"].clone()
    with pytest.raises((ValueError, TypeError, BackendUnavailableError), match=match):
        fl.ops.langevin_step(**args)
    assert torch.equal(args["z"], z_before)


def test_unavailable_backend_says_why_and_what_is_available():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(BackendUnavailableError, match=r"CUDA tensors only.*Available here: \[.*'reference'"):
        fl.ops.langevin_step(torch.zeros(2, 2), torch.zeros(2, 2), 0.1, backend="cuda")
