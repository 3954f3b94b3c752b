"""Flow-map students and Euler baselines of an internal-coordinate teacher (issue #23).

A tiny ALDP teacher on internal coordinates (TorusMLP 2 x 32, 40 flow-matching steps on
synthetic frames; :mod:`tests.tiny_internal`: 7 dihedrals periodic, 12 standardised) is distilled
through the method registry. For F2D2, FALCON, ``euler`` and ``euler-exact``: the student lives on
the teacher's z with a two-time TorusMLP started as the teacher's Euler step; shapes and finite
log q; Cartesian log q = internal log q minus the transform's log-det; a jump from z and from
z + 2π e_k is the same point on a periodic column; FALCON's Newton inverse across ±π; the 1-step
``euler-exact`` density against the teacher's Euler step computed directly; save/load and
``boltzflow distill``/``sample`` on run folders.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_internal import SYSTEM, trained_teacher
from torch.autograd.functional import jacobian

from boltzflow.distill.base import Student
from boltzflow.distill.baselines import EulerBaseline
from boltzflow.distill.falcon import FALCON, falcon_likelihood_loss
from boltzflow.distill.flowmap import time_grid
from boltzflow.distill.train_students import StudentConfig, flow_energy
from boltzflow.distill.trajectories import Trajectories, teacher_trajectories
from boltzflow.flows.cnf import TeacherCNF
from boltzflow.flows.flow_matching import wrap_columns
from boltzflow.nn import TorusMLP
from boltzflow.registry.loading import load_model
from boltzflow.registry.methods import METHODS
from boltzflow.systems.internal_coords import internal_from_cartesian

pytest.importorskip("openmm")

KINDS = ("f2d2", "falcon", "euler", "euler-exact")
CONFIGS = Path(__file__).resolve().parents[2] / "workflows" / "configs"
F64 = torch.float64
TWO_PI = 2 * math.pi


def _nudge(module: torch.nn.Module, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=p.dtype))


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, TeacherCNF]:
    """The tiny teacher trained a few steps, and its run folder."""
    run = tmp_path_factory.mktemp("teacher")
    return run, trained_teacher(run)


@pytest.fixture(scope="module")
def teacher(teacher_run: tuple[Path, TeacherCNF]) -> TeacherCNF:
    """The trained teacher with its output layer randomised: velocities of order 1 rad per
    unit time, so that jumps cross ±pi (a few training steps leave them near 0.01)."""
    model = copy.deepcopy(teacher_run[1])
    _nudge(model.net.net[-1], 0.6, 11)
    with torch.no_grad():
        v = model.net(torch.tensor(0.5), model.prior.sample(64, generator=torch.Generator()))
    assert 0.3 < float(v.abs().mean()) < 3
    return model


def _student(kind: str, teacher: TeacherCNF, *, nudge: bool = True) -> Student:
    method = METHODS[kind]
    model = method.build(method.new_config(), teacher, system=SYSTEM)
    if nudge and kind in ("f2d2", "falcon"):  # no longer the teacher's Euler step
        _nudge(model, 0.02, 3)
    return model


@pytest.fixture(scope="module")
def students(teacher: TeacherCNF) -> dict[str, Student]:
    return {kind: _student(kind, teacher) for kind in KINDS}


def _periodic_columns(model: Student) -> list[int]:
    return model.periodic.nonzero().flatten().tolist()


def test_students_live_on_the_teachers_internal_coordinates(
    teacher: TeacherCNF, students: dict[str, Student]
) -> None:
    for kind, model in students.items():
        assert model.dim == 66 and model.event_dim == 60 and not model.mean_free, kind
        assert model.transform.to_dict() == teacher.transform.to_dict(), kind
        assert torch.equal(model.periodic, teacher.periodic) and int(model.periodic.sum()) == 7
        assert model.log_q_convention and "rigid motions" in model.log_q_convention
        assert not any(k.startswith("transform") for k in model.state_dict()), kind
    for kind in ("f2d2", "falcon"):
        net = students[kind].net
        assert isinstance(net, TorusMLP) and net.time_embedding.n_times == 2
        assert net.periodic == tuple(_periodic_columns(teacher))
        assert students[kind].model_config["representation"] == "internal"


def test_teacher_initialisation_makes_the_student_the_teachers_euler_step(
    teacher: TeacherCNF,
) -> None:
    z = teacher.prior.sample(6, generator=torch.Generator().manual_seed(1))
    s, t = torch.full((6,), 0.25), torch.full((6,), 0.75)
    v0 = teacher.net(torch.zeros(6), z)
    euler = wrap_columns(z + v0, teacher.periodic)
    for kind in ("f2d2", "falcon"):
        model = _student(kind, teacher, nudge=False)
        assert torch.allclose(model.net(t, z, s=s), teacher.net(s, z), atol=1e-6), kind
        y, _ = model.push(z, 1)
        assert torch.allclose(y, euler, atol=1e-5), kind
    # one FALCON step is the Euler map itself: same samples and exact log-det as euler-exact
    falcon = _student("falcon", teacher, nudge=False)
    xs, lq = falcon.sample(4, steps=1, seed=0)
    xe, lqe = _student("euler-exact", teacher).sample(4, steps=1, seed=0)
    assert torch.allclose(xs, xe, atol=1e-5) and torch.allclose(lq, lqe, atol=1e-4)


@pytest.mark.parametrize("kind", KINDS)
def test_shapes_finite_log_q_and_the_internal_column(kind: str, students: dict) -> None:
    model = students[kind]
    out = model.sample_with_stats(32, steps=2, seed=1, batch_size=20)
    assert out.x.shape == (32, 66) and out.log_q.shape == (32,)
    assert out.x.dtype == out.log_q.dtype == torch.float32
    assert torch.isfinite(out.x).all() and torch.isfinite(out.log_q).all()
    assert set(out.columns) == {"log_q_internal"} and out.nfe_per_batch == 2
    a0 = model.transform.zmatrix.atoms[0]
    assert out.x.reshape(32, 22, 3)[:, a0].abs().max() == 0  # the standard frame
    scored = model.log_prob(out.x, steps=2)
    assert scored.shape == (32,) and torch.isfinite(scored).all()


@pytest.mark.parametrize("kind", KINDS)
def test_cartesian_log_q_is_internal_log_q_minus_the_transforms_log_det(
    kind: str, students: dict
) -> None:
    """log q(x) = log q(z) - log det d(x)/d(z) of the transform, with the log-det written out
    from the geometry: 2 sum log r + sum log sin(theta) + sum log sigma."""
    model = students[kind]
    out = model.sample_with_stats(16, steps=2, seed=2)
    z0 = model.prior.sample(16, generator=torch.Generator().manual_seed(2))
    y, ladj = model.push(z0, 2)
    assert float(y[:, model.periodic].abs().max()) <= math.pi  # wrapped after every jump
    log_q_z = (model.prior.log_prob(z0) - ladj).double()
    ic = model.transform
    x_ref, _ = ic.inverse(y.double())
    bonds, angles, _ = internal_from_cartesian(x_ref, ic.zmatrix)
    log_j = 2 * bonds.log().sum(-1) + angles.sin().log().sum(-1)
    log_sigma = ic.bond_std.log().sum() + ic.angle_std.log().sum() + ic.dihedral_std.log().sum()
    assert float(ic.dihedral_std.log().sum()) < -1  # standardised dihedrals count here too
    torch.testing.assert_close(out.x.double(), x_ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.log_q.double(), log_q_z - log_j - log_sigma, atol=1e-3, rtol=0)
    internal = out.columns["log_q_internal"].double()
    torch.testing.assert_close(internal - out.log_q.double(), log_j, atol=1e-3, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_sample_from_is_the_sampler_and_differentiable(kind: str, students: dict) -> None:
    """``sample_from`` on the prior draw of ``sample`` gives its x and log q; its gradient in z
    (through the jumps, the log-det and the transform, as latent SMC needs) matches central
    finite differences in float64."""
    model = students[kind]
    x, lq = model.sample(8, steps=2, seed=3)
    z = model.prior.sample(8, generator=torch.Generator().manual_seed(3))
    xs, lqs = model.sample_from(z, 2)
    assert torch.equal(xs, x) and torch.equal(lqs, lq)
    model64 = copy.deepcopy(model).double()
    z64 = z.double()[:2]
    direction = torch.randn(z64.shape, generator=torch.Generator().manual_seed(4), dtype=F64)

    def scalar(zz: torch.Tensor) -> torch.Tensor:
        xx, ll = model64.sample_from(zz, 2)
        return (xx * torch.arange(66, dtype=F64)).sum() / 66 + ll.sum()

    zg = z64.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(scalar(zg), zg)
    eps = 1e-5
    with torch.no_grad():
        fd = (scalar(z64 + eps * direction) - scalar(z64 - eps * direction)) / (2 * eps)
    assert float(abs((grad * direction).sum() - fd)) < 1e-5 * (1 + float(abs(fd))), kind


@pytest.mark.parametrize("kind", KINDS)
def test_a_jump_is_invariant_to_2pi_shifts_of_a_periodic_column(kind: str, students: dict):
    model = students[kind]
    z = model.prior.sample(8, generator=torch.Generator().manual_seed(4), dtype=F64)
    model64 = copy.deepcopy(model).double()
    y, ladj = model64.push(z, 1)
    for k in _periodic_columns(model):
        for shift in (TWO_PI, -2 * TWO_PI):
            z2 = z.clone()
            z2[:, k] += shift
            y2, ladj2 = model64.push(z2, 1)
            diff = model64.wrap_difference(y2 - y)
            assert float(diff.abs().max()) < 1e-10, (kind, k)
            assert float((ladj2 - ladj).abs().max()) < 1e-9, (kind, k)
    # a standardised dihedral is a real line: shifting it moves the point
    flat = int((~model.periodic).nonzero()[-1])
    z3 = z.clone()
    z3[:, flat] += TWO_PI
    y3, _ = model64.push(z3, 1)
    assert float((y3 - y)[:, flat].abs().min()) > 1.0


def test_falcon_newton_inverse_round_trips_across_pi(students: dict) -> None:
    """Noise whose periodic columns sit next to ±pi, pushed in 2 steps (some jumps wrap), is
    recovered by the Newton preimages, with the same log-det; Cartesian log_prob of FALCON's
    own samples is their log q, also for rigidly moved copies."""
    model: FALCON = copy.deepcopy(students["falcon"]).double()
    per = model.periodic
    z0 = model.prior.sample(24, generator=torch.Generator().manual_seed(5), dtype=F64)
    edge = torch.where(torch.arange(24)[:, None] % 2 == 0, math.pi - 0.01, -math.pi + 0.01)
    z0[:, per] = edge.expand(24, int(per.sum())).clone().to(F64)
    y, ladj = model.push(z0, 2)
    grid = time_grid(2, like=z0)
    unwrapped = model.flow_map(model.flow_map(z0, grid[0], grid[1]), grid[1], grid[2])
    crossed = (unwrapped - y)[:, per].abs() > 1
    assert int(crossed.sum()) >= 10, "the test points must cross ±pi"
    back, ladj_back, res = model.exact_pull(y, 2, tol=1e-10)
    assert float(res.max()) < 1e-10
    assert float(model.wrap_difference(back - z0).abs().max()) < 1e-8
    assert float(back[:, per].abs().max()) <= math.pi
    torch.testing.assert_close(ladj_back, ladj, atol=1e-8, rtol=0)
    assert torch.isfinite(model.inversion_error(z0, 2)).all()  # learned backward map: untrained
    # maximum likelihood under the sampler: every preimage found, finite loss
    loss, dropped = falcon_likelihood_loss(model, y, 2)
    assert dropped == 0.0 and torch.isfinite(loss)
    # Cartesian points in float32: log_prob (Newton preimages) equals the returned log q
    f32 = students["falcon"]
    x, log_q = f32.sample(16, steps=2, seed=6)
    assert float((f32.log_prob(x, steps=2) - log_q).abs().max()) < 1e-3
    rot = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(0)))[0]
    rot = rot * torch.det(rot)  # a proper rotation
    moved = (x.reshape(16, 22, 3) @ rot.T + torch.tensor([0.3, -1.0, 2.0])).reshape(16, 66)
    assert float((f32.log_prob(moved, steps=2) - log_q).abs().max()) < 1e-3


def test_one_step_euler_exact_density_is_the_teachers_euler_step(teacher: TeacherCNF) -> None:
    """K = 1: z1 = wrap(z0 + v(0, z0)), log q(z1) = log p(z0) - log|det(I + dv/dz)| (the 60 x 60
    Jacobian by autograd), then the transform's log-det; the Euler rule uses tr(dv/dz)."""
    teacher64 = copy.deepcopy(teacher).double()
    n, seed = 5, 3
    z0 = teacher64.prior.sample(n, generator=torch.Generator().manual_seed(seed), dtype=F64)
    t0 = torch.zeros((), dtype=F64)
    expected = {}
    with torch.no_grad():
        z1 = wrap_columns(z0 + teacher64.net(t0, z0), teacher64.periodic)
    jac = torch.stack(
        [jacobian(lambda z: z + teacher64.net(t0, z[None])[0], z0[i]) for i in range(n)]
    )
    x_ref, log_det_ic = teacher64.transform.inverse(z1)
    base = teacher64.prior.log_prob(z0)
    eye = torch.eye(60, dtype=F64)
    expected["euler-exact"] = base - torch.linalg.slogdet(jac)[1] - log_det_ic
    expected["euler"] = base - torch.diagonal(jac - eye, dim1=1, dim2=2).sum(-1) - log_det_ic
    for kind, want in expected.items():
        model = EulerBaseline(teacher64, logdet="exact" if kind == "euler-exact" else "euler")
        out = model.sample_with_stats(n, steps=1, seed=seed)
        torch.testing.assert_close(out.x, x_ref, atol=1e-12, rtol=0)
        torch.testing.assert_close(out.log_q, want, atol=1e-9, rtol=0)
    assert float((expected["euler"] - expected["euler-exact"]).abs().max()) > 1e-3


