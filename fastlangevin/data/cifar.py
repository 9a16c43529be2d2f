"""CIFAR-10 from its python batches (``data_batch_1`` … ``data_batch_5``, ``test_batch``) in a local folder."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import torch

from fastlangevin.data.base import ArrayDataset, carve_validation, check_split
from fastlangevin.data.files import DataFormatError, locate_files

CIFAR10_SUBDIRS = ("cifar-10-batches-py", "")
CIFAR10_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
VALIDATION_DIVISOR = 10  # the validation split is the last 1/10 of the train batches: 5 000 of 50 000
_PIXELS = 3 * 32 * 32

# A batch is a dict of bytes, lists and one uint8 ndarray; these are the only globals such a pickle names
# (numpy 1 wrote numpy.core, numpy 2 writes numpy._core; python 3 writes bytes through _codecs.encode). Refusing
# every other global keeps a tampered file from running code when it is loaded.
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
}


class _BatchUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        return super().find_class(module, name)


def read_cifar_batch(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """One python batch → images (N, 3, 32, 32) uint8 and labels (N,) int64. Raises DataFormatError when the file
    is not such a pickle (a dict with ``data`` (N, 3072) uint8 and ``labels`` of N classes in 0..9)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            batch = _BatchUnpickler(f, encoding="bytes").load()
    except OSError:
        raise
    except Exception as e:  # a corrupt pickle fails in many ways (UnpicklingError, EOFError, ValueError, …)
        raise DataFormatError(f"{path}: not a CIFAR-10 python batch ({type(e).__name__}: {e})") from e
    if not isinstance(batch, dict):
        raise DataFormatError(f"{path}: a CIFAR-10 batch is a dict, got {type(batch).__name__}")
    batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
    if "data" not in batch or "labels" not in batch:
        raise DataFormatError(f"{path}: a CIFAR-10 batch has keys 'data' and 'labels', got {sorted(batch)}")
    data, labels = batch["data"], np.asarray(batch["labels"])
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.ndim == 2 and data.shape[1] == _PIXELS):
        shape = getattr(data, "shape", None)
        raise DataFormatError(f"{path}: 'data' must be a uint8 array of shape (N, {_PIXELS}), got "
                              f"{type(data).__name__} {getattr(data, 'dtype', '')} {shape}")
    if labels.shape != (data.shape[0],) or not np.issubdtype(labels.dtype, np.integer):
        raise DataFormatError(f"{path}: 'labels' must be {data.shape[0]} integers, got shape {labels.shape} "
                              f"{labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DataFormatError(f"{path}: labels must be 0..9, found {labels.min()}..{labels.max()}")
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def cifar10_dataset(data_dir: str | os.PathLike | None, split: str = "train") -> ArrayDataset:
    """x: (3, 32, 32) float32 in [0, 1] (byte / 255); targets: the class (int64). Reads ``CIFAR10_FILES``
    from ``data_dir/cifar-10-batches-py`` (the folder the official archive unpacks to) or ``data_dir``: the test
    split is ``test_batch``; the train batches give the validation split (their last 1/10: the second half of
    ``data_batch_5``, 5 000 images) and the train split (the first 45 000)."""
    check_split(split)
    files = CIFAR10_FILES["test" if split == "test" else "train"]
    paths = locate_files(data_dir, "cifar10", CIFAR10_SUBDIRS, [(name,) for name in files])
    batches = [read_cifar_batch(p) for p in paths]
    images = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    if split != "test":
        rows = carve_validation(len(labels), split, VALIDATION_DIVISOR)
        images, labels = images[rows].copy(), labels[rows].copy()  # copies: a view would keep all 50 000 alive
    return ArrayDataset(torch.from_numpy(images), torch.from_numpy(labels), name="cifar10", split=split,
                        max_value=255.0, n_levels=256)
