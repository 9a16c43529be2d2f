"""Energies and the networks they are built from. Convention: E low = likely, ``forward(z)`` → (B,).

* ``MLP``: a fully connected network with one activation per layer (identity = none), e.g. a decoder;
  ``MLPEnergy``: an MLP D → 1 read as an energy. ``fl.langevin`` runs a chain of an ``MLPEnergy`` as one fused
  kernel; a composition E(G(z)) of MLPs is one deeper ``MLPEnergy`` (``MLPEnergy.from_sequential``).
* ``GaussianPosteriorEnergy``: E(z) + ‖x − G(z)‖²/(2σ²) with the data x a buffer refreshed in place, the
  posterior of a latent-variable model with a Gaussian likelihood; fused when E and G are MLPs.
* ``GaussianMixtureEnergy``: a target with known answers, for demos and tests.

``ACTIVATIONS`` is the one table of activations on the module side: name → kernel code (``ops.codes``), the torch
module, and how to read the parameter back from a module.
"""

from __future__ import annotations

import math
import numbers
from typing import Callable, NamedTuple

import torch
from torch import nn
from torch.nn.utils import parametrize

from fastlangevin.ops import codes
from fastlangevin.ops.langevin_step import check_int, check_real
from fastlangevin.ops.mlp_chain import MLPNetwork


class Activation(NamedTuple):
    """One activation: its kernel code, its torch module, and how to build one and read one back."""

    code: int
    module_type: type
    build: Callable[[float], nn.Module]  # parameter → module
    read: Callable[[nn.Module], float | None]  # module → parameter; None: another entry describes this module
    default_param: float = 0.0


def _softplus_param(module: nn.Softplus) -> float:
    if module.beta != 1 or module.threshold != 20:
        raise ValueError(f"Softplus with beta={module.beta}, threshold={module.threshold}: the fused kernels support "
                         f"beta=1, threshold=20")
    return 0.0


ACTIVATIONS: dict[str, Activation] = {
    "relu": Activation(codes.RELU, nn.ReLU, lambda p: nn.ReLU(), lambda m: 0.0),
    "leaky_relu": Activation(codes.LEAKY_RELU, nn.LeakyReLU, nn.LeakyReLU, lambda m: float(m.negative_slope), 0.2),
    "silu": Activation(codes.SILU, nn.SiLU, lambda p: nn.SiLU(), lambda m: 0.0),
    "gelu": Activation(codes.GELU, nn.GELU, lambda p: nn.GELU(),
                       lambda m: 0.0 if m.approximate == "none" else None),
    "gelu_tanh": Activation(codes.GELU_TANH, nn.GELU, lambda p: nn.GELU(approximate="tanh"),
                            lambda m: 0.0 if m.approximate == "tanh" else None),
    "elu": Activation(codes.ELU, nn.ELU, nn.ELU, lambda m: float(m.alpha), 1.0),
    "softplus": Activation(codes.SOFTPLUS, nn.Softplus, lambda p: nn.Softplus(), _softplus_param),
    "tanh": Activation(codes.TANH, nn.Tanh, lambda p: nn.Tanh(), lambda m: 0.0),
    "identity": Activation(codes.IDENTITY, nn.Identity, lambda p: nn.Identity(), lambda m: 0.0),
    "sigmoid": Activation(codes.SIGMOID, nn.Sigmoid, lambda p: nn.Sigmoid(), lambda m: 0.0),
}
ALIASES = {"swish": "silu", "lrelu": "leaky_relu", "linear": "identity", "none": "identity"}


def activation_of(module: nn.Module) -> tuple[str, float]:
    """(name, parameter) of a supported activation module; ``ValueError`` saying why for any other module."""
    for name, entry in ACTIVATIONS.items():
        if type(module) is entry.module_type:
            param = entry.read(module)
            if param is not None:
                return name, param
    supported = sorted({e.module_type.__name__ for e in ACTIVATIONS.values()})
    raise ValueError(f"{type(module).__name__} is not supported by the fused kernels; supported activations: "
                     f"{', '.join(supported)}")


