"""Progress that also works without a terminal.

:class:`Progress` shows a tqdm bar when stderr is a terminal. Otherwise (CI, ``nohup``, a log
file) it writes one line to stderr at most every ``interval`` seconds and a final line when it
closes::

    student: step 1200/5000 (24%) loss 0.4312  38.1 step/s  ETA 1m40s
    student: step 5000/5000 (100%) loss 0.3977  38.4 step/s  done in 2m10s

An unknown total gives no percentage and no ETA. :func:`set_quiet` (the CLI's ``--quiet``) or
the environment variable ``BOLTZFLOW_QUIET=1`` silences both modes.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from types import TracebackType
from typing import Any, TextIO, TypeVar

__all__ = ["Progress", "format_duration", "is_quiet", "set_quiet", "track"]

#: environment variable that silences all progress output when set to a non-empty value but "0"
QUIET_ENV = "BOLTZFLOW_QUIET"
#: seconds between two progress lines when stderr is not a terminal
DEFAULT_INTERVAL = 30.0
#: the first line comes this soon (or after ``interval``, if shorter)
FIRST_LINE_AFTER = 5.0

_quiet = False
T = TypeVar("T")


def set_quiet(quiet: bool = True) -> bool:
    """Silence (or re-enable) all progress output of this process; returns the previous
    setting (``BOLTZFLOW_QUIET`` aside)."""
    global _quiet
    before, _quiet = _quiet, bool(quiet)
    return before


def is_quiet() -> bool:
    """True when :func:`set_quiet` was called or ``BOLTZFLOW_QUIET`` is set (not ``0``)."""
    return _quiet or os.environ.get(QUIET_ENV, "").strip() not in ("", "0")


def format_duration(seconds: float) -> str:
    """``42s``, ``1m40s``, ``2h05m``."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _fmt_rate(rate: float) -> str:
    return f"{rate:.0f}" if rate >= 100 else f"{rate:.1f}" if rate >= 1 else f"{rate:.3g}"


class Progress:
    """A progress bar on a terminal, periodic one-line reports elsewhere.

    Use as a context manager (or call :meth:`close`)::

        with Progress(total=steps, desc="train", unit="step") as bar:
            for step in range(steps):
                ...
                bar.update(1, loss=loss)

    Args:
        total: expected count (None: unknown; no percentage or ETA).
        desc: label at the start of the bar or line.
        unit: what is counted (``step``, ``sample``, ...).
        initial: count already done (e.g. a resumed run); the rate counts only new work.
        enabled: False shows nothing (the ``progress=`` flag of library functions).
        interval: seconds between two lines when stderr is not a terminal.
        stream: where to write (default: ``sys.stderr`` at construction).
        clock: monotonic time source in seconds (tests pass a fake one).
    """

    def __init__(
        self,
        total: int | None = None,
        *,
        desc: str = "",
        unit: str = "it",
        initial: int = 0,
        enabled: bool = True,
        interval: float = DEFAULT_INTERVAL,
        stream: TextIO | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.total = total
        self.desc = desc
        self.unit = unit
        self.n = self.initial = int(initial)
        self.interval = float(interval)
        self.postfix: dict[str, Any] = {}
        self._stream = stream if stream is not None else sys.stderr
        self._clock = clock
        self._start = self._last = clock()
        self._next = self._start + min(self.interval, FIRST_LINE_AFTER)
        self._closed = False
        self._bar: Any = None
        self.enabled = bool(enabled) and not is_quiet()
        self.lines = self.enabled and not _isatty(self._stream)
        if self.enabled and not self.lines:
            from tqdm.auto import tqdm

            self._bar = tqdm(
                total=total,
                initial=self.initial,
                desc=desc,
                unit=unit,
                file=self._stream,
                dynamic_ncols=True,
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # a generator closed early (GeneratorExit) has not failed
        self.close(failed=exc_type is not None and not issubclass(exc_type, GeneratorExit))

    def set_postfix(self, **postfix: Any) -> None:
        """Show these values (e.g. ``loss=0.43``) after the count from now on."""
        self.postfix.update(postfix)
        if self._bar is not None:
            self._bar.set_postfix({k: _fmt(v) for k, v in self.postfix.items()}, refresh=False)

    def update(self, n: int = 1, **postfix: Any) -> None:
        """Count ``n`` more units done; ``postfix`` as in :meth:`set_postfix`."""
        if postfix:
            self.set_postfix(**postfix)
        self.n += n
        if self._bar is not None:
            self._bar.update(n)
        elif self.lines:
            now = self._clock()
            if now >= self._next:
                self._write(self.line(now))
                self._next = now + self.interval

    def line(self, now: float | None = None, *, end: str | None = None) -> str:
        """The one-line report at time ``now`` (default: the clock's current time); ``end``
        (e.g. ``"done in"``) replaces the ETA by that word and the elapsed time."""
        now = self._clock() if now is None else now
        elapsed = max(now - self._start, 0.0)
        parts = [f"{self.desc}: " if self.desc else "", f"{self.unit} {self.n}"]
        if self.total:
            parts.append(f"/{self.total} ({100 * self.n / self.total:.0f}%)")
        parts += [f" {k} {_fmt(v)}" for k, v in self.postfix.items()]
        done = self.n - self.initial
        rate = done / elapsed if elapsed > 0 else math.nan
        if math.isfinite(rate):
            parts.append(f"  {_fmt_rate(rate)} {self.unit}/s")
        if end:
            parts.append(f"  {end} {format_duration(elapsed)}")
        elif self.total and rate > 0 and math.isfinite(rate):
            parts.append(f"  ETA {format_duration(max(self.total - self.n, 0) / rate)}")
        return "".join(parts)

    def close(self, *, failed: bool = False) -> None:
        """End the bar, or write the final line (with the total time)."""
        if self._closed:
            return
        self._closed = True
        if self._bar is not None:
            self._bar.close()
        elif self.lines:
            self._write(self.line(end="stopped after" if failed else "done in"))

    def _write(self, text: str) -> None:
        try:
            print(text, file=self._stream, flush=True)
        except (OSError, ValueError):  # a closed or broken stream must not stop the work
            pass


def track(
    iterable: Iterable[T],
    *,
    total: int | None = None,
    desc: str = "",
    unit: str = "it",
    enabled: bool = True,
    interval: float = DEFAULT_INTERVAL,
) -> Iterator[T]:
    """Iterate over ``iterable`` with a :class:`Progress` counting its items."""
    if total is None and hasattr(iterable, "__len__"):
        total = len(iterable)  # type: ignore[arg-type]
    with Progress(total, desc=desc, unit=unit, enabled=enabled, interval=interval) as bar:
        for item in iterable:
            yield item
            bar.update(1)


def _isatty(stream: Any) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False
