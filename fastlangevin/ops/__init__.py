"""Kernels and their references: one module per op (``langevin_step``), the noise stream (``philox``)."""

from fastlangevin.ops.langevin_step import langevin_step, make_rng_state
from fastlangevin.ops.langevin_step_reference import langevin_step_reference
from fastlangevin.ops.philox import normal_noise

__all__ = ["langevin_step", "langevin_step_reference", "make_rng_state", "normal_noise"]
