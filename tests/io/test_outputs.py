"""Output paths checked before any work, removed after a failure (:mod:`boltzflow.io.outputs`)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from boltzflow.errors import OutputPathError
from boltzflow.io.outputs import (
    check_output_dir,
    check_output_file,
    first_missing,
    remove_on_failure,
)

ROOT_USER = hasattr(os, "geteuid") and os.geteuid() == 0


def test_output_file_checks(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    assert check_output_file(tmp_path / "new.h5") == tmp_path / "new.h5"
    assert check_output_file(tmp_path / "a" / "b" / "new.h5")  # parents made by the writer
    assert check_output_file(tmp_path / "file")  # replaced by default
    with pytest.raises(OutputPathError, match="it is a folder"):
        check_output_file(tmp_path / "dir")
    with pytest.raises(OutputPathError, match="file is not a folder"):
        check_output_file(tmp_path / "file" / "out.h5")
    with pytest.raises(OutputPathError, match="file is not a folder"):
        check_output_file(tmp_path / "file" / "deeper" / "out.h5")
    with pytest.raises(OutputPathError, match="the file exists"):
        check_output_file(tmp_path / "file", overwrite=False)
    with pytest.raises(OutputPathError, match="does not exist"):
        check_output_file(tmp_path / "a" / "new.h5", create_parents=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dir", "file"]  # probes removed


def test_output_dir_checks(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("x")
    (tmp_path / "dir").mkdir()
    assert check_output_dir(tmp_path / "dir") == tmp_path / "dir"
    assert check_output_dir(tmp_path / "new" / "run")
    with pytest.raises(OutputPathError, match="it is a file"):
        check_output_dir(tmp_path / "file")
    with pytest.raises(OutputPathError, match="file is not a folder"):
        check_output_dir(tmp_path / "file" / "run")
    (tmp_path / "dir" / "x").write_text("x")
    with pytest.raises(OutputPathError, match="not empty"):
        check_output_dir(tmp_path / "dir", must_be_empty=True)
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(ROOT_USER, reason="root writes into read-only folders")
def test_read_only_folder(tmp_path: Path) -> None:
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        with pytest.raises(OutputPathError, match="not writable"):
            check_output_file(ro / "out.h5")
        with pytest.raises(OutputPathError, match="not writable"):
            check_output_dir(ro / "run")
    finally:
        ro.chmod(0o755)


def test_remove_on_failure(tmp_path: Path) -> None:
    assert first_missing(tmp_path) is None
    assert first_missing(tmp_path / "a" / "b") == tmp_path / "a"
    # a folder made by the block (with its parents) goes
    with pytest.raises(RuntimeError), remove_on_failure(tmp_path / "a" / "run"):
        (tmp_path / "a" / "run").mkdir(parents=True)
        (tmp_path / "a" / "run" / "run.json").write_text("{}")
        raise RuntimeError
    assert not (tmp_path / "a").exists()
    # ... unless it holds what a rerun resumes from
    run = tmp_path / "run"
    keep = lambda d: (d / "checkpoint.pt").is_file()  # noqa: E731
    with pytest.raises(RuntimeError), remove_on_failure(run, keep=keep):
        run.mkdir()
        (run / "checkpoint.pt").write_text("x")
        raise RuntimeError
    assert (run / "checkpoint.pt").is_file()
    # a folder that existed before stays, with what the block wrote
    with pytest.raises(RuntimeError), remove_on_failure(run):
        (run / "more").write_text("x")
        raise RuntimeError
    assert (run / "more").is_file()
    # a file written in place: removed on error, kept on Ctrl-C when asked
    out = tmp_path / "s.h5"
    out.write_text("old")
    with pytest.raises(RuntimeError), remove_on_failure(out, replaces=True):
        out.write_text("")
        raise RuntimeError
    assert not out.exists()
    with pytest.raises(KeyboardInterrupt), remove_on_failure(out, keep_on_interrupt=True):
        out.write_text("part")
        raise KeyboardInterrupt
    assert out.read_text() == "part"
    # success keeps everything
    with remove_on_failure(tmp_path / "ok"):
        (tmp_path / "ok").mkdir()
    assert (tmp_path / "ok").is_dir()
