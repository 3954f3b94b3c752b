"""Batched MCMC for analytic systems: MALA, HMC and parallel tempering, in torch.

All samplers run many independent chains at once (a ``(n_temps, n_chains, dim)`` state). Replica
``k`` targets exp(-u(x) / T_k) with T_k the temperature relative to the system's own (T_0 = 1 is
the target; higher ones only help mixing). Step sizes are adapted per temperature during burn-in
by a Robbins–Monro recursion on the log step size towards a target acceptance probability, then
frozen, so the production phase is a valid (time-homogeneous) Markov chain.

Mean-free particle systems: the energy is translation invariant, so the chains live in the
mean-free subspace. Initial states, the MALA noise, the HMC momenta and the gradients are projected
onto it (centre of mass removed); the proposal is then a Gaussian in that (n-1)·d-dimensional
subspace and the usual Metropolis–Hastings ratios hold unchanged.

The MALA and HMC moves are :func:`boltzflow.sampling.kernels.mala_step` and
:func:`~boltzflow.sampling.kernels.hmc_step`; this module adds per-temperature step sizes, their
adaptation, replica exchange and thinning. One step size ε for both: the MALA proposal is
y = x + (ε²/2) ∇log π(x) + ε ξ, the HMC leapfrog step is ε.

References:
    MALA: Roberts & Tweedie, Bernoulli 2 (1996) 341; optimal acceptance 0.574: Roberts &
    Rosenthal, J. R. Stat. Soc. B 60 (1998) 255.
    HMC: Duane et al., Phys. Lett. B 195 (1987) 216; Neal, "MCMC using Hamiltonian dynamics"
    (2011), acceptance ~0.65: Beskos et al., Bernoulli 19 (2013) 1501.
    Stochastic-approximation step-size adaptation: Andrieu & Thoms, Stat. Comput. 18 (2008) 343.
    Parallel tempering / replica exchange: Swendsen & Wang, PRL 57 (1986) 2607; Geyer (1991);
    Earl & Deem, PCCP 7 (2005) 3910.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from boltzflow.progress import Progress
from boltzflow.sampling.kernels import Evaluation, hmc_step, mala_step
from boltzflow.systems.base import System

__all__ = [
    "KERNELS",
    "TARGET_ACCEPTANCE",
    "MCMCResult",
    "geometric_ladder",
    "hmc",
    "mala",
    "parallel_tempering",
    "run_chains",
]

#: Default target acceptance probability of each move kernel.
TARGET_ACCEPTANCE = {"mala": 0.574, "hmc": 0.65}
KERNELS = tuple(TARGET_ACCEPTANCE)


@dataclass(frozen=True)
class MCMCResult:
    """Samples of the target (temperature index 0) and sampler statistics.

    Attributes:
        samples: ``(n_records * n_chains, dim)`` states of the T = 1 replicas, time-major (all
            chains at the first record, then all chains at the second, ...).
        energies: ``(N,)`` reduced energies u(x) of ``samples`` (kT).
        chain: ``(N,)`` index of the chain each row comes from.
        temperatures: ``(n_temps,)`` relative temperatures T_k / T (the first is 1).
        step_size: ``(n_temps,)`` frozen step sizes after adaptation.
        acceptance: ``(n_temps,)`` fraction of accepted proposals after burn-in.
        swap_acceptance: ``(n_temps - 1,)`` mean swap acceptance probability between neighbours
            after burn-in (empty for a single temperature).
        settings: the sampler's settings (JSON-friendly), for provenance.
        seconds: wall-clock time of the run.
    """

    samples: Tensor
    energies: Tensor
    chain: Tensor
    temperatures: Tensor
    step_size: Tensor
    acceptance: Tensor
    swap_acceptance: Tensor
    settings: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> dict[str, Any]:
        """JSON-friendly statistics: acceptance, swap acceptance, step sizes, ladder, time."""
        return {
            "temperatures": [round(float(t), 6) for t in self.temperatures],
            "step_size": [float(s) for s in self.step_size],
            "acceptance": [round(float(a), 4) for a in self.acceptance],
            "swap_acceptance": [round(float(a), 4) for a in self.swap_acceptance],
            "n_samples": int(self.samples.shape[0]),
            "n_chains": int(self.chain.max()) + 1 if self.chain.numel() else 0,
            "seconds": round(self.seconds, 3),
        }


def geometric_ladder(n_temps: int, t_max: float) -> Tensor:
    """Relative temperatures 1 = T_0 < ... < T_{n-1} = t_max in geometric progression, float64."""
    if n_temps < 1:
        raise ValueError(f"n_temps must be >= 1, got {n_temps}")
    if n_temps == 1:
        return torch.ones(1, dtype=torch.float64)
    if not t_max > 1:
        raise ValueError(f"t_max must be > 1 for a ladder of {n_temps} temperatures, got {t_max}")
    return torch.logspace(0.0, math.log10(t_max), n_temps, dtype=torch.float64)


class _Chains:
    """``K * C`` chains as flat rows (temperature-major): positions and the target evaluation.

    The evaluation keeps u and ∇u (temperature independent) as extras, so that a replica swap
    only re-weights them by the new β instead of evaluating the energy again.

    The gradient handed to the kernels (the MALA drift, the HMC kicks) is tamed: its norm is
    capped at 2·sqrt(dim)/ε, so that one drift (ε²/2)|∇log π| or kick ε|∇log π| never exceeds
    about the size of the noise or momentum, ε·sqrt(dim) or sqrt(dim). The Metropolis ratios use
    the same tamed drift both ways and the true energies, so the chains stay exact (MALTA, Roberts
    & Tweedie 1996, Sec. 1.4.3; leapfrog with any position-dependent kick is still reversible
    and volume preserving). In typical states the cap is far away; it matters near overlaps
    (Lennard-Jones) or in quartic tails, where untamed MALA rejects every proposal and a chain
    is stuck for good.
    """

    def __init__(self, system: System, x: Tensor, beta: Tensor) -> None:
        self.system = system
        self.shape = x.shape[:2]  # (K, C)
        self.beta_rows = beta.repeat_interleave(x.shape[1])  # (K*C,)
        self.project = system.remove_mean if system.mean_free else None
        self.cap_rows: Tensor | None = None  # per-row cap on |∇log π|, set by step()
        flat = x.reshape(-1, x.shape[-1])
        self.x = self.project(flat) if self.project else flat
        self.ev = self.evaluate(self.x)

    def _evaluation(self, u: Tensor, g: Tensor) -> Evaluation:
        """log π_k = −β_k u and its tamed gradient per row, with ``extras = (u, ∇u)``."""
        grad = -self.beta_rows[:, None] * g
        if self.cap_rows is not None:
            norm = grad.norm(dim=-1)
            grad = grad * (self.cap_rows / norm).clamp(max=1.0).nan_to_num(1.0)[:, None]
        return Evaluation(-self.beta_rows * u, grad, (u, g))

    def evaluate(self, x: Tensor) -> Evaluation:
        with torch.enable_grad():
            xg = x.detach().requires_grad_(True)
            u = self.system.energy(xg)
            (g,) = torch.autograd.grad(u.sum(), xg)
        return self._evaluation(u.detach(), g)

    @property
    def u(self) -> Tensor:
        """Reduced energies ``(K, C)`` at T = 1."""
        return self.ev.extras[0].reshape(self.shape)

    def step(self, kernel: str, eps: Tensor, gen: torch.Generator, n_leapfrog: int) -> Tensor:
        """One MALA proposal or HMC trajectory per chain; returns ``(K, C)`` accepted flags."""
        eps_rows = eps.repeat_interleave(self.shape[1])
        self.cap_rows = 2 * math.sqrt(self.x.shape[-1]) / eps_rows
        self.ev = self._evaluation(*self.ev.extras)  # re-tame with this step's ε (no new energy)
        if kernel == "mala":
            # kernels.mala_step takes h with proposal y = x + h ∇log π + sqrt(2h) ξ: h = ε²/2.
            res = mala_step(
                self.x, self.ev, self.evaluate, eps_rows**2 / 2, generator=gen, project=self.project
            )
        else:
            res = hmc_step(
                self.x,
                self.ev,
                self.evaluate,
                eps_rows,
                n_leapfrog=n_leapfrog,
                generator=gen,
                project=self.project,
            )
        self.x, self.ev = res.x, res.evaluation
        return res.accepted.reshape(self.shape)

    def swap(self, parity: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """Replica exchange between neighbours (k, k+1), k ≡ parity (mod 2), per chain.

        Accepts with min(1, exp((β_k − β_{k+1})(u_k − u_{k+1}))). Returns the lower indices of
        the pairs and the mean acceptance probability of each.
        """
        n_temps = self.shape[0]
        beta = self.beta_rows.reshape(self.shape)[:, 0]
        lo = torch.arange(parity, n_temps - 1, 2, device=self.x.device)
        if lo.numel() == 0:
            return lo, beta.new_zeros(0)
        hi = lo + 1
        u = self.u
        log_a = (beta[lo] - beta[hi])[:, None] * (u[lo] - u[hi])
        prob = log_a.clamp(max=0.0).exp()
        take = torch.rand(prob.shape, generator=gen, dtype=prob.dtype).to(prob.device) < prob
        u_flat, g_flat = self.ev.extras
        swapped = []
        for v in (self.x, u_flat, g_flat):
            v = v.reshape(*self.shape, *v.shape[1:]).clone()
            t = take.reshape(take.shape + (1,) * (v.ndim - 2))
            a, b = v[lo], v[hi]
            v[lo] = torch.where(t, b, a)
            v[hi] = torch.where(t, a, b)
            swapped.append(v.reshape(-1, *v.shape[2:]))
        self.x, u_new, g_new = swapped
        self.ev = self._evaluation(u_new, g_new)
        return lo, prob.mean(dim=1)


def run_chains(
    system: System,
    x0: Tensor,
    *,
    n_steps: int,
    kernel: str = "mala",
    temperatures: Sequence[float] | Tensor | None = None,
    burn_in: int = 1000,
    stride: int = 10,
    step_size: float = 0.1,
    target_acceptance: float | None = None,
    adapt: bool = True,
    n_leapfrog: int = 10,
    swap_every: int = 1,
    seed: int = 0,
    progress: bool = True,
) -> MCMCResult:
    """Run batched MCMC chains, optionally with replica exchange, and collect thinned samples.

    Args:
        system: target exp(-u(x)); only ``energy``, ``dim``, ``mean_free`` and ``remove_mean`` are
            used.
        x0: initial states ``(n_chains, dim)`` (copied to every temperature) or
            ``(n_temps, n_chains, dim)``; its dtype and device are used throughout (float64
            recommended). Projected onto the mean-free subspace for mean-free systems.
        n_steps: production steps after burn-in; one record every ``stride`` steps, so
            ``n_steps // stride`` records of ``n_chains`` samples each.
        kernel: ``"mala"`` or ``"hmc"`` (one HMC step is a trajectory of ``n_leapfrog`` steps).
        temperatures: relative ladder T_k / T starting at 1 (default: ``(1.0,)``, no tempering).
        burn_in: steps discarded at the start; step sizes adapt during them, then freeze.
        stride: thinning stride in steps.
        step_size: initial step size ε at T = 1 (MALA noise std; HMC leapfrog step), scaled by
            sqrt(T_k) at the other temperatures.
        target_acceptance: adaptation target (default 0.574 for MALA, 0.65 for HMC).
        adapt: adapt the step sizes during burn-in.
        n_leapfrog: leapfrog steps per HMC trajectory.
        swap_every: attempt neighbour swaps every this many steps (alternating even/odd pairs).
        seed: seed of the sampler's own ``torch.Generator``; CPU runs reproduce bit-for-bit.
        progress: show progress (a bar on a terminal, periodic lines otherwise).

    Returns:
        :class:`MCMCResult` with the T = 1 samples and statistics.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose one of {list(KERNELS)}")
    for name, value, low in (
        ("n_steps", n_steps, 0),
        ("burn_in", burn_in, 0),
        ("stride", stride, 1),
        ("n_leapfrog", n_leapfrog, 1),
        ("swap_every", swap_every, 1),
    ):
        if int(value) != value or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size!r}")
    target = TARGET_ACCEPTANCE[kernel] if target_acceptance is None else float(target_acceptance)
    if not 0 < target < 1:
        raise ValueError(f"target_acceptance must lie in (0, 1), got {target}")
    if not isinstance(x0, Tensor) or not x0.is_floating_point():
        raise TypeError("x0 must be a floating-point torch.Tensor")
    temps = torch.as_tensor(
        [1.0] if temperatures is None else temperatures, dtype=x0.dtype, device=x0.device
    ).reshape(-1)
    if temps.numel() == 0 or float(temps[0]) != 1.0 or bool((temps[1:] <= temps[:-1]).any()):
        raise ValueError(f"temperatures must increase from 1.0, got {temps.tolist()}")
    n_temps = temps.numel()
    if x0.ndim == 2:
        x0 = x0.expand(n_temps, *x0.shape)
    if x0.ndim != 3 or x0.shape[0] != n_temps or x0.shape[2] != system.dim:
        raise ValueError(
            f"x0 must be (n_chains, {system.dim}) or ({n_temps}, n_chains, {system.dim}), "
            f"got {tuple(x0.shape)}"
        )
    if not bool(torch.isfinite(x0).all()):
        raise ValueError("x0 contains NaN or inf")

    start = time.perf_counter()
    # A CPU generator on any device: the kernels draw noise on the CPU and move it (reproducible).
    gen = torch.Generator().manual_seed(int(seed))
    chains = _Chains(system, x0.detach().clone(), 1.0 / temps)
    if not bool(torch.isfinite(chains.u).all()):
        raise ValueError("some initial states have infinite or NaN energy")
    log_eps = math.log(step_size) + 0.5 * temps.log()
    n_chains = x0.shape[1]
    acc_sum = torch.zeros_like(temps)
    swap_sum = torch.zeros(max(n_temps - 1, 0), dtype=temps.dtype, device=temps.device)
    swap_cnt = torch.zeros_like(swap_sum)
    records_x, records_u = [], []
    total = burn_in + n_steps
    swap_round = 0
    with Progress(total, desc=f"{kernel} x{n_temps}T", unit="step", enabled=progress) as bar:
        for t in range(total):
            a = chains.step(kernel, log_eps.exp(), gen, n_leapfrog).to(temps.dtype).mean(dim=1)
            production = t >= burn_in
            if not production and adapt:
                # Robbins–Monro on log step size with gain (t+1)^-0.6 (Andrieu & Thoms 2008).
                log_eps = log_eps + (a - target) / (t + 1) ** 0.6
            if production:
                acc_sum += a
            if n_temps > 1 and (t + 1) % swap_every == 0:
                lo, p_swap = chains.swap(swap_round % 2, gen)
                swap_round += 1
                if production:
                    swap_sum[lo] += p_swap
                    swap_cnt[lo] += 1
            if production and (t - burn_in + 1) % stride == 0:
                records_x.append(chains.x[:n_chains].clone())
                records_u.append(chains.u[0].clone())
            bar.update(1)
    dim = system.dim
    samples = torch.stack(records_x) if records_x else x0.new_zeros(0, n_chains, dim)
    energies = torch.stack(records_u) if records_u else x0.new_zeros(0, n_chains)
    chain_index = torch.arange(n_chains, device=x0.device).repeat(samples.shape[0])
    settings = {
        "kernel": kernel,
        "n_chains": n_chains,
        "n_steps": n_steps,
        "burn_in": burn_in,
        "stride": stride,
        "temperatures": [float(t) for t in temps],
        "initial_step_size": step_size,
        "target_acceptance": target,
        "adapt": adapt,
        "n_leapfrog": n_leapfrog if kernel == "hmc" else None,
        "swap_every": swap_every if n_temps > 1 else None,
        "seed": int(seed),
    }
    return MCMCResult(
        samples=samples.reshape(-1, dim),
        energies=energies.reshape(-1),
        chain=chain_index,
        temperatures=temps,
        step_size=log_eps.exp(),
        acceptance=acc_sum / max(n_steps, 1),
        swap_acceptance=swap_sum / swap_cnt.clamp(min=1),
        settings=settings,
        seconds=time.perf_counter() - start,
    )


