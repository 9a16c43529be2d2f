"""Backbones for the latent EBM: generators G(z) with an N(0, I) latent — VAE, GLOW and GLF — on 2-D vectors
and images. ``make_model(name, **config)`` builds one; ``model.config`` is the config that rebuilds it."""

from __future__ import annotations

from fastlangevin.models.base import LatentGenerativeModel
from fastlangevin.models.flows import ActNorm, AffineCoupling, FlowSequence, InvertibleLinear, Squeeze, VectorFlow, \
    flow_step
from fastlangevin.models.glf import GLF
from fastlangevin.models.glow import Glow, MultiScaleFlow, SplitPrior
from fastlangevin.models.hierarchical import EpsilonEnergy, HierarchicalVAE, JointEBMPrior
from fastlangevin.models.lebm import JointLatentEBM, LatentEBM, VariationalLatentEBM, make_prior_model
from fastlangevin.models.vae import VAE

MODELS = {"vae": VAE, "glow": Glow, "glf": GLF}


def make_model(name: str, **config) -> LatentGenerativeModel:
    """``make_model("vae", data_shape=(2,), latent_dim=2)``; the keyword arguments are the class's."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of {tuple(MODELS)}")
    return MODELS[name](**config)


__all__ = [
    "MODELS", "make_model", "LatentGenerativeModel", "VAE", "Glow", "GLF", "ActNorm", "InvertibleLinear",
    "AffineCoupling", "Squeeze", "FlowSequence", "flow_step", "VectorFlow", "SplitPrior", "MultiScaleFlow",
    "HierarchicalVAE", "JointEBMPrior", "EpsilonEnergy",
    "LatentEBM", "VariationalLatentEBM", "JointLatentEBM", "make_prior_model",
]
