"""Multi-process training under ``torchrun`` (DistributedDataParallel), and the same code path in one process.

    with distributed.setup(device) as ctx:      # reads RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT
        loss_of = ctx.wrap(net, "loss_terms")    # DDP (world size > 1) over net.loss_terms; gradients averaged
        x = ctx.shard(x_global)                  # this rank's rows of the global batch
        ...                                      # chains: run them on ``net`` itself, never through ``loss_of``
        if ctx.is_main: save_checkpoint(...)     # rank 0 alone writes run-directory files
        stop = ctx.broadcast(stop)               # rank 0's decision, on every rank

Without torchrun's environment the world has one process and no process group is created: ``wrap`` adds nothing,
``shard`` returns the batch, the reductions return their input. Backend: gloo on CPU, nccl on CUDA (device
``cuda:LOCAL_RANK``). The process group is created by the first ``setup`` of a process and kept until the process
exits (creating it a second time in one process is unreliable), so trainers can run one after another.

Equivalence. Each rank takes an equal share of the same global batch and DDP averages the gradients, so a step on
N ranks × B/N rows computes the gradient of the mean loss over the B rows, as one process with batch B does — exactly
for a deterministic loss (up to float summation order). Randomness drawn inside a step (a VAE's reparametrisation
noise, Langevin noise) comes from a rank-dependent stream (``rank_seed``: rank 0 keeps the single-process seed), so
an N-rank run equals the single-process run in distribution only. Batch norms in training mode normalise with each
rank's B/N rows (no SyncBatchNorm), another difference from one process with the whole batch.
"""

from __future__ import annotations

import atexit
import os
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

SEED_RANGE = 2 ** 62


class MethodAsForward(nn.Module):
    """``forward(*args)`` calls ``module.<method>(*args)``: DDP synchronises gradients only for what runs through its
    ``forward``, so a training objective such as ``loss_terms`` is wrapped this way."""

    def __init__(self, module: nn.Module, method: str):
        super().__init__()
        if not callable(getattr(module, method, None)):
            raise ValueError(f"method must name a method of {type(module).__name__}, got {method!r}")
        self.module, self.method = module, method

    def forward(self, *args, **kwargs):
        return getattr(self.module, self.method)(*args, **kwargs)


class DistributedContext:
    """This process's place in the run: ``rank``, ``world_size``, ``local_rank``, ``device``, ``is_main``."""

    def __init__(self, rank: int, world_size: int, local_rank: int, device: torch.device):
        self.rank, self.world_size, self.local_rank, self.device = rank, world_size, local_rank, device
        self.is_main = rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wrap(self, module: nn.Module, method: str = "forward", **ddp_kwargs) -> nn.Module:
        """A module whose call runs ``module.<method>`` with gradients averaged over ranks (DDP when the world has
        more than one process). Keep ``module`` itself for anything that is not a training step (Langevin chains,
        evaluation, checkpoints): a backward through the wrapper outside a step would trigger DDP's reducer."""
        wrapped = module if method == "forward" else MethodAsForward(module, method)
        if not self.distributed:
            return wrapped
        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(wrapped, device_ids=device_ids, **ddp_kwargs)

    def check_batch(self, batch_size: int, name: str = "batch_size") -> int:
        """This rank's share of a global batch of ``batch_size`` rows; raises unless the world size divides it."""
        if batch_size % self.world_size:
            raise ValueError(f"{name} (the global batch) must be divisible by the world size {self.world_size}, got "
                             f"{batch_size}; use {batch_size - batch_size % self.world_size} or "
                             f"{batch_size + self.world_size - batch_size % self.world_size}")
        return batch_size // self.world_size

    def shard(self, x: torch.Tensor) -> torch.Tensor:
        """Rows [rank·B/N, (rank + 1)·B/N) of the global batch x (B, ...) (indices or data)."""
        n = self.check_batch(len(x), "the global batch size")
        return x[self.rank * n:(self.rank + 1) * n]

    def rank_seed(self, seed: int) -> int:
        """A seed for this rank's own random draws: ``seed`` on rank 0 (so rank 0 follows the single-process run),
        a different one on every other rank, in [0, 2**62)."""
        if self.rank == 0:
            return seed % SEED_RANGE
        return (seed * 0x9E3779B1 + self.rank * 0x85EBCA77 + 1) % SEED_RANGE

    def all_reduce_mean(self, x):
        """The mean of ``x`` (a tensor, or a float) over ranks; a new tensor / float, ``x`` is not modified."""
        if not self.distributed:
            return x
        t = torch.as_tensor(x, dtype=torch.float64 if not isinstance(x, torch.Tensor) else None)
        t = t.detach().to(self.device, copy=True)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t /= self.world_size
        return t.item() if not isinstance(x, torch.Tensor) else t.to(x.device)

    def mean_over_ranks(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each tensor's mean over ranks (the tensors themselves in one process), in one all-reduce of their
        concatenation (one dtype)."""
        if not self.distributed:
            return tensors
        flat = self.all_reduce_mean(torch.cat([t.detach().reshape(-1) for t in tensors]))
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors)]

    def average_gradients(self, parameters) -> None:
        """DDP's gradient average, by hand (for a step whose loss takes several backward passes): every ``.grad``
        of ``parameters`` becomes its mean over ranks, in place."""
        if self.distributed:
            grads = [p.grad for p in parameters if p.grad is not None]
            for grad, mean in zip(grads, self.mean_over_ranks(grads)):
                grad.copy_(mean)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """The global batch from every rank's rows x (B/N, ...), in rank order: the inverse of ``shard``."""
        if not self.distributed:
            return x
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    def broadcast(self, obj):
        """Rank 0's ``obj`` (any picklable value) on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)

    @staticmethod
    def unwrap(module: nn.Module) -> nn.Module:
        """The module that ``wrap`` was given (for chains, evaluation and checkpoints)."""
        if isinstance(module, DistributedDataParallel):
            module = module.module
        return module.module if isinstance(module, MethodAsForward) else module

    def close(self) -> None:
        """The end of this context's work: a barrier, so that no rank moves on (to read what rank 0 wrote, or to
        exit) while another is still in the trainer. The process group stays for later trainers."""
        self.barrier()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *exc):
        if exc_type is None:  # after an error the other ranks may never reach the barrier
            self.close()


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None:
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer (torchrun sets it), got {value!r}") from None


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun), known before ``setup`` joins the group."""
    return _env_int("RANK", 0)


