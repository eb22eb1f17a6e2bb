"""Writing figures and the numbers behind them."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from vidlmm.analysis import to_jsonable  # numpy-only at import time

FIGURE_FORMATS = ("png", "svg", "pdf")
DATA_FORMATS = ("json", "csv")


def save_figure(fig, path, dpi: int = 150) -> Path:
    """Write a figure; the format comes from the suffix (.png, .svg or .pdf). Returns the path."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"Cannot save a figure as '{path.name}': use a .png, .svg or .pdf name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    # fixed metadata: the same figure gives the same SVG / PDF bytes
    metadata = {"png": {"Software": None}, "svg": {"Date": None, "Creator": None},
                "pdf": {"CreationDate": None, "Creator": None, "Producer": None}}[fmt]
    fig.savefig(path, dpi=dpi, format=fmt, bbox_inches="tight", metadata=metadata)
    return path


def _rows(obj) -> list[dict]:
    if isinstance(obj, list):
        return obj
    if isinstance(obj, dict):
        if "rows" in obj:
            return obj["rows"]
        raise ValueError("This dict has no 'rows' to write as CSV; write it as .json.")
    rows = getattr(obj, "rows", None)
    if rows is None:
        raise ValueError(f"A {type(obj).__name__} has no rows to write as CSV; write it as .json.")
    return rows() if callable(rows) else rows


def _cell(value):
    value = to_jsonable(value)
    if value is None:
        return ""
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    if isinstance(value, float) and not math.isfinite(value):
        return ""
    return value


def write_data(obj, path) -> Path:
    """Write a result as .json (anything with to_json(), dicts and lists of numpy values; NaN -> null) or .csv
    (its rows: `rows()` / `.rows` / a 'rows' key / a list of dicts). Returns the path."""
    path = Path(path)
    fmt = path.suffix.lower().lstrip(".")
    if fmt not in DATA_FORMATS:
        raise ValueError(f"Cannot write data as '{path.name}': use a .json or .csv name.")
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "json":
        path.write_text(json.dumps(to_jsonable(obj), indent=1, allow_nan=False) + "\n", encoding="utf-8")
        return path
    rows = [dict(r) for r in _rows(obj)]
    fields = list(dict.fromkeys(k for r in rows for k in r))
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: _cell(r.get(k)) for k in fields})
    return path
