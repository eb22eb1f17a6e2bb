"""Writing figures and the numbers behind them: `save_figure` and `write_data` for one file, `Exporter` for a
folder of them (used by ``python -m visualizations`` and the app's downloads)."""

from __future__ import annotations

import csv
import json
import math
import re
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


def slug(text: str) -> str:
    """A file-name stem from any text (a model name, a video name): letters, digits, '.', '_', '-'; 60 at most."""
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")[:60] or "figure"


class Exporter:
    """Figures and their numbers written into one folder. Each figure goes out in every format of ``formats`` at
    ``dpi``; with ``preview_dpi``, a PNG to show on screen is written too where PNG is not among the formats. Each
    result goes out as JSON and, where it has rows (``csv_rows``, a list, or its own rows), as CSV. ``written``
    lists every file in the order written."""

    def __init__(self, folder, formats=("png",), dpi: int = 150, preview_dpi: int | None = None):
        unknown = [f for f in formats if f not in FIGURE_FORMATS]
        if unknown or not formats:
            raise ValueError(f"Unknown figure format {unknown[0] if unknown else None!r} "
                             f"(use {', '.join(FIGURE_FORMATS)}).")
        self.folder, self.formats, self.dpi, self.preview_dpi = Path(folder), tuple(formats), dpi, preview_dpi
        self.written: list[Path] = []

    def figure(self, fig, stem: str) -> tuple[Path | None, list[Path]]:
        """Write ``fig``, then clear it (its artists go with it). Returns (the PNG to show, or None without one;
        the files in ``formats``)."""
        stem = slug(stem)
        try:
            files = [save_figure(fig, self.folder / f"{stem}.{fmt}", dpi=self.dpi) for fmt in self.formats]
            shown = next((f for f in files if f.suffix == ".png"), None)
            if shown is None and self.preview_dpi is not None:
                shown = save_figure(fig, self.folder / f"{stem}.png", dpi=self.preview_dpi)
                self.written.append(shown)
        finally:
            fig.clf()
        self.written += files
        return shown, files

    def data(self, obj, stem: str, csv_rows=None) -> list[Path]:
        """``obj`` as JSON and its rows as CSV (``csv_rows`` when given); returns the files."""
        files = [self.json(obj, stem)]
        try:
            rows = _rows(obj) if csv_rows is None else csv_rows
        except ValueError:  # a result without rows: JSON only
            rows = None
        if rows:
            files.append(self.table(rows, stem))
        return files

    def json(self, obj, stem: str) -> Path:
        return self.add(write_data(obj, self.folder / f"{slug(stem)}.json"))

    def table(self, rows, stem: str) -> Path:
        return self.add(write_data(rows, self.folder / f"{slug(stem)}.csv"))

    def add(self, path: Path) -> Path:
        """Record a file written by other means (the attention arrays' .npz)."""
        self.written.append(Path(path))
        return Path(path)
