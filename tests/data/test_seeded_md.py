"""Seeded MD (``method="md_seeded"``): seed selection, CLI end to end, resume, reproducibility.

Tiny runs on ``aldp_vacuum`` (about 30 µs per step on the Reference platform): a 1000 K hot run
of 31,000 steps, which with seed 0 has 40 of 150 candidates in 0 < φ < 2 and with seed 1 none.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from boltzflow.cli import main
from boltzflow.data import generate, read_dataset
from boltzflow.data.seeded_md import (
    default_segments_dir,
    held_out_segments,
    in_positive_basin,
    segment_rows,
    select_seeds,
)
from boltzflow.systems import geometry

N = 42
TINY: dict[str, Any] = {
    "n_seeds": 4,
    "basin_fraction": 0.5,
    "hot_temperature": 1000.0,
    "hot_burn_in": 1000,
    "hot_frames": 150,
    "hot_stride": 200,
    "burn_in": 200,
    "stride": 50,
}


def _phi(x: np.ndarray) -> np.ndarray:
    return geometry.backbone_dihedrals(torch.from_numpy(x))[0].numpy()


# -- seed selection (pure) -------------------------------------------------------------------------


def test_select_seeds_is_stratified_and_spread() -> None:
    phi = np.array([-2.0] * 50 + [1.0] * 20 + [2.5] * 10 + [-1.0] * 20)
    idx = select_seeds(phi, 10, 0.3)
    assert idx.dtype == np.int64 and len(idx) == 10 and (np.diff(idx) > 0).all()
    assert in_positive_basin(phi[idx]).sum() == 3
    assert (phi[idx] < 0).sum() == 7  # never from the barrier region φ ≥ 2
    positive = idx[in_positive_basin(phi[idx])]
    np.testing.assert_array_equal(positive, [50, 60, 69])  # first, middle, last of 50..69
    assert select_seeds(phi, 4, 0.0).tolist() == select_seeds(phi, 4, 0.0).tolist()
    assert not in_positive_basin(phi[select_seeds(phi, 4, 0.0)]).any()


@pytest.mark.parametrize(
    ("phi", "n_seeds", "fraction", "match"),
    [
        (np.full(30, -1.0), 5, 0.4, r"0 of 30 eligible candidate frames with 0 < phi < 2.*hot"),
        (np.full(30, 1.0), 5, 0.4, r"with phi < 0"),
        (np.full(30, -1.0), 0, 0.4, "n_seeds"),
        (np.full(30, -1.0), 5, 1.5, "basin_fraction"),
        (np.full((3, 2), -1.0), 1, 0.0, "1-D"),
    ],
)
def test_select_seeds_rejects_what_it_cannot_do(
    phi: np.ndarray, n_seeds: int, fraction: float, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        select_seeds(phi, n_seeds, fraction)


def test_held_out_segments_are_whole_and_spread_over_both_basins() -> None:
    # 60 segments, 18 started in 0 < φ < 2 (the docs' production data): 6 held out, 2 of them
    # from there (6 * 18 / 60 = 1.8), first/middle/last of each group
    seed_phi = np.array([1.0 if i % 10 < 3 else -1.5 for i in range(60)])
    held = held_out_segments(seed_phi, 6)
    assert held == sorted(held) and len(set(held)) == 6
    assert in_positive_basin(seed_phi[held]).sum() == 2
    positive = np.flatnonzero(in_positive_basin(seed_phi))
    assert [i for i in held if i in positive] == [int(positive[0]), int(positive[-1])]
    assert held_out_segments(seed_phi, 0) == []
    # every segment from one basin: none can come from the other, whatever the rounding
    assert held_out_segments(np.array([-1.0, -1.0, 1.0]), 3) == [0, 1, 2]
    assert held_out_segments(np.array([-1.0, 1.0, 1.0]), 1) == [1]
    with pytest.raises(ValueError, match=r"n_holdout must lie in \[0, 3\]"):
        held_out_segments(np.array([-1.0, 1.0, 1.0]), 4)


def test_segment_rows_marks_whole_segments() -> None:
    mask = segment_rows([3, 2, 4], [0, 2])
    assert mask.tolist() == [True] * 3 + [False] * 2 + [True] * 4
    assert not segment_rows([3, 2], []).any()


# -- settings ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "error", "match"),
    [
        ({"basin_fraction": 1.5}, ValueError, "basin_fraction"),
        ({"n_seeds": 50}, ValueError, "n_seeds"),
        ({"stride": 0}, ValueError, "stride"),
        ({"hot_temperature": -5.0}, ValueError, "hot_temperature"),
        ({"workers": -1}, ValueError, "workers"),
        ({"platform": "NoSuchPlatform"}, ValueError, "NoSuchPlatform"),
        ({"n_seed": 3}, TypeError, "n_seeds"),  # misspelt: the message lists the valid ones
    ],
)
def test_bad_settings_raise_before_any_md(
    settings: dict[str, Any], error: type[Exception], match: str
) -> None:
    with pytest.raises(error, match=match):
        generate("aldp_vacuum", N, seed=0, method="md_seeded", **{"n_seeds": 4, **settings})


def test_md_seeded_needs_a_molecule() -> None:
    with pytest.raises(ValueError, match="molecular"):
        generate("dw4", 10, seed=0, method="md_seeded")


def test_a_hot_run_without_the_basin_says_what_to_change(tmp_path: Path) -> None:
    kwargs: dict[str, Any] = {"seed": 1, "method": "md_seeded", "progress": False, "workers": 0}
    kwargs["segments_dir"] = tmp_path / "segments"
    with pytest.raises(ValueError, match="0 of 150 eligible candidate frames with 0 < phi < 2"):
        generate("aldp_vacuum", N, **kwargs, **TINY)
    # No segment finished yet: other settings simply start afresh in the same folder.
    x, _, prov = generate("aldp_vacuum", N, **kwargs, **{**TINY, "basin_fraction": 0.0})
    assert x.shape == (N, 66) and prov["statistics"]["positive_phi_fraction"] == 0.0


# -- end to end ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def cli_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The CLI with 2 worker processes; the segment folder is removed afterwards."""
    out = tmp_path_factory.mktemp("cli") / "aldp.h5"
    sets = [f"--set={k}={v}" for k, v in TINY.items()]
    argv = ["data", "generate", "aldp_vacuum", "--method", "md_seeded", "-n", str(N), "-o"]
    assert main([*argv, str(out), "--seed", "0", "--set=workers=2", *sets]) == 0
    return out


