"""Multi-process training: the context's arithmetic in one process, and train-base / tilt under torchrun with two CPU
processes (gloo) against the single-process run."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from fastlangevin.models import make_model
from fastlangevin.trainers import distributed, load_checkpoint, train_base
from fastlangevin.trainers.distributed import DistributedContext, MethodAsForward
from fastlangevin.trainers.pixel_ebm import PixelEBM

BASE = ["--data", "25gaussians", "--steps", "6", "--batch-size", "32", "--n-train", "256", "--width", "16",
        "--checkpoint-every", "3"]
PIXEL = ["--steps", "3", "--batch-size", "8", "--n-steps", "3", "--buffer-size", "100", "--energy-width", "4",
         "--energy-depth", "1", "--eval-every", "3", "--n-eval", "20"]
TILT = ["--steps", "4", "--batch-size", "32", "--n-steps", "5", "--sample-steps", "5", "--eval-every", "2",
        "--n-eval", "200", "--energy-width", "16", "--energy-depth", "2", "--patience", "1"]

# The start of a worker run in each torchrun process (argv: out, ...): spies that record which files each rank
# wrote (``writes``), each rank's trained modules and the gradients of its first optimizer step (``modules``).
SPIES = textwrap.dedent("""
    import os, sys, json, torch
    from fastlangevin.metrics import classifier, frechet
    from fastlangevin.trainers import checkpoint, quality

    rank, out = int(os.environ["RANK"]), sys.argv[1]
    writes, modules = [], {}

    def spy(fn, at):  # records the basename of argument ``at`` (the path) of every call
        def wrapped(*args, **kwargs):
            writes.append(os.path.basename(args[at]))
            return fn(*args, **kwargs)
        return wrapped

    def keep(name, make):
        def wrapped(*args, **kwargs):
            modules[name] = make(*args, **kwargs)
            return modules[name]
        return wrapped

    first_step = torch.optim.Adam.step

    def keep_gradients(optimizer, *args, **kwargs):
        if "grads" not in modules:
            modules["grads"] = [p.grad.clone() for group in optimizer.param_groups for p in group["params"]]
        return first_step(optimizer, *args, **kwargs)

    torch.optim.Adam.step = keep_gradients
    checkpoint.atomic_write_bytes = spy(checkpoint.atomic_write_bytes, 0)
    # a tiny Fréchet classifier: this checks the plumbing, not the metric
    frechet.ClassifierConfig = lambda: classifier.ClassifierConfig(width=4, feature_dim=8, min_steps=20, epochs=0.1)
""")
# train-base glf + tilt, train-base vae, train-pixel-ebm (argv: out, BASE, TILT, PIXEL).
WORKER = SPIES + textwrap.dedent("""
    from fastlangevin import cli
    from fastlangevin.trainers import base, pixel_ebm, tilt

    base.plot_panels = spy(quality.plot_panels, 1)
    pixel_ebm.plot_panels = spy(quality.plot_panels, 1)
    base.make_model = keep("base", base.make_model)
    tilt.make_energy = keep("energy", tilt.make_energy)
    pixel_ebm.PixelEBM = keep("pixel", pixel_ebm.PixelEBM)
    for model in ("glf", "vae"):
        run = os.path.join(out, model)
        cli.main(["train-base", model, "--out", run, *json.loads(sys.argv[2])])
        if model == "glf":
            cli.main(["tilt", run, *json.loads(sys.argv[3])])
        torch.save({k: m if k == "grads" else m.state_dict() for k, m in modules.items()},
                   os.path.join(out, f"{model}_rank{rank}.pt"))
        modules.clear()
    cli.main(["train-pixel-ebm", "--data", "digits", "--out", os.path.join(out, "pixel"), *json.loads(sys.argv[4])])
    torch.save({"pixel": modules["pixel"].state_dict()}, os.path.join(out, f"pixel_rank{rank}.pt"))
    json.dump(writes, open(os.path.join(out, f"writes_rank{rank}.json"), "w"))
