"""The NF student: Student interface on the mean-free subspace, parameter ratio, persistence."""

from __future__ import annotations

import math

import pytest
import torch

from boltzflow.distill.base import load_student
from boltzflow.distill.nf import NFModelConfig, NFStudent
from boltzflow.distill.nf_losses import latent_pairs
from boltzflow.flows.coupling import MeanFreeBasis
from boltzflow.systems.particles import remove_mean

#: the architectures of workflows/nf_distillation_dw4.py
TEACHER = NFModelConfig(blocks=8, hidden=128, depth=2)
STUDENT = NFModelConfig(blocks=4, hidden=64, depth=2)


def _dw4_student(config: NFModelConfig = STUDENT, scale: float = 1.7) -> NFStudent:
    config = NFModelConfig(**{**config.__dict__, "scale": scale})
    model = NFStudent.build(
        config, dim=8, n_particles=4, spatial_dim=2, mean_free=True, system="dw4"
    )
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in model.flow.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model


def test_sample_is_mean_free_and_log_q_consistent():
    model = _dw4_student()
    x, log_q = model.sample(64, seed=0)
    assert x.shape == (64, 8) and log_q.shape == (64,)
    assert float(x.reshape(64, 4, 2).mean(1).abs().max()) < 1e-5
    x2, _ = model.sample(64, seed=0)
    assert torch.equal(x, x2)
    torch.testing.assert_close(model.log_prob(x), log_q, atol=2e-4, rtol=0)
    with pytest.raises(ValueError, match="not mean-free"):
        model.log_prob(x + 1.0)


def test_subspace_log_det_matches_jacobian():
    """log q is a density on the 6-dim mean-free subspace: the change of variables with the
    Jacobian of the map restricted to the subspace (through the orthonormal basis)."""
    model = _dw4_student().double()
    basis = MeanFreeBasis(4, 2)
    x = remove_mean(torch.randn(3, 8, dtype=torch.float64), 4, 2)
    z, ladj = (t.detach() for t in model.pull(x, 1))
    for i in range(3):
        jac = torch.autograd.functional.jacobian(
            lambda y: basis.to_subspace(model.pull(basis.from_subspace(y[None]), 1)[0])[0],
            basis.to_subspace(x[i : i + 1])[0],
        )
        # pull returns log|det dx/dz|, the noise -> data direction
        expected = -torch.linalg.slogdet(jac).logabsdet
        assert abs(float(ladj[i] - expected)) < 1e-8, (float(ladj[i]), float(expected))
    # data units: log q(x) = log N_6(z) - ladj - 6 log(scale)
    lq = model.log_prob(x * model.scale)
    ref = -0.5 * z.square().sum(-1) - 3 * math.log(2 * math.pi) - ladj - 6 * math.log(model.scale)
    torch.testing.assert_close(lq, ref, atol=1e-10, rtol=0)


def test_parameter_ratio_of_workflow_architectures_is_at_least_four():
    teacher = NFStudent.build(TEACHER, dim=8, n_particles=4, spatial_dim=2, mean_free=True)
    student = NFStudent.build(STUDENT, dim=8, n_particles=4, spatial_dim=2, mean_free=True)
    ratio = teacher.n_parameters / student.n_parameters
    assert ratio >= 4, f"teacher {teacher.n_parameters} / student {student.n_parameters} = {ratio}"


def test_latent_pairs():
    assert latent_pairs(2, 8) == [(0, 3), (1, 7)]
    assert latent_pairs(3, 3) == [(0, 0), (1, 1), (2, 2)]
    assert latent_pairs(1, 5) == [(0, 4)]
    with pytest.raises(ValueError, match="student blocks <= teacher blocks"):
        latent_pairs(4, 2)


def test_save_load_round_trip_and_wrong_system(tmp_path):
    model = _dw4_student()
    path = model.save(tmp_path / "student.pt")
    x, _ = model.sample(16, seed=1)
    for loaded in (load_student(path, system="dw4"), NFStudent.load(tmp_path)):
        assert isinstance(loaded, NFStudent) and loaded.system == "dw4"
        assert loaded.scale == model.scale
        torch.testing.assert_close(loaded.log_prob(x), model.log_prob(x), atol=0, rtol=0)
    with pytest.raises(ValueError, match="trained for system 'dw4', not 'lj13'"):
        load_student(path, system="lj13")


def test_non_particle_system_uses_full_space():
    model = NFStudent.build(NFModelConfig(blocks=1, hidden=8), dim=3)
    assert model.event_dim == 3 and model.basis is None
    x, lq = model.sample(5, seed=0)
    # identity at initialisation: standard normal density
    ref = -0.5 * x.square().sum(-1) - 1.5 * math.log(2 * math.pi)
    torch.testing.assert_close(lq, ref, atol=1e-5, rtol=0)


def test_nf_student_loads_in_a_fresh_process(tmp_path):
    """``import boltzflow.distill`` registers the "nf" kind (no import of distill.nf needed)."""
    import subprocess
    import sys

    student = NFStudent.build(NFModelConfig(blocks=1, hidden=8), dim=6, system=None)
    student.save(tmp_path / "student.pt")
    code = (
        "import sys; from boltzflow.distill import load_student; "
        "print(type(load_student(sys.argv[1])).__name__)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "student.pt")],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "NFStudent"
