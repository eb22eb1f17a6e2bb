"""Figures of what a per-frame compressor does to each frame: `vidlmm.analysis.connector_picture` output drawn
over the real frames, one look per kind.

================ ============ =====================================================================
kind             connector    drawn over each frame
================ ============ =====================================================================
query_attention  llava_mini   each query's attention over the patch grid (rows: frames, columns: queries)
pooling_grid     pool         the pooling bins, numbered by output token
source_map       tome         the patches of each output token painted in one colour (ToMe, reimplemented)
kept_mask        topk         the scorer's logits, the kept patches outlined
================ ============ =====================================================================
"""

from __future__ import annotations

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.collections import LineCollection
from matplotlib.colors import Normalize, to_rgba
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .style import MAP, MAP_SECONDARY, cmap, colour, frame_label, paper_style

KEPT_EDGE = "#D55E00"
TITLES = {
    "query_attention": "attention of each query over its frame",
    "pooling_grid": "adaptive average pooling to {s} x {s} tokens per frame (bins numbered by token)",
    "source_map": "ToMe (reimplementation): patches merged into {k} tokens per frame, one colour per token",
    "kept_mask": "top-k pruning: {k} of {p} patches kept per frame (outlined); colour: scorer logit",
}


def evenly_spread(n: int, at_most: int) -> np.ndarray:
    """At most `at_most` of 0..n-1, evenly spread (first and last included): the frames or queries shown."""
    return np.unique(np.linspace(0, n - 1, min(n, max(1, int(at_most)))).round().astype(int))


def picture_data(picture: dict) -> dict:
    """The picture without the frames and output tokens (too big for JSON): what the figure shows, as numbers."""
    return {k: v for k, v in picture.items() if k not in ("frames", "tokens")}


def _no_token(picture: dict) -> np.ndarray:
    """[T, rows, cols] True where a patch cell has no token (SigLIP's dropped first patch)."""
    kind = picture["kind"]
    if kind == "query_attention":
        return np.isnan(np.asarray(picture["attention"], dtype=float)[:, 0])
    if kind == "kept_mask":
        return np.isnan(np.asarray(picture["scores"], dtype=float))
    return np.asarray(picture["cell_token" if kind == "pooling_grid" else "source"]) < 0


def _borders(labels: np.ndarray, x0: float, y0: float, cw: float, ch: float) -> list:
    """Line segments between neighbouring cells with different labels [rows, cols]."""
    segments = [[(x0 + (c + 1) * cw, y0 + r * ch), (x0 + (c + 1) * cw, y0 + (r + 1) * ch)]
                for r, c in zip(*np.nonzero(labels[:, 1:] != labels[:, :-1]))]
    segments += [[(x0 + c * cw, y0 + (r + 1) * ch), (x0 + (c + 1) * cw, y0 + (r + 1) * ch)]
                 for r, c in zip(*np.nonzero(labels[1:] != labels[:-1]))]
    return segments


