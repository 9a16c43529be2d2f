"""Reference trainers built on the sampler API: backbones (``train_base``) and the latent EBM of the
exponential-tilting paper on top of them (``train_tilt``, ``sample_run``, ``evaluate_run``). The commands are in
``fastlangevin.trainers.commands``. Trainers call ``fl.langevin`` only, never the kernels.

Names are imported on first use, so registering the commands on the CLI (``fastlangevin.trainers.commands``)
imports neither the data sets (scikit-learn) nor the models.
"""

import importlib

_WHERE = {
    "train_base": "base", "load_base": "base", "default_model_config": "base",
    "train_tilt": "tilt", "sample_run": "tilt", "evaluate_run": "tilt", "format_evaluation": "tilt",
    "sample_tilted": "tilt", "load_energy": "tilt",
    "make_energy": "energy_nets", "ConvEnergy": "energy_nets",
    "sample_quality": "quality",
    "save_checkpoint": "checkpoint", "load_checkpoint": "checkpoint", "atomic_write_bytes": "checkpoint",
    "write_json": "checkpoint", "read_json": "checkpoint",
    "run_chain": "chains", "eager_langevin": "chains", "ChainTimer": "chains", "SAMPLERS": "chains",
    "train_lebm": "lebm",
    "train_hierarchical": "hierarchical",
    "train_pixel_ebm": "pixel_ebm", "sample_pixel_run": "pixel_ebm", "evaluate_pixel_run": "pixel_ebm",
    "format_pixel_evaluation": "pixel_ebm", "is_pixel_run": "pixel_ebm", "load_pixel_ebm": "pixel_ebm",
}

__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f"fastlangevin.trainers.{_WHERE[name]}"), name)
    raise AttributeError(f"module 'fastlangevin.trainers' has no attribute {name!r}")
