"""What ``torch.compile`` needs on the CPU, shared by the trainer and the torch force field.

Inductor's CPU backend writes C++ and calls a compiler (g++, clang++ or ``$CXX``). Before it
emits SIMD code it also confirms the CPU's instruction set by loading a test library in a child
process; with torch 2.13 on the 2-core machines here that child crashed at random (exit -11),
and inductor then fell back to scalar code without a word, about 4x slower (docs/benchmarks.md,
torch force field, 2026-12-08). :data:`CPU_OPTIONS` takes the set the CPU reports instead.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from typing import Any

import torch

__all__ = ["CPU_OPTIONS", "CompiledPaths", "cpp_compiler"]

#: ``torch.compile(..., options=CPU_OPTIONS)`` for graphs that run on the CPU.
CPU_OPTIONS: dict[str, object] = {"cpp.vec_isa_ok": True}


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would call, if there is one."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++")


class CompiledPaths:
    """Mixin for a module with optional compiled evaluation paths (sampling without gradients).

    :meth:`set_compiled` switches them on; each path is compiled once per process at its first
    use (:meth:`_compiled`, one fixed shape: ``dynamic=False``) and kept until the module is
    moved or cast (``_apply``) or copied (pickling, ``copy.deepcopy``), after which the copy
    compiles its own graph.
    """

    compiled: bool = False

    def set_compiled(self, enabled: bool = True) -> None:
        """Turn the compiled paths on or off (and drop any compiled graph).

        Raises:
            ValueError: ``enabled`` on a CPU module without a C++ compiler (inductor needs one).
        """
        if enabled and self._compile_device().type == "cpu" and cpp_compiler() is None:
            raise ValueError("compiled sampling on CPU needs a C++ compiler on PATH (g++, or $CXX)")
        self.compiled = bool(enabled)
        self._compiled_fns: dict[str, Callable[..., Any]] = {}

    def _compile_device(self) -> torch.device:
        param = next(iter(self.parameters()), None)  # type: ignore[attr-defined]
        return param.device if param is not None else torch.device("cpu")

    def _compiled(self, key: str, build: Callable[[], Callable[..., Any]]) -> Callable[..., Any]:
        """The compiled function ``key`` (``torch.compile(build())``), made at its first use."""
        fns = self.__dict__.setdefault("_compiled_fns", {})
        if key not in fns:
            cpu = self._compile_device().type == "cpu"
            fns[key] = torch.compile(build(), options=CPU_OPTIONS if cpu else None, dynamic=False)
        return fns[key]

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        self.__dict__["_compiled_fns"] = {}  # a move or cast compiles its own graph
        return super()._apply(fn, *args, **kwargs)  # type: ignore[misc]

    def __getstate__(self) -> dict[str, Any]:
        # copies compile their own graph
        return {**dict(super().__getstate__()), "_compiled_fns": {}}  # type: ignore[misc]
