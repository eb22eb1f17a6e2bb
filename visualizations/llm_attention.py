"""Figures of where the language model looks while it answers (an `LLMAttention`): the share of its attention on the
visual tokens per layer, the relevance of each frame for each answer word, and the patches of the frames."""

from __future__ import annotations

import math

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .style import MAP, MAP_SECONDARY, NARROW, WIDE, cmap, colour, frame_label, frame_ticks, paper_style


def plot_visual_share(shares: dict, *, figsize=(NARROW, 2.6), over: str = "tokens") -> Figure:
    """Attention on the visual tokens per LLM layer, one line per label (e.g. per connector): shares {label: [rows,
    L]} (`LLMAttention.visual_share()`, one row per answer token, or one per question of a set); the line is the
    mean over the rows, the band their min to max."""
    with paper_style():
        fig = Figure(figsize=figsize, layout="constrained")
        ax = fig.add_subplot()
        for i, (label, share) in enumerate(shares.items()):
            share = np.asarray(share)
            layers = np.arange(1, share.shape[1] + 1)
            ax.plot(layers, share.mean(axis=0), marker="o", ms=2.5, color=colour(i), label=label)
            ax.fill_between(layers, share.min(axis=0), share.max(axis=0), color=colour(i), alpha=0.15, lw=0)
        ax.set_xlabel("LLM layer")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel("attention on visual tokens")
        ax.set_ylim(0, 1)
        ax.set_title(f"mean over {over} (band: min to max)")
        ax.legend(frameon=False)
    return fig


def plot_frame_relevance(result, *, max_tokens: int = 40, figsize=None) -> Figure:
    """Answer tokens x frames: each token's relevance over the frames (rows sum to 1), and the whole answer's."""
    a = min(len(result.tokens), max_tokens)
    rows = np.stack([result.frame_relevance(token=k) for k in range(a)] + [result.frame_relevance()])
    t = rows.shape[1]
    labels = [repr(tok.strip() or tok)[1:-1][:14] for tok in result.tokens[:a]] + ["whole answer"]
    with paper_style():
        fig = Figure(figsize=figsize or (WIDE, 0.9 + 0.16 * len(labels)), layout="constrained")
        ax = fig.add_subplot()
        image = ax.imshow(rows, aspect="auto", cmap=cmap(MAP_SECONDARY), norm=Normalize(0, float(rows.max()) or 1),
                          interpolation="nearest")
        ax.axhline(a - 0.5, color="white", lw=1.2)
        ax.set_yticks(range(len(labels)), labels)
        ticks = frame_ticks(t)
        ax.set_xticks(ticks, [frame_label(result.frame_indices, result.timestamps, k) for k in ticks])
        ax.set_xlabel("frame")
        ax.set_title(f"Which frames each answer token rests on ({result.connector_type}; LLM attention traced "
                     "through the connector)")
        fig.colorbar(image, ax=ax, label="relevance", shrink=0.8)
    return fig


def plot_patch_relevance(result, token: int | None = None, *, max_frames: int = 16, columns: int = 8,
                         alpha: float = 0.6) -> Figure:
    """The relevance of each patch drawn over the frames, for one answer token or the whole answer (one colour
    scale for all frames; the frame's share of the relevance in its title)."""
    maps = result.patch_relevance(token=token)  # [T, rows, cols]
    share = result.frame_relevance(token=token)
    t_all = maps.shape[0]
    pick = np.unique(np.linspace(0, t_all - 1, min(t_all, max(1, max_frames))).round().astype(int))
    ncols = min(len(pick), columns)
    nrows = math.ceil(len(pick) / ncols)
    h, w = result.frames.shape[1:3]
    aspect = float(result.frame_aspect or 1.0)
    vmax = float(np.nanmax(maps[pick])) if np.isfinite(maps[pick]).any() else 1.0
    norm = Normalize(0.0, vmax if vmax > 0 else 1.0)
    what = "the whole answer" if token is None else f"token {token} {result.tokens[token].strip()!r}"
    with paper_style():
        panel = 1.0 if ncols >= 6 else 1.5
        fig = Figure(figsize=(panel * ncols * max(aspect, 0.6) + 0.9, panel * nrows + 0.6), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
        for ax in axes.flat:
            ax.set_axis_off()
        for ax, t in zip(axes.flat, pick):
            ax.imshow(result.frames[t], interpolation="bilinear")
            ax.imshow(np.ma.masked_invalid(maps[t]), extent=(0, w, h, 0), cmap=cmap(MAP, bad=(0, 0, 0, 0)),
                      norm=norm, alpha=alpha, interpolation="nearest")
            ax.set_xlim(0, w)
            ax.set_ylim(h, 0)
            ax.set_aspect(h / w / aspect)
            ax.set_title(f"{frame_label(result.frame_indices, result.timestamps, t, two_lines=False)}\n"
                         f"{share[t]:.0%}", fontsize=6.5)
        fig.suptitle(f"Patches the LLM's attention rests on, for {what}")
    return fig


__all__ = ["plot_frame_relevance", "plot_patch_relevance", "plot_visual_share"]
