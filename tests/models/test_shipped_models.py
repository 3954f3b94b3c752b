"""The models shipped in ``models/`` load and reproduce their card's ESS/N.

Same seed, same CPU code path: the card's figure is reproduced up to floating-point differences
between machines (BLAS, OpenMM's Reference platform is deterministic), so the tolerance is a
small absolute one, not a statistical one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from boltzflow.cli import main
from boltzflow.io.samples import read_samples
from boltzflow.registry import load_model
from boltzflow.sampling.weights import ess_fraction

MODELS = Path(__file__).resolve().parents[2] / "models"
#: the shipped teacher's ESS/N on its card (sampling seed 0, N = 10,000)
TEACHER_ESS = 0.1107
#: the teacher on the NF's latent (sampling seed 0, N = 10,000)
NFBASE_ESS = 0.5812
#: the LJ13 teacher (sampling seed 0, N = 2,000: about 12 CPU-minutes)
LJ13_ESS = 0.5109


def _exact_teacher_card(name: str, ess: float, n: int = 10_000) -> object:
    """A card check of an exact-likelihood teacher: seed 0, N samples, slow."""
    marks = [pytest.mark.slow, pytest.mark.timeout(3600)]
    return pytest.param(name, 0, n, ess, id=name, marks=marks)


#: (folder, sampling seed, N, ESS/N from the card); the teachers' exact-likelihood sampling of
#: 10,000 ALDP samples (or 2,000 LJ13 ones) takes 12-15 CPU-minutes, so their card checks are
#: slow tests (with their own timeout: the suite's 600 s is shorter)
CARDS = [
    pytest.param("aldp-nf-internal", 0, 10_000, 0.4392, id="aldp-nf-internal"),
    pytest.param("aldp-ff96-nf-internal", 0, 10_000, 0.5822, id="aldp-ff96-nf-internal"),
    pytest.param("aldp-f2d2-internal", 0, 10_000, 0.0961, id="aldp-f2d2-internal"),
    pytest.param("aldp-falcon-internal", 0, 10_000, 0.0604, id="aldp-falcon-internal"),
    pytest.param("dw4-teacher", 0, 256, 0.8949, id="dw4-teacher"),
    pytest.param("dw4-f2d2", 2, 10_000, 0.8159, id="dw4-f2d2"),
    pytest.param("dw4-falcon", 1, 10_000, 0.7799, id="dw4-falcon"),
    pytest.param("lj13-f2d2", 0, 10_000, 0.0963, id="lj13-f2d2"),
    _exact_teacher_card("lj13-teacher", LJ13_ESS, n=2_000),
    _exact_teacher_card("aldp-teacher-internal", TEACHER_ESS),
    _exact_teacher_card("aldp-teacher-nfbase", NFBASE_ESS),
]


def _model_file(folder: Path) -> Path:
    files = [f for f in ("student.pt", "teacher.pt") if (folder / f).is_file()]
    assert len(files) == 1, f"{folder}: one model file expected, found {files}"
    return folder / files[0]


SHIPPED = sorted(p.name for p in MODELS.iterdir() if p.is_dir())


def test_every_shipped_model_is_checked_against_its_card():
    assert SHIPPED == sorted(c.values[0] for c in CARDS)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_model_has_card_and_fits(name):
    folder = MODELS / name
    assert (folder / "card.md").is_file()
    assert _model_file(folder).stat().st_size <= 5 * 1024 * 1024


def test_shipped_lj13_teacher_samples_mean_free_x_and_log_q(tmp_path):
    """A short run of the LJ13 teacher (its card's figures are slow)."""
    out = tmp_path / "t.h5"
    argv = ["--quiet", "sample", str(MODELS / "lj13-teacher"), "-n", "8", "-o", str(out)]
    assert main(argv) == 0
    s = read_samples(out)
    assert s.x.shape == (8, 39) and np.isfinite(s.log_q).all() and np.isfinite(s.log_w).all()
    np.testing.assert_allclose(s.x.reshape(8, 13, 3).mean(axis=1), 0.0, atol=1e-5)
    assert load_model(MODELS / "lj13-teacher").sampling["divergence"] == "quadrature"


@pytest.mark.parametrize("name", ["aldp-teacher-internal", "aldp-teacher-nfbase"])
def test_shipped_teacher_samples_cartesian_x_and_log_q(tmp_path, name):
    """A short exact-likelihood run of a shipped teacher (the card's N = 10,000 is slow)."""
    out = tmp_path / "t.h5"
    folder = MODELS / name
    argv = ["--quiet", "sample", str(folder), "-n", "32", "-o", str(out), "--seed", "0"]
    assert main(argv) == 0
    s = read_samples(out)
    assert s.x.shape == (32, 66)
    assert np.isfinite(s.log_q).all() and np.isfinite(s.columns["log_q_internal"]).all()
    assert load_model(folder).representation == "internal"


def test_shipped_nfbase_teacher_holds_the_shipped_nf():
    """The NF-base teacher's frozen base is exactly the shipped NF (weights and transform)."""
    teacher, nf = (
        load_model(MODELS / "aldp-teacher-nfbase"),
        load_model(MODELS / "aldp-nf-internal"),
    )
    assert teacher.transform.to_dict() == nf.ic.to_dict()
    base = teacher.base_flow.state_dict()
    for key, value in nf.flow.state_dict().items():
        assert torch.equal(base[key], value), key


@pytest.mark.parametrize(("name", "seed", "n", "ess"), CARDS)
def test_shipped_model_reproduces_its_card(tmp_path, name, seed, n, ess):
    folder = MODELS / name
    assert f"{ess:.4f}" in (folder / "card.md").read_text()
    out = tmp_path / "s.h5"
    argv = ["--quiet", "sample", str(folder), "-n", str(n), "-o", str(out), "--seed", str(seed)]
    assert main(argv) == 0
    s = read_samples(out)
    model = load_model(folder)
    assert s.x.shape == (n, model.dim)
    assert np.isfinite(s.log_q).all()
    if model.representation == "internal":
        assert "log_q_internal" in s.columns
    assert abs(ess_fraction(torch.as_tensor(s.log_w)) - ess) < 2e-3


def test_shipped_model_refuses_another_system():
    with pytest.raises(ValueError, match="trained for system 'aldp'"):
        load_model(MODELS / "aldp-nf-internal", system="dw4")
