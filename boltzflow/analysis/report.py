"""Reports as markdown (for people) and JSON (for scripts), both written atomically.

:func:`write_report` takes nested results: scalars, strings, :class:`Estimate` objects (and
anything else with ``to_dict``), arrays and dicts of these. The JSON keeps everything
(non-finite numbers become null); the markdown renders one section per top-level key with a table
of its scalar entries and embeds the plots by relative path.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

import boltzflow
from boltzflow.io.atomic import atomic_write_text
from boltzflow.sampling.results import Estimate

__all__ = ["jsonable", "write_report"]


def jsonable(obj: Any) -> Any:
    """Convert results to JSON-ready Python objects (non-finite floats -> None)."""
    if hasattr(obj, "to_dict") and callable(obj.to_dict):
        return jsonable(obj.to_dict())
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, torch.Tensor):
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.bool_, bool)):
        return bool(obj)
    if isinstance(obj, (np.integer, int)):
        return int(obj)
    if isinstance(obj, (np.floating, float)):
        val = float(obj)
        return val if math.isfinite(val) else None
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, str):
        return obj
    return str(obj)


def _fmt(value: Any) -> str:
    if isinstance(value, Estimate):
        return (
            f"{value.value:.5g} [{value.ci_low:.5g}, {value.ci_high:.5g}] "
            f"(se {value.stderr:.2g}, {value.method})"
        )
    if isinstance(value, (float, np.floating)):
        return f"{float(value):.5g}"
    return str(value)


def _cell(value: Any) -> str:
    """Table cell text: pipes escaped so labels like KL(p || q) keep the table intact."""
    return str(value).replace("|", "\\|")


def _is_scalar(value: Any) -> bool:
    return isinstance(value, (Estimate, str, bool, int, float, np.number)) or value is None


def _markdown(
    title: str,
    results: Mapping[str, Any],
    plots: Mapping[str, Path],
    base: Path,
    notes: Sequence[str],
) -> str:
    lines = [f"# {title}", ""]
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines += [f"boltzflow {boltzflow.__version__}, {stamp}", ""]
    for note in notes:
        lines += [f"- {note}"]
    if notes:
        lines.append("")
    for section, content in results.items():
        lines += [f"## {section}", ""]
        if isinstance(content, Mapping):
            rows = [(k, v) for k, v in content.items() if _is_scalar(v)]
            if rows:
                lines += ["| quantity | value |", "|---|---|"]
                lines += [f"| {_cell(k)} | {_cell(_fmt(v))} |" for k, v in rows]
                lines.append("")
            for k, v in content.items():
                if isinstance(v, Mapping) and all(_is_scalar(x) for x in v.values()):
                    lines += [f"**{k}**", "", "| quantity | value |", "|---|---|"]
                    lines += [f"| {_cell(kk)} | {_cell(_fmt(vv))} |" for kk, vv in v.items()]
                    lines.append("")
        elif _is_scalar(content):
            lines += [_fmt(content), ""]
    if plots:
        lines += ["## Plots", ""]
        for name, path in plots.items():
            rel = os.path.relpath(Path(path), base)
            lines += [f"### {name}", "", f"![{name}]({rel})", ""]
    return "\n".join(lines)


def write_report(
    out_dir: str | os.PathLike[str],
    results: Mapping[str, Any],
    *,
    title: str = "boltzflow report",
    plots: Mapping[str, str | os.PathLike[str]] | None = None,
    notes: Sequence[str] = (),
    stem: str = "report",
) -> tuple[Path, Path]:
    """Write ``<stem>.md`` and ``<stem>.json`` into ``out_dir``.

    Args:
        out_dir: folder (created if needed).
        results: nested results, one top-level key per section.
        title: markdown title.
        plots: name -> PNG path, embedded in the markdown and listed in the JSON.
        notes: bullet points under the title (settings, caveats).
        stem: file name stem.

    Returns:
        ``(markdown_path, json_path)``.
    """
    base = Path(out_dir)
    base.mkdir(parents=True, exist_ok=True)
    plots = {k: Path(v) for k, v in (plots or {}).items()}
    payload = {
        "title": title,
        "boltzflow_version": boltzflow.__version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
        "notes": list(notes),
        "results": jsonable(results),
        "plots": {k: os.path.relpath(v, base) for k, v in plots.items()},
    }
    md_path, json_path = base / f"{stem}.md", base / f"{stem}.json"
    atomic_write_text(json_path, json.dumps(payload, indent=2, allow_nan=False) + "\n")
    atomic_write_text(md_path, _markdown(title, results, plots, base, notes) + "\n")
    return md_path, json_path
