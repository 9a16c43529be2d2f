"""The fused CPU chain on the energies of issue 12 against the eager PyTorch loop: a composition E(G(z)) run as one
deep MLP, and LEBM's posterior energy with an MLP generator and a per-sample target.

    python benchmarks/fused_composition.py        # every chain: B = 128, 512, 2048 (tilt), 100, 512 (posterior, lebm)
    python benchmarks/fused_composition.py --chains tilt --batches 512 --repeats 20 --out tilt.json

Chains (float32, N(0, I) prior, noise on, no clipping):

* ``tilt``: the toy tilt chain of ``fastlangevin tilt``: a VAE decoder 2→256→256→256→2 (leaky ReLU 0.2, linear
  output) and an energy 2→128→128→128→1 (leaky ReLU 0.2), K = 60, ε = 0.01. Eager: the loop as latent-EBM code writes
  it, autograd through decoder and energy. Fused: the composition as one MLP 2→256→256→256→2→128→128→128→1 with an
  identity activation at the bottleneck.
* ``posterior``: LEBM's posterior chain (``sample_langevin_post_z``): energy 16→200→200→1 (GELU), generator
  16→256→256→64 (leaky ReLU 0.2, sigmoid), σ = 0.3, K = 20, s = 0.1 (ε = 0.01), a target x (B, 64). Eager: LEBM's
  loop line for line (two ``autograd.grad`` calls). Fused: energy network plus the likelihood term through the
  generator network in one kernel.
* ``lebm``: one LEBM training iteration with those networks: the posterior chain above, the prior chain
  (``sample_langevin_prior_z``: K = 60, s = 0.4, ε = 0.16) and the two Adam steps (G: Σ‖x − G(z⁺)‖²/B, lr 1e-4;
  E: mean E(z⁺) − mean E(z⁻), lr 2e-5; β = (0.5, 0.999)). Eager: LEBM's loops; library: both chains through
  ``fl.langevin`` (fused), the same updates. No kernel row.

Rows: ``eager``; ``kernel``, the C++ chain called directly (``_C.mlp_chain``: the kernel's own speed, outputs
allocated per call as the op does); ``library``, ``fl.langevin`` of the adopted energy where this checkout's Python
side fuses it (its ``info.backend`` is printed, so a fallback cannot pass for the fused chain). Implementations run
in interleaved rounds (eager, kernel, library, eager, ...), so each ratio compares chains run side by side; times
are medians. FLOPs count each layer's forward and input gradient, 4·MACs per sample per step, and are set against
``torch.mm`` (B × 256)·(256 × 256) timed in the same rounds (its best).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time

import torch
from torch import nn

import fastlangevin as fl
from fastlangevin import _ext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.timing import alternated  # noqa: E402

IDENTITY, SIGMOID = 8, 9
CHAINS = {"tilt": [128, 512, 2048], "posterior": [100, 512], "lebm": [100, 512]}  # name → default batch sizes
ACTIVATION_CODES = {nn.ReLU: 0, nn.LeakyReLU: 1, nn.SiLU: 2, nn.Tanh: 7, nn.Identity: IDENTITY, nn.Sigmoid: SIGMOID}


def mlp(dims, act, last=None) -> nn.Sequential:
    layers = []
    for i, (d_in, d_out) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(d_in, d_out))
        layers.append(act() if i < len(dims) - 2 else (last() if last else nn.Identity()))
    return nn.Sequential(*layers)


def kernel_network(*seqs: nn.Sequential):
    """(dims, weight_ptrs, bias_ptrs, activations, activation_params) of Linear/activation pairs, in order, and the
    tensors that must stay alive while the pointers are used."""
    dims, weights, biases, codes, params = [], [], [], [], []
    for seq in seqs:
        modules = list(seq)
        for linear, act in zip(modules[0::2], modules[1::2]):
            dims = dims or [linear.in_features]
            dims.append(linear.out_features)
            weights.append(linear.weight.detach().contiguous())
            biases.append(linear.bias.detach().contiguous())
            if isinstance(act, nn.GELU):
                codes.append(3 if act.approximate == "none" else 4)
            else:
                codes.append(ACTIVATION_CODES[type(act)])
            params.append(float(getattr(act, "negative_slope", 0.0)))
    return (dims, [w.data_ptr() for w in weights], [b.data_ptr() for b in biases], codes, params), weights + biases


class Chain:
    """One benchmark chain: its networks, eager loop, kernel call and (when this checkout has it) library call."""

    def __init__(self, name: str, batch: int, seed: int = 0):
        torch.manual_seed(seed)
        self.name, self.batch = name, batch
        if name == "tilt":
            self.decoder = mlp((2, 256, 256, 256, 2), lambda: nn.LeakyReLU(0.2))
            self.energy = mlp((2, 128, 128, 128, 1), lambda: nn.LeakyReLU(0.2))
            self.n_steps, self.step_size, self.dim = 60, 0.01, 2
            self.network, self._keep = kernel_network(self.decoder, self.energy)
            self.generator, self.target, self.likelihood_scale = None, None, 0.0
            self.macs = sum(m.in_features * m.out_features for m in [*self.decoder, *self.energy]
                            if isinstance(m, nn.Linear))
        else:  # posterior, lebm
            self.energy = mlp((16, 200, 200, 1), nn.GELU)
            self.generator_net = mlp((16, 256, 256, 64), lambda: nn.LeakyReLU(0.2), nn.Sigmoid)
            self.n_steps, self.step_size, self.dim, self.sigma = 20, 0.01, 16, 0.3
            self.target = torch.rand(batch, 64)
            self.network, keep_e = kernel_network(self.energy)
            self.generator, keep_g = kernel_network(self.generator_net)
            self._keep = keep_e + keep_g
            self.likelihood_scale = 1.0 / (2 * self.sigma ** 2)
            self.macs = sum(m.in_features * m.out_features for m in [*self.energy, *self.generator_net]
                            if isinstance(m, nn.Linear))
            if name == "lebm":  # prior chain of 60 steps on the energy alone, then the updates
                self.prior_steps, self.prior_step_size = 60, 0.16
                self.macs_prior = sum(m.in_features * m.out_features for m in self.energy if isinstance(m, nn.Linear))
                self.optimizers = [torch.optim.Adam(net.parameters(), lr=lr, betas=(0.5, 0.999))
                                   for net, lr in ((self.generator_net, 1e-4), (self.energy, 2e-5))]
        for p in self.parameters():
            p.requires_grad_(True)  # as in training: the eager loop's autograd sees parameters that need grads
        self.z0 = torch.randn(batch, self.dim)
        self.rng_state = torch.tensor([1234, 0], dtype=torch.int64)

    def parameters(self):
        nets = [self.energy] + ([self.decoder] if self.name == "tilt" else [self.generator_net])
        return [p for net in nets for p in net.parameters()]

    def gflop(self) -> float:
        """The chains' FLOPs (the LEBM iteration's updates not counted)."""
        prior = 4 * self.macs_prior * self.prior_steps if self.name == "lebm" else 0
        return (4 * self.macs * self.n_steps + prior) * self.batch / 1e9

    def eager(self) -> torch.Tensor:
        if self.name == "lebm":
            return self.update(self.eager_posterior(), self.eager_prior())
        return self.eager_posterior() if self.name == "posterior" else self.eager_tilt()

    def eager_tilt(self) -> torch.Tensor:
        s = math.sqrt(self.step_size)
        z = self.z0.clone()
        if self.name == "tilt":  # the published prior loop (LEBM sample_langevin_prior_z) on E(G(z))
            for _ in range(self.n_steps):
                z.requires_grad_(True)
                en = self.energy(self.decoder(z))
                z_grad = torch.autograd.grad(en.sum(), z)[0]
                z.data = z.data - 0.5 * s * s * (z_grad + z.data) + s * torch.randn_like(z).data
            return z.detach()

    def eager_posterior(self) -> torch.Tensor:
        s = math.sqrt(self.step_size)
        z = self.z0.clone()
        mse = nn.MSELoss(reduction="sum")
        for _ in range(self.n_steps):  # LEBM sample_langevin_post_z, line for line
            z = z.requires_grad_()
            x_hat = self.generator_net(z)
            g_log_lkhd = 1.0 / (2.0 * self.sigma * self.sigma) * mse(x_hat, self.target)
            z_grad_g = torch.autograd.grad(g_log_lkhd, z)[0]
            en = self.energy(z)
            z_grad_e = torch.autograd.grad(en.sum(), z)[0]
            z.data = z.data - 0.5 * s * s * (z_grad_g + z_grad_e + 1.0 * z.data)
            z.data += s * torch.randn_like(z).data
        return z.detach()

    def eager_prior(self) -> torch.Tensor:
        s = math.sqrt(self.prior_step_size)
        z = self.z0.clone()
        for _ in range(self.prior_steps):  # LEBM sample_langevin_prior_z, line for line
            z = z.requires_grad_()
            en = self.energy(z)
            z_grad = torch.autograd.grad(en.sum(), z)[0]
            z.data = z.data - 0.5 * s * s * (z_grad + 1.0 * z.data)
            z.data += s * torch.randn_like(z).data
        return z.detach()

    def update(self, z_pos: torch.Tensor, z_neg: torch.Tensor) -> torch.Tensor:
        """LEBM's two Adam steps (G then E) on the chains' latents; returns z_pos."""
        optimizer_g, optimizer_e = self.optimizers
        optimizer_g.zero_grad()
        ((self.target - self.generator_net(z_pos)) ** 2).sum().div(self.batch).backward()
        optimizer_g.step()
        optimizer_e.zero_grad()
        (self.energy(z_pos).mean() - self.energy(z_neg).mean()).backward()
        optimizer_e.step()
        return z_pos

    def kernel(self) -> torch.Tensor | None:
        z = self.z0.clone()
        first_bad = torch.empty(self.batch, dtype=torch.int64)
        _ext.require_cpu().mlp_chain(
            z.data_ptr(), self.batch, self.network, 1.0, self.generator,
            0 if self.target is None else self.target.data_ptr(), self.likelihood_scale, self.n_steps,
            self.step_size, math.sqrt(self.step_size), 1, 0, 0, self.rng_state.data_ptr(), 0.0, 0, 0, 0, 0,
            first_bad.data_ptr(), 0, torch.get_num_threads())
        return z

    def library(self):
        """(call, what ran) through fl.langevin, or None where this checkout's Python side cannot adopt the energy."""
        try:
            if self.name == "tilt":
                energy = fl.MLPEnergy.from_sequential(nn.Sequential(self.decoder, self.energy))
            else:
                energy = fl.GaussianPosteriorEnergy(fl.MLPEnergy.from_sequential(self.energy),
                                                    fl.MLP.from_sequential(self.generator_net),
                                                    self.sigma).set_target(self.target)
            _, info = fl.langevin(energy, self.z0, 1, self.step_size, seed=1, return_info=True)
        except (AttributeError, TypeError, ValueError):
            return None
        chain = lambda: fl.langevin(energy, self.z0, self.n_steps, self.step_size, seed=1)  # noqa: E731
        if self.name != "lebm":
            return chain, info.backend
        prior = energy.energy
        _, prior_info = fl.langevin(prior, self.z0, 1, self.prior_step_size, seed=2, return_info=True)
        iteration = lambda: self.update(chain(), fl.langevin(prior, self.z0, self.prior_steps,  # noqa: E731
                                                             self.prior_step_size, seed=2))
        return iteration, f"{info.backend}+{prior_info.backend}"


