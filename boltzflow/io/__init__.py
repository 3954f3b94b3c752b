"""Input/output helpers: atomic file writes, TOML files, checksummed checkpoints, sample stores.

The lowest layer: these modules know file formats, not the physics or the statistics (the
reports and trajectory exports of analyses live in :mod:`boltzflow.analysis`).
"""
