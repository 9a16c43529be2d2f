"""``train-prior joint``: the hierarchical VAE (``trainers/hierarchical.py``) with the joint latent EBM prior
p(z) ∝ exp(f(z))·p_β(z), f = Σ_i f_i(z_i) (the paper's sign: high = likely), sampled in ε-space.

First the VAE as ``gaussian`` (its stage, run by the same loop; or ``init_from`` a gaussian run: the same
generator), then the EBMs. Negatives z⁻ = T_β(ε_K), ε_K from a short-run, non-persistent ε-space chain
ε_0 ~ N(0, I) on the run's one ``EpsilonEnergy`` (VAE and EBMs, built once); positives z⁺ ~ q(z|x).

* ``scheme="two-stage"`` (default; the reference code, reference-code.md §2b): the VAE is frozen and each f_i learns
  from loss_i = mean f_i(z⁻) − mean f_i(z⁺).
* ``scheme="joint"``: the ELBO with the EBM prior trains everything: rec + KL(q ‖ p_β) − mean f(z⁺) + log Z, with
  ∇ log Z estimated by the prior chain's samples (supplement eqs. 3–6): the surrogate mean f(z⁻) + mean log p_β(z⁻)
  (z⁻ detached) gives α the gradient E_{p}[∇f] and β the gradient E_{p}[∇ log p_β(z)].

Optimisers: one Adam param group per latent group's EBM (as the reference's one Adam per EBM; Adam is
per-parameter, so the two are the same), lr_e 5e-3, betas (0.99, 0.999), weight decay 3e-5 (the reference: lr 2e-5
to 1e-4 on GPUs for thousands of iterations; the CPU budget here is hundreds); the VAE, in the joint scheme,
Adam(joint_lr_g, (0.9, 0.999)).

RUN_DIR: config.json {"vae", "ebm"}, vae.safetensors (the VAE + Adam, step), ebm.safetensors (VAE and EBMs + Adam,
step; ``--resume``), metrics.json {"vae_training", "ebm_training"} with sample quality against the test split,
samples.png, hierarchical_resampling.png and, for ``joint``, langevin_transition.png.

Multi-process (``torchrun``, ``trainers.distributed``): each rank takes its B/N rows of the same global batch (and of
the global ε_0), runs its chains with its own seeds and draws its own reparametrisation noise (rank 0 keeps the
single-process ones), and the gradients are averaged over ranks before each Adam step — by DDP for the VAE stage,
by hand for the EBM stage, whose loss takes several forwards of the VAE and the EBMs. The logged losses and the
divergence checks are those of the global batch, so every rank stops together. Rank 0 evaluates and writes the run
directory. Equal to one process in distribution only (see ``trainers.distributed``); besides, the KL balancing of the
VAE's warm-up weights the groups by each rank's own batch KLs.
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from fastlangevin._io import atomic_write_bytes
from fastlangevin.models.hierarchical import EpsilonEnergy, HierarchicalVAE, JointEBMPrior, VARIANTS
from fastlangevin.trainers.checkpoint import load_checkpoint
from fastlangevin.trainers.hierarchical import VAE_CHECKPOINT, GaussianTrainer, VAESettings, VAEStage, check_finite, \
    figures, generate
from fastlangevin.trainers.loop import train
from fastlangevin.trainers.quality import sample_quality
from fastlangevin.trainers.registry import register
from fastlangevin.trainers.run_folder import RunFolder
from fastlangevin.trainers.settings import defaults, setting
from fastlangevin.trainers.shared import ChainSettings
from fastlangevin.trainers.trainer import Trainer

EBM_CHECKPOINT = "ebm.safetensors"
SCHEMES = ("two-stage", "joint")


@dataclasses.dataclass
class JointSettings(VAESettings, ChainSettings):
    steps: int = setting(200, "EBM iterations", low=1, resume="extend", exclusive="length")
    vae_steps: int = setting(1500, "VAE stage steps (without --init-from)", low=1)
    init_from: str | None = setting(None, "start from this gaussian run's VAE (instead of a VAE stage)")
    scheme: str = setting("two-stage", "frozen VAE (the reference code) or the ELBO with the EBM prior training "
                                       "everything", choices=SCHEMES)
    variant: str = setting("paper", "epsilon-space target: exp f(T(eps)) N(eps) (paper) or the reference code's "
                                    "p_beta(T(eps)) (code)", choices=VARIANTS)
    lr_e: float = setting(5e-3, "Adam lr of the EBMs", above=0)
    joint_lr_g: float = setting(1e-4, "joint scheme: Adam lr of the VAE while the EBMs train", above=0)
    betas: tuple[float, float] = setting((0.99, 0.999), "Adam betas of the EBMs", low=0, below=1,
                                         metavar=("BETA1", "BETA2"))
    weight_decay: float = setting(3e-5, "Adam weight decay of the EBMs", low=0)
    energy_width: int = setting(32, "hidden width of each f_i (nef)", low=1)
    energy_layers: int = setting(2, "hidden layers of each f_i", low=1)
    prior_steps: int = setting(20, "epsilon-space chain length", low=1)
    prior_step_size: float = setting(0.05, "epsilon-space chain step h", above=0)
    sample_steps: int | None = setting(None, "chain steps for evaluation and figures (default: prior_steps)", low=1)
    checkpoint_every: int = setting(100, "steps between checkpoints", low=1, resume="invocation")

    def __post_init__(self):
        if self.sample_steps is None:
            self.sample_steps = self.prior_steps
        vae_stage = ("classes", "n_train", "lr_g", "kl_warmup", "latent_channels", "channels", "param_factor",
                     "n_cells", "vae_steps")
        default = defaults(JointSettings)
        changed = [name for name in vae_stage if getattr(self, name) != default[name]]
        if self.init_from is not None and changed:
            raise ValueError(f"init_from: the VAE comes from {self.init_from}; drop {', '.join(changed)}")

    def stage_values(self) -> dict:
        """The settings of the VAE stage."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(VAESettings)}
        return {**values, "steps": self.vae_steps, "epochs": None}


