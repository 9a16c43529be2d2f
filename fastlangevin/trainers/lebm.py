"""``train-prior lebm | lebm-vi | joint-mle``: a generator and its latent-space EBM prior learned together by
maximum likelihood with short-run Langevin chains (models in ``fastlangevin.models.lebm``; sign convention there:
E is an energy, low = likely).

Per batch x (the references' order, ``/work/shared/reference-code.md`` §1, §2a):

1. posterior chain  z⁺ ~ p(z | x) ∝ exp(−‖x − G(z)‖²/(2σ²) − E(z))·p_β(z)   (20 steps, h = 0.01; joint-mle 40)
   — ``lebm-vi`` draws z⁺ from its encoder q(z|x) instead;
2. prior chain      z⁻ ~ p_α(z) ∝ exp(−E(z))·p_β(z)                          (60 steps, h = 0.16)
   — for ``lebm`` the fused ``fl.MLPEnergy`` chain (one kernel for all steps);
3. one Adam step on generator loss + energy loss (mean E(z⁺) − mean E(z⁻)). The references take two optimisers,
   G then E; one Adam over two parameter groups is the same update, since Adam is per parameter and neither loss
   reaches the other's parameters (``backward(inputs=...)`` keeps the VI loss's E(z_q) term off the energy).

Both chains start from fresh z₀ ~ N(0, I) (non-persistent); their energies are built once per run (the prior
chain's is the model's energy, the posterior chain's a ``PosteriorEnergy`` whose data buffer is refreshed with each
batch). ``lebm-vi`` keeps LEBM's prior chain (the follow-up code it follows runs 100 steps with h = 0.09; pass
``--prior-steps 100 --prior-step-size 0.09``). Every ``eval_every`` steps: sample quality against the test split of
the EBM prior (the prior chain) and of the generator with its Gaussian prior p_β alone.

Multi-process (``torchrun``): each rank takes its share of the global batch, runs its chains with its own seeds
(rank 0 keeps the single-process ones), and the gradients are averaged over ranks before the Adam step (what DDP
does; done by hand because the two losses take two backward passes); rank 0 evaluates and writes the run directory.
"""

from __future__ import annotations

import dataclasses
import math
import os

import torch

from fastlangevin.models.lebm import PRIOR_MODELS, PosteriorEnergy, make_prior_model
from fastlangevin.trainers.chains import langevin_transition
from fastlangevin.trainers.loop import train
from fastlangevin.trainers.quality import _pyplot, plot_panels, plot_transition, sample_quality, save_figure
from fastlangevin.trainers.registry import register
from fastlangevin.trainers.settings import setting
from fastlangevin.trainers.shared import ChainSettings, DataSettings, SeedSettings, transition_steps
from fastlangevin.trainers.trainer import Trainer

CHECKPOINT = "prior_model.safetensors"
MODEL_OPTIONS = ("latent_dim", "latent_dim2", "energy_width", "generator_width", "llhd_sigma")
BY_MODEL = "(default: the model's, see LatentEBM.defaults)"


