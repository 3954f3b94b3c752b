"""Where definitions are found: built-ins inside the package, plus ``$BOLTZFLOW_SYSTEMS_DIR``.

The README's "Your own molecule" TOML is run as written, with copies of the ALDP files in a user
folder outside the package.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import boltzflow
from boltzflow.cli import main
from boltzflow.systems import available, definition, load_system
from boltzflow.systems.registry import BUILTIN_DIR, SYSTEMS_DIR_ENV, definition_file, search_path

README = Path(__file__).resolve().parents[2] / "README.md"
# Reduced energy of the ALDP PDB configuration (as in test_molecular.REFERENCE_ENERGY["aldp"]).
ALDP_REFERENCE_ENERGY = -38.365532


@pytest.fixture(autouse=True)
def _no_user_folders(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(SYSTEMS_DIR_ENV, raising=False)


def _user_folder(root: Path, **files: str) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for stem, text in files.items():
        (root / f"{stem}.toml").write_text(text, encoding="utf-8")
    return root


def _renamed_dw4(name: str) -> str:
    text = (BUILTIN_DIR / "dw4.toml").read_text(encoding="utf-8")
    return re.sub(r'^name = "dw4"', f'name = "{name}"', text, count=1, flags=re.M)


def test_builtin_definitions_ship_inside_the_package():
    package = Path(boltzflow.__file__).resolve().parent
    assert BUILTIN_DIR == package / "systems" / "definitions"
    assert search_path() == [BUILTIN_DIR]
    for name in available():
        assert definition_file(name).parent == BUILTIN_DIR
    for f in ["alanine-dipeptide.pdb", "alanine-dipeptide.prmtop", "LICENSE-openmmtools"]:
        assert (BUILTIN_DIR / "aldp" / f).is_file()


def test_user_folder_adds_systems(tmp_path, monkeypatch):
    a = _user_folder(tmp_path / "a", my_dw4=_renamed_dw4("my_dw4"))
    b = _user_folder(tmp_path / "b", other_dw4=_renamed_dw4("other_dw4"))
    monkeypatch.setenv(SYSTEMS_DIR_ENV, os.pathsep.join([str(a), "", str(b)]))
    assert search_path() == [BUILTIN_DIR, a.resolve(), b.resolve()]
    names = available()
    assert {"my_dw4", "other_dw4", "dw4", "aldp"} <= set(names)
    assert definition_file("my_dw4") == a.resolve() / "my_dw4.toml"
    x = torch.randn(5, 8, dtype=torch.float64)
    mine, builtin = load_system("my_dw4"), load_system("dw4")
    assert mine.info.name == "my_dw4"
    torch.testing.assert_close(mine.energy(x), builtin.energy(x))


def test_user_file_with_a_builtin_name_is_an_error(tmp_path, monkeypatch):
    user = _user_folder(tmp_path / "user", dw4=(BUILTIN_DIR / "dw4.toml").read_text())
    monkeypatch.setenv(SYSTEMS_DIR_ENV, str(user))
    pattern = r"'dw4' is defined twice: .*definitions/dw4\.toml and .*user/dw4\.toml"
    for call in (available, lambda: definition("dw4"), lambda: load_system("lj13")):
        with pytest.raises(ValueError, match=pattern):
            call()


def test_same_name_in_two_user_folders_is_an_error(tmp_path, monkeypatch):
    a = _user_folder(tmp_path / "a", mine=_renamed_dw4("mine"))
    b = _user_folder(tmp_path / "b", mine=_renamed_dw4("mine"))
    monkeypatch.setenv(SYSTEMS_DIR_ENV, f"{a}{os.pathsep}{b}")
    with pytest.raises(ValueError, match="'mine' is defined twice"):
        definition("mine")


def test_missing_user_folder_and_unknown_name(tmp_path, monkeypatch):
    monkeypatch.setenv(SYSTEMS_DIR_ENV, str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match=r"BOLTZFLOW_SYSTEMS_DIR.*not a folder"):
        available()
    monkeypatch.setenv(SYSTEMS_DIR_ENV, str(tmp_path))
    with pytest.raises(KeyError, match="known systems: aldp"):
        definition("nope")


def _readme_toml() -> str:
    text = README.read_text(encoding="utf-8")
    section = text.split("### Your own molecule", 1)[1]
    blocks = re.findall(r"```toml\n(.*?)```", section, re.S)
    assert blocks, "README's 'Your own molecule' has no toml example"
    return blocks[0]


def test_readme_user_molecule_loads(tmp_path, monkeypatch, capsys):
    """The README's example file, in a user folder with the ALDP PDB, as written."""
    folder = tmp_path / "my_systems"
    (folder / "my_dipeptide").mkdir(parents=True)
    (folder / "my_dipeptide.toml").write_text(_readme_toml(), encoding="utf-8")
    shutil.copy(BUILTIN_DIR / "aldp" / "alanine-dipeptide.pdb", folder / "my_dipeptide")
    monkeypatch.setenv(SYSTEMS_DIR_ENV, str(folder))
    monkeypatch.chdir(tmp_path)

    assert "my_dipeptide" in available()
    with load_system("my_dipeptide") as system:
        assert system.dim == 66
        assert system.temperature == 300.0
        u = system.energy(system.reference_configuration())
    torch.testing.assert_close(u, torch.full_like(u, ALDP_REFERENCE_ENERGY), rtol=1e-6, atol=0.0)
    assert main(["systems"]) == 0
    row = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("my_dipeptide "))
    assert "300 K" in row
