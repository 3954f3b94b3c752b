"""Smoke runs of the teacher workflows and CLI (DW4, LJ13, ALDP configs, `smoke` profiles)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from boltzflow.cli import main as cli
from boltzflow.io.samples import read_samples
from boltzflow.sampling.weights import ess_fraction

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "workflows" / "configs"


def _workflow():
    spec = importlib.util.spec_from_file_location(
        "train_dw4_teacher", ROOT / "workflows/train_dw4_teacher.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_dw4_workflow_script_smoke(reference_dir, tmp_path):
    out = tmp_path / "dw4"
    report = _workflow().main(
        [
            "--profile",
            "smoke",
            "-o",
            str(out),
            "--n-samples",
            "64",
            "--n-val",
            "32",
            "--quadrature-check",
            "16",
            "--data",
            str(reference_dir / "dem/train_split_DW4.npy"),
            "--val",
            str(reference_dir / "dem/val_split_DW4.npy"),
            "--samples",
            str(tmp_path / "samples.h5"),
        ]
    )
    saved = json.loads((out / "report.json").read_text())
    samples = read_samples(tmp_path / "samples.h5")
    assert samples.x.shape == (64, 8)
    # the stored weights are the ones the report's ESS came from
    assert ess_fraction(torch.as_tensor(samples.log_w)) == pytest.approx(saved["ess_fraction"])
    assert saved["n_samples"] == 64 and saved["n_val"] == 32
    for key in (
        "ess_fraction",
        "nll",
        "entropy_val",
        "nll_efm",
        "sample_s_per_1000",
        "sample_nfe_per_batch",
        "quadrature_max_abs_dlogq",
    ):
        assert np.isfinite(saved[key]), key
    assert report["nll_efm"] == pytest.approx(report["nll"] - 3 * np.log(2 * np.pi))
    assert (out / "teacher.pt").is_file()


def test_lj13_cli_train_sample_nll_smoke(reference_dir, tmp_path):
    data = np.load(reference_dir / "dem/val_split_LJ13-1000.npy")[:200]
    np.save(tmp_path / "lj13.npy", data)
    run = tmp_path / "run"
    assert (
        cli(
            [
                "train",
                "teacher",
                "--system",
                "lj13",
                "--data",
                str(tmp_path / "lj13.npy"),
                "--config",
                str(CONFIGS / "teacher_lj13.toml"),
                "--profile",
                "smoke",
                "-o",
                str(run),
            ]
        )
        == 0
    )
    assert cli(["sample", str(run), "-n", "12", "-o", str(tmp_path / "s.h5"), "--seed", "3"]) == 0
    samples = read_samples(tmp_path / "s.h5")
    assert samples.x.shape == (12, 39) and np.isfinite(samples.log_q).all()
    assert samples.u is not None and samples.log_w is not None
    assert samples.provenance["system"] == "lj13" and "nfe" in samples.columns
    assert np.allclose(samples.x.reshape(12, 13, 3).mean(1), 0, atol=1e-5)
    assert (
        cli(
            [
                "nll",
                str(run),
                "--data",
                str(tmp_path / "lj13.npy"),
                "-n",
                "8",
                "--json",
                str(tmp_path / "nll.json"),
            ]
        )
        == 0
    )
    nll = json.loads((tmp_path / "nll.json").read_text())
    assert nll["n_val"] == 8 and nll["event_dim"] == 36 and np.isfinite(nll["nll"])


def test_aldp_cli_smoke(tmp_path):
    pytest.importorskip("openmm")
    from boltzflow.systems import load_system

    with load_system("aldp") as system:
        ref = system.reference_configuration().numpy()
    gen = np.random.default_rng(0)
    data = ref + 0.005 * gen.standard_normal((64, 66))
    np.save(tmp_path / "aldp.npy", data)
    run = tmp_path / "run"
    assert (
        cli(
            [
                "train",
                "teacher",
                "--system",
                "aldp",
                "--data",
                str(tmp_path / "aldp.npy"),
                "--config",
                str(CONFIGS / "teacher_aldp.toml"),
                "--profile",
                "smoke",
                "-o",
                str(run),
            ]
        )
        == 0
    )
    assert cli(["sample", str(run), "-n", "4", "-o", str(tmp_path / "s.h5")]) == 0
    samples = read_samples(tmp_path / "s.h5")
    assert samples.x.shape == (4, 66) and np.isfinite(samples.log_q).all()
    assert samples.u is not None  # OpenMM energies of the (untrained) samples


def test_cli_errors_are_one_line(tmp_path, capsys):
    cfg = tmp_path / "c.toml"
    cfg.write_text("system = 'dw4'\n[train]\nstepz = 3\n")
    np.save(tmp_path / "d.npy", np.zeros((4, 8)))
    code = cli(
        [
            "train",
            "teacher",
            "--data",
            str(tmp_path / "d.npy"),
            "--config",
            str(cfg),
            "-o",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2
    assert "unknown key 'stepz'" in capsys.readouterr().err
    code = cli(["sample", str(tmp_path / "nothing"), "-n", "3", "-o", str(tmp_path / "s.h5")])
    assert code == 2
    code = cli(
        [
            "train",
            "teacher",
            "--system",
            "lj13",
            "--data",
            str(tmp_path / "d.npy"),
            "--config",
            str(CONFIGS / "teacher_dw4.toml"),
            "-o",
            str(tmp_path / "r"),
        ]
    )
    assert code == 2
    assert "dw4" in capsys.readouterr().err


def test_sample_cli_matches_the_library(tmp_path):
    """`boltzflow sample` writes exactly what TeacherCNF.sample returns for the same seed."""
    from boltzflow.flows.cnf import TeacherCNF

    torch.manual_seed(0)
    teacher = TeacherCNF.build(
        "mlp",
        dim=2,
        backbone_options={"hidden": 8, "layers": 1},
        sampling={"method": "rk4", "steps": 3, "batch_size": 4},
    )
    teacher.save(tmp_path / "teacher.pt")
    assert (
        cli(["sample", str(tmp_path), "-n", "10", "-o", str(tmp_path / "s.h5"), "--seed", "5"]) == 0
    )
    stored = read_samples(tmp_path / "s.h5")
    x, log_q = teacher.sample(10, seed=5)
    assert np.allclose(stored.x, x.double().numpy(), atol=1e-7)
    assert np.allclose(stored.log_q, log_q.double().numpy(), atol=1e-6)
    assert stored.u is None  # no system recorded with the model
    assert stored.columns["nfe"].tolist() == [12] * 10
