"""The noise stream: Philox known-answer vectors, the normal distribution, independence, seeds."""

import math

import pytest
import torch

from fastlangevin.ops.philox import normal_noise, philox4x32


def _t(*values):
    return [torch.tensor(v, dtype=torch.int64) for v in values]


@pytest.mark.parametrize("counter, key, expected", [
    # Random123's known-answer tests for philox4x32_10
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
])
def test_philox_known_answers(counter, key, expected):
    out = philox4x32(*_t(*counter), *_t(*key))
    assert tuple(int(x) for x in out) == expected


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_noise_is_standard_normal(dtype):
    n = 400_000
    x = normal_noise(n, torch.tensor([1234, 5]), dtype).double()
    se_mean = 1 / math.sqrt(n)
    se_var = math.sqrt(2 / n)
    assert abs(x.mean().item()) < 5 * se_mean
    assert abs(x.var().item() - 1) < 5 * se_var
    # fourth moment of N(0,1) is 3; its standard error is sqrt(96/n)
    assert abs((x ** 4).mean().item() - 3) < 5 * math.sqrt(96 / n)
    # tails: P(|x| > 3) = 0.0026998
    p = (x.abs() > 3).double().mean().item()
    assert abs(p - 0.0026998) < 5 * math.sqrt(0.0027 * (1 - 0.0027) / n)


def _corr(a, b):
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    return (a * b).mean() / (a.std() * b.std())


def test_noise_independent_across_elements_steps_and_seeds():
    n = 200_000
    bound = 5 / math.sqrt(n)
    x = normal_noise(n + 4, torch.tensor([7, 0]))
    for lag in (1, 2, 3, 4):  # within a Philox block and across blocks
        assert abs(_corr(x[:n], x[lag:n + lag])) < bound
    next_step = normal_noise(n, torch.tensor([7, 1]))
    other_seed = normal_noise(n, torch.tensor([8, 0]))
    assert abs(_corr(x[:n], next_step)) < bound
    assert abs(_corr(x[:n], other_seed)) < bound
    # the lanes of a block use different words: lane 0 and lane 2 are not copies
    assert abs(_corr(x[0:n:4], x[2:n:4])) < 5 / math.sqrt(n / 4)


def test_noise_reproducible_and_prefix_stable():
    state = torch.tensor([2**40 + 5, 2**33 + 1])
    a = normal_noise(1001, state)
    b = normal_noise(1001, state.clone())
    assert torch.equal(a, b)
    assert torch.equal(normal_noise(17, state), a[:17])  # element i's noise does not depend on n
    assert not torch.equal(a, normal_noise(1001, torch.tensor([2**40 + 6, 2**33 + 1])))


def test_noise_float64_and_float32_agree_to_float32_rounding():
    state = torch.tensor([99, 3])
    x64 = normal_noise(10_000, state, torch.float64)
    x32 = normal_noise(10_000, state, torch.float32)
    assert torch.allclose(x32.double(), x64, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["cpu", "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_raw_stream_of_each_backend_matches_the_reference(backend, dtype):
    """The kernels' own noise generators, into a NaN-poisoned buffer, against the reference stream."""
    from tests.lanes import require
    require(backend, "cpu")
    state = torch.tensor([2**40 + 5, 2**33 + 1])
    n = 4099
    out = torch.full((n,), float("nan"), dtype=dtype)
    if backend == "cpu":
        from fastlangevin import _ext
        from fastlangevin.ops.langevin_step import DTYPE_CODES
        _ext.require_cpu().normal_noise(out.data_ptr(), n, state.data_ptr(), DTYPE_CODES[dtype], 2)
    else:
        from fastlangevin.ops.triton.langevin_step import normal_noise_triton
        normal_noise_triton(out, state)
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(out, normal_noise(n, state, dtype), **tol)