def _parse_activation(spec, where: str) -> tuple[str, float]:
    """A name, a (name, parameter) pair or a supported module → (name, parameter)."""
    if isinstance(spec, nn.Module):
        return activation_of(spec)
    name, param = spec if isinstance(spec, tuple) and len(spec) == 2 else (spec, None)
    if not isinstance(name, str):
        raise TypeError(f"{where}: an activation is a name of {sorted(ACTIVATIONS)}, a (name, parameter) pair or "
                        f"one of their nn modules, got {type(spec).__name__} {spec!r}")
    name = ALIASES.get(name, name)
    if name not in ACTIVATIONS:
        raise ValueError(f"{where}: unknown activation {spec!r}; choose one of {sorted(ACTIVATIONS)}, a (name, "
                         f"parameter) pair or one of their nn modules")
    if param is None:
        return name, float(ACTIVATIONS[name].default_param)
    return name, check_real(f"{where} parameter", param, "a finite real number")


def _check_dims(dims, what: str = "(d_0, ..., d_L) with L >= 1 layers") -> tuple[int, ...]:
    """``dims`` as a tuple of ints >= 1 (Python or NumPy integers, never bools or floats), at least two."""
    try:
        dims = tuple(dims)
    except TypeError:
        raise TypeError(f"dims must be a sequence of ints {what}, got {type(dims).__name__}") from None
    if any(isinstance(d, bool) or not isinstance(d, numbers.Integral) for d in dims):
        raise TypeError(f"dims must be ints {what}, got {dims!r}")
    dims = tuple(int(d) for d in dims)
    if len(dims) < 2 or any(d < 1 for d in dims):
        raise ValueError(f"dims must be {what} and positive sizes, got {dims}")
    return dims


def _check_network_input(network: "MLP", x: torch.Tensor, what: str, mixed: bool = False) -> None:
    """What a network's forward takes: x (B, *shape) with ``dims[0]`` features, of its parameters' dtype (or, in a
    ``mixed``-precision chain, float32 x and bfloat16 parameters) and on their device (``ValueError``/``TypeError``
    naming ``what``)."""
    if x.dim() < 1 or math.prod(x.shape[1:]) != network.dims[0]:
        raise ValueError(f"{what} ({type(network).__name__}) expects inputs with {network.dims[0]} features per "
                         f"sample, got shape {tuple(x.shape)}")
    for name, p in network.named_parameters():
        if p.dtype != (torch.bfloat16 if mixed else x.dtype):
            raise TypeError(f"{what}: parameter {name} is {p.dtype} but its input is {x.dtype}; make them the same "
                            f"dtype (module.to({x.dtype}) or z.to({p.dtype}))")
        if p.device != x.device:
            raise ValueError(f"{what}: parameter {name} is on {p.device} but its input is on {x.device}; move one "
                             f"of them (module.to(z.device))")


def check_latents(energy, z: torch.Tensor) -> None:
    """The one rule for what fastlangevin's own energies take (``MLP``/``MLPEnergy``, ``GaussianPosteriorEnergy``,
    ``GaussianMixtureEnergy``): z's features, dtype and device must fit their networks and data. ``fl.langevin``
    applies it before it picks a path, so such a call fails alike on the fused chain, the step-op chain and with
    ``create_graph`` or a callable prior; any other callable is held to what it returns. Raises
    ``TypeError``/``ValueError`` naming the energy."""
    if isinstance(energy, MLP):
        _check_network_input(energy, z, "energy", mixed_precision(energy, z))
    elif isinstance(energy, (GaussianPosteriorEnergy, GaussianMixtureEnergy)):
        energy.check_latents(z)
    elif callable(getattr(energy, "fused_energy", None)):  # held to the form the fused chain would run
        fused = energy.fused_energy()
        if isinstance(fused, (MLP, GaussianPosteriorEnergy)):
            check_latents(fused, z)


def mixed_precision(energy, z: torch.Tensor) -> bool:
    """Whether ``energy`` (a module, or a sequence of modules and callables) holds a mixed-precision chain's
    parameters for z: z float32 and every parameter bfloat16. (The other mixed case, float32 parameters under
    ``torch.autocast``, has matching dtypes; ``fl.langevin`` adds it.)"""
    modules = [energy] if isinstance(energy, nn.Module) else energy
    params = [p for m in modules if isinstance(m, nn.Module) for p in m.parameters()]
    return z.dtype == torch.float32 and bool(params) and all(p.dtype == torch.bfloat16 for p in params)


