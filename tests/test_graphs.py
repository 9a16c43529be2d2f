"""CUDA-graph chains. On the CPU a stand-in for ``torch.cuda.CUDAGraph`` checks the graph cache (plain Python): what
is captured, when a graph is replayed, and that a replay never reads stale memory. The GPU lane checks real capture
and replay."""

import contextlib
import gc
import logging
import re
import sys

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import fastlangevin as fl
from fastlangevin import graphs
from fastlangevin.graphs import MAX_GRAPHS, REPEATED_CAPTURE_LIMIT, _graphs, clear_graph_cache

step_op = sys.modules["fastlangevin.ops.langevin_step"]  # the module (fastlangevin.ops exports the function)
aten = torch.ops.aten
HOST_SYNCS = {aten._local_scalar_dense, aten.nonzero, aten.is_nonzero}


class _Recorder(TorchDispatchMode):
    def __init__(self, ops):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in HOST_SYNCS:
            raise RuntimeError("operation not permitted when stream is capturing (the stand-in graph)")
        out = func(*args, **(kwargs or {}))
        self.ops.append((func, args, kwargs or {}, out))
        return out


class RecordedGraph:
    """Stand-in for ``torch.cuda.CUDAGraph``: capture records every aten op with the tensors it read and wrote;
    ``replay()`` runs the ops again on those same tensors and writes each result into the captured output in
    place. Like a CUDA graph it reads the memory it captured (a parameter replaced by a new tensor is not seen) and
    freezes Python values; a host sync during capture raises."""

    made: list["RecordedGraph"] = []

    def __init__(self):
        self.ops, self.replays, self.captured = [], 0, False
        RecordedGraph.made.append(self)

    def replay(self):
        assert self.captured, "replay of a graph whose capture did not finish"
        self.replays += 1
        with torch.no_grad():
            for func, args, kwargs, recorded in self.ops:
                fresh = func(*args, **kwargs)
                read = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                        if isinstance(t, torch.Tensor) and t.numel()}
                for old, new in zip(tree_leaves(recorded), tree_leaves(fresh)):
                    # a view or an in-place result aliases what the op read: re-running the op updated it already
                    if isinstance(old, torch.Tensor) and old is not new and old.numel() and \
                            old.untyped_storage().data_ptr() not in read:
                        old.copy_(new)


@contextlib.contextmanager
def _capture(graph, *args, **kwargs):
    with _Recorder(graph.ops):
        yield
    graph.captured = True


class _Stream:
    def wait_stream(self, other):
        pass


class StandIn:
    """What the stand-in saw: ``captures`` (graphs whose capture finished), ``replays`` (over all graphs)."""

    @property
    def captures(self):
        return sum(g.captured for g in RecordedGraph.made)

    @property
    def replays(self):
        return sum(g.replays for g in RecordedGraph.made)


