r"""SMC refinement of a few-step sampler in its latent (prior) space.

A few-step student maps prior points z to samples x = T(z) with a log density log q(x), but
has no cheap differentiable ``log_prob`` at an arbitrary x, which :func:`~boltzflow.sampling.smc`
needs of its proposal. So the SMC runs on z instead. With p the prior density and the importance
weight w(z) = exp(-u(T(z)) - log q(T(z))) of the sample T(z) (DESIGN.md's convention; for an
internal-coordinate student log q(x) already carries the internal -> Cartesian volume term),

    E_p[f] = E_{z ~ prior}[w(z) f(T(z))] / E_{z ~ prior}[w(z)],

so the target pulled back to z is p_z(z) ∝ prior(z) w(z), with reduced energy

    u_z(z) = u(T(z)) + log q(T(z)) - log prior(z),

differentiable in z by autograd through the student's steps, its log-determinant, the
internal-coordinate transform and the energy (:class:`LatentTarget`). The prior is the SMC
proposal (exact, differentiable log density), and the geometric path of
:func:`~boltzflow.sampling.smc` becomes pi_b(z) ∝ prior(z) w(z)^b: at b = 0 the prior, at b = 1
the pulled-back target. Each reweighting gains (b' - b) log w(z) = (b' - b)(-u(x) - log q(x)),
so with no moves and no resampling the final weights are exactly the plain importance weights
of the student's samples, and after SMC the samples T(z) carry weights in the same convention
(:func:`refine_latent`). This needs only that log q is the density of T's pushforward of the
prior (as for plain importance sampling with the student); T need not be invertible.

Periodic latent columns (the dihedrals of a :class:`~boltzflow.flows.priors.TorusGaussian`) are
wrapped into [-pi, pi) after every move (:mod:`~boltzflow.sampling.kernels`: exact for any step
size), so no move is lost to the prior's box.

References:
    Moving the sampling into the latent space of a flow: Hoffman et al. 2019, "NeuTra-lizing bad
    geometry in Hamiltonian Monte Carlo using neural transport", arXiv:1903.03704; SMC on the
    flow's base space: Arbel, Matthews & Doucet 2021, "Annealed flow transport Monte Carlo",
    arXiv:2102.07501.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, replace
from typing import Any, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from boltzflow.sampling.results import Estimate, WeightedSamples
from boltzflow.sampling.smc import KERNELS, SMCResult, smc
from boltzflow.systems.base import System, SystemInfo, check_coordinates
from boltzflow.systems.internal_coords import wrap_angle
from boltzflow.validate import nonnegative_int, positive_float, positive_int

__all__ = [
    "LatentPrior",
    "LatentSMCOptions",
    "LatentSMCResult",
    "LatentSampler",
    "LatentTarget",
    "PriorProposal",
    "check_latent_smc_options",
    "refine_latent",
    "write_latent_samples",
]


class LatentPrior(Protocol):
    """What is needed of a base density (every :class:`~boltzflow.flows.priors.Prior`):
    ``dim``, ``sample(n, generator=, dtype=, device=)`` and a differentiable ``log_prob``.
    Periodic columns are read from ``periodic`` (column indices, on [-pi, pi), as
    :class:`~boltzflow.flows.priors.TorusGaussian`), a mean-free subspace from
    ``n_particles`` and ``spatial_dim`` (as :class:`~boltzflow.flows.priors.MeanFreeGaussian`)."""

    dim: int

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> Tensor: ...

    def log_prob(self, x: Tensor) -> Tensor: ...


@runtime_checkable
class LatentSampler(Protocol):
    """A sampler x = T(z) from a prior with a differentiable density of its output (every
    :class:`~boltzflow.distill.base.Student`)."""

    prior: LatentPrior

    def sample_from(self, z: Tensor, steps: int | None = None) -> tuple[Tensor, Tensor]:
        """``(x (B, dim), log_q (B,))`` of ``z (B, prior.dim)``, differentiable in z."""
        ...


class PriorProposal:
    """A model's prior as an SMC proposal: ``sample(n, seed) -> (z, log p(z))`` and
    ``log_prob(z)`` (:class:`~boltzflow.sampling.proposals.Proposal`).

    ``sample`` draws exactly what :meth:`~boltzflow.distill.base.Student.iter_samples` draws for
    the same seed (one CPU generator seeded with ``seed``, all n points at once), so that the
    first SMC particles are the student's own samples.

    Args:
        prior: the base density.
        dtype, device: of the drawn points (the model's).
    """

    def __init__(
        self,
        prior: LatentPrior,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
    ) -> None:
        self.prior = prior
        self.dim = prior.dim
        self.dtype = dtype
        self.device = device

    def sample(self, n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
        """``(z (n, dim), log p(z) (n,))``."""
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"number of samples must be a positive int, got {n!r}")
        gen = torch.Generator().manual_seed(seed)
        z = self.prior.sample(n, generator=gen, dtype=self.dtype, device=self.device)
        return z, self.prior.log_prob(z)

    def log_prob(self, z: Tensor) -> Tensor:
        """``(B,)`` log p(z), differentiable."""
        return self.prior.log_prob(z)


class LatentTarget(System):
    """The target pulled back to a sampler's latent space: u_z(z) = u(T(z)) + log q(T(z)) -
    log prior(z) (module docstring), a :class:`~boltzflow.systems.base.System` on z.

    The physical energy is evaluated in float64 (``system.energy`` of T(z) cast to float64)
    with autograd, so forces come from whatever backend ``system`` uses; ``energy`` returns
    float64. Rows whose sample is invalid (log q = +inf, u = +inf or NaN) get u_z = +inf.

    Args:
        model: the sampler (:class:`LatentSampler`), used as it is (put it in eval mode).
        system: the physical target (reduced energy u(x) in kT, differentiable).
        steps: the sampler's number of steps K (None: its default).
        batch_size: rows per pass through the sampler. With a gradient, each chunk's value and
            gradient are computed (and its graph freed) before the next, so memory is bounded by
            ``batch_size`` rows: a FALCON student keeps a Jacobian per step and row in its graph
            (about 11 MB per ALDP row at K = 4).

    Attributes:
        periodic: boolean ``(dim,)`` mask of the periodic prior columns (None without any).

    Raises:
        TypeError: ``model`` has no ``prior`` or ``sample_from``.
        ValueError: ``batch_size < 1``.
    """

    def __init__(
        self,
        model: LatentSampler,
        system: System,
        steps: int | None = None,
        *,
        batch_size: int = 1024,
    ) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if not isinstance(model, LatentSampler):
            raise TypeError(
                f"model must have a prior and sample_from(z, steps), got {type(model).__name__}"
            )
        prior = model.prior
        n_particles = getattr(prior, "n_particles", None)
        spatial_dim = getattr(prior, "spatial_dim", None)
        mean_free = n_particles is not None and spatial_dim is not None
        info = SystemInfo(
            name=f"latent[{system.name}]",
            dim=prior.dim,
            n_particles=n_particles,
            spatial_dim=spatial_dim,
            temperature=system.temperature,
            description=f"{system.name} pulled back to the latent space of {type(model).__name__}",
            mean_free=mean_free,
        )
        super().__init__(info)
        self.model = model
        self.system = system
        self.steps = steps
        self.batch_size = batch_size
        columns = [int(i) for i in getattr(prior, "periodic", ())]
        self.periodic: Tensor | None = None
        if columns:
            self.periodic = torch.zeros(prior.dim, dtype=torch.bool)
            self.periodic[columns] = True

    def wrap(self, z: Tensor) -> Tensor:
        """``z (B, dim)`` with the periodic columns reduced into [-pi, pi) (a new tensor)."""
        if self.periodic is None:
            return z
        return torch.where(self.periodic.to(z.device), wrap_angle(z, periodic=True), z)

    def decode(self, z: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(x (B, dim_x), log_q (B,), log prior(z) (B,))``: the sample T(z), its log density
        and the prior's log density, float64 log densities (differentiable in z)."""
        z = check_coordinates(z, self.dim, self.name)
        x, log_q = self.model.sample_from(z, self.steps)
        return x, log_q.to(torch.float64), self.model.prior.log_prob(z).to(torch.float64)

    def reduced_energy(self, z: Tensor) -> Tensor:
        """u_z of one batch ``z (B, dim)`` in a single graph (``(B,)`` float64; no chunking)."""
        x, log_q, log_p = self.decode(z)
        u = self.system.energy(x.to(torch.float64))
        u_z = u + log_q - log_p
        bad = torch.isnan(u_z) | torch.isinf(u) | torch.isinf(log_q)
        return torch.where(bad, torch.full_like(u_z, float("inf")), u_z)

    def _energy(self, z: Tensor) -> Tensor:
        need_grad = torch.is_grad_enabled() and z.requires_grad
        return _ChunkedEnergy.apply(z, self, need_grad)


class _ChunkedEnergy(torch.autograd.Function):
    """u_z chunk by chunk; with a gradient, each chunk's gradient is taken at once (its graph
    freed) and saved for the backward pass, as the OpenMM energy saves its forces."""

    @staticmethod
    def forward(ctx: Any, z: Tensor, target: LatentTarget, need_grad: bool) -> Tensor:
        values, grads = [], []
        for chunk in z.detach().split(target.batch_size):
            if not need_grad:
                values.append(target.reduced_energy(chunk).detach())
                continue
            with torch.enable_grad():
                zc = chunk.detach().requires_grad_(True)
                u = target.reduced_energy(zc)
                finite = torch.isfinite(u)
                (g,) = torch.autograd.grad(torch.where(finite, u, 0).sum(), zc)
            values.append(u.detach())
            grads.append(torch.where(finite[:, None], g, torch.zeros_like(g)))
        if need_grad:
            ctx.save_for_backward(torch.cat(grads) if grads else z.new_zeros(z.shape))
        return torch.cat(values) if values else z.new_zeros(0, dtype=torch.float64)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_u: Tensor) -> tuple[Tensor, None, None]:
        (grad,) = ctx.saved_tensors
        factor = torch.where(torch.isfinite(grad_u), grad_u, torch.zeros_like(grad_u))
        return (factor[:, None] * grad).to(grad.dtype), None, None


