"""The teacher CNF in internal coordinates (flow matching on R^k x T^m, issue #22).

Geodesic interpolant on the circle, the periodic backbone, exact-likelihood consistency of
Cartesian samples (also after rigid motions), save/load, the density convention checked by
importance weights against a Cartesian density with a known normaliser, and a tiny training run
on short ALDP MD data.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from boltzflow.flows.cnf import TeacherCNF
from boltzflow.flows.flow_matching import (
    couple,
    flow_matching_loss,
    interpolate,
    ot_pairing,
    random_rotations,
    wrap_columns,
)
from boltzflow.nn.torus import TorusMLP
from boltzflow.systems.internal_coords import InternalCoordinates
from boltzflow.systems.registry import BUILTIN_DIR
from boltzflow.systems.zmatrix import ZMatrix, zmatrix_from_bonds
from boltzflow.train.config import load_teacher_config
from boltzflow.train.teacher import SystemShape, TeacherLoss, train_teacher

F64 = torch.float64
PDB = BUILTIN_DIR / "aldp" / "alanine-dipeptide.pdb"
CONFIGS = Path(__file__).resolve().parents[2] / "workflows" / "configs"
CONFIG = CONFIGS / "teacher_aldp_internal.toml"
#: tight ODE settings for likelihood consistency (float64)
TIGHT = {"method": "dopri5", "atol": 1e-8, "rtol": 1e-8}
LOG_8PI2 = math.log(8 * math.pi**2)


# --- flow matching on the torus ------------------------------------------------------------
def test_geodesic_interpolant_goes_the_short_way_across_pi():
    periodic = torch.tensor([False, True])
    x0 = torch.tensor([[1.0, 3.0]], dtype=F64)
    x1 = torch.tensor([[-1.0, -3.0]], dtype=F64)
    short = 2 * math.pi - 6.0  # 3.0 -> -3.0 through +pi: +0.283 rad, not -6
    for t in (0.0, 0.25, 0.5, 0.75, 1.0):
        xt, ut = interpolate(x0, x1, torch.tensor([t], dtype=F64), periodic=periodic)
        assert ut[0].tolist() == pytest.approx([-2.0, short], abs=1e-14)
        expected = math.remainder(3.0 + t * short, 2 * math.pi)
        assert xt[0, 0].item() == pytest.approx(1.0 - 2.0 * t, abs=1e-14)  # flat column linear
        assert -math.pi <= xt[0, 1].item() < math.pi
        diff = math.remainder(xt[0, 1].item() - expected, 2 * math.pi)
        assert abs(diff) < 1e-12
    xt, _ = interpolate(x0, x1, torch.tensor([1.0], dtype=F64), periodic=periodic)
    assert xt[0, 1].item() == pytest.approx(-3.0, abs=1e-12)  # arrives at x1
    # the loss regresses on the wrapped target: a zero field pays |u|^2 averaged over columns
    zero = lambda t, x: torch.zeros_like(x)  # noqa: E731
    loss = flow_matching_loss(zero, x0, x1, t=torch.tensor([0.3], dtype=F64), periodic=periodic)
    assert loss.item() == pytest.approx((4.0 + short**2) / 2, rel=1e-12)
    # without the mask the same pair is 6 rad apart the long way (the Cartesian path unchanged)
    _, u_flat = interpolate(x0, x1, torch.tensor([0.5], dtype=F64))
    assert u_flat[0, 1].item() == pytest.approx(-6.0)


def test_wrapped_ot_pairs_across_pi():
    periodic = torch.tensor([True])
    x0 = torch.tensor([[3.0], [0.5]], dtype=F64)
    x1 = torch.tensor([[0.4], [-3.0]], dtype=F64)
    assert ot_pairing(x0, x1, periodic=periodic).tolist() == [1, 0]  # 3.0 <-> -3.0 are close
    assert ot_pairing(x0, x1).tolist() == [0, 1]  # Euclidean cost pairs them otherwise
    assert couple(x0, x1, "ot", periodic=periodic)[:, 0].tolist() == [0.5, 3.0]
    with pytest.raises(ValueError, match="equivariant_ot"):
        couple(x0, x1, "equivariant_ot", n_particles=1, spatial_dim=1, periodic=periodic)


def _randomise(net: torch.nn.Module, seed: int, std: float = 0.3) -> None:
    """Non-zero weights everywhere (the output layer starts at zero: the identity flow)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


