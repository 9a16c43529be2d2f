"""The C++ fused chain (``_C.mlp_chain``) called directly, against the plain autograd chain (``fl.langevin`` with
``backend="reference"``, the same seed and so the same Philox noise) on energies built from ``nn.Linear`` stacks:
per-layer activations (every code at every position), compositions as one deep MLP with a linear bottleneck, and
posterior energies with a generator term against a per-sample target. Outputs are poisoned before each call."""

import math

import pytest
import torch
from torch import nn

import fastlangevin as fl
from fastlangevin import _ext
from fastlangevin.ops.langevin_step import make_rng_state

C = _ext.require_cpu()
DTYPE_CODES = {torch.float32: 0, torch.float64: 1}
ULA, MALA = 0, 1
TOL = {torch.float64: dict(rtol=1e-9, atol=1e-9), torch.float32: dict(rtol=2e-4, atol=2e-4)}

# The activation codes of csrc/include/fastlangevin/codes.h and the torch modules they stand for.
ACTIVATIONS = {
    0: lambda p: nn.ReLU(), 1: lambda p: nn.LeakyReLU(p), 2: lambda p: nn.SiLU(), 3: lambda p: nn.GELU(),
    4: lambda p: nn.GELU(approximate="tanh"), 5: lambda p: nn.ELU(p), 6: lambda p: nn.Softplus(),
    7: lambda p: nn.Tanh(), 8: lambda p: nn.Identity(), 9: lambda p: nn.Sigmoid(),
}
PARAM = {1: 0.1, 5: 1.3}  # leaky ReLU's slope, ELU's alpha
NAMES = ["relu", "leaky_relu", "silu", "gelu", "gelu_tanh", "elu", "softplus", "tanh", "identity", "sigmoid"]


class Net(nn.Module):
    """Linear layers dims[0] → … → dims[-1], activation code acts[l] after layer l."""

    def __init__(self, dims, acts, bias=True, scale=1.5):
        super().__init__()
        self.dims, self.acts = list(dims), list(acts)
        self.params = [float(PARAM.get(a, 0.0)) for a in acts]
        self.linears = nn.ModuleList(nn.Linear(i, o, bias=bias) for i, o in zip(dims[:-1], dims[1:]))
        self.modules_ = nn.ModuleList(ACTIVATIONS[a](p) for a, p in zip(acts, self.params))
        with torch.no_grad():  # larger weights than the default init: the nonlinear parts matter
            for layer in self.linears:
                layer.weight.mul_(scale)

    def forward(self, h):
        for linear, act in zip(self.linears, self.modules_):
            h = act(linear(h))
        return h

    def kernel_network(self):
        """(dims, weight_ptrs, bias_ptrs, activations, activation_params) for _C.mlp_chain."""
        weights = [m.weight.detach() for m in self.linears]
        biases = [m.bias.detach() for m in self.linears if m.bias is not None]
        assert all(t.is_contiguous() for t in weights + biases)
        return (self.dims, [w.data_ptr() for w in weights], [b.data_ptr() for b in biases], self.acts,
                self.params)


class TotalEnergy(nn.Module):
    """E(z) = sign · energy(z) + scale · ‖target − generator(z[:, :Dg])‖², the kernel's energy, in autograd."""

    def __init__(self, energy, sign=1.0, generator=None, target=None, scale=0.0):
        super().__init__()
        self.energy, self.sign, self.generator, self.target, self.scale = energy, sign, generator, target, scale

    def forward(self, z):
        e = self.sign * self.energy(z).squeeze(1)
        if self.generator is not None:
            x = self.generator(z[:, :self.generator.dims[0]])
            e = e + self.scale * (self.target - x).pow(2).sum(1)
        return e


def _ptr(t):
    return 0 if t is None else t.data_ptr()