@pytest.fixture
def standin(monkeypatch):
    """CPU chains take the CUDA-graph path with ``RecordedGraph`` in place of the CUDA calls the capture makes; the
    step runs as the registered op (its direct launch bypasses the dispatcher, so the stand-in could not see it)."""
    monkeypatch.setattr(torch.cuda, "CUDAGraph", RecordedGraph)
    monkeypatch.setattr(torch.cuda, "graph", _capture)
    monkeypatch.setattr(torch.cuda, "Stream", lambda *a, **k: _Stream())
    monkeypatch.setattr(torch.cuda, "current_stream", lambda *a, **k: _Stream())
    monkeypatch.setattr(torch.cuda, "stream", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(torch.cuda, "device", lambda *a, **k: contextlib.nullcontext())
    monkeypatch.setattr(graphs, "CAPTURE_DEVICE_TYPES", ("cuda", "cpu"))
    monkeypatch.setattr(step_op, "DIRECT_LAUNCH", {})
    monkeypatch.setattr(RecordedGraph, "made", [])
    clear_graph_cache()
    yield StandIn()
    clear_graph_cache()


class Quadratic(nn.Module):
    """E(z) = Σ softplus(W z + b)·scale, a module with parameters, a buffer and a plain attribute."""

    def __init__(self, d=5, scale=1.0, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.layer = nn.Linear(d, 7).double()
        self.register_buffer("shift", torch.zeros(7, dtype=torch.float64))
        self.scale = scale

    def forward(self, z):
        return self.scale * nn.functional.softplus(self.layer(z) + self.shift).sum(1)


class Posterior(nn.Module):
    """An energy holding a batch of data: ‖x − z‖² + E(z)."""

    def __init__(self, prior_energy, x):
        super().__init__()
        self.prior_energy, self.x = prior_energy, x

    def forward(self, z):
        return (self.x - z).pow(2).sum(1) + self.prior_energy(z)


CHAIN = dict(n_steps=4, step_size=0.05, backend="reference", prior=fl.NormalPrior())  # one prior object: only
# the energy differs between calls


def eager(energy, z0, seed, **kwargs):
    return fl.langevin(energy, z0, seed=seed, cuda_graph=False, **{**CHAIN, **kwargs})


def graphed(energy, z0, seed, cuda_graph=None, **kwargs):
    z, info = fl.langevin(energy, z0, seed=seed, cuda_graph=cuda_graph, return_info=True, **{**CHAIN, **kwargs})
    return z, info.backend.endswith(":graph")


def test_standin_replays_like_a_graph(standin):
    """The stand-in is faithful enough to catch a stale replay: it recomputes from the static input and the noise
    state (a replay that did nothing would return the first result for every seed)."""
    energy = Quadratic()
    z0 = torch.randn(6, 5, dtype=torch.float64)
    for seed in (3, 4, 3):
        z, was_graphed = graphed(energy, z0, seed)
        assert was_graphed
        torch.testing.assert_close(z, eager(energy, z0, seed), rtol=1e-12, atol=1e-12)
    z1, _ = graphed(energy, 2 * z0, 5)
    torch.testing.assert_close(z1, eager(energy, 2 * z0, 5), rtol=1e-12, atol=1e-12)
    assert standin.captures == 1 and standin.replays == 4


def test_optimizer_steps_are_seen_without_a_new_capture(standin):
    energy = Quadratic()
    z0 = torch.randn(6, 5, dtype=torch.float64)
    graphed(energy, z0, 1)
    opt = torch.optim.SGD(energy.parameters(), lr=0.3)
    for _ in range(3):
        energy.layer.weight.grad = torch.randn_like(energy.layer.weight)
        energy.layer.bias.grad = torch.randn_like(energy.layer.bias)
        opt.step()
        energy.load_state_dict({**energy.state_dict(), "shift": torch.randn(7, dtype=torch.float64)})  # in place
        z, _ = graphed(energy, z0, 1)
        torch.testing.assert_close(z, eager(energy, z0, 1), rtol=1e-12, atol=1e-12)
    assert standin.captures == 1 and standin.replays == 4


@pytest.mark.parametrize("replace", ["parameter", "data", "buffer", "attribute", "train-eval"])
def test_a_replaced_tensor_or_changed_value_captures_anew(standin, replace):
    energy = Quadratic()
    energy.norm = nn.BatchNorm1d(5).double()  # train/eval changes its forward
    forward = energy.forward
    energy.forward = lambda z: forward(energy.norm(z))
    z0 = torch.randn(6, 5, dtype=torch.float64)
    graphed(energy, z0, 1)
    if replace == "parameter":
        energy.layer.weight = nn.Parameter(torch.randn(7, 5, dtype=torch.float64))
    elif replace == "data":
        energy.layer.weight.data = torch.randn(7, 5, dtype=torch.float64)
    elif replace == "buffer":
        energy.shift = torch.randn(7, dtype=torch.float64)
    elif replace == "attribute":
        energy.scale = 2.5
    else:
        energy.eval()
    gc.collect()
    z, was_graphed = graphed(energy, z0, 1)
    assert was_graphed and standin.captures == 2
    torch.testing.assert_close(z, eager(energy, z0, 1), rtol=1e-12, atol=1e-12)


def _closure(weight):
    return lambda z: (weight * z).pow(2).sum(1)


def test_a_closure_freed_and_replaced_at_the_same_id_never_replays_the_old_graph(standin):
    z0 = torch.randn(6, 5, dtype=torch.float64)
    energy = _closure(torch.full((5,), 1.0, dtype=torch.float64))
    graphed(energy, z0, 1, cuda_graph=True)
    old_id = id(energy)
    del energy
    gc.collect()
    others, reused = [], None
    for i in range(1000):  # CPython hands a freed function's memory to the next function made
        candidate = _closure(torch.full((5,), 3.0 + i, dtype=torch.float64))
        if id(candidate) == old_id:
            reused = candidate
            break
        others.append(candidate)
    if reused is None:
        pytest.skip("this interpreter did not reuse the freed closure's id")
    z, was_graphed = graphed(reused, z0, 1, cuda_graph=True)
    assert was_graphed
    torch.testing.assert_close(z, eager(reused, z0, 1), rtol=1e-12, atol=1e-12)
    assert standin.captures == 2


def test_an_energy_rebuilt_each_call_around_the_same_state_reuses_one_graph(standin):
    base, x = Quadratic(), torch.randn(6, 5, dtype=torch.float64)
    z0 = torch.randn(6, 5, dtype=torch.float64)
    for seed in range(5):
        z, was_graphed = graphed(Posterior(base, x), z0, seed)  # a new module object every call
        assert was_graphed
        torch.testing.assert_close(z, eager(Posterior(base, x), z0, seed), rtol=1e-12, atol=1e-12)
    for seed in range(3):  # closures over the same objects, with cuda_graph=True
        weight = torch.ones(5, dtype=torch.float64)
        graphed(_closure(weight), z0, seed, cuda_graph=True) if seed == 0 else None
    assert standin.captures == 2 and standin.replays == 6


def _stop_records(caplog):
    return [r for r in caplog.records if "never replayed" in r.getMessage()]


@pytest.mark.parametrize("change, cause", [
    ("data", r"energy\.x is a different tensor each call"),
    ("parameter", r"energy\.layer\.weight is a different tensor each call"),
    ("attribute", r"energy\.scale changes each call \(2\.0 -> 3\.0\)"),
])
def test_a_capture_repeated_every_call_stops_with_one_warning(standin, caplog, change, cause):
    caplog.set_level(logging.WARNING, logger="fastlangevin")
    base = Quadratic()
    z0 = torch.randn(6, 5, dtype=torch.float64)
    for step in range(10):
        if change == "data":  # the posterior-chain pattern: a new module around a new batch each iteration
            energy = Posterior(base, torch.randn(6, 5, dtype=torch.float64))
        else:
            energy = base
            if change == "parameter":
                base.layer.weight = nn.Parameter(torch.randn(7, 5, dtype=torch.float64))
            else:
                base.scale = float(step + 1)
        z, _ = graphed(energy, z0, step)
        torch.testing.assert_close(z, eager(energy, z0, step), rtol=1e-12, atol=1e-12)
    assert standin.captures == REPEATED_CAPTURE_LIMIT
    records = _stop_records(caplog)
    assert len(records) == 1
    assert re.search(cause, records[0].getMessage()), records[0].getMessage()
    assert any(re.search(cause, s) for s in graphs.cache_info().stopped)
    assert any("never replayed" in f for f in fl.backend_info().fallbacks)
    assert len(_graphs) <= 1  # the useless graphs are freed


def test_live_energies_of_one_type_are_not_taken_for_a_repeated_capture(standin, caplog):
    ensemble = [Quadratic(seed=i) for i in range(2 * REPEATED_CAPTURE_LIMIT)]
    z0 = torch.randn(6, 5, dtype=torch.float64)
    for step in range(3):
        for energy in ensemble:
            z, was_graphed = graphed(energy, z0, step)
            assert was_graphed
    torch.testing.assert_close(z, eager(ensemble[-1], z0, 2), rtol=1e-12, atol=1e-12)
    assert standin.captures == len(ensemble) and not _stop_records(caplog)


NET = None


def _global_energy(z):
    return NET(z)


def test_plain_functions_are_graphed_only_on_request(standin):
    global NET
    z0 = torch.randn(6, 5, dtype=torch.float64)
    NET = Quadratic(seed=1)
    _, was_graphed = graphed(_global_energy, z0, 1)
    assert not was_graphed and standin.captures == 0
    assert any("plain-function energy" in f for f in fl.backend_info().fallbacks)
    _, was_graphed = graphed(NET, z0, 1, prior=lambda z: -z.pow(2).sum(1))
    assert not was_graphed and standin.captures == 0
    z, was_graphed = graphed(_global_energy, z0, 1, cuda_graph=True)
    assert was_graphed and standin.captures == 1
    NET = Quadratic(seed=2)  # the global it reads is rebound: a new graph, never the old one
    z, was_graphed = graphed(_global_energy, z0, 1, cuda_graph=True)
    torch.testing.assert_close(z, eager(_global_energy, z0, 1), rtol=1e-12, atol=1e-12)
    assert standin.captures == 2


def test_a_bound_method_of_a_module_is_graphed_by_default(standin):
    energy = Quadratic()
    z0 = torch.randn(6, 5, dtype=torch.float64)
    for seed in range(3):
        z, was_graphed = graphed(energy.forward, z0, seed)  # a new bound-method object on every access
        assert was_graphed
    torch.testing.assert_close(z, eager(energy, z0, 2), rtol=1e-12, atol=1e-12)
    assert standin.captures == 1


def test_a_failed_capture_falls_back_once_and_user_errors_are_raised(standin):
    class Syncing(Quadratic):
        def forward(self, z):
            if z.abs().max().item() > 1e30:  # a host sync: cannot be captured
                return z.sum(1)
            return super().forward(z)

    energy = Syncing()
    z0 = torch.randn(6, 5, dtype=torch.float64)
    for seed in range(3):
        z, was_graphed = graphed(energy, z0, seed)
        assert not was_graphed
        torch.testing.assert_close(z, eager(energy, z0, seed), rtol=1e-12, atol=1e-12)
    assert len(RecordedGraph.made) == 1  # tried once
    assert any("CUDA graph capture failed" in f for f in fl.backend_info().fallbacks)
    with pytest.raises(ValueError, match="shape"):  # the warm-up runs eagerly: the energy's own error
        graphed(lambda z: z.sum(), z0, 1, cuda_graph=True)


def test_the_cache_is_bounded(standin):
    energy = Quadratic()
    for batch in range(1, MAX_GRAPHS + 3):
        graphed(energy, torch.randn(batch, 5, dtype=torch.float64), 1)
    assert len(_graphs) <= MAX_GRAPHS
    assert standin.captures == MAX_GRAPHS + 2


def test_cuda_graph_needs_cuda_tensors():
    with pytest.raises(ValueError, match="CUDA device"):
        fl.langevin(lambda z: z.sum(1), torch.zeros(2, 2), 2, 0.1, cuda_graph=True)


def test_cuda_graph_off_on_cpu_by_default():
    _, info = fl.langevin(lambda z: z.pow(2).sum(1), torch.zeros(2, 2), 2, 0.1, return_info=True)
    assert not info.backend.endswith(":graph")


def conv_energy(device):
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Unflatten(1, (4, 2, 2)), nn.ConvTranspose2d(4, 8, 4, 2, 1), nn.LeakyReLU(0.2),
                              nn.ConvTranspose2d(8, 1, 4, 2, 1), nn.Tanh()).to(device)
    critic = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1), nn.SiLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.SiLU()).to(device)
    energy = lambda z: critic(generator(z)).sum(dim=(1, 2, 3))
    return energy, generator, critic