def test_torus_mlp_is_periodic_in_the_angles_only():
    net = TorusMLP(5, [2, 4], hidden=16, layers=2).double()
    _randomise(net, 0)
    z = torch.randn(7, 5, generator=torch.Generator().manual_seed(1), dtype=F64) * 2
    t = torch.rand(7, dtype=F64)
    v = net(t, z)
    assert v.shape == (7, 5) and v.abs().max() > 0.1
    for i in range(5):
        shifted = z.clone()
        shifted[:, i] += 2 * math.pi
        dv = (net(t, shifted) - v).abs().max().item()
        if i in (2, 4):
            assert dv < 1e-12, f"not periodic in column {i}: {dv}"
        else:
            assert dv > 1e-3, f"column {i} is not periodic, yet v did not change"
    assert net.state_dict().keys() == {n for n, _ in net.named_parameters()}


# --- a small internal-coordinate teacher -----------------------------------------------------
@pytest.fixture(scope="module")
def aldp_frames() -> torch.Tensor:
    """300 frames (flat (300, 66) float64 nm) of 300 K ALDP MD (Reference platform, every 20 fs
    after 1 ps; a few seconds)."""
    openmm = pytest.importorskip("openmm")
    from openmm import app

    from boltzflow.data.md import run_md

    pdb = app.PDBFile(str(PDB))
    ff = app.ForceField("amber99sbildn.xml", "amber99_obc.xml")
    system = ff.createSystem(pdb.topology, nonbondedMethod=app.NoCutoff, constraints=None)
    assert isinstance(system, openmm.System)
    pos = np.asarray(pdb.getPositions(asNumpy=True).value_in_unit(openmm.unit.nanometer))
    res = run_md(
        system,
        pos,
        temperature=300.0,
        n_frames=300,
        stride=20,
        burn_in=1000,
        seed=3,
        platform="Reference",
        progress=False,
    )
    return torch.from_numpy(res.positions)


@pytest.fixture(scope="module")
def aldp_zmatrix() -> ZMatrix:
    from boltzflow.train.teacher import system_zmatrix

    return system_zmatrix("aldp")


@pytest.fixture(scope="module")
def teacher(aldp_frames: torch.Tensor, aldp_zmatrix: ZMatrix) -> TeacherCNF:
    """A float64 internal-coordinate teacher with random (non-zero) weights."""
    ic = InternalCoordinates.fit(aldp_zmatrix, aldp_frames, periodic=True)
    model = TeacherCNF.build(
        "mlp", dim=66, backbone_options={"hidden": 16, "layers": 2}, transform=ic
    ).double()
    _randomise(model.net, 5, std=0.15)
    model.system = "aldp"
    return model