@dataclass(frozen=True)
class LatentSMCResult:
    """Output of :func:`refine_latent`.

    Attributes:
        samples: the final weighted samples in data space: ``x = T(z)`` (Cartesian nm for a
            molecule), ``u`` the physical reduced energy, ``log_w`` the SMC log weights (log Z =
            LSE(log w) - log N, as for plain importance sampling) and ``log_q`` the effective
            -u - log_w.
        z: ``(N, prior.dim)`` the final latent particles.
        smc: the SMC run on z (schedule, ESS history, acceptance, step sizes, Eves, counts).
        steps: the sampler's K.
    """

    samples: WeightedSamples
    z: Tensor
    smc: SMCResult
    steps: int | None

    @property
    def ess_fraction(self) -> float:
        """Kish ESS/N of the final weights."""
        return self.samples.ess_fraction

    @property
    def log_z(self) -> Estimate:
        """log Z with its interval (see :class:`~boltzflow.sampling.smc.SMCResult`)."""
        return self.smc.log_z

    @property
    def initial_ess_fraction(self) -> float:
        """ESS/N of the plain importance weights of the first N samples T(z)."""
        return self.smc.initial_ess_fraction

    @property
    def energy_evaluations_per_sample(self) -> float:
        """Physical energy evaluations per final sample."""
        return self.smc.energy_evaluations_per_sample

    @property
    def force_evaluations_per_sample(self) -> float:
        """Physical force (gradient) evaluations per final sample."""
        return self.smc.force_evaluations_per_sample

    @property
    def seconds(self) -> float:
        """Wall time of the run, decoding the final samples included."""
        return self.smc.seconds