""")


def run_two_ranks(worker: str, out, *args: str, timeout: float = 180) -> str:
    """Run the script ``worker`` (source text, written to out/worker.py) with two processes (torchrun, gloo) and
    arguments ``out, *args``; returns its stdout. Fails the test on an error or after ``timeout`` seconds."""
    path = out / "worker.py"
    path.write_text(worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    launch = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
                               str(path), str(out), *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                              start_new_session=True)
    try:
        stdout, stderr = launch.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(launch.pid, signal.SIGKILL)  # the launcher and both workers: a hang leaves no process behind
        stdout, stderr = launch.communicate()
        pytest.fail(f"torchrun did not finish in {timeout} s (a rank waiting on another?):\n{stderr[-3000:]}")
    assert launch.returncode == 0, stdout[-3000:] + stderr[-3000:]
    return stdout


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """train-base glf + tilt, train-base vae, train-pixel-ebm, with two processes (torchrun, gloo)."""
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("ddp")
    return out, run_two_ranks(WORKER, out, json.dumps(BASE), json.dumps(TILT), json.dumps(PIXEL))


def load_rank(out, model, rank):
    return torch.load(out / f"{model}_rank{rank}.pt")


def test_only_rank_zero_writes_and_prints(two_ranks):
    out, stdout = two_ranks
    rank0 = json.loads((out / "writes_rank0.json").read_text())
    rank1 = json.loads((out / "writes_rank1.json").read_text())
    assert rank1 == []
    for name in ("config.json", "base.safetensors", "metrics.json", "base_samples.png", "ebm.safetensors",
                 "ebm_best.safetensors", "pixel_ebm.safetensors", "pixel_ebm_samples.png"):
        assert name in rank0, name
    assert stdout.count('"final_loss"') == 2  # one report per train-base run (rank 0's), not one per rank
    metrics = json.loads((out / "glf" / "metrics.json").read_text())
    assert metrics["base_training"]["world_size"] == 2 and metrics["tilt_training"]["world_size"] == 2


def test_two_ranks_equal_one_process_with_the_whole_batch(two_ranks, tmp_path, monkeypatch):
    """GLF's loss draws no noise: 2 ranks × 16 rows and one process × 32 rows compute the same first gradient (the
    same initial model, actnorms initialised on the global batch on both ranks, DDP's average of the two half-batch
    means). Adam turns float rounding in near-zero gradients into ±lr steps, so later steps agree less tightly."""
    out, _ = two_ranks
    grads, first_step = [], torch.optim.Adam.step

    def keep_gradients(optimizer, *args, **kwargs):
        if not grads:
            grads.extend(p.grad.clone() for group in optimizer.param_groups for p in group["params"])
        return first_step(optimizer, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", keep_gradients)
    metrics = train_base("glf", "25gaussians", tmp_path, steps=6, batch_size=32, n_train=256, width=16,
                         checkpoint_every=3, n_eval=200, progress=False)
    ranks = [load_rank(out, "glf", r) for r in (0, 1)]
    assert len(grads) == len(ranks[0]["grads"]) and sum(g.abs().sum() > 0 for g in grads) > 10
    for i, g in enumerate(grads):
        torch.testing.assert_close(ranks[0]["grads"][i], ranks[1]["grads"][i], rtol=0, atol=0)
        torch.testing.assert_close(ranks[0]["grads"][i], g, rtol=1e-4, atol=1e-6)
    for name, value in ranks[0]["base"].items():
        torch.testing.assert_close(value, ranks[1]["base"][name], rtol=0, atol=0, msg=name)
    two = json.loads((out / "glf" / "metrics.json").read_text())["base_training"]
    assert two["final_loss"] == pytest.approx(metrics["final_loss"], rel=0.1)  # 6 Adam steps apart: close only
    saved = make_model("glf", **json.loads((out / "glf" / "config.json").read_text())["base"]["model_config"])
    load_checkpoint(out / "glf" / "base.safetensors", saved)
    for name, value in saved.state_dict().items():
        torch.testing.assert_close(value, ranks[0]["base"][name], rtol=0, atol=0, msg=name)


def test_vae_ranks_stay_in_sync(two_ranks):
    """The VAE's reparametrisation noise differs between ranks (equal to one process in distribution only), but
    the averaged gradients keep every rank's parameters identical."""
    out, _ = two_ranks
    r0, r1 = (load_rank(out, "vae", r)["base"] for r in (0, 1))
    for name in r0:
        torch.testing.assert_close(r0[name], r1[name], rtol=0, atol=0, msg=name)
    metrics = json.loads((out / "vae" / "metrics.json").read_text())["base_training"]
    assert metrics["steps"] == 6 and torch.isfinite(torch.tensor(metrics["final_loss"]))


def test_tilt_ranks_stay_in_sync_and_stop_together(two_ranks):
    out, _ = two_ranks
    e0, e1 = (load_rank(out, "glf", r)["energy"] for r in (0, 1))
    for name in e0:
        torch.testing.assert_close(e0[name], e1[name], rtol=0, atol=0, msg=name)
    tilt = json.loads((out / "glf" / "metrics.json").read_text())["tilt_training"]
    steps = [h["step"] for h in tilt["history"]]
    assert steps in ([2], [2, 4]) and load_checkpoint(out / "glf" / "ebm.safetensors")["step"] == steps[-1]
    assert 0 < tilt["chain_seconds"] < tilt["seconds"]


