"""The teacher: a continuous normalizing flow trained by flow matching, with exact likelihoods.

``TeacherCNF`` wraps a velocity backbone v(t, x) and a prior. Sampling integrates prior samples
from t = 0 to 1 together with log q (:func:`boltzflow.flows.ode.integrate`); ``log_prob``
integrates given points back to t = 0. For mean-free particle systems both inputs and outputs are
mean-free and log q is the density on the (n - 1) d-dimensional subspace (see
:mod:`boltzflow.flows.priors` and :mod:`boltzflow.flows.ode`).

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from boltzflow.flows.ode import ODEResult, integrate
from boltzflow.flows.priors import (
    Prior,
    PriorFlowMixin,
    build_prior,
    check_points,
    gaussian_prior,
)
from boltzflow.nn import build_backbone
from boltzflow.systems.particles import remove_mean
from boltzflow.train.checkpoint import load_model_checkpoint, save_checkpoint

__all__ = ["DEFAULT_SAMPLING", "FlowOutput", "TeacherCNF"]

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

#: file names inside a teacher run folder, in the order :meth:`TeacherCNF.load` tries them
MODEL_FILE = "teacher.pt"
TRAINING_FILE = "checkpoint.pt"


@dataclass
class FlowOutput:
    """Samples (or evaluated points) with log densities and cost.

    Attributes:
        x: ``(N, dim)`` positions (data side).
        log_q: ``(N,)`` model log density at ``x``.
        nfe: total solver evaluations summed over batches (each batched).
        nfe_per_batch: mean solver evaluations per batch.
        trace_evals: total batched Jacobian-trace evaluations.
        seconds: wall time of the ODE solves.
        cpu_seconds: CPU time of the ODE solves (see :class:`~boltzflow.flows.ode.ODEResult`).
    """

    x: Tensor
    log_q: Tensor
    nfe: int
    nfe_per_batch: float
    trace_evals: int
    seconds: float
    cpu_seconds: float = float("nan")

    @property
    def seconds_per_1000(self) -> float:
        """Wall time per 1,000 samples."""
        return 1000.0 * self.seconds / max(len(self.x), 1)

    @property
    def cpu_seconds_per_1000(self) -> float:
        """CPU time per 1,000 samples."""
        return 1000.0 * self.cpu_seconds / max(len(self.x), 1)

    @staticmethod
    def concat(parts: list[FlowOutput]) -> FlowOutput:
        """Join per-batch outputs (costs add up; ``nfe_per_batch`` is the mean)."""
        if not parts:
            raise ValueError("no batches to concatenate")
        return FlowOutput(
            torch.cat([p.x for p in parts]),
            torch.cat([p.log_q for p in parts]),
            sum(p.nfe for p in parts),
            sum(p.nfe for p in parts) / len(parts),
            sum(p.trace_evals for p in parts),
            sum(p.seconds for p in parts),
            sum(p.cpu_seconds for p in parts),
        )


class TeacherCNF(PriorFlowMixin, nn.Module):
    """Continuous normalizing flow x_1 = x_0 + int_0^1 v(t, x_t) dt with x_0 ~ prior.

    Args:
        net: velocity backbone ``net(t, x) -> (B, dim)``.
        prior: base density (mean-free Gaussian for particle systems).
        scale: the flow runs on ``x / scale`` (e.g. 0.1 to work in Angstrom on nm data, as the
            TBG/EFM ALDP models do), so log q(x) = log q_flow(x / scale) - event_dim log(scale).
        model_config: constructor description stored in checkpoints (see :meth:`build`).
        sampling: default ODE settings (keys of :data:`DEFAULT_SAMPLING`).
    """

    def __init__(
        self,
        net: nn.Module,
        prior: Prior,
        *,
        model_config: dict[str, Any] | None = None,
        sampling: dict[str, Any] | None = None,
        scale: float = 1.0,
    ) -> None:
        super().__init__()
        if not scale > 0:
            raise ValueError(f"scale must be positive, got {scale}")
        self.net = net
        self.prior = prior
        self.dim = prior.dim
        self.scale = float(scale)
        self.model_config = dict(model_config or {})
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
    ) -> TeacherCNF:
        """Build backbone and prior from a plain description (what checkpoints store).

        Args:
            backbone: ``"egnn"``, ``"transformer"`` or ``"mlp"``.
            dim: flat coordinate dimension.
            n_particles, spatial_dim: particle structure (None for non-particle systems).
            mean_free: use the mean-free Gaussian prior (translation-invariant particles).
            backbone_options: keywords for :func:`boltzflow.nn.build_backbone`.
            sampling: default ODE settings.
            scale: coordinate unit of the flow (see the class docstring).
        """
        options = dict(backbone_options or {})
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
    def from_config(
        cls, config: dict[str, Any], sampling: dict[str, Any] | None = None
    ) -> TeacherCNF:
        """Inverse of :attr:`model_config` (as stored in checkpoints)."""
        model = cls.build(
            config["backbone"],
            dim=config["dim"],
            n_particles=config.get("n_particles"),
            spatial_dim=config.get("spatial_dim"),
            mean_free=config.get("mean_free", False),
            backbone_options=config.get("backbone_options"),
            sampling=sampling,
            scale=config.get("scale", 1.0),
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
        """Velocity v(t, x) in flow units (``x / scale``): ``(B, dim)``."""
        return self.net(t, x)

    # -- sampling and likelihood -------------------------------------------------------------
    def _settings(self, overrides: dict[str, Any]) -> dict[str, Any]:
        settings = dict(self.sampling)
        settings.update(self._check_sampling({k: v for k, v in overrides.items() if v is not None}))
        if "steps" in overrides:  # explicit None must be able to clear steps
            settings["steps"] = overrides["steps"]
        return settings

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
                self.net,
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
            )
        finally:
            self.train(was_training)

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
        seed: int = 0,
        times: Tensor | None = None,
        progress: bool = False,
        desc: str = "push-forward",
        **settings: Any,
    ) -> Iterator[tuple[Tensor, ODEResult]]:
        """Draw ``n`` prior points and integrate them from t = 0 to 1, batch by batch.

        All ``n`` points are drawn first from ``seed`` (batching does not change them); the
        Hutchinson probes, if that divergence is chosen, come from ``seed + 1``.

        Args:
            n: number of points.
            seed: seeds the prior draw.
            times: ``(T,)`` output times from 0 to 1 (best in the model's dtype); each result
                then carries ``path (T, b, dim)`` (:func:`~boltzflow.flows.ode.integrate`).
            progress, desc: show a progress bar with this label.
            **settings: override :attr:`sampling` (keys of :data:`DEFAULT_SAMPLING`;
                ``batch_size`` rows per solve).

        Yields:
            ``x0 (b, dim)``, the batch's prior points, and the :class:`ODEResult` of their
            solve, both in flow units (``res.x`` not re-projected onto the mean-free subspace).
        """
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        opts = self._settings(settings)
        batch_size = self._batch_size(opts)
        p = self._param()
        gen = torch.Generator().manual_seed(seed)
        x0 = self.prior.sample(n, generator=gen, dtype=p.dtype, device=p.device)
        probe_gen = torch.Generator().manual_seed(seed + 1)  # Hutchinson probes
        bar = tqdm(total=n, disable=None if progress else True, desc=desc, unit="x")
        for start in range(0, n, batch_size):
            xb = x0[start : start + batch_size]
            res = self._solve(xb, 0.0, 1.0, opts, probe_gen, times=times)
            bar.update(len(xb))
            yield xb, res
        bar.close()

    def iter_samples(
        self, n: int, *, seed: int = 0, progress: bool = False, **settings: Any
    ) -> Iterator[FlowOutput]:
        """Yield ``n`` samples batch by batch (``settings["batch_size"]`` rows each).

        All ``n`` prior points are drawn first from ``seed`` (:meth:`push_prior`), so the
        concatenated output equals :meth:`sample_with_stats` with the same arguments. Arguments
        as there.
        """
        for xb, res in self.push_prior(n, seed=seed, progress=progress, desc="sample", **settings):
            x1 = res.x
            if self.mean_free:  # remove the solver's round-off drift off the subspace
                x1 = remove_mean(x1, self.prior.n_particles, self.prior.spatial_dim)
            log_q = self.prior.log_prob(xb) + res.delta_logp - self._log_scale()
            yield FlowOutput(
                x1 * self.scale,
                log_q,
                res.nfe,
                float(res.nfe),
                res.trace_evals,
                res.seconds,
                res.cpu_seconds,
            )

    def sample_with_stats(
        self, n: int, *, seed: int = 0, progress: bool = False, **settings: Any
    ) -> FlowOutput:
        """Draw ``n`` samples with exact (or estimated) log q and report the cost.

        Args:
            n: number of samples.
            seed: seeds the prior draw (and Hutchinson probes); same seed -> same output.
            progress: show a progress bar.
            **settings: override :attr:`sampling` (``method``, ``atol``, ``rtol``, ``steps``,
                ``divergence``, ``trace_mode``, ``quadrature_points``, ``batch_size``).

        Returns:
            :class:`FlowOutput` with ``x (n, dim)`` and ``log_q (n,)`` in the model's dtype.
        """
        return FlowOutput.concat(
            list(self.iter_samples(n, seed=seed, progress=progress, **settings))
        )

    def sample(self, n: int, *, seed: int = 0, **settings: Any) -> tuple[Tensor, Tensor]:
        """``(x (n, dim), log_q (n,))``; see :meth:`sample_with_stats`."""
        out = self.sample_with_stats(n, seed=seed, **settings)
        return out.x, out.log_q

    def _check_points(self, x: Tensor) -> Tensor:
        return check_points(self.prior, x, self._param())

    def iter_log_prob(
        self, x: Tensor, *, seed: int = 0, progress: bool = False, **settings: Any
    ) -> Iterator[FlowOutput]:
        """Yield log q of ``x`` batch by batch; arguments as :meth:`log_prob_with_stats`."""
        x = self._check_points(x)
        opts = self._settings(settings)
        batch_size = self._batch_size(opts)
        probe_gen = torch.Generator().manual_seed(seed + 1)
        bar = tqdm(total=len(x), disable=None if progress else True, desc="log q", unit="x")
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size]
            res = self._solve(xb / self.scale, 1.0, 0.0, opts, probe_gen)
            # log q(x1) = log p0(x0) - [log p_0(x0) - log p_1(x1)] along the backward solve
            log_q = self.prior.log_prob(res.x) - res.delta_logp - self._log_scale()
            bar.update(len(xb))
            yield FlowOutput(
                xb, log_q, res.nfe, float(res.nfe), res.trace_evals, res.seconds, res.cpu_seconds
            )
        bar.close()

    def log_prob_with_stats(
        self, x: Tensor, *, seed: int = 0, progress: bool = False, **settings: Any
    ) -> FlowOutput:
        """Log density of given points by integrating them back to the prior (t = 1 -> 0).

        Args:
            x: ``(N, dim)`` points (mean-free for particle systems).
            seed: seeds the Hutchinson probes if that divergence is chosen.
            progress: show a progress bar.
            **settings: as in :meth:`sample_with_stats`.

        Returns:
            :class:`FlowOutput` whose ``x`` is the input and ``log_q`` its log density.

        Raises:
            ValueError: wrong shape, or points off the mean-free subspace.
        """
        return FlowOutput.concat(
            list(self.iter_log_prob(x, seed=seed, progress=progress, **settings))
        )

    def log_prob(self, x: Tensor, **settings: Any) -> Tensor:
        """``(N,)`` log q of ``(N, dim)`` points; see :meth:`log_prob_with_stats`."""
        return self.log_prob_with_stats(x, **settings).log_q

    # -- persistence -------------------------------------------------------------------------
    def save(self, path: str | os.PathLike[str], *, extra: dict[str, Any] | None = None) -> Path:
        """Write the model (weights, description, sampling defaults) to one checkpoint file."""
        if not self.model_config:
            raise ValueError(
                "this TeacherCNF was not built from a description; use TeacherCNF.build"
            )
        payload = {
            "kind": "teacher_cnf",
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
        weights: str = "ema",
        map_location: str | torch.device | None = "cpu",
    ) -> TeacherCNF:
        """Load a teacher from a model file, a training checkpoint or a run folder.

        Args:
            path: a file written by :meth:`save`, a training checkpoint from
                :class:`boltzflow.train.trainer.Trainer`, or a run folder holding
                ``teacher.pt`` or ``checkpoint.pt``.
            weights: for training checkpoints, ``"ema"`` (default) or ``"raw"`` weights.
            map_location: device for the tensors.

        Raises:
            FileNotFoundError: nothing loadable at ``path``.
            ValueError: corrupt/truncated file or a checkpoint of another model.
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
        model.load_state_dict(state)
        run = payload.get("run_config") or payload.get("extra", {}).get("run") or {}
        model.source = {"checkpoint": str(path), "kind": payload["kind"], "run": run}
        return model.to(map_location) if map_location is not None else model
