"""``tilt``, ``sample``, ``evaluate``: the latent EBM of the exponential-tilting paper on a frozen backbone.

Target: p_θ(z) ∝ N(z; 0, I)·exp(−E_θ(G(z))) — the energy acts on the generated sample G(z), so every Langevin
step back-propagates through the frozen generator. Learning (maximum likelihood with short-run chains):

    loss = mean E(x⁺) − mean E(G(z_K)) + reg · (mean E(x⁺)² + mean E(G(z_K))²)

x⁺ are real training data (the paper, ``positives="data"``) or the backbone's reconstructions G(encode(x))
(``positives="reconstruction"``, which keeps the energy from learning what the decoder can never produce). Real data
are taken as the backbone's likelihood sees them (``LatentGenerativeModel.dequantize``): for GLOW on images, each
pixel spread uniformly over its bin, x + (u − ½)/(n_bins − 1), the dequantisation GLOW is trained with, so that
x⁺ and G(z) are both continuous and the energy cannot tell them apart by quantisation alone (applying the energy to
quantised G(z) instead would put a rounding, with no gradient, inside every Langevin step); the VAE and GLF see x.
The validation draw that picks the best checkpoint is the data set's validation split, disjoint from the training
split the positives come from. The budget defaults to the paper's (§5.4, ``PAPER_STEPS``): 200 iterations on GLOW
and GLF, 1 000 on the VAE. z_K comes
from ``fl.langevin`` with the Gaussian prior, started from fresh N(0, I) draws every step (non-persistent), ε = 0.01,
60 steps (the paper's App. B.2), on ``TiltedEnergy``: one module (energy and generator) built once per run, run as
one fused chain where the generator and the energy are MLPs (the 2-D toys' VAE). Early stopping on sample quality:
every ``eval_every`` steps the tilted model is sampled with the sampling chain (100 steps; ``--denoise-steps`` end it
without noise, not in the paper) and scored against a validation draw (``stop_on``: MMD², energy distance, for
data with known modes the high-quality share, for images the Fréchet distance on fastlangevin's classifier features);
the best is kept in RUN_DIR/ebm_best.safetensors, the latest (with optimizer state, for ``--resume``) in
RUN_DIR/ebm.safetensors.

``--clip-grad`` bounds each chain sample's ‖∇_z E(G(z))‖ (training, evaluation and ``sample``/``evaluate``
chains; the paper mentions gradient clipping; a flow's inverse can otherwise throw a chain to where G overflows).
Under ``torchrun`` each of N ranks takes B/N positives and runs B/N of the negative chains (its own noise seed);
DDP averages the gradients; rank 0 evaluates, writes the run directory and decides when to stop.
"""

from __future__ import annotations

import dataclasses
import os

import torch

from fastlangevin.trainers.base import BASE_CHECKPOINT, load_base
from fastlangevin.trainers.chains import langevin_transition, run_chain
from fastlangevin.trainers.checkpoint import CheckpointError, write_json
from fastlangevin.trainers.energy_nets import TiltedEnergy, make_energy
from fastlangevin.trainers.loop import train
from fastlangevin.trainers.monitor import STOP_ON, check_stop_metric
from fastlangevin.trainers.quality import plot_panels, plot_transition, sample_quality
from fastlangevin.trainers.registry import register
from fastlangevin.trainers.run_folder import RunFolder
from fastlangevin.trainers.settings import setting
from fastlangevin.trainers.shared import ChainSettings, SeedSettings, contrastive_step, transition_steps, \
    validation_set
from fastlangevin.trainers.trainer import Trainer

EBM_LAST, EBM_BEST = "ebm.safetensors", "ebm_best.safetensors"
POSITIVES = ("data", "reconstruction")
# The paper's EBM budget per backbone (§5.4: 200 training steps on GLOW and GLF, 1 000 on the VAE): the default of
# ``--steps``, resolved from the run's backbone.
PAPER_STEPS = {"vae": 1000, "glow": 200, "glf": 200}


