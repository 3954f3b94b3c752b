"""The README's Python example runs as written, on a tiny quickstart student.

The example loads the F2D2 student that `make demo` leaves in ``runs/quickstart/students/f2d2``.
Here the quickstart workflow is shrunk to seconds (``TINY`` of
tests/quickstart_tiny.py) and only the stages that student needs are run (data,
teacher, teacher trajectories, student-f2d2) into ``tmp/runs/quickstart``; the example is then
executed with ``tmp`` as the working directory.
"""

from __future__ import annotations

import re
from pathlib import Path

from quickstart_tiny import TINY

from boltzflow.workflow import load_workflow
from boltzflow.workflow.runner import run_stages
from boltzflow.workflow.stages import build_stages

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
QUICKSTART = ROOT / "workflows" / "quickstart.toml"


def _python_block() -> str:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert blocks, "README has no python example"
    return blocks[0]


def _tiny_f2d2_student(root: Path) -> Path:
    """Run the stages the F2D2 student depends on into ``root/runs/quickstart``."""
    out = root / "runs" / "quickstart"
    wf = load_workflow(QUICKSTART, overrides=TINY, output=out)
    stages = {s.name: s for s in build_stages(wf)}
    wanted: set[str] = set()
    todo = ["student-f2d2"]
    while todo:  # the student and everything upstream of it
        name = todo.pop()
        if name not in wanted:
            wanted.add(name)
            todo.extend(stages[name].deps)
    run_stages([s for s in stages.values() if s.name in wanted], out, log=lambda msg: None)
    return out / "students" / "f2d2"


def test_readme_example_is_short_and_loads_the_demo_student():
    code = [ln for ln in _python_block().splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(code) <= 12, f"the README example has {len(code)} lines of code"
    assert 'load_model("runs/quickstart/students/f2d2"' in _python_block()


def test_readme_python_example_runs(tmp_path, monkeypatch, capsys):
    student = _tiny_f2d2_student(tmp_path)
    assert (student / "student.pt").is_file()
    monkeypatch.chdir(tmp_path)
    exec(compile(_python_block(), str(README), "exec"), {})
    out = capsys.readouterr().out
    ess = re.search(r"ESS/N = ([0-9.e+-]+) \(N = 10000\)", out)
    assert ess, f"no 'ESS/N = ... (N = 10000)' in the output:\n{out}"
    assert 0 < float(ess.group(1)) <= 1, out
    ci = re.search(r"ΔF.*?(-?[0-9.e+-]+) \[95% CI (-?[0-9.e+-]+), (-?[0-9.e+-]+);", out)
    assert ci, f"no ΔF with a 95% CI in the output:\n{out}"
    value, low, high = (float(g) for g in ci.groups())
    assert low <= value <= high, out
