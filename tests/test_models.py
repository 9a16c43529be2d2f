"""fastlangevin.models: every flow layer and whole flow inverts to float64 rounding, log-determinants equal
autograd Jacobians, the backbones have the documented shapes, train (loss goes down on tiny data), rebuild from
their config and a safetensors checkpoint, and give G(z) a gradient for the Langevin chain."""

import functools
import json
import math

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch.autograd.functional import jacobian

from fastlangevin.data import make_dataset
from fastlangevin.models import GLF, MODELS, VAE, ActNorm, AffineCoupling, Glow, InvertibleLinear, SplitPrior, \
    Squeeze, VectorFlow, flow_step, make_model
from fastlangevin.models.flows import IMAGE_INVERSE_BOUND
from fastlangevin.models.nets import coupling_convnet, coupling_mlp, dcgan_layout
from tests.nets import one_thread, perturbed  # noqa: F401 (one_thread: an autouse fixture)

TOL = dict(rtol=1e-10, atol=1e-10)


def initialised(module, x, scale=0.3):
    """Initialise the actnorms on 64 samples like x (one training-mode forward), then perturb the parameters by
    ``scale`` (less for a whole flow, whose composition of perturbed layers grows ill-conditioned) and switch to
    eval."""
    module.double().train()
    with torch.no_grad():
        module(x.std() * torch.randn(64, *x.shape[1:], dtype=torch.float64) + x.mean())
    return perturbed(module, scale).eval()


def check_layer(layer, x):
    """layer.inverse(layer(x)) == x, and logdet[i] == log |det ∂y_i/∂x_i| from the autograd Jacobian."""
    y, logdet = layer(x)
    assert logdet.shape == (x.shape[0],)
    torch.testing.assert_close(layer.inverse(y), x, **TOL)
    for i in range(x.shape[0]):
        jac = jacobian(lambda v: layer(v.unsqueeze(0))[0].flatten(), x[i], vectorize=True)
        sign, expected = torch.linalg.slogdet(jac.reshape(y[i].numel(), x[i].numel()))
        assert sign != 0
        torch.testing.assert_close(logdet[i], expected, **TOL)


VECTOR = (3, 5)  # (batch, features): odd, so the coupling halves differ in size
IMAGE = (2, 3, 4, 4)


def vector_x(shape=VECTOR):
    return torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


LAYERS = {
    "actnorm-vector": (lambda: ActNorm(5), VECTOR),
    "actnorm-image": (lambda: ActNorm(3), IMAGE),
    "linear-vector": (lambda: InvertibleLinear(5), VECTOR),
    "conv1x1-image": (lambda: InvertibleLinear(3), IMAGE),
    "coupling-vector": (lambda: AffineCoupling(5, functools.partial(coupling_mlp, hidden=8)), VECTOR),
    "coupling-image": (lambda: AffineCoupling(3, functools.partial(coupling_convnet, hidden=8)), IMAGE),
    "squeeze": (lambda: Squeeze(), IMAGE),
    "flow-step-image": (lambda: flow_step(3, functools.partial(coupling_convnet, hidden=8)), IMAGE),
    "vector-flow": (lambda: VectorFlow(5, n_steps=3, hidden=8), VECTOR),
}


@pytest.mark.parametrize("name", list(LAYERS))
def test_flow_layer_inverse_and_logdet(name):
    make, shape = LAYERS[name]
    x = vector_x(shape)
    check_layer(initialised(make(), x), x)


def test_split_prior_inverse_and_logdet():
    split = perturbed(SplitPrior(5))
    x = vector_x((2, 5, 2, 2))
    h_a, eps, logdet = split(x)
    assert h_a.shape == (2, 2, 2, 2) and eps.shape == (2, 3, 2, 2)
    torch.testing.assert_close(split.inverse(h_a, eps), x, **TOL)
    for i in range(2):
        jac = jacobian(lambda v: torch.cat([t.flatten() for t in split(v.unsqueeze(0))[:2]]), x[i], vectorize=True)
        torch.testing.assert_close(logdet[i], torch.linalg.slogdet(jac.reshape(20, 20))[1], **TOL)