@dataclass(frozen=True)
class LatentSMCOptions:
    """The SMC settings of :func:`refine_latent` as one record: what ``workflows/aldp_smc.py``
    exposes and a workflow's ``[smc]`` table holds. The defaults are the ones tuned on the ALDP
    F2D2 student (docs/benchmarks.md, "SMC refinement of the ALDP 4-step student": ESS/N above
    0.8 at 36 energy and force evaluations per sample).

    Attributes:
        kernel: ``"mala"`` or ``"hmc"``.
        adaptive_ess: the conditional ESS/N each adaptive tempering step keeps, in (0, 1).
        n_temperatures: 0 for the adaptive schedule; K > 0 for K evenly spaced temperatures
            instead (``adaptive_ess`` is then not used; a fixed cost, e.g. for smoke tests).
        n_kernel_steps: moves per temperature (0: reweighting only).
        step_size: initial step size in latent units (then adapted towards the kernel's target
            acceptance).
        n_leapfrog: leapfrog steps per HMC proposal.
        resample_threshold: resample when ESS/N falls below this, in [0, 1] (0: never).

    Raises:
        ValueError: a value out of range or an unknown kernel (the message names the field).
    """

    kernel: str = "mala"
    adaptive_ess: float = 0.9
    n_temperatures: int = 0
    n_kernel_steps: int = 5
    step_size: float = 0.05
    n_leapfrog: int = 5
    resample_threshold: float = 0.8

    def __post_init__(self) -> None:
        check_latent_smc_options(asdict(self))

    def smc_kwargs(self) -> dict[str, Any]:
        """Keywords of :func:`~boltzflow.sampling.smc` (through :func:`refine_latent`)."""
        out = asdict(self)
        k = out.pop("n_temperatures")
        adaptive = out.pop("adaptive_ess")
        return {**out, **({"n_steps": k} if k else {"adaptive_ess": adaptive})}


