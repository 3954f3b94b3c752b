"""Output paths checked before any work, and removed again when the work fails.

Every command that writes a file or a folder calls :func:`check_output_file` or
:func:`check_output_dir` right after parsing, so a read-only folder, a path that is a folder
(or a file), or a path under a file is refused in one line before hours of computation; and
wraps its work in :func:`remove_on_failure`, so a failed command leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from boltzflow.errors import OutputPathError

__all__ = ["check_output_dir", "check_output_file", "first_missing", "remove_on_failure"]


def first_missing(path: str | os.PathLike[str]) -> Path | None:
    """The topmost of ``path`` and its parents that does not exist (None if ``path`` exists).

    Removing it removes everything a command created on its way to ``path``.
    """
    path = Path(path).absolute()
    missing = None
    for p in (path, *path.parents):
        if p.exists() or p.is_symlink():
            break
        missing = p
    return missing


def _existing_ancestor(path: Path) -> Path:
    for p in path.parents:
        if p.exists():
            return p
    return Path(path.anchor or ".")  # pragma: no cover - the root always exists


def _check_folder(folder: Path, target: Path) -> None:
    """``folder`` (an existing path on the way to ``target``) is a writable folder."""
    if not folder.is_dir():
        raise OutputPathError(f"cannot write {target}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write {target}: folder {folder} is not writable")
    try:  # os.access is not the whole truth (root, read-only mounts, ACLs): try it
        fd, probe = tempfile.mkstemp(prefix=".boltzflow-probe-", dir=folder)
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise OutputPathError(
            f"cannot write {target}: folder {folder} is not writable ({reason})"
        ) from None
    os.close(fd)
    os.unlink(probe)


def check_output_file(
    path: str | os.PathLike[str], *, overwrite: bool = True, create_parents: bool = True
) -> Path:
    """Check that the file ``path`` can be written; return it as a :class:`~pathlib.Path`.

    Args:
        path: the output file.
        overwrite: an existing file may be replaced (else it is an error).
        create_parents: missing parent folders will be created by the writer (else an error).

    Raises:
        OutputPathError: ``path`` is a folder, exists and ``overwrite`` is False, or its folder
            is missing (without ``create_parents``), is a file, or is not writable.
    """
    target = Path(path)
    if target.is_dir():
        raise OutputPathError(f"cannot write {target}: it is a folder")
    if target.exists() and not overwrite:
        raise OutputPathError(f"cannot write {target}: the file exists")
    parent = target.absolute().parent
    if not parent.exists():
        folder = _existing_ancestor(target.absolute())
        if folder.is_dir() and not create_parents:
            raise OutputPathError(f"cannot write {target}: folder {parent} does not exist")
        _check_folder(folder, target)
    else:
        _check_folder(parent, target)
    return target


def check_output_dir(path: str | os.PathLike[str], *, must_be_empty: bool = False) -> Path:
    """Check that the folder ``path`` can be created (with its parents) or written into.

    Args:
        path: the output folder (a run folder, a report folder).
        must_be_empty: an existing folder must be empty.

    Raises:
        OutputPathError: ``path`` is a file, lies under a file, is not writable, or is a
            non-empty folder while ``must_be_empty``.
    """
    target = Path(path)
    absolute = target.absolute()
    if absolute.exists():
        if not absolute.is_dir():
            raise OutputPathError(f"cannot write into {target}: it is a file, not a folder")
        if must_be_empty and any(absolute.iterdir()):
            raise OutputPathError(f"cannot write into {target}: the folder is not empty")
        _check_folder(absolute, target)
    else:
        _check_folder(_existing_ancestor(absolute), target)
    return target


@contextlib.contextmanager
def remove_on_failure(
    path: str | os.PathLike[str],
    *,
    replaces: bool = False,
    keep: Callable[[Path], bool] | None = None,
    keep_on_interrupt: bool = False,
) -> Iterator[None]:
    """Remove what the block created at ``path`` if it raises.

    What did not exist before the block (``path`` itself, or the topmost of the folders above
    it that the block created) is removed; a folder that existed before is never touched.

    Args:
        path: the block's output file or folder.
        replaces: the block writes the file ``path`` in place, destroying an earlier one: remove
            it on failure even if it existed before.
        keep: called with ``path`` on failure; True keeps everything (a resumable checkpoint).
        keep_on_interrupt: keep the output when the block is interrupted (Ctrl-C), for writers
            that keep their completed part.
    """
    target = Path(path)
    created = first_missing(target)
    try:
        yield
    except BaseException as err:
        if keep_on_interrupt and isinstance(err, KeyboardInterrupt):
            raise
        if keep is not None and keep(target):
            raise
        if replaces and created is None and target.is_file():
            target.unlink(missing_ok=True)
        if created is not None:
            if created.is_dir() and not created.is_symlink():
                shutil.rmtree(created, ignore_errors=True)
            else:
                created.unlink(missing_ok=True)
        raise
