"""``train-base``: train a backbone (VAE, GLOW, GLF) on a data set and write a run directory.

RUN_DIR/config.json      {"base": model name, model config, data, training settings}
RUN_DIR/base.safetensors model + Adam state + step (atomic; ``resume=True`` continues from it)
RUN_DIR/metrics.json     {"base_training": final loss, speed, sample quality against the test split}
RUN_DIR/base_samples.png a scatter (toys) or image grid of G(z), z ~ N(0, I)
"""

from __future__ import annotations

import math
import os
import time

import torch
from tqdm.auto import tqdm

from fastlangevin.data import TOY_DATASETS, make_dataset
from fastlangevin.models import LatentGenerativeModel, make_model
from fastlangevin.trainers import distributed
from fastlangevin.trainers.checkpoint import load_checkpoint, read_json, save_checkpoint, write_json
from fastlangevin.trainers.quality import plot_panels, sample_quality

BASE_CHECKPOINT = "base.safetensors"


def default_model_config(model: str, data_shape, latent_dim: int | None = None, width: int | None = None) -> dict:
    """Constructor arguments for ``make_model(model, **config)`` on data of ``data_shape``. Latent sizes: 2 for 2-D
    toys, 16 for the 8×8 digits, the paper's 100 (VAE) / 64 (GLF) for larger images; GLOW's latent is the data."""
    data_shape = list(data_shape)
    config: dict = {"data_shape": data_shape}
    if model in ("vae", "glf"):
        if latent_dim is None:
            latent_dim = 2 if len(data_shape) == 1 else 16 if data_shape[-1] <= 8 else (100 if model == "vae" else 64)
        config["latent_dim"] = latent_dim
        if width is not None:
            config["width"] = width
    elif model == "glow":
        if latent_dim is not None:
            raise ValueError("--latent-dim does not apply to glow (its latent is as large as the data)")
        if width is not None:
            config["hidden"] = width
        if len(data_shape) == 3 and data_shape[-1] <= 8:
            config["n_bins"] = 17  # the 8×8 digits take 17 grey levels
    else:
        raise ValueError(f"unknown model {model!r}; choose vae, glow or glf")
    return config


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> torch.Tensor:
    """The indices of the batch at ``step``: a function of (seed, step) only, so a resumed run draws the same
    batches as an uninterrupted one."""
    g = torch.Generator().manual_seed(seed * 1_000_003 + step)
    return torch.randint(0, n, (batch_size,), generator=g)