def sample_tilted(tilted: TiltedEnergy, z0: torch.Tensor, n_steps: int, step_size: float, seed: int,
                  batch_size: int = 1000, clip_grad: float | None = None, denoise_steps: int = 0) -> torch.Tensor:
    """G(z_K) for chains from ``z0`` (N, latent_dim), run in batches of ``batch_size``: (N, *data_shape).
    ``denoise_steps``: steps without noise that end each chain, z ← z − ε/2·∇(E(G(z)) + ‖z‖²/2), gradient descent
    that pulls the samples back from the last steps' noise towards the nearest mode."""
    out = []
    for i, chunk in enumerate(z0.split(batch_size)):
        z = run_chain(tilted, chunk, n_steps, step_size, prior="normal", seed=seed + i, clip_grad=clip_grad)
        if denoise_steps:
            z = run_chain(tilted, z, denoise_steps, step_size, prior="normal", clip_grad=clip_grad, noise_scale=0.0)
        with torch.no_grad():
            out.append(tilted.base.generate(z).cpu())
    return torch.cat(out)


@dataclasses.dataclass
class TiltSettings(ChainSettings, SeedSettings):
    steps: int | None = setting(None, "training iterations (default: the paper's budget for the run's backbone, "
                                      + ", ".join(f"{k} {v}" for k, v in PAPER_STEPS.items()) + ")",
                                low=1, resume="extend")
    batch_size: int = setting(256, "chains and data per iteration (the global batch under torchrun)", low=1)
    lr: float = setting(1e-4, "Adam learning rate", above=0)
    betas: tuple[float, float] = setting((0.5, 0.999), "Adam betas", low=0, below=1, metavar=("BETA1", "BETA2"))
    n_steps: int = setting(60, "Langevin steps per training iteration", low=1)
    step_size: float = setting(0.01, "Langevin step size epsilon", above=0)
    sample_steps: int = setting(100, "Langevin steps to sample / evaluate", low=1)
    denoise_steps: int = setting(0, "noise-free steps that end each sampling / evaluation chain (not in the paper; "
                                    "sharper modes)", low=0)
    reg: float = setting(0.1, "energy regulariser reg*(mean E+^2 + mean E-^2)", low=0)
    clip_grad: float | None = setting(None, "bound each chain sample's gradient norm |grad_z E(G(z))|", above=0)
    positives: str = setting("data", "real x (the paper) or G(encode(x))", choices=POSITIVES)
    energy_width: int | None = setting(None, "MLP width (128) or ConvEnergy channels (32)", low=1)
    energy_depth: int | None = setting(None, "MLP hidden layers (3) or blocks per stage (2)", low=1)
    eval_every: int = setting(50, "steps between early-stopping evaluations", low=1)
    n_eval: int = setting(2000, "samples per early-stopping evaluation", low=2)
    stop_on: str = setting("mmd2", "validation metric that picks ebm_best (high_quality: toy data with modes only; "
                                   "frechet_distance: images only)", choices=STOP_ON)
    patience: int | None = setting(None, "stop after this many evaluations without improvement (default: run all "
                                         "steps)", low=1)


