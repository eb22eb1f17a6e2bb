"""Figures of where the language model looks while it answers (an `LLMAttention`): the share of its attention on the
visual tokens per layer, the relevance of each frame for each answer word, and the patches of the frames."""

from __future__ import annotations

import numpy as np
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from .style import MAP_SECONDARY, NARROW, WIDE, cmap, colour, frame_label, frame_ticks, paper_style


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
    from .attention import frame_maps_figure

    share = result.frame_relevance(token=token)
    what = "the whole answer" if token is None else f"token {token} {result.tokens[token].strip()!r}"
    return frame_maps_figure(result.frames, result.patch_relevance(token=token), result.frame_indices,
                             result.timestamps, float(result.frame_aspect or 1.0), label="relevance",
                             title=f"Patches the LLM's attention rests on, for {what}", max_frames=max_frames,
                             columns=columns, alpha=alpha, notes=[f"{v:.0%}" for v in share])


__all__ = ["plot_frame_relevance", "plot_patch_relevance", "plot_visual_share"]
