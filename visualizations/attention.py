"""Figures of the connector's attention (an `AttentionMaps`) and of its redundancy statistics.

Every function returns a new `matplotlib.figure.Figure` (no pyplot state), ready for `save_figure`.
"""

from __future__ import annotations

import math

import numpy as np
from matplotlib.cm import ScalarMappable
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from .style import (FRAME_LINE, GROUP_LINE, MAP, MAP_SECONDARY, NARROW, WIDE, cmap, colour, frame_label,
                    frame_ticks, paper_style)


def _which(maps, layer: int, head: int | None) -> str:
    index = layer % maps.num_layers
    return f"layer {index + 1}/{maps.num_layers}, " + ("mean of heads" if head is None else f"head {head}")


def _latent_note(maps, layer: int, head: int | None) -> str:
    share = maps.latent_share(layer, head)
    return f"latent share {share.mean():.2f} (min {share.min():.2f}, max {share.max():.2f}); shown: visual part"


def _group_boundaries(query_groups: np.ndarray) -> np.ndarray:
    """Row positions between consecutive query groups."""
    return np.flatnonzero(np.diff(query_groups)) + 0.5


def plot_attention_heatmap(maps, layer: int = -1, head: int | None = None, scale: str = "linear", *,
                           figsize=(WIDE, 3.4)) -> Figure:
    """Queries x visual tokens of one layer (head mean or one head), linear or log colour scale.

    Frame boundaries are thin white lines (ticks: source frame index and time); the visual-token spans of the
    groups, where they are not frame boundaries, dashed vermillion lines; query groups are separated by
    horizontal lines. Exact zeros (tokens outside a query's group) are grey on the log scale.
    """
    if scale not in ("linear", "log"):
        raise ValueError(f"Unknown scale '{scale}' (use linear or log).")
    attn = maps.layer(layer, head)
    q, n = attn.shape
    p, t = maps.tokens_per_frame, maps.num_frames
    with paper_style():
        fig = Figure(figsize=figsize, layout="constrained")
        ax = fig.add_subplot()
        if scale == "log":
            positive = attn[attn > 0]
            vmax = float(positive.max()) if positive.size else 1.0
            vmin = max(float(positive.min()) if positive.size else vmax * 1e-4, vmax * 1e-5)
            norm, data = LogNorm(vmin=vmin, vmax=vmax), np.ma.masked_less_equal(attn, 0)
        else:
            norm, data = Normalize(vmin=0.0, vmax=float(attn.max()) or 1.0), attn
        image = ax.imshow(data, aspect="auto", cmap=cmap(MAP), norm=norm, interpolation="antialiased",
                          extent=(-0.5, n - 0.5, q - 0.5, -0.5))
        for k in range(1, t):
            ax.axvline(k * p - 0.5, **FRAME_LINE)
        frame_starts = {k * p for k in range(t + 1)}
        for start, _ in maps.group_spans[1:]:
            if start not in frame_starts:
                ax.axvline(start - 0.5, **GROUP_LINE)
        for y in _group_boundaries(maps.query_groups):
            ax.axhline(y, color="white", lw=0.6, alpha=0.8)
        ticks = frame_ticks(t)
        ax.set_xticks(ticks * p + (p - 1) / 2,
                      [frame_label(maps.frame_indices, maps.timestamps, int(k)) for k in ticks])
        ax.set_xlabel(f"visual tokens, frame by frame ({p} per frame; label: source frame, time)")
        groups = maps.groups
        if 1 < len(groups) <= 16:
            centres = [np.flatnonzero(maps.query_groups == g).mean() for g in groups]
            right = ax.secondary_yaxis("right")
            right.set_yticks(centres, [f"g{int(g)}" for g in groups])
            right.tick_params(length=0)
        ax.set_ylabel("query (output token)")
        ax.set_title(f"{maps.connector_type}: query to visual-token attention, {_which(maps, layer, head)}\n"
                     f"{_latent_note(maps, layer, head)}")
        fig.colorbar(image, ax=ax, label="attention weight" + (" (log)" if scale == "log" else ""), pad=0.01)
    return fig