@register("tilt")
class TiltTrainer(Trainer):
    """train the latent EBM E(G(z)) on a run's frozen backbone

    The module docstring says how."""

    Settings, section, checkpoint, best_checkpoint = TiltSettings, "tilt", EBM_LAST, EBM_BEST
    folder_option, shown, batch_stream, inputs = "run_dir", ("loss", "energy_gap"), 1, ("base",)

    @classmethod
    def model_for(cls, folder, section: dict, checkpoint: str):
        shape = section.get("data_shape") or folder.section("base", BASE_CHECKPOINT)["model_config"]["data_shape"]
        return make_energy(shape, section["energy_width"], section["energy_depth"])

    def prepare(self) -> None:
        self.base, config = load_base(self.folder.path, self.device)
        self.base_config = config["base"]
        if self.settings.steps is None:
            self.settings.steps = PAPER_STEPS[self.base_config["model"]]

    def data_source(self) -> dict:
        return {k: self.base_config.get(k) for k in ("data", "data_dir", "seed", "n_train", "classes")}

    def build(self) -> None:
        settings = self.settings
        self.val_set = validation_set(self.data_source(), settings.n_eval)
        check_stop_metric(settings.stop_on, self.val_set)
        self.model = make_energy(self.base.data_shape, settings.energy_width, settings.energy_depth).to(self.device)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=settings.lr, betas=settings.betas)
        self.tilted = TiltedEnergy(self.model, self.base)  # every chain's energy, training and evaluation
        # Fixed starting points for the validation chains: successive evaluations compare energies, not noise.
        generator = torch.Generator().manual_seed(settings.seed + 7)
        self.z_val = torch.randn(len(self.val_set), self.base.latent_dim, generator=generator).to(self.device)
        self.bandwidths = None

    def begin(self, start: int) -> None:
        self.energy_loss = self.ctx.wrap(self.model)  # the training step's forward; chains use the energy itself

    def step(self, step: int) -> dict:
        settings, ctx = self.settings, self.ctx
        generator = torch.Generator().manual_seed(self.step_seed(step))
        z0 = ctx.shard(torch.randn(settings.batch_size, self.base.latent_dim, generator=generator)).to(self.device)
        if settings.positives == "reconstruction":
            x_pos = self.batch(step)
            with torch.no_grad():
                x_pos = self.base.generate(self.base.encode(x_pos))
        else:  # the global batch's noise, then this rank's rows: the same positives at every world size
            x_pos = ctx.shard(self.base.dequantize(self.global_batch(step), generator))
        z_neg = self.chains("negative", step, self.tilted, z0, settings.n_steps, settings.step_size,
                            seed=ctx.rank_seed(self.step_seed(step)), clip_grad=settings.clip_grad)
        with torch.no_grad():
            x_neg = self.base.generate(z_neg)
        return contrastive_step(ctx, self.energy_loss, self.optimizer, x_pos, x_neg, settings.reg, f"tilt step {step}")

    def evaluate(self, step: int) -> dict:
        settings, source = self.settings, self.data_source()
        samples = sample_tilted(self.tilted, self.z_val, settings.sample_steps, settings.step_size,
                                seed=settings.seed + 11, clip_grad=settings.clip_grad,
                                denoise_steps=settings.denoise_steps)
        quality = sample_quality(samples, self.val_set, self.bandwidths, source["data_dir"], source["seed"])
        self.bandwidths = quality.pop("mmd_bandwidths")
        return quality

    def architecture(self) -> dict:
        return {"energy": type(self.model).__name__, "data_shape": list(self.base.data_shape)}

    def companions(self) -> dict:
        return {"base": self.base_config}  # the backbone the energy was trained on

    def summary(self, state, last: dict) -> dict:
        return {"positives": self.settings.positives}


def train_tilt(run_dir: str | os.PathLike, **settings) -> dict:
    """``fastlangevin tilt RUN_DIR``: settings by name (``TiltSettings``; ``resume``, ``device``, ``progress`` as
    ``loop.train``); returns the training metrics (also in metrics.json)."""
    return train(TiltTrainer, run_dir, **settings)


def _load_tilted(run_dir, which: str, device: str):
    """The run's frozen backbone and tilted energy: (base, TiltedEnergy, config, energy checkpoint metadata); an
    energy trained on another backbone than the run's (``train-base`` ran again since) is refused."""
    folder = RunFolder(run_dir)
    base, config = load_base(run_dir, device)
    energy, config["tilt"], meta = TiltTrainer.load(folder, which)
    trained_on = meta.get("extra", {}).get("config", {}).get("base")
    if trained_on is not None and trained_on != config["base"]:
        raise CheckpointError(f"{folder.file(TiltTrainer.checkpoint)} was trained on another backbone than "
                              f"{folder.file(BASE_CHECKPOINT)} (trained again since); run the tilt again")
    return base, TiltedEnergy(energy.to(device), base), config, meta


def _draw(tilted: TiltedEnergy, tilt_config: dict, n: int, seed: int, n_steps: int | None, device: str):
    """n samples of the base and of the tilted model from the same z0: (before, after), each (n, *data_shape)."""
    z0 = torch.randn(n, tilted.base.latent_dim, generator=torch.Generator().manual_seed(seed)).to(device)
    with torch.no_grad():
        before = tilted.base.generate(z0).cpu()
    after = sample_tilted(tilted, z0, n_steps or tilt_config["sample_steps"], tilt_config["step_size"], seed=seed,
                          clip_grad=tilt_config.get("clip_grad"), denoise_steps=tilt_config.get("denoise_steps", 0))
    return before, after


def _test_split(base_config: dict, n: int):
    from fastlangevin.data import TOY_DATASETS, make_dataset
    return make_dataset(base_config["data"], base_config["data_dir"], "test", seed=base_config["seed"],
                        n_samples=n if base_config["data"] in TOY_DATASETS else None)