@register("train-prior joint")
class JointTrainer(Trainer):
    """the joint EBM prior f = sum_i f_i(z_i) on the hierarchical VAE

    The module docstring says how."""

    Settings, section, checkpoint = JointSettings, "ebm", EBM_CHECKPOINT
    log_every, shown, batch_stream = 10, ("loss", "energy_gap"), 1

    @classmethod
    def model_for(cls, folder, section: dict, checkpoint: str) -> nn.ModuleDict:
        vae = HierarchicalVAE(**folder.section("vae", checkpoint)["model_config"])
        return nn.ModuleDict({"vae": vae, "ebm": JointEBMPrior(**section["prior_config"])})

    @classmethod
    def upgrade(cls, section: dict) -> dict:
        """Before the one training loop, the section named the EBMs' size only in ``prior_config`` and ``lr_g`` was
        the joint scheme's VAE lr."""
        if "energy_width" in section or "prior_config" not in section:
            return section
        old = {k: v for k, v in section.items() if k != "lr_g"}
        return {**old, "energy_width": section["prior_config"]["nef"],
                "energy_layers": section["prior_config"]["n_layers"], "joint_lr_g": section.get("lr_g", 1e-4)}

    @classmethod
    def resume_section(cls, folder: RunFolder) -> dict | None:
        if not folder.has(EBM_CHECKPOINT) and folder.has(VAE_CHECKPOINT):
            return None  # interrupted in the VAE stage: ``prepare`` finishes it, then the EBMs start
        return super().resume_section(folder)

    def prepare(self) -> None:
        """The VAE: finish or run its stage, or adopt ``init_from``'s; then load it."""
        settings, folder, options = self.settings, self.folder, self.options
        stage = dict(device=options.device, progress=options.progress)
        if options.resume and self.saved is None:
            if "init_from" not in folder.config().get("vae", {}):  # (the checkpoint's own section is its source's)
                train(VAEStage, folder.path, resume=True, **stage)
        elif self.saved is None and settings.init_from is None:
            train(VAEStage, folder.path, overwrite=options.overwrite, **stage, **settings.stage_values())
        elif self.saved is None:
            if self.ctx.is_main:
                adopt_vae(settings.init_from, folder, settings.data)
            self.ctx.barrier()  # the others read what rank 0 wrote
        # the VAE section a resumed checkpoint was trained with (it holds the VAE's weights too), else the stage's
        self.vae_config = folder.section("vae", EBM_CHECKPOINT if self.saved is not None else VAE_CHECKPOINT)
        if self.vae_config["data"] != settings.data:
            raise ValueError(f"data: the VAE of {folder.path} was trained on {self.vae_config['data']!r}, not "
                             f"{settings.data!r}")
        self.vae = HierarchicalVAE(**self.vae_config["model_config"]).to(self.device)
        load_checkpoint(folder.file(VAE_CHECKPOINT), self.vae)

    def data_source(self) -> dict:
        return {k: self.vae_config[k] for k in ("data", "data_dir", "seed", "n_train", "classes")}

    def build(self) -> None:
        settings, vae = self.settings, self.vae
        self.ebm = JointEBMPrior(vae.group_dims, settings.energy_width, settings.energy_layers).to(self.device)
        self.model = nn.ModuleDict({"vae": vae, "ebm": self.ebm})
        groups = [{"params": list(e.parameters())} for e in self.ebm.energies]
        if settings.scheme == "joint":
            groups.append({"params": list(vae.parameters()), "lr": settings.joint_lr_g, "betas": (0.9, 0.999),
                           "weight_decay": 0.0})
        self.optimizer = torch.optim.Adam(groups, lr=settings.lr_e, betas=settings.betas,
                                          weight_decay=settings.weight_decay)
        vae.eval().requires_grad_(settings.scheme == "joint")  # GroupNorm only: eval and train are the same function
        self.energy = EpsilonEnergy(vae, self.ebm, settings.variant)  # every chain's energy
        self.test_set = self.dataset("test")

    def step(self, step: int) -> dict:
        settings, ctx, vae, ebm = self.settings, self.ctx, self.vae, self.ebm
        x = self.batch(step)
        generator = torch.Generator().manual_seed(self.step_seed(step))
        eps0 = ctx.shard(torch.randn(settings.batch_size, vae.latent_dim, generator=generator)).to(self.device)
        eps = self.chains("prior", step, self.energy, eps0, settings.prior_steps, settings.prior_step_size,
                          seed=ctx.rank_seed(self.step_seed(step)))
        with torch.no_grad():
            z_neg, _ = vae.transform(eps)
        f_neg = ebm.per_group(z_neg)
        if settings.scheme == "two-stage":
            with torch.no_grad():
                z_pos = vae.posterior(x).z
            f_pos = ebm.per_group(z_pos)
            loss = (f_neg.mean(0) - f_pos.mean(0)).sum()  # Σ_i loss_i; each EBM sees only its own term
            terms = {}
        else:
            post = vae.posterior(x)
            f_pos = ebm.per_group(post.z)
            terms = {"reconstruction": -vae.log_likelihood(x, post.logits).mean(),
                     "kl": torch.stack(post.kl, 1).sum(1).mean()}
            log_z = f_neg.sum(1).mean() + vae.prior_log_prob(z_neg).mean()  # ∇: E_p[∇f] and E_p[∇ log p_β]
            loss = terms["reconstruction"] + terms["kl"] - f_pos.sum(1).mean() + log_z
        gap = f_pos.sum(1).mean() - f_neg.sum(1).mean()  # f(z⁺) − f(z⁻): > 0 while the EBM separates them
        # the global batch's values, on every rank (batch means: the mean over ranks; |f|: the max over ranks)
        loss_value, gap, f_groups_pos, f_groups_neg, *term_values = (
            t.tolist() for t in ctx.mean_over_ranks([loss, gap, f_pos.mean(0), f_neg.mean(0), *terms.values()]))
        f_max = ctx.all_gather(torch.stack([f_neg.abs().max(), f_pos.abs().max()]).detach()[None]).max(0).values
        check_finite(loss_value, "the loss", step, "lower --lr-e or --prior-step-size")
        check_finite(f_max.sum().item(), "|f|", step, "lower --lr-e")
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        ctx.average_gradients(p for group in self.optimizer.param_groups for p in group["params"])
        self.optimizer.step()
        return {"loss": loss_value, "energy_gap": gap, "f_groups_pos": f_groups_pos, "f_groups_neg": f_groups_neg,
                **dict(zip(terms, term_values))}

    def _samples(self) -> torch.Tensor:
        settings = self.settings
        return generate(self.vae, self.energy, len(self.test_set), settings.sample_steps, settings.prior_step_size,
                        seed=settings.seed + 12345, sampler=settings.sampler)

    def evaluate(self, step: int) -> dict:
        self.vae.requires_grad_(False)
        self.ebm.eval().requires_grad_(False)
        self.samples = self._samples()
        quality = sample_quality(self.samples, self.test_set)
        quality.pop("mmd_bandwidths")
        return {"sample_quality": quality}

    def finish(self, state) -> None:
        settings = self.settings
        samples = getattr(self, "samples", None)
        figures(self.folder, self.vae, self.energy, self.test_set, self._samples() if samples is None else samples,
                settings.sample_steps, settings.prior_step_size, settings.seed, settings.sampler)

    def architecture(self) -> dict:
        return {"prior_config": self.ebm.config, "ebm_param_count": sum(p.numel() for p in self.ebm.parameters())}

    def companions(self) -> dict:
        return {"vae": self.vae_config}  # the checkpoint holds the VAE too: it loads on its own

    def summary(self, state, last: dict) -> dict:
        final = state.history[-1] if state.history else {}
        return {"energy_gap": final.get("energy_gap"), "sample_quality": final.get("sample_quality"),
                "chain_seconds_per_iteration": self.chains.timer.seconds / max(state.steps_run, 1)}


