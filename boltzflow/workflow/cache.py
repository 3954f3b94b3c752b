"""Stage cache: content fingerprints, stage keys and the JSON manifest of an output folder.

A stage's **key** is the SHA-256 of its name, its configuration (canonical JSON), the
fingerprints of its upstream stages' outputs and of any external input files, and the boltzflow
version. The manifest (``<output>/manifest.json``, rewritten atomically after every finished
stage) records for each stage its key, the fingerprint of every output file, its wall time and a
small summary. A stage is skipped when its key is unchanged and all its recorded outputs exist
with the recorded bytes; otherwise it runs again, and so does every stage whose inputs then
change. The bytes are checked by their SHA-256, recorded with the file's size and modification
time: a file whose size and mtime are unchanged is trusted without reading it (a re-run stays
fast), any other is hashed, so a damaged output (a flipped byte, a truncation) re-runs its stage.
Only a deliberate edit that also restores the old mtime could pass unnoticed.

The fingerprints that enter stage keys describe content, not bytes where a format stores
timestamps: a boltzflow dataset is identified by its stored array checksum, a checkpoint by its
payload digest (verified against the payload), a sample store by a checksum of its arrays. So a
deleted output that is regenerated bit-identically (CPU runs are reproducible) does not force its
dependents to run again.

Resumable stages (training) work in a folder that carries the key it was started with
(``.stage-key``); :func:`prepare_workdir` keeps it when the key matches (an interrupted run
continues from its checkpoint) and empties it otherwise.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import boltzflow
from boltzflow.io.atomic import atomic_write_text
from boltzflow.io.checkpoint import checkpoint_digest

__all__ = [
    "MANIFEST_FILE",
    "WORKDIR_KEY_FILE",
    "Manifest",
    "WorkflowLockedError",
    "canonical_json",
    "file_fingerprint",
    "prepare_workdir",
    "run_lock",
    "stage_key",
]

MANIFEST_FILE = "manifest.json"
WORKDIR_KEY_FILE = ".stage-key"
LOCK_FILE = ".lock"
_FORMAT = "boltzflow-workflow-manifest"
_CHUNK = 1 << 20


class WorkflowLockedError(ValueError):
    """Another live process is running a workflow in the same output folder."""


def canonical_json(obj: Any) -> str:
    """Sorted, compact JSON (non-JSON values as strings): equal configs give equal text."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        while block := fh.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def _hdf5_fingerprint(path: Path) -> str | None:
    import h5py

    from boltzflow.data.store import FORMAT_NAME as DATASET_FORMAT
    from boltzflow.io.samples import FORMAT_NAME as SAMPLES_FORMAT

    try:
        with h5py.File(path, "r") as fh:
            fmt = fh.attrs.get("format")
            fmt = fmt.decode() if isinstance(fmt, bytes) else fmt
            if fmt == DATASET_FORMAT:
                return f"dataset:{fh.attrs['checksum_sha256']}"
    except (OSError, KeyError):
        return None
    if fmt == SAMPLES_FORMAT:
        from boltzflow.data.store import content_checksum
        from boltzflow.io.samples import read_samples

        s = read_samples(path)
        arrays = {"x": s.x, **{f"c_{k}": v for k, v in s.columns.items()}}
        arrays.update(
            {k: v for k, v in (("log_q", s.log_q), ("u", s.u), ("log_w", s.log_w)) if v is not None}
        )
        return f"samples:{content_checksum(arrays)}"
    return None


