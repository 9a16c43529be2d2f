"""Sample-quality metrics.

The Fréchet distances (``frechet``, ``classifier``, ``inception``) are imported on first use: they pull in the data
sets (scikit-learn) and safetensors, which the two-sample and toy metrics do not need.
"""

import importlib

from fastlangevin.metrics.mmd import default_bandwidths, energy_distance, median_distance, mmd2
from fastlangevin.metrics.toy import ModeCoverage, mode_coverage

_WHERE = {
    "frechet_distance": "frechet", "feature_statistics": "frechet", "FrechetClassifierDistance": "frechet",
    "frechet_classifier_distance": "frechet",
    "ClassifierConfig": "classifier", "FeatureClassifier": "classifier", "load_or_train_classifier": "classifier",
    "inception_fid": "inception", "InceptionUnavailable": "inception",
}

__all__ = ["ModeCoverage", "mode_coverage", "mmd2", "energy_distance", "median_distance", "default_bandwidths",
           *sorted(_WHERE)]


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"fastlangevin.metrics.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'fastlangevin.metrics' has no attribute {name!r}")
