"""What a per-frame compressor does to each frame (`connector_picture`): the connector's own picture
(`ConnectorModule.picture_kind` / `picture_grids`) over the frames the tower saw."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..errors import VidlmmError
from .attention import _prepared, frame_aspect

if TYPE_CHECKING:
    from ..pipeline import VideoLMM


def connector_picture(lmm: "VideoLMM", video, *, sampling=None) -> dict:
    """What a per-frame compressor (`vidlmm.compressors`) does to each frame, from one connector pass.

    video: a path or a PreparedVideo. Returns a dict of numpy arrays and plain values. Always: connector_type;
    kind (below); frames [T, S, S, 3] uint8 as the tower sees them (the patch grid covers each); frame_aspect
    (width / height to draw them at);
    grid (rows, cols); frame_indices; timestamps (s); num_frames; tokens_per_frame (P, tokens in per frame);
    output_tokens_per_frame (k); tokens [T * k, D] float32 output tokens. Grids are [T, rows, cols] over each
    frame's patch cells; a cell with no token (SigLIP's dropped first patch) holds NaN, -1 or False.

    kind "query_attention" (llava_mini): attention [T, k, rows, cols] float32, each query's head-mean attention
        over its own frame (sums to 1 over the frame's tokens).
    kind "pooling_grid" (pool): pool_size s (k = s * s); row_edges, col_edges [s, 2] int, the [start, end) grid
        cells of each pooling bin (adaptive bins may overlap by one cell); cell_token [T, rows, cols] int, the
        frame's output token whose bin holds the cell (the first one where bins overlap).
    kind "source_map" (tome): source [T, rows, cols] int, the frame's output token each patch was merged into
        (regions to paint); size [T, k] int, patches per output token.
    kind "kept_mask" (topk): kept [T, rows, cols] bool; scores [T, rows, cols] float32 scorer logits;
        kept_indices [T, k] int, the kept tokens' indices within the frame, in raster order.
    Output token j of frame t is token t * k + j of the connector's output.
    """
    model = lmm.model
    prepared = _prepared(lmm, video, sampling)
    out = lmm.visual_tokens(prepared, output_attentions=True)
    connector = model.connector
    name = connector.registry_name
    picture = getattr(out, "picture", None)
    if connector.picture_kind is None or picture is None:
        raise VidlmmError(f"The '{name}' connector has no picture of its own; attention_maps shows what it looks at.")
    layout = model.token_layout(prepared.num_frames)
    t, p = layout.num_frames, layout.tokens_per_frame
    clip = prepared.clip
    k = int(out.tokens.shape[1]) // t
    result = {"connector_type": name, "kind": connector.picture_kind, "frames": clip.sampled_frames(),
              "frame_aspect": frame_aspect(model.image_processor, clip), "grid": tuple(layout.grid),
              "frame_indices": [int(i) for i in clip.indices], "timestamps": [float(x) for x in clip.timestamps],
              "num_frames": t, "tokens_per_frame": p, "output_tokens_per_frame": k,
              "tokens": out.tokens[0].float().cpu().numpy()}
    result.update(connector.picture_grids(picture, layout, k))
    return result


__all__ = ["connector_picture"]