def file_fingerprint(path: str | os.PathLike[str]) -> str:
    """Content fingerprint of a file (see the module docstring).

    Raises:
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    with path.open("rb") as fh:
        head = fh.read(200)
    if head.startswith(b"BOLTZFLOW-CHECKPOINT "):
        return f"checkpoint:{checkpoint_digest(path)}"
    if head.startswith(b"\x89HDF\r\n\x1a\n"):
        fp = _hdf5_fingerprint(path)
        if fp is not None:
            return fp
    return f"sha256:{_sha256_file(path)}"


def _byte_record(path: Path) -> dict[str, Any]:
    """Size, modification time (ns) and sha256 of the bytes of ``path``."""
    st = path.stat()
    return {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "sha256": _sha256_file(path)}


def _bytes_unchanged(path: Path, recorded: Mapping[str, Any]) -> bool:
    """Whether ``path`` still holds the bytes of ``recorded`` (see :func:`_byte_record`).

    Size and mtime equal to the record are trusted without reading (so a re-run stays fast);
    otherwise the bytes are hashed. The record's stat is refreshed when only the time changed.
    """
    st = path.stat()
    if st.st_size != recorded.get("size"):
        return False
    if st.st_mtime_ns == recorded.get("mtime_ns"):
        return True
    if _sha256_file(path) != recorded.get("sha256"):
        return False
    if isinstance(recorded, dict):
        recorded["mtime_ns"] = st.st_mtime_ns
    return True


def stage_key(
    name: str,
    config: Any,
    upstream: Mapping[str, Mapping[str, str]] | None = None,
    inputs: Mapping[str, str] | None = None,
) -> str:
    """SHA-256 key of a stage from its config and the fingerprints it reads.

    Args:
        name: stage name.
        config: JSON-able stage configuration.
        upstream: ``{stage: {output: fingerprint}}`` of the stages it depends on.
        inputs: ``{path: fingerprint}`` of external input files.
    """
    text = canonical_json(
        {
            "stage": name,
            "config": config,
            "upstream": upstream or {},
            "inputs": inputs or {},
            "boltzflow": boltzflow.__version__,
        }
    )
    return hashlib.sha256(text.encode()).hexdigest()


class Manifest:
    """The stage records of one output folder (``manifest.json``), saved atomically."""

    def __init__(self, out_dir: str | os.PathLike[str], workflow: str = "") -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / MANIFEST_FILE
        self.workflow = workflow
        self.stages: dict[str, dict[str, Any]] = {}
        if self.path.is_file():
            try:
                data = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                data = {}  # unreadable: every stage runs again (never trust a broken cache)
            if data.get("format") == _FORMAT:
                self.stages = dict(data.get("stages", {}))

    def get(self, name: str) -> dict[str, Any] | None:
        return self.stages.get(name)

    def current(self, name: str, key: str) -> tuple[bool, str]:
        """``(True, "")`` if stage ``name`` finished with ``key`` and its outputs are intact;
        else ``(False, reason)``."""
        rec = self.stages.get(name)
        if rec is None:
            return False, "not run yet"
        if rec.get("key") != key:
            return False, "config or inputs changed"
        stats = rec.get("files", {})
        for rel, fp in rec.get("outputs", {}).items():
            path = self.out_dir / rel
            if not path.is_file():
                return False, f"output {rel} missing"
            try:
                if rel in stats:
                    if not _bytes_unchanged(path, stats[rel]):
                        return False, f"output {rel} modified or damaged"
                elif file_fingerprint(path) != fp:  # a manifest from before byte records
                    return False, f"output {rel} modified"
            except (OSError, ValueError):
                return False, f"output {rel} unreadable"
        return True, ""

    def output_fingerprints(self, name: str) -> dict[str, str]:
        rec = self.stages.get(name) or {}
        return dict(rec.get("outputs", {}))

    def record(
        self,
        name: str,
        key: str,
        outputs: list[str],
        *,
        seconds: float,
        cpu_seconds: float = 0.0,
        summary: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """Fingerprint ``outputs`` (paths relative to the folder), store the record and save."""
        fps = {rel: file_fingerprint(self.out_dir / rel) for rel in outputs}
        rec = {
            "key": key,
            "outputs": fps,
            "files": {rel: _byte_record(self.out_dir / rel) for rel in outputs},
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "finished": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "summary": json.loads(canonical_json(dict(summary or {}))),
        }
        self.stages[name] = rec
        self.save()
        return rec

    def forget(self, name: str) -> None:
        if self.stages.pop(name, None) is not None:
            self.save()

    def save(self) -> None:
        payload = {
            "format": _FORMAT,
            "version": 1,
            "workflow": self.workflow,
            "stages": self.stages,
        }
        atomic_write_text(self.path, json.dumps(payload, indent=2, sort_keys=True) + "\n")


def prepare_workdir(path: str | os.PathLike[str], key: str) -> bool:
    """Make ``path`` the work folder of a stage with ``key``.

    Returns:
        True if the folder already belonged to ``key`` (its partial work is kept, e.g. a
        training checkpoint to resume from); False if it was created or emptied.
    """
    path = Path(path)
    marker = path / WORKDIR_KEY_FILE
    if path.is_dir() and marker.is_file() and marker.read_text().strip() == key:
        return True
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    path.mkdir(parents=True)
    atomic_write_text(marker, key + "\n")
    return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def run_lock(out_dir: str | os.PathLike[str]) -> Iterator[Path]:
    """Hold ``<out_dir>/.lock`` (with this process id) while a workflow runs there.

    A lock left by a process that no longer exists is taken over.

    Raises:
        WorkflowLockedError: a live process holds the lock.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or "0")
            except (OSError, ValueError):
                pid = 0
            if pid and pid != os.getpid() and _alive(pid):
                raise WorkflowLockedError(
                    f"{out}: another run (process {pid}) is using this output folder; wait for "
                    f"it or remove {lock} if that process is gone"
                ) from None
            lock.unlink(missing_ok=True)
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(f"{os.getpid()}\n")
        break
    else:  # pragma: no cover - a race with another process taking the stale lock
        raise WorkflowLockedError(f"{out}: could not take {lock}")
    try:
        yield lock
    finally:
        lock.unlink(missing_ok=True)
