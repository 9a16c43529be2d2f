"""CUDA-graph chains. The GPU lane checks capture and replay; on CPU only the argument checks run."""

import pytest
import torch
from torch import nn

import fastlangevin as fl
from fastlangevin.graphs import MAX_GRAPHS, _graphs, clear_graph_cache


def conv_energy(device):
    torch.manual_seed(0)
    generator = nn.Sequential(nn.Unflatten(1, (4, 2, 2)), nn.ConvTranspose2d(4, 8, 4, 2, 1), nn.LeakyReLU(0.2),
                              nn.ConvTranspose2d(8, 1, 4, 2, 1), nn.Tanh()).to(device)
    critic = nn.Sequential(nn.Conv2d(1, 8, 3, 1, 1), nn.SiLU(), nn.Conv2d(8, 8, 3, 2, 1), nn.SiLU()).to(device)
    energy = lambda z: critic(generator(z)).sum(dim=(1, 2, 3))
    return energy, generator, critic


def test_cuda_graph_needs_cuda_tensors():
    with pytest.raises(ValueError, match="CUDA device"):
        fl.langevin(lambda z: z.sum(1), torch.zeros(2, 2), 2, 0.1, cuda_graph=True)


def test_cuda_graph_off_on_cpu_by_default():
    _, info = fl.langevin(lambda z: z.pow(2).sum(1), torch.zeros(2, 2), 2, 0.1, return_info=True)
    assert not info.backend.endswith(":graph")


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
    for batch in range(1, MAX_GRAPHS + 5):
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
