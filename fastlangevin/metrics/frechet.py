"""Fréchet distances between Gaussians fitted to features: the formula, and the image metric on the features of a
classifier that fastlangevin trains itself (``fastlangevin.metrics.classifier``), since Inception is not at hand.

    d² = ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr (Σ₁^½ Σ₂ Σ₁^½)^½

The trace term uses symmetric eigendecompositions in float64 (Σ₁^½ from eigh of Σ₁, then the eigenvalues of the
symmetric PSD Σ₁^½ Σ₂ Σ₁^½): real by construction and exact for singular covariances, where the usual
``scipy.linalg.sqrtm(Σ₁ Σ₂)`` of a non-symmetric product needs an ε·I offset and drops an imaginary part. Both
give the same value where the product is well conditioned (tests/test_metrics.py checks it against scipy).
"""

from __future__ import annotations

import os

import torch

from fastlangevin.metrics.classifier import ClassifierConfig, FeatureClassifier, cache_root, load_or_train_classifier


def _psd_sqrt(sigma: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric PSD matrix (negative rounding-error eigenvalues set to 0)."""
    values, vectors = torch.linalg.eigh(sigma)
    return (vectors * values.clamp(min=0).sqrt()) @ vectors.T


def _check_gaussian(mu, sigma, which: str) -> tuple[torch.Tensor, torch.Tensor]:
    mu, sigma = torch.as_tensor(mu, dtype=torch.float64), torch.as_tensor(sigma, dtype=torch.float64)
    if mu.dim() != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
        raise ValueError(f"mu{which} must be (D,) and sigma{which} (D, D), got {tuple(mu.shape)} and "
                         f"{tuple(sigma.shape)}")
    if not (torch.isfinite(mu).all() and torch.isfinite(sigma).all()):
        raise ValueError(f"mu{which} and sigma{which} must be finite (no NaN or inf)")
    scale = sigma.abs().max().item()
    if (sigma - sigma.T).abs().max().item() > 1e-8 * max(scale, 1e-300):
        raise ValueError(f"sigma{which} must be symmetric (a covariance matrix)")
    return mu, sigma


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """The squared Fréchet (2-Wasserstein) distance between N(mu1, sigma1) and N(mu2, sigma2): mu (D,), sigma
    (D, D) symmetric PSD, any float dtype or array-like; computed in float64. Returns d² ≥ 0 (the quantity FID
    reports)."""
    mu1, sigma1 = _check_gaussian(mu1, sigma1, "1")
    mu2, sigma2 = _check_gaussian(mu2, sigma2, "2")
    if mu1.shape != mu2.shape:
        raise ValueError(f"the two Gaussians must have the same dimension, got {mu1.shape[0]} and {mu2.shape[0]}")
    root1 = _psd_sqrt(sigma1)
    middle = root1 @ sigma2 @ root1
    cross = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    d2 = (mu1 - mu2).pow(2).sum() + sigma1.trace() + sigma2.trace() - 2 * cross
    return max(d2.item(), 0.0)


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (D,) and unbiased covariance (D, D), float64, of ``features`` (N, D) with N ≥ 2."""
    if features.dim() != 2 or features.shape[0] < 2:
        raise ValueError(f"features must be (N, D) with N >= 2, got {tuple(features.shape)}")
    features = features.detach().double().cpu()
    return features.mean(0), torch.cov(features.T).reshape(features.shape[1], features.shape[1])


def check_images(images: torch.Tensor, name: str) -> None:
    """At least 2 images (a covariance needs them), all values finite; a ValueError naming ``name`` otherwise."""
    if images.shape[0] < 2:
        raise ValueError(f"{name}: a covariance needs at least 2 images, got {images.shape[0]}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name} contain NaN or inf values")


# Classifiers loaded in this process, so an evaluation every few training steps costs a forward pass, not a load
# (the training data is not hashed again: files changed under a running process are not noticed).
_LOADED: dict[tuple, tuple[FeatureClassifier, str]] = {}


def _classifier(name: str, data_dir, data_seed: int, config: ClassifierConfig, cache_dir, device: str):
    key = (name, None if data_dir is None else os.path.abspath(os.fspath(data_dir)), data_seed, config,
           cache_root(cache_dir).resolve(), str(device))
    if key not in _LOADED:
        model, accuracy = load_or_train_classifier(name, data_dir, data_seed=data_seed, config=config,
                                                   cache_dir=cache_dir, device=device)
        _LOADED[key] = (model, f"fcd: Fréchet distance on {config.feature_dim}-d penultimate features of "
                               f"fastlangevin's {name} classifier (conv net, width {config.width}, not Inception; "
                               f"test acc {accuracy:.1%})")
    return _LOADED[key]


class FrechetClassifierDistance:
    """Fréchet distance between images and a reference ArrayDataset on the features of the project's classifier
    for that data set (trained on its train split on first use and cached; see ``load_or_train_classifier``).

    ``reference``: an image ArrayDataset ((C, H, W) samples in [0, 1]); its μ, Σ are computed once here.
    ``data_dir`` / ``data_seed``: where ``make_dataset(reference.name, data_dir, "train", seed=data_seed)`` finds
    the classifier's training data (the seed fixes the digits' split). ``description`` names the feature network.
    Calling it with samples (N, C, H, W), N ≥ 2, returns d² (lower is better; ≥ 0).
    """

    def __init__(self, reference, data_dir: str | os.PathLike | None = None, *, data_seed: int = 0,
                 config: ClassifierConfig | None = None, cache_dir: str | os.PathLike | None = None,
                 device: str = "cpu", batch_size: int = 1000):
        shape = tuple(getattr(reference, "sample_shape", ()))
        if len(shape) != 3:
            raise ValueError(f"reference must be an image data set with (C, H, W) samples, got {reference!r}; "
                             f"the Fréchet classifier distance is for images (use mmd2 / energy_distance for "
                             f"vectors)")
        self.model, self.description = _classifier(reference.name, data_dir, data_seed, config or ClassifierConfig(),
                                                   cache_dir, device)
        if tuple(self.model.image_shape) != shape:
            raise ValueError(f"reference samples are {shape} but the {reference.name} classifier takes "
                             f"{tuple(self.model.image_shape)}")
        self.device, self.batch_size = device, batch_size
        self.reference_statistics = feature_statistics(self.features(reference.tensors()[0], "reference"))

    def features(self, images: torch.Tensor, name: str = "samples") -> torch.Tensor:
        """Penultimate-layer features (N, feature_dim), float32 on the CPU, of images (N, C, H, W)."""
        shape = tuple(self.model.image_shape)
        if images.dim() != 4 or tuple(images.shape[1:]) != shape:
            raise ValueError(f"{name} must be (N, {', '.join(map(str, shape))}) images, got {tuple(images.shape)}")
        check_images(images, name)
        with torch.no_grad():
            return torch.cat([self.model.features(chunk.to(self.device).float()).cpu()
                              for chunk in images.detach().split(self.batch_size)])

    def __call__(self, samples: torch.Tensor) -> float:
        return frechet_distance(*feature_statistics(self.features(samples)), *self.reference_statistics)


def frechet_classifier_distance(samples: torch.Tensor, reference, data_dir: str | os.PathLike | None = None,
                                **kwargs) -> tuple[float, str]:
    """(d², description of the feature network) for samples (N, C, H, W) against ``reference``;
    ``kwargs`` as ``FrechetClassifierDistance``."""
    metric = FrechetClassifierDistance(reference, data_dir, **kwargs)
    return metric(samples), metric.description