def _kernel_weight(linear: nn.Linear) -> torch.Tensor:
    """The weight the layer's forward uses, detached, without side effects: a parametrised weight (e.g.
    ``spectral_norm``) is evaluated with its parametrisations in eval mode, so no power iteration runs."""
    if not parametrize.is_parametrized(linear, "weight"):
        return linear.weight.detach()
    steps = list(linear.parametrizations.weight)
    modes = [p.training for p in steps]
    try:
        for p in steps:
            p.train(False)
        with torch.no_grad():
            return linear.weight.detach()
    finally:
        for p, mode in zip(steps, modes):
            p.train(mode)


class MLP(nn.Module):
    """A fully connected network ``dims[0] → … → dims[-1]`` with one activation after every layer.

    activation: the hidden layers' activation — a name of ``ACTIVATIONS`` ("leaky_relu", "gelu", "identity", …),
        a ``(name, parameter)`` pair, a supported module (``nn.LeakyReLU(0.1)``), or a list of these, one per hidden
        layer (``len(dims) − 2``). "identity" is a linear layer (a bottleneck); leaky ReLU's slope defaults to 0.2.
    output_activation: after the last layer; "identity" (default) for none, e.g. "sigmoid" for means in (0, 1).
    ``forward(x)``: x (B, *shape) with ``prod(shape) == dims[0]`` → (B, dims[-1]).
    ``activations``/``activation_params``: the per-layer names and parameters (the output activation last).
    """

    def __init__(self, dims, activation="leaky_relu", output_activation="identity", *, bias: bool = True):
        super().__init__()
        dims = _check_dims(dims)
        if isinstance(activation, list):
            if len(activation) != len(dims) - 2:
                raise ValueError(f"activation: a list needs one entry per hidden layer ({len(dims) - 2} for dims "
                                 f"{dims}), got {len(activation)}")
            specs = [_parse_activation(a, f"activation[{i}]") for i, a in enumerate(activation)]
        else:  # checked even where no hidden layer uses it
            specs = [_parse_activation(activation, "activation")] * (len(dims) - 2)
        specs.append(_parse_activation(output_activation, "output_activation"))
        self._setup(dims, specs, [nn.Linear(i, o, bias=bias) for i, o in zip(dims[:-1], dims[1:])])

    def _setup(self, dims, specs, linears) -> None:
        self.dims = tuple(dims)
        self.activations = tuple(name for name, _ in specs)
        self.activation_params = tuple(param for _, param in specs)
        self.layers = nn.ModuleList(linears)
        # parameter-free modules: the state dict holds the layers only
        self.acts = nn.ModuleList(ACTIVATIONS[name].build(param) for name, param in specs)

    @classmethod
    def _from_parts(cls, dims, specs, linears, **attributes):
        network = cls.__new__(cls)
        nn.Module.__init__(network)
        network._setup(dims, specs, linears)
        for name, value in attributes.items():
            setattr(network, name, value)
        return network

    def _check_input(self, x: torch.Tensor) -> torch.Tensor:
        h = x.reshape(x.shape[0], -1)
        if h.shape[1] != self.dims[0]:
            raise ValueError(f"{type(self).__name__} expects inputs with {self.dims[0]} features, got shape "
                             f"{tuple(x.shape)}")
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self._check_input(x)
        for layer, act in zip(self.layers, self.acts):
            h = act(layer(h))
        return h

    def kernel_network(self, dtype: torch.dtype, device) -> MLPNetwork:
        """The network as the fused kernels take it: detached weights (and biases, zeros for a layer without one)
        in ``dtype`` on ``device``, activation codes and parameters."""
        weights = [_kernel_weight(layer).to(device=device, dtype=dtype).contiguous() for layer in self.layers]
        biases = []
        if any(layer.bias is not None for layer in self.layers):
            biases = [torch.zeros(layer.out_features, dtype=dtype, device=device) if layer.bias is None else
                      layer.bias.detach().to(device=device, dtype=dtype).contiguous() for layer in self.layers]
        return MLPNetwork(weights, biases, [codes.ACTIVATIONS[name] for name in self.activations],
                          list(self.activation_params))

    @classmethod
    def from_sequential(cls, seq: nn.Module) -> "MLP":
        """Adopt an ``nn.Sequential`` of ``nn.Linear`` layers and supported activations, sharing its layers (no
        copy: training ``seq`` trains the adopted network, and frozen layers stay frozen).

        Nested ``nn.Sequential``s and ``fl.MLP``s are flattened and ``nn.Identity``/``nn.Flatten`` skipped; two
        Linear layers in a row have the identity between them, so ``nn.Sequential(decoder, energy_net)`` is one
        network. A
        parametrised weight (``spectral_norm``) is read as its forward computes it. Raises ``ValueError`` naming
        a layer it cannot adopt and why.
        """
        dims, specs, linears, sign = _parse_sequential(seq)
        if sign is not None:
            raise ValueError("the Sequential ends with an fl.MLPEnergy, whose output is an energy, not features: adopt "
                             "it with fl.MLPEnergy.from_sequential")
        return cls._from_parts(dims, specs, linears)

    def extra_repr(self) -> str:
        acts = ", ".join(n if n not in ("leaky_relu", "elu") else f"{n}({p:g})"
                         for n, p in zip(self.activations, self.activation_params))
        return f"dims={self.dims}, activations=({acts})"


