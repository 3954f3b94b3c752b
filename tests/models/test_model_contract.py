"""One contract for every model kind: the teacher CNF and every registered method.

Each kind is built small (an untrained EGNN 1 x 8 teacher on a DW4-shaped system, and each
method's default build from it, weights nudged by seeded noise so that no model is an identity)
and must: give (x, log q) of the right shapes and dtype, mean-free; reproduce its samples from a
seed; where log q is exact, score its own samples with the log q it returned; survive save ->
load unchanged; refuse a system it was not trained for; and reject bad counts, steps and NaN
inputs with a clear ValueError. A new method gets all of this by being registered in
:mod:`boltzflow.registry.methods`.

The same contract holds on internal coordinates (cases ``KIND-internal``): an untrained
TorusMLP 1 x 8 teacher on ALDP's internal coordinates (:mod:`tiny_internal`, 7 periodic and 12
standardised dihedrals) and every method built from it, with Cartesian x (nm, dim 66) out and the
extra column ``log_q_internal``; a method that cannot be built from such a teacher is listed in
:data:`CARTESIAN_ONLY` with the reason. These cases need OpenMM (skipped without it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from boltzflow.cli import main
from boltzflow.flows.cnf import TeacherCNF
from boltzflow.io.samples import read_samples
from boltzflow.models.protocol import LOG_Q_KINDS, Model
from boltzflow.registry.loading import load_model
from boltzflow.registry.methods import METHODS

#: every model built from a (DW4) teacher; nf_internal learns from a molecule's frames alone
#: and passes its contract on ALDP in tests/distill/test_nf_internal.py
KINDS = ["teacher", *(name for name, m in METHODS.items() if m.uses_teacher)]
SYSTEM = "dw4"
#: kinds not built from an internal-coordinate teacher, with the reason
CARTESIAN_ONLY = {"nf": "the NF student distils a Cartesian teacher (mean-free coupling flow)"}
INTERNAL = "-internal"
#: every kind, and the same kinds on internal coordinates
CASES = [*KINDS, *(k + INTERNAL for k in KINDS if k not in CARTESIAN_ONLY)]
#: kinds whose log_prob is the exact density of their own sampler, with the tolerance (nats):
#: the teacher's ODE solved both ways at atol = rtol = 1e-7 (1e-6 on internal coordinates) in
#: float32; FALCON's Newton preimages and the NF's one-pass inverse to float32 round-off
EXACT = {
    "teacher": 1e-3,
    "falcon": 1e-3,
    "nf": 1e-3,
    "teacher" + INTERNAL: 1e-3,
    "falcon" + INTERNAL: 1e-3,
}
STEPS = 2


def _split(case: str) -> tuple[str, bool]:
    """``(kind, on internal coordinates)`` of a case name."""
    if case.endswith(INTERNAL):
        return case[: -len(INTERNAL)], True
    return case, False


def system_of(case: str) -> str:
    return "aldp" if _split(case)[1] else SYSTEM


def dim_of(case: str) -> int:
    return 66 if _split(case)[1] else 8


def _nudge(model: torch.nn.Module, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))


def _teacher() -> TeacherCNF:
    torch.manual_seed(0)
    teacher = TeacherCNF.build(
        "egnn",
        dim=8,
        n_particles=4,
        spatial_dim=2,
        mean_free=True,
        backbone_options={"hidden": 8, "layers": 1},
        sampling={"atol": 1e-7, "rtol": 1e-7, "batch_size": 16},
    )
    teacher.system = SYSTEM
    return teacher


def _internal_teacher() -> TeacherCNF:
    pytest.importorskip("openmm")
    from tiny_internal import untrained_teacher

    teacher = untrained_teacher(hidden=8, layers=1)
    _nudge(teacher, 2)  # the output layer starts at zero: no identity flow
    return teacher


def build(case: str) -> Model:
    """A small model of ``case`` (untrained, weights nudged)."""
    kind, internal = _split(case)
    teacher = _internal_teacher() if internal else _teacher()
    if kind == "teacher":
        return teacher
    method = METHODS[kind]
    model = method.build(method.new_config(), teacher, system=teacher.system)
    _nudge(model, 1)
    return model


@pytest.fixture(scope="module", params=CASES)
def kind_and_model(request: pytest.FixtureRequest) -> tuple[str, Model]:
    return request.param, build(request.param)


def test_protocol_attributes(kind_and_model: tuple[str, Model]) -> None:
    case, model = kind_and_model
    kind, internal = _split(case)
    assert isinstance(model, Model)
    assert model.system == system_of(case) and model.dim == dim_of(case)
    assert model.log_q_kind in LOG_Q_KINDS.values()
    assert (model.transform is not None) == internal
    assert model.representation == ("internal" if internal else "cartesian")
    if kind != "teacher":
        method = METHODS[kind]
        assert isinstance(model, method.model)
        assert model.log_q_kind == method.log_q_kind
        assert model.uses_steps == method.uses_steps


def test_shapes_dtype_mean_free_and_cost(kind_and_model: tuple[str, Model]) -> None:
    case, model = kind_and_model
    x, log_q = model.sample(5, steps=STEPS if model.uses_steps else None, seed=0)
    assert x.shape == (5, dim_of(case)) and log_q.shape == (5,)
    assert x.dtype == log_q.dtype == torch.float32
    assert torch.isfinite(x).all() and torch.isfinite(log_q).all()
    out = model.sample_with_stats(5, steps=STEPS if model.uses_steps else None, seed=0)
    assert torch.equal(out.x, x) and torch.equal(out.log_q, log_q)
    assert out.nfe_per_batch >= 1 and out.seconds >= 0
    if _split(case)[1]:  # Cartesian x out, with the density of the internal coordinates
        assert set(out.columns) == {"log_q_internal"}
        assert torch.isfinite(out.columns["log_q_internal"]).all()
    else:
        assert x.reshape(5, 4, 2).mean(1).abs().max() < 1e-5, "samples must be mean-free"


def test_same_seed_same_samples(kind_and_model: tuple[str, Model]) -> None:
    _, model = kind_and_model
    steps = STEPS if model.uses_steps else None
    x, log_q = model.sample(6, steps=steps, seed=3, batch_size=4)
    x2, log_q2 = model.sample(6, steps=steps, seed=3, batch_size=4)
    x3, _ = model.sample(6, steps=steps, seed=4, batch_size=4)
    assert torch.equal(x, x2) and torch.equal(log_q, log_q2)
    assert not torch.equal(x, x3)


def test_skip_yields_the_rest_of_the_same_draw(kind_and_model: tuple[str, Model]) -> None:
    """``skip`` (a resumed ``boltzflow sample``) gives the rows an uninterrupted draw gives."""
    _, model = kind_and_model
    steps = STEPS if model.uses_steps else None
    full = model.sample_with_stats(6, steps=steps, seed=3, batch_size=2)
    rest = list(model.iter_samples(6, steps=steps, seed=3, batch_size=2, skip=4))
    assert len(rest) == 1
    assert torch.equal(rest[0].x, full.x[4:]) and torch.equal(rest[0].log_q, full.log_q[4:])
    assert list(model.iter_samples(6, steps=steps, seed=3, skip=6)) == []
    for bad in (-1, 7, 1.5):
        with pytest.raises(ValueError, match="skip must be an int in"):
            next(iter(model.iter_samples(6, steps=steps, seed=3, skip=bad)))


@pytest.mark.parametrize("kind", sorted(EXACT))
def test_log_prob_of_own_samples_is_the_returned_log_q(kind: str) -> None:
    model = build(kind)
    steps = STEPS if model.uses_steps else None
    x, log_q = model.sample(8, steps=steps, seed=5)
    scored = model.log_prob(x, steps=steps)
    err = float((scored - log_q).abs().max())
    assert err < EXACT[kind], f"{kind}: |log_prob - log q| = {err:.2e} nats"


def test_save_load_identical_and_wrong_system_refused(
    kind_and_model: tuple[str, Model], tmp_path: Path
) -> None:
    case, model = kind_and_model
    kind, system = _split(case)[0], system_of(case)
    path = model.save(tmp_path / ("teacher.pt" if kind == "teacher" else "student.pt"))
    loaded = load_model(tmp_path, system=system)
    assert type(loaded) is type(model) and loaded.system == system
    steps = STEPS if model.uses_steps else None
    x, log_q = model.sample(4, steps=steps, seed=2)
    x2, log_q2 = loaded.sample(4, steps=steps, seed=2)
    assert torch.equal(x, x2) and torch.equal(log_q, log_q2)
    with pytest.raises(ValueError, match=f"trained for system '{system}', not 'lj13'"):
        load_model(path, system="lj13")


def test_bad_arguments_are_clear_errors(kind_and_model: tuple[str, Model]) -> None:
    case, model = kind_and_model
    dim = dim_of(case)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        model.sample(0)
    with pytest.raises(ValueError, match="n must be a positive integer"):
        model.sample(-3)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        model.sample(2, steps=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        model.sample(2, batch_size=0)
    x = torch.zeros(3, dim)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.log_prob(x)
    with pytest.raises(ValueError, match=rf"shape \(N, {dim}\)"):
        model.log_prob(torch.zeros(3, 6))


@pytest.mark.parametrize("case", CASES)
def test_cli_sample_works_for_every_kind(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = build(case)
    kind = _split(case)[0]
    model.save(tmp_path / "run" / ("teacher.pt" if kind == "teacher" else "student.pt"))
    out = tmp_path / "samples.h5"
    args = ["sample", str(tmp_path / "run"), "-n", "12", "-o", str(out), "--seed", "1"]
    assert main(args + (["--steps", "2"] if model.uses_steps else [])) == 0
    assert "ESS/N" in capsys.readouterr().out
    stored = read_samples(out)
    assert stored.x.shape == (12, dim_of(case))
    assert stored.log_w is not None and np.isfinite(stored.log_w).all()
