"""The bad-input survey of ``workflows/reliability.py`` as a test: every case ends in a clear
error, a refusal, a documented recovery or exactly the original data, never a silent wrong
answer, a traceback or a file left behind (issue #21)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "workflows" / "reliability.py"


def _load():
    spec = importlib.util.spec_from_file_location("reliability", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_bad_input_is_caught(tmp_path, monkeypatch):
    monkeypatch.setenv("BOLTZFLOW_QUIET", "1")
    module = _load()
    code = module.main(["-o", str(tmp_path)])
    cases = json.loads((tmp_path / "reliability.json").read_text())["cases"]
    bad = [c for c in cases if c["outcome"] in module.BAD_OUTCOMES]
    assert not bad, bad
    assert code == 0
    outcomes = {c["outcome"] for c in cases}
    assert outcomes <= {"clear error", "refused", "recovered", "exact data"}
    assert len(cases) >= 50
    # the damage that reaches the data is always caught
    for c in cases:
        if "flip-data" in c["what"] or "truncate" in c["what"]:
            assert c["outcome"] == "clear error", c
