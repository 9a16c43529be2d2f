"""``train-pixel-ebm``: the pixel-space EBM baseline of the tilting paper's Table 1 (IGEBM, Du & Mordatch 2019): an
energy E_θ(x) on images, sampled by Langevin dynamics in pixel space with persistent chains kept in a replay buffer.

Target p_θ(x) ∝ exp(−E_θ(x) / T) on x (C, H, W), flat prior. Learning (maximum likelihood with short-run chains):

    loss = mean E(x⁺) − mean E(x⁻) + reg · (mean E(x⁺)² + mean E(x⁻)²)

x⁺ are training images; x⁻ come from persistent chains: each step draws ``batch_size`` chains (distinct entries)
from a replay buffer of ``buffer_size`` images (filled with U[0, 1] noise at the start), restarts each from fresh
U[0, 1] noise with probability ``reinit`` (Du & Mordatch: 5%), runs ``n_steps`` of ULA on E/T through
``run_chain`` (z ← z − ε/(2T)·∇E + √ε·ξ, ε = ``step_size``), clamps the result to [0, 1] (pixels; the chain itself is
not constrained) and writes it back where it came from. Energy: ``ConvEnergy`` (trainers/energy_nets.py); Adam.

Where this differs from IGEBM (``openai/ebm_code_release``): its update x ← x − λ∇E + σξ is this one with ε = σ² and
T = σ²/(2λ) (λ = 10, σ = 0.005 on CIFAR-10: T = 1.25e-6; here T is a setting); chains go back to the buffer entries
they came from (IGEBM appends to a FIFO buffer and draws at random); no spectral norm, no gradient clipping, no
data augmentation of the buffer.

Early stopping as ``tilt``: every ``eval_every`` steps, fresh chains from U[0, 1] noise and ``n_eval`` buffer entries
(IGEBM's samples) are scored against a validation draw; ``stop_from`` picks which decides; the best is kept.

RUN_DIR/config.json                 {"pixel_ebm": settings}
RUN_DIR/pixel_ebm.safetensors       energy + replay buffer + Adam state + step (``resume`` continues the buffer)
RUN_DIR/pixel_ebm_best.safetensors  the best energy (and its buffer) by the validation metric
RUN_DIR/metrics.json                {"pixel_ebm_training": history, best, chain time share}
RUN_DIR/pixel_ebm_samples.png       fresh chains, buffer entries, held-out data
"""

from __future__ import annotations

import dataclasses
import os

import torch
from torch import nn

from fastlangevin.trainers.chains import run_chain
from fastlangevin.trainers.checkpoint import write_json
from fastlangevin.trainers.energy_nets import make_energy
from fastlangevin.trainers.loop import train
from fastlangevin.trainers.monitor import check_stop_metric
from fastlangevin.trainers.quality import plot_panels, sample_quality
from fastlangevin.trainers.registry import register
from fastlangevin.trainers.run_folder import RunFolder
from fastlangevin.trainers.settings import setting
from fastlangevin.trainers.shared import ChainSettings, DataSettings, SeedSettings, contrastive_step, \
    validation_set
from fastlangevin.trainers.trainer import Trainer

PIXEL_LAST, PIXEL_BEST = "pixel_ebm.safetensors", "pixel_ebm_best.safetensors"
STOP_FROM = ("chains", "buffer")  # early stopping on fresh chains from noise, or on the replay buffer


