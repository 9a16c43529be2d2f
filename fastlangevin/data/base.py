"""The one Dataset class every loader returns (samples and targets held in memory), and the split helpers the
loaders share."""

from __future__ import annotations

import math

import numpy as np
import torch
from torch.utils.data import Dataset

# Every data set has the three, pairwise disjoint: "train" for fitting, "validation" for model selection and early
# stopping (never fitted on), "test" for the numbers reported. How each data set draws them: fastlangevin.data.
SPLITS = ("train", "validation", "test")


def check_split(split: str) -> str:
    """``split`` unchanged; a clear error unless it is one of ``SPLITS``."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return split


def carve_validation(n_train: int, split: str, divisor: int) -> slice:
    """Rows of a train file that ``split`` ("train" or "validation") keeps when the validation split is the last
    ⌈n_train / divisor⌉ of them (Keras' ``validation_split`` convention; the standard files are already shuffled):
    ``divisor`` 12 leaves 55 000 / 5 000 of MNIST's 60 000, 10 leaves 45 000 / 5 000 of CIFAR-10's 50 000."""
    n_validation = math.ceil(n_train / divisor)
    if n_train - n_validation < 1:
        raise ValueError(f"{n_train} training sample(s) are too few to hold out a validation split")
    return slice(n_train - n_validation, None) if split == "validation" else slice(0, n_train - n_validation)


def stratified_split(labels: np.ndarray, per_class: dict[str, int], seed: int = 0) -> dict[str, np.ndarray]:
    """A fixed split of a labelled pool: ``per_class[split]`` samples of every class in each split of ``SPLITS``.

    One permutation of the pool (``numpy.random.default_rng(seed)``) decides membership: going along it, the first
    ``per_class[SPLITS[0]]`` samples met of each class go to that split, the next ones to the next split, and so on.
    A second permutation from the same generator orders each split (classes interleaved, so a prefix of any split
    is roughly balanced). Returns split → indices into ``labels``. Raises ValueError when a class has fewer samples
    than ``sum(per_class.values())``.
    """
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(labels))
    rank = np.empty(len(labels), dtype=np.int64)  # position of each sample among its class, in permutation order
    for c in np.unique(labels):
        members = order[labels[order] == c]
        if len(members) < sum(per_class.values()):
            raise ValueError(f"class {c} has {len(members)} samples; the split needs {sum(per_class.values())}")
        rank[members] = np.arange(len(members))
    out, start = {}, 0
    for split in SPLITS:
        stop = start + per_class[split]
        out[split] = rng.permutation(np.flatnonzero((rank >= start) & (rank < stop)))
        start = stop
    return out


def check_classes(classes) -> list[int]:
    """``classes`` as a list; a clear error unless it is a non-empty subset of the ten labels 0..9."""
    classes = list(classes)
    if not classes or any(c not in range(10) for c in classes):
        raise ValueError(f"classes must be a non-empty subset of 0..9, got {classes}")
    return classes


class ArrayDataset(Dataset):
    """``dataset[i] -> (x, target)``, x float32 of shape ``sample_shape``.

    data: (N, *sample_shape), float32 or uint8 (pixels are kept as bytes and scaled by ``1 / max_value`` on access,
    so CIFAR-10 takes 150 MB, not 600). targets: (N,) int64 class labels, or per-dataset values (documented there).
    n_levels: how many distinct values a pixel takes (256 for 8-bit images, 17 for the 8×8 digits), for the
    dequantisation of a flow's likelihood; None for continuous data.
    modes, mode_std: (K, D) mode centres and their common standard deviation where the data is a mixture with known
    modes (25-Gaussians), for ``fastlangevin.metrics.mode_coverage``; None otherwise.
    """

    def __init__(self, data: torch.Tensor, targets: torch.Tensor, *, name: str, split: str,
                 max_value: float | None = None, n_levels: int | None = None,
                 modes: torch.Tensor | None = None, mode_std: float | None = None):
        if data.shape[0] != targets.shape[0]:
            raise ValueError(f"{name}: {data.shape[0]} samples but {targets.shape[0]} targets")
        self.data, self.targets = data, targets
        self.name, self.split = name, split
        self.max_value, self.n_levels = max_value, n_levels
        self.modes, self.mode_std = modes, mode_std

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape[1:])

    def __len__(self) -> int:
        return self.data.shape[0]

    def _scale(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() / self.max_value if self.max_value is not None else x

    def __getitem__(self, index: int):
        return self._scale(self.data[index]), self.targets[index]

    def subset(self, index) -> "ArrayDataset":
        """The samples ``data[index]`` (a slice, index tensor or boolean mask) as a new ArrayDataset."""
        return ArrayDataset(self.data[index], self.targets[index], name=self.name, split=self.split,
                            max_value=self.max_value, n_levels=self.n_levels, modes=self.modes,
                            mode_std=self.mode_std)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """All samples at once: x (N, *sample_shape) float32, targets (N,)."""
        return self._scale(self.data), self.targets

    def __repr__(self) -> str:
        return f"ArrayDataset({self.name!r}, split={self.split!r}, n={len(self)}, sample_shape={self.sample_shape})"
