"""One set of checks for numeric options, shared by the CLI, the workflow files and the library.

Each check returns the value (converted where that is lossless) or raises :class:`ValueError`
with the same words everywhere: ``"<name> must be a positive integer, got 0"``. The CLI wraps the
same functions as argparse types (:func:`arg`), so ``--steps 0`` on the command line and
``steps = 0`` in a workflow file are rejected with one message.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = [
    "arg",
    "finite_float",
    "nonnegative_float",
    "nonnegative_int",
    "positive_float",
    "positive_int",
    "probability",
    "unit_interval",
]

T = TypeVar("T")


def _integer(value: Any, name: str, what: str, ok: Callable[[int], bool]) -> int:
    """``value`` if it is an int (not a bool) with ``ok(value)``, else the shared message."""
    if isinstance(value, bool) or not isinstance(value, int) or not ok(value):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return value


def _number(value: Any, name: str, what: str, ok: Callable[[float], bool]) -> float:
    """``value`` as a float if it is a finite int or float (not a bool) with ``ok``."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    out = float(value)
    if not math.isfinite(out) or not ok(out):
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return out


def positive_int(value: Any, name: str) -> int:
    """``value`` as an int >= 1."""
    return _integer(value, name, "a positive integer", lambda v: v >= 1)


def nonnegative_int(value: Any, name: str) -> int:
    """``value`` as an int >= 0."""
    return _integer(value, name, "an integer >= 0", lambda v: v >= 0)


def finite_float(value: Any, name: str) -> float:
    """``value`` as a finite float."""
    return _number(value, name, "a finite number", lambda v: True)


def positive_float(value: Any, name: str) -> float:
    """``value`` as a finite float > 0."""
    return _number(value, name, "a positive number", lambda v: v > 0)


def nonnegative_float(value: Any, name: str) -> float:
    """``value`` as a finite float >= 0."""
    return _number(value, name, "a number >= 0", lambda v: v >= 0)


def probability(value: Any, name: str) -> float:
    """``value`` as a float in (0, 1] (a fraction of samples, a confidence level's mass)."""
    return _number(value, name, "a number in (0, 1]", lambda v: 0 < v <= 1)


def unit_interval(value: Any, name: str) -> float:
    """``value`` as a float in [0, 1) (a decay rate, an ESS threshold)."""
    return _number(value, name, "a number in [0, 1)", lambda v: 0 <= v < 1)


def arg(check: Callable[[Any, str], T], name: str) -> Callable[[str], T]:
    """An argparse ``type=`` that parses the string and applies ``check`` under ``name``.

    Integer checks parse integers (``"2.5"`` is refused), the others parse floats; a refused value
    becomes an :class:`argparse.ArgumentTypeError` carrying the check's message.
    """
    integer = check in (positive_int, nonnegative_int)

    def parse(text: str) -> T:
        try:
            value: Any = int(text) if integer else float(text)
        except ValueError:
            kind = "an integer" if integer else "a number"
            raise argparse.ArgumentTypeError(f"{name} must be {kind}, got {text!r}") from None
        try:
            return check(value, name)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None

    parse.__name__ = check.__name__  # argparse names the type in its messages
    return parse