def load_run(run_dir: str | os.PathLike, device: str = "cpu") -> tuple[HierarchicalVAE, JointEBMPrior | None, dict]:
    """The run's VAE and (after ``joint``) EBM prior, frozen, and its config."""
    folder = RunFolder(run_dir)
    config = folder.config()
    if folder.has(EBM_CHECKPOINT):  # VAE and EBMs, with the VAE section they were trained with
        both, config["ebm"], _ = JointTrainer.load(folder)
        config["vae"] = folder.section("vae", EBM_CHECKPOINT)
        return both["vae"].to(device), both["ebm"].to(device), config
    vae, config["vae"], _ = GaussianTrainer.load(folder)
    return vae.to(device), None, config


def adopt_vae(init_from: str | os.PathLike, folder: RunFolder, data: str) -> None:
    """Copy a gaussian run's VAE, trained on ``data``, into ``folder`` (the weights atomically, then the config):
    the joint run starts from the same generator. Nothing is written when the source does not fit."""
    source = RunFolder(init_from)
    section = source.require("vae", VAE_CHECKPOINT, "--init-from takes a `fastlangevin train-prior gaussian` run")
    if section["data"] != data:
        raise ValueError(f"data: the VAE of {source.path} was trained on {section['data']!r}, not {data!r}")
    if os.path.abspath(source.path) != os.path.abspath(folder.path):
        os.makedirs(folder.path, exist_ok=True)
        with open(source.file(VAE_CHECKPOINT), "rb") as f:
            atomic_write_bytes(folder.file(VAE_CHECKPOINT), f.read())
    folder.write_config("vae", {**section, "init_from": os.fspath(init_from)})


def train_hierarchical(model: str, data: str, out: str | os.PathLike, **settings) -> dict:
    """``fastlangevin train-prior gaussian|joint --data DATA --out OUT``: settings by name (``GaussianSettings``,
    ``JointSettings``; ``resume``, ``device``, ``progress`` as ``loop.train``); returns the metrics."""
    trainers = {"gaussian": GaussianTrainer, "joint": JointTrainer}
    if model not in trainers:
        raise ValueError(f"model must be one of {tuple(trainers)}, got {model!r}")
    return train(trainers[model], out, data=data, **settings)
