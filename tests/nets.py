"""Helpers shared by the model tests: one intra-op thread, and float64 modules moved off their initialisation."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """These tensors are tiny: intra-op threads only add overhead, and on a busy 2-core machine two of them wait on
    each other at every op (a model test file ran 10× slower with two). Import it into a test module to use it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def perturbed(module, scale=0.3, seed=0):
    """The module in float64 with every parameter moved off its (often identity) initialisation, so that e.g. a
    flow's layers or a hierarchical VAE's σ_i, μ_i depend on their inputs."""
    torch.manual_seed(seed)
    module = module.double()
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module