def kernel_chain(total, z0, n_steps, step_size, *, seed, prior="normal", noise_scale=None, clip_grad=None,
                 method=ULA, info=True, n_threads=0):
    """Runs _C.mlp_chain on poisoned outputs → (z, energies, grad_norms, accepted, n_accepted, first_bad); the
    (K, B) outputs are None when not asked."""
    batch, dtype = z0.shape[0], z0.dtype
    z = z0.clone()
    energies = torch.full((n_steps, batch), math.nan, dtype=dtype)
    grad_norms = torch.full((n_steps, batch), math.nan, dtype=dtype)
    accepted = torch.full((n_steps, batch), 7, dtype=torch.uint8)
    n_accepted = torch.full((batch,), 99, dtype=torch.int64)
    first_bad = torch.full((batch,), 99, dtype=torch.int64)
    kind, mean, inv_var = fl.priors.as_prior(prior).kernel_params(z0)
    rng_state = make_rng_state(seed, 0)
    noise_scale = math.sqrt(step_size) if noise_scale is None else noise_scale
    generator = total.generator.kernel_network() if total.generator is not None else None
    C.mlp_chain(z.data_ptr(), batch, total.energy.kernel_network(), total.sign, generator, _ptr(total.target),
                total.scale, n_steps, step_size, noise_scale, kind, _ptr(mean), _ptr(inv_var), rng_state.data_ptr(),
                float(clip_grad or 0.0), method, energies.data_ptr() if info else 0,
                grad_norms.data_ptr() if info else 0, accepted.data_ptr() if info and method == MALA else 0,
                first_bad.data_ptr(), DTYPE_CODES[dtype], n_threads,
                n_accepted.data_ptr() if method == MALA else 0)
    return (z, energies if info else None, grad_norms if info else None,
            accepted.bool() if info and method == MALA else None, n_accepted if method == MALA else None, first_bad)


def reference_chain(total, z0, n_steps, step_size, *, seed, prior="normal", noise_scale=None, clip_grad=None,
                    method=ULA):
    return fl.langevin(total, z0, n_steps, step_size, seed=seed, prior=prior, noise_scale=noise_scale,
                       clip_grad=clip_grad, method=["ula", "mala"][method], backend="reference", return_info=True)


def assert_matches_reference(total, z0, n_steps, step_size, **kwargs):
    want, info = reference_chain(total, z0, n_steps, step_size, **kwargs)
    z, energies, grad_norms, accepted, n_accepted, first_bad = kernel_chain(total, z0, n_steps, step_size, **kwargs)
    tol = TOL[z0.dtype]
    torch.testing.assert_close(z, want, **tol)
    torch.testing.assert_close(energies, info.energies, **tol)
    torch.testing.assert_close(grad_norms, info.grad_norms, **tol)
    assert torch.equal(first_bad, torch.full_like(first_bad, -1))
    if kwargs.get("method") == MALA:
        assert torch.equal(accepted, info.accepted)
        assert torch.equal(n_accepted, info.accepted.sum(0))
    return info


def posterior(dtype, energy_acts=(7, 2, 8), generator_acts=(1, 9), bias=True, batch=5, seed=0):
    """Energy 7 → 9 → 6 → 1 and generator 5 → 8 → 4 reading z[:, :5], a per-sample target, 1/(2σ²) = 0.7."""
    torch.manual_seed(seed)
    energy = Net((7, 9, 6, 1), energy_acts, bias).to(dtype)
    generator = Net((5, 8, 4), generator_acts, bias).to(dtype)
    target = torch.rand(batch, 4, dtype=dtype)
    return TotalEnergy(energy, 1.0, generator, target, 0.7), torch.randn(batch, 7, dtype=dtype)


POSITIONS = {  # where one activation is swapped in: (energy codes, generator codes)
    "energy first": lambda a: ((a, 2, 8), (1, 9)),
    "energy middle": lambda a: ((7, a, 8), (1, 9)),
    "energy output": lambda a: ((7, 2, a), (1, 9)),
    "generator hidden": lambda a: ((7, 2, 8), (a, 9)),
    "generator output": lambda a: ((7, 2, 8), (1, a)),
}


