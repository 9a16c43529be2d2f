"""CUDA-graph-captured chains: the K steps (energy forward, autograd gradient, fused step op) are captured once per
configuration into one CUDA graph and replayed.

A replay re-runs the captured kernels on the memory they captured, with the Python values (shapes, scalars, the
branches taken) frozen at capture. So a graph is replayed only when its key says that everything it read is still
where, and what, it was:

* **The key is built from what the chain reads, never from** ``id()``. An ``nn.Module`` energy is keyed on its type,
  train/eval flags, the storage (address, dtype, shape, strides) of every parameter, buffer and tensor attribute, and
  the value of every plain attribute, over all submodules; a function on its code, the objects its closure holds,
  its defaults and the globals it names; the prior likewise. Objects that can only be compared by identity are
  held by the key (so their ``id`` cannot be reused while the graph lives). A freed energy replaced by a new one at
  the same address therefore replays the old graph only if the new one reads the same memory and values, which is
  exactly when that graph is right; a module rebuilt every call around the same parameters reuses one graph.
  A module that holds state per batch size (a posterior energy's data, one buffer per B) names what a chain of B
  samples does not read with ``unread_by_chain(B) -> set of attribute names``; the key leaves those out, so the
  evaluation chain's new buffer does not invalidate the training chain's graph.
* Parameters are read in place, so an optimiser step is seen by the next replay; a parameter replaced by a new
  tensor (or a changed Python attribute, or train/eval) changes the key and captures a new graph.
* **Which energies are graphed by default** (``cuda_graph=None``, CUDA tensors, no ``create_graph``): an
  ``nn.Module`` (or a bound method of one), whose state the key sees. A plain function can read globals or objects
  whose attributes change between calls, which no key can see completely, so it runs the eager chain (said once:
  log and ``fl.backend_info()``); ``cuda_graph=True`` graphs it anyway, keyed as above.
* **Repeated captures stop.** When a configuration (energy type or code, shapes, settings) is captured again and
  again without its graphs ever being replayed — the energy is rebuilt around new tensors every call, a parameter
  is replaced instead of updated in place, an attribute changes each call — capturing stops for it after
  ``REPEATED_CAPTURE_LIMIT`` captures, with one warning naming what changed; it runs the eager chain from then on.
* Fresh noise on every replay: the chain's seed and step counter live in a device tensor written before the replay
  and advanced inside the graph (a seed passed as a kernel scalar would be frozen at capture).
* Inputs are copied into the graph's static buffers and outputs cloned out: no caller sees memory a replay reuses.
* The cache is bounded (LRU, ``MAX_GRAPHS``). A capture that fails (an energy that syncs, allocates on the host or
  branches on data) falls back to the eager chain with one warning naming the cause.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import numbers
import threading
import types
import weakref

import torch
from torch import nn

from fastlangevin.backends import note_fallback

MAX_GRAPHS = 16
WARMUP_RUNS = 2
REPEATED_CAPTURE_LIMIT = 3  # captures of one configuration, never replayed, before capturing it stops
CAPTURE_DEVICE_TYPES = ("cuda",)  # devices whose chains can be captured (tests add "cpu" with a stand-in graph)
_MAX_DEPTH = 4  # how deep the key follows plain objects, closures and globals (modules: always to the bottom)
_MAX_ITEMS = 256  # longer containers are keyed by identity
_MAX_SITES = 256


# ------------------------------------------------------------------------------------------------ the state key

class _Same:
    """An object compared by identity, held so that its ``id`` cannot be reused while a key refers to it."""

    __slots__ = ("obj",)

    def __init__(self, obj):
        self.obj = obj

    def __hash__(self):
        return id(self.obj)

    def __eq__(self, other):
        return isinstance(other, _Same) and other.obj is self.obj

    def __repr__(self):
        return f"the {type(self.obj).__name__} object at {id(self.obj):#x}"


_SCALARS = (type(None), bool, int, str, bytes, torch.dtype, torch.device, torch.layout, torch.memory_format)
# torch.nn.Module bookkeeping that a forward does not read (hooks run at backward or state_dict time)
_MODULE_SKIP = frozenset({"_modules", "_parameters", "_buffers", "_non_persistent_buffers_set", "_backward_hooks",
                          "_backward_pre_hooks", "_is_full_backward_hook", "_state_dict_hooks",
                          "_state_dict_pre_hooks", "_load_state_dict_pre_hooks", "_load_state_dict_post_hooks"})


def _tensor_key(t: torch.Tensor):
    try:
        return ("tensor", t.device, t.dtype, tuple(t.shape), tuple(t.stride()), t.data_ptr())
    except (RuntimeError, NotImplementedError):  # no plain storage (sparse, nested, …): identity
        return _Same(t)


@functools.lru_cache(maxsize=1024)
def _global_names(code: types.CodeType) -> tuple[str, ...]:
    """Names a code object (and the functions and comprehensions nested in it) may look up as globals."""
    names = list(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names.extend(_global_names(const))
    return tuple(dict.fromkeys(names))


class _StateKey:
    """Flattens what a chain reads from an object into ``(path, value)`` pairs: hashable, compared by value."""

    def __init__(self, batch: int):
        self.items: list[tuple[str, object]] = []
        self._seen: set[int] = set()
        self.batch = batch  # the chain's batch size, for modules whose state is per batch size

    def add(self, path: str, obj, depth: int = 0) -> None:
        if isinstance(obj, torch.Tensor):
            self.items.append((path, _tensor_key(obj)))
        elif isinstance(obj, float):
            self.items.append((path, ("float", obj.hex())))  # NaN == NaN here
        elif isinstance(obj, _SCALARS):
            self.items.append((path, (type(obj), obj)))
        elif isinstance(obj, numbers.Number) and not isinstance(obj, (type, types.ModuleType)):
            self.items.append((path, (type(obj), repr(obj))))  # complex, numpy scalars
        elif id(obj) in self._seen or isinstance(obj, (type, types.ModuleType, types.BuiltinFunctionType,
                                                       types.CodeType)):
            self.items.append((path, _Same(obj)))
        else:
            self._seen.add(id(obj))
            self._add_object(path, obj, depth)

    def _add_object(self, path: str, obj, depth: int) -> None:
        if isinstance(obj, nn.Module):  # its whole tree, whatever the depth: a module's state is what it reads
            self.items.append((path, ("module", _Same(type(obj)))))
            unread = obj.unread_by_chain(self.batch) if hasattr(obj, "unread_by_chain") else ()
            for name, tensor in obj._parameters.items():
                self.add(f"{path}.{name}", tensor)
            for name, tensor in obj._buffers.items():
                if name not in unread:
                    self.add(f"{path}.{name}", tensor)
            for name, value in vars(obj).items():
                if name not in _MODULE_SKIP and name not in unread:
                    self.add(f"{path}.{name}", value, depth + 1)
            for name, child in obj._modules.items():
                self.add(f"{path}.{name}", child, depth)
        elif depth > _MAX_DEPTH:
            self.items.append((path, _Same(obj)))
        elif isinstance(obj, types.FunctionType):
            code = obj.__code__
            self.items.append((path, ("function", _Same(code))))
            for name, cell in zip(code.co_freevars, obj.__closure__ or ()):
                try:
                    self.add(f"{path}.<closure {name}>", cell.cell_contents, depth + 1)
                except ValueError:  # an empty cell
                    self.items.append((f"{path}.<closure {name}>", "empty"))
            self.add(f"{path}.__defaults__", obj.__defaults__, depth + 1)
            self.add(f"{path}.__kwdefaults__", obj.__kwdefaults__, depth + 1)
            for name in _global_names(code):
                if name in obj.__globals__:
                    self.add(f"{path}.<global {name}>", obj.__globals__[name], depth + 1)
        elif isinstance(obj, types.MethodType):
            self.add(f"{path}.__self__", obj.__self__, depth)
            self.add(f"{path}.__func__", obj.__func__, depth)
        elif isinstance(obj, functools.partial):
            self.add(f"{path}.func", obj.func, depth + 1)
            self.add(f"{path}.args", obj.args, depth + 1)
            self.add(f"{path}.keywords", obj.keywords, depth + 1)
        elif isinstance(obj, (tuple, list)) and len(obj) <= _MAX_ITEMS:
            self.items.append((path, (type(obj), len(obj))))
            for i, value in enumerate(obj):
                self.add(f"{path}[{i}]", value, depth + 1)
        elif (isinstance(obj, dict) and len(obj) <= _MAX_ITEMS
              and all(isinstance(k, (str, int)) for k in obj)):
            self.items.append((path, (type(obj), tuple(obj))))
            for name, value in obj.items():
                self.add(f"{path}[{name!r}]", value, depth + 1)
        elif hasattr(obj, "__dict__"):
            self.items.append((path, ("object", _Same(type(obj)))))
            for name, value in vars(obj).items():
                self.add(f"{path}.{name}", value, depth + 1)
        else:  # no inspectable state (a set, a C object): its identity
            self.items.append((path, _Same(obj)))


def state_key(obj, path: str, batch: int) -> tuple:
    """What a captured chain of ``batch`` samples reads from ``obj`` (an energy or a prior), as a hashable tuple of
    (path, value)."""
    key = _StateKey(batch)
    key.add(path, obj)
    return tuple(key.items)


def _settings_key(settings: dict) -> tuple:
    return tuple((k, v) for k, v in sorted(settings.items()) if k != "prior")


def graph_key(energy, z0: torch.Tensor, settings: dict) -> tuple[tuple, tuple]:
    """The cache key of a chain: ``(z0's layout, the settings and autocast; what the energy and the prior read)``."""
    device_type = z0.device.type
    autocast = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
    head = (tuple(z0.shape), z0.dtype, z0.device, autocast) + _settings_key(settings)
    batch = z0.shape[0]
    return head, state_key(energy, "energy", batch) + state_key(settings["prior"], "prior", batch)


# ------------------------------------------------------------------------------------------ which chains graph

def _kind(energy):
    """What stays the same when an energy is rebuilt each call: its type, its code, its method."""
    if isinstance(energy, types.MethodType):
        return _Same(energy.__func__)
    if isinstance(energy, types.FunctionType):
        return _Same(energy.__code__)
    if isinstance(energy, functools.partial):
        return _kind(energy.func)
    return _Same(type(energy))


def _describe(energy) -> str:
    if isinstance(energy, functools.partial):
        return f"partial({_describe(energy.func)})"
    function = getattr(energy, "__func__", energy)
    code = getattr(function, "__code__", None)
    if code is not None:
        return f"{function.__qualname__} ({code.co_filename}:{code.co_firstlineno})"
    return type(energy).__name__


def _state_visible(obj) -> bool:
    """Whether the key sees all an energy (or prior) reads: a module's tree, not a function's globals."""
    from fastlangevin.priors import CallablePrior
    if isinstance(obj, CallablePrior):
        return _state_visible(obj._log_prob)
    if isinstance(obj, types.MethodType):
        return isinstance(obj.__self__, nn.Module)
    return isinstance(obj, nn.Module)


def check_cuda_graph(cuda_graph: bool | None, z0: torch.Tensor, create_graph: bool) -> None:
    """``cuda_graph=True`` needs CUDA tensors and no ``create_graph``; raises ``ValueError`` naming it otherwise."""
    if cuda_graph and z0.device.type not in CAPTURE_DEVICE_TYPES:
        raise ValueError(f"cuda_graph=True needs z0 on a CUDA device, got {z0.device}")
    if cuda_graph and create_graph:
        raise ValueError("cuda_graph=True cannot keep the autograd graph of the chain (create_graph=True)")


def use_graph(cuda_graph: bool | None, energy, prior, z0: torch.Tensor, create_graph: bool, n_steps: int) -> bool:
    """Whether ``fl.langevin`` runs this (checked) chain as a CUDA graph; see the module docstring for the
    default."""
    if cuda_graph is not None:
        return cuda_graph and n_steps > 0
    if z0.device.type not in CAPTURE_DEVICE_TYPES or create_graph or n_steps == 0:
        return False
    for what, obj in (("energy", energy), ("prior", prior)):
        if not _state_visible(obj):
            note_fallback(f"chain with a plain-function {what} on {z0.device.type}", "the eager chain",
                          "CUDA graphs are captured by default only for energies and priors that are nn.Modules "
                          "(a graph is keyed on what it reads, and a function may read globals or objects that "
                          "change unseen); build it as an nn.Module, or pass cuda_graph=True to graph it keyed on "
                          "its code, closure and the globals it names")
            return False
    return True


# ------------------------------------------------------------------------------------------------- the cache

@dataclasses.dataclass(eq=False)
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    static_z: torch.Tensor
    static_rng: torch.Tensor
    result: object  # the ChainResult produced inside the capture (its tensors are the graph's outputs)
    site: tuple
    replays: int = 0


@dataclasses.dataclass(eq=False)
class _Site:
    """One chain configuration (energy type or code, shapes, settings) and its recent captures."""

    description: str
    last_key: tuple | None = None
    last_entry: _Graph | None = None
    last_owner: object = None  # a weakref to the energy (or its module) captured last; None: not weakly referable
    repeated: int = 0  # captures in a row, each made useless by the next (its energy gone or changed)
    stopped: str | None = None


_graphs: "collections.OrderedDict[tuple, _Graph | None]" = collections.OrderedDict()
_sites: "collections.OrderedDict[tuple, _Site]" = collections.OrderedDict()
_counts = {"captures": 0, "replays": 0}
_lock = threading.RLock()


@dataclasses.dataclass
class GraphCacheInfo:
    """``graphs``: captured chains held; ``captures`` / ``replays`` since the last ``clear_graph_cache()``;
    ``stopped``: configurations no longer captured, with the reason."""

    graphs: int
    captures: int
    replays: int
    stopped: list[str]


def cache_info() -> GraphCacheInfo:
    with _lock:
        return GraphCacheInfo(sum(e is not None for e in _graphs.values()), _counts["captures"], _counts["replays"],
                              [f"chain of {s.description}: {s.stopped}" for s in _sites.values() if s.stopped])


def _changed(old: tuple[tuple, tuple], new: tuple[tuple, tuple]) -> str:
    """What differs between two keys of one configuration, in words."""
    if old[0] != new[0]:
        return "the autocast state changes each call"
    before = dict(old[1])
    for path, value in new[1]:
        if path not in before:
            return f"{path} appears"
        if before[path] != value:
            if isinstance(value, tuple) and value[:1] == ("tensor",):
                return f"{path} is a different tensor each call (not updated in place)"
            if isinstance(value, _Same):
                return f"{path} is a different object each call"
            return f"{path} changes each call ({_show(before[path])} -> {_show(value)})"
    return "the energy's structure changes each call"


def _show(value) -> str:
    if isinstance(value, tuple) and len(value) == 2 and value[0] == "float":
        return repr(float.fromhex(value[1]))
    if isinstance(value, tuple) and len(value) == 2 and isinstance(value[0], type):
        return repr(value[1])
    return repr(value)


def _owner_of(energy):
    return energy.__self__ if isinstance(energy, types.MethodType) else energy


def _note_capture(site_key: tuple, site: _Site, key: tuple, entry: _Graph | None, energy) -> None:
    """Count the captures of a configuration that no replay followed; stop capturing it after a few."""
    previous, previous_key, owner = site.last_entry, site.last_key, _owner_of(energy)
    last_owner = None if site.last_owner is None else site.last_owner()
    wasted = previous_key is not None and (previous is None or previous.replays <= 1) and (  # only its own call
        last_owner is None or last_owner is owner)  # gone (rebuilt each call) or the same one, changed
    site.repeated = site.repeated + 1 if wasted else 1  # live energies of one type (an ensemble) are not counted
    site.last_key, site.last_entry = key, entry
    try:
        site.last_owner = weakref.ref(owner)
    except TypeError:
        site.last_owner = None
    if site.repeated >= REPEATED_CAPTURE_LIMIT:
        site.stopped = (f"{site.repeated} CUDA graphs captured in a row were never replayed because "
                        f"{_changed(previous_key, key)}; stopped capturing it (the eager chain from now on). A graph "
                        f"replays the memory and values it captured: build the energy once, update its tensors in "
                        f"place (optimizer steps, buffer.copy_(new_batch)) and keep numbers that change in tensors, "
                        f"not Python attributes")
        note_fallback(f"chain of {site.description}", "the eager chain", site.stopped)
        for k in [k for k, e in _graphs.items() if e is not None and e.site == site_key and e.replays <= 1]:
            del _graphs[k]  # free their memory pools


def run_graphed(body, energy, z0: torch.Tensor, seed: int, settings: dict):
    """Run ``body`` (``sampler.run_chain_body``) as a replayed CUDA graph; returns its result with tensors cloned
    out, or None when the configuration is not captured (then the caller runs the eager chain)."""
    site_key = (_kind(energy), tuple(z0.shape), z0.dtype, z0.device, _settings_key(settings),
                type(settings["prior"]))
    key = graph_key(energy, z0, settings)
    with _lock:
        site = _sites.get(site_key)
        if site is None:
            site = _sites[site_key] = _Site(_describe(energy))
            while len(_sites) > _MAX_SITES:
                _sites.popitem(last=False)
        _sites.move_to_end(site_key)
        entry = _graphs.get(key, False)
        if entry is False:
            if site.stopped:
                return None
            entry = _capture(body, energy, z0, settings, site_key)
            # the key after the capture: a forward that stores tensors on its module (spectral_norm's weight)
            # leaves them pointing at the graph's outputs, which is what every later call will see
            settled = graph_key(energy, z0, settings)
            _counts["captures"] += 1
            _graphs[settled] = entry
            _note_capture(site_key, site, settled, entry, energy)
            while len(_graphs) > MAX_GRAPHS:
                _graphs.popitem(last=False)
        else:
            _graphs.move_to_end(key)
            if entry is not None:
                site.repeated = 0
        if entry is None:
            return None
        with torch.no_grad():  # the static input is flagged requires_grad by the captured chain
            entry.static_z.copy_(z0)
            entry.static_rng.copy_(torch.tensor([seed, 0], dtype=torch.int64))
        entry.graph.replay()
        entry.replays += 1
        _counts["replays"] += 1
        outputs = {name: None if t is None else t.detach().clone()
                   for name, t in vars(entry.result).items() if isinstance(t, torch.Tensor) or t is None}
    return dataclasses.replace(entry.result, graphed=True, **outputs)


def _capture(body, energy, z0, settings, site_key) -> _Graph | None:
    device = z0.device
    with torch.cuda.device(device):
        static_z = z0.detach().clone().contiguous()
        static_rng = torch.zeros(2, dtype=torch.int64, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            for _ in range(WARMUP_RUNS):  # lazy initialisation (cuBLAS handles, autograd) happens outside capture;
                body(energy, static_z.clone(), static_rng.clone(), **settings)  # its errors are the user's
        torch.cuda.current_stream(device).wait_stream(side)
        try:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                result = body(energy, static_z, static_rng, **settings)
        except Exception as error:  # noqa: BLE001 — any capture failure falls back, with the cause named
            why = f"CUDA graph capture failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
            note_fallback(f"chain of {_describe(energy)} on {device}", "the eager chain", why)
            return None
    return _Graph(graph, static_z, static_rng, result, site_key)


def clear_graph_cache() -> None:
    """Drop every captured chain (frees their memory pools) and forget which configurations stopped capturing."""
    with _lock:
        _graphs.clear()
        _sites.clear()
        _counts.update(captures=0, replays=0)
