"""The 8×8 handwritten digits that ship with scikit-learn (1797 images, pixel values 0–16): no download needed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sklearn.datasets
import torch
from sklearn.model_selection import train_test_split

from fastlangevin.data.base import ArrayDataset, check_classes, check_split


def digits_dataset(split: str = "train", classes: Sequence[int] | None = None, seed: int = 0,
                   test_fraction: float = 0.2, validation_fraction: float = 0.1) -> ArrayDataset:
    """x: (1, 8, 8) float32 in [0, 1] (value / 16, so ``n_levels = 17``); targets: the digit (int64).

    Splits, stratified by digit and fixed by ``seed`` (the same seed always gives the same split): ``test_fraction``
    of the images are the test split (360 of 1797), then ``validation_fraction`` of all images are carved from the
    rest as the validation split (180), and the remaining images are the train split (1257). The three are
    disjoint; the test split is the one of the two-way split before the validation split existed. ``classes``
    keeps only those digits (e.g. ``(0, 1)``), before splitting.
    """
    check_split(split)
    if not (0 < test_fraction and 0 < validation_fraction and test_fraction + validation_fraction < 1):
        raise ValueError(f"test_fraction and validation_fraction must be > 0 with a sum < 1, got {test_fraction} "
                         f"and {validation_fraction}")
    bunch = sklearn.datasets.load_digits()
    images, labels = bunch.images.astype(np.float32), bunch.target.astype(np.int64)
    if classes is not None:
        keep = np.isin(labels, check_classes(classes))
        images, labels = images[keep], labels[keep]
    x_rest, x_test, y_rest, y_test = train_test_split(images, labels, test_size=test_fraction,
                                                      random_state=seed, stratify=labels)
    if split == "test":
        images, labels = x_test, y_test
    else:
        x_train, x_val, y_train, y_val = train_test_split(
            x_rest, y_rest, test_size=round(validation_fraction * len(labels)), random_state=seed, stratify=y_rest)
        images, labels = (x_train, y_train) if split == "train" else (x_val, y_val)
    return ArrayDataset(torch.from_numpy(images / 16.0).unsqueeze(1), torch.from_numpy(labels), name="digits",
                        split=split, n_levels=17)
