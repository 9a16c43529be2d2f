"""fastlangevin: fast Langevin sampling in the latent space of energy-based models.

    import fastlangevin as fl
    z = fl.langevin(energy, z0, n_steps=60, step_size=0.01)

Importing is light: compiled extensions, Triton and optional packages load on first use (``fl.backend_info()``).
"""

from fastlangevin import ops
from fastlangevin._version import __version__
from fastlangevin.backends import BackendUnavailableError, backend_info
from fastlangevin.energies import MLP, GaussianMixtureEnergy, GaussianPosteriorEnergy, MLPEnergy
from fastlangevin.priors import CallablePrior, DiagonalNormalPrior, FlatPrior, NormalPrior, Prior
from fastlangevin.sampler import LangevinInfo, LangevinSampler, NonFiniteEnergyError, langevin

__all__ = [
    "BackendUnavailableError", "CallablePrior", "DiagonalNormalPrior", "FlatPrior", "GaussianMixtureEnergy",
    "GaussianPosteriorEnergy", "LangevinInfo", "MLP", "MLPEnergy",
    "LangevinSampler", "NonFiniteEnergyError", "NormalPrior", "Prior", "backend_info", "langevin", "ops",
]
