"""The teacher: a continuous normalizing flow trained by flow matching, with exact likelihoods.

``TeacherCNF`` wraps a velocity backbone v(t, x) and a prior. Sampling integrates prior samples
from t = 0 to 1 together with log q (:func:`boltzflow.flows.ode.integrate`); ``log_prob``
integrates given points back to t = 0. For mean-free particle systems both inputs and outputs are
mean-free and log q is the density on the (n - 1) d-dimensional subspace (see
:mod:`boltzflow.flows.priors` and :mod:`boltzflow.flows.ode`).

Internal coordinates (``representation = "internal"``, DESIGN.md "Molecules in internal
coordinates"): the flow lives on z = [bonds | angles | dihedrals] of a fitted
:class:`~boltzflow.systems.internal_coords.InternalCoordinates` transform (dim 3n - 6), on
R^k x T^m with the dihedrals periodic: a :class:`~boltzflow.flows.priors.TorusGaussian` prior
(normal x uniform angles) and a :class:`~boltzflow.nn.torus.TorusMLP` velocity that sees the
angles through (cos, sin), so it is 2π-periodic in them. The ODE runs on the flat chart and the
angles are wrapped into [-pi, pi) at the end; since the field is periodic, wrapping moves neither
the point on the torus nor its density, and the Euclidean divergence of the chart is the
divergence on the flat torus (Chen & Lipman 2023, arXiv:2302.03660). Inputs and outputs are
Cartesian x (nm, ``(B, 3n)``); for a sample x = x(z),

    log q(x) = log q(z) - log J(z) - sum log sigma = log q(z) - inverse_log_det,

the density per d^3n x / (d^3t dR) of :mod:`boltzflow.systems.internal_coords` (rigid motions
integrated out), so log w = -u(x) - log q(x) is correct; samples carry the column
``log_q_internal`` = log q(x) + log J(z), and a sample whose z is no molecule gets log q = +inf
(weight 0), as every internal-coordinate model
(:meth:`~boltzflow.systems.internal_coords.InternalCoordinates.cartesian_density`).
``log_prob`` maps any rigidly moved x to z first (z is invariant under translations and proper
rotations). The transform is computed in
float64 and stored in the checkpoint (``model_config["internal_coordinates"]``).

NF base (``base_flow``, internal coordinates only): the CNF may live on the latent e of a trained
coupling flow on z (the flow of an ``nf_internal`` model, frozen, its weights stored with the
teacher), so z = base_flow.decode(e) and log q(z) = log q_CNF(e) - log|det dz/de|. The CNF then
only corrects what the NF got wrong (its data, the NF latents of the training frames, are close to
the prior); the composite is still one exact-likelihood flow, and the rest of this docstring
holds with z replaced by e on the CNF's side.

Example:
    >>> from boltzflow.flows.cnf import TeacherCNF
    >>> teacher = TeacherCNF.build("egnn", dim=8, n_particles=4, spatial_dim=2, mean_free=True,
    ...                            backbone_options={"hidden": 16, "layers": 1})
    >>> x, log_q = teacher.sample(3, seed=0)
    >>> x.shape, log_q.shape
    (torch.Size([3, 8]), torch.Size([3]))
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from boltzflow.flows.coupling import CouplingFlow, check_fits_internal
from boltzflow.flows.flow_matching import wrap_columns
from boltzflow.flows.ode import (
    ADAPTIVE_METHODS,
    ODEResult,
    exact_divergence,
    integrate,
    jacobian_rows,
    over_fixed_chunks,
)
from boltzflow.flows.priors import (
    Prior,
    PriorFlowMixin,
    TorusGaussian,
    build_prior,
    check_points,
    finite_points,
    gaussian_prior,
)
from boltzflow.io.checkpoint import load_model_checkpoint, save_checkpoint
from boltzflow.models.protocol import (
    LOG_Q_KINDS,
    FlowOutput,
    SamplingMixin,
    check_batch_size,
    check_count,
    check_skip,
    check_steps,
    check_trained_for,
)
from boltzflow.nn import TorusMLP, build_backbone
from boltzflow.nn.compile import CompiledPaths
from boltzflow.progress import Progress
from boltzflow.systems.internal_coords import (
    LOG_Q_CONVENTION,
    LOG_Q_INTERNAL,
    InternalCoordinates,
)
from boltzflow.systems.particles import remove_mean

__all__ = ["DEFAULT_SAMPLING", "REPRESENTATIONS", "FlowOutput", "TeacherCNF", "refuse_base_flow"]

#: sampling settings used when neither the model's config nor the call gives one
DEFAULT_SAMPLING: dict[str, Any] = {
    "method": "dopri5",
    "atol": 1e-5,
    "rtol": 1e-5,
    "steps": None,
    "divergence": "exact",
    "trace_mode": "vjp",
    "quadrature_points": 12,
    "batch_size": 1000,
}

#: coordinate representations of the flow: Cartesian x, or internal coordinates z on R^k x T^m
REPRESENTATIONS = ("cartesian", "internal")

#: file names inside a teacher run folder, in the order :meth:`TeacherCNF.load` tries them
MODEL_FILE = "teacher.pt"
TRAINING_FILE = "checkpoint.pt"


class TeacherCNF(CompiledPaths, SamplingMixin, PriorFlowMixin, nn.Module):
    """Continuous normalizing flow x_1 = x_0 + int_0^1 v(t, x_t) dt with x_0 ~ prior.

    Args:
        net: velocity backbone ``net(t, x) -> (B, dim)``.
        prior: base density (mean-free Gaussian for particle systems).
        scale: the flow runs on ``x / scale`` (e.g. 0.1 to work in Angstrom on nm data, as the
            TBG/EFM ALDP models do), so log q(x) = log q_flow(x / scale) - event_dim log(scale).
        model_config: constructor description stored in checkpoints (see :meth:`build`).
        sampling: default ODE settings (keys of :data:`DEFAULT_SAMPLING`).
        system: name of the system the teacher was trained for (checked on load).
        transform: internal-coordinate transform (periodic dihedrals); the flow then lives on
            its z (``prior.dim = 3n - 6``) and ``dim`` is the Cartesian 3n (module docstring).
        base_flow: a trained coupling flow on the transform's z (the flow of an ``nf_internal``
            model), frozen: the CNF then lives on its latent e and z = base_flow.decode(e)
            (module docstring, "NF base").

    The model protocol (:mod:`boltzflow.models.protocol`): ``steps`` of ``sample``/``log_prob``
    are the steps of a fixed-step ODE method (None: the model's own ODE settings, which an
    adaptive solver needs), and further keywords override the ODE settings.
    """

    #: the teacher's ODE settings, not ``steps``, choose its discretisation
    uses_steps = False

    def __init__(
        self,
        net: nn.Module,
        prior: Prior,
        *,
        model_config: dict[str, Any] | None = None,
        sampling: dict[str, Any] | None = None,
        scale: float = 1.0,
        system: str | None = None,
        transform: InternalCoordinates | None = None,
        base_flow: CouplingFlow | None = None,
    ) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.net = net
        self.prior = prior
        self.dim = prior.dim
        if transform is not None:
            if transform.dim != prior.dim or scale != 1.0 or not transform.periodic:
                raise ValueError(
                    f"an internal-coordinate teacher needs a periodic transform with dim "
                    f"{prior.dim} and scale 1, got dim {transform.dim}, scale {scale}, "
                    f"periodic {transform.periodic}"
                )
            self.dim = 3 * transform.n_atoms
        # Kept out of the module tree: the transform is fixed by model_config (not trained, not
        # in the state_dict), and its float64 buffers must not follow .float() or the EMA.
        object.__setattr__(self, "transform", transform)
        self.base_flow = _frozen_base_flow(base_flow, transform)
        self.scale = float(scale)
        self.model_config = dict(model_config or {})
        self.system = system
        #: where the model was loaded from (set by :meth:`load`): checkpoint path, kind, run info
        self.source: dict[str, Any] = {}
        self.sampling = dict(DEFAULT_SAMPLING)
        self.sampling.update(self._check_sampling(sampling or {}))

    # -- construction ----------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        backbone: str,
        *,
        dim: int,
        n_particles: int | None = None,
        spatial_dim: int | None = None,
        mean_free: bool = False,
        backbone_options: dict[str, Any] | None = None,
        sampling: dict[str, Any] | None = None,
        scale: float = 1.0,
        transform: InternalCoordinates | None = None,
        base_flow: CouplingFlow | None = None,
    ) -> TeacherCNF:
        """Build backbone and prior from a plain description (what checkpoints store).

        Args:
            backbone: ``"egnn"``, ``"transformer"`` or ``"mlp"``.
            dim: flat coordinate dimension (Cartesian 3n also with ``transform``).
            n_particles, spatial_dim: particle structure (None for non-particle systems).
            mean_free: use the mean-free Gaussian prior (translation-invariant particles).
            backbone_options: keywords for :func:`boltzflow.nn.build_backbone`.
            sampling: default ODE settings.
            scale: coordinate unit of the flow (see the class docstring).
            transform: a periodic :class:`InternalCoordinates` (fitted to the training data):
                the flow then lives on its z with a :class:`TorusGaussian` prior and a
                :class:`TorusMLP` backbone (``backbone`` must be ``"mlp"``, ``scale`` 1).
            base_flow: with ``transform``: a trained coupling flow on its z whose latent the
                CNF lives on (class docstring); its weights are kept, frozen.

        Raises:
            ValueError: a transform with another backbone, a non-periodic transform, a
                dimension that is not 3n, or a scale other than 1.
        """
        options = dict(backbone_options or {})
        if transform is not None:
            return cls._build_internal(
                backbone,
                dim,
                options,
                transform,
                sampling=sampling,
                scale=scale,
                base_flow=base_flow,
            )
        if base_flow is not None:
            raise ValueError("a base flow needs internal coordinates (a transform)")
        net = build_backbone(
            backbone, dim=dim, n_particles=n_particles, spatial_dim=spatial_dim, **options
        )
        prior = gaussian_prior(
            dim, n_particles=n_particles, spatial_dim=spatial_dim, mean_free=mean_free
        )
        config = {
            "backbone": backbone,
            "dim": dim,
            "n_particles": n_particles,
            "spatial_dim": spatial_dim,
            "mean_free": mean_free,
            "backbone_options": options,
            "prior": prior.config(),
            "scale": float(scale),
        }
        return cls(net, prior, model_config=config, sampling=sampling, scale=scale)

    @classmethod
    def _build_internal(
        cls,
        backbone: str,
        dim: int,
        options: dict[str, Any],
        transform: InternalCoordinates,
        *,
        sampling: dict[str, Any] | None,
        scale: float,
        base_flow: CouplingFlow | None,
    ) -> TeacherCNF:
        """The internal-coordinate teacher of :meth:`build`."""
        if not isinstance(transform, InternalCoordinates):
            raise TypeError(f"transform must be InternalCoordinates, got {type(transform)}")
        if backbone != "mlp":
            raise ValueError(
                f"internal coordinates take backbone 'mlp' (a TorusMLP), not {backbone!r}"
            )
        if dim != 3 * transform.n_atoms:
            raise ValueError(f"dim {dim} != 3 x {transform.n_atoms} atoms of the transform")
        if not transform.periodic:
            raise ValueError("internal-coordinate flows need InternalCoordinates(periodic=True)")
        periodic = transform.periodic_mask().nonzero().flatten().tolist()
        net = TorusMLP(transform.dim, periodic, **options)
        prior = TorusGaussian(transform.dim, periodic)
        config = {
            "backbone": backbone,
            "dim": dim,
            "n_particles": transform.n_atoms,
            "spatial_dim": 3,
            "mean_free": False,
            "backbone_options": options,
            "prior": prior.config(),
            "scale": float(scale),
            "representation": "internal",
            "internal_coordinates": transform.to_dict(),
        }
        if base_flow is not None:
            config["base_flow"] = base_flow.config()
        return cls(
            net,
            prior,
            model_config=config,
            sampling=sampling,
            scale=scale,
            transform=transform,
            base_flow=base_flow,
        )

    @classmethod
    def from_config(
        cls, config: dict[str, Any], sampling: dict[str, Any] | None = None
    ) -> TeacherCNF:
        """Inverse of :attr:`model_config` (as stored in checkpoints)."""
        representation = config.get("representation", "cartesian")
        if representation not in REPRESENTATIONS:
            raise ValueError(f"unknown representation {representation!r}; valid: {REPRESENTATIONS}")
        transform = base_flow = None
        if representation == "internal":
            transform = InternalCoordinates.from_dict(config["internal_coordinates"])
        if "base_flow" in config:  # its weights come with the state_dict
            base_flow = CouplingFlow(**config["base_flow"])
        model = cls.build(
            config["backbone"],
            dim=config["dim"],
            n_particles=config.get("n_particles"),
            spatial_dim=config.get("spatial_dim"),
            mean_free=config.get("mean_free", False),
            backbone_options=config.get("backbone_options"),
            sampling=sampling,
            scale=config.get("scale", 1.0),
            transform=transform,
            base_flow=base_flow,
        )
        if "prior" in config and build_prior(config["prior"]).config() != model.prior.config():
            raise ValueError(f"prior {config['prior']} does not match the model description")
        return model

    @staticmethod
    def _check_sampling(options: dict[str, Any]) -> dict[str, Any]:
        unknown = set(options) - set(DEFAULT_SAMPLING)
        if unknown:
            raise TypeError(
                f"unknown sampling option(s) {sorted(unknown)}; valid: {sorted(DEFAULT_SAMPLING)}"
            )
        return dict(options)

    def forward(self, t: Tensor, x: Tensor) -> Tensor:
        """Velocity v(t, x) in flow units (``x / scale``, or z): ``(B, prior.dim)``."""
        return self.net(t, x)

    @property
    def representation(self) -> str:
        """``"cartesian"`` or ``"internal"`` (the flow lives on the transform's z)."""
        return "cartesian" if self.transform is None else "internal"

    @property
    def log_q_convention(self) -> str | None:
        """What log q is a density of, where it is not the plain density of x (sample files)."""
        return LOG_Q_CONVENTION if self.transform is not None else None

    @property
    def periodic(self) -> Tensor | None:
        """Boolean ``(prior.dim,)`` mask of the flow's periodic columns (None: Cartesian)."""
        return None if self.transform is None else self.transform.periodic_mask()

    def to_cartesian(self, z: Tensor) -> tuple[Tensor, Tensor]:
        """The CNF's coordinates ``(B, 3n - 6)`` (z, or the base flow's latent) -> Cartesian x
        ``(B, 3n)`` nm in the standard frame and ``log_det (B,)`` = log J(z) + sum log sigma
        (+ the base flow's log|det dz/de|), so log q(x) = log q_CNF - log_det; x in the input's
        dtype, ``log_det`` float64. Periodic columns are wrapped first.

        Raises:
            ValueError: a Cartesian teacher (no transform).
        """
        if self.transform is None:
            raise ValueError("to_cartesian needs an internal-coordinate teacher")
        dtype = z.dtype
        z, minus_ladj = self._from_flow(z, z.new_zeros(len(z)))
        x, log_det = self.transform.inverse(z.double())
        return x.to(dtype), log_det - minus_ladj.double()

    def to_internal(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian x ``(B, 3n)`` nm (any rigid placement) -> z ``(B, 3n - 6)`` float64 and
        ``log_det (B,)`` float64 = -log J(z) - sum log sigma (log q(x) = log q(z) + log_det).

        Raises:
            ValueError: a Cartesian teacher (no transform).
        """
        if self.transform is None:
            raise ValueError("to_internal needs an internal-coordinate teacher")
        return self.transform(x.double())

    def to_flow(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Cartesian x ``(B, 3n)`` -> the CNF's coordinates ``(B, 3n - 6)`` float64 (z, or the
        base flow's latent e of z) and ``log_det (B,)`` float64 with log q(x) = log q_CNF + log_det.

        Raises:
            ValueError: a Cartesian teacher (no transform).
        """
        z, log_det = self.to_internal(x)
        if self.base_flow is None:
            return z, log_det
        p = self._param()
        with torch.no_grad():
            e, ladj = self.base_flow.encode(z.to(p.dtype))
        return e.double(), log_det + ladj.double()

    def _from_flow(self, e: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
        """CNF coordinates ``(B, 3n - 6)`` (wrapped here) and their log density -> z and
        log q(z) (unchanged without a base flow)."""
        e = wrap_columns(e, self.periodic)
        if self.base_flow is None:
            return e, log_q
        with torch.no_grad():
            z, ladj = self.base_flow.decode(e)
        return wrap_columns(z, self.periodic), log_q - ladj

    # -- sampling and likelihood -------------------------------------------------------------
    def settings_with(
        self,
        overrides: dict[str, Any] | None = None,
        steps: int | None = None,
        batch_size: int | None = None,
    ) -> dict[str, Any]:
        """The model's ODE settings with ``overrides`` (None values ignored), ``steps`` and
        ``batch_size`` applied; an adaptive method without explicit ``steps`` gets none.

        Raises:
            TypeError: an unknown setting (the message lists the valid ones).
            ValueError: non-positive ``steps`` or ``batch_size``.
        """
        overrides = self._check_sampling(overrides or {})
        given = {k: v for k, v in overrides.items() if v is not None}
        if check_steps(steps) is not None:
            given["steps"] = steps
        if check_batch_size(batch_size) is not None:
            given["batch_size"] = batch_size
        settings = dict(self.sampling)
        settings.update(given)
        if settings["method"] in ADAPTIVE_METHODS and "steps" not in given:
            settings["steps"] = None  # the model default may be a fixed-step setting
        return settings

    def log_q_kind_for(self, settings: dict[str, Any] | None = None) -> str:
        """How log q is computed under the model's settings updated by ``settings``."""
        div = {**self.sampling, **(settings or {})}.get("divergence", "exact")
        key = {"exact": "ode_exact", "quadrature": "ode_quadrature"}.get(div, f"ode_{div}")
        return LOG_Q_KINDS.get(key, f"ODE, {div} trace")

    @property
    def log_q_kind(self) -> str:
        """How log q is computed under the model's own ODE settings."""
        return self.log_q_kind_for()

    def _solve(
        self,
        x: Tensor,
        t0: float,
        t1: float,
        settings: dict[str, Any],
        gen: torch.Generator,
        times: Tensor | None = None,
    ) -> ODEResult:
        was_training = self.training
        self.eval()
        try:
            return integrate(
                self._compiled("field", lambda: self.net) if self.compiled else self.net,
                x,
                t0=t0,
                t1=t1,
                method=settings["method"],
                atol=settings["atol"],
                rtol=settings["rtol"],
                steps=settings["steps"],
                divergence=settings["divergence"],
                trace_mode=settings["trace_mode"],
                quadrature_points=settings["quadrature_points"],
                generator=gen,
                times=times,
                trace=self._compiled_trace() if self.compiled else None,
            )
        finally:
            self.train(was_training)

    def _compiled_trace(self) -> Any:
        """The exact divergence of :meth:`set_compiled`: velocity and Jacobian trace by
        ``vmap``-stacked reverse-mode products through ``torch.compile``, in
        :func:`~boltzflow.flows.ode.jacobian_rows` chunks of one shape, whatever the model's
        ``trace_mode`` (docs/benchmarks.md, compiled exact log q, 2026-12-08). Used for the
        ``"exact"`` and ``"quadrature"`` divergences; the velocity of the position solves
        (``"quadrature"``, ``"none"``) is compiled apart (one graph per batch size)."""

        def build() -> Any:
            def chunk(t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
                return exact_divergence(self.net, t, x, mode="vjp", batch_rows=len(x))

            return chunk

        fn = self._compiled("trace", build)

        def trace(t: Tensor, x: Tensor) -> tuple[Tensor, Tensor]:
            v, div = over_fixed_chunks(lambda xc: fn(t, xc), jacobian_rows(x), x)
            return v, div

        return trace

    @staticmethod
    def _batch_size(settings: dict[str, Any]) -> int:
        batch_size = int(settings["batch_size"])
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        return batch_size

    def push_prior(
        self,
        n: int,
        *,
        steps: int | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        times: Tensor | None = None,
        progress: bool = False,
        desc: str = "push-forward",
        prior_scale: float = 1.0,
        skip: int = 0,
        **settings: Any,
    ) -> Iterator[tuple[Tensor, ODEResult]]:
        """Draw ``n`` prior points and integrate them from t = 0 to 1, batch by batch.

        All ``n`` points are drawn first from ``seed`` (batching does not change them); the
        Hutchinson probes, if that divergence is chosen, come from ``seed + 1``.

        Args:
            n: number of points.
            steps: steps of a fixed-step ODE method (None: the model's settings).
            seed: seeds the prior draw.
            batch_size: rows per solve (None: ``sampling["batch_size"]``).
            times: ``(T,)`` output times from 0 to 1 (best in the model's dtype); each result
                then carries ``path (T, b, dim)`` (:func:`~boltzflow.flows.ode.integrate`).
            progress, desc: show a progress bar with this label.
            prior_scale: multiply the prior draws by this factor (> 0): starting points
                from a widened prior, for supervision in its tails. The start points are then
                not prior samples, so the ends are not the model's samples; models with
                periodic columns refuse any factor but 1.
            skip: draw all ``n`` points but integrate only those from index ``skip`` on (to
                resume an interrupted run batch by batch: the same points as without it;
                Hutchinson probes then differ).
            **settings: override :attr:`sampling` (keys of :data:`DEFAULT_SAMPLING`).

        Yields:
            ``x0 (b, dim)``, the batch's prior points, and the :class:`ODEResult` of their
            solve, both in flow units (``res.x`` not re-projected onto the mean-free subspace).
        """
        check_count(n)
        skip = check_skip(skip, n)
        if not prior_scale > 0:
            raise ValueError(f"prior_scale must be > 0, got {prior_scale}")
        if prior_scale != 1.0 and self.periodic is not None:
            raise ValueError("prior_scale != 1 would move periodic columns off the circle")
        opts = self.settings_with(settings, steps, batch_size)
        batch_size = self._batch_size(opts)
        p = self._param()
        gen = torch.Generator().manual_seed(seed)
        x0 = self.prior.sample(n, generator=gen, dtype=p.dtype, device=p.device)
        if prior_scale != 1.0:
            x0 = x0 * prior_scale
        probe_gen = torch.Generator().manual_seed(seed + 1)  # Hutchinson probes
        with Progress(n, initial=skip, enabled=progress, desc=desc, unit="sample") as bar:
            for start in range(skip, n, batch_size):
                xb = x0[start : start + batch_size]
                res = self._solve(xb, 0.0, 1.0, opts, probe_gen, times=times)
                bar.update(len(xb))
                yield xb, res

    def iter_samples(
        self,
        n: int,
        *,
        steps: int | None = None,
        seed: int = 0,
        batch_size: int | None = None,
        progress: bool = False,
        skip: int = 0,
        **settings: Any,
    ) -> Iterator[FlowOutput]:
        """Yield ``n`` samples with exact (or estimated) log q batch by batch.

        All ``n`` prior points are drawn first from ``seed`` (:meth:`push_prior`), so the
        concatenated output is the same for any batch size up to solver tolerance (and
        identical for the same one).

        Args:
            n: number of samples.
            steps: steps of a fixed-step ODE method (None: the model's settings).
            seed: seeds the prior draw (and Hutchinson probes); same seed -> same output.
            batch_size: rows per ODE solve (None: ``sampling["batch_size"]``).
            progress: show a progress bar.
            skip: yield only rows ``skip`` on (:meth:`push_prior`; to resume a draw).
            **settings: override :attr:`sampling` (``method``, ``atol``, ``rtol``,
                ``divergence``, ``trace_mode``, ``quadrature_points``).

        Yields:
            :class:`FlowOutput` per batch with ``x (B, dim)`` and ``log_q (B,)`` (internal
            coordinates: also the column ``log_q_internal (B,)``, module docstring).
        """
        batches = self.push_prior(
            n,
            steps=steps,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            desc="sample",
            skip=skip,
            **settings,
        )
        for xb, res in batches:
            x1 = res.x
            if self.mean_free:  # remove the solver's round-off drift off the subspace
                x1 = remove_mean(x1, self.prior.n_particles, self.prior.spatial_dim)
            log_q = self.prior.log_prob(xb) + res.delta_logp - self._log_scale()
            columns = {}
            if self.transform is not None:  # z -> x (nm), log q(x) = log q(z) - log_det
                z, log_q = self._from_flow(x1, log_q)
                out = self.transform.cartesian_density(z, log_q)
                dtype = x1.dtype
                x1, log_q = out.x.to(dtype), out.log_q.to(dtype)
                columns = {LOG_Q_INTERNAL: out.log_q_internal.to(dtype)}
            yield FlowOutput(
                x1 * self.scale,
                log_q,
                res.nfe,
                float(res.nfe),
                res.trace_evals,
                res.seconds,
                res.cpu_seconds,
                columns,
            )

    def _check_points(self, x: Tensor) -> Tensor:
        if self.transform is None:
            return check_points(self.prior, x, self._param())
        return finite_points(x, self.dim, self._param())

    def _log_prob_batch(
        self, xb: Tensor, opts: dict[str, Any], probe_gen: torch.Generator
    ) -> tuple[ODEResult, Tensor]:
        """The backward solve of one batch of data points and their log q ``(b,)``."""
        if self.transform is None:
            res = self._solve(xb / self.scale, 1.0, 0.0, opts, probe_gen)
            # log q(x1) = log p0(x0) - [log p_0(x0) - log p_1(x1)] along the backward solve
            return res, self.prior.log_prob(res.x) - res.delta_logp - self._log_scale()
        z, log_det = self.to_flow(xb)
        res = self._solve(z.to(xb.dtype), 1.0, 0.0, opts, probe_gen)
        z0 = wrap_columns(res.x, self.periodic)  # back onto [-pi, pi)
        log_q_z = self.prior.log_prob(z0) - res.delta_logp
        return res, (log_q_z.double() + log_det).to(xb.dtype)

    def iter_log_prob(
        self,
        x: Tensor,
        *,
        steps: int | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        progress: bool = False,
        **settings: Any,
    ) -> Iterator[FlowOutput]:
        """Yield log q of ``x`` batch by batch; arguments as :meth:`log_prob_with_stats`."""
        x = self._check_points(x)
        opts = self.settings_with(settings, steps, batch_size)
        batch_size = self._batch_size(opts)
        probe_gen = torch.Generator().manual_seed(seed + 1)
        with Progress(len(x), enabled=progress, desc="log q", unit="sample") as bar:
            for start in range(0, len(x), batch_size):
                xb = x[start : start + batch_size]
                res, log_q = self._log_prob_batch(xb, opts, probe_gen)
                bar.update(len(xb))
                yield FlowOutput(
                    xb,
                    log_q,
                    res.nfe,
                    float(res.nfe),
                    res.trace_evals,
                    res.seconds,
                    res.cpu_seconds,
                )

    def log_prob_with_stats(
        self,
        x: Tensor,
        *,
        steps: int | None = None,
        batch_size: int | None = None,
        seed: int = 0,
        progress: bool = False,
        **settings: Any,
    ) -> FlowOutput:
        """Log density of given points by integrating them back to the prior (t = 1 -> 0).

        Args:
            x: ``(N, dim)`` points (mean-free for particle systems).
            steps, batch_size, **settings: as in :meth:`iter_samples`.
            seed: seeds the Hutchinson probes if that divergence is chosen.
            progress: show a progress bar.

        Returns:
            :class:`FlowOutput` whose ``x`` is the input and ``log_q`` its log density.

        Raises:
            ValueError: wrong shape, non-finite values, or points off the mean-free subspace.
        """
        batches = self.iter_log_prob(
            x, steps=steps, batch_size=batch_size, seed=seed, progress=progress, **settings
        )
        return FlowOutput.concat(list(batches))

    def log_prob(
        self,
        x: Tensor,
        *,
        steps: int | None = None,
        batch_size: int | None = None,
        **settings: Any,
    ) -> Tensor:
        """``(N,)`` log q of ``(N, dim)`` points; see :meth:`log_prob_with_stats`."""
        return self.log_prob_with_stats(x, steps=steps, batch_size=batch_size, **settings).log_q

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], *, extra: dict[str, Any] | None = None) -> Path:
        """Write the model (weights, description, sampling defaults) to one checkpoint file."""
        if not self.model_config:
            raise ValueError(
                "this TeacherCNF was not built from a description; use TeacherCNF.build"
            )
        payload = {
            "kind": "teacher_cnf",
            "system": self.system,
            "model_config": self.model_config,
            "sampling": self.sampling,
            "state_dict": self.state_dict(),
            "extra": dict(extra or {}),
        }
        return save_checkpoint(path, payload)

    @classmethod
    def load(
        cls,
        path: str | os.PathLike[str],
        *,
        system: Any = None,
        weights: str = "ema",
        map_location: str | torch.device | None = "cpu",
    ) -> TeacherCNF:
        """Load a teacher from a model file, a training checkpoint or a run folder.

        Args:
            path: a file written by :meth:`save`, a training checkpoint from
                :class:`boltzflow.train.trainer.Trainer`, or a run folder holding
                ``teacher.pt`` or ``checkpoint.pt``.
            system: the system (name or :class:`~boltzflow.systems.System`) it will be used
                with; if given it must match the one the teacher was trained for.
            weights: for training checkpoints, ``"ema"`` (default) or ``"raw"`` weights.
            map_location: device for the tensors.

        Raises:
            FileNotFoundError: nothing loadable at ``path``.
            ValueError: corrupt/truncated file, a checkpoint of another model, or a teacher
                trained for another system.
        """
        path, payload, state = load_model_checkpoint(
            path,
            kind="teacher_cnf",
            files=(MODEL_FILE, TRAINING_FILE),
            label="teacher",
            weights=weights,
            map_location=map_location,
        )
        sampling = payload.get("sampling")
        model = cls.from_config(payload["model_config"], sampling=sampling)
        run = payload.get("run_config") or payload.get("extra", {}).get("run") or {}
        model.system = payload.get("system") or run.get("system")
        check_trained_for(path, "teacher", model.system, system, model.dim)
        model.load_state_dict(state)
        model.source = {"checkpoint": str(path), "kind": payload["kind"], "run": run}
        return model.to(map_location) if map_location is not None else model


def _frozen_base_flow(
    flow: CouplingFlow | None, transform: InternalCoordinates | None
) -> CouplingFlow | None:
    """Check that ``flow`` fits ``transform`` (dim and periodic columns) and freeze it."""
    if flow is None:
        return None
    if transform is None:
        raise ValueError("a base flow needs internal coordinates (a transform)")
    check_fits_internal(flow, transform, "base flow")
    return flow.requires_grad_(False)


def refuse_base_flow(teacher: TeacherCNF, what: str) -> None:
    """Raise if ``teacher`` has an NF base: ``what`` (a student, a baseline) would live on the
    base flow's latent but decode it as internal coordinates.

    Raises:
        ValueError: the teacher has a base flow.
    """
    if getattr(teacher, "base_flow", None) is not None:
        raise ValueError(
            f"{what} cannot be built from a teacher with an NF base (model.base_nf): "
            "distilling such a teacher is not supported; use a teacher without base_nf"
        )