@dataclasses.dataclass
class PriorSettings(DataSettings, ChainSettings, SeedSettings):
    """Defaults for a few-minute CPU run on the 8×8 digits. The references' lrs (E 2e-5, G 1e-4) are tuned for
    100-200 epochs of 50k-image data sets; 2,000 batches of 100 digits are ~140 epochs of 1,437 images but far fewer
    updates, so both lrs are 5× higher here (pass --lr-e 2e-5 --lr-g 1e-4 for the references')."""

    model: str = setting("lebm", "the model (set by the command)", choices=tuple(PRIOR_MODELS), cli=False)
    steps: int = setting(2000, "training batches", low=1, resume="extend", exclusive="length")
    batch_size: int = setting(100, "rows per batch (the papers'; the global batch under torchrun)", low=1)
    lr_e: float = setting(1e-4, "Adam lr of the energies", above=0)
    lr_g: float = setting(5e-4, "Adam lr of the generator (and encoder)", above=0)
    betas: tuple[float, float] | None = setting(None, f"Adam betas {BY_MODEL}", low=0, below=1,
                                                metavar=("BETA1", "BETA2"))
    latent_dim: int = setting(16, "z size (z1 for joint-mle)", low=1)
    latent_dim2: int | None = setting(None, "z2 size (joint-mle only)", low=1)
    energy_width: int | None = setting(None, "hidden width of the energy MLP(s)", low=1)
    generator_width: int | None = setting(None, "hidden width of the generator MLPs", low=1)
    llhd_sigma: float | None = setting(None, "std of the Gaussian p(x|z) on [0, 1] pixels", above=0)
    prior_steps: int | None = setting(None, f"prior chain length {BY_MODEL}", low=0)
    prior_step_size: float | None = setting(None, f"prior chain h = s^2 {BY_MODEL}", above=0)
    posterior_steps: int | None = setting(None, f"posterior chain length {BY_MODEL}; not lebm-vi", low=0)
    posterior_step_size: float | None = setting(None, f"posterior chain h {BY_MODEL}; not lebm-vi", above=0)
    eval_every: int = setting(500, "steps between sample-quality evaluations", low=1)
    n_eval: int = setting(1000, "samples per evaluation", low=2)
    checkpoint_every: int = setting(500, "steps between checkpoints", low=1, resume="invocation")
    latent_plot: bool = setting(False, "write latents.png: prior and posterior latents before and after their "
                                       "chains", resume="invocation")

    def __post_init__(self):
        if self.model != "joint-mle" and self.latent_dim2 is not None:
            raise ValueError(f"latent_dim2 applies to joint-mle only, not {self.model}")
        if self.model == "lebm-vi":
            if self.posterior_steps is not None or self.posterior_step_size is not None:
                raise ValueError("posterior_steps does not apply to lebm-vi (its encoder replaces the posterior "
                                 "chain)")
            chain_defaults = {k: v for k, v in PRIOR_MODELS[self.model].defaults.items() if "posterior" not in k}
        else:
            chain_defaults = PRIOR_MODELS[self.model].defaults
        for name, value in chain_defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, tuple(value) if name == "betas" else value)


