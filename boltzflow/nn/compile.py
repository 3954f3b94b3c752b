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

__all__ = ["CPU_OPTIONS", "cpp_compiler"]

#: ``torch.compile(..., options=CPU_OPTIONS)`` for graphs that run on the CPU.
CPU_OPTIONS: dict[str, object] = {"cpp.vec_isa_ok": True}


def cpp_compiler() -> str | None:
    """The C++ compiler torch.compile's CPU backend would call, if there is one."""
    return shutil.which(os.environ.get("CXX", "g++")) or shutil.which("clang++")
