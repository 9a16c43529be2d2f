"""``train-prior gaussian|joint`` under torchrun with two CPU processes (gloo): the runs finish, only rank 0 writes
and prints, both ranks end with the same VAE and EBMs (gradients averaged by DDP in the VAE stage, by hand in the EBM
stage of both schemes), and they are what rank 0's checkpoints hold; ``--resume`` continues on two ranks."""

import json
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from fastlangevin.trainers import load_checkpoint
from tests.test_distributed import SPIES, run_two_ranks

TINY = ["--data", "digits", "--batch-size", "16", "--checkpoint-every", "2"]
VAE = ["--channels", "8", "--latent-channels", "2", "2", "1"]
EBM = ["--prior-steps", "3", "--energy-width", "8"]

# argv: out, [[run name, train-prior arguments], ...]; after each run, each rank's last VAE and EBM prior.
WORKER = SPIES + textwrap.dedent("""
    import shutil
    from fastlangevin import cli
    from fastlangevin.trainers import hierarchical, hierarchical_ebm

    quality.plot_panels = hierarchical.plot_panels = spy(quality.plot_panels, 1)  # the latter for plot_transition
    shutil.copyfile = spy(shutil.copyfile, 1)  # --init-from copies the VAE's checkpoint
    hierarchical.HierarchicalVAE = hierarchical_ebm.HierarchicalVAE = keep("vae", hierarchical.HierarchicalVAE)
    hierarchical_ebm.JointEBMPrior = keep("ebm", hierarchical_ebm.JointEBMPrior)
    for name, args in json.loads(sys.argv[2]):
        cli.main(["train-prior", *args])
        torch.save({k: m.state_dict() for k, m in modules.items() if k != "grads"},
                   os.path.join(out, f"{name}_rank{rank}.pt"))
        modules.clear()
    json.dump(writes, open(os.path.join(out, f"writes_rank{rank}.json"), "w"))
""")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """gaussian (4 steps), joint two-stage from it (3 steps), resumed to 5, joint scheme from it (2 steps)."""
    pytest.importorskip("matplotlib")
    out = tmp_path_factory.mktemp("hierarchical_ddp")
    g, j, jj = (str(out / name) for name in ("g", "j", "jj"))
    runs = [["g", ["gaussian", "--out", g, "--steps", "4", *VAE, *TINY]],
            ["j", ["joint", "--out", j, "--init-from", g, "--steps", "3", *EBM, *TINY]],
            ["j_resumed", ["joint", "--out", j, "--data", "digits", "--steps", "5", "--resume"]],
            ["jj", ["joint", "--out", jj, "--init-from", g, "--scheme", "joint", "--steps", "2", *EBM, *TINY]]]
    return out, run_two_ranks(WORKER, out, json.dumps(runs))


def modules(out, run, rank):
    return torch.load(out / f"{run}_rank{rank}.pt")


def assert_same(a: dict, b: dict, what: str):
    assert a.keys() == b.keys(), what
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0, msg=f"{what}: {name}")


def checkpoint_state(path, prefix=""):
    """The module tensors of a checkpoint (under ``prefix`` in its ModuleDict), as a state dict."""
    key = f"model.{prefix}"
    return {k[len(key):]: v for k, v in load_file(path).items() if k.startswith(key)}


def test_only_rank_zero_writes_and_prints(two_ranks):
    out, stdout = two_ranks
    rank0, rank1 = (json.loads((out / f"writes_rank{rank}.json").read_text()) for rank in (0, 1))
    assert rank1 == []
    assert {"config.json", "vae.safetensors", "ebm.safetensors", "metrics.json", "samples.png",
            "hierarchical_resampling.png", "langevin_transition.png"} <= set(rank0)
    assert rank0.count("langevin_transition.png") == 3  # one per joint run
    assert stdout.count('"sample_quality"') == 4  # one report per run (rank 0's), not one per rank
    for run, key in (("g", "vae_training"), ("j", "ebm_training"), ("jj", "ebm_training")):
        assert json.loads((out / run / "metrics.json").read_text())[key]["world_size"] == 2


def test_ranks_end_with_the_same_parameters_rank_zero_saved(two_ranks):
    """Each rank trains on its half of the batch with its own noise: without the gradient average its parameters
    would leave the other rank's after the first step."""
    out, _ = two_ranks
    for run in ("g", "j", "j_resumed", "jj"):
        r0, r1 = modules(out, run, 0), modules(out, run, 1)
        assert r0.keys() == r1.keys() == ({"vae"} if run == "g" else {"vae", "ebm"})
        for name in r0:
            assert_same(r0[name], r1[name], f"{run} {name}")
    assert_same(modules(out, "g", 0)["vae"], checkpoint_state(out / "g" / "vae.safetensors"), "g checkpoint")
    for run, folder in (("j_resumed", "j"), ("jj", "jj")):
        for name in ("vae", "ebm"):
            assert_same(modules(out, run, 0)[name], checkpoint_state(out / folder / "ebm.safetensors", f"{name}."),
                        f"{run} checkpoint")


def test_two_stage_resumes_and_keeps_the_vae(two_ranks):
    out, _ = two_ranks
    assert load_checkpoint(out / "g" / "vae.safetensors")["step"] == 4
    assert load_checkpoint(out / "j" / "ebm.safetensors")["step"] == 5
    metrics = json.loads((out / "j" / "metrics.json").read_text())["ebm_training"]
    assert [h["step"] for h in metrics["history"]] == [3, 5]
    assert_same(modules(out, "j_resumed", 0)["vae"], checkpoint_state(out / "g" / "vae.safetensors"), "frozen VAE")
    ebm_3, ebm_5 = (modules(out, run, 0)["ebm"] for run in ("j", "j_resumed"))
    assert any(not torch.equal(ebm_3[k], ebm_5[k]) for k in ebm_3)  # the resumed steps trained


def test_joint_scheme_moves_the_vae_on_both_ranks(two_ranks):
    out, _ = two_ranks
    before, after = checkpoint_state(out / "g" / "vae.safetensors"), modules(out, "jj", 1)["vae"]
    assert any(not torch.equal(before[k], after[k]) for k in before)
    history = json.loads((out / "jj" / "metrics.json").read_text())["ebm_training"]["history"]
    assert {"reconstruction", "kl", "energy_gap"} <= set(history[-1])