def load_base(run_dir: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[LatentGenerativeModel, dict]:
    """The trained backbone of ``run_dir`` in eval mode with frozen parameters, and the run's config."""
    config = read_json(os.path.join(run_dir, "config.json"))
    base = make_model(config["base"]["model"], **config["base"]["model_config"])
    load_checkpoint(os.path.join(run_dir, BASE_CHECKPOINT), base)
    base.to(device).eval().requires_grad_(False)  # eval: batch norms use running statistics inside chains
    return base, config


def train_base(model: str, data: str, out: str | os.PathLike, *, steps: int | None = 2000, epochs: float | None = None,
               batch_size: int = 256, lr: float = 1e-3, seed: int = 0, data_dir: str | None = None,
               n_train: int | None = None, latent_dim: int | None = None, width: int | None = None,
               checkpoint_every: int = 500, n_eval: int = 2000, resume: bool = False, device: str = "cpu",
               progress: bool = True) -> dict:
    """Train ``model`` on ``data`` for ``steps`` batches (or ``epochs`` passes) with Adam(lr); returns the metrics.

    ``resume``: continue from RUN_DIR/base.safetensors (model, optimizer, step) with the saved config; the batches
    after the saved step are the ones an uninterrupted run would have drawn.
    Under ``torchrun`` (see ``fastlangevin.trainers.distributed``) each of N ranks takes B/N rows of the same global
    batch of ``batch_size`` B and DDP averages the gradients; rank 0 writes the run directory.
    """
    with distributed.setup(device) as ctx:
        return _train_base(ctx, model, data, out, steps=steps, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed,
                           data_dir=data_dir, n_train=n_train, latent_dim=latent_dim, width=width,
                           checkpoint_every=checkpoint_every, n_eval=n_eval, resume=resume, progress=progress)


def _train_base(ctx: distributed.DistributedContext, model, data, out, *, steps, epochs, batch_size, lr, seed, data_dir,
                n_train, latent_dim, width, checkpoint_every, n_eval, resume, progress) -> dict:
    device = ctx.device
    os.makedirs(out, exist_ok=True)
    config_path, ckpt_path = os.path.join(out, "config.json"), os.path.join(out, BASE_CHECKPOINT)
    if resume:
        if not os.path.exists(ckpt_path):
            raise FileNotFoundError(f"--resume: no {BASE_CHECKPOINT} in {out}; start without --resume")
        saved = read_json(config_path)["base"]
        model, data, data_dir, seed = saved["model"], saved["data"], saved["data_dir"], saved["seed"]
        batch_size, lr, n_train = saved["batch_size"], saved["lr"], saved["n_train"]
    ctx.check_batch(batch_size)
    torch.manual_seed(seed)
    train_set = make_dataset(data, data_dir, "train", seed=seed, n_samples=n_train)
    test_set = make_dataset(data, data_dir, "test", seed=seed, n_samples=n_eval if data in TOY_DATASETS else None)
    x_train = train_set.tensors()[0]
    if epochs is not None:
        steps = max(1, math.ceil(epochs * len(train_set) / batch_size))
    if steps is None or steps < 1:
        raise ValueError(f"steps must be >= 1 (or give epochs), got {steps}")
    model_config = (saved["model_config"] if resume
                    else default_model_config(model, train_set.sample_shape, latent_dim, width))
    net = make_model(model, **model_config).to(device)
    optimizer = torch.optim.Adam(net.parameters(), lr=lr)
    start = 0
    if resume:
        start = load_checkpoint(ckpt_path, net, optimizer, restore_rng=True)["step"]
        if ctx.is_main:
            print(f"resuming {model} on {data} from step {start} of {steps}")
    if ctx.rank:  # rank 0 keeps the single-process stream (restored on resume); the others draw their own
        torch.manual_seed(ctx.rank_seed(seed * 1_000_003 + start))
    config = read_json(config_path) if os.path.exists(config_path) else {}
    config["base"] = dict(model=model, model_config=model_config, data=data, data_dir=data_dir, seed=seed,
                          steps=steps, batch_size=batch_size, lr=lr, n_train=n_train)
    if ctx.is_main:
        write_json(config_path, config)

    net.train()
    if start < steps:  # actnorms initialise on the first global batch, the same on every rank
        first = x_train[batch_indices(len(x_train), batch_size, seed, start)]
        distributed.init_on_global_batch(net, first.to(device))
    loss_terms = ctx.wrap(net, "loss_terms")
    history, loss_value, begin = [], float("nan"), time.perf_counter()
    bar = tqdm(range(start, steps), initial=start, total=steps, desc=f"train-base {model}",
               disable=not (progress and ctx.is_main), mininterval=2.0, dynamic_ncols=True)
    for step in bar:
        x = ctx.shard(x_train[batch_indices(len(x_train), batch_size, seed, step)]).to(device)
        terms = loss_terms(x)
        loss_value = ctx.all_reduce_mean(terms["loss"].item())
        if not math.isfinite(loss_value):
            raise FloatingPointError(f"train-base: the loss is {loss_value} at step {step}; lower --lr")
        optimizer.zero_grad(set_to_none=True)
        terms["loss"].backward()
        optimizer.step()
        done = step + 1 - start
        bar.set_postfix(loss=f"{loss_value:.3f}", samples_s=f"{done * batch_size / (time.perf_counter() - begin):.0f}")
        if (step + 1) % 50 == 0 or step + 1 == steps:
            history.append({"step": step + 1, **{k: ctx.all_reduce_mean(v.item()) for k, v in terms.items()}})
        if ctx.is_main and ((step + 1) % checkpoint_every == 0 or step + 1 == steps):
            save_checkpoint(ckpt_path, net, optimizer, step + 1, extra={"model": model})
    seconds = time.perf_counter() - begin
    bar.close()

    metrics = None
    if ctx.is_main:
        net.eval()
        with torch.no_grad():
            samples = net.sample(min(n_eval, len(test_set)), generator=torch.Generator().manual_seed(seed)).cpu()
        metrics_path = os.path.join(out, "metrics.json")
        all_metrics = read_json(metrics_path) if os.path.exists(metrics_path) else {}
        metrics = {"final_loss": loss_value, "steps": steps, "seconds": seconds,
                   "samples_per_second": (steps - start) * batch_size / max(seconds, 1e-9), "history": history,
                   "sample_quality": sample_quality(samples, test_set, data_dir=data_dir, data_seed=seed),
                   "world_size": ctx.world_size}
        all_metrics["base_training"] = metrics
        write_json(metrics_path, all_metrics)
        plot_panels([(f"{model} samples", samples), ("held-out data", test_set.tensors()[0][: len(samples)])],
                    os.path.join(out, "base_samples.png"), test_set)
    return ctx.broadcast(metrics)
