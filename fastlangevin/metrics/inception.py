"""The standard Inception FID, only where ``pytorch-fid`` or ``torchmetrics`` (with ``torch-fidelity``) is installed
AND its Inception weights already sit in torch hub's checkpoint folder: nothing is ever downloaded. Otherwise
``InceptionUnavailable`` says, per backend, what is missing (no silent fallback to another network).

Both backends give the 2048-d pool3 features of the TF-ported FID Inception; images (N, C, H, W) in [0, 1] with
C = 1 (replicated to 3 channels) or 3 are resized to 299×299 by the backend itself. The distance is
``fastlangevin.metrics.frechet.frechet_distance`` of their means and covariances.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from fastlangevin.metrics.frechet import check_images, feature_statistics, frechet_distance

FEATURE_DIM = 2048


class InceptionUnavailable(RuntimeError):
    """No Inception FID backend can run without a download; the message lists why for each."""


def _hub_weights(url: str, package: str) -> str:
    """The path torch hub caches ``url`` at; InceptionUnavailable when that file is missing."""
    path = os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))
    if not os.path.isfile(path):
        raise InceptionUnavailable(f"{package} is installed but its Inception weights are not at {path} "
                                   f"(fastlangevin never downloads; fetch {url} there once)")
    return path


def _pytorch_fid(device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        from pytorch_fid import inception
    except ImportError as e:
        raise InceptionUnavailable(f"pytorch-fid is not installed ({e})") from None
    _hub_weights(inception.FID_WEIGHTS_URL, "pytorch-fid")
    net = inception.InceptionV3([inception.InceptionV3.BLOCK_INDEX_BY_DIM[FEATURE_DIM]], resize_input=True,
                                normalize_input=True).to(device).eval()
    return lambda x: net(x)[0].flatten(1)  # takes [0, 1] floats


def _torchmetrics(device: str) -> Callable[[torch.Tensor], torch.Tensor]:
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as e:
        raise InceptionUnavailable(f"torchmetrics with torch-fidelity is not installed ({e})") from None
    path = _hub_weights(URL_INCEPTION_V3, "torchmetrics")
    net = NoTrainInceptionV3(name="inception-v3-compat", features_list=[str(FEATURE_DIM)],
                             feature_extractor_weights_path=path).to(device).eval()
    return lambda x: net((x * 255).round().to(torch.uint8)).flatten(1)  # takes bytes, as torchmetrics' FID


BACKENDS: tuple[tuple[str, Callable], ...] = (("pytorch-fid", _pytorch_fid), ("torchmetrics", _torchmetrics))


def inception_features(device: str = "cpu") -> tuple[str, Callable[[torch.Tensor], torch.Tensor]]:
    """(backend name, features: (N, 3, H, W) in [0, 1] → (N, 2048)) from the first backend of ``BACKENDS``
    that runs offline; InceptionUnavailable naming every backend's reason otherwise."""
    reasons = []
    for name, load in BACKENDS:
        try:
            return name, load(device)
        except InceptionUnavailable as e:
            reasons.append(f"{name}: {e}")
    raise InceptionUnavailable("standard Inception FID skipped: " + "; ".join(reasons))


def _rgb(images: torch.Tensor, name: str) -> torch.Tensor:
    if images.dim() != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"{name} must be (N, 1 or 3, H, W) images, got {tuple(images.shape)}")
    check_images(images, name)
    return images.detach().float().clamp(0, 1).expand(-1, 3, -1, -1)


def inception_fid(samples: torch.Tensor, reference: torch.Tensor, device: str = "cpu",
                  batch_size: int = 50) -> tuple[float, str]:
    """(FID, description) of samples vs reference, both (N, 1 or 3, H, W) in [0, 1] (clamped; grey replicated to
    RGB). Raises InceptionUnavailable when no backend runs offline."""
    samples, reference = _rgb(samples, "samples"), _rgb(reference, "reference")
    backend, features = inception_features(device)

    def statistics(images):
        with torch.no_grad():
            return feature_statistics(torch.cat([features(chunk.to(device)).cpu()
                                                 for chunk in images.split(batch_size)]))

    return (frechet_distance(*statistics(samples), *statistics(reference)),
            f"fid: Fréchet distance on {FEATURE_DIM}-d Inception-v3 pool3 features ({backend})")