def _rigid(x: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rot = random_rotations(len(x), 3, generator=gen, dtype=F64)
    p = x.reshape(len(x), -1, 3) @ rot.transpose(1, 2) + torch.randn(len(x), 1, 3, generator=gen)
    return p.reshape(x.shape)


def test_internal_teacher_shapes_and_description(teacher: TeacherCNF):
    assert teacher.representation == "internal" and teacher.dim == 66
    assert teacher.prior.dim == 60 and teacher.event_dim == 60 and not teacher.mean_free
    assert int(teacher.periodic.sum()) == 19  # ALDP: 22 - 3 dihedrals
    assert "transform" not in dict(teacher.named_modules())  # fixed, not trained
    assert not any(k.startswith("transform") for k in teacher.state_dict())
    assert teacher.model_config["representation"] == "internal"
    with pytest.raises(ValueError, match="backbone 'mlp'"):
        TeacherCNF.build("egnn", dim=66, transform=teacher.transform)
    with pytest.raises(ValueError, match="periodic"):
        TeacherCNF.build("mlp", dim=66, transform=InternalCoordinates(teacher.transform.zmatrix))


def test_log_prob_of_own_samples_matches_returned_log_q(teacher: TeacherCNF):
    """log_prob(x) of Cartesian samples equals their log q, also after rigid motions (z is
    invariant). Tolerance: 1e-5 nats absolute (dopri5 at 1e-8 in float64)."""
    x, log_q = teacher.sample(8, seed=2, **TIGHT)
    assert x.shape == (8, 66) and x.dtype == F64 and bool(torch.isfinite(log_q).all())
    p = x.reshape(8, 22, 3)
    bonds = torch.linalg.vector_norm(p[:, 1] - p[:, 0], dim=-1)
    assert float(bonds.max()) < 0.5  # nm, not Angstrom or standardised units
    back = teacher.log_prob(x, **TIGHT)
    torch.testing.assert_close(back, log_q, atol=1e-5, rtol=0)
    moved = teacher.log_prob(_rigid(x, 4), **TIGHT)
    torch.testing.assert_close(moved, log_q, atol=1e-5, rtol=0)
    # the ODE moves the density: log q differs from the prior's pushed through the transform
    z, log_det = teacher.to_internal(x)
    assert (teacher.prior.log_prob(z) + log_det - log_q).abs().max() > 1e-2


def test_save_load_round_trip(teacher: TeacherCNF, tmp_path):
    teacher = copy.deepcopy(teacher).float()  # checkpoints load into a float32 model
    path = teacher.save(tmp_path / "teacher.pt")
    loaded = TeacherCNF.load(path, system="aldp")
    assert loaded.transform.bond_mean.dtype == F64  # the transform stays float64
    assert loaded.transform.to_dict() == teacher.transform.to_dict()
    assert loaded.model_config == teacher.model_config
    for k, v in teacher.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    settings = {"method": "rk4", "steps": 4}
    a, b = teacher.sample(5, seed=1, **settings), loaded.sample(5, seed=1, **settings)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="trained for system 'aldp'"):
        TeacherCNF.load(path, system="dw4")


def test_protocol_loader_and_bad_points(teacher: TeacherCNF, tmp_path):
    from boltzflow.registry.loading import load_model

    teacher.save(tmp_path / "teacher.pt")
    model = load_model(tmp_path)
    assert isinstance(model, TeacherCNF) and model.representation == "internal"
    with pytest.raises(ValueError, match=r"shape \(N, 66\)"):
        teacher.log_prob(torch.zeros(2, 60, dtype=F64))
    with pytest.raises(ValueError, match="NaN"):
        teacher.log_prob(torch.full((2, 66), float("nan"), dtype=F64))


# --- density convention: importance weights against a known Cartesian density -----------------
def test_cartesian_log_q_integrates_to_one_by_importance_weights():
    """A 4-atom chain whose Cartesian density p is a product of isotropic Gaussian bond vectors
    (std s; exact, normalised on the 9 relative dims; times the rotation volume 8π² in the
    rigid-motions-integrated convention). With x, log q(x) from a random internal-coordinate CNF,
    w = 8π² p(x) / q(x) must satisfy E_q[w] = 1 (rows with no molecule, r < 0 or θ outside
    (0, π), get w = 0: p has no mass there). Forgetting the transform's log-det breaks it."""
    zm = zmatrix_from_bonds(4, [(0, 1), (1, 2), (2, 3)])
    s = 0.1
    ic = InternalCoordinates(zm, periodic=True)
    with torch.no_grad():  # proposal wider than p in the bond tails (bounded weights)
        ic.bond_mean.fill_(1.6 * s)
        ic.bond_std.fill_(1.0 * s)
        ic.angle_mean.fill_(math.pi / 2)
        ic.angle_std.fill_(0.8)
    model = TeacherCNF.build("mlp", dim=12, backbone_options={"hidden": 16}, transform=ic)
    model = model.double()
    _randomise(model.net, 7, std=0.2)
    n = 4000
    x, log_q = model.sample(n, seed=0, method="dopri5", atol=1e-6, rtol=1e-6, batch_size=n)
    p = x.reshape(n, 4, 3)
    steps = torch.stack([p[:, a] - p[:, j] for a, (j, _, _) in zip(zm.atoms[1:], zm.references)], 1)
    log_p = (-0.5 * (steps / s) ** 2).sum((1, 2)) - 9 * math.log(s * math.sqrt(2 * math.pi))
    log_w = log_p + LOG_8PI2 - log_q
    w = torch.where(torch.isfinite(log_w), log_w.exp(), torch.zeros_like(log_w))
    mean, se = w.mean().item(), (w.std() / math.sqrt(n)).item()
    assert abs(mean - 1) < 5 * se and se < 0.05, f"E_q[w] = {mean:.4f} ± {se:.4f}, expected 1"
    # the same weights without the volume term log J are far off
    z, _ = ic(x.double())
    _, log_det = ic.inverse(z)
    w_bad = torch.exp(log_w - log_det).nan_to_num(0.0)
    assert abs(w_bad.mean().item() - 1) > 0.5


