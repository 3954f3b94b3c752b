"""Sample stores split over the ranks of a distributed run: shard names and the shard manifest.

``boltzflow sample ... -o OUT.h5`` under ``torchrun --nproc_per_node=K`` (K > 1) writes

* ``OUT.rank<r>-of-<K>.h5``: rank r's rows, an ordinary sample store
  (:mod:`boltzflow.io.samples`, readable alone, marked partial if its writer did not finish);
* ``OUT.shards.json``: the manifest, written atomically by rank 0 when sampling starts
  (``complete: false``) and again when every rank has finished (``complete: true``, with the rows
  of each shard). It names the shards in rank order, relative to its own folder.

The union of the samples is the concatenation of the shards in rank order. Readers
(:func:`resolve_sample_files`) accept the manifest, any list of stores, or ``OUT.h5`` itself
when only its manifest exists.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from boltzflow.errors import InvalidFileError
from boltzflow.io.atomic import atomic_path, atomic_write_text
from boltzflow.io.samples import SampleWriter, read_samples

__all__ = [
    "MANIFEST_FORMAT",
    "manifest_path",
    "merge_stores",
    "read_manifest",
    "resolve_sample_files",
    "shard_path",
    "write_manifest",
]

MANIFEST_FORMAT = "boltzflow-sample-shards"
MANIFEST_VERSION = 1


def shard_path(path: str | os.PathLike[str], rank: int, world_size: int) -> Path:
    """``dir/OUT.rank<r>-of-<K>.h5`` for the output ``dir/OUT.h5`` (suffix kept)."""
    path = Path(path)
    suffix = path.suffix or ".h5"
    return path.with_name(f"{path.stem}.rank{rank}-of-{world_size}{suffix}")


def manifest_path(path: str | os.PathLike[str]) -> Path:
    """``dir/OUT.shards.json`` for the output ``dir/OUT.h5``."""
    path = Path(path)
    return path.with_name(f"{path.stem}.shards.json")


def write_manifest(
    path: str | os.PathLike[str],
    *,
    shards: Sequence[Mapping[str, Any]],
    complete: bool,
    **facts: Any,
) -> Path:
    """Write the manifest of output ``path`` atomically (rank 0 only).

    Args:
        path: the sampling output ``OUT.h5`` (the manifest goes to :func:`manifest_path`).
        shards: one entry per rank in rank order, each with ``file`` (a path; stored relative to
            the manifest's folder) and any JSON-able facts (``rank``, ``seed``, ``n_planned``,
            ``n``).
        complete: every rank finished.
        **facts: JSON-able facts about the run (``world_size``, ``n_planned``, ``seed``).
    """
    target = manifest_path(path)
    entries = []
    for shard in shards:
        entry = dict(shard)
        entry["file"] = os.path.relpath(Path(entry["file"]).absolute(), target.absolute().parent)
        entries.append(entry)
    data = {
        "format": MANIFEST_FORMAT,
        "format_version": MANIFEST_VERSION,
        "complete": bool(complete),
        **facts,
        "shards": entries,
    }
    atomic_write_text(target, json.dumps(data, indent=2, default=str) + "\n")
    return target


def read_manifest(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a manifest; ``shards[i]["file"]`` become absolute :class:`~pathlib.Path` s.

    Raises:
        FileNotFoundError: no such file.
        InvalidFileError: not a shard manifest.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"shard manifest not found: {path}")
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise InvalidFileError(f"{path}: not a shard manifest (not JSON: {err})") from None
    if not isinstance(data, dict) or data.get("format") != MANIFEST_FORMAT:
        raise InvalidFileError(f"{path}: not a boltzflow shard manifest (format attribute)")
    shards = data.get("shards")
    if not isinstance(shards, list) or not all(
        isinstance(s, dict) and isinstance(s.get("file"), str) for s in shards
    ):
        raise InvalidFileError(f"{path}: the manifest's 'shards' is not a list of files")
    for shard in shards:
        shard["file"] = (path.parent / shard["file"]).absolute()
    return data


def resolve_sample_files(paths: str | os.PathLike[str] | Sequence[Any]) -> list[Path]:
    """The sample stores named by ``paths``, in order: a shard manifest (``*.json``) stands for
    its shards, and a missing ``OUT.h5`` whose ``OUT.shards.json`` exists for those shards.

    Raises:
        FileNotFoundError: a path that is neither a file nor stands for a manifest.
        InvalidFileError: a damaged manifest.
        ValueError: no path given.
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.suffix.lower() == ".json":
            files += [s["file"] for s in read_manifest(path)["shards"]]
        elif not path.exists() and manifest_path(path).is_file():
            files += [s["file"] for s in read_manifest(manifest_path(path))["shards"]]
        else:
            files.append(path)
    if not files:
        raise ValueError("no sample files given")
    return files


def merge_stores(
    files: Sequence[str | os.PathLike[str]],
    target: str | os.PathLike[str],
    *,
    provenance: Mapping[str, Any],
) -> int:
    """Write the union of complete sample stores (in order) to one store ``target``, atomically
    (a workflow's sampling stage on several ranks ends with this, on rank 0).

    Returns:
        the rows written.

    Raises:
        ValueError: the stores differ in dim or columns (or one is partial or damaged).
    """
    parts = [read_samples(f) for f in files]
    if not parts:
        raise ValueError("no sample stores to merge")
    dim = parts[0].dim
    with atomic_path(target, suffix=".h5") as tmp:
        with SampleWriter(tmp, dim=dim, provenance=provenance, n_planned=None) as writer:
            for part in parts:
                if part.dim != dim:
                    raise ValueError(f"{part.path}: dim {part.dim}, not {dim} like the others")
                cols = {k: getattr(part, k) for k in ("log_q", "u", "log_w")}
                writer.append(part.x, **cols, **part.columns)
    return sum(p.n for p in parts)
