"""``boltzflow data generate`` / ``boltzflow data info``, called in-process."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pytest

from boltzflow.cli import main
from boltzflow.data import read_dataset

SMALL = ["--burn-in", "20", "--stride", "2", "--chains", "8"]


def test_generate_writes_a_valid_dataset_and_info_prints_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "dw4.h5"
    rc = main(
        [
            "data",
            "generate",
            "dw4",
            "-n",
            "24",
            "-o",
            str(out),
            "--seed",
            "3",
            *SMALL,
            "--set",
            "t_max=8",
            "--set",
            "kernel=hmc",
            "--set",
            "n_leapfrog=2",
        ]
    )
    assert rc == 0
    text = capsys.readouterr().out
    assert "wrote 24 samples of dw4 (pt, seed 3)" in text and "swap_acceptance" in text
    ds = read_dataset(out)
    assert ds.positions.shape == (24, 8) and ds.energies.shape == (24,)
    assert ds.attrs["system"] == "dw4" and ds.attrs["seed"] == 3
    s = ds.attrs["generator_settings"]
    assert (s["burn_in"], s["stride"], s["n_chains"], s["t_max"], s["kernel"]) == (
        20,
        2,
        8,
        8.0,
        "hmc",
    )
    assert ds.attrs["generator"] == "boltzflow.data.mcmc:parallel_tempering/hmc"

    assert main(["data", "info", str(out)]) == 0
    info = capsys.readouterr().out
    assert "24 samples x 8 coordinates" in info and "checksum: OK" in info
    assert "generator_settings" in info and "dw4" in info and "statistics" in info


def test_exact_method_via_cli(tmp_path: Path) -> None:
    out = tmp_path / "mw.h5"
    assert main(["data", "generate", "many_well_32", "-n", "50", "-o", str(out)]) == 0
    ds = read_dataset(out)
    assert ds.attrs["provenance"]["method"] == "exact" and ds.positions.shape == (50, 32)


def test_bad_system_name_exits_2_listing_known_systems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = main(["data", "generate", "dw5", "-n", "10", "-o", str(tmp_path / "x.h5")])
    assert rc == 2
    err = capsys.readouterr().err
    assert "unknown system 'dw5'" in err and "dw4" in err and "many_well_32" in err
    assert not (tmp_path / "x.h5").exists()


def test_bad_setting_and_bad_files_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "x.h5"
    assert main(["data", "generate", "dw4", "-n", "8", "-o", str(out), "--set", "bogus=1"]) == 2
    assert "valid settings" in capsys.readouterr().err
    assert main(["data", "generate", "dw4", "-n", "8", "-o", str(out), "--set", "oops"]) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    assert main(["data", "info", str(tmp_path / "missing.h5")]) == 2
    assert "not found" in capsys.readouterr().err
    assert main(["data", "generate", "dw4", "-n", "16", "-o", str(out), *SMALL]) == 0
    with h5py.File(out, "r+") as fh:
        fh["positions"][0, 0] = np.float64(fh["positions"][0, 0]) * 2 + 1
    capsys.readouterr()
    assert main(["data", "info", str(out)]) == 2
    assert "checksum mismatch" in capsys.readouterr().err


def test_energy_command_reads_generated_dataset(tmp_path: Path) -> None:
    out = tmp_path / "dw4.h5"
    assert main(["data", "generate", "dw4", "-n", "16", "-o", str(out), *SMALL]) == 0
    energies = tmp_path / "u.npy"
    assert main(["energy", "dw4", str(out), "-o", str(energies)]) == 0
    np.testing.assert_allclose(np.load(energies), read_dataset(out).energies, atol=1e-10)
