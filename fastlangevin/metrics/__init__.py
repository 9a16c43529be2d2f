"""Sample-quality metrics."""

from fastlangevin.metrics.mmd import default_bandwidths, energy_distance, median_distance, mmd2
from fastlangevin.metrics.toy import ModeCoverage, mode_coverage

__all__ = ["ModeCoverage", "mode_coverage", "mmd2", "energy_distance", "median_distance", "default_bandwidths"]