def check_latent_smc_options(values: Mapping[str, Any], prefix: str = "") -> None:
    """Check the :class:`LatentSMCOptions` fields present in ``values``; error messages name
    each as ``prefix + field`` (e.g. ``"smc.step_size"``).

    Raises:
        ValueError: a value out of range or an unknown kernel.
    """
    if "kernel" in values and values["kernel"] not in KERNELS:
        raise ValueError(f"{prefix}kernel: {values['kernel']!r} is not one of {sorted(KERNELS)}")
    if "adaptive_ess" in values:
        v = values["adaptive_ess"]
        ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 < v < 1
        if not ok:
            raise ValueError(f"{prefix}adaptive_ess must be a number in (0, 1), got {v!r}")
    for key, check in (
        ("n_temperatures", nonnegative_int),
        ("n_kernel_steps", nonnegative_int),
        ("n_leapfrog", positive_int),
        ("step_size", positive_float),
    ):
        if key in values:
            check(values[key], f"{prefix}{key}")
    if "resample_threshold" in values:
        v = values["resample_threshold"]
        ok = isinstance(v, int | float) and not isinstance(v, bool) and 0 <= v <= 1
        if not ok:
            raise ValueError(f"{prefix}resample_threshold must be a number in [0, 1], got {v!r}")


def refine_latent(
    model: LatentSampler,
    system: System,
    n: int,
    *,
    steps: int | None = None,
    seed: int = 0,
    batch_size: int = 1024,
    **smc_options: Any,
) -> LatentSMCResult:
    """Refine a few-step sampler's samples by SMC in its latent space (module docstring).

    The first particles are the sampler's own N samples for ``seed`` (the prior draw of
    :meth:`~boltzflow.distill.base.Student.iter_samples`), so ``initial_ess_fraction`` is the
    plain student's ESS/N on the same draw. The final samples are decoded once more without
    gradients (network passes only): u(x) follows from the carried u_z, so no energy is
    evaluated beyond those SMC counts.

    Args:
        model: the sampler (e.g. a student); set to eval mode during the run.
        system: the physical target.
        n: number of particles N.
        steps: the sampler's number of steps K (None: its default).
        seed: seeds the prior draw, the kernel noise and the resampling.
        batch_size: rows per pass through the sampler (:class:`LatentTarget`).
        smc_options: keywords of :func:`~boltzflow.sampling.smc` (``adaptive_ess`` or
            ``betas``/``n_steps``, ``kernel``, ``n_kernel_steps``, ``step_size``, ``adapt``,
            ``resample_threshold``, ...); ``initial`` and ``wrap`` are set here.

    Returns:
        :class:`LatentSMCResult`.

    Raises:
        TypeError: ``model`` is no :class:`LatentSampler`, or ``initial``/``wrap`` were given.
    """
    for key in ("initial", "wrap"):
        if key in smc_options:
            raise TypeError(f"refine_latent sets {key!r} itself")
    target = LatentTarget(model, system, steps, batch_size=batch_size)
    like = _model_tensor(model)
    proposal = PriorProposal(model.prior, dtype=like.dtype, device=like.device)
    t_start = time.perf_counter()
    was_training = getattr(model, "training", None)
    if was_training is not None:
        model.eval()  # type: ignore[attr-defined]
    try:
        wrap = target.wrap if target.periodic is not None else None
        result = smc(target, proposal, n, wrap=wrap, seed=seed, **smc_options)
        z = result.samples.x
        with torch.no_grad():
            parts = [target.decode(chunk) for chunk in z.split(batch_size)]
        x, log_q, log_p = (torch.cat(column) for column in zip(*parts, strict=True))
    finally:
        if was_training:
            model.train()  # type: ignore[attr-defined]
    # u(x) = u_z(z) - log q(x) + log prior(z), from the values SMC carried
    u = result.samples.u - log_q + log_p
    u = torch.where(torch.isfinite(result.samples.u), u, float("inf"))
    log_w = result.samples.log_w
    samples = WeightedSamples(x.detach(), -u - log_w, u, log_w)
    result = replace(result, seconds=time.perf_counter() - t_start)
    return LatentSMCResult(samples=samples, z=z, smc=result, steps=steps)


