"""Reference trainers built on the sampler API: backbones (``train-base``), the latent EBM of the exponential-tilting
paper on them (``tilt``), its pixel-space baseline (``train-pixel-ebm``), and generators learned with latent EBM
priors (``train-prior``). Trainers call ``fl.langevin`` only, never the kernels.

One loop (``loop.py``) runs every trainer; a trainer is a ``trainer.Trainer`` with a settings dataclass
(``settings.py``), registered in ``registry.py``; ``commands.py`` builds the command line from the registry.
Names are imported on first use (``fastlangevin.trainers.train_tilt`` imports ``trainers.tilt``), so building the
command line imports neither the data sets (scikit-learn) nor plotting.
"""

import importlib
import importlib.util

# the modules whose public names ``fastlangevin.trainers.<name>`` finds, besides the trainers' own modules
SHARED_MODULES = ("loop", "trainer", "settings", "checkpoint", "chains", "quality", "energy_nets", "shared", "monitor",
                  "run_folder", "distributed", "registry")


def __getattr__(name):
    if name.startswith("_"):
        raise AttributeError(name)
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:  # a submodule
        return importlib.import_module(f"{__name__}.{name}")
    registry = importlib.import_module(f"{__name__}.registry")
    for module in [f"{__name__}.{m}" for m in SHARED_MODULES] + list(registry.TRAINER_MODULES):
        found = getattr(importlib.import_module(module), name, None)
        if found is not None and getattr(found, "__module__", module) == module:
            return found
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