def plot_connector_picture(picture: dict, frames: int = 4, *, max_queries: int = 8, alpha: float = 0.55) -> Figure:
    """One figure per `connector_picture` dict: `frames` frames (evenly spread), each with its kind's look drawn
    over the patch grid's pixel box; hatched cells are patches with no token. llava_mini shows up to
    `max_queries` queries per frame (evenly spread), one column each."""
    kind, name = picture["kind"], picture["connector_type"]
    if kind not in TITLES:
        raise ValueError(f"Unknown picture kind '{kind}' (use {', '.join(TITLES)}).")
    images = np.asarray(picture["frames"])
    pick = evenly_spread(images.shape[0], frames)
    h, w = images.shape[1:3]  # the tower's view, which the patch grid covers
    x0, y0, x1, y1 = 0, 0, w, h
    aspect = float(picture.get("frame_aspect") or 1.0)  # drawn at the source's width / height
    rows, cols = picture["grid"]
    cw, ch = (x1 - x0) / cols, (y1 - y0) / rows
    extent = (x0, x1, y1, y0)
    k, p = int(picture["output_tokens_per_frame"]), int(picture["tokens_per_frame"])
    missing = _no_token(picture)
    queries = evenly_spread(k, max_queries) if kind == "query_attention" else [None]
    scale = {"query_attention": "attention", "kept_mask": "scores"}.get(kind)  # [T, k, rows, cols] / [T, rows, cols]
    values = norm = colours = None
    if scale:
        values = np.asarray(picture[scale], dtype=float)
        shown = values[pick][:, queries] if kind == "query_attention" else values[pick]
        finite = shown[np.isfinite(shown)]
        low = 0.0 if kind == "query_attention" else (float(finite.min()) if finite.size else 0.0)
        high = float(finite.max()) if finite.size else 1.0
        norm = Normalize(vmin=low, vmax=high if high > low else low + 1.0)
        colours = cmap(MAP if kind == "query_attention" else MAP_SECONDARY, bad=(0, 0, 0, 0))
    if kind == "query_attention":  # one row per frame, one column per query
        panels = [[(t, q) for q in queries] for t in pick]
    else:
        panels = [[(t, None) for t in pick]]
    with paper_style():
        fig = Figure(figsize=(1.5 * len(panels[0]) * max(aspect, 0.6) + 0.9, 1.5 * len(panels) + 0.6),
                     layout="constrained")
        axes = fig.subplots(len(panels), len(panels[0]), squeeze=False)
        for ax, (t, q) in zip(axes.flat, [panel for row in panels for panel in row]):
            ax.set_axis_off()
            ax.imshow(images[t], interpolation="bilinear")
            _draw(ax, picture, kind, t, q, values, norm, colours, alpha, (x0, y0, cw, ch), extent)
            for r, c in zip(*np.nonzero(missing[t])):
                ax.add_patch(Rectangle((x0 + c * cw, y0 + r * ch), cw, ch, fill=False, hatch="////",
                                       edgecolor="white", lw=0.0))
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_aspect(h / w / aspect)  # y unit over x unit: a w x h view shown at the source's shape
            label = frame_label(picture["frame_indices"], picture["timestamps"], int(t), two_lines=False)
            ax.set_title(label + ("" if q is None else f" · query {q}"), fontsize=6.5)
        if norm is not None:
            fig.colorbar(ScalarMappable(norm=norm, cmap=colours.with_extremes(bad="white")), ax=axes, shrink=0.8,
                         pad=0.01, label="attention weight" if kind == "query_attention" else "scorer logit")
        title = TITLES[kind].format(s=picture.get("pool_size"), k=k, p=p)
        fig.suptitle(f"{name}: {title}")
    return fig


def _draw(ax, picture, kind, t, q, values, norm, colours, alpha, cell, extent) -> None:
    x0, y0, cw, ch = cell
    if kind == "query_attention":
        ax.imshow(np.ma.masked_invalid(values[t, q]), extent=extent, cmap=colours, norm=norm, alpha=alpha,
                  interpolation="nearest")
    elif kind == "kept_mask":
        ax.imshow(np.ma.masked_invalid(values[t]), extent=extent, cmap=colours, norm=norm, alpha=alpha,
                  interpolation="nearest")
        for r, c in zip(*np.nonzero(np.asarray(picture["kept"][t]))):
            ax.add_patch(Rectangle((x0 + c * cw, y0 + r * ch), cw, ch, fill=False, edgecolor=KEPT_EDGE, lw=1.2))
    elif kind == "pooling_grid":
        s = int(picture["pool_size"])
        for i, (r0, r1) in enumerate(np.asarray(picture["row_edges"])):
            for j, (c0, c1) in enumerate(np.asarray(picture["col_edges"])):
                ax.add_patch(Rectangle((x0 + c0 * cw, y0 + r0 * ch), (c1 - c0) * cw, (r1 - r0) * ch, fill=False,
                                       edgecolor=colour(i * s + j), lw=1.2))
                if s <= 8:
                    ax.text(x0 + (c0 + c1) / 2 * cw, y0 + (r0 + r1) / 2 * ch, str(i * s + j), color="white",
                            fontsize=6, ha="center", va="center", fontweight="bold")
    else:  # source_map: one colour per output token, white lines between tokens
        source = np.asarray(picture["source"][t])
        palette = np.array([to_rgba(colour(j)) for j in range(int(picture["output_tokens_per_frame"]))])
        painted = np.where((source >= 0)[..., None], palette[np.clip(source, 0, None)], 0.0)
        ax.imshow(painted, extent=extent, alpha=alpha, interpolation="nearest")
        ax.add_collection(LineCollection(_borders(source, x0, y0, cw, ch), colors="white", linewidths=0.8))
