"""Sample-quality metrics."""

from fastlangevin.metrics.toy import ModeCoverage, mode_coverage

__all__ = ["ModeCoverage", "mode_coverage"]
