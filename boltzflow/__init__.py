"""boltzflow: Boltzmann sampling with distilled flows."""

__version__ = "0.1.0"
