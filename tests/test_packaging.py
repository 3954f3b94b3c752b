"""A non-editable install works away from the checkout: the system definitions ship in the wheel.

A copy of the sources (``pyproject.toml``, ``README.md``, ``boltzflow/``) is built into a wheel with
this interpreter's setuptools (no build isolation, no network) and installed with ``--no-deps`` into
a fresh virtualenv in a temporary folder. Installing torch and OpenMM there would be slow, so a
``.pth`` file with plain path lines makes this interpreter's site-packages visible to the fresh
venv. Plain path lines do not run the ``.pth`` files in those folders (only folders processed by
``site`` have theirs run), so the editable-install hook mapping ``boltzflow`` to a checkout stays
inactive; the test checks that the ``boltzflow`` imported is the one installed in the fresh venv.
Both commands run from a temporary working folder, without ``PYTHONPATH``.
"""

from __future__ import annotations

import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ALDP_FILES = ["alanine-dipeptide.pdb", "alanine-dipeptide.prmtop", "LICENSE-openmmtools"]


def _run(cmd: list[str], cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, f"{cmd} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "BOLTZFLOW_"))}
    env.update(PYTHONNOUSERSITE="1", PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
    # Probe in a subprocess: find_spec("pip") in this process would make setuptools' distutils
    # shim stand down for the rest of the session (torch.compile then fails to import it).
    for module in ("venv", "ensurepip", "pip", "setuptools"):
        probe = f"import {module}"
        if subprocess.run([sys.executable, "-c", probe], check=False).returncode:
            pytest.skip(f"{module} is not available to {sys.executable}")
    env = _clean_env()
    work = tmp_path / "cwd"
    work.mkdir()

    # Build a wheel from a copy of the sources (keeps build/ and *.egg-info out of the checkout).
    src = tmp_path / "src"
    src.mkdir()
    for f in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / f, src / f)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "boltzflow", src / "boltzflow", ignore=ignore)
    dist = tmp_path / "dist"
    pip_wheel = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    _run([*pip_wheel, "--no-index", "-w", str(dist), str(src)], work, env)
    (wheel,) = dist.glob("boltzflow-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    assert "boltzflow/systems/definitions/aldp.toml" in names
    for f in ALDP_FILES:
        assert f"boltzflow/systems/definitions/aldp/{f}" in names

    # A fresh venv; boltzflow installed from the wheel before the dependencies become visible.
    venv = tmp_path / "venv"
    _run([sys.executable, "-m", "venv", str(venv)], work, env)
    python = venv / "bin" / "python"
    _run([str(python), "-m", "pip", "install", "-q", "--no-deps", str(wheel)], work, env)
    purelib = _run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"], work, env
    )
    deps = [p for p in site.getsitepackages() if Path(p).is_dir()]
    assert not any(Path(p).resolve() == ROOT for p in deps)
    (Path(purelib.strip()) / "_boltzflow_test_deps.pth").write_text("\n".join(deps) + "\n")

    out = _run([str(venv / "bin" / "boltzflow"), "systems"], work, env)
    rows = {line.split()[0] for line in out.splitlines()[2:] if line.strip()}
    assert {"aldp", "aldp_ff96_obc1", "dw4"} <= rows, out

    code = (
        "import boltzflow\n"
        "from boltzflow.systems import load_system\n"
        "from boltzflow.systems.registry import BUILTIN_DIR\n"
        "print(boltzflow.__file__)\n"
        "print(BUILTIN_DIR)\n"
        "s = load_system('aldp')\n"
        "print(s.dim)\n"
        "s.close()\n"
    )
    file, builtin_dir, dim = _run([str(python), "-c", code], work, env).split()
    assert Path(file).resolve().is_relative_to(venv.resolve()), file
    assert Path(builtin_dir).resolve().is_relative_to(venv.resolve()), builtin_dir
    assert dim == "66"
