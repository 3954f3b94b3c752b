"""The NF in internal coordinates (``nf_internal``): the model contract, the density convention
end to end, and a short maximum-likelihood run on ALDP MD frames through the CLI.

The model is not a distillation method (it trains on data, not on a teacher; and it needs a
molecule, not the DW4-shaped teacher of ``tests/models/test_model_contract.py``), so it gets the
same contract checks here on ALDP: shapes and dtype, same seed, log_prob of its own samples equal
to the returned log q, invariance to rigid motions, save -> load identical through
``load_model``, wrong system refused, bad arguments rejected.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from boltzflow.distill.nf_internal import ICNFModelConfig, InternalNFStudent
from boltzflow.models.protocol import LOG_Q_KINDS, Model
from boltzflow.registry.loading import load_model
from boltzflow.systems.internal_coords import InternalCoordinates, internal_from_cartesian
from boltzflow.systems.registry import BUILTIN_DIR
from boltzflow.systems.zmatrix import zmatrix_from_bonds

mdtraj = pytest.importorskip("mdtraj")

PDB = BUILTIN_DIR / "aldp" / "alanine-dipeptide.pdb"
F64 = torch.float64
#: |log_prob(x) - returned log q| for float32 samples (x rounded to float32 in nm)
EXACT_TOL = 1e-3
LOG_8PI2 = math.log(8 * math.pi**2)


def _random_rotations(n: int, gen: torch.Generator) -> torch.Tensor:
    q, r = torch.linalg.qr(torch.randn(n, 3, 3, generator=gen, dtype=F64))
    q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1))[:, None, :]
    return q * torch.det(q)[:, None, None]  # proper rotations


def _rigid(x: torch.Tensor, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    rot = _random_rotations(len(x), gen).to(x.dtype)
    shift = torch.randn(len(x), 1, 3, generator=gen, dtype=F64).to(x.dtype)
    p = x.reshape(len(x), -1, 3)
    return (torch.einsum("bij,bnj->bni", rot, p) + shift).reshape(x.shape)


def _nudge(model: torch.nn.Module, scale: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=gen, dtype=F64).to(p.dtype))


@pytest.fixture(scope="module")
def model() -> InternalNFStudent:
    """A small ALDP model: transform fitted on the PDB frame plus noise, weights nudged."""
    traj = mdtraj.load_pdb(str(PDB))
    from boltzflow.systems.zmatrix import zmatrix_from_topology

    zm = zmatrix_from_topology(traj.topology)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.tensor(traj.xyz[0], dtype=F64).reshape(1, 66)
    frames = x0 + 0.004 * torch.randn(300, 66, generator=gen, dtype=F64)
    ic = InternalCoordinates.fit(zm, frames, periodic=True)
    torch.manual_seed(0)
    m = InternalNFStudent.build(ICNFModelConfig(blocks=2, hidden=32), ic, system="aldp")
    _nudge(m.flow, 0.05, 1)
    return m


# -- the contract ---------------------------------------------------------------------------------
def test_protocol_attributes(model: InternalNFStudent) -> None:
    assert isinstance(model, Model)
    assert model.system == "aldp" and model.dim == 66 and model.event_dim == 60
    assert model.log_q_kind == LOG_Q_KINDS["one_pass"] and model.uses_steps is False
    assert model.representation == "internal"  # keeps its handedness: never mirrored
    assert model.flow.periodic == tuple(range(41, 60))  # the 19 dihedral columns


def test_shapes_dtype_columns_and_same_seed(model: InternalNFStudent) -> None:
    out = model.sample_with_stats(7, seed=3, batch_size=4)
    assert out.x.shape == (7, 66) and out.log_q.shape == (7,)
    assert out.x.dtype == out.log_q.dtype == torch.float32
    assert torch.isfinite(out.x).all() and torch.isfinite(out.log_q).all()
    assert out.nfe_per_batch == 1 and set(out.columns) == {"log_q_internal"}
    x2, log_q2 = model.sample(7, seed=3, batch_size=4)
    assert torch.equal(out.x, x2) and torch.equal(out.log_q, log_q2)
    assert not torch.equal(model.sample(7, seed=4, batch_size=4)[0], x2)
    # samples in the standard frame: atoms[0] at the origin
    a0 = model.ic.zmatrix.atoms[0]
    assert out.x.reshape(7, 22, 3)[:, a0].abs().max() == 0


def test_log_prob_of_own_samples_and_of_rigidly_moved_copies(model: InternalNFStudent) -> None:
    out = model.sample_with_stats(64, seed=5)
    scored = model.log_prob(out.x)
    assert float((scored - out.log_q).abs().max()) < EXACT_TOL
    moved = model.log_prob(_rigid(out.x, 9))
    assert float((moved - out.log_q).abs().max()) < EXACT_TOL
    # log_q_internal = log q(x) + log J, the density of (r nm, theta rad, phi rad)
    bonds, angles, _ = internal_from_cartesian(out.x.double(), model.ic.zmatrix)
    log_j = 2 * bonds.log().sum(-1) + angles.sin().log().sum(-1)
    assert torch.allclose(
        out.columns["log_q_internal"].double(), out.log_q.double() + log_j, atol=1e-3
    )


def test_log_prob_is_flow_density_minus_log_j_and_normalisation(model: InternalNFStudent) -> None:
    """log q(x) = log q(z) - log J(z) - Σ log σ, with log J written out from the geometry."""
    x = model.sample(16, seed=6)[0].double()
    bonds, angles, _ = internal_from_cartesian(x, model.ic.zmatrix)
    log_j = 2 * bonds.log().sum(-1) + angles.sin().log().sum(-1)
    log_sigma = model.ic.bond_std.log().sum() + model.ic.angle_std.log().sum()
    z, _ = model.ic(x)
    with torch.no_grad():
        log_q_z = model.log_prob_internal(z.float()).double()
    expected = log_q_z - log_j - log_sigma
    assert torch.allclose(model.log_prob(_rigid(x, 2).float()).double(), expected, atol=EXACT_TOL)


def test_save_load_identical_and_wrong_system_refused(
    model: InternalNFStudent, tmp_path: Path
) -> None:
    path = model.save(tmp_path / "student.pt")
    loaded = load_model(tmp_path, system="aldp")
    assert type(loaded) is InternalNFStudent and loaded.system == "aldp"
    x, log_q = model.sample(5, seed=2)
    x2, log_q2 = loaded.sample(5, seed=2)
    assert torch.equal(x, x2) and torch.equal(log_q, log_q2)
    with pytest.raises(ValueError, match="trained for system 'aldp', not 'dw4'"):
        load_model(path, system="dw4")


def test_bad_arguments_are_clear_errors(model: InternalNFStudent) -> None:
    for n in (0, -3):
        with pytest.raises(ValueError, match="n must be a positive integer"):
            model.sample(n)
    with pytest.raises(ValueError, match="steps must be a positive integer"):
        model.sample(2, steps=0)
    with pytest.raises(ValueError, match="batch_size must be a positive integer"):
        model.sample(2, batch_size=0)
    x = torch.zeros(3, 66)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or infinite"):
        model.log_prob(x)
    with pytest.raises(ValueError, match=r"shape \(N, 66\)"):
        model.log_prob(torch.zeros(3, 60))


# -- the density convention end to end -------------------------------------------------------------
def test_importance_weights_against_a_cartesian_density() -> None:
    """A 4-atom chain with a Cartesian density written by hand: independent bond vectors, each
    isotropic with a normal length, p(x) = Π g(r_i) / (4 pi r_i^2) per d^3t. Samples of an NF
    (weights nudged) with w = 8 pi^2 p(x) / q(x) must give E_q[w] = 1 (rotations integrate to
    8 pi^2): fails with the wrong sign of log J, without the frame terms, without the
    normalisation log-dets or without the 2 pi of a dihedral."""
    bonds = [(0, 1), (1, 2), (2, 3)]
    zm = zmatrix_from_bonds(4, bonds)
    gen = torch.Generator().manual_seed(3)
    mu, s = 0.15, 0.01

    def draw_p(n: int) -> torch.Tensor:
        r = mu + s * torch.randn(n, 3, 1, generator=gen, dtype=F64)
        u = torch.randn(n, 3, 3, generator=gen, dtype=F64)
        steps = r * u / u.norm(dim=-1, keepdim=True)
        start = torch.randn(n, 1, 3, generator=gen, dtype=F64)
        return torch.cat([start, start + steps.cumsum(1)], 1).reshape(n, 12)

    def log_p(x: torch.Tensor) -> torch.Tensor:
        p = x.reshape(-1, 4, 3)
        r = torch.stack([(p[:, j] - p[:, i]).norm(dim=-1) for i, j in bonds], -1)
        log_g = -0.5 * ((r - mu) / s) ** 2 - math.log(s * math.sqrt(2 * math.pi))
        return (log_g - math.log(4 * math.pi) - 2 * r.log()).sum(-1)

    ic = InternalCoordinates.fit(zm, draw_p(5000), periodic=True)
    torch.manual_seed(0)
    model = InternalNFStudent.build(ICNFModelConfig(blocks=2, hidden=16), ic).double()
    _nudge(model.flow, 0.02, 4)
    n = 40_000
    out = model.sample_with_stats(n, seed=1)
    valid = torch.isfinite(out.log_q)
    assert valid.float().mean() > 0.95  # a few angles fall outside (0, pi): weight 0
    log_w = torch.where(valid, LOG_8PI2 + log_p(out.x) - out.log_q, -math.inf)
    w = log_w.exp()
    mean, se = w.mean().item(), (w.std() / math.sqrt(n)).item()
    assert abs(mean - 1) < 5 * se and se < 0.02, f"E_q[w] = {mean:.4f} ± {se:.4f}, expected 1"


# -- training on MD frames, sampling through the CLI ---------------------------------------------
@pytest.fixture(scope="module")
def md_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """600 frames of ALDP MD at 300 K (Reference platform, 50 fs apart, ~5 s)."""
    pytest.importorskip("openmm")
    from boltzflow.cli import main

    path = tmp_path_factory.mktemp("md") / "md.h5"
    args = ["data", "generate", "aldp", "-n", "600", "--burn-in", "2000", "--stride", "50"]
    assert main([*args, "--set", "platform=Reference", "--set", "threads=1", "-o", str(path)]) == 0
    return path


def test_train_early_stops_and_samples_with_the_right_chirality(
    md_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Smoke profile on 540 training frames: the held-out NLL improves, then the model overfits
    (training NLL keeps falling, held-out NLL rises) and the run stops early, exporting the best
    weights; `boltzflow sample` on the folder writes Cartesian x, log q and log_q_internal."""
    import json

    from boltzflow.cli import main
    from boltzflow.io.checkpoint import load_checkpoint
    from boltzflow.io.samples import read_samples
    from boltzflow.metrics.molecular import chirality_rate
    from boltzflow.systems.geometry import ALDP_CHIRALITY_ATOMS

    config = Path(__file__).resolve().parents[2] / "workflows" / "configs" / "nf_aldp_internal.toml"
    run = tmp_path / "run"
    args = ["train", "nf", "--data", str(md_file), "--system", "aldp", "--config", str(config)]
    args += ["--profile", "smoke", "-o", str(run), "--threads", "1"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert "val NLL" in captured.err and "best held-out NLL" in captured.out
    history = [json.loads(line) for line in (run / "validation.jsonl").read_text().splitlines()]
    assert history[-1]["step"] <= 300 and [r["step"] for r in history][:2] == [20, 40]
    best = min(history, key=lambda r: r["val_nll"])
    assert best["val_nll"] < history[0]["val_nll"]  # held-out NLL falls, then rises (overfit)
    info = load_checkpoint(run / "student.pt", kind="student")["extra"]
    assert info["stopped_early"] and info["best_step"] == best["step"] < history[-1]["step"]
    loaded = load_model(run, system="aldp")
    assert isinstance(loaded, InternalNFStudent)

    out = tmp_path / "samples.h5"
    assert main(["sample", str(run), "-n", "500", "-o", str(out), "--seed", "1"]) == 0
    assert "ESS/N" in capsys.readouterr().out
    stored = read_samples(out)
    assert stored.x.shape == (500, 66) and np.isfinite(stored.log_q).all()
    assert stored.log_w is not None and np.isfinite(stored.u).all()
    assert "log_q_internal" in stored.columns
    # the exported weights are the best held-out ones: their NLL on the held-out frames
    from boltzflow.data import read_dataset

    frames = torch.as_tensor(read_dataset(md_file).positions[-60:])
    nll = -float(loaded.log_prob(frames).double().mean())
    assert abs(nll - best["val_nll"]) < 1e-2
    # L-alanine (the shipped aldp structure defines L with l_sign = +1): the MD frames are
    # all L; the flow puts little mass on the mirror image
    assert chirality_rate(frames, ALDP_CHIRALITY_ATOMS) == 0.0
    d_form = chirality_rate(torch.as_tensor(stored.x), ALDP_CHIRALITY_ATOMS)
    assert d_form < 0.05, f"D fraction {d_form:.3f}"


# -- config ------------------------------------------------------------------------------------
CONFIG = Path(__file__).resolve().parents[2] / "workflows" / "configs" / "nf_aldp_internal.toml"


@pytest.mark.parametrize("profile", [None, "smoke"])
def test_config_loads(profile: str | None) -> None:
    from boltzflow.distill.nf_internal_train import load_icnf_config

    cfg = load_icnf_config(CONFIG, profile)
    assert cfg.system is None and cfg.representation == "internal"  # either ALDP force field
    assert cfg.model.bins == 8 and cfg.validation.val_fraction == 0.1
    assert (cfg.model.blocks, cfg.model.hidden) == ((2, 64) if profile else (6, 256))


def test_config_errors_name_the_key(tmp_path: Path) -> None:
    from boltzflow.distill.nf_internal_train import load_icnf_config

    bad = tmp_path / "bad.toml"
    bad.write_text("[validation]\npatiense = 3\n")
    with pytest.raises(ValueError, match="patiense"):
        load_icnf_config(bad)
    bad.write_text('representation = "cartesian"\n')
    with pytest.raises(ValueError, match="boltzflow distill"):
        load_icnf_config(bad)
    bad.write_text('[validation]\nsplit = "middle"\n')
    with pytest.raises(ValueError, match="split"):
        load_icnf_config(bad)
