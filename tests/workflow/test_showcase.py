"""``boltzflow demo``'s table of the shipped models (boltzflow.workflow.showcase)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from boltzflow.workflow.showcase import SHOWCASE, load_showcase, run_showcase, showcase_table

MODELS = Path(__file__).resolve().parents[2] / "models"


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "showcase.toml"
    path.write_text(text)
    return path


def test_the_shipped_list_names_existing_models():
    showcase = load_showcase(SHOWCASE)
    assert all((e.folder / "card.md").is_file() for e in showcase.entries)
    assert "aldp" in showcase.free_energy


def test_rows_table_json_and_figure(tmp_path):
    path = _write(
        tmp_path,
        f"""
n = 300
seed = 3
[[model]]
name = "{MODELS / "aldp-nf-internal"}"
[free_energy.aldp]
name = "0 < φ < 2 vs rest"
a = [{{ feature = "phi", min = 0.0, max = 2.0 }}]
b = "complement"
reference_profile = "{MODELS.parent / "workflows" / "reference" / "aldp_umbrella_profile.json"}"
""",
    )
    rows = run_showcase(path, tmp_path / "out", progress=False)
    (row,) = rows
    assert row["model"] == "aldp-nf-internal" and row["n"] == 300 and row["steps"] is None
    assert 0 < row["ess_fraction"] <= 1 and row["samples_per_s"] > 0
    fe = row["free_energy"]
    assert fe["low"] < fe["value"] < fe["high"]
    diff = fe["minus_reference"]
    assert diff["difference"] == pytest.approx(fe["value"] - fe["reference"]["value"])
    assert diff["stderr"] > fe["reference"]["stderr"] > 0
    assert json.loads((tmp_path / "out" / "shipped_models.json").read_text()) == rows
    assert (tmp_path / "out" / "shipped_models.png").stat().st_size > 0
    table = showcase_table(rows)
    assert "| aldp-nf-internal | aldp | - | 300 |" in table and "(ref 3.946 ± 0.0" in table


@pytest.mark.parametrize(
    ("text", "error", "words"),
    [
        ("", ValueError, "no [[model]] entries"),
        ('[[model]]\nname = "nope"', FileNotFoundError, "model folder not found"),
        ('n = 0\n[[model]]\nname = "x"', ValueError, "n must be a positive integer"),
        ('colour = 1\n[[model]]\nname = "x"', ValueError, "unknown keys ['colour']"),
        ('[free_energy.dw4]\na = []\n[[model]]\nname = "x"', ValueError, "needs states"),
    ],
)
def test_bad_lists_are_refused_with_the_reason(tmp_path, text, error, words):
    (tmp_path / "x").mkdir()
    with pytest.raises(error, match=None) as info:
        load_showcase(_write(tmp_path, text))
    assert words in str(info.value)


def test_worker_processes_give_the_same_rows_in_list_order(tmp_path):
    path = _write(
        tmp_path,
        f"""
n = 200
[[model]]
name = "{MODELS / "dw4-f2d2"}"
steps = [2, 1]
[[model]]
name = "{MODELS / "aldp-nf-internal"}"
n = 100
""",
    )
    alone = run_showcase(path, progress=False)
    side_by_side = run_showcase(path, progress=False, workers=2)
    assert [(r["model"], r["steps"]) for r in side_by_side] == [
        ("dw4-f2d2", 2),
        ("dw4-f2d2", 1),
        ("aldp-nf-internal", None),
    ]
    for a, b in zip(alone, side_by_side, strict=True):
        a.pop("samples_per_s"), b.pop("samples_per_s")
        assert a == b
    with pytest.raises(ValueError, match="workers must be a positive integer"):
        run_showcase(path, workers=0)