def plot_frame_overlays(maps, layer: int = -1, head: int | None = None, query: int | None = None,
                        group: int | None = None, max_frames: int = 16, *, alpha: float = 0.6,
                        columns: int = 8) -> Figure:
    """Per-frame attention over the real frames (one query, one group's mean, or the mean of all queries).

    One colour scale for all frames; a hatched cell is a patch with no token (dropped by the `patch` strategy).
    At most `max_frames` frames are drawn, evenly spread over the clip.
    """
    maps_t = maps.spatial(layer, head, query, group)  # [T, rows, cols]
    if query is not None:
        what = f"query {query} (group {int(maps.query_groups[query])})"
    elif group is not None:
        what = f"the {int((maps.query_groups == group).sum())} queries of group {group} (mean)"
    else:
        what = f"all {maps.num_queries} queries (mean)"
    return frame_maps_figure(maps.frames, maps_t, maps.frame_indices, maps.timestamps,
                             float(getattr(maps, "frame_aspect", 1.0) or 1.0), label="attention weight",
                             title=f"{maps.connector_type}: attention of {what} over the frames, "
                                   f"{_which(maps, layer, head)}", max_frames=max_frames, columns=columns, alpha=alpha)


def frame_maps_figure(frames, maps_t, frame_indices, timestamps, aspect: float, *, label: str, title: str,
                      max_frames: int = 16, columns: int = 8, alpha: float = 0.6, notes=None) -> Figure:
    """Per-frame maps [T, rows, cols] over the frames the tower saw [T, S, S, 3], at most `max_frames` evenly
    spread, one colour scale; a hatched cell has no token (NaN). notes: a line under each frame's label, by frame."""
    t_all = maps_t.shape[0]
    pick = np.unique(np.linspace(0, t_all - 1, min(t_all, max(1, max_frames))).round().astype(int))
    ncols = min(len(pick), columns)
    nrows = math.ceil(len(pick) / ncols)
    h, w = frames.shape[1:3]  # the tower's view, which the patch grid covers
    rows, cols = maps_t.shape[1:]
    panel = 1.0 if ncols >= 6 else 1.5
    vmax = float(np.nanmax(maps_t[pick])) if np.isfinite(maps_t[pick]).any() else 1.0
    norm = Normalize(vmin=0.0, vmax=vmax if vmax > 0 else 1.0)
    colours = cmap(MAP, bad=(0, 0, 0, 0))
    with paper_style():
        fig = Figure(figsize=(panel * ncols * max(aspect, 0.6) + 0.9, panel * nrows + 0.6), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for ax, t in zip(axes.flat, pick):
            ax.imshow(frames[t], interpolation="bilinear")
            ax.imshow(np.ma.masked_invalid(maps_t[t]), extent=(0, w, h, 0), cmap=colours, norm=norm,
                      alpha=alpha, interpolation="nearest")
            cw, ch = w / cols, h / rows
            for r, c in zip(*np.nonzero(np.isnan(maps_t[t]))):
                ax.add_patch(Rectangle((c * cw, r * ch), cw, ch, fill=False, hatch="////", edgecolor="white",
                                       lw=0.0))
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_aspect(h / w / aspect)  # y unit over x unit: a w x h view shown at the source's shape
            name = frame_label(frame_indices, timestamps, int(t), two_lines=False)
            ax.set_title(name if notes is None else f"{name}\n{notes[t]}", fontsize=6.5)
        fig.colorbar(ScalarMappable(norm=norm, cmap=colours.with_extremes(bad="white")), ax=axes, shrink=0.8,
                     label=label, pad=0.01)
        fig.suptitle(title)
    return fig


def plot_temporal_profile(maps, layer: int = -1, head: int | None = None, *, figsize=(NARROW * 1.6, 2.6)) -> Figure:
    """Attention mass per frame for each query group (mean over the group's queries): lines for up to 8
    groups, a groups x frames map beyond that."""
    profile = maps.temporal_profile(layer, head)  # [G, T]
    groups, t = profile.shape
    ticks = frame_ticks(t)
    labels = [frame_label(maps.frame_indices, maps.timestamps, int(k)) for k in ticks]
    with paper_style():
        fig = Figure(figsize=figsize, layout="constrained")
        ax = fig.add_subplot()
        if groups <= 8:
            for g in range(groups):
                name = "all queries" if groups == 1 else f"group {int(maps.groups[g])}"
                ax.plot(np.arange(t), profile[g], marker="o", ms=2.5, lw=1.2, color=colour(g), label=name)
            ax.set_ylabel("attention mass on the frame")
            ax.set_ylim(bottom=0)
            ax.legend(frameon=False, ncols=min(groups, 4), loc="upper center", bbox_to_anchor=(0.5, -0.32))
        else:
            image = ax.imshow(profile, aspect="auto", cmap=cmap(MAP_SECONDARY), interpolation="nearest",
                              vmin=0.0)
            ax.set_ylabel("query group")
            fig.colorbar(image, ax=ax, label="attention mass on the frame", pad=0.01)
        ax.set_xticks(ticks, labels)
        ax.set_xlabel("frame (source index, time)")
        ax.set_title(f"{maps.connector_type}: attention per frame, {_which(maps, layer, head)}")
    return fig


def plot_redundancy_stats(stats: dict, *, figsize=(WIDE, 2.6)) -> Figure:
    """Three panels from `redundancy_stats`: per-query normalised attention entropy, the queries' attention
    overlap (Bhattacharyya coefficient) and the output tokens' cosine similarity; summaries in the titles."""
    s = stats["summary"]
    with paper_style():
        fig = Figure(figsize=figsize, layout="constrained")
        ax_e, ax_o, ax_c = fig.subplots(1, 3)
        ent = np.asarray(stats["entropy_normalized"], dtype=float)
        ax_e.hist(ent, bins=min(30, max(5, len(ent) // 4)), range=(0, 1), color=colour(0), edgecolor="white", lw=0.3)
        ax_e.set_xlabel("attention entropy / log(tokens seen)")
        ax_e.set_ylabel("queries")
        ax_e.set_title(f"entropy: mean {s['entropy_normalized_mean']:.2f}")
        for ax, key, title in ((ax_o, "overlap", f"attention overlap: mean {s['overlap_mean']:.2f}"),
                               (ax_c, "cosine", f"token cosine: mean {s['cosine_mean']:.2f}")):
            matrix = np.asarray(stats[key], dtype=float)
            low = 0.0 if key == "overlap" else min(0.0, float(matrix.min()))
            image = ax.imshow(matrix, cmap=cmap(MAP_SECONDARY), vmin=low, vmax=1.0, interpolation="nearest")
            for y in _group_boundaries(np.asarray(stats["query_groups"])):
                ax.axhline(y, color="white", lw=0.4, alpha=0.7)
                ax.axvline(y, color="white", lw=0.4, alpha=0.7)
            ax.set_xlabel("query")
            ax.set_ylabel("query")
            ax.set_title(title)
            fig.colorbar(image, ax=ax, shrink=0.85, pad=0.01)
        within = s.get("overlap_within_group_mean")
        extra = f", within groups {within:.2f}" if within is not None and np.isfinite(within) and s["groups"] > 1 \
            else ""
        fig.suptitle(f"{stats['connector_type']}, layer {stats['layer'] + 1}: {s['queries']} queries{extra}; "
                     f"effective tokens {s['effective_tokens']:.1f}; latent share {s['latent_share_mean']:.2f}")
    return fig
