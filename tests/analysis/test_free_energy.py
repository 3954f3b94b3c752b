"""ΔF along φ, profiles, the reference-profile file and comparisons
(:mod:`boltzflow.analysis.free_energy`), with exact values."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from boltzflow.analysis.free_energy import (
    ALDP_STATE_A,
    block_free_energy,
    compare_free_energy,
    in_region,
    load_reference_profile,
    phi_profile,
    region_free_energy,
)
from boltzflow.sampling.estimators import FreeEnergyProfile, free_energy_profile
from boltzflow.sampling.results import Estimate

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ROOT / "workflows" / "reference" / "aldp_umbrella_profile.json"


def test_region_free_energy_groups_correlated_samples():
    """With clusters (SMC particles' initial ancestors) the interval is the clustered delta
    method alone, the same value; duplicated particles widen it as copies should."""
    phi = np.array([0.5, 1.5, -1.0, -2.0, 2.5, 0.7, -0.3, -2.9])
    lw = np.linspace(-0.5, 0.5, 8)
    plain = region_free_energy(phi, lw, methods=("delta", "bootstrap"), n_bootstrap=20)
    copies = np.repeat(phi, 3), np.repeat(lw, 3)
    grouped = region_free_energy(
        *copies, methods=("delta", "bootstrap"), clusters=np.repeat(np.arange(8), 3)
    )
    assert set(grouped) == {"delta"} and grouped["delta"].method == "delta-clustered"
    assert grouped["delta"].value == pytest.approx(plain["delta"].value, abs=1e-12)
    # three copies of each sample, grouped: the interval of the 8 originals, not of 24
    assert grouped["delta"].stderr == pytest.approx(plain["delta"].stderr, rel=1e-9)
    assert region_free_energy(*copies)["delta"].stderr < 0.6 * plain["delta"].stderr


def test_region_free_energy_exact_and_undefined():
    phi = np.array([0.5, 1.5, -1.0, -2.0, 2.5])  # 2 of 5 in (0, 2); φ = 2.5 counts as rest
    assert in_region(phi).tolist() == [True, True, False, False, False]
    est = region_free_energy(phi, np.zeros(5), methods=("delta", "bootstrap"), n_bootstrap=50)
    assert set(est) == {"delta", "bootstrap"}
    assert est["delta"].value == pytest.approx(-math.log(2 / 3), abs=1e-14)
    # weights move the answer: log w = log 3 on the first sample -> P(A) = 4/7, P(rest) = 3/7
    lw = np.array([math.log(3), 0, 0, 0, 0])
    assert region_free_energy(phi, lw)["delta"].value == pytest.approx(-math.log(4 / 3), abs=1e-12)
    empty = region_free_energy(phi, np.zeros(5), region=(3.0, 3.1))
    assert list(empty) == ["undefined"] and "state A has zero weight" in empty["undefined"]


def test_delta_interval_survives_extreme_weights():
    # P(A) ~ e^-400: the delta method's standard error must stay finite (no 0 * inf)
    phi = np.array([-1.0, 1.0, -1.5, -2.0])
    est = region_free_energy(phi, np.array([0.0, -400.0, -1.0, -2.0]))["delta"]
    assert math.isfinite(est.stderr) and math.isfinite(est.ci_low) and est.value > 399


def test_block_free_energy_exact_values():
    # every block holds exactly 1 of 4 frames in A: P = 1/4 in each block, zero spread
    r = block_free_energy(np.tile([True, False, False, False], 10), n_blocks=5)
    assert r["p_a"] == 0.25 and r["p_stderr"] == 0.0
    assert r["value"] == pytest.approx(-math.log(0.25 / 0.75), abs=1e-15)
    assert r["ci_low"] == r["ci_high"] == r["value"]
    # blocks with P = 0.2 and 0.6: mean 0.4, se = std(ddof=1)/sqrt(2) = 0.2
    series = np.array([1, 0, 0, 0, 0, 1, 1, 1, 0, 0], dtype=bool)
    r = block_free_energy(series, n_blocks=2, level=0.95)
    se = 0.2 / (0.4 * 0.6)
    assert r["stderr"] == pytest.approx(se)
    assert r["ci_high"] - r["value"] == pytest.approx(12.706204736174707 * se)  # t(1), 97.5%
    assert block_free_energy(np.zeros(10, dtype=bool), 2)["value"] is None


def test_compare_free_energy():
    a = Estimate(3.0, 2.9, 3.1, 0.3, 100, 50.0, "delta")
    c = compare_free_energy(a, {"value": 2.0, "stderr": 0.4})
    assert c["difference"] == pytest.approx(1.0) and c["stderr"] == pytest.approx(0.5)
    assert c["z"] == pytest.approx(2.0) and c["consistent_at_2se"]
    assert not compare_free_energy(a, Estimate(1.0, 0, 2, 0.1, 9, 9.0, "x"))["consistent_at_2se"]
    assert compare_free_energy({"undefined": "empty"}, a)["difference"] is None


def test_profile_and_estimate_round_trip_through_json():
    rng = np.random.default_rng(0)
    phi = rng.vonmises(-1.2, 2.0, 500)
    prof = free_energy_profile(phi, np.zeros(500), bins=12, value_range=(-math.pi, math.pi))
    back = FreeEnergyProfile.from_dict(json.loads(json.dumps(prof.to_dict())))
    np.testing.assert_array_equal(back.edges[0], prof.edges[0])
    for key in ("free_energy", "ci_low", "ci_high", "probability"):
        np.testing.assert_array_equal(getattr(back, key), getattr(prof, key))
    assert (back.n, back.method, back.level) == (prof.n, prof.method, prof.level)
    est = Estimate(1.5, 1.0, 2.0, 0.25, 10, 5.0, "delta", 0.9)
    assert Estimate.from_dict(json.loads(json.dumps(est.to_dict()))) == est
    with pytest.raises(ValueError, match="an estimate needs"):
        Estimate.from_dict({"value": 1.0})


def test_shipped_umbrella_reference_loads():
    ref = load_reference_profile(SHIPPED)
    assert ref.label == "umbrella/MBAR reference" and ref.region == ALDP_STATE_A
    assert ref.delta_f.value == pytest.approx(json.loads(SHIPPED.read_text())["delta_f_kT"])
    assert ref.delta_f.ci_low < ref.delta_f.value < ref.delta_f.ci_high
    (edges,) = ref.profile.edges
    assert len(edges) == 37 and edges[0] == pytest.approx(-math.pi)
    assert np.nanmin(ref.profile.free_energy) == 0.0
    # a model's profile is binned like the reference
    phi = np.random.default_rng(1).uniform(-math.pi, math.pi, 200)
    mine = phi_profile(phi, np.zeros(200), reference=ref.profile, method="delta")
    np.testing.assert_allclose(mine.edges[0], edges, atol=1e-12)


def test_a_two_dimensional_reference_is_marginalised_over_psi(tmp_path):
    # P(φ, ψ) on 2 x 3 bins: the φ marginal is (0.2, 0.8), so F(φ) = (log 4, 0)
    p = np.array([[0.1, 0.05, 0.05], [0.4, 0.2, 0.2]])
    edges = [np.linspace(-math.pi, math.pi, 3).tolist(), np.linspace(-math.pi, math.pi, 4).tolist()]
    f = -np.log(p / p.max())
    data = {"profile": {"edges": edges, "free_energy_kT": f.tolist(), "probability": p.tolist()}}
    path = tmp_path / "ref2d.json"
    path.write_text(json.dumps(data))
    ref = load_reference_profile(path)
    assert len(ref.profile.edges) == 1 and ref.delta_f is None
    np.testing.assert_allclose(ref.profile.free_energy, [math.log(4), 0.0], atol=1e-12)
    assert ref.label == "reference (ref2d.json)"


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("not json", "not a reference profile"),
        ("{}", "with a 'profile'"),
        ('{"profile": {"edges": [[0, 1]]}}', "free_energy_kT"),
        ('{"profile": {"edges": [[0, 1, 2]], "free_energy_kT": [0]}}', "shape"),
        ('{"profile": {"edges": [[0, 1]], "free_energy_kT": [0]}, "region": [2, 1]}', "region"),
    ],
)
def test_bad_reference_files_name_the_file(tmp_path, text, match):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ValueError, match=match) as err:
        load_reference_profile(path)
    assert "bad.json" in str(err.value)
    with pytest.raises(FileNotFoundError):
        load_reference_profile(tmp_path / "missing.json")