def test_actnorm_data_dependent_init():
    x = 3 + 2 * vector_x((64, 3, 2, 2))
    layer = ActNorm(3).double()
    y, _ = layer(x)
    torch.testing.assert_close(y.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-12, rtol=0)
    torch.testing.assert_close(y.std((0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-6,
                               rtol=0)
    assert layer.initialized
    before = layer.bias.clone()
    layer(x + 5)  # initialises once only
    assert torch.equal(layer.bias, before)


GLOWS = {
    "2-levels-split": dict(data_shape=(1, 4, 4), n_levels=2, n_steps=2, hidden=8),
    "no-split": dict(data_shape=(1, 4, 4), n_levels=2, n_steps=2, hidden=8, multiscale=False),
    "rgb-3-levels": dict(data_shape=(3, 8, 8), n_levels=3, n_steps=1, hidden=8),
    "vectors": dict(data_shape=(2,), n_steps=3, hidden=8),
}


@pytest.mark.parametrize("name", list(GLOWS))
def test_glow_inverse_and_logdet(name):
    config = GLOWS[name]
    x = 0.3 * vector_x((2, *config["data_shape"]))
    glow = initialised(Glow(**config), x, scale=0.05)
    z, logdet = glow(x)
    assert z.shape == (2, math.prod(config["data_shape"])) == (2, glow.latent_dim)
    check_layer(glow, x if name != "rgb-3-levels" else x[:1])  # a 192×192 Jacobian is enough once
    if glow.n_bins is not None:  # data on the pixel grid survives encode → generate
        x = torch.randint(0, glow.n_bins, x.shape, dtype=torch.float64) / (glow.n_bins - 1)
    torch.testing.assert_close(glow.generate(glow.encode(x)), x, **TOL)


def test_image_glow_generator_is_bounded_where_its_inverse_runs_away():
    """G = flow⁻¹ with every coupling's, split's and level's inverse output clamped to ±IMAGE_INVERSE_BOUND:
    unchanged on typical latents, finite with a finite gradient far outside them (where the unbounded inverse grows
    without limit)."""
    torch.manual_seed(0)
    glow = Glow((1, 8, 8), n_levels=2, n_steps=2, hidden=8)
    glow(torch.rand(16, 1, 8, 8) - 0.5)  # data-dependent actnorm init
    bounded = [m for m in glow.modules() if isinstance(m, AffineCoupling)] + [glow.flow]
    assert len(bounded) == 5 and all(m.inverse_bound == IMAGE_INVERSE_BOUND for m in bounded)

    def unbounded(z):
        for m in bounded:
            m.inverse_bound = None
        try:
            return glow.generate(z)
        finally:
            for m in bounded:
                m.inverse_bound = IMAGE_INVERSE_BOUND
    z = torch.randn(4, 64)
    assert torch.equal(glow.generate(z), unbounded(z))
    far = (1e30 * torch.randn(4, 64)).requires_grad_()
    x = glow.generate(far)
    x.square().sum().backward()
    assert torch.isfinite(x).all() and torch.isfinite(far.grad).all()
    assert x.abs().max() < 10 * IMAGE_INVERSE_BOUND < unbounded(far).abs().max()


def test_glow_flat_latent_helpers():
    glow = Glow((1, 8, 8), n_levels=2, n_steps=1, hidden=8)
    assert glow.flow.latent_shapes == [(2, 4, 4), (8, 2, 2)]
    z = torch.randn(3, 64)
    parts = glow.unflatten_latent(z)
    assert [p.shape[1:] for p in parts] == [(2, 4, 4), (8, 2, 2)]
    assert torch.equal(glow.flatten_latent(parts), z)
    assert Glow((3, 32, 32), n_levels=3, n_steps=1, hidden=8).flow.latent_shapes == [(6, 16, 16), (12, 8, 8),
                                                                                     (48, 4, 4)]


def test_vector_glow_density_integrates_to_one():
    """log_prob is a normalised density, not just a consistent one: its integral on a grid is 1."""
    glow = initialised(Glow((2,), n_steps=3, hidden=8), vector_x((256, 2)), scale=0.1)
    with torch.no_grad():
        axis = torch.linspace(-8, 8, 401, dtype=torch.float64)
        grid = torch.cartesian_prod(axis, axis)
        mass = glow.log_prob(grid).exp().sum() * (axis[1] - axis[0]) ** 2
    assert mass.item() == pytest.approx(1.0, abs=1e-3)


def test_glow_pixels_round_trip():
    glow = Glow((1, 8, 8), n_levels=2, n_steps=1, hidden=8, n_bins=17).double()
    x = torch.randint(0, 17, (4, 1, 8, 8), dtype=torch.float64) / 16
    y = glow.preprocess(x)
    assert y.min() > -0.5 and y.max() < 0.5
    torch.testing.assert_close(glow.postprocess(y), x, **TOL)
    noisy = glow.preprocess(x, dequantize=True)
    assert torch.equal(torch.floor((noisy + 0.5) * 17), x * 16)  # the noise stays inside each pixel's bin


def test_glf_flow_inverse_and_logdet():
    glf = GLF((2,), latent_dim=4, flow_steps=3, flow_hidden=8)
    code = vector_x((3, 4))
    check_layer(initialised(glf.flow, code, scale=0.1), code)


# ---------------------------------------------------------------------------------------------------- backbones
def test_dcgan_layout():
    assert dcgan_layout(8) == (4, 1) and dcgan_layout(28) == (7, 2) and dcgan_layout(32) == (4, 3)
    with pytest.raises(ValueError, match="halves at least once"):
        dcgan_layout(6)
    with pytest.raises(ValueError, match="square images"):
        VAE((1, 8, 16), 4)


SHAPES = [(2,), (1, 8, 8), (1, 28, 28), (3, 32, 32)]


@pytest.mark.parametrize("data_shape", SHAPES)
@pytest.mark.parametrize("name", list(MODELS))
def test_backbone_shapes(name, data_shape):
    torch.manual_seed(0)
    config = dict(data_shape=data_shape, hidden=8, n_steps=1, n_levels=3 if data_shape[-1] == 32 else 2)
    if name != "glow":
        config = dict(data_shape=data_shape, latent_dim=6, width=8)
    model = make_model(name, **config)
    x = torch.rand(3, *data_shape)
    terms = model.loss_terms(x)
    assert terms["loss"].shape == () and all(torch.isfinite(v) for v in terms.values())
    z = model.encode(x)
    assert z.shape == (3, model.latent_dim) and model.latent_shape == (model.latent_dim,)
    model.eval()
    assert model.generate(z).shape == (3, *data_shape)
    samples = model.sample(5, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (5, *data_shape)
    if len(data_shape) == 3 and name != "glow":
        assert samples.min() >= 0 and samples.max() <= 1


def test_vae_elbo_and_reconstructions():
    x = torch.rand(4, 1, 8, 8)
    assert VAE((1, 8, 8), 3, width=8).elbo(x).shape == (4,)
    sse = VAE((2,), 3, obs_std=0.5 ** 0.5, learn_obs_std=False)
    assert "log_obs_std" not in dict(sse.named_parameters()) and "log_obs_std" in sse.state_dict()
    x2, z = torch.randn(4, 2), torch.randn(4, 3)
    squared_error = (x2 - sse.decode(z)).pow(2).sum(1)
    torch.testing.assert_close(-sse._log_likelihood(x2, z), squared_error + math.log(math.pi))  # SSE + const
    assert "log_obs_std" in dict(VAE((2,), 3).named_parameters())
    with pytest.raises(ValueError, match="reconstruction must be one of"):
        VAE((2,), 3, reconstruction="l1")
    with pytest.raises(ValueError, match="obs_std must be > 0"):
        VAE((2,), 3, obs_std=0.0)


def test_prior_log_prob():
    z = torch.randn(7, 5, dtype=torch.float64)
    expected = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    torch.testing.assert_close(VAE.prior_log_prob(z), expected)
    assert VAE.prior == "normal"


def train(make, x, steps, lr, seed=0):
    """Build ``make()`` and return its loss on x (at fixed noise) before and after ``steps`` full-batch Adam steps."""
    torch.manual_seed(seed)
    model = make().train()
    with torch.no_grad():
        model.loss(x)  # data-dependent initialisation first, so "before" is the trained model's starting point
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)

    def evaluate():
        torch.manual_seed(123)
        with torch.no_grad():
            return model.loss(x).item()

    before = evaluate()
    for _ in range(steps):
        optimizer.zero_grad()
        model.loss(x).backward()
        optimizer.step()
    return before, evaluate()


@pytest.mark.parametrize("data, make, steps", [
    ("25gaussians", lambda: VAE((2,), 2, width=32), 30),
    ("digits", lambda: VAE((1, 8, 8), 8, width=16), 30),
    ("digits", lambda: GLF((1, 8, 8), 8, width=16, flow_hidden=16), 60),  # the flow first chases the moving codes
])
def test_autoencoders_learn(data, make, steps):
    x = make_dataset(data, n_samples=64).tensors()[0]
    before, after = train(make, x, steps=steps, lr=3e-3)
    assert after < before - 0.1 * abs(before)


@pytest.mark.parametrize("data, config", [
    ("digits", dict(data_shape=(1, 8, 8), n_levels=2, n_steps=1, hidden=16, n_bins=17)),
    ("25gaussians", dict(data_shape=(2,), n_steps=4, hidden=32)),
])
def test_glow_likelihood_finite_and_improving(data, config):
    x = make_dataset(data, n_samples=64).tensors()[0]
    before, after = train(lambda: Glow(**config), x, steps=30, lr=3e-3)
    assert math.isfinite(before) and math.isfinite(after)
    assert after < before - 0.02 * abs(before)  # bits/dim on digits, nats on the toy


def test_glf_stops_the_likelihood_gradient_at_the_code():
    glf = GLF((1, 8, 8), 4, width=8, flow_hidden=8)
    glf.loss_terms(torch.rand(8, 1, 8, 8))["flow_nll"].backward()
    assert all(p.grad is None for p in glf.encoder.parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in glf.flow.parameters())


@pytest.mark.parametrize("name", list(MODELS))
def test_rebuild_from_config_and_safetensors(name, tmp_path):
    config = dict(data_shape=(1, 8, 8), n_steps=1, hidden=8) if name == "glow" else \
        dict(data_shape=(1, 8, 8), latent_dim=4, width=8)
    model = make_model(name, **config)
    model.loss(torch.rand(16, 1, 8, 8))  # initialises the actnorms
    save_file(model.state_dict(), tmp_path / "model.safetensors")
    rebuilt = make_model(name, **json.loads(json.dumps(model.config)))
    rebuilt.load_state_dict(load_file(tmp_path / "model.safetensors"))
    model.eval(), rebuilt.eval()
    z = torch.randn(3, model.latent_dim)
    torch.testing.assert_close(rebuilt.generate(z), model.generate(z))
    with pytest.raises(ValueError, match="unknown model"):
        make_model("nvae")


@pytest.mark.parametrize("name", list(MODELS))
def test_generator_has_a_latent_gradient(name):
    """What the latent EBM's chain needs: ∂E(G(z))/∂z through the frozen generator, per sample."""
    config = dict(data_shape=(1, 8, 8), n_steps=1, hidden=8) if name == "glow" else \
        dict(data_shape=(1, 8, 8), latent_dim=4, width=8)
    model = perturbed(make_model(name, **config), scale=0.05).eval()
    z = torch.randn(4, model.latent_dim, dtype=torch.float64, requires_grad=True)
    grad = torch.autograd.grad(model.generate(z).pow(2).sum(), z)[0]
    assert grad.shape == z.shape and torch.isfinite(grad).all() and (grad.abs().sum(1) > 0).all()
    one = torch.autograd.grad(model.generate(z[:1]).pow(2).sum(), z)[0]
    torch.testing.assert_close(one[0], grad[0], **TOL)  # eval mode: no batch coupling through batch norm
