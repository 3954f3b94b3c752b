"""Input/output helpers: atomic file writes, sample stores, trajectory export."""
