"""The quickstart workflow end to end at tiny size: outputs, report contents, caching across runs,
re-running only what depends on a deleted output, the benchmark command and the demo."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from quickstart_tiny import TINY, set_args

from boltzflow.cli import main
from boltzflow.io.samples import read_samples
from boltzflow.sampling.weights import ess_fraction
from boltzflow.systems import load_system
from boltzflow.workflow import load_workflow, run_workflow
from boltzflow.workflow.cache import MANIFEST_FILE

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "workflows" / "quickstart.toml"

STAGES = {
    "data",
    "teacher",
    "student-f2d2",
    "student-falcon",
    "sample-teacher",
    "sample-f2d2",
    "sample-falcon",
    "report",
}


def _run(out, **overrides):
    wf = load_workflow(QUICKSTART, overrides={**TINY, **overrides}, output=out)
    return run_workflow(wf, progress=False, log=lambda msg: None)


def _ran(run):
    return {
        r.name.split("-")[0] if r.name.startswith("trajectories") else r.name
        for r in run.results
        if r.status == "ran"
    }


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("quickstart") / "run"
    return out, _run(out)


def _copy(tiny_run, tmp_path):
    src, _ = tiny_run
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_outputs_and_report_contents(tiny_run):
    out, run = tiny_run
    assert _ran(run) == STAGES | {"trajectories"}
    trajectories = [r for r in run.results if r.name.startswith("trajectories")]
    assert len(trajectories) == 1  # F2D2 and FALCON share the teacher trajectories
    for name in (
        "report.md",
        "report.json",
        "samples.h5",
        "analysis/energy_histograms.png",
        "analysis/ess_by_model.png",
        "data/train.h5",
        "data/reference.h5",
    ):
        assert (out / name).is_file(), name
    assert run.outputs["report.md"] == out / "report.md"
    report = json.loads((out / "report.json").read_text())
    labels = [r["label"] for r in report["models"]]
    assert labels == ["teacher", "f2d2-K1", "f2d2-K2", "falcon-K1", "falcon-K2"]
    with load_system("dw4") as dw4:
        for row in report["models"]:
            s = read_samples(out / "samples" / f"{row['label']}.h5")
            assert s.n == row["N"] == 48
            # stored columns are the convention log w = -u - log q with u recomputed here
            u = dw4.energy(torch.as_tensor(s.x)).detach().numpy()
            np.testing.assert_allclose(s.u, u, rtol=1e-12)
            np.testing.assert_allclose(s.log_w, -s.u - s.log_q, rtol=1e-12)
            assert row["ESS/N"] == pytest.approx(ess_fraction(torch.as_tensor(s.log_w)), rel=1e-12)
            assert 0 < row["ESS/N"] <= 1
            assert row["NFE/sample"] >= 1 and row["sample seconds"] > 0
            assert row["energy W2 reweighted (kT)"] >= 0
            lz = row["estimates"]["log Z"]["delta"]
            assert lz["ci_low"] <= lz["value"] <= lz["ci_high"]
            fe = row["estimates"]["ΔF d01 < 4 vs d01 >= 4"]
            if "delta" in fe:  # a tiny untrained model may put no weight in one state
                assert fe["delta"]["ci_low"] <= fe["delta"]["value"] <= fe["delta"]["ci_high"]
            else:
                assert "zero weight" in fe["undefined"]
    assert report["models"][1]["steps"] == 1 and report["models"][0]["steps"] == "dopri5"
    assert report["reference"]["N"] == 32
    md = (out / "report.md").read_text()
    for text in (
        "## Teacher vs students",
        "NFE/sample",
        "ESS/N",
        "E-W2",
        "ΔF d01 < 4",
        "| falcon-K2 |",
        "reference data",
        "![ESS vs N](analysis/ess_vs_n.png)",
    ):
        assert text in md, text
    primary = read_samples(out / "samples.h5")
    np.testing.assert_array_equal(primary.x, read_samples(out / "samples/f2d2-K2.h5").x)
    assert (out / "samples.h5").stat().st_size > 0


def test_second_run_skips_everything(tiny_run):
    out, _ = tiny_run
    before = (out / MANIFEST_FILE).read_text()
    run = _run(out)
    assert {r.status for r in run.results} == {"cached"}
    assert (out / MANIFEST_FILE).read_text() == before


def test_deleting_an_output_reruns_only_what_depends_on_it(tiny_run, tmp_path):
    out = _copy(tiny_run, tmp_path)
    (out / "samples" / "falcon-K1.h5").unlink()
    # regenerated bit-identically (CPU, fixed seed), so the report need not run again
    assert _ran(_run(out)) == {"sample-falcon"}
    (out / "report.md").unlink()
    assert _ran(_run(out)) == {"report"}
    (out / "teacher" / "teacher.pt").unlink()
    # the teacher resumes from its finished training checkpoint: same weights, nothing else runs
    assert _ran(_run(out)) == {"teacher"}
    (out / "data" / "train.h5").unlink()
    # regenerated with the same seed: same content (fingerprints ignore the timestamps)
    assert _ran(_run(out)) == {"data"}
    run = _run(out, **{"sample.n": 40})  # a changed setting re-runs what it affects
    assert _ran(run) == {"sample-teacher", "sample-f2d2", "sample-falcon", "report"}
    run = _run(out, **{"sample.n": 40, "students.f2d2.train.lr": 1e-3})
    assert _ran(run) == {"student-f2d2", "sample-f2d2", "report"}


def test_benchmark_command_reuses_the_cached_stages(tiny_run, tmp_path, capsys):
    out = _copy(tiny_run, tmp_path)
    code = main(
        [
            "benchmark",
            "--workflow",
            str(QUICKSTART),
            "-o",
            str(out),
            "--no-progress",
            *set_args(TINY),
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    bench = json.loads((out / "benchmark.json").read_text())
    models = [(r["model"], r["steps"]) for r in bench["rows"]]
    assert models == [
        ("teacher", "dopri5"),
        ("f2d2", 1),
        ("falcon", 1),
        ("euler (Euler-rule log q)", 1),
        ("euler (exact step log-det)", 1),
    ]
    for r in bench["rows"]:
        assert 0 < r["ess_fraction"] <= 1 and math.isfinite(r["nll"]) and r["n"] == 16
    falcon = bench["rows"][2]
    assert falcon["inv_err_median"] >= 0
    assert "| euler (exact step log-det) | 1 |" in (out / "benchmark.md").read_text()
    assert "benchmark.md" in printed and "skipped (cached)" in printed
    lines = {ln.split()[0]: ln for ln in printed.splitlines() if ln.strip()}
    assert "ran" in lines["benchmark"] and "skipped" in lines["teacher"]


def test_demo_prints_where_the_outputs_are(tiny_run, tmp_path, capsys):
    out = _copy(tiny_run, tmp_path)
    argv = ["demo", "-o", str(out), "--no-systems", "--no-models", "--no-progress"]
    code = main([*argv, *set_args(TINY)])
    assert code == 0
    printed = capsys.readouterr().out
    for name in ("report.md", "report.json", "samples.h5"):
        assert f"{out / name}" in printed
    assert f"{out / 'analysis'}/*.png" in printed
    assert "| f2d2-K2 |" in printed


def test_run_command_prints_stage_table_and_comparison(tiny_run, tmp_path, capsys):
    out = _copy(tiny_run, tmp_path)
    code = main(
        [
            "run",
            str(QUICKSTART),
            "-o",
            str(out),
            "--no-progress",
            *set_args(TINY),
            "--force",
            "report",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    assert "[8/9] report: running (forced)" in printed or "report: running (forced)" in printed
    assert "data: up to date, skipped" in printed
    assert "| teacher | dopri5 | ODE, exact trace |" in printed
    total = next(ln for ln in printed.splitlines() if ln.startswith("total"))
    assert "1 ran" in total


def test_data_stage_from_an_existing_file(tmp_path):
    from boltzflow.data import read_dataset
    from boltzflow.systems.particles import remove_mean
    from boltzflow.workflow.runner import run_stages
    from boltzflow.workflow.stages import build_stages

    rng = np.random.default_rng(0)
    x = rng.normal(size=(50, 8)) + 3.0  # not mean-free, as the public DW4 files
    np.save(tmp_path / "dw4.npy", x)
    np.save(tmp_path / "dw4_ref.npy", x[:7] - 1.0)
    path = tmp_path / "wf.toml"  # file paths are relative to the workflow file
    text = QUICKSTART.read_text().replace("settings = { burn_in = 1000 }\n", "")
    path.write_text(text.replace("generate = true\n", "", 1))
    out = tmp_path / "out"
    tiny = {k: v for k, v in TINY.items() if k != "data.settings"}

    def run_data(**over):
        wf = load_workflow(path, overrides={**tiny, "data.n_train": 30, **over}, output=out)
        (result,) = run_stages([build_stages(wf)[0]], out, log=lambda m: None)
        return result

    res = run_data(**{"data.file": "dw4.npy", "data.n_reference": 10})
    centred = remove_mean(torch.as_tensor(x), 4, 2).numpy()
    np.testing.assert_allclose(read_dataset(out / "data/train.h5").positions, centred[:30])
    # the last n_reference rows are held out
    np.testing.assert_allclose(read_dataset(out / "data/reference.h5").positions, centred[40:])
    assert res.summary["n_train"] == 30 and res.summary["n_reference"] == 10
    with_ref = {"data.file": "dw4.npy", "data.reference_file": "dw4_ref.npy"}
    assert run_data(**with_ref).status == "ran"
    assert len(read_dataset(out / "data/reference.h5")) == 7
    assert run_data(**with_ref).status == "cached"
    np.save(tmp_path / "dw4_ref.npy", x[:5])  # an input file changed: the stage runs again
    assert run_data(**with_ref).status == "ran"
    assert len(read_dataset(out / "data/reference.h5")) == 5
    with pytest.raises(ValueError, match="n_reference = 50 leaves no training rows"):
        run_data(**{"data.file": "dw4.npy", "data.n_reference": 50})


def test_nf_student_joins_the_comparison(tiny_run, tmp_path):
    out = _copy(tiny_run, tmp_path)
    nf = {
        "method": "nf",
        "model": {"blocks": 1, "couplings_per_block": 1, "hidden": 8, "transform": "affine"},
        "train": {
            "steps": 2,
            "batch_size": 8,
            "warmup_steps": 1,
            "log_every": 1,
            "checkpoint_every": 2,
        },
        "n_pairs": 16,
        "pair_settings": {"atol": 1e-3, "rtol": 1e-3},
    }
    run = _run(out, **{"students.small": nf})
    assert _ran(run) == {"student-small", "sample-small", "report"}  # the rest is cached
    report = json.loads((out / "report.json").read_text())
    row = next(r for r in report["models"] if r["model"] == "small")
    assert row["label"] == "small" and row["steps"] == 1 and row["NFE/sample"] == 1
    assert row["log q"] == "exact (one pass)" and 0 < row["ESS/N"] <= 1


def test_registered_euler_student_joins_the_comparison(tiny_run, tmp_path):
    """A method of the registry the spec has no code for (a K-step Euler baseline): parsed from
    its config dataclass, its stage trains nothing, and it is sampled like any student."""
    out = _copy(tiny_run, tmp_path)
    run = _run(out, **{"students.base": {"method": "euler-exact"}})
    assert _ran(run) == {"student-base", "sample-base", "report"}  # the rest is cached
    result = next(r for r in run.results if r.name == "student-base")
    assert result.status == "ran"
    report = json.loads((out / "report.json").read_text())
    rows = {r["label"]: r for r in report["models"] if r["model"] == "base"}
    assert set(rows) == {"base-K1", "base-K2"}
    assert all(0 < r["ESS/N"] <= 1 for r in rows.values())


@pytest.mark.slow
def test_full_quickstart_within_its_cpu_budget(tmp_path):
    """The shipped quickstart as `make demo` runs it: all outputs, and its CPU time (one thread)
    within the 5-minute budget (wall time on an idle 2-core machine is about the CPU time)."""
    wf = load_workflow(QUICKSTART, output=tmp_path / "qs")
    run = run_workflow(wf, progress=False)
    cpu = sum(r.cpu_seconds for r in run.results)
    wall = sum(r.seconds for r in run.results)
    print(f"quickstart: CPU {cpu:.0f} s, wall {wall:.0f} s")
    assert cpu < 300, f"quickstart used {cpu:.0f} s of CPU (wall {wall:.0f} s)"
    report = json.loads((tmp_path / "qs" / "report.json").read_text())
    assert len(report["models"]) == 7
    assert all(r["ESS/N"] > 0 for r in report["models"])
    for name in ("report.md", "samples.h5", "analysis/energy_histograms.png"):
        assert (tmp_path / "qs" / name).is_file()


@pytest.mark.timeout(200)
def test_one_process_run_is_up_to_date_under_torchrun(tiny_run, tmp_path):
    """The cache keys do not depend on the number of processes: the 1-process run, run again
    by `boltzflow run` on 2 ranks (torchrun, gloo), is up to date stage by stage."""
    from dist_helpers import torchrun

    out = _copy(tiny_run, tmp_path)
    before = (out / MANIFEST_FILE).read_text()
    cli = ROOT / "tests" / "cli" / "torchrun_cli.py"
    args = ["run", str(QUICKSTART), "-o", str(out), "--no-progress", *set_args(TINY)]
    run = torchrun([str(cli), *args])
    assert run.returncode == 0, run.stderr[:8000]
    assert run.stdout.count("up to date, skipped") == len(STAGES) + 1  # + trajectories
    assert "running" not in run.stdout
    assert (out / MANIFEST_FILE).read_text() == before
