"""Input/output helpers: atomic file writes, checksummed checkpoints, sample stores, trajectory
export."""