# --- training on ALDP MD data ----------------------------------------------------------------
def test_tiny_training_run_lowers_the_loss(aldp_frames: torch.Tensor, aldp_zmatrix, tmp_path):
    cfg = load_teacher_config(CONFIG, "smoke")
    cfg.train.steps, cfg.train.batch_size, cfg.train.lr = 200, 64, 3e-3
    cfg.model.hidden = 64
    cfg.train.ema_decay = 0.0  # evaluate the trained weights themselves
    cfg.train.log_every, cfg.train.checkpoint_every = 50, 200
    shape = SystemShape.from_name("aldp")
    x = aldp_frames.float()
    teacher = train_teacher(cfg, x, tmp_path, shape, progress=False, zmatrix=aldp_zmatrix)
    assert teacher.representation == "internal" and (tmp_path / "teacher.pt").is_file()
    loss_fn = TeacherLoss(teacher, x, cfg, shape)
    batches = [loss_fn.make_batch(10_000 + i) for i in range(8)]
    after = torch.tensor([loss_fn.batch_loss(teacher, b).item() for b in batches])
    untrained = TeacherCNF.build(
        "mlp", dim=66, backbone_options=cfg.model.backbone_options(), transform=teacher.transform
    )
    before = torch.tensor([loss_fn.batch_loss(untrained, b).item() for b in batches])
    # paired over the same 8 batches: the mean drop must exceed 3 standard errors of the
    # per-batch drops (independent coupling leaves a large irreducible loss, so the drop is a
    # modest fraction: 200 steps gave 8.19 -> 7.53 summed per batch with standardised dihedrals)
    drop = before - after
    assert drop.mean() > 3 * drop.std() / math.sqrt(len(drop)), (before, after)
    # z of the data: dihedrals in [-pi, pi), bonds and angles standardised
    z = loss_fn.data
    assert float(z[:, teacher.periodic].abs().max()) <= math.pi
    assert abs(float(z[:, ~teacher.periodic].std()) - 1) < 0.05
    loaded = TeacherCNF.load(tmp_path, system="aldp")
    out = loaded.sample_with_stats(16, seed=0)  # the config's dopri5 with exact trace
    assert bool(torch.isfinite(out.log_q).all()) and out.x.shape == (16, 66)
    assert bool(torch.isfinite(loaded.log_prob(x[:8])).all())
    wrapped = wrap_columns(torch.tensor([[3.5, 3.5]]), torch.tensor([True, False]))
    assert wrapped[0].tolist() == pytest.approx([3.5 - 2 * math.pi, 3.5])