def _modules_in_order(module: nn.Module, prefix: str = ""):
    """(path, module, owner) of the layers of a Sequential: nested Sequentials and ``fl.MLP``s flattened (owner: the
    ``fl.MLP`` a layer belongs to, else None), Identity and Flatten skipped."""
    for name, child in module.named_children():
        path = f"{prefix}{name}"
        if isinstance(child, nn.Sequential):
            yield from _modules_in_order(child, path + ".")
        elif isinstance(child, MLP):
            for i, (layer, act) in enumerate(zip(child.layers, child.acts)):
                yield f"{path}.layers.{i}", layer, child
                if not isinstance(act, nn.Identity):
                    yield f"{path}.acts.{i}", act, child
        elif not isinstance(child, (nn.Identity, nn.Flatten)):
            yield path, child, None


def _parse_sequential(seq: nn.Module):
    """(dims, [(activation, parameter)] per layer, [nn.Linear], sign) of a Sequential of Linear layers and
    activations; sign: the ``output_sign`` of an ``fl.MLPEnergy`` nested last, None without one."""
    if not isinstance(seq, nn.Sequential):
        raise TypeError(f"from_sequential takes an nn.Sequential, got {type(seq).__name__}")
    linears, specs, pending = [], [], None  # pending: the activation of the last Linear, once seen
    energy = None  # (path, MLPEnergy) once a nested energy's layers begin: nothing may follow it
    for path, module, owner in _modules_in_order(seq):
        where = f"layer {path} ({type(module).__name__})"
        if energy is not None and owner is not energy[1]:
            raise ValueError(f"{where} follows the fl.MLPEnergy {energy[0]}, whose output is the energy (B,); an "
                             f"MLPEnergy can only come last")
        if isinstance(owner, MLPEnergy) and energy is None:
            energy = (path.rsplit(".layers.", 1)[0], owner)
        if isinstance(module, nn.Linear):
            if linears and module.in_features != linears[-1].out_features:
                raise ValueError(f"{where}: takes {module.in_features} features but the layer before gives "
                                 f"{linears[-1].out_features}")
            if linears:
                specs.append(pending or ("identity", 0.0))
            linears.append(module)
            pending = None
            continue
        try:
            spec = activation_of(module)
        except ValueError as error:
            raise ValueError(f"{where} cannot be fused: only nn.Linear layers and activations can ({error})") from None
        if not linears or pending is not None:
            raise ValueError(f"{where}: an activation must follow an nn.Linear (the fused kernels apply one "
                             f"activation per layer)")
        pending = spec
    if not linears:
        raise ValueError("the Sequential holds no nn.Linear layer")
    specs.append(pending or ("identity", 0.0))
    dims = [linears[0].in_features] + [m.out_features for m in linears]
    return dims, specs, linears, None if energy is None else energy[1].output_sign