@pytest.mark.gpu
def test_graph_equals_eager_and_draws_fresh_noise():
    energy, _, _ = conv_energy("cuda")
    z0 = torch.randn(16, 16, device="cuda")
    eager = fl.langevin(energy, z0, 5, 0.01, seed=3, cuda_graph=False)
    graphed, info = fl.langevin(energy, z0, 5, 0.01, seed=3, cuda_graph=True, return_info=True)
    assert info.backend.endswith(":graph")
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    again = fl.langevin(energy, z0, 5, 0.01, seed=3, cuda_graph=True)  # a replay
    torch.testing.assert_close(again, eager, rtol=1e-5, atol=1e-5)
    other = fl.langevin(energy, z0, 5, 0.01, seed=4, cuda_graph=True)
    assert not torch.allclose(other, again)


@pytest.mark.gpu
def test_graph_sees_parameter_updates_and_leaves_grads_alone():
    energy, generator, critic = conv_energy("cuda")
    z0 = torch.randn(8, 16, device="cuda")
    critic[0].weight.grad = torch.ones_like(critic[0].weight)
    fl.langevin(energy, z0, 3, 0.01, seed=1, cuda_graph=True)
    opt = torch.optim.SGD(critic.parameters(), lr=0.5)
    opt.step()  # in place: the captured graph reads the new values
    eager = fl.langevin(energy, z0, 3, 0.01, seed=1, cuda_graph=False)
    graphed = fl.langevin(energy, z0, 3, 0.01, seed=1, cuda_graph=True)
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)
    assert torch.equal(critic[0].weight.grad, torch.ones_like(critic[0].weight))
    assert generator[1].weight.grad is None


