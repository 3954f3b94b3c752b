"""Validation of the ``[parameters]`` table of a system definition."""

from __future__ import annotations

import math
from typing import Any

__all__ = ["check_parameters", "number"]


def check_parameters(name: str, params: dict[str, Any], expected: tuple[str, ...]) -> None:
    """Raise ValueError unless ``params`` has exactly the keys ``expected``."""
    missing = [k for k in expected if k not in params]
    unknown = sorted(set(params) - set(expected))
    if missing or unknown:
        raise ValueError(
            f"system {name!r}: parameters must be exactly {list(expected)}; "
            f"missing {missing}, unknown {unknown}"
        )


def number(name: str, key: str, value: Any) -> float:
    """A finite float from a parameter value; TypeError for non-numbers, ValueError for inf/NaN."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"system {name!r}: parameter {key!r} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"system {name!r}: parameter {key!r} must be finite, got {value!r}")
    return float(value)
