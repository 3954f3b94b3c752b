"""The data types of a stage graph: :class:`Stage` (what to run), :class:`StageContext` (what a
running stage gets) and :class:`StageResult` (what happened to it).

They live apart from the engine (:mod:`boltzflow.workflow.runner`) so that the modules that
define stages (:mod:`~boltzflow.workflow.stages`, :mod:`~boltzflow.workflow.report`,
:mod:`~boltzflow.workflow.benchmark`) and the engine that runs them both import this module
and not each other.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["Stage", "StageContext", "StageResult"]


@dataclass
class StageContext:
    """What a running stage gets.

    Attributes:
        out_dir: the workflow's output folder.
        stage: the stage being run.
        key: its key.
        workdir: its work folder (None if it declared none).
        resumed: True if ``workdir`` holds partial work made with the same key.
        progress: whether to show progress bars.
        upstream: ``{dependency: summary}`` of the stages it depends on.
    """

    out_dir: Path
    stage: Stage
    key: str
    workdir: Path | None
    resumed: bool
    progress: bool
    upstream: dict[str, dict[str, Any]]
    extra_outputs: list[str] = field(default_factory=list)

    def path(self, rel: str | os.PathLike[str]) -> Path:
        """``out_dir / rel``."""
        return self.out_dir / rel

    def add_output(self, path: str | os.PathLike[str]) -> None:
        """Record one more output file (absolute or relative to ``out_dir``), e.g. a plot whose
        name is known only while running."""
        p = Path(path)
        rel = os.path.relpath(p, self.out_dir) if p.is_absolute() else str(p)
        if rel not in self.extra_outputs:
            self.extra_outputs.append(rel)


@dataclass
class Stage:
    """One step of a workflow.

    Attributes:
        name: unique name (also the manifest key).
        run: ``run(ctx) -> summary`` (a small JSON-able dict, or None); it must write every file
            in ``outputs`` (atomically: temporary file + rename).
        config: JSON-able configuration; any change re-runs the stage.
        deps: names of stages whose outputs it reads.
        inputs: external files it reads (their content is part of the key).
        outputs: files it writes, relative to the output folder.
        workdir: folder (relative) for resumable partial work, kept while the key is unchanged.
        description: one line for the log.
        distributed: under torchrun every rank runs this stage together (training with DDP,
            sampling into shards); otherwise rank 0 runs it alone while the others wait.
    """

    name: str
    run: Callable[[StageContext], Mapping[str, Any] | None]
    config: Any = None
    deps: tuple[str, ...] = ()
    inputs: tuple[Path, ...] = ()
    outputs: tuple[str, ...] = ()
    workdir: str | None = None
    description: str = ""
    distributed: bool = False


@dataclass(frozen=True)
class StageResult:
    """What happened to one stage: ``status`` is ``"ran"``, ``"cached"`` or ``"failed"``;
    ``seconds`` is its wall time, ``cpu_seconds`` the CPU time of this process (all threads;
    not counting worker processes such as OpenMM's)."""

    name: str
    status: str
    seconds: float
    reason: str
    summary: dict[str, Any]
    cpu_seconds: float = 0.0
