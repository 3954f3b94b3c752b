"""workflows/aldp_internal.toml: its settings, and the `smoke` profile end to end (seeded MD with
whole held-out segments -> internal-coordinate teacher, F2D2 and FALCON students and NF ->
samples -> report with the molecular section) followed by workflows/aldp_free_energy.py and
`boltzflow benchmark` (with its molecular columns and F(φ) figure) on the same run."""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest

from boltzflow.cli import main
from boltzflow.data import read_dataset
from boltzflow.distill.nf_internal_train import ICNFRunConfig
from boltzflow.workflow import load_workflow
from boltzflow.workflow.stages import build_stages

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / "workflows" / "aldp_internal.toml"
#: ΔF of the shipped umbrella/MBAR reference (kT), as its file states it
REFERENCE_DF = json.loads((ROOT / "workflows/reference/aldp_umbrella_profile.json").read_text())[
    "delta_f_kT"
]


def _script(name: str = "aldp_free_energy"):
    """The module of ``workflows/<name>.py``."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "workflows" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


@pytest.mark.parametrize("profile", [None, "smoke"])
def test_settings_reference_the_shared_configs(profile):
    wf = load_workflow(WORKFLOW, profile=profile)
    assert wf.system == "aldp" and wf.output == Path("runs/aldp_internal")
    assert wf.data.method == "md_seeded" and wf.data.holdout == "segments"
    assert wf.teacher.source == ROOT / "workflows/configs/teacher_aldp_internal.toml"
    assert wf.teacher.config.model.representation == "internal"
    nf = wf.students["nf"]
    assert nf.method == "nf_internal" and isinstance(nf.config, ICNFRunConfig)
    assert nf.source == ROOT / "workflows/configs/nf_aldp_internal.toml"
    assert wf.report.reference_profile == ROOT / "workflows/reference/aldp_umbrella_profile.json"
    assert wf.proposal_label == "nf"
    (fe,) = wf.estimates.free_energies
    assert fe["a"] == [{"feature": "phi", "min": 0.0, "max": 2.0}] and fe["b"] == "complement"
    for name in ("f2d2", "falcon"):
        st = wf.students[name]
        assert st.method == name
        assert st.source == ROOT / f"workflows/configs/student_{name}_aldp_internal.toml"
    assert wf.benchmark.baselines and wf.benchmark.steps == ((1, 4) if profile else (1, 2, 4, 8))
    deps = {s.name: s.deps for s in build_stages(wf)}
    assert deps["student-nf"] == ("data",)  # the NF learns from the frames, not the teacher
    # F2D2 and FALCON share one trajectory cache (same [trajectories] settings)
    (traj,) = {d for d in deps["student-f2d2"] if d.startswith("trajectories")}
    assert deps["student-falcon"] == ("teacher", traj)
    if profile is None:  # the data of docs/benchmarks.md: 60 segments, 6 held out
        assert wf.data.n_train + wf.data.n_reference == 300_000
        assert wf.data.settings["n_seeds"] == 60 and wf.sample.n == 10_000
        assert nf.config.model.hidden == 128  # profile `ship` of the NF config
        assert wf.sample.steps == (1, 2, 4, 8)
        assert wf.students["f2d2"].config.train.steps == 20_000
        assert wf.students["falcon"].config.train.steps == 12_000


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """The `smoke` profile run by workflows/aldp_free_energy.py (which runs the workflow first):
    the output folder, the script's results and what it printed."""
    out = tmp_path_factory.mktemp("aldp_internal") / "run"
    argv = ["--workflow", str(WORKFLOW), "--profile", "smoke", "--output-run", str(out)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        results = _script().main([*argv, "-n", "32", "--n-bootstrap", "20", "--md-blocks", "3"])
    return out, results, printed.getvalue()


def test_smoke_profile_end_to_end_and_free_energy_script(smoke):
    out, results, text = smoke

    # data: 300 frames in 5 segments, the held-out frames are one whole segment
    ref = read_dataset(out / "data/reference.h5")
    train = read_dataset(out / "data/train.h5")
    split = ref.attrs["provenance"]["split"]
    counts = split["frames_per_seed"]
    assert len(ref.positions) == sum(counts[i] for i in split["heldout_segments"]) > 0
    assert len(ref.positions) + len(train.positions) == 300 == sum(counts)
    assert ref.attrs["provenance"]["boltzmann_across_basins"] is False
    assert not list((out / "data/md_seeded").glob("seed-*.npz"))  # segments cleaned up

    report = json.loads((out / "report.json").read_text())
    rows = {r["label"]: r for r in report["models"]}
    assert list(rows) == ["teacher", "f2d2-K1", "f2d2-K4", "falcon-K1", "falcon-K4", "nf"]
    for label, row in rows.items():
        assert row["N"] == 64 and 0 < row["ESS/N"] <= 1, label
        for key in (
            "energy W2 reweighted (kT)",
            "torus W2 (φ, ψ) proposal (rad)",
            "torus W2 (φ, ψ) reweighted (rad)",
            "D-form fraction (proposal)",
        ):
            assert _finite(row[key]), (label, key)
        phi = row["φ"]
        assert phi["region"] == [0.0, 2.0]
        delta = phi["ΔF"]
        if "undefined" in delta:  # a state without weight is said, not hidden
            assert "zero weight" in delta["undefined"]
        else:
            d = delta["delta"]
            assert _finite(d["value"]) and _finite(d["ci_low"]) and _finite(d["ci_high"])
            assert _finite(phi["ΔF - reference"]["difference"])
        assert len(phi["profile"]["edges"][0]) == 37  # the reference's 36 bins
    mol = report["molecular"]
    assert mol["reference"]["label"] == "umbrella/MBAR reference"
    assert mol["reference"]["delta_f"]["value"] == pytest.approx(REFERENCE_DF)
    assert mol["held-out frames"]["boltzmann across basins"] is False
    for name in (
        "F(φ): reweighted models vs reference",
        "Ramachandran: held-out MD, teacher, reweighted",
        "Ramachandran: held-out MD, falcon-K4, reweighted",
        "Ramachandran: held-out MD, nf, reweighted",
    ):
        path = out / report["plots"][name]
        assert path.is_file() and path.read_bytes()[:4] == b"\x89PNG", name
    md = (out / "report.md").read_text()
    assert "## Molecule: (φ, ψ), chirality and free energy along φ" in md
    n_reference = json.loads((ROOT / "workflows/reference/aldp_umbrella_profile.json").read_text())[
        "n_decorrelated"
    ]
    assert f"| umbrella/MBAR reference | {n_reference} |" in md
    assert "torus W2 (φ, ψ) (rad)" in md and "seeded MD" in md

    # the free-energy script on the NF (internal coordinates: no mirroring)
    assert results["student"] == "nf" and results["steps"] is None and results["n"] == 32
    assert results["representation"] == "internal"
    assert results["D-form fraction mirrored to L"] == 0.0
    assert 0 <= results["D-form fraction"] <= 1 and 0 < results["ESS/N"] <= 1
    assert results["ΔF reference"].value == pytest.approx(REFERENCE_DF)
    assert results["MD Boltzmann across basins"] is False
    assert "student - reference" in results
    saved = json.loads((out / "free_energy/free_energy.json").read_text())
    assert saved["profile φ, student"]["n"] == 32
    assert np.allclose(
        saved["profile φ, student"]["edges"][0][::12],
        [-math.pi, -math.pi / 3, math.pi / 3, math.pi],
    )
    assert "ALDP free energies: nf" in text and "not mirrored" in text
    assert (out / "free_energy/profile_phi.png").is_file()


@pytest.fixture(scope="module")
def benchmarked(smoke):
    """``boltzflow benchmark`` on the smoke run (the output folder; what it printed)."""
    out, _, _ = smoke
    args = ["benchmark", "--workflow", str(WORKFLOW), "--profile", "smoke", "-o", str(out)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert main([*args, "--no-progress"]) == 0
    return out, printed.getvalue()


def test_benchmark_command_adds_the_molecular_columns(benchmarked):
    out, printed = benchmarked
    # only the benchmark's own stage runs
    lines = {ln.split()[0]: ln for ln in printed.splitlines() if ln.strip()}
    assert "ran" in lines["benchmark"] and "skipped" in lines["student-falcon"]
    bench = json.loads((out / "benchmark.json").read_text())
    models = [(r["model"], r["steps"]) for r in bench["rows"]]
    euler = ["euler (Euler-rule log q)", "euler (exact step log-det)"]
    assert models == [
        ("teacher", "dopri5"),
        *[(m, k) for m in ("f2d2", "falcon") for k in (1, 4)],
        ("nf", "-"),
        *[(m, k) for m in euler for k in (1, 4)],
    ]
    reference = bench["molecular"]["reference"]["delta_f"]
    for r in bench["rows"]:
        label = (r["model"], r["steps"])
        assert r["n"] == 64 and 0 < r["ess_fraction"] <= 1, label
        assert r["torus_w2"] is None or 0 <= r["torus_w2"] <= math.pi * math.sqrt(2), label
        delta = r["delta_f"]
        if "undefined" in delta:  # a state without weight is said, not hidden
            assert (
                "zero weight" in delta["undefined"]
                and r["delta_f_vs_reference"]["difference"] is None
            )
            continue
        d, cmp = delta["delta"], r["delta_f_vs_reference"]
        assert d["ci_low"] <= d["value"] <= d["ci_high"], label
        # ΔF − reference with the combined standard error of the two estimates
        assert cmp["difference"] == pytest.approx(d["value"] - reference["value"])
        assert cmp["stderr"] == pytest.approx(math.hypot(d["stderr"], reference["stderr"]))
    assert _finite(bench["rows"][0]["torus_w2"])  # the teacher's weights are finite
    # F(φ) of the teacher and every K = 4 row (and the one-pass NF) against the reference
    drawn = set(bench["molecular"]["profiles"])
    assert drawn <= {"teacher", "f2d2 K=4", "falcon K=4", "nf", *(f"{m} K=4" for m in euler)}
    assert {"teacher", "f2d2 K=4", "falcon K=4", "nf"} <= drawn
    for prof in bench["molecular"]["profiles"].values():
        assert len(prof["edges"][0]) == 37  # on the reference's bins
    figure = out / bench["molecular"]["plot"]
    assert figure.is_file() and figure.read_bytes()[:4] == b"\x89PNG"
    md = (out / "benchmark.md").read_text()
    assert "| torus W2 rw (rad) | ΔF (kT) [CI] | ΔF − ref (kT) |" in md
    assert "umbrella/MBAR reference" in md and "seeded MD" in md
    assert f"]({figure.name})" in md
    assert all(ln.count("|") == 17 for ln in md.splitlines() if ln.startswith("| "))


def test_benchmark_script_gives_the_same_molecular_rows(benchmarked, tmp_path):
    """workflows/benchmark_students.py on the same runs, seed and sizes: the shared functions
    give its rows the workflow benchmark's molecular columns, here for the same samples."""
    out, _ = benchmarked
    script = _script("benchmark_students")
    report = script.main(
        [
            "--teacher",
            str(out / "teacher"),
            *[f"--student={m}={out / 'students' / m}" for m in ("f2d2", "falcon", "nf")],
            f"--reference={out / 'data/reference.h5'}",
            "--reference-profile",
            str(ROOT / "workflows/reference/aldp_umbrella_profile.json"),
            *["--steps", "1", "4", "--n", "64", "--batch", "64", "--n-val", "16"],
            *["--n-check", "8", "--ess-seeds", "0", "--seed", "1"],
            f"--json={tmp_path / 'bench.json'}",
        ]
    )
    saved = json.loads((tmp_path / "bench.json").read_text())
    workflow = {
        (r["model"], r["steps"]): r
        for r in json.loads((out / "benchmark.json").read_text())["rows"]
    }
    rows = {(r["model"], r["steps"]): r for r in saved["rows"]}
    assert set(rows) == set(workflow)
    for key in [("f2d2", 1), ("f2d2", 4), ("falcon", 4), ("nf", "-")]:  # same model, seed, N
        a, b = rows[key], workflow[key]
        assert a["ess_fraction"] == pytest.approx(b["ess_fraction"]), key
        assert a["torus_w2"] == pytest.approx(b["torus_w2"]), key
        for entry, fields in (
            ("delta_f", ("value", "stderr", "ci_low", "ci_high")),
            ("delta_f_vs_reference", ("difference", "stderr", "z")),
        ):
            ours, theirs = a[entry].get("delta", a[entry]), b[entry].get("delta", b[entry])
            for f in fields:
                assert ours[f] == pytest.approx(theirs[f]), (key, entry, f)
    assert "| torus W2 rw (rad) | ΔF (kT) [CI] | ΔF − ref (kT) |" in report["table_markdown"]
    assert "--reference frames are seeded MD" in saved["molecular"]["note"]
    assert {"teacher", "f2d2 K=4", "falcon K=4", "nf"} <= set(saved["molecular"]["profiles"])
    figure = Path(saved["molecular"]["plot"])
    assert figure == tmp_path / "bench_profile_phi.png" and figure.read_bytes()[:4] == b"\x89PNG"


def test_benchmark_script_names_a_missing_reference_profile(tmp_path):
    script = _script("benchmark_students")
    with pytest.raises(
        SystemExit, match=r"--reference-profile: reference profile not found: .*absent.json"
    ):
        script.main(["--reference-profile", str(tmp_path / "absent.json")])