class ReplayBuffer(nn.Module):
    """``size`` persistent chain states (size, *sample_shape), started as U[0, 1] noise (a module buffer, so
    checkpoints hold it). ``draw`` takes distinct entries and restarts each with probability ``reinit``; ``update``
    writes the chains' new states back."""

    def __init__(self, size: int, sample_shape, reinit: float = 0.05, generator: torch.Generator | None = None):
        super().__init__()
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"buffer_size must be an int >= 1, got {size!r}")
        if not 0 <= reinit <= 1:
            raise ValueError(f"reinit must be a probability in [0, 1], got {reinit!r}")
        self.reinit = float(reinit)
        self.register_buffer("samples", torch.rand(size, *sample_shape, generator=generator))

    def __len__(self) -> int:
        return self.samples.shape[0]

    def draw(self, n: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """n distinct entries (n, *sample_shape) — a copy, each replaced by U[0, 1] noise with probability
        ``reinit`` — and their indices (n,)."""
        if n > len(self):
            raise ValueError(f"batch_size must be <= buffer_size {len(self)} (distinct chains), got {n}")
        index = torch.randperm(len(self), generator=generator)[:n]
        x = self.samples[index.to(self.samples.device)].clone()
        fresh = torch.rand(n, generator=generator) < self.reinit
        noise = torch.rand(int(fresh.sum()), *x.shape[1:], generator=generator)
        x[fresh.to(x.device)] = noise.to(x)
        return x, index

    def update(self, index: torch.Tensor, x: torch.Tensor) -> None:
        """Entries ``index`` (n,) become x (n, *sample_shape)."""
        self.samples[index.to(self.samples.device)] = x.detach().to(self.samples)


class PixelEBM(nn.Module):
    """The energy (``make_energy``: a ConvEnergy for images) and its replay buffer, one checkpoint for both."""

    def __init__(self, image_shape, energy_width: int | None, energy_depth: int | None, buffer_size: int,
                 reinit: float, seed: int):
        super().__init__()
        if len(image_shape) != 3:
            raise ValueError(f"the pixel-space EBM is for images (C, H, W), got samples of shape {tuple(image_shape)}")
        self.energy = make_energy(image_shape, energy_width, energy_depth)
        self.replay = ReplayBuffer(buffer_size, image_shape, reinit, torch.Generator().manual_seed(seed + 5))


class TemperedEnergy(nn.Module):
    """x ↦ E(x)/T, (B, C, H, W) → (B,): the energy the chains sample (flat prior), built once per run."""

    def __init__(self, energy: nn.Module, temperature: float):
        super().__init__()
        self.energy, self.temperature = energy, float(temperature)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.energy(x) / self.temperature


def sample_pixel_chains(target: TemperedEnergy, x0: torch.Tensor, n_steps: int, step_size: float, seed: int,
                        batch_size: int = 500) -> torch.Tensor:
    """Chains from x0 (N, C, H, W) in batches of ``batch_size``, clamped to [0, 1]: (N, C, H, W) on the CPU."""
    out = []
    for i, chunk in enumerate(x0.split(batch_size)):
        x = run_chain(target, chunk, n_steps, step_size, prior=None, seed=seed + i)
        out.append(x.clamp_(0, 1).cpu())
    return torch.cat(out)


@dataclasses.dataclass
class PixelSettings(DataSettings, ChainSettings, SeedSettings):
    steps: int = setting(2000, "training steps", low=1, resume="extend", exclusive="length")
    batch_size: int = setting(64, "chains and data per step (the global batch under torchrun)", low=1)
    lr: float = setting(1e-4, "Adam learning rate", above=0)
    betas: tuple[float, float] = setting((0.0, 0.999), "Adam betas", low=0, below=1, metavar=("BETA1", "BETA2"))
    n_steps: int = setting(20, "Langevin steps per training step", low=1)
    step_size: float = setting(1e-4, "Langevin step size epsilon; noise sqrt(epsilon)", above=0)
    temperature: float = setting(1e-4, "chains sample exp(-E/T)", above=0)
    sample_steps: int | None = setting(None, "Langevin steps of the evaluation chains from noise (default: n_steps)",
                                       low=1)
    reg: float = setting(1.0, "energy regulariser reg*(mean E+^2 + mean E-^2)", low=0)
    buffer_size: int = setting(10_000, "replay buffer entries", low=1)
    reinit: float = setting(0.05, "probability of restarting a chain from uniform noise", low=0, high=1)
    energy_width: int | None = setting(None, "ConvEnergy channels (32)", low=1)
    energy_depth: int | None = setting(None, "ConvEnergy blocks per stage (2)", low=1)
    eval_every: int = setting(100, "steps between early-stopping evaluations", low=1)
    n_eval: int = setting(1000, "samples per evaluation", low=2)
    stop_on: str = setting("mmd2", "validation metric that picks the best model",
                           choices=("mmd2", "energy_distance", "frechet_distance"))
    stop_from: str = setting("chains", "early stopping on fresh chains from noise or on the replay buffer",
                             choices=STOP_FROM)
    patience: int | None = setting(None, "stop after this many evaluations without improvement (default: run all "
                                         "steps)", low=1)

    def __post_init__(self):
        if self.batch_size > self.buffer_size:
            raise ValueError(f"batch_size must be <= buffer_size {self.buffer_size} (distinct chains), got "
                             f"{self.batch_size}")
        if self.sample_steps is None:
            self.sample_steps = self.n_steps


@register("train-pixel-ebm")
class PixelEBMTrainer(Trainer):
    """the pixel-space EBM baseline (IGEBM: Langevin in pixel space, persistent chains in a replay buffer)

    See the module docstring. Under ``torchrun`` every rank holds the whole buffer, runs B/N of the chains (its own
    noise seed) and gathers the others' results, so the buffers stay identical."""

    Settings, section, checkpoint, best_checkpoint = PixelSettings, "pixel_ebm", PIXEL_LAST, PIXEL_BEST
    shown, batch_stream = ("loss", "energy_gap"), 1

    @classmethod
    def model_for(cls, folder, section: dict, checkpoint: str) -> PixelEBM:
        shape = section.get("image_shape")
        if shape is None:  # written before the section held it
            from fastlangevin.data import make_dataset
            shape = make_dataset(section["data"], section["data_dir"], "test", seed=section["seed"]).sample_shape
        return PixelEBM(shape, *(section[k] for k in ("energy_width", "energy_depth", "buffer_size", "reinit", "seed")))

    def build(self) -> None:
        settings = self.settings
        self.model = PixelEBM(self.train_set.sample_shape, settings.energy_width, settings.energy_depth,
                              settings.buffer_size, settings.reinit, settings.seed).to(self.device)
        self.val_set = validation_set(self.data_source(), settings.n_eval)
        check_stop_metric(settings.stop_on, self.val_set)
        self.optimizer = torch.optim.Adam(self.model.energy.parameters(), lr=settings.lr, betas=settings.betas)
        self.target = TemperedEnergy(self.model.energy, settings.temperature)  # every chain's energy
        # Fixed starting noise for the validation chains: successive evaluations compare energies, not noise.
        generator = torch.Generator().manual_seed(settings.seed + 7)
        self.x_val = torch.rand(settings.n_eval, *self.train_set.sample_shape, generator=generator).to(self.device)
        self.bandwidths = self.samples = None

    def begin(self, start: int) -> None:
        self.energy_loss = self.ctx.wrap(self.model.energy)  # the training step's forward

    def step(self, step: int) -> dict:
        settings, ctx, replay = self.settings, self.ctx, self.model.replay
        # the same draw on every rank: the global batch of chains, the rank runs its share
        x0, index = replay.draw(settings.batch_size, torch.Generator().manual_seed(self.step_seed(step)))
        x_neg = self.chains("persistent", step, self.target, ctx.shard(x0).to(self.device), settings.n_steps,
                            settings.step_size, prior=None, seed=ctx.rank_seed(self.step_seed(step))).clamp_(0, 1)
        replay.update(index, ctx.all_gather(x_neg))
        return contrastive_step(ctx, self.energy_loss, self.optimizer, self.batch(step), x_neg, settings.reg,
                                f"pixel-ebm step {step}")

    def _chains_from_noise(self) -> torch.Tensor:
        """The validation chains from fixed U[0, 1] noise."""
        settings = self.settings
        return sample_pixel_chains(self.target, self.x_val, settings.sample_steps, settings.step_size,
                                   settings.seed + 11)

    def _buffer_sample(self, n: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.settings.seed + 13)
        picked = torch.randperm(len(self.model.replay), generator=generator)
        return self.model.replay.samples[picked[:n]]

    def evaluate(self, step: int) -> dict:
        settings = self.settings
        self.samples = self._chains_from_noise()
        quality = sample_quality(self.samples, self.val_set, self.bandwidths, settings.data_dir, settings.seed)
        self.bandwidths = quality.pop("mmd_bandwidths")
        buffer = sample_quality(self._buffer_sample(settings.n_eval), self.val_set, self.bandwidths,
                                settings.data_dir, settings.seed)
        buffer.pop("mmd_bandwidths")
        return {**quality, "buffer": buffer}

    def stopping_quality(self, entry: dict) -> dict:
        return entry if self.settings.stop_from == "chains" else entry["buffer"]

    def describe(self, step: int, entry: dict, stopping) -> str:
        return (f"{self.settings.stop_from}: " + stopping.describe(step, self.stopping_quality(entry))
                + f"; chains mmd2 {entry['mmd2']:.5f}, buffer mmd2 {entry['buffer']['mmd2']:.5f}")

    def finish(self, state) -> None:
        settings = self.settings
        if self.samples is None:  # a finished run resumed: nothing evaluated in this session
            self.samples = self._chains_from_noise()
        plot_panels([(f"chains from noise ({settings.sample_steps} steps)", self.samples),
                     ("replay buffer", self._buffer_sample(64)), ("held-out data", self.val_set.tensors()[0][:64])],
                    self.folder.file("pixel_ebm_samples.png"))

    def architecture(self) -> dict:
        return {"energy": type(self.model.energy).__name__, "image_shape": list(self.train_set.sample_shape)}



def train_pixel_ebm(data: str, out: str | os.PathLike, **settings) -> dict:
    """``fastlangevin train-pixel-ebm --data DATA --out OUT``: settings by name (``PixelSettings``; ``resume``,
    ``device``, ``progress`` as ``loop.train``); returns the training metrics (also in metrics.json)."""
    return train(PixelEBMTrainer, out, data=data, **settings)


def load_pixel_ebm(run_dir: str | os.PathLike, which: str = "best", device: str = "cpu"):
    """The run's PixelEBM (``which="best"``, falling back to the last, or ``"last"``) in eval mode with frozen
    parameters, its settings and the checkpoint's metadata."""
    model, settings, meta = PixelEBMTrainer.load(RunFolder(run_dir), which)
    return model.to(device), settings, meta


def _draw_pixel(run_dir, n: int, seed: int, n_steps: int | None, which: str, device: str):
    from fastlangevin.data import make_dataset
    model, settings, meta = load_pixel_ebm(run_dir, which, device)
    test = make_dataset(settings["data"], settings["data_dir"], "test", seed=settings["seed"])
    x0 = torch.rand(n, *test.sample_shape, generator=torch.Generator().manual_seed(seed)).to(device)
    samples = sample_pixel_chains(TemperedEnergy(model.energy, settings["temperature"]), x0,
                                  n_steps or settings["sample_steps"], settings["step_size"], seed)
    picked = torch.randperm(len(model.replay), generator=torch.Generator().manual_seed(seed + 1))[:n]
    return samples, model.replay.samples[picked].cpu(), test, settings, meta


def sample_pixel_run(run_dir: str | os.PathLike, *, n: int = 64, seed: int = 0, n_steps: int | None = None,
                     which: str = "best", device: str = "cpu") -> str | None:
    """Chains from noise (``n_steps``, default the run's ``sample_steps``), replay-buffer entries and test images
    side by side in RUN_DIR/samples.png; returns its path."""
    samples, buffer, test, settings, meta = _draw_pixel(run_dir, n, seed, n_steps, which, device)
    return plot_panels([(f"pixel EBM step {meta['step']}: chains", samples), ("replay buffer", buffer),
                        ("held-out data", test.tensors()[0][:n])], os.path.join(run_dir, "samples.png"))


def evaluate_pixel_run(run_dir: str | os.PathLike, *, n: int = 1000, seed: int = 123, n_steps: int | None = None,
                       which: str = "best", device: str = "cpu") -> dict:
    """Sample quality of n chains from noise and of n replay-buffer entries against the test split; written to
    RUN_DIR/evaluation.json and returned."""
    samples, buffer, test, settings, meta = _draw_pixel(run_dir, n, seed, n_steps, which, device)
    chains_q = sample_quality(samples, test, None, settings["data_dir"], settings["seed"])
    buffer_q = sample_quality(buffer, test, chains_q["mmd_bandwidths"], settings["data_dir"], settings["seed"])
    result = {"data": settings["data"], "model": "pixel-ebm", "ebm_step": meta["step"], "which": which, "seed": seed,
              "n_steps": n_steps or settings["sample_steps"], "chains": chains_q, "buffer": buffer_q}
    write_json(os.path.join(run_dir, "evaluation.json"), result)
    return result


def format_pixel_evaluation(result: dict) -> str:
    """A table of the chains' and the buffer's metrics."""
    keys = [k for k in ("mmd2", "energy_distance", "frechet_distance") if k in result["chains"]]
    lines = [f"pixel EBM on {result['data']} (step {result['ebm_step']}, chains of {result['n_steps']} Langevin steps "
             f"from noise; {result['chains']['n_samples']} samples vs {result['chains']['n_reference']} test images)",
             f"{'':<8}" + "".join(f"{k:>18}" for k in keys)]
    lines += [f"{name:<8}" + "".join(f"{result[name][k]:>18.5f}" for k in keys) for name in ("chains", "buffer")]
    if "frechet_features" in result["chains"]:
        lines.append(result["chains"]["frechet_features"])
    return "\n".join(lines)


PixelEBMTrainer.sample_run = staticmethod(sample_pixel_run)
PixelEBMTrainer.evaluate_run = staticmethod(evaluate_pixel_run)
PixelEBMTrainer.format_evaluation = staticmethod(format_pixel_evaluation)
