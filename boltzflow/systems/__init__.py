"""Physical systems with exact, batched, differentiable reduced energies."""

from boltzflow.systems.base import System, SystemInfo, compute_energies
from boltzflow.systems.registry import available, definition, load_system, system_info

__all__ = [
    "System",
    "SystemInfo",
    "available",
    "compute_energies",
    "definition",
    "load_system",
    "system_info",
]
