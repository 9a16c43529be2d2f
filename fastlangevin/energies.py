"""Energies with known answers, for demos and tests. Convention: E low = likely, ``forward(z)`` → (B,)."""

from __future__ import annotations


import torch
from torch import nn

from fastlangevin.ops.mlp_chain import ACTIVATIONS


class GaussianMixtureEnergy(nn.Module):
    """E(z) = −log Σ_k w_k N(z; μ_k, std²·I), up to a constant. means: (K, D); weights: (K,) or None (uniform)."""

    def __init__(self, means: torch.Tensor, std: float, weights: torch.Tensor | None = None):
        super().__init__()
        if means.dim() != 2:
            raise ValueError(f"means must have shape (K, D), got {tuple(means.shape)}")
        if not std > 0:
            raise ValueError(f"std must be > 0, got {std}")
        k = means.shape[0]
        weights = torch.full((k,), 1.0 / k) if weights is None else weights
        self.register_buffer("means", means)
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))
        self.std = float(std)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        means = self.means.to(z.dtype)
        sq = (z.unsqueeze(1) - means.unsqueeze(0)).pow(2).sum(-1)  # (B, K)
        return -torch.logsumexp(self.log_weights.to(z.dtype) - sq / (2 * self.std ** 2), dim=1)


def grid_means(n_per_side: int = 5, spacing: float = 1.0) -> torch.Tensor:
    """Centres of an ``n × n`` grid of modes centred at 0, shape (n², 2)."""
    axis = (torch.arange(n_per_side, dtype=torch.float32) - (n_per_side - 1) / 2) * spacing
    return torch.cartesian_prod(axis, axis)



_ALIASES = {"swish": "silu", "lrelu": "leaky_relu"}
_DEFAULT_PARAM = {"leaky_relu": 0.2, "elu": 1.0}


def _activation_module(name: str, param: float) -> nn.Module:
    return {
        "relu": lambda: nn.ReLU(),
        "leaky_relu": lambda: nn.LeakyReLU(param),
        "silu": lambda: nn.SiLU(),
        "gelu": lambda: nn.GELU(),
        "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
        "elu": lambda: nn.ELU(param),
        "softplus": lambda: nn.Softplus(),
        "tanh": lambda: nn.Tanh(),
    }[name]()