class MLPEnergy(MLP):
    """An MLP energy on flattened latents: ``dims = (D, H1, …, Hn, 1)``, an activation after each hidden layer.

    ``forward(z)``: z (B, *latent_shape) with ``prod(latent_shape) == D`` → (B,) energies ``output_sign · net(z)``.
    ``activation``, as ``MLP``'s: one for every hidden layer or a list, one per hidden layer ("identity" for a
    linear bottleneck); ``activation_param`` sets the parameter of a single named one (leaky ReLU's slope, default
    0.2; ELU's alpha). ``output_sign=-1`` adopts a network that outputs f = −E (the joint-EBM paper's convention).
    ``fl.langevin`` runs a chain of this energy as one fused kernel (weights loaded once, z kept on chip); its
    forward is ordinary autograd-compatible PyTorch, so the energy trains as usual.
    """

    def __init__(self, dims, activation="leaky_relu", activation_param: float | None = None, bias: bool = True,
                 output_sign: float = 1.0):
        dims = _check_dims(dims, "(D, H1, ..., 1)")
        if dims[-1] != 1:
            raise ValueError(f"dims must be (D, H1, ..., 1) with a last size of 1 (one energy per sample), got {dims}")
        if activation_param is not None:
            if not isinstance(activation, str):
                raise ValueError("activation_param goes with a single activation name; pass (name, parameter) "
                                 "pairs in a list instead")
            activation = (activation, activation_param)
        super().__init__(dims, activation, "identity", bias=bias)
        self.output_sign = _check_sign(output_sign)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.output_sign * super().forward(z).squeeze(1)

    @classmethod
    def from_sequential(cls, seq: nn.Module, output_sign: float = 1.0) -> "MLPEnergy":
        """Adopt ``Linear → act → … → Linear(·, 1)`` as ``MLP.from_sequential`` does (shared layers, nested
        Sequentials flattened, two Linears in a row = identity between them), e.g.
        ``MLPEnergy.from_sequential(nn.Sequential(vae.decoder, energy_net))`` for E(G(z)). The last layer must be
        ``nn.Linear(·, 1)`` with no activation after it; ``energy_net`` may itself be an ``MLPEnergy`` (then last:
        the result's sign is ``output_sign`` times its own)."""
        dims, specs, linears, sign = _parse_sequential(seq)
        if dims[-1] != 1:
            raise ValueError(f"an energy's last nn.Linear must have one output, got {dims[-1]} (dims {tuple(dims)})")
        if specs[-1][0] != "identity":
            raise ValueError(f"the Sequential must end with nn.Linear(·, 1) (its output is the energy); it ends with "
                             f"an activation ({specs[-1][0]})")
        return cls._from_parts(dims, specs, linears, output_sign=_check_sign(output_sign) * (sign or 1.0))


def _check_sign(output_sign) -> float:
    if isinstance(output_sign, bool) or not isinstance(output_sign, numbers.Real) or output_sign not in (1.0, -1.0):
        raise ValueError(f"output_sign must be 1 or -1, got {output_sign!r}")
    return float(output_sign)


