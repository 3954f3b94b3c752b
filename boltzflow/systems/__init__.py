"""Physical systems with exact, batched, differentiable reduced energies."""

from boltzflow.systems.base import System, SystemInfo
from boltzflow.systems.registry import available, definition, load_system

__all__ = ["System", "SystemInfo", "available", "definition", "load_system"]
