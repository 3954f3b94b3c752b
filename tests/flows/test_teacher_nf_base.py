"""A teacher CNF on the latent of a trained internal-coordinate NF (``model.base_nf``).

The composite flow prior -> CNF -> NF -> z -> x must keep one exact density: its samples' log q
equals ``log_prob`` of the same points, a CNF that does not move (zero velocity) gives exactly the
NF's density, the base flow survives save/load bit for bit and is never trained (nor moved by the
EMA), and students refuse such a teacher instead of decoding its latent as internal coordinates.
"""

from __future__ import annotations

import copy

import pytest
import torch

from boltzflow.distill.nf_internal import ICNFModelConfig, InternalNFStudent
from boltzflow.flows.cnf import TeacherCNF
from boltzflow.train.config import load_teacher_config
from boltzflow.train.teacher import SystemShape, TeacherLoss, train_teacher
from tests.tiny_internal import SYSTEM, TEACHER_CONFIG, aldp_frames, aldp_transform

F64 = torch.float64
CONFIGS = TEACHER_CONFIG.parent
TIGHT = {"method": "dopri5", "atol": 1e-8, "rtol": 1e-8}


def _randomise(module: torch.nn.Module, seed: int, std: float) -> None:
    """Non-zero weights everywhere (flows start at the identity)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)


@pytest.fixture(scope="module")
def nf() -> InternalNFStudent:
    """A small random (non-identity) internal-coordinate NF on the tiny ALDP transform."""
    torch.manual_seed(0)
    config = ICNFModelConfig(blocks=1, hidden=8, depth=1, standardize_dihedrals=0.5)
    model = InternalNFStudent.build(config, aldp_transform(), system=SYSTEM)
    _randomise(model.flow, 1, std=0.05)
    return model


def _teacher(nf: InternalNFStudent, *, moving: bool) -> TeacherCNF:
    teacher = TeacherCNF.build(
        "mlp",
        dim=66,
        backbone_options={"hidden": 16, "layers": 2},
        transform=aldp_transform(),
        base_flow=copy.deepcopy(nf.flow),
    )
    if moving:
        _randomise(teacher.net, 2, std=0.1)
    teacher.system = SYSTEM
    return teacher


def test_a_still_cnf_gives_the_nf_density(nf: InternalNFStudent):
    """Zero velocity: the composite is the NF itself, sample for sample and density for
    density (same prior draw; only the ODE's round-off separates them)."""
    teacher = _teacher(nf, moving=False).double()
    nf64 = copy.deepcopy(nf).double()
    x, log_q = teacher.sample(6, seed=3, **TIGHT)
    assert bool(torch.isfinite(log_q).all())
    torch.testing.assert_close(nf64.log_prob(x), log_q, atol=1e-8, rtol=0)
    x_nf, log_q_nf = nf64.sample(6, seed=3)
    torch.testing.assert_close(x, x_nf, atol=1e-10, rtol=0)
    torch.testing.assert_close(log_q, log_q_nf, atol=1e-8, rtol=0)


def test_composite_log_prob_matches_sample_log_q(nf: InternalNFStudent):
    """A moving CNF on a non-trivial base: log_prob of the samples equals their log q (dopri5
    at 1e-8 in float64: 1e-5 nats), and differs from the NF's by far more."""
    teacher = _teacher(nf, moving=True).double()
    x, log_q = teacher.sample(6, seed=4, **TIGHT)
    torch.testing.assert_close(teacher.log_prob(x, **TIGHT), log_q, atol=1e-5, rtol=0)
    nf_log_q = copy.deepcopy(nf).double().log_prob(x)
    assert (nf_log_q - log_q).abs().max() > 1e-2
    # to_cartesian is the inverse of to_flow, log-dets included
    e, log_det = teacher.to_flow(x)
    x_back, minus = teacher.to_cartesian(e)
    z, _ = teacher.to_internal(x)
    z_back, _ = teacher.to_internal(x_back)
    torch.testing.assert_close(z_back, z, atol=1e-9, rtol=0)
    torch.testing.assert_close(minus, -log_det, atol=1e-9, rtol=0)


def test_save_load_keeps_the_frozen_base(nf: InternalNFStudent, tmp_path):
    teacher = _teacher(nf, moving=True)
    assert not any(p.requires_grad for p in teacher.base_flow.parameters())
    assert all(p.requires_grad for p in teacher.net.parameters())
    assert teacher.model_config["base_flow"] == nf.flow.config()
    path = teacher.save(tmp_path / "teacher.pt")
    loaded = TeacherCNF.load(path, system=SYSTEM)
    for k, v in teacher.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert any(k.startswith("base_flow.") for k in loaded.state_dict())
    settings = {"method": "rk4", "steps": 3}
    a, b = teacher.sample(4, seed=1, **settings), loaded.sample(4, seed=1, **settings)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_base_flow_must_fit_the_transform(nf: InternalNFStudent):
    from boltzflow.flows.coupling import CouplingFlow

    other = CouplingFlow(60, blocks=1, hidden=4, periodic=[0, 1])
    with pytest.raises(ValueError, match="does not match the internal coordinates"):
        TeacherCNF.build("mlp", dim=66, transform=aldp_transform(), base_flow=other)
    with pytest.raises(ValueError, match="needs internal coordinates"):
        TeacherCNF.build("mlp", dim=60, base_flow=copy.deepcopy(nf.flow))
    with pytest.raises(ValueError, match="base_nf needs representation"):
        cfg = load_teacher_config(TEACHER_CONFIG, "smoke")
        type(cfg.model)(backbone="mlp", base_nf="x.pt")


def test_students_refuse_a_teacher_with_an_nf_base(nf: InternalNFStudent):
    from boltzflow.distill.baselines import EulerBaseline
    from boltzflow.distill.train_students import build_student, load_student_config

    teacher = _teacher(nf, moving=False)
    with pytest.raises(ValueError, match=r"an Euler baseline cannot be built .* NF base"):
        EulerBaseline(teacher)
    for method in ("f2d2", "falcon"):
        cfg = load_student_config(CONFIGS / f"student_{method}_aldp_internal.toml", "smoke")
        with pytest.raises(ValueError, match=f"a {method} student cannot be built"):
            build_student(cfg, teacher, system=SYSTEM)


def test_training_on_the_nf_latent(nf: InternalNFStudent, tmp_path):
    """``model.base_nf`` in the config: the run uses the NF's transform and flow, trains only the
    CNF on the NF latents of the data, and leaves the base weights exactly as they were."""
    nf_path = nf.save(tmp_path / "nf.pt")
    cfg = load_teacher_config(TEACHER_CONFIG, "smoke")
    cfg.model.base_nf = str(nf_path)
    cfg.train.steps, cfg.train.batch_size, cfg.train.log_every = 20, 32, 10
    cfg.train.checkpoint_every = 10
    shape = SystemShape.from_name(SYSTEM)
    x = aldp_frames(64, seed=5).float()
    teacher = train_teacher(
        cfg, x, tmp_path / "run", shape, progress=False, run_info={"system": SYSTEM}
    )
    assert teacher.base_flow is not None
    assert teacher.transform.to_dict() == nf.ic.to_dict()
    for k, v in nf.flow.state_dict().items():
        assert torch.equal(teacher.base_flow.state_dict()[k], v), k
    changed = [not torch.equal(p, 0 * p) for p in teacher.net.parameters()]
    assert any(changed)  # the output layer started at zero and was trained
    loss = TeacherLoss(teacher, x, cfg, shape)
    with torch.no_grad():
        z, _ = nf.ic(x.double())
        e, _ = nf.flow.encode(z.float())
    torch.testing.assert_close(loss.data, e, atol=1e-5, rtol=0)
    loaded = TeacherCNF.load(tmp_path / "run", system=SYSTEM)
    out = loaded.sample_with_stats(4, seed=0)
    assert out.x.shape == (4, 66) and bool(torch.isfinite(out.log_q).all())
    with pytest.raises(ValueError, match="checkpoint kind 'teacher_cnf'"):
        cfg.model.base_nf = str(tmp_path / "run" / "teacher.pt")
        train_teacher(cfg, x, tmp_path / "run2", shape, progress=False, run_info={"system": SYSTEM})


def test_shipped_config_trains_on_the_shipped_nf(tmp_path):
    """``teacher_aldp_internal_nfbase.toml`` (smoke profile) names the shipped NF as its base and
    the trig path; the recorded run config keeps both, and a few steps run end to end."""
    from boltzflow.train.config import TeacherConfig

    cfg = load_teacher_config(CONFIGS / "teacher_aldp_internal_nfbase.toml", "smoke")
    assert cfg.model.base_nf == "models/aldp-nf-internal" and cfg.flow_matching.path == "trig"
    again = TeacherConfig.from_dict(cfg.to_dict())
    assert again.model.base_nf == cfg.model.base_nf and again.flow_matching.path == "trig"
    cfg.model.base_nf = str(CONFIGS.parents[1] / cfg.model.base_nf)  # independent of the cwd
    x = aldp_frames(64, seed=6).float()
    shape = SystemShape.from_name(SYSTEM)
    teacher = train_teacher(cfg, x, tmp_path, shape, progress=False, run_info={"system": SYSTEM})
    assert teacher.base_flow is not None and teacher.periodic.sum() == 5  # ALDP's broad dihedrals
    out = teacher.sample_with_stats(4, seed=0)
    assert out.x.shape == (4, 66) and bool(torch.isfinite(out.log_q).all())


# --- drawing frames with the Boltzmann share of the positive-phi basin ------------------------
def test_basin_weights_give_the_basin_its_boltzmann_share():
    import math

    from boltzflow.analysis.free_energy import backbone_angles
    from boltzflow.data.seeded_md import in_positive_basin
    from boltzflow.systems.registry import load_system
    from boltzflow.train.teacher import basin_weights

    x = aldp_frames(256, seed=7)
    inside = torch.as_tensor(in_positive_basin(backbone_angles(load_system(SYSTEM), x)[0]))
    assert 0 < int(inside.sum()) < len(x)  # the tiny frames draw phi uniformly
    weights, summary = basin_weights(SYSTEM, x, 3.0)
    share = 1 / (1 + math.exp(3.0))
    assert weights.sum().item() == pytest.approx(1.0, abs=1e-12)
    assert weights[inside].sum().item() == pytest.approx(share, abs=1e-12)
    assert weights[inside].unique().numel() == 1 and weights[~inside].unique().numel() == 1
    assert summary["frames_in_basin"] == int(inside.sum())
    assert summary["share_drawn"] == pytest.approx(share)
    # the loss draws minibatches with that share: 40 batches of 512 (binomial, 5 se)
    cfg = load_teacher_config(TEACHER_CONFIG, "smoke")
    cfg.train.batch_size = 512
    teacher = TeacherCNF.build("mlp", dim=66, transform=aldp_transform())
    loss = TeacherLoss(teacher, x.float(), cfg, SystemShape.from_name(SYSTEM), weights)
    z_in = loss.data[inside]
    hits = 0
    for step in range(40):
        x1 = loss.make_batch(step)[1]
        hits += int((x1[:, None, :] == z_in[None]).all(-1).any(-1).sum())
    n = 40 * 512
    assert abs(hits / n - share) < 5 * math.sqrt(share * (1 - share) / n), hits / n
    with pytest.raises(ValueError, match="both sides need frames"):
        basin_weights(SYSTEM, x[~inside], 3.0)
    with pytest.raises(ValueError, match="needs a molecule with"):
        basin_weights("dw4", torch.zeros(4, 8), 3.0)
    with pytest.raises(ValueError, match="weights must be"):
        TeacherLoss(teacher, x.float(), cfg, SystemShape.from_name(SYSTEM), weights[:5])


def test_basin_free_energy_in_the_config_reaches_the_run_record(tmp_path):
    import json

    from boltzflow.train.config import TeacherConfig

    cfg = load_teacher_config(CONFIGS / "teacher_aldp_internal_nfbase.toml", "smoke")
    assert cfg.data.basin_free_energy == pytest.approx(3.84)
    assert TeacherConfig.from_dict(cfg.to_dict()).data.basin_free_energy == pytest.approx(3.84)
    with pytest.raises(ValueError, match=r"data\.basin_free_energy must be finite"):
        TeacherConfig.from_dict({"data": {"basin_free_energy": float("inf")}})
    cfg = load_teacher_config(TEACHER_CONFIG, "smoke")
    cfg.data.basin_free_energy = 2.0
    x = aldp_frames(64, seed=8).float()
    shape = SystemShape.from_name(SYSTEM)
    train_teacher(cfg, x, tmp_path, shape, progress=False, run_info={"system": SYSTEM})
    record = json.loads((tmp_path / "run.json").read_text())
    text = json.dumps(record)
    assert '"basin_weighting"' in text and '"share_drawn"' in text
