"""Bad inputs tried on the ``boltzflow`` command line, by kind, with the outcome of each.

    python workflows/reliability.py [-o runs/reliability] [--keep]

Builds small fixtures in a temporary folder (a DW4 dataset, a tiny teacher, a sample store from
it), then runs each case through the CLI entry point in this process and classifies what
happened:

* ``clear error``: exit code 2 and a one-line message on stderr, no traceback, and nothing left
  at the output path;
* ``refused``: a partial (interrupted) file refused with a message saying so;
* ``recovered``: the documented way around (``--allow-partial``) worked and said what it used;
* ``exact data``: a damaged file whose damage missed the data (e.g. bytes in HDF5 free space):
  the command ran and the reader returned exactly the original arrays;
* ``SILENT``: exit code 0 where the input is bad (a confident wrong answer: the worst outcome);
* ``TRACEBACK``: any other exception or exit code;
* ``LEFT BEHIND``: the message was clear but a file or folder was left at the output path.

Prints a markdown table and writes ``reliability.json`` and ``reliability.md`` to the output
folder. Exit code 1 when any case is SILENT, TRACEBACK or LEFT BEHIND.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from boltzflow.cli import main as cli_main

TINY_TEACHER = """
system = "dw4"
[model]
backbone = "egnn"
hidden = 8
layers = 1
[train]
steps = 20
batch_size = 32
warmup_steps = 2
log_every = 10
checkpoint_every = 10
seed = 0
[sample]
method = "rk4"
steps = 4
batch_size = 256
"""

#: outcomes that count as failures of the toolkit
BAD_OUTCOMES = ("SILENT", "TRACEBACK", "LEFT BEHIND", "unclear error")


@dataclass
class Case:
    kind: str
    what: str
    argv: list[str]
    expect: str = "clear error"  # or "refused", "recovered"
    output: str | None = None  # path that must not exist afterwards (for failed commands)
    must_say: str | None = None  # words the message must contain
    prepare: Callable[[], None] | None = field(default=None, repr=False)
    #: for damaged files: True when the reader returns exactly the intact file's arrays
    exact: Callable[[], bool] | None = field(default=None, repr=False)


@dataclass
class Outcome:
    kind: str
    what: str
    command: str
    expect: str
    outcome: str
    exit_code: int | None
    message: str
    seconds: float


def _run(argv: list[str]) -> tuple[int | None, str, str | None]:
    """Run the CLI in-process: ``(exit code, stdout + stderr, traceback or None)``."""
    err, out = io.StringIO(), io.StringIO()
    tb = None
    code: int | None
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = cli_main(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException:
            code = None
            tb = traceback.format_exc()
    return code, out.getvalue() + err.getvalue(), tb


def _last_line(text: str) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    return lines[-1].strip() if lines else ""


def classify(case: Case, code: int | None, stderr: str, tb: str | None) -> tuple[str, str]:
    """``(outcome, message)`` of one case (see the module docstring)."""
    if tb is not None:
        return "TRACEBACK", _last_line(tb)
    message = _last_line(stderr)
    if "Traceback (most recent call last)" in stderr:
        return "TRACEBACK", message
    if case.expect == "recovered":
        if code == 0 and (case.must_say is None or case.must_say in stderr):
            return "recovered", message
        return ("SILENT" if code == 0 else "TRACEBACK"), message
    if code == 0:
        if case.exact is not None and case.exact():
            return "exact data", message
        return "SILENT", message
    if code != 2 or not message:
        return "TRACEBACK", message
    if case.must_say is not None and case.must_say.lower() not in stderr.lower():
        return "unclear error", message
    if case.output is not None and Path(case.output).exists():
        return "LEFT BEHIND", message
    return case.expect, message


# -- fixtures ----------------------------------------------------------------------------------
def _must(argv: list[str]) -> None:
    code, stderr, tb = _run(argv)
    if code != 0:
        raise SystemExit(f"fixture command failed: boltzflow {' '.join(argv)}\n{tb or stderr}")


def make_fixtures(tmp: Path) -> dict[str, Path]:
    """A DW4 dataset, a tiny teacher and a sample store in ``tmp``."""
    f = {
        "data": tmp / "dw4.h5",
        "config": tmp / "tiny.toml",
        "teacher": tmp / "teacher",
        "samples": tmp / "samples.h5",
        "npy": tmp / "x.npy",
        "file": tmp / "a_file.txt",
        "folder": tmp / "a_folder",
    }
    f["config"].write_text(TINY_TEACHER)
    f["file"].write_text("not a folder\n")
    f["folder"].mkdir()
    _must(["data", "generate", "dw4", "-n", "300", "-o", str(f["data"]), "--method", "mala"])
    _must(
        [
            "train",
            "teacher",
            "--data",
            str(f["data"]),
            "--config",
            str(f["config"]),
            "-o",
            str(f["teacher"]),
        ]
    )
    _must(["sample", str(f["teacher"]), "-n", "400", "-o", str(f["samples"]), "--seed", "1"])
    x = np.random.default_rng(0).normal(size=(50, 8))
    np.save(f["npy"], x)
    return f


def _damaged(src: Path, dst: Path, how: str) -> Path:
    raw = bytearray(src.read_bytes())
    if how == "truncate":
        raw = raw[: len(raw) // 2]
    elif how == "flip":  # flip bytes in the last quarter (data, not the superblock/header)
        for i in range(len(raw) * 3 // 4, len(raw), max(1, len(raw) // 64)):
            raw[i] ^= 0xFF
    elif how == "flip-data":  # one byte inside the first stored row block of the main array
        raw[_data_offset(src) + 5] ^= 0xFF
    elif how == "empty":
        raw = bytearray()
    elif how == "text":
        raw = bytearray(b"this is not the file you are looking for\n")
    dst.write_bytes(bytes(raw))
    return dst


def _data_offset(path: Path) -> int:
    """File offset of the first stored block of the main array (``x`` or ``positions``)."""
    import h5py

    with h5py.File(path, "r") as fh:
        ds = fh["x"] if "x" in fh else fh["positions"]
        if ds.chunks is None:
            return int(ds.id.get_offset())
        return int(ds.id.get_chunk_info(0).byte_offset)


def _same_samples(good: Path, bad: Path) -> bool:
    from boltzflow.io.samples import read_samples

    a, b = read_samples(good), read_samples(bad)
    pairs = [(a.x, b.x), (a.log_q, b.log_q), (a.u, b.u), (a.log_w, b.log_w)]
    return all(np.array_equal(p, q) for p, q in pairs if p is not None or q is not None)


def _same_positions(good: Path, bad: Path) -> bool:
    from boltzflow.data import load_positions

    return bool(np.array_equal(load_positions(good), load_positions(bad)))


def _partial_samples(dst: Path) -> None:
    """A sample store whose writer stopped after its first chunk (as a Ctrl-C leaves it)."""
    from boltzflow.io.samples import SampleWriter

    rng = np.random.default_rng(0)
    writer = SampleWriter(dst, dim=8, provenance={"system": "dw4"}, n_planned=300)
    writer.append(rng.normal(size=(100, 8)), log_q=rng.normal(size=100))
    writer.abort()


def build_cases(f: dict[str, Path], tmp: Path) -> list[Case]:
    t = str(f["teacher"])
    d = str(f["data"])
    s = str(f["samples"])
    under = str(f["file"] / "out.h5")
    folder = str(f["folder"])
    ckpt = f["teacher"] / "teacher.pt"
    cases: list[Case] = []

    def out(name: str) -> str:
        return str(tmp / "outputs" / name)

    # sample stores
    for how in ("truncate", "flip", "flip-data", "empty", "text"):
        bad = _damaged(f["samples"], tmp / f"samples-{how}.h5", how)
        cases.append(
            Case(
                "sample store",
                f"{how} file -> reweight",
                ["reweight", str(bad), "--system", "dw4", "-o", out(f"rw-{how}")],
                output=out(f"rw-{how}"),
                exact=lambda bad=bad: _same_samples(f["samples"], bad),
            )
        )
    part = tmp / "samples-partial.h5"
    cases += [
        Case(
            "sample store",
            "interrupted writer -> reweight",
            ["reweight", str(part), "--system", "dw4", "-o", out("rw-partial")],
            expect="refused",
            must_say="partial",
            output=out("rw-partial"),
            prepare=lambda: _partial_samples(part),
        ),
        Case(
            "sample store",
            "interrupted writer -> reweight --allow-partial",
            [
                "reweight",
                str(part),
                "--system",
                "dw4",
                "-o",
                out("rw-partial-ok"),
                "--allow-partial",
            ],
            expect="recovered",
            must_say="100",
        ),
        Case(
            "sample store",
            "missing file -> reweight",
            ["reweight", str(tmp / "nope.h5"), "--system", "dw4", "-o", out("rw-missing")],
            output=out("rw-missing"),
        ),
    ]
    # datasets and arrays
    for how in ("truncate", "flip", "flip-data", "empty"):
        bad = _damaged(f["data"], tmp / f"data-{how}.h5", how)
        cases.append(Case("dataset", f"{how} dataset -> data info", ["data", "info", str(bad)]))
        cases.append(
            Case(
                "dataset",
                f"{how} dataset -> train teacher",
                [
                    "train",
                    "teacher",
                    "--data",
                    str(bad),
                    "--config",
                    str(f["config"]),
                    "-o",
                    out(f"tr-{how}"),
                ],
                output=out(f"tr-{how}"),
                exact=lambda bad=bad: _same_positions(f["data"], bad),
            )
        )
    npys = {
        "0-byte .npy": b"",
        "garbage .npy": b"\x93NUMPY garbage that is not an array",
    }
    for what, raw in npys.items():
        p = tmp / f"{what.split()[0]}.npy"
        p.write_bytes(raw)
        cases.append(
            Case(
                "array",
                f"{what} -> energy",
                ["energy", "dw4", str(p), "-o", out(f"e-{p.stem}.npy")],
                output=out(f"e-{p.stem}.npy"),
            )
        )
    arrays = {
        "wrong shape (50, 7)": np.zeros((50, 7)),
        "NaN rows": np.where(np.arange(50)[:, None] % 7 == 0, np.nan, 1.0) * np.ones((50, 8)),
        "empty (0, 8)": np.zeros((0, 8)),
    }
    for what, arr in arrays.items():
        p = tmp / f"arr-{len(cases)}.npy"
        np.save(p, arr)
        cases.append(
            Case(
                "array",
                f"{what} -> energy",
                ["energy", "dw4", str(p), "-o", out(f"e-{p.stem}.npy")],
                output=out(f"e-{p.stem}.npy"),
            )
        )
        cases.append(
            Case(
                "array",
                f"{what} -> train teacher",
                [
                    "train",
                    "teacher",
                    "--data",
                    str(p),
                    "--config",
                    str(f["config"]),
                    "-o",
                    out(f"tr-{p.stem}"),
                ],
                output=out(f"tr-{p.stem}"),
            )
        )
    # checkpoints
    for how in ("truncate", "flip", "empty"):
        bad = _damaged(ckpt, tmp / f"teacher-{how}.pt", how)
        cases.append(
            Case(
                "checkpoint",
                f"{how} teacher.pt -> sample",
                ["sample", str(bad), "-n", "10", "-o", out(f"s-{how}.h5")],
                output=out(f"s-{how}.h5"),
            )
        )
    cases.append(
        Case(
            "checkpoint",
            "a dataset given as the model -> sample",
            ["sample", d, "-n", "10", "-o", out("s-dataset.h5")],
            output=out("s-dataset.h5"),
        )
    )
    # output paths (every command with -o)
    for where, path in (("under a file", under), ("an existing folder", folder)):
        for name, argv in (
            ("energy", ["energy", "dw4", str(f["npy"]), "-o", path]),
            ("data generate", ["data", "generate", "dw4", "-n", "50", "-o", path]),
            ("sample", ["sample", t, "-n", "10", "-o", path]),
        ):
            cases.append(Case("output path", f"{name} -o {where}", argv))
    for name, argv in (
        ("train teacher", ["train", "teacher", "--data", d, "--config", str(f["config"]), "-o"]),
        ("distill", ["distill", t, "--method", "euler", "-o"]),
        ("reweight", ["reweight", s, "--system", "dw4", "-o"]),
    ):
        cases.append(Case("output path", f"{name} -o under a file", [*argv, under]))
    # numbers
    cfg = str(f["config"])
    for what, argv in (
        ("train --steps 0", ["train", "teacher", "--data", d, "--config", cfg, "--steps", "0"]),
        ("train --steps -3", ["train", "teacher", "--data", d, "--config", cfg, "--steps", "-3"]),
        ("distill --train-steps 0", ["distill", t, "--method", "f2d2", "--train-steps", "0"]),
        ("sample -n 0", ["sample", t, "-n", "0"]),
        ("sample --batch-size 0", ["sample", t, "-n", "5", "--batch-size", "0"]),
        (
            "sample --atol 0 --rtol 0",
            ["sample", t, "-n", "5", "--method", "dopri5", "--atol", "0", "--rtol", "0"],
        ),
        ("sample --atol -1", ["sample", t, "-n", "5", "--method", "dopri5", "--atol", "-1"]),
        ("data generate --chains 0", ["data", "generate", "dw4", "-n", "5", "--chains", "0"]),
        ("data generate -n 0", ["data", "generate", "dw4", "-n", "0"]),
        ("nll -n 0", ["nll", t, "--data", d, "-n", "0"]),
        ("reweight --level 1.5", ["reweight", s, "--system", "dw4", "--level", "1.5"]),
        ("reweight --clip -0.1", ["reweight", s, "--system", "dw4", "--clip", "-0.1"]),
    ):
        name = what.split()[0].replace("-", "_")
        o = out(f"n-{len(cases)}-{name}")
        if "-o" not in argv and what.split()[0] not in ("nll",):
            argv = [*argv, "-o", o]
        cases.append(Case("number", what, argv, output=o))
    # names and workflow files
    bad_toml = tmp / "bad.toml"
    bad_toml.write_text('name = "x"\nsystem = "dw4"\n[data\n')
    unknown_key = tmp / "unknown.toml"
    unknown_key.write_text(
        Path(__file__).with_name("quickstart.toml").read_text() + "\nnot_a_key = 3\n"
    )
    cases += [
        Case(
            "name",
            "unknown system -> energy",
            ["energy", "dw5", str(f["npy"]), "-o", out("e-unknown.npy")],
            output=out("e-unknown.npy"),
        ),
        Case("workflow", "TOML syntax error -> run --check", ["run", str(bad_toml), "--check"]),
        Case(
            "workflow",
            "unknown key -> run --check",
            ["run", str(unknown_key), "--check"],
            must_say="not_a_key",
        ),
    ]
    return cases


def _command(argv: list[str]) -> str:
    """The command line with temporary paths shortened to their file names."""
    return "boltzflow " + " ".join(a if len(a) < 40 else "…/" + Path(a).name for a in argv)


def run_cases(cases: list[Case]) -> list[Outcome]:
    results = []
    for case in cases:
        if case.prepare is not None:
            case.prepare()
        start = time.perf_counter()
        code, stderr, tb = _run(case.argv)
        outcome, message = classify(case, code, stderr, tb)
        results.append(
            Outcome(
                case.kind,
                case.what,
                "boltzflow "
                + " ".join(a if len(a) < 40 else "…/" + Path(a).name for a in case.argv),
                case.expect,
                outcome,
                code,
                message[:200],
                round(time.perf_counter() - start, 2),
            )
        )
    return results


def markdown(results: list[Outcome]) -> str:
    lines = ["| kind | bad input | expected | outcome | message |", "|---|---|---|---|---|"]
    for r in results:
        msg = r.message.replace("|", "\\|")
        lines.append(f"| {r.kind} | {r.what} | {r.expect} | {r.outcome} | {msg} |")
    counts: dict[str, int] = {}
    for r in results:
        counts[r.outcome] = counts.get(r.outcome, 0) + 1
    summary = ", ".join(f"{k}: {v}" for k, v in sorted(counts.items()))
    return "\n".join(lines) + f"\n\n{len(results)} cases. {summary}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", default="runs/reliability", help="result folder")
    parser.add_argument("--keep", action="store_true", help="keep the temporary fixtures")
    args = parser.parse_args(argv)
    os.environ.setdefault("BOLTZFLOW_QUIET", "1")
    tmp = Path(tempfile.mkdtemp(prefix="boltzflow-reliability-"))
    try:
        start = time.perf_counter()
        fixtures = make_fixtures(tmp)
        (tmp / "outputs").mkdir()
        results = run_cases(build_cases(fixtures, tmp))
        seconds = time.perf_counter() - start
    finally:
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
    table = markdown(results)
    print(table)
    out = Path(args.output)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"seconds": round(seconds, 1), "cases": [asdict(r) for r in results]}
    (out / "reliability.json").write_text(json.dumps(payload, indent=2) + "\n")
    (out / "reliability.md").write_text(table)
    bad = [
        r for r in results if r.outcome in ("SILENT", "TRACEBACK", "LEFT BEHIND", "unclear error")
    ]
    print(
        f"{len(bad)} of {len(results)} cases silently wrong, a traceback or left files behind "
        f"({seconds:.0f} s)",
        file=sys.stderr,
    )
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
