"""The stage engine on a toy graph: caching, invalidation, resume, atomic outputs, locking."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from boltzflow.io.atomic import atomic_write_text
from boltzflow.workflow.cache import (
    MANIFEST_FILE,
    Manifest,
    WorkflowLockedError,
    file_fingerprint,
    prepare_workdir,
    run_lock,
    stage_key,
)
from boltzflow.workflow.runner import format_stage_table, run_stages
from boltzflow.workflow.stage import Stage


class Toy:
    """a -> b -> c, plus d (independent of b) -> c. Counts how often each stage ran."""

    def __init__(self, tmp_path, *, b_config=1, fail_c=False, nondeterministic_b=False):
        self.calls: dict[str, int] = {}
        self.tmp = tmp_path
        self.b_config = b_config
        self.fail_c = fail_c
        self.nondet_b = nondeterministic_b
        self.external = tmp_path / "external.txt"
        if not self.external.exists():
            self.external.write_text("external v1\n")

    def _count(self, name):
        self.calls[name] = self.calls.get(name, 0) + 1

    def a(self, ctx):
        self._count("a")
        atomic_write_text(ctx.path("a.txt"), "A\n")
        return {"note": "wrote a"}

    def b(self, ctx):
        self._count("b")
        text = ctx.path("a.txt").read_text() + f"B{self.b_config}\n"
        if self.nondet_b:
            text += f"run {self.calls['b']}\n"
        atomic_write_text(ctx.path("b.txt"), text)
        return {"value": self.b_config}

    def d(self, ctx):
        self._count("d")
        atomic_write_text(ctx.path("d.txt"), self.external.read_text().upper())
        return {}

    def c(self, ctx):
        self._count("c")
        if self.fail_c:
            with open(ctx.path("c.txt.partial"), "w") as fh:  # what a crash leaves behind
                fh.write("half")
            raise RuntimeError("simulated crash in c")
        assert ctx.upstream["b"] == {"value": self.b_config}
        atomic_write_text(
            ctx.path("c.txt"), ctx.path("b.txt").read_text() + ctx.path("d.txt").read_text()
        )
        ctx.add_output(ctx.path("c_extra.txt"))
        atomic_write_text(ctx.path("c_extra.txt"), "extra\n")
        return {"note": "combined"}

    def stages(self):
        return [
            Stage("c", self.c, config={"k": 3}, deps=("b", "d"), outputs=("c.txt",)),
            Stage("a", self.a, config={"k": 1}, outputs=("a.txt",)),
            Stage("b", self.b, config={"k": self.b_config}, deps=("a",), outputs=("b.txt",)),
            Stage("d", self.d, config={}, inputs=(self.external,), outputs=("d.txt",)),
        ]


def _run(toy, out, **kw):
    return run_stages(toy.stages(), out, log=lambda msg: None, progress=False, **kw)


def _status(results):
    return {r.name: r.status for r in results}


def test_first_run_then_everything_cached(tmp_path):
    out = tmp_path / "out"
    toy = Toy(tmp_path)
    res = _run(toy, out)
    assert [r.name for r in res] == ["a", "b", "d", "c"]  # dependency order
    assert set(_status(res).values()) == {"ran"}
    assert (out / "c.txt").read_text() == "A\nB1\nEXTERNAL V1\n"
    manifest = json.loads((out / MANIFEST_FILE).read_text())
    assert set(manifest["stages"]) == {"a", "b", "c", "d"}
    assert set(manifest["stages"]["c"]["outputs"]) == {"c.txt", "c_extra.txt"}
    res2 = _run(toy, out)
    assert set(_status(res2).values()) == {"cached"}
    assert toy.calls == {"a": 1, "b": 1, "c": 1, "d": 1}
    assert res2[1].summary == {"value": 1}  # summaries survive from the manifest
    table = format_stage_table(res2)
    assert "skipped (cached)" in table and "combined" in table


def test_deleted_output_reruns_only_its_stage_when_content_is_reproduced(tmp_path):
    out = tmp_path / "out"
    toy = Toy(tmp_path)
    _run(toy, out)
    (out / "b.txt").unlink()
    res = _run(toy, out)
    # b is regenerated bit-identically, so c (its only dependent) need not run again
    assert _status(res) == {"a": "cached", "b": "ran", "d": "cached", "c": "cached"}
    (out / "c_extra.txt").unlink()  # an output recorded while running counts as well
    assert _status(_run(toy, out))["c"] == "ran"


def test_deleted_output_reruns_dependents_when_content_changes(tmp_path):
    out = tmp_path / "out"
    toy = Toy(tmp_path, nondeterministic_b=True)
    _run(toy, out)
    (out / "b.txt").unlink()
    res = _run(toy, out)
    assert _status(res) == {"a": "cached", "b": "ran", "d": "cached", "c": "ran"}
    assert toy.calls == {"a": 1, "b": 2, "c": 2, "d": 1}


def test_modified_output_and_changed_config_and_inputs(tmp_path):
    out = tmp_path / "out"
    toy = Toy(tmp_path)
    _run(toy, out)
    (out / "d.txt").write_text("tampered\n")
    assert _status(_run(toy, out)) == {"a": "cached", "b": "cached", "d": "ran", "c": "cached"}
    toy2 = Toy(tmp_path, b_config=2)  # changed config of b: b and c run, a and d do not
    res = _run(toy2, out)
    assert _status(res) == {"a": "cached", "b": "ran", "d": "cached", "c": "ran"}
    assert (out / "c.txt").read_text().startswith("A\nB2\n")
    toy2.external.write_text("external v2\n")  # an external input changed: d and c
    assert _status(_run(toy2, out)) == {"a": "cached", "b": "cached", "d": "ran", "c": "ran"}
    assert _status(_run(toy2, out, force=["a"]))["a"] == "ran"
    with pytest.raises(ValueError, match="unknown stage"):
        _run(toy2, out, force=["nope"])


def test_interrupted_run_resumes_and_leaves_no_partial_output(tmp_path):
    out = tmp_path / "out"
    toy = Toy(tmp_path, fail_c=True)
    with pytest.raises(RuntimeError, match="simulated crash"):
        _run(toy, out)
    manifest = Manifest(out)
    assert set(manifest.stages) == {"a", "b", "d"}  # the failed stage is not recorded
    assert not (out / "c.txt").exists()
    toy.fail_c = False
    res = _run(toy, out)
    assert _status(res) == {"a": "cached", "b": "cached", "d": "cached", "c": "ran"}
    # nothing half-written under a final name: only the crash's own scratch file and outputs
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(
        ["a.txt", "b.txt", "c.txt", "c_extra.txt", "c.txt.partial", "d.txt", MANIFEST_FILE]
    )


def test_graph_validation_and_missing_outputs(tmp_path):
    noop = lambda ctx: None  # noqa: E731
    with pytest.raises(ValueError, match="unknown stage 'x'"):
        run_stages([Stage("a", noop, deps=("x",))], tmp_path, log=print)
    with pytest.raises(ValueError, match="cycle"):
        run_stages([Stage("a", noop, deps=("b",)), Stage("b", noop, deps=("a",))], tmp_path)
    with pytest.raises(ValueError, match="duplicate"):
        run_stages([Stage("a", noop), Stage("a", noop)], tmp_path)
    with pytest.raises(ValueError, match=r"did not write its output\(s\) \['x.txt'\]"):
        run_stages([Stage("a", noop, outputs=("x.txt",))], tmp_path, log=lambda m: None)
    assert "a" not in Manifest(tmp_path).stages


def test_workdir_is_kept_for_the_same_key_and_emptied_otherwise(tmp_path):
    work = tmp_path / "w"
    assert prepare_workdir(work, "k1") is False
    (work / "checkpoint.pt").write_text("partial")
    assert prepare_workdir(work, "k1") is True  # resume
    assert (work / "checkpoint.pt").is_file()
    assert prepare_workdir(work, "k2") is False  # other config: start over
    assert not (work / "checkpoint.pt").exists()


def test_stage_key_depends_on_every_ingredient():
    base = stage_key("s", {"a": 1}, {"up": {"f": "x"}}, {"/in": "h"})
    assert base == stage_key("s", {"a": 1}, {"up": {"f": "x"}}, {"/in": "h"})
    assert base != stage_key("t", {"a": 1}, {"up": {"f": "x"}}, {"/in": "h"})
    assert base != stage_key("s", {"a": 2}, {"up": {"f": "x"}}, {"/in": "h"})
    assert base != stage_key("s", {"a": 1}, {"up": {"f": "y"}}, {"/in": "h"})
    assert base != stage_key("s", {"a": 1}, {"up": {"f": "x"}}, {"/in": "g"})


def test_fingerprints_ignore_timestamps_but_not_content(tmp_path):
    from boltzflow.data import write_dataset
    from boltzflow.io.checkpoint import save_checkpoint
    from boltzflow.io.samples import SampleWriter

    x = np.arange(12.0).reshape(3, 4)
    prov = {
        "generator": "t",
        "settings": {},
        "seed": 0,
        "system_parameters": {},
        "temperature": None,
    }
    write_dataset(tmp_path / "d1.h5", x, system="s", provenance=prov)
    write_dataset(tmp_path / "d2.h5", x, system="s", provenance=prov)
    write_dataset(tmp_path / "d3.h5", x + 1, system="s", provenance=prov)
    fp = file_fingerprint
    assert fp(tmp_path / "d1.h5").startswith("dataset:")
    assert fp(tmp_path / "d1.h5") == fp(tmp_path / "d2.h5") != fp(tmp_path / "d3.h5")
    for name, shift in (("s1.h5", 0), ("s2.h5", 0), ("s3.h5", 1)):
        with SampleWriter(tmp_path / name, dim=4, provenance={"name": name}) as w:
            w.append(x + shift, log_q=np.zeros(3))
    assert fp(tmp_path / "s1.h5").startswith("samples:")
    assert fp(tmp_path / "s1.h5") == fp(tmp_path / "s2.h5") != fp(tmp_path / "s3.h5")
    save_checkpoint(tmp_path / "c1.pt", {"kind": "k", "w": torch.ones(3)})
    save_checkpoint(tmp_path / "c2.pt", {"kind": "k", "w": torch.ones(3)})
    save_checkpoint(tmp_path / "c3.pt", {"kind": "k", "w": torch.zeros(3)})
    assert fp(tmp_path / "c1.pt").startswith("checkpoint:")
    assert fp(tmp_path / "c1.pt") == fp(tmp_path / "c2.pt") != fp(tmp_path / "c3.pt")
    (tmp_path / "t.txt").write_text("hello")
    assert fp(tmp_path / "t.txt") == (
        "sha256:2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824"
    )
    with pytest.raises(FileNotFoundError):
        fp(tmp_path / "missing.txt")


def test_corrupt_manifest_means_nothing_is_trusted(tmp_path):
    out = tmp_path / "out"
    toy = Toy(tmp_path)
    _run(toy, out)
    (out / MANIFEST_FILE).write_text("{not json")
    assert set(_status(_run(toy, out)).values()) == {"ran"}


def test_run_lock_blocks_a_live_process_and_takes_over_a_stale_lock(tmp_path):
    with run_lock(tmp_path) as lock:
        assert lock.read_text().strip() == str(os.getpid())
    assert not (tmp_path / ".lock").exists()
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (tmp_path / ".lock").write_text(f"{sleeper.pid}\n")
        with pytest.raises(WorkflowLockedError, match=f"process {sleeper.pid}"):
            with run_lock(tmp_path):
                pass
    finally:
        sleeper.kill()
        sleeper.wait()
    with run_lock(tmp_path):  # the holder is gone: stale lock taken over
        pass


def _flip_byte(path, offset_from_end=40):
    """Flip one byte near the end of ``path`` (inside the data, not the header); same size."""
    raw = bytearray(path.read_bytes())
    raw[-offset_from_end] ^= 0xFF
    path.write_bytes(bytes(raw))


def test_damaged_outputs_rerun_their_stage_and_a_touch_does_not(tmp_path):
    """A byte flipped in a cached checkpoint or dataset used to pass as "up to date": the
    checkpoint fingerprint was read from its own header, the dataset's from a stored checksum."""
    from boltzflow.data import write_dataset
    from boltzflow.io.checkpoint import save_checkpoint

    calls = {"ckpt": 0, "data": 0}
    x = np.linspace(0.0, 1.0, 4000).reshape(500, 8)

    def ckpt(ctx):
        calls["ckpt"] += 1
        save_checkpoint(ctx.path("student.pt"), {"kind": "k", "w": torch.linspace(0, 1, 500)})

    def data(ctx):
        calls["data"] += 1
        prov = {"generator": "t", "settings": {}, "seed": 0, "system_parameters": {}}
        write_dataset(ctx.path("data.h5"), x, system="s", provenance={**prov, "temperature": None})

    stages = [
        Stage("ckpt", ckpt, config={}, outputs=("student.pt",)),
        Stage("data", data, config={}, outputs=("data.h5",)),
    ]
    out = tmp_path / "out"

    def run():
        res = run_stages(stages, out, log=lambda msg: None, progress=False)
        return _status(res)

    assert run() == {"ckpt": "ran", "data": "ran"}
    assert run() == {"ckpt": "cached", "data": "cached"}
    _flip_byte(out / "student.pt")
    assert run() == {"ckpt": "ran", "data": "cached"}
    import h5py

    with h5py.File(out / "data.h5", "r") as fh:  # flip a byte inside the stored array
        offset = fh["positions"].id.get_offset()
    raw = bytearray((out / "data.h5").read_bytes())
    raw[offset + 100] ^= 0xFF
    (out / "data.h5").write_bytes(bytes(raw))
    assert run() == {"ckpt": "cached", "data": "ran"}
    os.utime(out / "student.pt", ns=(1, 1))  # new mtime, same bytes: hashed, still cached
    assert run() == {"ckpt": "cached", "data": "cached"}
    assert calls == {"ckpt": 2, "data": 2}


def test_manifest_without_byte_records_still_catches_a_damaged_checkpoint(tmp_path):
    save = tmp_path / "out"
    stage = Stage(
        "ckpt",
        lambda ctx: save_ckpt(ctx.path("m.pt")),
        config={},
        outputs=("m.pt",),
    )

    def save_ckpt(path):
        from boltzflow.io.checkpoint import save_checkpoint

        save_checkpoint(path, {"kind": "k", "w": torch.ones(100)})

    run_stages([stage], save, log=lambda msg: None, progress=False)
    manifest = json.loads((save / MANIFEST_FILE).read_text())
    del manifest["stages"]["ckpt"]["files"]  # as written by boltzflow before byte records
    (save / MANIFEST_FILE).write_text(json.dumps(manifest))
    _flip_byte(save / "m.pt")
    res = run_stages([stage], save, log=lambda msg: None, progress=False)
    assert _status(res) == {"ckpt": "ran"}
