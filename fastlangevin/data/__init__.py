"""Data sets as torch Datasets: generated 2-D toys, scikit-learn's 8×8 digits, 5 000 real MNIST / Fashion-MNIST
images shipped by packages, and MNIST / Fashion-MNIST / CIFAR-10 read from local files (nothing is downloaded).
``make_dataset`` builds any of them by name.

Splits (``SPLITS``): every data set has "train", "validation" and "test", pairwise disjoint. Fit on train, select
models and stop early on validation, report on test.

=====================  =====================================================================  =====================
data set               validation split                                                       train / val / test
=====================  =====================================================================  =====================
25gaussians, swissroll an independent draw (each split its own random stream of the seed)    n_samples each
digits                 10 % of the images carved from the train split, stratified, by seed    1257 / 180 / 360
mnist5k, fashion5k     50 of each class; one fixed permutation, independent of the seed       3500 / 500 / 1000
mnist, fashion-mnist   the last 1/12 of the train files (t10k files are the test split)       55000 / 5000 / 10000
cifar10                the last 1/10 of the train batches (test_batch is the test split)      45000 / 5000 / 10000
=====================  =====================================================================  =====================
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from fastlangevin.data.base import SPLITS, ArrayDataset, check_classes, stratified_split
from fastlangevin.data.cifar import cifar10_dataset, read_cifar_batch
from fastlangevin.data.digits import digits_dataset
from fastlangevin.data.files import DataFormatError, MissingDataPackage
from fastlangevin.data.mnist import IDX_SUBDIRS, idx_dataset, read_idx
from fastlangevin.data.mnist5k import FIVEK_DATASETS, FIVEK_PER_CLASS, fivek_dataset
from fastlangevin.data.toy import TOY_DATASETS, swiss_roll, toy_dataset, twenty_five_gaussians, \
    twenty_five_gaussians_modes

DATASETS = TOY_DATASETS + ("digits",) + FIVEK_DATASETS + tuple(IDX_SUBDIRS) + ("cifar10",)


def make_dataset(name: str, data_dir: str | os.PathLike | None = None, split: str = "train", *, seed: int = 0,
                 n_samples: int | None = None, classes: Sequence[int] | None = None) -> ArrayDataset:
    """The data set ``name`` (one of ``DATASETS``), split ``"train"``, ``"validation"`` or ``"test"`` (see the
    module docstring for how each data set draws them).

    data_dir: the folder holding the files of mnist / fashion-mnist / cifar10 (fashion-mnist and fashion5k default
    to Debian's /usr/share/datasets; ignored by the others).
    seed: the draw of a toy data set, the split of the digits (the other data sets have fixed splits).
    n_samples: a toy data set's size (default 10 000); for the others, keep only the first n_samples.
    classes: keep only these class labels (image data sets only).
    Every item is ``(x, target)`` with x float32: (2,) for toys, (C, H, W) in [0, 1] for images.
    """
    if name not in DATASETS:
        raise ValueError(f"unknown data set {name!r}; choose one of {DATASETS}")
    if n_samples is not None and n_samples < 1:
        raise ValueError(f"n_samples must be >= 1, got {n_samples}")
    if name in TOY_DATASETS:
        if classes is not None:
            raise ValueError(f"classes applies to image data sets, not to {name}")
        return toy_dataset(name, split, 10_000 if n_samples is None else n_samples, seed)
    if name == "digits":
        dataset = digits_dataset(split, classes, seed)
    elif name in FIVEK_DATASETS:
        dataset = fivek_dataset(name, data_dir, split)
    elif name == "cifar10":
        dataset = cifar10_dataset(data_dir, split)
    else:
        dataset = idx_dataset(name, data_dir, split)
    if classes is not None and name != "digits":
        dataset = dataset.subset(torch.isin(dataset.targets, torch.as_tensor(check_classes(classes))))
    if n_samples is not None:
        dataset = dataset.subset(slice(0, n_samples))
    return dataset


__all__ = [
    "DATASETS", "SPLITS", "ArrayDataset", "DataFormatError", "MissingDataPackage", "make_dataset", "toy_dataset",
    "digits_dataset", "fivek_dataset", "idx_dataset", "cifar10_dataset", "read_idx", "read_cifar_batch",
    "stratified_split", "twenty_five_gaussians", "swiss_roll", "twenty_five_gaussians_modes", "FIVEK_PER_CLASS",
    "TOY_DATASETS",
]
