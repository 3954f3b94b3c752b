"""workflows/aldp_internal.toml: its settings, and the `smoke` profile end to end (seeded MD with
whole held-out segments -> internal-coordinate teacher, F2D2 and FALCON students and NF ->
samples -> report with the molecular section) followed by workflows/aldp_free_energy.py and
`boltzflow benchmark` (with its molecular columns and F(φ) figure) on the same run."""

from __future__ import annotations

import contextlib
import dataclasses
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
from boltzflow.io.samples import read_samples
from boltzflow.sampling.latent import LatentSMCOptions
from boltzflow.workflow import load_workflow
from boltzflow.workflow.layout import sample_plan
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


@pytest.mark.parametrize("profile", [None, "smoke"])
def test_smc_table_resolves_and_keys_its_stage(profile):
    """[smc]: the F2D2 student at 4 steps with the sampling's N and seed (the same first draws
    as its f2d2-K4 samples), the settings of workflows/aldp_smc.py; a stage after the student
    keyed by the resolved table, and a row of the report."""
    wf = load_workflow(WORKFLOW, profile=profile)
    smc = wf.smc
    assert (smc.student, smc.steps, smc.n, smc.seed) == ("f2d2", 4, wf.sample.n, wf.seed + 1)
    assert smc.options_dict() == {
        **dataclasses.asdict(LatentSMCOptions()),
        **({"n_temperatures": 3, "n_kernel_steps": 1} if profile else {}),
    }
    stages = {s.name: s for s in build_stages(wf)}
    stage = stages["smc"]
    assert stage.deps == ("student-f2d2",) and stage.outputs == ("samples/f2d2-K4-smc.h5",)
    assert stage.config["smc"] == dataclasses.asdict(smc) and stage.config["device"] == "cpu"
    assert "smc" in stages["report"].deps
    assert sample_plan(wf)["f2d2+smc"] == [("f2d2-K4-smc", 4)]
    changed = load_workflow(WORKFLOW, profile=profile, overrides={"smc.step_size": 0.1})
    assert {s.name: s for s in build_stages(changed)}["smc"].config != stage.config


@pytest.mark.parametrize(
    ("overrides", "error", "match"),
    [
        ({"smc.student": "teacher"}, ValueError, r"smc\.student: 'teacher' is not a student"),
        ({"smc.kernel": "gibbs"}, ValueError, r"smc\.kernel: 'gibbs' is not one of"),
        ({"smc.adaptive_ess": 1.0}, ValueError, r"smc\.adaptive_ess must be a number in \(0, 1\)"),
        ({"smc.n": 0}, ValueError, r"smc\.n must be a positive integer"),
        ({"smc.steps": -4}, ValueError, r"smc\.steps must be a positive integer"),
        ({"smc.n_kernel_steps": -1}, ValueError, r"smc\.n_kernel_steps must be an integer >= 0"),
        ({"smc.step_size": 0.0}, ValueError, r"smc\.step_size must be a positive number"),
        ({"smc.resample_threshold": 2.0}, ValueError, r"smc\.resample_threshold must be"),
        ({"smc.batch_size": 0}, ValueError, r"smc\.batch_size must be a positive integer"),
        ({"smc.seed": -1}, ValueError, r"smc\.seed must be an integer >= 0"),
        ({"smc.n_temperatures": 2.5}, TypeError, r"smc\.n_temperatures"),
        ({"smc.kernel": 1}, TypeError, r"smc\.kernel"),
        ({"smc.stepsize": 0.1}, ValueError, r"smc: unknown key 'stepsize'"),
        ({"smc.student": "nf", "smc.steps": 4}, ValueError, r"smc\.steps: not used for a one-pass"),
    ],
)
def test_smc_table_rejects_bad_values(overrides, error, match):
    with pytest.raises(error, match=rf"aldp_internal\.toml: .*{match}"):
        load_workflow(WORKFLOW, profile="smoke", overrides=overrides)


def _edited_copy(tmp_path: Path, edits: list[tuple[str, str]]) -> Path:
    """workflows/aldp_internal.toml with ``(old, new)`` text edits, written to ``tmp_path`` (its
    config and reference paths made absolute)."""
    text = WORKFLOW.read_text()
    for old, new in edits:
        assert old in text, old
        text = text.replace(old, new)
    text = text.replace('"configs/', f'"{ROOT}/workflows/configs/')
    text = text.replace('"reference/', f'"{ROOT}/workflows/reference/')
    path = tmp_path / "aldp_internal.toml"
    path.write_text(text)
    return path


def test_smc_table_needs_its_student(tmp_path):
    path = _edited_copy(tmp_path, [('student = "f2d2"\n', "")])
    with pytest.raises(
        ValueError, match=r"aldp_internal\.toml: smc: missing required key 'student'"
    ):
        load_workflow(path, profile="smoke")


def test_smc_samples_may_not_take_a_students_file(tmp_path):
    """A one-pass student named like the SMC samples of another would share their file."""
    path = _edited_copy(
        tmp_path,
        [
            ("[students.nf]", '[students."f2d2-K4-smc"]'),
            ("[profiles.smoke.students.nf]", '[profiles.smoke.students."f2d2-K4-smc"]'),
            ('proposal = "nf"', 'proposal = "f2d2"'),
        ],
    )
    with pytest.raises(ValueError, match=r"smc: its samples' name 'f2d2-K4-smc' is that of"):
        load_workflow(path, profile="smoke")


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
    assert list(rows) == [
        "teacher",
        "f2d2-K1",
        "f2d2-K4",
        "falcon-K1",
        "falcon-K4",
        "nf",
        "f2d2-K4-smc",
    ]
    for label, row in rows.items():
        # (SMC resampled at its last step: equal weights, ESS/N 1 up to rounding)
        assert row["N"] == 64 and 0 < row["ESS/N"] <= 1 + 1e-12, label
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


