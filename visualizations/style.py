"""Shared look: colour-blind-safe colours, paper-sized fonts, frame labels."""

from __future__ import annotations

import contextlib

import matplotlib
import numpy as np

# Okabe & Ito's palette: distinguishable with every common colour-vision deficiency.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000")
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")
MAP = "viridis"         # attention maps
MAP_SECONDARY = "cividis"   # matrices and profiles
FRAME_LINE = dict(color="white", lw=0.5, alpha=0.7)
GROUP_LINE = dict(color="#D55E00", lw=0.9, ls="--")

# Sizes in inches: a double-column figure is about 7 wide, a single column about 3.4.
WIDE = 7.0
NARROW = 3.4

STYLE = {
    "font.size": 8, "axes.titlesize": 8.5, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "figure.titlesize": 9, "axes.spines.top": False, "axes.spines.right": False,
    "savefig.bbox": "tight", "image.cmap": MAP,
}


@contextlib.contextmanager
def paper_style():
    with matplotlib.rc_context(STYLE):
        yield


def colour(i: int) -> str:
    return PALETTE[i % len(PALETTE)]


def cmap(name: str = MAP, bad=(0.85, 0.85, 0.85, 1.0)):
    """A registered colormap with `bad` (masked / NaN) cells in the given colour."""
    return matplotlib.colormaps[name].with_extremes(bad=bad)


def frame_ticks(num_frames: int, max_labels: int = 16) -> np.ndarray:
    """Which frames get a tick label: all of them up to max_labels, else every k-th."""
    step = max(1, int(np.ceil(num_frames / max_labels)))
    return np.arange(0, num_frames, step)


def frame_label(frame_indices, timestamps, t: int, two_lines: bool = True) -> str:
    """'f12\\n1.2 s': the frame's index in the source video and its time."""
    sep = "\n" if two_lines else " · "
    return f"f{int(frame_indices[t])}{sep}{float(timestamps[t]):.1f} s"
