"""The LJ13 student configs distil the shipped LJ13 teacher end to end (their smoke profiles)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from boltzflow.cli import main
from boltzflow.distill import load_student
from boltzflow.io.samples import read_samples

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "workflows" / "configs"


@pytest.mark.parametrize("method", ["f2d2", "falcon"])
def test_lj13_student_config_distils_the_shipped_teacher(method: str, tmp_path: Path) -> None:
    out = tmp_path / method
    config = CONFIGS / f"student_{method}_lj13.toml"
    argv = ["--quiet", "distill", str(ROOT / "models" / "lj13-teacher"), "--method", method]
    argv += ["--config", str(config), "--profile", "smoke", "-o", str(out), "--threads", "1"]
    assert main(argv) == 0
    student = load_student(out)
    assert student.system == "lj13" and student.student_kind == method
    options = student.model_config["backbone_options"]
    assert (options["hidden"], options["layers"]) == (32, 3)  # the config's, not the teacher's
    samples = tmp_path / "s.h5"
    argv = ["--quiet", "sample", str(out), "--steps", "2", "-n", "16", "-o", str(samples)]
    assert main(argv) == 0
    s = read_samples(samples)
    assert s.x.shape == (16, 39) and np.isfinite(s.log_q).all()
    np.testing.assert_allclose(s.x.reshape(16, 13, 3).mean(axis=1), 0.0, atol=1e-5)
    assert not (out / "trajectories.partial.pt").exists()


def test_the_lj13_configs_share_one_trajectory_cache() -> None:
    """A finished F2D2 run's trajectories.pt serves the FALCON run as it is."""
    from boltzflow.distill.train_students import load_student_config

    caches = [
        load_student_config(CONFIGS / f"student_{m}_lj13.toml").trajectories.options()
        for m in ("f2d2", "falcon")
    ]
    assert caches[0] == caches[1]
