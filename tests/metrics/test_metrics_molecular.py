"""Ramachandran KL, chirality rate and NLL."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from boltzflow.metrics import chirality_rate, nll, ramachandran_histogram, ramachandran_kl


def test_ramachandran_kl_closed_form():
    # reference: all mass in one cell; samples split evenly between that cell and another
    phi_r, psi_r = np.full(10, 0.1), np.full(10, 0.1)
    phi = np.array([0.1, 0.1, -2.0, -2.0])
    psi = np.array([0.1, 0.1, 2.0, 2.0])
    kl = ramachandran_kl(phi_r, psi_r, phi, psi, bins=10, pseudocount=0.0)
    assert kl == pytest.approx(math.log(2))
    # weights can move all sample mass onto the reference cell
    kl_w = ramachandran_kl(phi_r, psi_r, phi, psi, weights=[1, 1, 0, 0], bins=10, pseudocount=0.0)
    assert kl_w == pytest.approx(0.0, abs=1e-12)
    assert ramachandran_kl(phi_r, psi_r, phi_r, psi_r) == pytest.approx(0.0, abs=1e-12)
    h = ramachandran_histogram(phi, psi, bins=10, pseudocount=1e-3)
    assert h.sum() == pytest.approx(1.0) and h.min() > 0


def test_chirality_rate_counts_mirror_images():
    from boltzflow.systems.geometry import chirality_volume

    rng = np.random.default_rng(0)
    x = torch.as_tensor(rng.normal(size=(50, 66)))
    l_sign = 1
    l_form = chirality_volume(x) > 0
    x = torch.where(l_form[:, None], x, -x)  # make every row L
    assert chirality_rate(x) == 0.0
    x[:10] = -x[:10]
    assert chirality_rate(x, l_sign=l_sign) == pytest.approx(0.2)
    w = np.ones(50)
    w[:10] = 3.0
    assert chirality_rate(x, weights=w) == pytest.approx(30 / 70)


def test_nll_mean_and_error():
    lq = np.array([-1.0, -2.0, -3.0, -4.0])
    e = nll(lq)
    assert e.value == pytest.approx(2.5)
    assert e.stderr == pytest.approx(np.std(lq, ddof=1) / 2)
    with pytest.raises(ValueError, match="NaN"):
        nll([0.0, math.nan])