def mala(system: System, x0: Tensor, *, n_steps: int, **kwargs: Any) -> MCMCResult:
    """Metropolis-adjusted Langevin chains at T = 1; keyword arguments as :func:`run_chains`."""
    return run_chains(system, x0, n_steps=n_steps, kernel="mala", **kwargs)


def hmc(system: System, x0: Tensor, *, n_steps: int, **kwargs: Any) -> MCMCResult:
    """Hamiltonian Monte Carlo chains at T = 1; keyword arguments as :func:`run_chains`."""
    return run_chains(system, x0, n_steps=n_steps, kernel="hmc", **kwargs)


def parallel_tempering(
    system: System,
    x0: Tensor,
    *,
    n_steps: int,
    n_temps: int = 4,
    t_max: float = 4.0,
    kernel: str = "mala",
    **kwargs: Any,
) -> MCMCResult:
    """Replica exchange on a geometric ladder of ``n_temps`` temperatures from 1 to ``t_max``.

    Each replica moves by ``kernel`` (MALA or HMC) at its own temperature with its own adapted
    step size; neighbours swap every ``swap_every`` steps. Other keyword arguments as
    :func:`run_chains`.
    """
    ladder = geometric_ladder(n_temps, t_max).to(dtype=x0.dtype, device=x0.device)
    return run_chains(system, x0, n_steps=n_steps, kernel=kernel, temperatures=ladder, **kwargs)
