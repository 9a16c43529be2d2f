"""The benchmark energies and the LEBM chain settings they run with.

* ``MLPModel``: LEBM's prior energy, an MLP 100-200-200-1 (LeakyReLU 0.2), as ``fl.MLPEnergy`` (the fused chain) and
  as the ``nn.Sequential`` published code holds, sharing one set of parameters.
* ``ConvModel``: E(G(z)) with a small conv generator and a conv image energy (the posterior-chain shape).

Each has ``module``: the energy as a long-lived ``nn.Module`` mapping z (B, *latent_shape) to (B,), which the step-op
and CUDA-graph chains take (a graph captured for it is replayed on every later call).
"""

from __future__ import annotations

import torch
from torch import nn

from harness.flops import count_macs

MLP_DIMS = (100, 200, 200, 1)
MLP_STEPS, MLP_STEP_SIZE = 60, 0.16  # LEBM prior chain: 60 steps, s = 0.4, ε = s²
CONV_STEPS, CONV_STEP_SIZE, CONV_BATCH = 20, 0.01, 64  # LEBM posterior-chain length and step (s = 0.1)


class MLPModel:
    """``fl.MLPEnergy(dims, "leaky_relu", slope)`` and the ``nn.Sequential`` the published code would hold, sharing
    the same parameters (which keep ``requires_grad=True``, as during training)."""

    kind = "mlp"

    def __init__(self, dims=MLP_DIMS, slope: float = 0.2, seed: int = 0, device="cpu"):
        import fastlangevin as fl

        torch.manual_seed(seed)
        self.dims, self.slope = tuple(dims), slope
        self.energy = fl.MLPEnergy(self.dims, "leaky_relu", slope).to(device)
        layers = []
        for i, linear in enumerate(self.energy.layers):
            layers.append(linear)
            if i < len(self.energy.layers) - 1:
                layers.append(nn.LeakyReLU(slope))
        self.seq = nn.Sequential(*layers)  # (B, 1), as LEBM's _netE
        self.module = nn.Sequential(self.seq, nn.Flatten(0))  # (B,)
        self.latent_shape = (self.dims[0],)
        self.macs = sum(a * b for a, b in zip(self.dims[:-1], self.dims[1:]))

    @property
    def label(self) -> str:
        return "-".join(map(str, self.dims))

    @property
    def width(self) -> int:
        return max(self.dims[1:-1], default=self.dims[0])

    def published_energy(self, z):
        return self.seq(z)  # summed over the batch before autograd.grad, as LEBM does

    def energy_fn(self, z):
        return self.energy(z)

    def gemm_shape(self, batch: int) -> tuple[int, int, int]:
        return batch, self.width, self.width


class LatentImageEnergy(nn.Module):
    """E(G(z)): the image energy summed over its last feature map, of the generated image; z (B, nz) -> (B,)."""

    def __init__(self, generator: nn.Module, image_energy: nn.Module):
        super().__init__()
        self.generator, self.image_energy = generator, image_energy

    def forward(self, z):
        return self.image_energy(self.generator(z)).sum((1, 2, 3))


class ConvModel:
    """A small latent generator and image energy, E(G(z)): G maps z (B, 16) through three ConvTranspose2d layers to
    1×16×16 images; the energy is three Conv2d layers and a sum over the last feature map."""

    kind = "conv"
    label = "G:16->1x16x16, E:conv+sum"

    def __init__(self, seed: int = 0, device="cpu", nz: int = 16):
        torch.manual_seed(seed)
        act = lambda: nn.LeakyReLU(0.2)
        self.generator = nn.Sequential(
            nn.Unflatten(1, (nz, 1, 1)),
            nn.ConvTranspose2d(nz, 64, 4, 1, 0), act(),  # 4×4
            nn.ConvTranspose2d(64, 32, 4, 2, 1), act(),  # 8×8
            nn.ConvTranspose2d(32, 1, 4, 2, 1), nn.Tanh(),  # 16×16
        ).to(device)
        self.image_energy = nn.Sequential(
            nn.Conv2d(1, 32, 4, 2, 1), act(),  # 8×8
            nn.Conv2d(32, 64, 4, 2, 1), act(),  # 4×4
            nn.Conv2d(64, 1, 3, 1, 1),  # 1×4×4, summed
        ).to(device)
        self.module = LatentImageEnergy(self.generator, self.image_energy)
        self.latent_shape = (nz,)
        example = torch.zeros(1, nz, device=device)
        self.macs = count_macs(self.generator, example) + count_macs(self.image_energy, self.generator(example))
        self.width = 64

    def published_energy(self, z):
        return self.module(z)

    def energy_fn(self, z):
        return self.module(z)

    def gemm_shape(self, batch: int) -> tuple[int, int, int]:
        return batch * 16, 32 * 16, 64  # im2col GEMM of the largest layer (Conv2d 32→64, 4×4 kernel, 4×4 out)


_MODELS: dict[tuple, object] = {}


def build_model(model: tuple, device):
    """The model named by ``("mlp", dims)`` or ``("conv",)`` on ``device``, built once per process."""
    key = model + (str(device),)
    if key not in _MODELS:
        _MODELS[key] = MLPModel(model[1], device=device) if model[0] == "mlp" else ConvModel(device=device)
    return _MODELS[key]
