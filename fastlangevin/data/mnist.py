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

from fastlangevin.data.base import ArrayDataset, carve_validation, check_split
from fastlangevin.data.files import DataFormatError, locate_files

# Folders under --data-dir looked in, in order: the data set's own folder (ours, then torchvision's layout), then
# --data-dir itself. MNIST and Fashion-MNIST share file names, so their own folders come first.
IDX_SUBDIRS = {
    "mnist": ("mnist", "MNIST/raw", ""),
    "fashion-mnist": ("fashion-mnist", "fashion_mnist", "FashionMNIST/raw", ""),
}
_PREFIX = {"train": "train", "test": "t10k"}
_UBYTE = 0x08
VALIDATION_DIVISOR = 12  # the validation split is the last 1/12 of the train files: 5 000 of 60 000
# Debian's dataset-fashion-mnist package installs the official Fashion-MNIST files (all 70 000 images) in
# DEBIAN_DATASETS/fashion-mnist; fashion-mnist (and fashion5k) look there when no data_dir is given.
DEBIAN_DATASETS = "/usr/share/datasets"
DEFAULT_DATA_DIRS = {"fashion-mnist": DEBIAN_DATASETS}
_HINTS = {"fashion-mnist": f"; `apt-get install dataset-fashion-mnist` puts them in {DEBIAN_DATASETS}/fashion-mnist"}


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


def read_idx_files(name: str, data_dir: str | os.PathLike | None, file_split: str) -> tuple[np.ndarray, np.ndarray]:
    """The images (N, H, W) uint8 and labels (N,) int64 of one pair of standard files of ``name`` (a key of
    ``IDX_SUBDIRS``): ``file_split`` "train" (``train-*``) or "test" (``t10k-*``), raw or ``.gz``, from ``data_dir``
    (default ``DEFAULT_DATA_DIRS[name]``) or one of its subfolders ``IDX_SUBDIRS[name]``."""
    if name not in IDX_SUBDIRS:
        raise ValueError(f"unknown IDX data set {name!r}; choose one of {tuple(IDX_SUBDIRS)}")
    data_dir = DEFAULT_DATA_DIRS.get(name) if data_dir is None else data_dir
    stems = [f"{_PREFIX[file_split]}-images-idx3-ubyte", f"{_PREFIX[file_split]}-labels-idx1-ubyte"]
    image_path, label_path = locate_files(data_dir, name, IDX_SUBDIRS[name], [(s, s + ".gz") for s in stems],
                                          _HINTS.get(name, ""))
    images, labels = read_idx(image_path, 3), read_idx(label_path, 1)
    if images.shape[0] != labels.shape[0]:
        raise DataFormatError(f"{name}: {image_path} holds {images.shape[0]} images but {label_path} holds "
                              f"{labels.shape[0]} labels")
    if labels.size and labels.max() > 9:
        raise DataFormatError(f"{label_path}: labels must be 0..9, found {int(labels.max())}")
    return images, labels.astype(np.int64)


def idx_dataset(name: str, data_dir: str | os.PathLike | None, split: str = "train") -> ArrayDataset:
    """MNIST or Fashion-MNIST (``name`` in ``IDX_SUBDIRS``). x: (1, H, W) float32 in [0, 1] (byte / 255);
    targets: the class (int64). Files as ``read_idx_files``. The test split is the ``t10k`` files; the train files
    give the validation split (their last 1/12: 5 000 images) and the train split (the first 55 000)."""
    check_split(split)
    images, labels = read_idx_files(name, data_dir, "test" if split == "test" else "train")
    if split != "test":
        rows = carve_validation(len(labels), split, VALIDATION_DIVISOR)
        images, labels = images[rows], labels[rows]
    return ArrayDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.copy()),
                        name=name, split=split, max_value=255.0, n_levels=256)