def test_cli_writes_both_basins_with_provenance(
    cli_run: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ds = read_dataset(cli_run)
    assert ds.positions.shape == (N, 66) and ds.energies.shape == (N,)
    assert np.isfinite(ds.energies).all() and ds.energies.std() > 0
    np.testing.assert_allclose(ds.positions.reshape(N, 22, 3).mean(axis=1), 0.0, atol=1e-12)
    prov = ds.attrs["provenance"]
    stats = prov["statistics"]
    assert prov["method"] == "md_seeded" and prov["boltzmann_across_basins"] is False
    assert stats["boltzmann_across_basins"] is False
    assert stats["frames_per_seed"] == [11, 11, 10, 10]
    assert stats["hot_temperature"] == 1000.0 and stats["platform"] == "Reference"
    assert stats["stride"] == 50 and stats["timestep_fs"] == 1.0 and stats["seconds"] > 0
    assert len(stats["seed_phi"]) == 4 and sum(0 < p < 2 for p in stats["seed_phi"]) == 2
    phi = _phi(ds.positions)
    assert 0.2 < in_positive_basin(phi).mean() < 0.8
    assert (phi < 0).any()
    assert stats["positive_phi_fraction"] == pytest.approx(in_positive_basin(phi).mean(), abs=1e-5)
    assert stats["l_form_fraction"] == 1.0
    assert not default_segments_dir(cli_run).exists()  # removed once the dataset is written
    assert not multiprocessing.active_children()


def test_resume_skips_finished_segments_and_same_seed_gives_same_frames(
    cli_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = tmp_path / "segments"

    def run(**extra: Any) -> tuple[np.ndarray, np.ndarray]:
        x, u, _ = generate(
            "aldp_vacuum", N, seed=0, method="md_seeded", workers=0, segments_dir=folder,
            **{**TINY, **extra},
        )  # fmt: skip
        return x, u

    x, u = run()
    reference = read_dataset(cli_run)  # made by worker processes: the same frames
    np.testing.assert_array_equal(x, reference.positions)
    np.testing.assert_array_equal(u, reference.energies)
    files = sorted(folder.glob("seed-*.npz"))
    assert [f.name for f in files] == [f"seed-{i:03d}.npz" for i in range(4)]
    stamps = {f: f.stat().st_mtime_ns for f in [*files, folder / "hot.npz"]}
    files[1].unlink()
    capsys.readouterr()
    x2, u2 = run()
    err = capsys.readouterr().err
    assert "resuming: 3/4 segments" in err and "hot run: 31,000 steps" not in err
    assert err.count(" done (seed ") == 1 and "done (seed 1," in err  # only the missing one
    np.testing.assert_array_equal(x2, x)
    np.testing.assert_array_equal(u2, u)
    for f, stamp in stamps.items():
        if f != files[1]:
            assert f.stat().st_mtime_ns == stamp, f"{f.name} was rewritten"
    with pytest.raises(ValueError, match=r"different run \(differs in \['stride'\]\)"):
        run(stride=60)


def test_a_failing_worker_raises_and_leaves_no_process(tmp_path: Path) -> None:
    settings = {**TINY, "timestep_fs": 200.0}  # blows up at once
    with pytest.raises(RuntimeError, match=r"blew up|non-finite"):
        generate(
            "aldp_vacuum", N, seed=0, method="md_seeded", progress=False, workers=1, **settings
        )
    assert not multiprocessing.active_children()


def test_seed_eligibility_excludes_mirror_images_and_cis_peptide_bonds():
    """A hot run can invert the chiral centre or flip a peptide bond to cis: such frames are
    never seeds (a 300 K segment would stay there)."""
    from boltzflow.data.seeded_md import eligible_seeds, peptide_omega_atoms, select_seeds
    from boltzflow.systems import load_system
    from boltzflow.systems.geometry import dihedral

    system = load_system("aldp_vacuum")
    try:
        omegas = peptide_omega_atoms(system.mdtraj_topology)
        assert sorted(omegas) == [(1, 4, 6, 8), (8, 14, 16, 18)]
        x = system.reference_configuration().double()
        assert all(abs(float(dihedral(x, w)[0])) > 2.5 for w in omegas)  # trans in the PDB
        mirrored = -x
        frames = torch.cat([x, mirrored]).numpy()
        assert eligible_seeds(system, frames).tolist() == [True, False]
    finally:
        system.close()
    phi = np.array([-1.0, 1.0, -1.5, 1.2])
    picked = select_seeds(phi, 2, 0.5, eligible=np.array([True, False, True, True]))
    assert picked.tolist() == [0, 3]
    with pytest.raises(ValueError, match="eligible candidate frames with 0 < phi < 2"):
        select_seeds(phi, 2, 1.0, eligible=np.array([True, False, True, True]))