@register("train-prior lebm")
class LEBMTrainer(Trainer):
    """LEBM: a generator with a latent EBM prior, posterior and prior chains

    See the module docstring; the subclasses below are its variational and 2-layer variants."""

    Settings, section, checkpoint, shown = PriorSettings, "prior", CHECKPOINT, ("loss", "energy_gap")

    @classmethod
    def model_for(cls, folder, section: dict, checkpoint: str):
        return make_prior_model(section["model"], **section["model_config"])

    @classmethod
    def preset(cls) -> dict:
        return {"model": cls.command.split()[-1]}

    @classmethod
    def upgrade(cls, section: dict) -> dict:
        """The section as written before the one training loop: its settings were nested under "settings"."""
        return {**section, **section.get("settings", {})}

    def build(self) -> None:
        settings = self.settings
        self.test_set = self.dataset("test")
        config = (self.saved["model_config"] if self.saved is not None else
                  {"data_shape": list(self.train_set.sample_shape),
                   **{k: getattr(settings, k) for k in MODEL_OPTIONS if getattr(settings, k) is not None}})
        self.model = net = make_prior_model(settings.model, **config).to(self.device)
        groups = [{"params": net.generator_parameters(), "lr": settings.lr_g},
                  {"params": net.energy_parameters(), "lr": settings.lr_e}]
        self.optimizer = torch.optim.Adam(groups, betas=settings.betas)
        self.posterior = PosteriorEnergy(net)  # the posterior chain's energy for the whole run
        fixed = torch.Generator().manual_seed(settings.seed + 7)  # the same evaluation latents at every evaluation
        self.z_eval = net.initial_latents(settings.n_eval, fixed, self.device)
        self.z_base = net.sample_base_prior(settings.n_eval, fixed, self.device)
        self.x_test = self.test_set.tensors()[0][: min(100, settings.n_eval)].to(self.device)
        self.bandwidths = None

    def prior_chain(self, step: int, z0: torch.Tensor, index: int, timed: bool = False) -> torch.Tensor:
        settings = self.settings
        return self.chains("prior", step, self.model.energy, z0, settings.prior_steps, settings.prior_step_size,
                           prior=self.model.prior, seed=self.chain_seed(step, index), timed=timed)

    def posterior_latents(self, step: int, x: torch.Tensor, z0: torch.Tensor, index: int,
                          timed: bool = False) -> torch.Tensor:
        """Posterior latents of x: the posterior chain from z0, or the encoder's mean for lebm-vi."""
        settings, net = self.settings, self.model
        if net.name == "lebm-vi":
            with torch.no_grad():
                return net.posterior(x)[0]
        return self.chains("posterior", step, self.posterior.refresh(x), z0, settings.posterior_steps,
                           settings.posterior_step_size, prior=net.prior, seed=self.chain_seed(step, index),
                           timed=timed)

    def chain_seed(self, step: int, index: int) -> int:
        """The noise seed of chain ``index`` (0 prior, 1 posterior, 2-3 evaluation, 4+ figures) at ``step``."""
        return self.ctx.rank_seed(self.step_seed(step) * 8 + index)

    def step(self, step: int) -> dict:
        ctx, net, x = self.ctx, self.model, self.batch(step)
        generator = torch.Generator().manual_seed(ctx.rank_seed(self.step_seed(step)))
        if net.name == "lebm-vi":
            terms, z_pos = net.variational_loss(x, generator)
        else:
            z_pos = self.posterior_latents(step, x, net.initial_latents(len(x), generator, self.device), 1, timed=True)
        z_neg = self.prior_chain(step, net.initial_latents(len(x), generator, self.device), 0, timed=True)
        if net.name != "lebm-vi":
            terms = net.generator_loss(x, z_pos, z_neg)
        loss_e = net.energy_loss(z_pos, z_neg)
        for name, value in (("generator loss", terms["loss"]), ("energy loss", loss_e)):
            if not math.isfinite(value.item()):
                raise FloatingPointError(f"train-prior {net.name}: the {name} is {value.item()} at iteration {step}; "
                                         f"lower --lr-g / --lr-e")
        self.optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward(inputs=net.generator_parameters())
        loss_e.backward(inputs=net.energy_parameters())
        ctx.average_gradients(net.parameters())
        self.optimizer.step()
        values = {k: ctx.all_reduce_mean(v.item()) for k, v in terms.items()}
        loss_e = ctx.all_reduce_mean(loss_e.item())
        return {**values, "energy_loss": loss_e, "energy_gap": -loss_e}

    def evaluate(self, step: int) -> dict:
        """Sample quality of the EBM prior (the prior chain) and of p_β alone, and the test images' posterior
        reconstruction error (mean ‖x − G(z⁺)‖² per image)."""
        settings, net = self.settings, self.model
        z_ebm = self.prior_chain(step - 1, self.z_eval, 2)
        z_post = self.posterior_latents(step - 1, self.x_test, self.z_eval[: len(self.x_test)], 3)
        with torch.no_grad():
            x_ebm, x_base = net.generate(z_ebm), net.generate(self.z_base)
            reconstruction = net.squared_error(self.x_test, z_post).mean().item()
        ebm = sample_quality(x_ebm, self.test_set, self.bandwidths, data_dir=settings.data_dir, data_seed=settings.seed)
        self.bandwidths = ebm["mmd_bandwidths"]
        base = sample_quality(x_base, self.test_set, self.bandwidths, data_dir=settings.data_dir,
                              data_seed=settings.seed)
        return {"ebm_prior": ebm, "gaussian_prior": base, "test_reconstruction_sse": reconstruction}

    def describe(self, step: int, entry: dict, stopping) -> str:
        metric = "frechet_distance" if "frechet_distance" in entry["ebm_prior"] else "mmd2"
        return (f"step {step}: {metric} EBM prior {entry['ebm_prior'][metric]:.5g} vs Gaussian prior "
                f"{entry['gaussian_prior'][metric]:.5g}; test reconstruction SSE "
                f"{entry['test_reconstruction_sse']:.3f}")

    def finish(self, state) -> None:
        """samples.png (G(z₀) vs G(z_K) of the prior chain, p_β samples, data), reconstructions.png (test images and
        G of their posterior latents), langevin_transition.png (8 prior chains as rows) and, if asked, latents.png."""
        settings, net, device = self.settings, self.model, self.device
        generator = torch.Generator().manual_seed(settings.seed + 13)
        z0 = net.initial_latents(64, generator, device)
        z_k = self.prior_chain(settings.steps, z0, 2)
        x_test = self.test_set.tensors()[0][:64].to(device)
        z_post = self.posterior_latents(settings.steps, x_test, net.initial_latents(64, generator, device), 3)
        with torch.no_grad():
            plot_panels([("G(z0), prior chain start", net.generate(z0)),
                         (f"G(zK) after {settings.prior_steps} prior steps", net.generate(z_k)),
                         ("G(z), z ~ Gaussian prior p_beta",
                          net.generate(net.sample_base_prior(64, generator, device))),
                         ("held-out data", x_test)], self.folder.file("samples.png"))
            how = "encoder mean" if net.name == "lebm-vi" else f"{settings.posterior_steps} posterior steps"
            plot_panels([("test images", x_test), (f"G(z+), {how}", net.generate(z_post))],
                        self.folder.file("reconstructions.png"))
        snapshots = langevin_transition(net.energy, net.initial_latents(8, generator, device),
                                        transition_steps(settings.prior_steps), settings.prior_step_size,
                                        net.generate, seed=self.chain_seed(settings.steps, 4), prior=net.prior,
                                        sampler=settings.sampler)
        plot_transition(snapshots, self.folder.file("langevin_transition.png"), "prior chains")
        if settings.latent_plot:
            self.latent_figure(self.train_set, self.folder.file("latents.png"))

    def latent_figure(self, dataset, path, n: int = 500) -> str:
        """The papers' latent visualisation: a row per latent layer (z₁, z₂), columns prior chain start / end and
        posterior chain start / end for the first ``n`` images of ``dataset`` (coloured by label); first two
        coordinates of each layer."""
        settings, net, device = self.settings, self.model, self.device
        generator = torch.Generator().manual_seed(settings.seed + 17)
        x, labels = (t[:n] for t in dataset.tensors())
        z_prior0 = net.initial_latents(len(x), generator, device)
        z_post0 = net.initial_latents(len(x), generator, device)
        columns = [("prior z0", z_prior0, None),
                   (f"prior zK ({settings.prior_steps} steps)", self.prior_chain(settings.steps, z_prior0, 2), None)]
        if net.name != "lebm-vi":
            columns.append(("posterior z0", z_post0, labels))
        columns.append((f"posterior zK ({settings.posterior_steps} steps)" if net.name != "lebm-vi" else "encoder mean",
                        self.posterior_latents(settings.steps, x.to(device), z_post0, 3), labels))
        plt = _pyplot()
        layers = net.layer_dims
        fig, axes = plt.subplots(len(layers), len(columns), figsize=(3.2 * len(columns), 3.2 * len(layers)),
                                 squeeze=False)
        for col, (title, z, colour) in enumerate(columns):
            for row, part in enumerate(z.detach().cpu().split(layers, dim=1)):
                ax = axes[row][col]
                y = part[:, min(1, part.shape[1] - 1)]
                if colour is None:
                    ax.scatter(part[:, 0], y, s=3, alpha=0.5)
                else:
                    for label in colour.unique().tolist():
                        pick = colour == label
                        ax.scatter(part[pick, 0], y[pick], s=3, alpha=0.6, color=f"C{label % 10}", label=str(label))
                    ax.legend(fontsize=7, markerscale=3, loc="upper right")
                ax.set_title(f"{title}: z{row + 1}" if len(layers) > 1 else title, fontsize=9)
                ax.set_aspect("equal", adjustable="datalim")
        fig.tight_layout()
        return save_figure(fig, path)

    def architecture(self) -> dict:
        return {"model_config": self.model.config}

    def summary(self, state, last: dict) -> dict:
        return {"final": state.history[-1] if state.history else None}


@register("train-prior lebm-vi")
class VariationalLEBMTrainer(LEBMTrainer):
    """LEBM with an inference network instead of the posterior chain"""


@register("train-prior joint-mle")
class JointMLETrainer(LEBMTrainer):
    """the 2-layer generator z2 -> z1 -> x with EBMs on z1 and z2 (MLE)"""


def train_lebm(model: str, data: str, out: str | os.PathLike, **settings) -> dict:
    """``fastlangevin train-prior MODEL --data DATA --out OUT`` for MODEL lebm, lebm-vi or joint-mle: settings by
    name (``PriorSettings``; ``resume``, ``device``, ``progress`` as ``loop.train``); returns the metrics."""
    trainers = {cls.preset()["model"]: cls for cls in (LEBMTrainer, VariationalLEBMTrainer, JointMLETrainer)}
    if model not in trainers:
        raise ValueError(f"model must be one of {tuple(trainers)}, got {model!r}")
    return train(trainers[model], out, data=data, **settings)