class GaussianPosteriorEnergy(nn.Module):
    """The posterior energy of a latent-variable model with a Gaussian likelihood, for one batch of data x:

        forward(z) = energy(z) + ‖x_b − generator(z[:, :Dg])‖² / (2σ²)     → (B,)

    energy: the latent energy (the prior's −log density, e.g. an ``MLPEnergy``); generator: z[:, :Dg] → (B, *data)
    (e.g. an ``MLP``; Dg = ``generator_inputs``, default its ``dims[0]`` for an ``MLP``, else all of z: then the
    generator gets z as it is); sigma: σ > 0 of p(x|z) = N(G(z), σ²I).

    The data: ``set_target(x)`` before each chain copies x, flattened to (B, P), into a buffer kept per batch size
    B (``target_for(B)``; ``target`` is the last one set). Built once per training run, this module is the same
    object every iteration and its buffers stay where they are, so a CUDA graph captured for B samples replays
    with each new batch (a last, smaller batch gets its own buffer instead of replacing the first). With an
    ``MLPEnergy`` and an ``MLP`` generator ``fl.langevin`` runs the chain as one fused kernel.
    """

    def __init__(self, energy: nn.Module, generator: nn.Module, sigma: float, *, generator_inputs: int | None = None):
        super().__init__()
        for name, part in (("energy", energy), ("generator", generator)):
            if not callable(part):
                raise TypeError(f"{name} must be callable (an nn.Module or a function), got {type(part).__name__}")
        sigma = check_real("sigma", sigma, "a finite real number > 0", low=0, strict=True)
        if generator_inputs is None and isinstance(generator, MLP):
            generator_inputs = generator.dims[0]
        if generator_inputs is not None:
            generator_inputs = check_int("generator_inputs", generator_inputs, 1)
        self.energy, self.generator = energy, generator
        self.sigma = sigma
        self.generator_inputs = generator_inputs
        self._last_batch = None

    @property
    def likelihood_scale(self) -> float:
        """1/(2σ²), the weight of the squared error."""
        return 1.0 / (2.0 * self.sigma ** 2)

    @torch.no_grad()
    def set_target(self, x: torch.Tensor) -> "GaussianPosteriorEnergy":
        """Use the data x (B, *data_shape) for the next chains of B samples: copied, flattened to (B, P), into the
        buffer of batch size B (made on first use, or when P, dtype or device change). Returns self."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a tensor of shape (B, *data_shape), got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        if x.dim() < 1 or x.shape[0] < 1:
            raise ValueError(f"x must be a tensor of shape (B, *data_shape) with B >= 1, got {tuple(x.shape)}")
        if x.device.type != "meta" and not bool(torch.isfinite(x).all()):
            raise ValueError("x has non-finite entries")
        x = x.detach().reshape(x.shape[0], -1)
        name = f"target_{x.shape[0]}"
        held = getattr(self, name, None)
        if held is None or held.shape != x.shape or held.dtype != x.dtype or held.device != x.device:
            self.register_buffer(name, torch.empty_like(x, memory_format=torch.contiguous_format), persistent=False)
        getattr(self, name).copy_(x)
        self._last_batch = x.shape[0]
        return self

    def unread_by_chain(self, batch: int) -> set[str]:
        """What a chain of ``batch`` samples does not read (the other batch sizes' data): a CUDA graph's key leaves
        it out (``fastlangevin.graphs``)."""
        return {name for name in self._buffers if name.startswith("target_") and name != f"target_{batch}"} | \
            {"_last_batch"}

    def target_for(self, batch: int) -> torch.Tensor:
        """The data (batch, P) of the chains of ``batch`` samples."""
        held = getattr(self, f"target_{batch}", None)
        if held is None:
            raise ValueError(f"no data for chains of {batch} samples: call set_target(x) with a batch of {batch} "
                             f"first")
        return held

    @property
    def target(self) -> torch.Tensor:
        """The data last given to ``set_target``, (B, P)."""
        if self._last_batch is None:
            raise ValueError("no data yet: call set_target(x) first")
        return self.target_for(self._last_batch)

    def generate(self, z: torch.Tensor) -> torch.Tensor:
        """generator(z[:, :Dg]) flattened: (B, P)."""
        if self.generator_inputs is None:
            return self.generator(z).reshape(z.shape[0], -1)
        flat = z.reshape(z.shape[0], -1)
        if flat.shape[1] < self.generator_inputs:
            raise ValueError(f"the generator reads the first {self.generator_inputs} latent features, got z of shape "
                             f"{tuple(z.shape)}")
        return self.generator(flat[:, :self.generator_inputs]).reshape(z.shape[0], -1)

    def check_latents(self, z: torch.Tensor) -> None:
        """Whether chains of z fit this posterior (see ``fastlangevin.energies.check_latents``): data for z's batch
        size on z's device, and MLP parts (energy, generator) that take z's features, dtype and device."""
        try:
            target = self.target_for(z.shape[0])
        except ValueError as error:
            raise ValueError(f"energy: {error}") from None
        if target.device != z.device:
            raise ValueError(f"energy: the posterior's data is on {target.device} but z is on {z.device}; call "
                             f"set_target with data on z's device")
        mixed = mixed_precision(self, z)
        if isinstance(self.energy, MLP):
            _check_network_input(self.energy, z, "energy.energy", mixed)
        if self.generator_inputs is not None:
            flat = z.reshape(z.shape[0], -1)
            if flat.shape[1] < self.generator_inputs:
                raise ValueError(f"energy: the generator reads the first {self.generator_inputs} latent features, "
                                 f"got z of shape {tuple(z.shape)}")
            if isinstance(self.generator, MLP):
                _check_network_input(self.generator, flat[:, :self.generator_inputs], "energy.generator", mixed)
        if isinstance(self.generator, MLP) and target.shape[1] != self.generator.dims[-1]:
            raise ValueError(f"energy: the generator makes {self.generator.dims[-1]} values per sample but the data "
                             f"set by set_target has {target.shape[1]}")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        target = self.target_for(z.shape[0])
        squared_error = (target.to(z.dtype) - self.generate(z)).pow(2).sum(1)
        return self.energy(z) + self.likelihood_scale * squared_error

    def extra_repr(self) -> str:
        return f"sigma={self.sigma:g}, generator_inputs={self.generator_inputs}"


class GaussianMixtureEnergy(nn.Module):
    """E(z) = −log Σ_k w_k N(z; μ_k, std²·I), up to a constant. means: (K, D); weights: (K,) or None (uniform)."""

    def __init__(self, means: torch.Tensor, std: float, weights: torch.Tensor | None = None):
        super().__init__()
        if not isinstance(means, torch.Tensor) or not means.is_floating_point():
            raise TypeError(f"means must be a floating-point tensor of shape (K, D), got "
                            f"{getattr(means, 'dtype', type(means).__name__)}")
        if means.dim() != 2 or means.numel() == 0:
            raise ValueError(f"means must have shape (K, D) with K, D >= 1, got {tuple(means.shape)}")
        if not bool(torch.isfinite(means).all()):
            raise ValueError("means has non-finite entries")
        std = check_real("std", std, "a finite real number > 0", low=0, strict=True)
        k = means.shape[0]
        weights = torch.full((k,), 1.0 / k) if weights is None else weights
        if not isinstance(weights, torch.Tensor) or not weights.is_floating_point() or weights.shape != (k,) \
                or not bool(torch.isfinite(weights).all()) or bool((weights < 0).any()) or not weights.sum() > 0:
            raise ValueError(f"weights must be None or a float tensor of shape ({k},) with finite entries >= 0 and a "
                             f"positive sum, got {weights!r}")
        self.register_buffer("means", means)
        self.register_buffer("log_weights", torch.log(weights / weights.sum()))
        self.std = std

    def check_latents(self, z: torch.Tensor) -> None:
        """z (B, D): D must be the means' (a wrong D used to broadcast into an error about tensor sizes)."""
        if z.dim() != 2 or z.shape[1] != self.means.shape[1]:
            raise ValueError(f"energy: GaussianMixtureEnergy expects z of shape (B, {self.means.shape[1]}), got "
                             f"{tuple(z.shape)}")

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        self.check_latents(z)
        means = self.means.to(z.dtype)
        sq = (z.unsqueeze(1) - means.unsqueeze(0)).pow(2).sum(-1)  # (B, K)
        return -torch.logsumexp(self.log_weights.to(z.dtype) - sq / (2 * self.std ** 2), dim=1)


def grid_means(n_per_side: int = 5, spacing: float = 1.0) -> torch.Tensor:
    """Centres of an ``n × n`` grid of modes centred at 0, shape (n², 2)."""
    axis = (torch.arange(n_per_side, dtype=torch.float32) - (n_per_side - 1) / 2) * spacing
    return torch.cartesian_prod(axis, axis)


class FusedTerms(NamedTuple):
    """An energy as the fused chain computes it: ``output_sign · energy(z)`` plus, with a generator,
    ``likelihood_scale · ‖target − generator(z[:, :Dg])‖²``."""

    energy: MLPEnergy
    generator: MLP | None = None
    target: torch.Tensor | None = None
    likelihood_scale: float = 0.0


def fused_terms(energy, batch: int | None = None) -> FusedTerms | str | None:
    """The fused chain's terms for ``energy`` and chains of ``batch`` samples (default: the posterior's last data);
    a string saying why not for a kind of energy it runs when the parts do not fit; None for any other energy (it
    runs step by step, as every callable may) or a posterior without data for ``batch`` (its forward says so).

    Any energy can take part: a method ``fused_energy()`` returns the ``MLPEnergy`` or ``GaussianPosteriorEnergy``
    it equals (sharing its parameters; e.g. a trainer's E(G(z)) module with MLP networks), or a sentence saying why
    it has none (e.g. "its generator is a conv net"), which ``fl.langevin`` logs and ``fl.backend_info()`` shows."""
    if not isinstance(energy, (MLPEnergy, GaussianPosteriorEnergy)) and callable(getattr(energy, "fused_energy",
                                                                                           None)):
        energy = energy.fused_energy()
        if isinstance(energy, str):
            return energy
    if isinstance(energy, MLPEnergy):
        return FusedTerms(energy)
    if isinstance(energy, GaussianPosteriorEnergy):
        try:
            target = energy.target if batch is None else energy.target_for(batch)
        except ValueError:
            return None
        if not isinstance(energy.energy, MLPEnergy):
            return f"its energy is a {type(energy.energy).__name__}, not an fl.MLPEnergy"
        if not isinstance(energy.generator, MLP) or isinstance(energy.generator, MLPEnergy):
            return f"its generator is a {type(energy.generator).__name__}, not an fl.MLP"
        if energy.generator_inputs != energy.generator.dims[0]:
            return "its generator_inputs differ from the generator's input width"
        return FusedTerms(energy.energy, energy.generator, target, energy.likelihood_scale)
    return None
