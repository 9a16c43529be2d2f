"""FLOP counts of a Langevin chain: 4·MACs per sample per step (the forward and the input gradient of each layer)."""

from __future__ import annotations

import math

import torch
from torch import nn

FLOP_COUNT = "4*MACs per sample per step (forward + input gradient of each layer)"


def count_macs(module: nn.Module, example: torch.Tensor) -> int:
    """Multiply-accumulates of one forward pass for ONE sample, over Linear, Conv2d and ConvTranspose2d layers."""
    total = 0

    def hook(m, inputs, output):
        nonlocal total
        if isinstance(m, nn.Linear):
            total += m.in_features * m.out_features * (output.numel() // output.shape[-1])
        elif isinstance(m, nn.Conv2d):
            total += output.numel() * (m.in_channels // m.groups) * math.prod(m.kernel_size)
        elif isinstance(m, nn.ConvTranspose2d):  # each input element scatters into C_out·k·k outputs
            total += inputs[0].numel() * (m.out_channels // m.groups) * math.prod(m.kernel_size)

    handles = [m.register_forward_hook(hook) for m in module.modules()
               if isinstance(m, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d))]
    try:
        with torch.no_grad():
            module(example[:1])
    finally:
        for h in handles:
            h.remove()
    return total


def chain_flop(macs_per_sample: int, batch: int, n_steps: int) -> int:
    """FLOPs of a K-step chain of B samples: 4·MACs (forward 2·MACs, input gradient 2·MACs) per sample per step."""
    return 4 * macs_per_sample * batch * n_steps