def test_trajectories_keep_the_continuous_path_and_give_wrapped_pairs(
    teacher: TeacherCNF, tmp_path: Path
) -> None:
    tr = teacher_trajectories(teacher, 16, grid=4, atol=1e-4, rtol=1e-4, batch_size=16)
    per = teacher.periodic
    assert torch.equal(tr.periodic, per)
    assert float(tr.x[:, 0][:, per].abs().max()) <= math.pi  # prior points in [-pi, pi)
    assert float(tr.x[:, -1][:, per].abs().max()) > math.pi  # the path is not wrapped
    idx = torch.arange(16)
    i0, i1 = torch.full((16,), 4), torch.full((16,), 1)  # a backward pair, t = 1 -> 0.25
    x_s, x_t = tr.pairs(idx, i0, i1)
    assert float(x_s[:, per].abs().max()) <= math.pi
    torch.testing.assert_close(x_t - x_s, tr.x[idx, 1] - tr.x[idx, 4])
    assert float(tr.points(idx, i0)[:, per].abs().max()) <= math.pi
    assert float(tr.ends()[:, per].abs().max()) <= math.pi
    tr.save(tmp_path / "tr.pt")
    loaded, _ = Trajectories.load(tmp_path / "tr.pt")
    assert torch.equal(loaded.periodic, per) and torch.equal(loaded.x, tr.x)