def test_smoke_profile_smc_stage_is_a_row_beside_the_plain_student(smoke):
    """The [smc] stage (3 temperatures of one MALA move): a sample store in the convention of
    the plain ones, started from the f2d2-K4 samples' own draws, and a report row with its
    evaluations per sample, clustered ΔF interval and the SMC's log Z, in the F(φ) figure."""
    out, _, _ = smoke
    s = read_samples(out / "samples/f2d2-K4-smc.h5")
    plain = read_samples(out / "samples/f2d2-K4.h5")
    prov = s.provenance
    assert s.n == 64 and s.dim == plain.dim == 66
    assert (prov["model"], prov["student"], prov["steps"]) == ("f2d2+smc", "f2d2", 4)
    assert prov["seed"] == plain.provenance["seed"] and prov["energy"]["backend"] == "torch"
    np.testing.assert_allclose(s.log_q, -s.u - s.log_w, rtol=0, atol=1e-9)
    assert np.isfinite(s.u).all() and np.isfinite(s.log_w).all()
    eve = s.columns["eve"]
    assert eve.dtype == np.int64 and 0 <= eve.min() and eve.max() < 64
    assert len(np.unique(eve)) == prov["smc"]["eves"]
    # 1 + 3 temperatures x 1 move; each runs the student's 4 steps, plus the final decode
    assert prov["energy_evaluations_per_sample"] == prov["force_evaluations_per_sample"] == 4
    assert prov["nfe_per_sample"] == 4 * 5 and prov["smc"]["temperatures"] == 3
    # the first particles are the plain student's samples: their ESS/N is the plain row's
    report = json.loads((out / "report.json").read_text())
    rows = {r["label"]: r for r in report["models"]}
    row, plain_row = rows["f2d2-K4-smc"], rows["f2d2-K4"]
    assert prov["smc"]["initial ESS/N"] == pytest.approx(plain_row["ESS/N"], rel=1e-4)
    assert row["model"] == "f2d2+smc" and row["steps"] == 4 and row["log q"] == "SMC weights"
    assert row["energy evaluations per sample"] == row["force evaluations per sample"] == 4
    assert (
        plain_row["energy evaluations per sample"],
        plain_row["force evaluations per sample"],
    ) == (1, 0)
    assert set(row["estimates"]["log Z"]) == {"smc"}
    assert row["estimates"]["log Z"]["smc"]["value"] == pytest.approx(prov["smc"]["log Z"]["value"])
    for entry in (row["φ"]["ΔF"], row["estimates"]["ΔF 0 < φ < 2 vs rest"]):
        if "undefined" not in entry:  # grouped by initial ancestor: the delta method alone
            assert set(entry) == {"delta"} and entry["delta"]["method"] == "delta-clustered"
    md = (out / "report.md").read_text()
    assert "| energy evals/sample | force evals/sample |" in md
    assert "| f2d2-K4-smc | 4 | SMC weights | 20.0 |" in md
    assert "f2d2-K4-smc: latent SMC of f2d2 (3 temperatures" in md
    assert "| f2d2-K4-smc | 64 |" in md  # the molecular table
    assert "Ramachandran: held-out MD, f2d2-K4-smc, reweighted" in report["plots"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert "smc" in manifest["stages"]


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
    assert saved["complete"] is True
    exact = rows[("f2d2", 4)]  # --ess-steps: the head against the exact log-det, same samples
    assert 0 < exact["ess_fraction_exact_logdet"] <= 1 and exact["logq_head_minus_exact_sd"] > 0
    assert "with the exact log-det" in report["table_markdown"]
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


def test_benchmark_script_keeps_the_rows_of_an_interrupted_run(benchmarked, tmp_path, monkeypatch):
    """The JSON is rewritten after every row: a run stopped at the 4-step row keeps the
    teacher's and the 1-step row, marked incomplete."""
    out, _ = benchmarked
    script = _script("benchmark_students")
    evaluate = script._evaluate

    def stop_at_four_steps(name, model, steps, **kw):
        if steps == 4:
            raise KeyboardInterrupt
        return evaluate(name, model, steps, **kw)

    monkeypatch.setattr(script, "_evaluate", stop_at_four_steps)
    argv = [
        *["--teacher", str(out / "teacher"), f"--student=f2d2={out / 'students' / 'f2d2'}"],
        *[f"--reference={out / 'data/reference.h5'}", "--steps", "1", "4", "--n", "32"],
        *["--batch", "32", "--n-val", "8", "--n-check", "4", "--ess-seeds", "0"],
        *["--no-baselines", f"--json={tmp_path / 'bench.json'}"],
    ]
    with pytest.raises(KeyboardInterrupt):
        script.main(argv)
    saved = json.loads((tmp_path / "bench.json").read_text())
    assert saved["complete"] is False
    assert [(r["model"], r["steps"]) for r in saved["rows"]][1:] == [("f2d2", 1)]
    assert saved["rows"][0]["model"] == "teacher" and _finite(saved["rows"][0]["ess_fraction"])


def test_benchmark_script_names_a_missing_reference_profile(tmp_path):
    script = _script("benchmark_students")
    with pytest.raises(
        SystemExit, match=r"--reference-profile: reference profile not found: .*absent.json"
    ):
        script.main(["--reference-profile", str(tmp_path / "absent.json")])
