"""CUDA-graph-captured chains for any energy: the K steps (energy forward, autograd gradient, fused step op) are
captured once per configuration into one CUDA graph and replayed.

* Fresh noise on every replay: the chain's seed and step counter live in a device tensor that is written before the
  replay and advanced inside the graph (a seed passed as a kernel scalar would be frozen at capture).
* Parameters are read in place, so an optimiser step is seen by the next replay. The cache key holds the storage
  addresses of the energy's parameters and buffers: a parameter replaced by a new tensor captures a new graph.
* Inputs are copied into the graph's static buffers and outputs cloned out: no caller sees memory a replay reuses.
* The cache is bounded (LRU, ``MAX_GRAPHS``). A capture that fails (an energy that syncs, allocates on the host or
  branches on data) falls back to the eager chain with one warning naming the cause.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import threading

import torch

from fastlangevin.backends import note_fallback

MAX_GRAPHS = 16
WARMUP_RUNS = 2
logger = logging.getLogger("fastlangevin")


@dataclasses.dataclass
class _Graph:
    graph: "torch.cuda.CUDAGraph"
    static_z: torch.Tensor
    static_rng: torch.Tensor
    result: object  # the ChainResult produced inside the capture (its tensors are the graph's outputs)


_graphs: "collections.OrderedDict[tuple, _Graph | None]" = collections.OrderedDict()
_lock = threading.Lock()


def _storage_key(energy) -> tuple:
    if isinstance(energy, torch.nn.Module):
        return tuple((t.data_ptr(), t.dtype, tuple(t.shape)) for t in
                     list(energy.parameters()) + list(energy.buffers()))
    return ()


def _settings_key(settings: dict) -> tuple:
    prior = settings["prior"]
    prior_key = (type(prior).__name__, id(prior), _storage_key(prior))
    return tuple((k, v) for k, v in sorted(settings.items()) if k != "prior") + (prior_key,)


def graph_key(energy, z0: torch.Tensor, settings: dict) -> tuple:
    return (id(energy), _storage_key(energy), tuple(z0.shape), z0.dtype, z0.device.index) + _settings_key(settings)


def run_graphed(body, energy, z0: torch.Tensor, seed: int, settings: dict):
    """Run ``body`` (``sampler.run_chain_body``) as a replayed CUDA graph; returns its result with tensors cloned
    out, or None when the configuration cannot be captured (then the caller runs the eager chain)."""
    key = graph_key(energy, z0, settings)
    with _lock:
        entry = _graphs.get(key, False)
        if entry is False:
            entry = _capture(body, energy, z0, settings, key)
            _graphs[key] = entry
            while len(_graphs) > MAX_GRAPHS:
                _graphs.popitem(last=False)
        else:
            _graphs.move_to_end(key)
        if entry is None:
            return None
        with torch.no_grad():  # the static input is flagged requires_grad by the captured chain
            entry.static_z.copy_(z0)
            entry.static_rng.copy_(torch.tensor([seed, 0], dtype=torch.int64))
        entry.graph.replay()
        outputs = {name: None if t is None else t.detach().clone()
                   for name, t in vars(entry.result).items() if isinstance(t, torch.Tensor) or t is None}
    return dataclasses.replace(entry.result, graphed=True, **outputs)


def _capture(body, energy, z0, settings, key) -> _Graph | None:
    device = z0.device
    with torch.cuda.device(device):
        static_z = z0.detach().clone().contiguous()
        static_rng = torch.zeros(2, dtype=torch.int64, device=device)
        try:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):  # lazy initialisation (cuBLAS handles, autograd) happens outside capture
                    body(energy, static_z.clone(), static_rng.clone(), **settings)
            torch.cuda.current_stream(device).wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                result = body(energy, static_z, static_rng, **settings)
        except Exception as error:  # noqa: BLE001 — any capture failure falls back, with the cause named
            why = f"CUDA graph capture failed ({type(error).__name__}: {str(error).splitlines()[0][:200]})"
            note_fallback(f"chain of {type(energy).__name__} on {device}", "the eager chain", why)
            return None
    return _Graph(graph, static_z, static_rng, result)


def clear_graph_cache() -> None:
    """Drop every captured chain (frees their memory pools)."""
    with _lock:
        _graphs.clear()