def write_latent_samples(
    path: str | os.PathLike[str],
    result: LatentSMCResult,
    *,
    provenance: Mapping[str, Any],
) -> None:
    """Write the final particles of :func:`refine_latent` as a sample store
    (:class:`~boltzflow.io.samples.SampleWriter`, atomically: temporary file + rename).

    The store holds what a plain sampler's store holds, in the same convention: ``x`` the
    samples T(z), ``u`` their reduced energies, ``log_w`` the final SMC importance weights
    (log Z = LSE(log w) − log N) and ``log_q`` the effective −u − log w, so every estimator
    reads it as it reads a student's samples; plus ``columns/eve``, the initial particle each
    final one descends from (int64 cluster labels: resampled particles are correlated, so
    delta-method intervals should group by them, e.g. ``free_energy_difference(clusters=)``).

    Args:
        path: the ``.h5`` file (replaced if present).
        result: the refinement.
        provenance: JSON-able description (model, system, settings, seed, costs).
    """
    from boltzflow.io.atomic import atomic_path
    from boltzflow.io.samples import SampleWriter

    s = result.samples
    eves = torch.as_tensor(result.smc.eves, dtype=torch.int64)
    with atomic_path(path, suffix=".h5") as tmp:
        with SampleWriter(tmp, dim=s.x.shape[1], provenance=provenance) as writer:
            writer.append(s.x, log_q=s.log_q, u=s.u, log_w=s.log_w, eve=eves)


def _model_tensor(model: Any) -> Tensor:
    """A tensor with the model's dtype and device (its first floating parameter or buffer)."""
    param = getattr(model, "_param", None)
    if callable(param):
        return param()
    for name in ("parameters", "buffers"):
        for tensor in getattr(model, name, lambda: ())():
            if tensor.is_floating_point():
                return tensor
    return torch.zeros((), dtype=torch.get_default_dtype())