def sample_run(run_dir: str | os.PathLike, *, n: int = 2000, seed: int = 0, n_steps: int | None = None,
               which: str = "best", device: str = "cpu") -> str | None:
    """Draw n samples from the base and the tilted model (the same z0; the tilted chain runs ``n_steps``, default
    the run's 100) and write RUN_DIR/samples_before_after.png side by side, and RUN_DIR/langevin_transition.png:
    the tilted chains at a few steps from 0 to ``n_steps`` (the paper's Figure 3; for images 8 chains as rows).
    Returns the first PNG's path."""
    base, tilted, config, meta = _load_tilted(run_dir, which, device)
    base_config, tilt_config = config["base"], config["tilt"]
    before, after = _draw(tilted, tilt_config, n, seed, n_steps, device)
    data = _test_split(base_config, n)
    path = plot_panels([(f"base {base_config['model']}", before), (f"tilted (EBM step {meta['step']})", after),
                        ("held-out data", data.tensors()[0][:n])],
                       os.path.join(run_dir, "samples_before_after.png"), data)
    image = len(base.data_shape) == 3
    z0 = torch.randn(8 if image else min(n, 1000), base.latent_dim,
                     generator=torch.Generator().manual_seed(seed + 1)).to(device)
    snapshots = langevin_transition(tilted, z0, transition_steps(n_steps or tilt_config["sample_steps"]),
                                    tilt_config["step_size"], base.generate, seed=seed, prior="normal",
                                    clip_grad=tilt_config.get("clip_grad"))
    plot_transition(snapshots, os.path.join(run_dir, "langevin_transition.png"),
                    f"{base_config['model']} tilted chains", data)
    return path


def evaluate_run(run_dir: str | os.PathLike, *, n: int = 5000, seed: int = 123, n_steps: int | None = None,
                 which: str = "best", device: str = "cpu", figure: str | os.PathLike | None = None) -> dict:
    """Sample quality of the base and the tilted model against the test split (n samples each, the same z0);
    written to RUN_DIR/evaluation.json and returned. ``figure``: also plot the scored samples there, as the paper's
    Figure 1 (held-out data | base | base + latent EBM)."""
    _, tilted, config, meta = _load_tilted(run_dir, which, device)
    before, after = _draw(tilted, config["tilt"], n, seed, n_steps, device)
    base_config = config["base"]
    test = _test_split(base_config, n)
    kwargs = dict(data_dir=base_config["data_dir"], data_seed=base_config["seed"], inception=True)
    base_q = sample_quality(before, test, **kwargs)
    tilted_q = sample_quality(after, test, base_q["mmd_bandwidths"], **kwargs)
    result = {"data": base_config["data"], "model": base_config["model"], "ebm_step": meta["step"], "which": which,
              "seed": seed,
              "n_steps": n_steps or config["tilt"]["sample_steps"], "base": base_q, "tilted": tilted_q}
    write_json(os.path.join(run_dir, "evaluation.json"), result)
    if figure is not None:
        plot_panels([("data (held out)", test.tensors()[0][:n]), (base_config["model"].upper(), before),
                     (f"{base_config['model'].upper()} + latent EBM", after)], figure, test)
    return result


def format_evaluation(result: dict) -> str:
    """A table of base vs tilted metrics."""
    keys = [k for k in ("high_quality", "modes_covered", "mmd2", "energy_distance", "frechet_distance",
                        "inception_fid") if k in result["base"]]
    lines = [f"{result['model']} on {result['data']}: base vs tilted (EBM step {result['ebm_step']}, "
             f"{result['n_steps']} Langevin steps, {result['base']['n_samples']} samples vs "
             f"{result['base']['n_reference']} test points)",
             f"{'':<8}" + "".join(f"{k:>18}" for k in keys)]
    for name in ("base", "tilted"):
        row = result[name]
        cells = []
        for k in keys:
            v = row[k]
            cells.append(f"{v:>18.1%}" if k == "high_quality" else f"{str(v) + '/' + str(row['n_modes']):>18}"
                         if k == "modes_covered" else f"{v:>18.5f}")
        lines.append(f"{name:<8}" + "".join(cells))
    lines += [result["base"][k] for k in ("frechet_features", "inception_features", "inception_fid_skipped")
              if k in result["base"]]
    return "\n".join(lines)


TiltTrainer.sample_run, TiltTrainer.evaluate_run = staticmethod(sample_run), staticmethod(evaluate_run)
TiltTrainer.format_evaluation = staticmethod(format_evaluation)
