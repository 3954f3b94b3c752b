"""Contract tests of the analytic systems: registry, dtypes, devices, forces, closed forms."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from boltzflow.systems import available, definition, load_system
from boltzflow.systems.double_well import DoubleWellSystem
from boltzflow.systems.lennard_jones import LennardJonesSystem

ANALYTIC_KINDS = {"double_well", "lennard_jones", "many_well", "gmm"}
EXPECTED_DIM = {"dw4": 8, "lj13": 39, "lj55": 165, "many_well_32": 32, "gmm_40": 2}
# Perturbation added to the reference configuration for test points (coordinate units).
NOISE = {"dw4": 0.3, "lj13": 0.03, "lj55": 0.03, "many_well_32": 0.3, "gmm_40": 1.0}


def test_expected_systems_are_defined() -> None:
    names = [n for n in available() if definition(n)["kind"] in ANALYTIC_KINDS]
    assert set(EXPECTED_DIM) <= set(names), f"defined analytic systems: {names}"


@pytest.fixture(scope="module", params=sorted(EXPECTED_DIM))
def system(request: pytest.FixtureRequest):
    return load_system(request.param)


def _points(system, n: int = 4, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    ref = system.reference_configuration()
    noise = torch.randn(n, system.dim, generator=gen, dtype=torch.float64)
    return ref + NOISE[system.name] * noise


def test_definition_and_dim(system) -> None:
    assert system.dim == EXPECTED_DIM[system.name]
    spec = definition(system.name)
    assert spec["description"] and spec["reference"], "TOML must give formula and paper"
    assert "temperature" not in spec, "analytic toys are dimensionless"
    if spec["kind"] in ("double_well", "lennard_jones"):
        assert system.n_particles * system.spatial_dim == system.dim
        assert system.mean_free
    else:
        assert system.n_particles is None and system.spatial_dim is None


def test_reference_configuration(system) -> None:
    ref = system.reference_configuration()
    assert ref.shape == (1, system.dim) and ref.dtype == torch.float64
    u_ref = float(system.energy(ref))
    assert math.isfinite(u_ref)
    u_near = system.energy(_points(system, n=16))
    # a low-energy configuration: lower than typical perturbations of itself
    assert u_ref <= float(u_near.median()), (u_ref, u_near)
    assert torch.equal(ref, system.reference_configuration()), "must be deterministic"
    if system.n_particles is not None:
        centre = ref.reshape(system.n_particles, system.spatial_dim).mean(0)
        assert centre.abs().max() < 1e-12


def test_energy_dtype_device(system, device: torch.device, dtype: torch.dtype) -> None:
    x64 = _points(system, n=5)
    u64 = system.energy(x64)
    x = x64.to(device=device, dtype=dtype)
    u = system.energy(x)
    assert u.shape == (5,) and u.dtype == dtype and u.device.type == device.type
    assert torch.isfinite(u).all()
    rtol = 1e-4 if dtype == torch.float32 else 1e-10
    # float32 loses absolute precision on large pair sums: compare relative to their scale
    scale = u64.abs().max().clamp_min(1.0)
    err = (u.double().cpu() - u64).abs().max()
    assert err <= rtol * scale * 10, f"{dtype} {device}: max error {err:.3g} vs scale {scale:.3g}"
    f = system.force(x)
    assert f.shape == x.shape and f.dtype == dtype and torch.isfinite(f).all()


def test_force_matches_finite_differences(system) -> None:
    x = _points(system, n=3, seed=1)
    f = system.force(x)
    gen = torch.Generator().manual_seed(2)
    coords = torch.randperm(system.dim, generator=gen)[:24]  # all of a small dim, 24 otherwise
    h = 1e-5
    for k in coords.tolist():
        e = torch.zeros_like(x)
        e[:, k] = h
        fd = -(system.energy(x + e) - system.energy(x - e)) / (2 * h)
        scale = f.abs().max().clamp_min(1.0)
        err = (fd - f[:, k]).abs().max()
        assert err < 1e-6 * scale, f"coordinate {k}: autograd {f[:, k]} vs finite diff {fd}"


def test_wrong_shape_names_expected_shape(system) -> None:
    with pytest.raises(ValueError, match=rf"\(batch, {system.dim}\)"):
        system.energy(torch.zeros(3, system.dim + 1))
    with pytest.raises(ValueError, match=rf"\(batch, {system.dim}\)"):
        system.energy(torch.zeros(system.dim))


def test_nan_row_gives_inf_and_is_counted(system) -> None:
    x = _points(system, n=3)
    x[1, 0] = float("nan")
    before = system.n_nonfinite
    u = system.energy(x)
    assert torch.isfinite(u[[0, 2]]).all() and u[1] == float("inf")
    assert system.n_nonfinite == before + 1
    f = system.force(x)
    assert torch.isfinite(f[[0, 2]]).all()


def test_unknown_system_lists_names() -> None:
    with pytest.raises(KeyError, match="dw4"):
        load_system("no_such_system")


def test_unknown_override_raises_type_error() -> None:
    with pytest.raises(TypeError, match="valid overrides"):
        load_system("dw4", no_such_parameter=1.0)


def test_temperature_rejected_for_dimensionless_systems() -> None:
    with pytest.raises(ValueError, match="no temperature"):
        load_system("lj13", temperature=300.0)


def test_lj_conventions_and_validation() -> None:
    ordered = load_system("lj13")
    unique = load_system("lj13", pair_convention="unique")
    assert ordered.pair_convention == "ordered" and ordered.tether == 0.5
    x = _points(ordered, n=4)
    torch.testing.assert_close(unique.pair_part(x), 0.5 * ordered.pair_part(x), rtol=1e-14, atol=0)
    torch.testing.assert_close(unique.tether_part(x), ordered.tether_part(x), rtol=0, atol=0)
    torch.testing.assert_close(
        ordered.energy(x) - unique.energy(x), 0.5 * ordered.pair_part(x), rtol=1e-12, atol=1e-10
    )
    with pytest.raises(ValueError, match=r"\['ordered', 'unique'\]"):
        load_system("lj13", pair_convention="both")


def _two_particles(system_cls_name: str, d: float, **overrides: object):
    """A 2-particle system of the given kind in 3-D (via the lj13/dw4 parameters) at distance d."""
    base = load_system("lj13" if system_cls_name == "lj" else "dw4", **overrides)
    info = dataclasses.replace(base.info, name="pair", dim=6, n_particles=2, spatial_dim=3)
    if system_cls_name == "lj":
        s = LennardJonesSystem(
            info,
            epsilon=base.epsilon,
            r_m=base.r_m,
            tether=0.0,
            pair_convention=base.pair_convention,
        )
    else:
        s = DoubleWellSystem(info, a=base.a, b=base.b, c=base.c, d0=base.d0, tau=base.tau)
    x = torch.tensor([[0.0, 0.0, 0.0, d, 0.0, 0.0]], dtype=torch.float64)
    return s, x


def test_lj_closed_form_values() -> None:
    s, x = _two_particles("lj", 1.0, pair_convention="unique")  # r_m = 1, epsilon = 1
    assert float(s.energy(x)) == pytest.approx(-1.0, abs=1e-14)
    assert float(s.force(x).abs().max()) == pytest.approx(0.0, abs=1e-12)
    s, x = _two_particles("lj", 2 ** (-1 / 6), pair_convention="unique")
    assert float(s.energy(x)) == pytest.approx(0.0, abs=1e-12)
    s, x = _two_particles("lj", 1.0)  # ordered: counts the pair twice
    assert float(s.energy(x)) == pytest.approx(-2.0, abs=1e-14)
    s, x = _two_particles("lj", 0.0)
    assert float(s.energy(x)) == float("inf"), "coincident particles: +inf, not NaN"
    s, x = _two_particles("lj", 1e-3)
    assert not torch.isnan(s.energy(x.float())).any()


def test_dw_closed_form_values() -> None:
    s, x = _two_particles("dw", 4.0)  # d = d0
    assert float(s.energy(x)) == 0.0
    # d = d0 + 1: a + b + c over tau, and the minimum of b s^2 + c s^4 at s^2 = -b/(2c)
    s, x = _two_particles("dw", 5.0, a=0.3, tau=2.0)
    assert float(s.energy(x)) == pytest.approx((0.3 - 4.0 + 0.9) / 2.0, abs=1e-14)
    s, x = _two_particles("dw", 4.0 + math.sqrt(4.0 / 1.8))
    assert float(s.energy(x)) == pytest.approx(-(4.0**2) / (4 * 0.9), abs=1e-12)
    s, x = _two_particles("dw", 0.0)
    f = s.force(x)
    assert torch.isfinite(s.energy(x)).all() and torch.isfinite(f).all()