def test_pixel_ebm_ranks_share_one_buffer(two_ranks):
    """Each rank runs 4 of the 8 chains and gathers the others': buffers and energies stay identical, and the
    buffer changed only where the 3 steps × 8 chains went back."""
    out, _ = two_ranks
    r0, r1 = (torch.load(out / f"pixel_rank{r}.pt")["pixel"] for r in (0, 1))
    for name in r0:
        torch.testing.assert_close(r0[name], r1[name], rtol=0, atol=0, msg=name)
    fresh = PixelEBM((1, 8, 8), 4, 1, 100, 0.05, 0).state_dict()["replay.samples"]
    moved = (r0["replay.samples"] != fresh).flatten(1).any(1).sum().item()
    assert 8 < moved <= 24  # more than one rank's share of a step: the gathered chains went back too
    metrics = json.loads((out / "pixel" / "metrics.json").read_text())["pixel_ebm_training"]
    assert metrics["world_size"] == 2 and [h["step"] for h in metrics["history"]] == [3]


# --- the context in one process -------------------------------------------------------------------------------


def test_one_process_without_torchrun(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    with distributed.setup("cpu") as ctx:
        assert (ctx.rank, ctx.world_size, ctx.is_main) == (0, 1, True)
        net = torch.nn.Linear(3, 1)
        assert ctx.wrap(net) is net
        x = torch.arange(5.0)
        assert torch.equal(ctx.shard(x), x) and ctx.all_reduce_mean(2.5) == 2.5 and ctx.broadcast({"a": 1}) == {"a": 1}
        assert ctx.rank_seed(42) == 42
    assert not torch.distributed.is_initialized()


def test_shard_and_seeds_of_the_second_rank():
    ctx = DistributedContext(rank=1, world_size=2, local_rank=1, device=torch.device("cpu"))
    torch.testing.assert_close(ctx.shard(torch.arange(6)), torch.tensor([3, 4, 5]))
    assert not ctx.is_main and ctx.rank_seed(42) != 42 and 0 <= ctx.rank_seed(42) < 2 ** 62
    with pytest.raises(ValueError, match=r"batch_size \(the global batch\) must be divisible by the world size 2, "
                                         r"got 33; use 32 or 34"):
        ctx.check_batch(33)
    with pytest.raises(ValueError, match="divisible by the world size 2, got 5"):
        ctx.shard(torch.arange(5))


def test_wrap_routes_a_method_and_unwraps():
    net = make_model("vae", data_shape=[2], latent_dim=2, width=8)
    ctx = DistributedContext(0, 1, 0, torch.device("cpu"))
    wrapped = ctx.wrap(net, "loss_terms")
    assert isinstance(wrapped, MethodAsForward) and ctx.unwrap(wrapped) is net
    torch.manual_seed(0)
    a = wrapped(torch.ones(4, 2))["loss"]
    torch.manual_seed(0)
    torch.testing.assert_close(a, net.loss_terms(torch.ones(4, 2))["loss"])
    with pytest.raises(ValueError, match="method must name a method of VAE, got 'nope'"):
        ctx.wrap(net, "nope")


def test_setup_rejects_a_bad_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(ValueError, match=r"RANK must be in \[0, WORLD_SIZE\), got RANK=2, WORLD_SIZE=2"):
        distributed.setup("cpu")
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(ValueError, match="RANK must be an integer"):
        distributed.setup("cpu")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N, got 'meta'"):
        distributed.setup("meta")
    with pytest.raises(ValueError, match="device must be cpu, cuda or cuda:N, got 'gpu'"):
        distributed.setup("gpu")


def test_init_on_global_batch_equals_the_first_training_forward():
    """GLOW on images: actnorms set by the pre-pass (forked random state, batch-norm-free here) give the same first
    loss and parameters as letting the first training forward initialise them."""
    config = dict(data_shape=[1, 4, 4], n_levels=1, n_steps=2, hidden=8, n_bins=17)
    torch.manual_seed(0)
    a = make_model("glow", **config)
    b = make_model("glow", **config)
    b.load_state_dict(a.state_dict())
    x = torch.rand(16, 1, 4, 4)
    torch.manual_seed(1)
    assert distributed.init_on_global_batch(a, x)
    loss_a = a.loss_terms(x)["loss"]
    torch.manual_seed(1)
    loss_b = b.loss_terms(x)["loss"]
    torch.testing.assert_close(loss_a, loss_b, rtol=0, atol=0)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(p, q, rtol=0, atol=0, msg=name)
    assert not distributed.init_on_global_batch(a, x)  # already initialised: nothing runs


def test_init_on_global_batch_restores_batch_norm_statistics():
    net = make_model("glf", data_shape=[1, 8, 8], latent_dim=4)
    net.train()
    before = {k: v.clone() for k, v in net.state_dict().items() if "running" in k}
    assert before and distributed.init_on_global_batch(net, torch.rand(8, 1, 8, 8))
    for k, v in before.items():
        torch.testing.assert_close(net.state_dict()[k], v, rtol=0, atol=0, msg=k)
