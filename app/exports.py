"""Figures and data to files: a PNG to show, the chosen format (PNG, SVG or PDF) and the numbers (JSON and CSV)
to download. Uses visualizations.save_figure / write_data, imported on first use."""

from __future__ import annotations

import re
from pathlib import Path

from visualizations.io import FIGURE_FORMATS  # the one list of figure formats (limits and ui read it here)

SHOW_DPI = 110


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", str(text)).strip("-")[:60] or "figure"


def export_figure(fig, folder: Path, stem: str, fmt: str = "png", dpi: int = 150) -> tuple[Path, list[Path]]:
    """Write fig as a PNG for display and, for download, in `fmt` at `dpi`. Returns (shown png, downloads).
    The figure is closed afterwards (matplotlib keeps figures alive otherwise)."""
    import matplotlib.pyplot as plt

    from visualizations import save_figure

    fmt = fmt if fmt in FIGURE_FORMATS else "png"
    folder.mkdir(parents=True, exist_ok=True)
    try:
        shown = folder / f"{slug(stem)}.png"
        save_figure(fig, shown, dpi=SHOW_DPI if fmt != "png" else dpi)
        downloads = [shown]
        if fmt != "png":
            path = folder / f"{slug(stem)}.{fmt}"
            save_figure(fig, path, dpi=dpi)
            downloads = [path]
    finally:
        plt.close(fig)
    return shown, downloads


def export_data(data, folder: Path, stem: str, csv_rows=None) -> list[Path]:
    """`data` as JSON, and `csv_rows` (a list of flat dicts; default: data itself when it is one) as CSV."""
    from visualizations import write_data

    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"{slug(stem)}.json"]
    write_data(data, paths[0])
    rows = csv_rows if csv_rows is not None else (data if isinstance(data, list) else None)
    if rows:
        paths.append(folder / f"{slug(stem)}.csv")
        write_data(rows, paths[1])
    return paths