@pytest.mark.parametrize("position", sorted(POSITIONS))
@pytest.mark.parametrize("act", range(10), ids=NAMES)
def test_every_activation_at_every_position(act, position):
    energy_acts, generator_acts = POSITIONS[position](act)
    total, z0 = posterior(torch.float64, energy_acts, generator_acts)
    assert_matches_reference(total, z0, 4, 0.05, seed=3)


def composition(dtype, seed=0):
    """A decoder 2 → 11 → 13 → 3 with a linear bottleneck, then an energy 3 → 9 → 7 → 1: one deep MLP."""
    torch.manual_seed(seed)
    lrelu = 1
    net = Net((2, 11, 13, 3, 9, 7, 1), (lrelu, lrelu, 8, lrelu, lrelu, 8)).to(dtype)
    return TotalEnergy(net, -1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("prior", ["normal", None, "diagonal"])
@pytest.mark.parametrize("clip", [False, True])
def test_composition_ula(dtype, prior, clip):
    total = composition(dtype)
    if prior == "diagonal":
        prior = fl.DiagonalNormalPrior(torch.randn(2, dtype=dtype), 0.3 * torch.randn(2, dtype=dtype))
    z0 = torch.randn(37, 2, dtype=dtype)  # not a multiple of any tile
    clip_grad = None
    if clip:
        _, info = reference_chain(total, z0, 6, 0.02, seed=8, prior=prior)
        clip_grad = 0.5 * info.grad_norms.median().item()  # clips some samples, not all
    info = assert_matches_reference(total, z0, 6, 0.02, seed=8, prior=prior, clip_grad=clip_grad)
    if clip:
        assert (info.grad_norms > clip_grad).any() and (info.grad_norms < clip_grad).any()


@pytest.mark.parametrize("prior", ["normal", None])
def test_composition_mala(prior):
    total = composition(torch.float64)
    z0 = torch.randn(21, 2, dtype=torch.float64)
    step = 0.2 if prior == "normal" else 3.0  # steps large enough that some proposals are rejected
    info = assert_matches_reference(total, z0, 8, step, seed=4, prior=prior, method=MALA)
    assert 0 < info.acceptance_rate < 1  # both branches of the test are exercised


@pytest.mark.parametrize("method", [ULA, MALA], ids=["ula", "mala"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("clip", [False, True])
def test_posterior_matches_reference(method, bias, clip):
    torch.manual_seed(1)
    energy = Net((6, 10, 10, 1), (3, 3, 8), bias).to(torch.float64)  # GELU, as LEBM's energy
    generator = Net((4, 12, 9), (1, 9), bias).to(torch.float64)  # leaky ReLU and a sigmoid, as LEBM's generator
    target = torch.rand(19, 9, dtype=torch.float64)
    total = TotalEnergy(energy, 1.0, generator, target, 1 / (2 * 0.3 ** 2))  # generator reads z[:, :4] of 6
    z0 = torch.randn(19, 6, dtype=torch.float64)
    step = 0.01 if method == ULA else 0.3  # MALA: large enough that some proposals are rejected
    clip_grad = None
    if clip:
        _, info = reference_chain(total, z0, 5, step, seed=2, method=method)
        clip_grad = 0.5 * info.grad_norms.median().item()
    info = assert_matches_reference(total, z0, 5, step, seed=2, method=method, clip_grad=clip_grad)
    if method == MALA:
        assert 0 < info.acceptance_rate < 1


def test_float32_posterior():
    total, z0 = posterior(torch.float32, batch=40)
    assert_matches_reference(total, z0, 5, 0.02, seed=6)


def test_info_outputs_only_when_asked_and_any_thread_count():
    total, z0 = posterior(torch.float64, batch=70)
    want = kernel_chain(total, z0, 5, 0.3, seed=9, method=MALA)
    for info, n_threads in [(False, 0), (True, 1), (False, 2)]:
        got = kernel_chain(total, z0, 5, 0.3, seed=9, method=MALA, info=info, n_threads=n_threads)
        assert torch.equal(got[0], want[0])  # bit for bit: tiles do not depend on the thread count
        assert torch.equal(got[4], want[4]) and torch.equal(got[5], want[5])
    assert torch.equal(want[4], want[3].sum(0)) and 0 < want[3].float().mean() < 1
    z, energies, grad_norms, accepted, _, first_bad = kernel_chain(total, z0, 0, 0.3, seed=9)
    assert torch.equal(z, z0) and torch.equal(first_bad, torch.full_like(first_bad, -1))


@pytest.mark.parametrize("dtype, big", [(torch.float64, 1e154), (torch.float32, 1e19)])
def test_first_bad_names_the_first_non_finite_step(dtype, big):
    # E = -relu(big z) with eps = 100, no noise: for z > 0 the first step jumps by (eps/2) big and E(z_1) =
    # -(eps/2) big^2 overflows to -inf (big^2, the squared gradient norm, does not); for z < 0 the gradient is 0 and
    # nothing moves; a NaN z0 is bad at once (relu keeps the NaN, as torch's does).
    energy = Net((1, 1), (0,)).to(dtype)
    with torch.no_grad():
        energy.linears[0].weight.fill_(big)
        energy.linears[0].bias.zero_()
    total = TotalEnergy(energy, -1.0)
    z0 = torch.tensor([[1.0], [-1.0], [math.nan], [0.5], [-2.0]], dtype=dtype)
    *_, first_bad = kernel_chain(total, z0, 3, 100.0, seed=1, prior=None, noise_scale=0.0)
    assert first_bad.tolist() == [1, -1, 0, 1, -1]
    # MALA rejects the proposals whose energy is not finite: only the NaN start counts
    z, _, _, accepted, n_accepted, first_bad = kernel_chain(total, z0, 3, 100.0, seed=1, prior=None, method=MALA)
    assert first_bad.tolist() == [-1, -1, 0, -1, -1]
    assert not accepted[:, 0].any() and z[0, 0] == 1.0 and n_accepted[0] == 0


def test_first_bad_through_the_generator_term():
    total, z0 = posterior(torch.float64, batch=6)
    total.target[4, 2] = math.nan  # one sample's target
    *_, first_bad = kernel_chain(total, z0, 3, 0.05, seed=2)
    assert first_bad.tolist() == [-1, -1, -1, -1, 0, -1]


def test_bad_arguments_raise_naming_them():
    total, z0 = posterior(torch.float64)
    z, first_bad, rng_state = z0.clone(), torch.empty(5, dtype=torch.int64), make_rng_state(1)  # kept alive
    good = dict(energy=total.energy.kernel_network(), generator=total.generator.kernel_network(),
                target=total.target.data_ptr(), scale=0.7, first_bad=first_bad.data_ptr())

    def call(**change):
        a = {**good, **change}
        C.mlp_chain(z.data_ptr(), 5, a["energy"], 1.0, a["generator"], a["target"], a["scale"], 2, 0.1, 0.3, 1, 0, 0,
                    rng_state.data_ptr(), 0.0, ULA, 0, 0, 0, a["first_bad"], 1, 0)

    call()
    dims, w, b, acts, params = good["energy"]
    g_dims, g_w, g_b, g_acts, g_params = good["generator"]
    cases = [
        (dict(generator=([8, 8, 4], [g_w[0], g_w[0]], g_b, g_acts, g_params)), "Dg = 8"),
        (dict(target=0), "target_ptr"),
        (dict(scale=0.0), "likelihood_scale"),
        (dict(first_bad=0), "first_bad_ptr"),
        (dict(energy=(dims, w, b, [7, 2, 10], params)), r"energy activations\[2\]"),
        (dict(energy=(dims, w, b, [7, 2], params[:2])), "energy activations must have 3 entries"),
        (dict(energy=([7, 9, 6, 2], w, b, acts, params)), "last size must be 1"),
        (dict(generator=None), "target_ptr given without a generator"),
    ]
    before = z.clone()
    for change, match in cases:
        with pytest.raises(ValueError, match=match):
            call(**change)
    assert torch.equal(z, before)  # a rejected call changes nothing
