"""The LJ13 student config distils the shipped LJ13 teacher end to end (its smoke profile)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from boltzflow.cli import main
from boltzflow.distill import load_student
from boltzflow.io.samples import read_samples

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "workflows" / "configs" / "student_f2d2_lj13.toml"


def test_lj13_f2d2_config_distils_the_shipped_teacher(tmp_path: Path) -> None:
    out = tmp_path / "f2d2"
    argv = ["--quiet", "distill", str(ROOT / "models" / "lj13-teacher"), "--method", "f2d2"]
    argv += ["--config", str(CONFIG), "--profile", "smoke", "-o", str(out), "--threads", "1"]
    assert main(argv) == 0
    student = load_student(out)
    assert student.system == "lj13"
    options = student.model_config["backbone_options"]
    assert (options["hidden"], options["layers"]) == (32, 3)  # the config's, not the teacher's
    samples = tmp_path / "s.h5"
    argv = ["--quiet", "sample", str(out), "--steps", "2", "-n", "16", "-o", str(samples)]
    assert main(argv) == 0
    s = read_samples(samples)
    assert s.x.shape == (16, 39) and np.isfinite(s.log_q).all()
    np.testing.assert_allclose(s.x.reshape(16, 13, 3).mean(axis=1), 0.0, atol=1e-5)
    assert not (out / "trajectories.partial.pt").exists()
