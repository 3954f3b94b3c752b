"""The project's own error types.

Each is also a :class:`ValueError`, so callers that already catch ``ValueError`` keep working,
and the CLI turns any of them into one line and exit code 2.
"""

from __future__ import annotations

__all__ = ["BoltzflowError", "InvalidFileError", "OutputPathError", "PartialFileError"]


class BoltzflowError(ValueError):
    """Base of boltzflow's own errors: the message says what is wrong and where."""


class InvalidFileError(BoltzflowError):
    """A file that cannot be trusted: empty, truncated, damaged, or not of the expected format."""


class PartialFileError(InvalidFileError):
    """A file marked partial by an interrupted writer, refused where complete data are needed."""


class OutputPathError(BoltzflowError):
    """An output path that cannot be written: its folder is missing or read-only, it is a folder,
    or it exists and overwriting was not asked for."""
