"""Small result records of the importance-sampling layer.

:class:`WeightedSamples` bundles samples with their proposal log-density, reduced target energy and
log weight (one row each, ``log_w = -u - log_q``); :class:`Estimate` is a point estimate with a
confidence interval, its standard error, the sample count and the Kish ESS behind it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

import numpy as np
import torch
from torch import Tensor

from boltzflow.sampling.weights import ess_fraction, kish_ess, log_weights

__all__ = ["Estimate", "WeightedSamples"]


def _as_tensor(value: Any, name: str, dtype: torch.dtype | None = None) -> Tensor:
    if isinstance(value, np.ndarray) or not isinstance(value, Tensor):
        value = torch.as_tensor(np.asarray(value))
    if dtype is not None:
        value = value.to(dtype)
    if not value.is_floating_point():
        raise TypeError(f"{name} must hold floating-point numbers, got {value.dtype}")
    return value


@dataclass(frozen=True)
class WeightedSamples:
    """Samples with their importance weights.

    Attributes:
        x: ``(N, dim)`` coordinates (nm for molecules).
        log_q: ``(N,)`` proposal log-density at ``x`` (for mean-free systems, w.r.t. the mean-free
            subspace). After resampling or SMC this is the *effective* value ``-u - log_w``.
        u: ``(N,)`` reduced target energy u(x) in kT (``+inf`` where undefined).
        log_w: ``(N,)`` unnormalised log weights ``-u - log_q``.

    Raises:
        ValueError: if the arrays disagree in length or are not of the shapes above.
    """

    x: Tensor
    log_q: Tensor
    u: Tensor
    log_w: Tensor

    def __post_init__(self) -> None:
        x = _as_tensor(self.x, "x")
        if x.ndim != 2:
            raise ValueError(f"x must be (N, dim), got shape {tuple(x.shape)}")
        n = x.shape[0]
        object.__setattr__(self, "x", x)
        for name in ("log_q", "u", "log_w"):
            value = _as_tensor(getattr(self, name), name, torch.float64)
            if value.shape != (n,):
                raise ValueError(
                    f"{name} must have shape ({n},) to match x of shape {tuple(x.shape)}, "
                    f"got {tuple(value.shape)}"
                )
            object.__setattr__(self, name, value)

    @classmethod
    def from_energies(cls, x: Tensor, log_q: Tensor, u: Tensor) -> WeightedSamples:
        """Form ``log_w = -u - log_q`` (NaN or +inf energies give weight zero)."""
        u = _as_tensor(u, "u", torch.float64)
        log_q = _as_tensor(log_q, "log_q", torch.float64)
        return cls(x=x, log_q=log_q, u=u, log_w=log_weights(u, log_q))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: slice | Tensor | np.ndarray) -> WeightedSamples:
        """Rows selected by a slice, index array or boolean mask."""
        if isinstance(index, np.ndarray):
            index = torch.as_tensor(index)
        return WeightedSamples(self.x[index], self.log_q[index], self.u[index], self.log_w[index])

    @property
    def n(self) -> int:
        """Number of samples N."""
        return len(self)

    @property
    def ess(self) -> float:
        """Kish effective sample size of ``log_w``."""
        return kish_ess(self.log_w)

    @property
    def ess_fraction(self) -> float:
        """Kish ESS / N (report N beside it)."""
        return ess_fraction(self.log_w)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with a two-sided confidence interval.

    Attributes:
        value: the estimate (units of the quantity: kT for free energies, nats for log Z).
        ci_low: lower end of the ``level`` confidence interval.
        ci_high: upper end.
        stderr: standard error (delta method, or the bootstrap standard deviation).
        n: number of samples N behind the estimate.
        ess: Kish effective sample size of the weights used.
        method: how the interval was formed, e.g. ``"delta"`` or ``"bootstrap(B=1000)"``.
        level: confidence level of the interval (0.95 for 95%).
    """

    value: float
    ci_low: float
    ci_high: float
    stderr: float
    n: int
    ess: float
    method: str
    level: float = 0.95

    def contains(self, value: float) -> bool:
        """True if ``value`` lies within ``[ci_low, ci_high]``."""
        return bool(self.ci_low <= value <= self.ci_high)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (non-finite floats become None)."""
        out = asdict(self)
        for key, val in out.items():
            if isinstance(val, float) and not math.isfinite(val):
                out[key] = None
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Estimate:
        """The inverse of :meth:`to_dict` (None becomes NaN; unknown keys are ignored).

        Raises:
            ValueError: a required field is missing.
        """
        names = [f.name for f in fields(cls)]
        missing = [k for k in names if k not in data and k != "level"]
        if missing:
            raise ValueError(f"an estimate needs {missing}; got keys {sorted(data)}")
        values = {k: data[k] for k in names if k in data}
        for key in ("value", "ci_low", "ci_high", "stderr", "ess", "level"):
            if key in values:
                values[key] = math.nan if values[key] is None else float(values[key])
        values["n"] = int(values["n"])
        values["method"] = str(values["method"])
        return cls(**values)

    def __str__(self) -> str:
        pct = f"{100 * self.level:g}%"
        return (
            f"{self.value:.6g} [{pct} CI {self.ci_low:.6g}, {self.ci_high:.6g}; "
            f"se {self.stderr:.3g}; N={self.n}, ESS={self.ess:.1f}; {self.method}]"
        )
