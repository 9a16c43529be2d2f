"""The 8×8 handwritten digits that ship with scikit-learn (1797 images, pixel values 0–16): no download needed."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import sklearn.datasets
import torch
from sklearn.model_selection import train_test_split

from fastlangevin.data.base import ArrayDataset, check_classes, check_split


def digits_dataset(split: str = "train", classes: Sequence[int] | None = None, seed: int = 0,
                   test_fraction: float = 0.2) -> ArrayDataset:
    """x: (1, 8, 8) float32 in [0, 1] (value / 16, so ``n_levels = 17``); targets: the digit (int64).

    The train/test split is stratified by digit and fixed by ``seed``: the same seed always gives the same split,
    and the two splits are disjoint. ``classes`` keeps only those digits (e.g. ``(0, 1)``).
    """
    check_split(split)
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    bunch = sklearn.datasets.load_digits()
    images, labels = bunch.images.astype(np.float32), bunch.target.astype(np.int64)
    if classes is not None:
        keep = np.isin(labels, check_classes(classes))
        images, labels = images[keep], labels[keep]
    x_train, x_test, y_train, y_test = train_test_split(images, labels, test_size=test_fraction,
                                                        random_state=seed, stratify=labels)
    images, labels = (x_train, y_train) if split == "train" else (x_test, y_test)
    return ArrayDataset(torch.from_numpy(images / 16.0).unsqueeze(1), torch.from_numpy(labels), name="digits",
                        split=split, n_levels=17)