def check_device(device: str | torch.device) -> torch.device:
    """``device`` as a torch.device the trainers run on (cpu, cuda or cuda:N, with CUDA present); ValueError
    otherwise."""
    try:
        checked = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}") from None
    if checked.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or cuda:N, got {device!r}")
    if checked.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {checked} was asked for but CUDA is not available here; use --device cpu")
    if checked.type == "cuda" and checked.index is not None and checked.index >= torch.cuda.device_count():
        raise ValueError(f"device {checked} was asked for but there are {torch.cuda.device_count()} CUDA devices")
    return checked


def setup(device: str | torch.device = "cpu") -> DistributedContext:
    """The context of this process: under ``torchrun`` (WORLD_SIZE > 1) joins the process group (gloo for a CPU
    ``device``, nccl for CUDA, where the device becomes ``cuda:LOCAL_RANK``); otherwise one process, no group."""
    device = check_device(device)
    world_size, rank, local_rank = _env_int("WORLD_SIZE", 1), _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"RANK must be in [0, WORLD_SIZE), got RANK={rank}, WORLD_SIZE={world_size}")
    if device.type == "cuda":
        if world_size > 1:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistributedContext(0, 1, 0, device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=rank, world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
        atexit.register(dist.destroy_process_group)
    elif dist.get_world_size() != world_size or dist.get_rank() != rank:
        raise RuntimeError(f"the existing process group (rank {dist.get_rank()} of {dist.get_world_size()}) "
                           f"disagrees with RANK={rank}, WORLD_SIZE={world_size}")
    return DistributedContext(rank, world_size, local_rank, device)


def init_on_global_batch(module: nn.Module, x: torch.Tensor, method: str = "loss_terms") -> bool:
    """Data-dependent initialisation (GLOW's actnorms: a module with a False ``initialized`` buffer sets itself from
    the first training batch) on the *global* batch x, identically on every rank, before DDP wraps the module.

    Runs ``module.<method>(x)`` once in training mode without gradients and with torch's random state restored
    afterwards; every other buffer (batch-norm statistics) is put back, so the run continues as if the first training
    step had done the initialisation (as it does in one process). Returns whether anything needed initialising."""
    pending = [b for name, b in module.named_buffers() if name.rsplit(".", 1)[-1] == "initialized" and not b.all()]
    if not pending:
        return False
    saved = {name: b.clone() for name, b in module.named_buffers() if name.rsplit(".", 1)[-1] != "initialized"}
    with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        getattr(module, method)(x)
    buffers = dict(module.named_buffers())
    for name, value in saved.items():
        buffers[name].copy_(value)
    return True