class MLPEnergy(nn.Module):
    """An MLP energy on flattened latents: ``dims = (D, H1, …, Hn, 1)``, one activation between the layers.

    ``forward(z)``: z (B, *latent_shape) with ``prod(latent_shape) == D`` → (B,) energies ``output_sign · net(z)``.
    ``output_sign=-1`` adopts a network that outputs f = −E (the joint-EBM paper's convention).
    ``fl.langevin`` runs a chain of this energy as one fused kernel (weights loaded once, z kept on chip); its
    forward is ordinary autograd-compatible PyTorch, so the energy trains as usual.
    """

    def __init__(self, dims, activation: str = "leaky_relu", activation_param: float | None = None,
                 bias: bool = True, output_sign: float = 1.0):
        super().__init__()
        dims = tuple(int(d) for d in dims)
        if len(dims) < 2 or dims[-1] != 1 or any(d < 1 for d in dims):
            raise ValueError(f"dims must be (D, H1, ..., 1) with positive sizes and a last size of 1, got {dims}")
        activation = _ALIASES.get(activation, activation)
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation: unknown {activation!r}; choose one of {sorted(ACTIVATIONS)}")
        if output_sign not in (1.0, -1.0):
            raise ValueError(f"output_sign must be 1 or -1, got {output_sign}")
        self.dims = dims
        self.activation = activation
        self.activation_param = float(_DEFAULT_PARAM.get(activation, 0.0) if activation_param is None
                                      else activation_param)
        self.output_sign = float(output_sign)
        self.layers = nn.ModuleList(nn.Linear(i, o, bias=bias) for i, o in zip(dims[:-1], dims[1:]))
        self.act = _activation_module(activation, self.activation_param)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = z.reshape(z.shape[0], -1)
        if h.shape[1] != self.dims[0]:
            raise ValueError(f"MLPEnergy expects latents with {self.dims[0]} features, got z of shape "
                             f"{tuple(z.shape)}")
        for i, layer in enumerate(self.layers):
            h = layer(h)
            if i < len(self.layers) - 1:
                h = self.act(h)
        return self.output_sign * h.squeeze(1)

    def kernel_weights(self) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
        """(weight (out, in), bias (out,) or None) per layer, detached; for the fused kernels."""
        return [(layer.weight.detach(), None if layer.bias is None else layer.bias.detach())
                for layer in self.layers]

    @classmethod
    def from_sequential(cls, seq: nn.Sequential, output_sign: float = 1.0) -> "MLPEnergy":
        """Adopt ``Linear → act → … → Linear(·, 1)`` sharing its parameters (no copy, so training ``seq`` trains
        the adopted energy). A spectral-normalised Linear is adopted with its current normalised weight (a copy:
        re-adopt after updating). Raises ``ValueError`` naming a layer it cannot adopt and why."""
        modules = [m for m in seq if not isinstance(m, (nn.Identity, nn.Flatten))]
        linears, acts = modules[0::2], modules[1::2]
        for i, m in enumerate(linears):
            if not isinstance(m, nn.Linear):
                raise ValueError(f"layer {i * 2} ({type(m).__name__}): expected nn.Linear at even positions of "
                                 f"Linear, activation, Linear, ...")
        if len(linears) != len(acts) + 1:
            raise ValueError("the Sequential must end with nn.Linear(·, 1) after its last activation")
        if acts and len({(type(a), _activation_of(a)) for a in acts}) > 1:
            raise ValueError("all activations must be the same, with the same parameters, for the fused kernel")
        name, param = ("relu", 0.0) if not acts else _activation_of(acts[0])
        dims = [linears[0].in_features] + [m.out_features for m in linears]
        energy = cls(dims, name, param, bias=linears[0].bias is not None, output_sign=output_sign)
        for i, (src, dst) in enumerate(zip(linears, energy.layers)):
            if (src.bias is None) != (dst.bias is None):
                raise ValueError(f"layer {2 * i}: all Linear layers must either have biases or not")
            if hasattr(src, "parametrizations") and "weight" in src.parametrizations:
                dst.weight = nn.Parameter(src.weight.detach().clone(), requires_grad=False)
            elif hasattr(src, "weight_orig"):  # torch.nn.utils.spectral_norm (the hook form)
                dst.weight = nn.Parameter(src.weight.detach().clone(), requires_grad=False)
            else:
                dst.weight = src.weight
            if src.bias is not None:
                dst.bias = src.bias
        return energy


def _activation_of(module: nn.Module) -> tuple[str, float]:
    if isinstance(module, nn.ReLU):
        return "relu", 0.0
    if isinstance(module, nn.LeakyReLU):
        return "leaky_relu", float(module.negative_slope)
    if isinstance(module, nn.SiLU):
        return "silu", 0.0
    if isinstance(module, nn.GELU):
        return ("gelu_tanh" if module.approximate == "tanh" else "gelu"), 0.0
    if isinstance(module, nn.ELU):
        return "elu", float(module.alpha)
    if isinstance(module, nn.Softplus):
        if module.beta != 1 or module.threshold != 20:
            raise ValueError(f"Softplus with beta={module.beta}, threshold={module.threshold}: the fused kernel "
                             f"supports beta=1, threshold=20")
        return "softplus", 0.0
    if isinstance(module, nn.Tanh):
        return "tanh", 0.0
    raise ValueError(f"activation {type(module).__name__} is not supported by the fused kernel; supported: "
                     f"ReLU, LeakyReLU, SiLU, GELU, ELU, Softplus, Tanh")
