"""MNIST and Fashion-MNIST from their IDX files (``train-images-idx3-ubyte[.gz]`` and friends) in a local folder."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import torch

from fastlangevin.data.base import ArrayDataset, check_split
from fastlangevin.data.files import DataFormatError, locate_files

# Folders under --data-dir looked in, in order: the data set's own folder (ours, then torchvision's layout), then
# --data-dir itself. MNIST and Fashion-MNIST share file names, so their own folders come first.
IDX_SUBDIRS = {
    "mnist": ("mnist", "MNIST/raw", ""),
    "fashion-mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", ""),
}
_PREFIX = {"train": "train", "test": "t10k"}
_UBYTE = 0x08


def read_idx(path: str | os.PathLike, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes with ``ndim`` dimensions, raw or gzip-compressed (by the ``.gz`` suffix).

    Returns a uint8 array of the shape in the header. Raises DataFormatError for a bad magic number (anything but
    0x0000080N with N = ndim) or a payload whose size does not match the header.
    """
    path = Path(path)
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            raw = f.read()
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise DataFormatError(f"{path}: not a valid gzip file ({e})") from e
    expected_magic = (_UBYTE << 8) | ndim
    if len(raw) < 4:
        raise DataFormatError(f"{path}: {len(raw)} bytes is too short for an IDX file")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expected_magic:
        raise DataFormatError(f"{path}: bad magic number 0x{magic:08x}; an IDX file of unsigned bytes with {ndim} "
                              f"dimension(s) starts with 0x{expected_magic:08x}")
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataFormatError(f"{path}: truncated header ({len(raw)} bytes, expected at least {header})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(shape):
        raise DataFormatError(f"{path}: the header gives shape {shape} = {math.prod(shape)} bytes of data but the "
                              f"file holds {len(raw) - header}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def idx_dataset(name: str, data_dir: str | os.PathLike | None, split: str = "train") -> ArrayDataset:
    """MNIST or Fashion-MNIST (``name`` in ``IDX_SUBDIRS``). x: (1, H, W) float32 in [0, 1] (byte / 255);
    targets: the class (int64). The standard files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, raw or
    ``.gz``, are read from ``data_dir`` or one of its subfolders ``IDX_SUBDIRS[name]``."""
    if name not in IDX_SUBDIRS:
        raise ValueError(f"unknown IDX data set {name!r}; choose one of {tuple(IDX_SUBDIRS)}")
    check_split(split)
    stems = [f"{_PREFIX[split]}-images-idx3-ubyte", f"{_PREFIX[split]}-labels-idx1-ubyte"]
    image_path, label_path = locate_files(data_dir, name, IDX_SUBDIRS[name], [(s, s + ".gz") for s in stems])
    images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataFormatError(f"{name}: {image_path} holds {images.shape[0]} images but {label_path} holds "
                              f"{labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise DataFormatError(f"{label_path}: labels must be 0..9, found {int(labels.max())}")
    return ArrayDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                        name=name, split=split, max_value=255.0, n_levels=256)