def test_cli_train_sample_nll(aldp_frames: torch.Tensor, tmp_path, capsys):
    """``boltzflow train teacher`` with the internal config's smoke profile, then ``sample``
    (Cartesian x with OpenMM energies) and ``nll`` on the run folder."""
    from boltzflow.cli import main as cli
    from boltzflow.io.samples import read_samples

    np.save(tmp_path / "aldp.npy", aldp_frames.numpy())
    run = tmp_path / "run"
    args = ["train", "teacher", "--data", str(tmp_path / "aldp.npy"), "--config", str(CONFIG)]
    # the config names no system (it fits either ALDP force field): without one, a clear error
    assert cli([*args, "--profile", "smoke", "-o", str(run)]) == 2
    assert "name the system with --system" in capsys.readouterr().err
    assert cli([*args, "--system", "aldp", "--profile", "smoke", "-o", str(run)]) == 0
    assert cli(["sample", str(run), "-n", "4", "-o", str(tmp_path / "s.h5")]) == 0
    samples = read_samples(tmp_path / "s.h5")
    assert samples.x.shape == (4, 66) and np.isfinite(samples.log_q).all()
    assert samples.u is not None and np.isfinite(samples.log_w).all()
    capsys.readouterr()
    assert cli(["nll", str(run), "--data", str(tmp_path / "aldp.npy"), "-n", "8"]) == 0
    assert "rigid motions integrated out, 60 internal coordinates" in capsys.readouterr().out


# --- the trigonometric (variance-preserving) path --------------------------------------------
def test_trig_path_velocity_is_the_time_derivative_and_keeps_the_geodesic():
    periodic = torch.tensor([False, True, False])
    gen = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, generator=gen, dtype=F64)
    x1 = torch.randn(5, 3, generator=gen, dtype=F64)
    x1[:, 1] = torch.tensor([3.0, -3.0, 0.5, 2.0, -1.0], dtype=F64)
    t = torch.rand(5, generator=gen, dtype=F64) * 0.9 + 0.05
    _, ut = interpolate(x0, x1, t, periodic=periodic, path="trig")
    h = 1e-6
    xp, _ = interpolate(x0, x1, t + h, periodic=periodic, path="trig")
    xm, _ = interpolate(x0, x1, t - h, periodic=periodic, path="trig")
    fd = (xp - xm) / (2 * h)
    torch.testing.assert_close(ut[:, [0, 2]], fd[:, [0, 2]], atol=1e-8, rtol=0)
    _, u_lin = interpolate(x0, x1, t, periodic=periodic)  # the angle column is unchanged
    torch.testing.assert_close(ut[:, 1], u_lin[:, 1], atol=0, rtol=0)
    for t_end, x_end in ((0.0, x0), (1.0, x1)):
        xe, _ = interpolate(x0, x1, torch.full((5,), t_end, dtype=F64), path="trig")
        torch.testing.assert_close(xe, x_end, atol=1e-15, rtol=0)
    with pytest.raises(ValueError, match="unknown interpolant path"):
        interpolate(x0, x1, t, path="cosine")


def test_trig_path_has_no_marginal_velocity_between_equal_gaussians():
    """x0, x1 iid N(0, 1): x_t stays N(0, 1) and the regression target is uncorrelated with x_t,
    so the best field is 0; the linear path's target correlates with x_t (its marginal velocity
    is x (2t - 1) / ((1 - t)^2 + t^2)). Tolerances: 5 standard errors of the sample moments."""
    n = 200_000
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(n, 1, generator=gen, dtype=F64)
    x1 = torch.randn(n, 1, generator=gen, dtype=F64)
    t = torch.full((n,), 0.8, dtype=F64)
    se = 5 / math.sqrt(n)
    xt, ut = interpolate(x0, x1, t, path="trig")
    assert abs(xt.var().item() - 1) < 5 * math.sqrt(2 / n)
    assert abs((xt * ut).mean().item()) < 2 * se  # E[x_t u] = 0 (|u| ~ pi/2)
    xt, ut = interpolate(x0, x1, t)
    slope = (2 * 0.8 - 1) / (0.2**2 + 0.8**2)
    expected = slope * (xt**2).mean().item()
    assert abs((xt * ut).mean().item() - expected) < 2 * se
    assert expected > 0.5
