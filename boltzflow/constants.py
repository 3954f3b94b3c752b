"""Physical constants, defined once for every module."""

from __future__ import annotations

__all__ = ["MOLAR_GAS_CONSTANT", "kt_kj_per_mol"]

#: Molar gas constant R in kJ/(mol K) (CODATA 2018, exact by SI definition).
MOLAR_GAS_CONSTANT = 8.314462618e-3


def kt_kj_per_mol(temperature: float) -> float:
    """Thermal energy kT = R*T in kJ/mol for a temperature in kelvin (2.4943 kJ/mol at 300 K)."""
    if not temperature > 0:
        raise ValueError(f"temperature must be positive kelvin, got {temperature!r}")
    return MOLAR_GAS_CONSTANT * temperature
