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

#: (folder, sampling seed, N, ESS/N from the card)
CARDS = [("aldp-nf-internal", 0, 10_000, 0.4392)]


@pytest.mark.parametrize(("name", "seed", "n", "ess"), CARDS)
def test_shipped_model_reproduces_its_card(tmp_path, name, seed, n, ess):
    folder = MODELS / name
    assert (folder / "card.md").is_file()
    assert (folder / "student.pt").stat().st_size <= 5 * 1024 * 1024
    assert f"{ess:.4f}" in (folder / "card.md").read_text()
    out = tmp_path / "s.h5"
    argv = ["--quiet", "sample", str(folder), "-n", str(n), "-o", str(out), "--seed", str(seed)]
    assert main(argv) == 0
    s = read_samples(out)
    assert s.x.shape == (n, 66)
    assert np.isfinite(s.log_q).all()
    assert "log_q_internal" in s.columns
    assert abs(ess_fraction(torch.as_tensor(s.log_w)) - ess) < 2e-3


def test_shipped_model_refuses_another_system():
    with pytest.raises(ValueError, match="trained for system 'aldp'"):
        load_model(MODELS / "aldp-nf-internal", system="dw4")
