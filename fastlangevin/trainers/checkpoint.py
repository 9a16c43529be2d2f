"""Run-directory files written atomically: safetensors checkpoints (model, optimizer state, step) and JSON.

A checkpoint is one ``.safetensors`` file: the module's tensors under ``model.``, the optimizer's per-parameter
tensors under ``optimizer.state.<index>.<name>``, and everything that is not a tensor (step, optimizer hyper-parameters,
free-form extras) as JSON in the header's metadata under ``"fastlangevin"``. Writes go to a temporary file in the
same folder, are fsync'ed, then ``os.replace``d over the target, so an interrupted run never leaves a torn file.
"""

from __future__ import annotations

import json
import os

import torch

from fastlangevin._io import atomic_write_bytes

META_KEY = "fastlangevin"


class RunFileError(ValueError):
    """A run-folder file that cannot be read; the message names the file."""


class CheckpointError(RunFileError):
    """A checkpoint that cannot be read (truncated, not safetensors, or not fastlangevin's); names the file."""


def read_metadata(path: str | os.PathLike) -> dict:
    """The checkpoint's metadata ``{"step", "extra", ...}`` without reading its tensors; FileNotFoundError or
    CheckpointError naming the path."""
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            return json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    except Exception as error:
        raise _unreadable(path, error) from error


def _unreadable(path, error: Exception) -> CheckpointError:
    return CheckpointError(f"{os.fspath(path)} is not a readable checkpoint ({error}); it was cut short or is not a "
                           f"safetensors file: train again, or resume from an earlier copy")


def write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def read_json(path: str | os.PathLike):
    """The JSON in ``path``; a file that is not JSON raises ``RunFileError`` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise RunFileError(f"{os.fspath(path)} is not valid JSON ({error}); it was edited or written by another "
                           f"program: restore it, or delete it and train again") from None


def _optimizer_to_flat(state_dict: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, state_meta = {}, {}
    for index, entries in state_dict["state"].items():
        for name, value in entries.items():
            if isinstance(value, torch.Tensor):
                tensors[f"optimizer.state.{index}.{name}"] = value
            else:
                state_meta.setdefault(str(index), {})[name] = value
    return tensors, {"param_groups": state_dict["param_groups"], "state": state_meta}


def _optimizer_from_flat(tensors: dict[str, torch.Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        if key.startswith("optimizer.state."):
            index, name = key[len("optimizer.state."):].split(".", 1)
            state.setdefault(int(index), {})[name] = value
    for index, entries in meta["state"].items():
        state.setdefault(int(index), {}).update(entries)
    return {"state": state, "param_groups": meta["param_groups"]}


def save_checkpoint(path: str | os.PathLike, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                    step: int = 0, extra: dict | None = None) -> None:
    """Save ``module``'s state dict, ``optimizer``'s state, ``step`` (+ JSON-able ``extra``) and torch's CPU random
    state (so a resumed run draws the same noise as an uninterrupted one) atomically."""
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    tensors["rng.torch_cpu"] = torch.get_rng_state()
    meta = {"step": int(step), "extra": extra or {}}
    if optimizer is not None:
        opt_tensors, meta["optimizer"] = _optimizer_to_flat(optimizer.state_dict())
        tensors.update({k: v.detach().cpu().contiguous().clone() for k, v in opt_tensors.items()})
    atomic_write_bytes(path, save(tensors, metadata={META_KEY: json.dumps(meta)}))


def load_checkpoint(path: str | os.PathLike, module: torch.nn.Module | None = None,
                    optimizer: torch.optim.Optimizer | None = None, map_location: str | torch.device = "cpu",
                    restore_rng: bool = False) -> dict:
    """Load what ``save_checkpoint`` wrote into ``module`` / ``optimizer`` (either may be None) and, with
    ``restore_rng``, torch's CPU random state; returns the metadata ``{"step", "extra", ...}``.
    Raises ``FileNotFoundError`` naming the path when it is missing, ``CheckpointError`` when it is unreadable or
    holds another model."""
    from safetensors.torch import load_file

    meta = read_metadata(path)
    try:
        tensors = load_file(path, device=str(map_location))
    except Exception as error:  # a file cut short after its header
        raise _unreadable(path, error) from error
    if module is not None:
        try:
            module.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
        except RuntimeError as error:  # missing keys, sizes: the checkpoint is another model's
            raise CheckpointError(f"{os.fspath(path)} does not hold this {type(module).__name__}: "
                                  f"{str(error).splitlines()[0]} (was the run folder's config changed?)") from error
    if optimizer is not None:
        if "optimizer" not in meta:
            raise ValueError(f"{path} holds no optimizer state; it cannot resume training")
        optimizer.load_state_dict(_optimizer_from_flat(tensors, meta["optimizer"]))
    if restore_rng and "rng.torch_cpu" in tensors:
        torch.set_rng_state(tensors["rng.torch_cpu"].cpu())
    return meta
