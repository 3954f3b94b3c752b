"""Annealed importance sampling (AIS) and sequential Monte Carlo (SMC) refinement of a proposal.

Anneal from the proposal q to the target p ~ exp(-u) through the geometric path
pi_b(x) ~ q(x)^(1-b) exp(-b u(x)), 0 = b_0 < b_1 < ... < b_K = 1 (Neal 2001, "Annealed
importance sampling", Stat. Comput. 11:125; Del Moral, Doucet, Jasra 2006, "Sequential Monte
Carlo samplers", JRSS B 68:411). At step k each particle's log weight gains
(b_k - b_{k-1}) * (-u(x) - log q(x)); when the Kish ESS falls below ``resample_threshold * N``
the particles are resampled (weights reset to the running log Z estimate); then each particle
takes ``n_kernel_steps`` MALA or HMC steps invariant for pi_{b_k}. With no MCMC moves and no
resampling this reduces exactly to plain importance sampling with weights -u - log q.

The schedule is given (``betas``, or ``n_steps`` even steps) or adaptive (``adaptive_ess``):
each next b is then the largest one whose increment keeps the conditional ESS of the current
weighted particles at ``adaptive_ess * N`` (bisection; Zhou, Johansen & Aston 2016, J. Comput.
Graph. Stat. 25:701). An adaptive schedule depends on the particles, which adds a small bias to
log Z (negligible against its standard error for N in the hundreds and up; Beskos, Jasra,
Kantas & Thiery 2016, Ann. Appl. Probab. 26:1111).

Cost is counted exactly: every row the target's ``energy`` is called on is one energy
evaluation, and one force evaluation when a gradient is taken through it (the initial pass and
every MALA step or HMC leapfrog step evaluate both); :class:`SMCResult` reports the totals and
per final sample, with the wall time.

The result has the same interface as importance sampling: :class:`WeightedSamples` whose
``log_w`` satisfy log Z = LSE(log w) - log N, and an :class:`Estimate` of log Z. Its standard
error uses the "Eve" (initial ancestor) variance estimator of Chan & Lai (2013, Ann. Stat.
41:2877) and Lee & Whiteley (2018, Biometrika 105:609): relative variance
~ N/(N-1) * sum_e (sum_{i: Eve(i)=e} W_i - 1/N)^2, which without resampling is the delta-method
variance of :func:`~boltzflow.sampling.estimators.log_partition`. (It is derived for multinomial
resampling; with systematic resampling it is typically conservative. It degrades when few Eves
survive: ``n_eves`` is reported.)
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from scipy.stats import norm
from torch import Tensor

from boltzflow.progress import track
from boltzflow.sampling.kernels import (
    Evaluation,
    adapt_step_size,
    hmc_step,
    mala_step,
    tempered_evaluator,
)
from boltzflow.sampling.proposals import Proposal
from boltzflow.sampling.resampling import resample_indices
from boltzflow.sampling.results import Estimate, WeightedSamples
from boltzflow.sampling.weights import ess_fraction, kish_ess, log_weights
from boltzflow.systems.base import System

__all__ = ["KERNELS", "SMCResult", "ais", "next_beta", "smc"]

#: Kernel names and the acceptance rate their step sizes are adapted to (MALA: Roberts &
#: Rosenthal 1998, JRSS B 60:255; HMC: Beskos et al. 2013, Bernoulli 19:1501).
KERNELS: dict[str, float] = {"mala": 0.574, "hmc": 0.651}

# Robbins-Monro gain of the population step-size adaptation (the mean acceptance of N particles
# is a low-noise signal, so a larger gain than for single chains is fine).
_ADAPT_RATE = 0.3


@dataclass(frozen=True)
class SMCResult:
    """Output of :func:`smc`.

    Attributes:
        samples: final weighted samples at b = 1 (``log_q`` is the effective -u - log_w).
        log_z: log Z estimate with its interval (method ``"delta"`` without resampling, else
            ``"eve"``).
        betas: ``(K + 1,)`` the schedule, starting at 0 and ending at 1.
        ess_history: ``(K,)`` ESS/N after each reweighting, before any resampling.
        resampled: ``(K,)`` whether the particles were resampled at that step.
        acceptance: ``(K,)`` mean kernel acceptance rate at each step.
        initial_ess_fraction: ESS/N of the plain importance weights -u - log q of the proposal.
        n_eves: distinct initial particles with surviving descendants.
        eves: ``(N,)`` the initial particle ("Eve") each final particle descends from (cluster
            labels for interval estimates of correlated particles).
        step_sizes: ``(K,)`` mean kernel step size used at each temperature.
        n_energy_evaluations: rows on which the target energy was evaluated, in all.
        n_force_evaluations: of those, rows whose gradient (force) was also taken.
        seconds: wall time of the run.
    """

    samples: WeightedSamples
    log_z: Estimate
    betas: np.ndarray
    ess_history: np.ndarray
    resampled: np.ndarray
    acceptance: np.ndarray
    initial_ess_fraction: float
    n_eves: int
    eves: Tensor
    step_sizes: np.ndarray
    n_energy_evaluations: int
    n_force_evaluations: int
    seconds: float

    @property
    def ess_fraction(self) -> float:
        """ESS/N of the final weights (N = ``len(samples)``)."""
        return self.samples.ess_fraction

    @property
    def energy_evaluations_per_sample(self) -> float:
        """Target energy evaluations per final sample (N = ``len(samples)``)."""
        return self.n_energy_evaluations / len(self.samples)

    @property
    def force_evaluations_per_sample(self) -> float:
        """Target force (gradient) evaluations per final sample."""
        return self.n_force_evaluations / len(self.samples)


class _CountingEnergy:
    """``energy(x)`` that counts its rows, and the rows whose gradient can be taken (forces)."""

    def __init__(self, energy: Callable[[Tensor], Tensor]) -> None:
        self.energy = energy
        self.energies = 0
        self.forces = 0

    def __call__(self, x: Tensor) -> Tensor:
        self.energies += x.shape[0]
        if torch.is_grad_enabled() and x.requires_grad:
            self.forces += x.shape[0]
        return self.energy(x)


def _schedule(betas: Sequence[float] | None, n_steps: int) -> np.ndarray:
    if betas is None:
        if not isinstance(n_steps, int) or n_steps < 1:
            raise ValueError(f"n_steps must be a positive int, got {n_steps!r}")
        return np.linspace(0.0, 1.0, n_steps + 1)
    b = np.asarray(betas, dtype=np.float64)
    if b.ndim != 1 or b.size < 2 or b[0] != 0.0 or b[-1] != 1.0 or np.any(np.diff(b) <= 0):
        raise ValueError("betas must increase strictly from 0 to 1 (first 0, last 1)")
    return b


def next_beta(log_w: Tensor, increment: Tensor, beta: float, target: float) -> float:
    """Adaptive tempering: the largest b' in (b, 1] whose reweighting keeps the conditional ESS.

    The conditional ESS of an increment ``(b' - b) * increment`` on particles with weights
    ``log_w`` is CESS/N = (sum_i W_i v_i)^2 / sum_i W_i v_i^2, v_i = exp((b' - b) l_i), W the
    normalised weights (Zhou, Johansen & Aston 2016). b' solves CESS/N = ``target`` times its
    limit as b' -> b (particles with l_i = -inf, weight zero after any step, are thus not asked
    to vanish gradually), by bisection to 1e-12 in b.

    Args:
        log_w: ``(N,)`` current log weights.
        increment: ``(N,)`` l_i = d log pi_b / d b (``-u - log q``; ``-inf`` allowed).
        beta: current b in [0, 1).
        target: CESS/N to keep, in (0, 1).

    Returns:
        the next b (1.0 when the whole remaining step keeps the target).
    """
    lw = log_w.to(torch.float64) - torch.logsumexp(log_w.to(torch.float64), 0)
    inc = increment.to(torch.float64)
    ok = torch.isfinite(inc) & torch.isfinite(lw)
    if not bool(ok.any()):
        return 1.0
    lw, inc = lw[ok], inc[ok]
    limit = float(torch.exp(torch.logsumexp(lw, 0)))  # CESS/N as b' -> b from above

    def cess(delta: float) -> float:
        a = torch.logsumexp(lw + delta * inc, 0)
        b2 = torch.logsumexp(lw + 2 * delta * inc, 0)
        return float(torch.exp(2 * a - b2))

    lo, hi = 0.0, 1.0 - beta
    goal = target * limit
    if cess(hi) >= goal:
        return 1.0
    while hi - lo > 1e-12:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if cess(mid) >= goal else (lo, mid)
    return beta + max(lo, 1e-12)


def _at_beta(ev: Evaluation, beta: float) -> Evaluation:
    lq, u, g_lq, g_u = ev.extras
    lp = (1 - beta) * lq - beta * u
    return Evaluation(lp, (1 - beta) * g_lq - beta * g_u, ev.extras)


def _eve_log_z(log_w: Tensor, eves: Tensor, level: float, resampled: bool) -> Estimate:
    n = log_w.numel()
    value = float(torch.logsumexp(log_w, 0)) - math.log(n)
    w = torch.exp(log_w - torch.logsumexp(log_w, 0))
    per_eve = torch.zeros(n, dtype=w.dtype, device=w.device).index_add_(0, eves, w)
    rel_var = float(((per_eve - 1.0 / n) ** 2).sum()) * n / max(n - 1, 1)
    se = math.sqrt(rel_var)
    z = float(norm.ppf(0.5 + level / 2))
    method = "eve" if resampled else "delta"
    return Estimate(value, value - z * se, value + z * se, se, n, kish_ess(log_w), method, level)


def smc(
    system: System,
    proposal: Proposal,
    n: int,
    *,
    betas: Sequence[float] | None = None,
    n_steps: int = 20,
    adaptive_ess: float | None = None,
    max_steps: int = 1000,
    kernel: str = "mala",
    n_kernel_steps: int = 2,
    step_size: float = 0.01,
    n_leapfrog: int = 5,
    adapt: bool = True,
    resample_threshold: float = 0.5,
    resampling: str = "systematic",
    initial: tuple[Tensor, Tensor] | None = None,
    wrap: Callable[[Tensor], Tensor] | None = None,
    level: float = 0.95,
    seed: int = 0,
    progress: bool | None = None,
) -> SMCResult:
    """Refine proposal samples towards the target by annealed SMC.

    Args:
        system: the target (its ``energy`` must be differentiable; mean-free systems keep
            particles in the mean-free subspace).
        proposal: ``sample(n, seed) -> (x, log_q)`` and differentiable ``log_prob(x)``.
        n: number of particles N.
        betas: explicit schedule (0, ..., 1); default ``n_steps + 1`` evenly spaced values.
        n_steps: K, used when ``betas`` and ``adaptive_ess`` are None.
        adaptive_ess: choose the schedule adaptively, keeping the conditional ESS/N of each
            reweighting at this value in (0, 1) (:func:`next_beta`); excludes ``betas``.
        max_steps: most temperatures an adaptive schedule may take (then ValueError).
        kernel: ``"mala"`` or ``"hmc"``.
        n_kernel_steps: kernel applications per temperature (0 gives pure reweighting).
        step_size: initial step size (coordinate units).
        n_leapfrog: leapfrog steps per HMC proposal.
        adapt: after each kernel application, adapt the (population-wide) step size towards the
            kernel's target acceptance using the mean acceptance of all particles.
        resample_threshold: resample when ESS < threshold * N (0: never, i.e. AIS).
        resampling: ``"systematic"`` or ``"multinomial"``.
        initial: start from these ``(x, log_q)`` instead of drawing ``n`` from the proposal
            (e.g. a few-step student's samples); ``log_q`` is recomputed with
            ``proposal.log_prob`` (its gradient is needed anyway).
        wrap: reduce periodic coordinates into their box after each move (see
            :mod:`~boltzflow.sampling.kernels`: exact for any step size); the proposal's
            samples must lie inside it.
        level: confidence level of the log Z interval.
        seed: seed for the proposal draw, kernel noise and resampling.
        progress: show progress (a bar on a terminal, periodic lines otherwise; None: as True).

    Returns:
        :class:`SMCResult`.
    """
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}; choose from {sorted(KERNELS)}")
    if not 0.0 <= resample_threshold <= 1.0:
        raise ValueError(f"resample_threshold must be in [0, 1], got {resample_threshold!r}")
    if not isinstance(n_kernel_steps, int) or n_kernel_steps < 0:
        raise ValueError(f"n_kernel_steps must be a non-negative int, got {n_kernel_steps!r}")
    if not step_size > 0:
        raise ValueError(f"step_size must be positive, got {step_size!r}")
    if adaptive_ess is not None:
        if betas is not None:
            raise ValueError("give either betas or adaptive_ess, not both")
        if not 0.0 < adaptive_ess < 1.0:
            raise ValueError(f"adaptive_ess must be in (0, 1), got {adaptive_ess!r}")
        if not isinstance(max_steps, int) or max_steps < 1:
            raise ValueError(f"max_steps must be a positive int, got {max_steps!r}")
        schedule = None
    else:
        schedule = _schedule(betas, n_steps)
    t_start = time.perf_counter()
    energy = _CountingEnergy(system.energy)
    gen = torch.Generator().manual_seed(seed)
    if initial is None:
        x, _ = proposal.sample(n, seed=seed)
    else:
        x = torch.as_tensor(initial[0])
        n = x.shape[0]
    x = x.detach()  # keep the proposal's dtype (a float32 flow gets float32 inputs)
    project: Callable[[Tensor], Tensor] | None = system.remove_mean if system.mean_free else None
    if project is not None:
        x = project(x)

    ev = tempered_evaluator(proposal.log_prob, energy, 0.0)(x)
    lq, u = ev.extras[0].to(torch.float64), ev.extras[1].to(torch.float64)
    initial_ess = ess_fraction(log_weights(u, lq))
    dev = x.device
    log_w = torch.zeros(n, dtype=torch.float64, device=dev)
    eves = torch.arange(n, device=dev)
    h = torch.full((n,), float(step_size), dtype=torch.float64, device=dev)
    target_acc = KERNELS[kernel]
    ess_hist, did_resample, acc_hist, h_hist = [], [], [], []
    any_resampled = False
    visited = [0.0]

    def temperatures() -> Iterator[tuple[int, float, float]]:
        if schedule is not None:
            for k in range(1, len(schedule)):
                yield k, float(schedule[k - 1]), float(schedule[k])
            return
        k, b = 0, 0.0
        while b < 1.0:
            if k == max_steps:
                raise ValueError(
                    f"the adaptive schedule needs more than max_steps={max_steps} temperatures "
                    f"(reached b = {b:.3g}); lower adaptive_ess or raise max_steps"
                )
            k += 1
            inc = log_weights(ev.extras[1].to(torch.float64), ev.extras[0].to(torch.float64))
            b_next = next_beta(log_w, inc, b, adaptive_ess)
            yield k, b, b_next
            b = b_next

    total = None if schedule is None else len(schedule) - 1
    steps = temperatures()
    for k, b_prev, b in track(
        steps, total=total, desc="SMC", unit="step", enabled=progress is not False
    ):
        visited.append(b)
        lq, u = ev.extras[0].to(torch.float64), ev.extras[1].to(torch.float64)
        log_w = log_w + (b - b_prev) * log_weights(u, lq)
        ess = ess_fraction(log_w)
        ess_hist.append(ess)
        resample_now = ess < resample_threshold
        did_resample.append(resample_now)
        if resample_now:
            any_resampled = True
            log_z_run = float(torch.logsumexp(log_w, 0)) - math.log(n)
            idx = resample_indices(log_w, n, method=resampling, seed=seed * 100_003 + k).to(dev)
            x, h, eves = x[idx], h[idx], eves[idx]
            ev = Evaluation(ev.log_prob[idx], ev.grad[idx], tuple(e[idx] for e in ev.extras))
            log_w = torch.full((n,), log_z_run, dtype=torch.float64, device=dev)
        evaluate = tempered_evaluator(proposal.log_prob, energy, b)
        ev = _at_beta(ev, b)
        acc = torch.zeros(n, dtype=torch.float64, device=dev)
        h_hist.append(float(h.mean()))
        for _ in range(n_kernel_steps):
            if kernel == "mala":
                step = mala_step(x, ev, evaluate, h, generator=gen, project=project, wrap=wrap)
            else:
                step = hmc_step(
                    x,
                    ev,
                    evaluate,
                    h,
                    n_leapfrog=n_leapfrog,
                    generator=gen,
                    project=project,
                    wrap=wrap,
                )
            x, ev = step.x, step.evaluation
            acc += step.accepted.to(torch.float64)
            if adapt:
                # One step size for the whole population, adapted to the mean acceptance: a
                # particle's own step size must not depend on its own history, or the kernel
                # stops being invariant (Andrieu & Thoms 2008, Stat. Comput. 18:343).
                mean_acc = step.accepted.to(torch.float64).mean()
                h = adapt_step_size(h, mean_acc, target_acc, rate=_ADAPT_RATE)
        acc_hist.append(float(acc.mean()) / max(n_kernel_steps, 1) if n_kernel_steps else 0.0)

    u = ev.extras[1].to(torch.float64)
    u = torch.where(torch.isnan(u), float("inf"), u)
    samples = WeightedSamples(x, -u - log_w, u, torch.where(torch.isinf(u), -math.inf, log_w))
    return SMCResult(
        samples=samples,
        log_z=_eve_log_z(samples.log_w, eves, level, any_resampled),
        betas=np.asarray(visited, dtype=np.float64),
        ess_history=np.asarray(ess_hist),
        resampled=np.asarray(did_resample, dtype=bool),
        acceptance=np.asarray(acc_hist),
        initial_ess_fraction=initial_ess,
        n_eves=int(torch.unique(eves).numel()),
        eves=eves,
        step_sizes=np.asarray(h_hist),
        n_energy_evaluations=energy.energies,
        n_force_evaluations=energy.forces,
        seconds=time.perf_counter() - t_start,
    )


def ais(system: System, proposal: Proposal, n: int, **kwargs: object) -> SMCResult:
    """Annealed importance sampling: :func:`smc` without resampling (``resample_threshold=0``)."""
    if "resample_threshold" in kwargs:
        raise TypeError("ais() never resamples; call smc() to set resample_threshold")
    return smc(system, proposal, n, resample_threshold=0.0, **kwargs)