def test_energy_of_z_gives_the_cartesian_reverse_kl(students: dict) -> None:
    """The energy FALCON's ``loss.energy`` sees on z is u(x(z)) - log J - sum log sigma, so
    log q(z) + energy(z) equals log q(x) + u(x) of the Cartesian samples."""

    class Quadratic:
        def energy(self, x: torch.Tensor) -> torch.Tensor:
            return 10.0 * x.square().sum(-1)

    model = students["falcon"]
    energy = flow_energy(model, Quadratic())
    out = model.sample_with_stats(8, steps=2, seed=7)
    z0 = model.prior.sample(8, generator=torch.Generator().manual_seed(7))
    y, ladj = model.push(z0, 2)
    lhs = (model.prior.log_prob(z0) - ladj).double() + energy(y.double())
    rhs = out.log_q.double() + Quadratic().energy(out.x.double())
    torch.testing.assert_close(lhs, rhs, atol=2e-3, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_round_trip_and_sample_command(
    kind: str, students: dict, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from boltzflow.cli import main
    from boltzflow.io.samples import read_samples

    model = students[kind]
    run = tmp_path / "run"
    path = model.save(run / "student.pt")
    loaded = load_model(run, system=SYSTEM)
    assert type(loaded) is type(model) and loaded.system == SYSTEM
    assert loaded.transform.to_dict() == model.transform.to_dict()
    x, log_q = model.sample(6, steps=2, seed=2)
    x2, log_q2 = loaded.sample(6, steps=2, seed=2)
    assert torch.equal(x, x2) and torch.equal(log_q, log_q2)
    with pytest.raises(ValueError, match="trained for system 'aldp', not 'dw4'"):
        load_model(path, system="dw4")
    out = tmp_path / "s.h5"
    args = ["sample", str(run), "--steps", "2", "-n", "6", "-o", str(out), "--seed", "2"]
    assert main(args) == 0
    assert "ESS/N" in capsys.readouterr().out
    stored = read_samples(out)
    assert stored.x.shape == (6, 66) and np.allclose(stored.x, x.double().numpy())
    assert "log_q_internal" in stored.columns and np.isfinite(stored.log_w).all()


@pytest.mark.parametrize("method", ["f2d2", "falcon", "euler-exact"])
def test_distill_command_on_the_internal_teacher(
    method: str, teacher_run: tuple[Path, TeacherCNF], tmp_path: Path
) -> None:
    """``boltzflow distill`` with the ALDP internal configs' smoke profile (a 4-interval
    trajectory cache and 6 steps), then ``boltzflow sample --steps 2`` on the run folder."""
    from boltzflow.cli import main
    from boltzflow.io.samples import read_samples

    run = tmp_path / method
    args = ["distill", str(teacher_run[0]), "--method", method, "-o", str(run)]
    if method != "euler-exact":
        config = CONFIGS / f"student_{method}_aldp_internal.toml"
        args += ["--config", str(config), "--profile", "smoke"]
    assert main(args) == 0
    student = load_model(run, system=SYSTEM)
    assert student.transform is not None and student.system == SYSTEM
    if method != "euler-exact":
        traj, _ = Trajectories.load(run / "trajectories.pt")
        assert traj.x.shape == (64, 5, 60) and torch.equal(traj.periodic, student.periodic)
    out = tmp_path / "s.h5"
    assert main(["sample", str(run), "--steps", "2", "-n", "4", "-o", str(out)]) == 0
    stored = read_samples(out)
    assert stored.x.shape == (4, 66) and np.isfinite(stored.log_q).all()


def test_internal_configs_are_for_aldp() -> None:
    from boltzflow.distill.train_students import load_student_config

    for method in ("f2d2", "falcon"):
        for profile in (None, "smoke"):
            cfg = load_student_config(CONFIGS / f"student_{method}_aldp_internal.toml", profile)
            assert isinstance(cfg, StudentConfig) and cfg.system == SYSTEM
            assert cfg.method == method and cfg.student.init_from_teacher


def test_the_cartesian_nf_method_refuses_an_internal_teacher(teacher: TeacherCNF) -> None:
    method = METHODS["nf"]
    with pytest.raises(ValueError, match="internal coordinates"):
        method.build(method.new_config(), teacher, system=SYSTEM)


def test_falcon_from_cartesian_data_trains_on_z(teacher: TeacherCNF, tmp_path: Path) -> None:
    """``loss.target = "data"``: Cartesian frames (any rigid placement) are mapped to the
    teacher's z, coupled by the wrapped OT and interpolated along the torus geodesic."""
    from tiny_internal import aldp_frames

    from boltzflow.distill.train_students import train_student
    from boltzflow.io.tomlfile import dataclass_from_dict

    table = {
        "method": "falcon",
        "system": SYSTEM,
        "loss": {"target": "data", "pairs": 0.0},
        "train": {"steps": 3, "batch_size": 16, "warmup_steps": 1, "log_every": 1},
    }
    cfg = dataclass_from_dict(StudentConfig, table)
    student = train_student(cfg, teacher, tmp_path, data=aldp_frames(64, seed=1), progress=False)
    assert student.transform is not None and (tmp_path / "student.pt").is_file()
    x, log_q = student.sample(4, steps=2, seed=0)
    assert x.shape == (4, 66) and torch.isfinite(log_q).all()