def gemm_seconds(batch: int) -> float:
    a, b = torch.randn(batch, 256), torch.randn(256, 256)
    best = math.inf
    for _ in range(5):
        t0 = time.perf_counter()
        torch.mm(a, b)
        best = min(best, time.perf_counter() - t0)
    return best


def measure(chain: Chain, repeats: int) -> list[dict]:
    impls = {"eager": (chain.eager, "torch eager")}
    if chain.name != "lebm":
        impls["kernel"] = (chain.kernel, "_C.mlp_chain")
    library = chain.library()
    if library is not None:
        impls["library"] = library
    gemm = []
    times = alternated(impls, repeats, lambda: gemm.append(gemm_seconds(chain.batch)))
    gemm_rate = 2 * chain.batch * 256 * 256 / min(gemm) / 1e9
    eager = statistics.median(times["eager"])
    rows = []
    for name, (_, ran) in impls.items():
        median = statistics.median(times[name])
        rows.append(dict(chain=chain.name, batch=chain.batch, impl=name, ran=ran, median_ms=median * 1e3,
                         min_ms=min(times[name]) * 1e3, max_ms=max(times[name]) * 1e3, vs_eager=eager / median,
                         gflops=chain.gflop() / median, of_sgemm=chain.gflop() / median / gemm_rate,
                         sgemm_gflops=gemm_rate, repeats=repeats))
    return rows


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--chains", nargs="+", default=list(CHAINS), choices=list(CHAINS))
    parser.add_argument("--batches", nargs="+", type=int, default=None,
                        help="batch sizes (default: 128 512 2048 for tilt, 100 512 for posterior and lebm)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None, help="torch and kernel threads (default: torch's)")
    parser.add_argument("--out", default=None, help="write the rows and the machine as JSON here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    defaults = CHAINS
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, load average {load:.1f}")
    print(f"{'chain':10s} {'B':>5s} {'impl':8s} {'ran':18s} {'median ms':>10s} {'min-max ms':>17s} {'x eager':>8s} "
          f"{'GFLOP/s':>8s} {'of sgemm':>8s}")
    rows = []
    for name in args.chains:
        for batch in args.batches or defaults[name]:
            for row in measure(Chain(name, batch), args.repeats):
                rows.append(row)
                print(f"{row['chain']:10s} {row['batch']:5d} {row['impl']:8s} {row['ran']:18s} "
                      f"{row['median_ms']:10.1f} {row['min_ms']:8.1f}-{row['max_ms']:<8.1f} {row['vs_eager']:8.2f} "
                      f"{row['gflops']:8.1f} {row['of_sgemm']:8.0%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(dict(load_average=load, threads=torch.get_num_threads(), torch=torch.__version__,
                           rows=rows), f, indent=1)
    return rows


if __name__ == "__main__":
    main()
