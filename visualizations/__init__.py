"""Pictures of what a video LMM's connector does: pure functions from `vidlmm.analysis` results to matplotlib
figures (Agg, no pyplot state), plus writers for the figures and the numbers behind them.

    from vidlmm.analysis import attention_maps
    from visualizations import plot_attention_heatmap, save_figure
    save_figure(plot_attention_heatmap(attention_maps(lmm, "clip.mp4"), scale="log"), "attention.pdf")

Command line: ``python -m visualizations attention|llm-attention|picture|redundancy|budget --model M --video V
--out DIR``.
Imports nothing heavier than numpy and matplotlib.
"""

from __future__ import annotations

from .attention import plot_attention_heatmap, plot_frame_overlays, plot_redundancy_stats, plot_temporal_profile
from .curves import plot_token_budget, plot_zeroing
from .llm_attention import plot_frame_relevance, plot_patch_relevance, plot_visual_share
from .io import DATA_FORMATS, FIGURE_FORMATS, Exporter, save_figure, write_data
from .pictures import picture_data, plot_connector_picture

__all__ = [
    "DATA_FORMATS", "Exporter", "FIGURE_FORMATS", "picture_data", "plot_attention_heatmap", "plot_connector_picture",
    "plot_frame_overlays", "plot_frame_relevance", "plot_patch_relevance", "plot_redundancy_stats",
    "plot_temporal_profile", "plot_token_budget", "plot_visual_share", "plot_zeroing", "save_figure", "write_data",
]
