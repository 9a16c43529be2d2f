"""The small conv classifier whose penultimate features the Fréchet classifier distance compares, trained by
fastlangevin itself on a data set's train split and cached as safetensors.

Cache: ``$FASTLANGEVIN_CACHE`` (default ``~/.cache/fastlangevin``) ``/classifiers/<name>-<C>x<H>x<W>-<key>.safetensors``
with <key> a hash of the classifier's config, ``ARCH_VERSION`` and the training data's bytes and labels, so a
changed data set or config trains a new classifier and a second call only loads (milliseconds). The file's metadata
holds the config and the test-split accuracy.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save
from torch import nn

from fastlangevin._io import atomic_write_bytes
from fastlangevin.data import make_dataset

CACHE_ENV = "FASTLANGEVIN_CACHE"
ARCH_VERSION = 1  # bump when FeatureClassifier or the training loop changes: old cache files are then ignored
META_KEY = "fastlangevin"


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    """width: channels of the first conv stage (the second has 2·width); feature_dim: the penultimate layer, i.e.
    the Fréchet features; Adam updates of batch_size: ``epochs`` passes over the train split but at least
    ``min_steps``; seed: initialisation and batch order.

    Measured with these defaults (test-split accuracy, one CPU thread; docs/RESULTS.md has the command):
    digits 96.7 % (400 updates ≈ 20 epochs of 1 257 images, about 5 s); mnist5k 95.3 % (400 updates ≈ 7 epochs
    of 3 500 images, about 40 s; ``epochs=20`` reaches 97.2 % in 2 min); fashion5k 84.8 %; full MNIST: 3 epochs.
    """
    width: int = 16
    feature_dim: int = 64
    epochs: float = 3.0
    min_steps: int = 400
    batch_size: int = 64
    lr: float = 2e-3
    seed: int = 0

    def __post_init__(self):
        for name in ("width", "feature_dim", "min_steps", "batch_size"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"ClassifierConfig.{name} must be a positive int, got {getattr(self, name)!r}")
        for name in ("epochs", "lr"):
            if not getattr(self, name) > 0:
                raise ValueError(f"ClassifierConfig.{name} must be > 0, got {getattr(self, name)!r}")

    def steps(self, n_train: int) -> int:
        """Adam updates for a train split of ``n_train`` samples."""
        return max(self.min_steps, math.ceil(self.epochs * n_train / self.batch_size))


class FeatureClassifier(nn.Module):
    """(B, C, H, W) images in [0, 1] → (B, n_classes) logits. Two stages of two 3×3 convs + ReLU + 2×2 max pool
    (width, then 2·width channels), flatten, Linear → ReLU (the ``feature_dim`` penultimate features), Linear.
    Sides must be ≥ 4 (8×8 digits, 28×28 MNIST, 32×32 CIFAR-10; odd sides are floored by the pools)."""

    def __init__(self, image_shape, n_classes: int, width: int = 32, feature_dim: int = 64):
        super().__init__()
        self.image_shape = tuple(int(d) for d in image_shape)
        channels, height, width_px = self.image_shape
        if min(height, width_px) < 4:
            raise ValueError(f"image_shape must be (C, H, W) with H, W >= 4, got {self.image_shape}")
        self.n_classes = int(n_classes)

        def stage(c_in, c_out):
            return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU(), nn.Conv2d(c_out, c_out, 3, padding=1),
                    nn.ReLU(), nn.MaxPool2d(2)]

        flat = 2 * width * (height // 4) * (width_px // 4)
        self.body = nn.Sequential(*stage(channels, width), *stage(width, 2 * width), nn.Flatten(),
                                  nn.Linear(flat, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, self.n_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] → (B, feature_dim) penultimate activations (after the ReLU)."""
        return self.body(2 * x - 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$FASTLANGEVIN_CACHE``, else ``~/.cache/fastlangevin``."""
    return Path(cache_dir or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "fastlangevin").expanduser()


def data_fingerprint(dataset) -> str:
    """sha256 of an ArrayDataset's stored samples (as held: bytes for 8-bit images), labels, shapes and scale."""
    h = hashlib.sha256()
    for t in (dataset.data, dataset.targets):
        t = t.detach().cpu().contiguous()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    h.update(repr(dataset.max_value).encode())
    return h.hexdigest()


def classifier_path(train_set, config: ClassifierConfig, cache_dir=None) -> Path:
    """Where the classifier for ``train_set`` and ``config`` is cached (see the module docstring)."""
    key = hashlib.sha256(json.dumps({"arch": ARCH_VERSION, "config": dataclasses.asdict(config),
                                     "data": data_fingerprint(train_set)}, sort_keys=True).encode()).hexdigest()
    shape = "x".join(map(str, train_set.sample_shape))
    return cache_root(cache_dir) / "classifiers" / f"{train_set.name}-{shape}-{key[:16]}.safetensors"


def accuracy(model: FeatureClassifier, dataset, batch_size: int = 1000) -> float:
    """Share of ``dataset``'s samples whose arg-max logit is their label."""
    x, y = dataset.tensors()
    device = next(model.parameters()).device
    with torch.no_grad():
        hits = sum((model(xb.to(device)).argmax(1).cpu() == yb).sum().item()
                   for xb, yb in zip(x.split(batch_size), y.split(batch_size)))
    return hits / len(y)


def train_classifier(train_set, config: ClassifierConfig, device: str = "cpu") -> FeatureClassifier:
    """A FeatureClassifier trained with Adam on cross-entropy, ``config.steps(N)`` batches drawn epoch by epoch from
    a seeded permutation; deterministic for a given seed, and torch's global random state is left untouched (so a
    training run that evaluates with it stays reproducible). Returns it in eval mode."""
    x, y = train_set.tensors()
    if x.dim() != 4:
        raise ValueError(f"train_set must hold (C, H, W) images, got samples of shape {tuple(x.shape[1:])}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        model = FeatureClassifier(x.shape[1:], int(y.max()) + 1, config.width, config.feature_dim).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.lr)
    g = torch.Generator().manual_seed(config.seed)
    order, cursor = torch.randperm(len(y), generator=g), 0
    for _ in range(config.steps(len(y))):
        if cursor + config.batch_size > len(y):
            order, cursor = torch.randperm(len(y), generator=g), 0
        index = order[cursor:cursor + config.batch_size]
        cursor += config.batch_size
        loss = nn.functional.cross_entropy(model(x[index].to(device)), y[index].to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval().requires_grad_(False)


def load_or_train_classifier(name: str, data_dir: str | os.PathLike | None = None, *, data_seed: int = 0,
                             config: ClassifierConfig | None = None, cache_dir: str | os.PathLike | None = None,
                             device: str = "cpu") -> tuple[FeatureClassifier, float]:
    """(classifier in eval mode, its test-split accuracy) for the image data set ``name``: loaded from the cache
    when a file for this data and config is there, otherwise trained on ``make_dataset(name, data_dir, "train",
    seed=data_seed)``, scored on the test split and saved (atomically)."""
    config = config or ClassifierConfig()
    train_set = make_dataset(name, data_dir, "train", seed=data_seed)
    if len(train_set.sample_shape) != 3:
        raise ValueError(f"the Fréchet classifier is for image data sets, not {name} (samples "
                         f"{train_set.sample_shape})")
    path = classifier_path(train_set, config, cache_dir)
    if path.exists():
        with safe_open(path, framework="pt") as f:
            meta = json.loads(f.metadata()[META_KEY])
        model = FeatureClassifier(train_set.sample_shape, meta["n_classes"], config.width, config.feature_dim)
        model.load_state_dict(load_file(path))
        return model.to(device).eval().requires_grad_(False), meta["test_accuracy"]
    print(f"training the {name} feature classifier for the Fréchet distance (once; cached at {path})")
    model = train_classifier(train_set, config, device)
    test_accuracy = accuracy(model, make_dataset(name, data_dir, "test", seed=data_seed))
    print(f"{name} feature classifier: test accuracy {test_accuracy:.1%}")
    meta = {"config": dataclasses.asdict(config), "arch_version": ARCH_VERSION, "n_classes": model.n_classes,
            "test_accuracy": test_accuracy, "data": name, "image_shape": list(train_set.sample_shape)}
    tensors = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, save(tensors, metadata={META_KEY: json.dumps(meta)}))
    return model, test_accuracy