@pytest.mark.gpu
def test_graph_memory_is_bounded_over_replays():
    energy, _, _ = conv_energy("cuda")
    z0 = torch.randn(8, 16, device="cuda")
    fl.langevin(energy, z0, 3, 0.01, seed=1, cuda_graph=True)
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for seed in range(1000):
        fl.langevin(energy, z0, 3, 0.01, seed=seed, cuda_graph=True)
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() <= before + 1024 * 1024
    clear_graph_cache()
    for batch in range(1, MAX_GRAPHS + 3):
        fl.langevin(energy, torch.randn(batch, 16, device="cuda"), 2, 0.01, cuda_graph=True)
    assert len(_graphs) <= MAX_GRAPHS


@pytest.mark.gpu
def test_graph_on_a_non_default_stream_and_device_index():
    energy, _, _ = conv_energy("cuda")
    device = torch.device("cuda", torch.cuda.device_count() - 1)
    energy, _, _ = conv_energy(device)
    z0 = torch.randn(8, 16, device=device)
    eager = fl.langevin(energy, z0, 3, 0.01, seed=2, cuda_graph=False)
    stream = torch.cuda.Stream(device)
    with torch.cuda.stream(stream):
        graphed = fl.langevin(energy, z0, 3, 0.01, seed=2, cuda_graph=True)
    stream.synchronize()
    torch.testing.assert_close(graphed, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_capture_failure_falls_back_with_a_reason():
    def syncing_energy(z):
        if z.sum().item() > 1e30:  # a host sync: cannot be captured
            return z.sum(1)
        return z.pow(2).sum(1)

    z0 = torch.randn(4, 3, device="cuda")
    z, info = fl.langevin(syncing_energy, z0, 3, 0.1, seed=1, cuda_graph=True, return_info=True)
    assert not info.backend.endswith(":graph")
    assert any("CUDA graph capture failed" in f for f in fl.backend_info().fallbacks)
    torch.testing.assert_close(z, fl.langevin(syncing_energy, z0, 3, 0.1, seed=1, cuda_graph=False))


# --- a training run captures once per chain configuration ----------------------------------------------------------

TRAINING_RUNS = {
    "tilt": [["train-base", "vae", "--data", "25gaussians", "--n-train", "128", "--width", "8", "--steps", "2",
              "--batch-size", "16", "--n-eval", "50", "--out", "{run}", "--no-progress"],
             ["tilt", "{run}", "--steps", "20", "--batch-size", "8", "--n-steps", "3", "--sample-steps", "3",
              "--eval-every", "10", "--n-eval", "40", "--energy-width", "8", "--energy-depth", "1", "--no-progress"]],
    "lebm": [["train-prior", "lebm", "--data", "digits", "--out", "{run}", "--steps", "20", "--batch-size", "8",
              "--prior-steps", "5", "--posterior-steps", "4", "--eval-every", "10", "--n-eval", "20",
              "--latent-dim", "2", "--energy-width", "8", "--generator-width", "8", "--no-progress"]],
    "hierarchical": [["train-prior", "joint", "--data", "digits", "--out", "{run}", "--vae-steps", "2", "--steps",
                      "20", "--batch-size", "8", "--channels", "4", "--latent-channels", "2", "1", "--prior-steps",
                      "3", "--energy-width", "4", "--no-progress"]],
}


def _modes(module) -> tuple:
    return tuple(m.training for m in module.modules()) if isinstance(module, nn.Module) else ()


@pytest.mark.parametrize("trainer", sorted(TRAINING_RUNS))
def test_a_training_run_captures_once_per_chain_configuration(standin, trainer, tmp_path, monkeypatch):
    """20 training iterations (plus evaluation) on tiny settings: one capture per chain configuration (energy, shape,
    settings, train/eval flags), every later chain of that configuration a replay, optimiser steps seen (a chain
    never replays a graph captured before the last step changed its energy's parameters: checked by the cache's
    storage keys in the other tests; here the count)."""
    pytest.importorskip("matplotlib")
    from fastlangevin import sampler
    from fastlangevin.cli import main
    from fastlangevin.metrics import frechet
    from fastlangevin.metrics.classifier import ClassifierConfig

    # the stand-in graphs what runs on the step-op path; the fused chain (MLP energies) needs no graph
    monkeypatch.setattr(sampler, "_fused_plan", lambda *args, **kwargs: (None, None))
    monkeypatch.setattr(frechet, "ClassifierConfig",
                        lambda: ClassifierConfig(width=4, feature_dim=8, min_steps=20, epochs=0.1))
    configurations, calls, real = set(), [], fl.langevin

    # return_info is part of a configuration: a run's first chain of each kind returns its info (for the run's log)
    def spy(energy, z0, n_steps, step_size, **kwargs):
        settings = tuple(sorted((k, v if isinstance(v, (int, float, str, type(None))) else type(v).__name__)
                                for k, v in kwargs.items() if k != "seed"))
        configurations.add((id(energy), tuple(z0.shape), z0.dtype, n_steps, step_size, settings, _modes(energy)))
        calls.append(energy)
        return real(energy, z0, n_steps, step_size, **kwargs)

    monkeypatch.setattr(fl, "langevin", spy)
    for command in TRAINING_RUNS[trainer]:
        assert main([arg.replace("{run}", str(tmp_path)) for arg in command]) == 0
    assert len(calls) >= 20
    assert 0 < standin.captures <= len(configurations), (standin.captures, len(configurations), len(calls))
    assert standin.replays == len(calls), "every chain (including its first, after the capture) is a replay"


def test_a_posterior_energy_alternating_batch_sizes_keeps_one_graph_each(standin):
    """Training chains of 8 and evaluation chains of 20 samples share one GaussianPosteriorEnergy: the evaluation's
    data buffer must not invalidate the training chain's graph, and each replay reads the batch set last."""
    torch.manual_seed(0)
    posterior = fl.GaussianPosteriorEnergy(Quadratic(d=3), nn.Linear(3, 4).double(), sigma=0.5)
    for step, batch in enumerate((8, 20, 8, 20, 8)):
        x, z0 = torch.randn(batch, 4, dtype=torch.float64), torch.randn(batch, 3, dtype=torch.float64)
        posterior.set_target(x)
        z, was_graphed = graphed(posterior, z0, seed=step)
        assert was_graphed
        torch.testing.assert_close(z, eager(posterior, z0, seed=step), rtol=1e-12, atol=1e-12)
    assert standin.captures == 2
