"""What the connector looks at: its query-to-token attention over a video (`attention_maps`, one forward pass
with `output_attentions`), and how much its queries and output tokens repeat each other (`redundancy_stats`,
`token_redundancy`).

Attention arrays are float32 ``[layers, heads, Q, N]`` with Q the connector's queries (= its output tokens for every
Perceiver connector) and N = T * P the flat frame-major visual tokens.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from ..errors import VidlmmError
from .jsonable import to_jsonable

if TYPE_CHECKING:
    from ..connectors import TokenLayout
    from ..pipeline import PreparedVideo, VideoLMM


def _check_layer(num_layers: int, layer: int) -> int:
    if not -num_layers <= layer < num_layers:
        raise VidlmmError(f"Layer {layer} does not exist: the connector has {num_layers} layers.")
    return layer % num_layers


@dataclass
class AttentionMaps:
    """The connector's attention for one video, from its own forward pass.

    media [layers, heads, Q, N]: query -> visual-token weights (exactly 0 outside the query's group).
    latents [layers, heads, Q, L]: query -> latent weights; each row of media and latents together sums to 1.
    frames [T, S, S, 3] uint8: the sampled frames as the tower sees them (its square input, which the patch grid
    covers); frame_aspect: width / height to draw them at (the source's for SigLIP's squash, 1 for the centre
    crop of CLIP / DINOv2).
    """

    media: np.ndarray
    latents: np.ndarray
    layout: "TokenLayout"
    query_groups: np.ndarray
    group_spans: list[tuple[int, int]]
    frames: np.ndarray
    frame_indices: list[int]
    timestamps: list[float]
    grid: tuple[int, int]
    tokens: np.ndarray
    connector_type: str
    frame_aspect: float = 1.0

    @property
    def num_layers(self) -> int:
        return int(self.media.shape[0])

    @property
    def num_heads(self) -> int:
        return int(self.media.shape[1])

    @property
    def num_queries(self) -> int:
        return int(self.media.shape[2])

    @property
    def num_frames(self) -> int:
        return int(self.layout.num_frames)

    @property
    def tokens_per_frame(self) -> int:
        return int(self.layout.tokens_per_frame)

    @property
    def groups(self) -> np.ndarray:
        """Group ids in order, [G]."""
        return np.unique(self.query_groups)

    def layer(self, layer: int = -1, head: int | None = None) -> np.ndarray:
        """[Q, N] visual-token attention of one layer: the mean over heads, or one head."""
        layer = _check_layer(self.num_layers, layer)
        if head is None:
            return self.media[layer].mean(axis=0)
        if not 0 <= head < self.num_heads:
            raise VidlmmError(f"Head {head} does not exist: the connector has {self.num_heads} heads.")
        return self.media[layer, head]

    def latent_share(self, layer: int = -1, head: int | None = None) -> np.ndarray:
        """[Q] the part of each query's attention that goes to latents rather than visual tokens."""
        layer = _check_layer(self.num_layers, layer)
        lat = self.latents[layer] if head is None else self.latents[layer, head][None]
        return lat.sum(axis=-1).mean(axis=0)

    def _query_rows(self, query: int | None, group: int | None) -> np.ndarray:
        if query is not None and group is not None:
            raise VidlmmError("Choose one query or one group, not both.")
        if query is not None:
            if not 0 <= query < self.num_queries:
                raise VidlmmError(f"Query {query} does not exist: the connector has {self.num_queries} queries.")
            return np.array([query])
        if group is not None:
            rows = np.flatnonzero(self.query_groups == group)
            if rows.size == 0:
                raise VidlmmError(f"Group {group} does not exist: the connector has groups "
                                  f"0-{int(self.query_groups.max())}.")
            return rows
        return np.arange(self.num_queries)

    def spatial(self, layer: int = -1, head: int | None = None, query: int | None = None,
                group: int | None = None) -> np.ndarray:
        """[T, rows, cols] attention per patch cell of each frame: one query's, or the mean over a group's queries
        or over all queries. Cells with no token (the patch the `patch` strategy drops) are NaN."""
        import torch

        values = self.layer(layer, head)[self._query_rows(query, group)].mean(axis=0)
        return self.layout.to_grid(torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32))).numpy()

    def temporal_profile(self, layer: int = -1, head: int | None = None) -> np.ndarray:
        """[G, T] attention mass each group's queries put on each frame (mean over the group's queries)."""
        per_frame = self.layer(layer, head).reshape(self.num_queries, self.num_frames, self.tokens_per_frame).sum(-1)
        return np.stack([per_frame[self.query_groups == g].mean(axis=0) for g in self.groups])

    def rows(self, layer: int = -1, head: int | None = None) -> list[dict]:
        """CSV rows of the temporal profile: one per (group, frame)."""
        profile = self.temporal_profile(layer, head)
        return [{"group": int(g), "frame": t, "frame_index": self.frame_indices[t],
                 "timestamp_s": round(float(self.timestamps[t]), 6), "attention_mass": float(profile[gi, t])}
                for gi, g in enumerate(self.groups) for t in range(self.num_frames)]

    def to_json(self) -> dict:
        """Metadata and, per layer (head mean): each query's latent share, the temporal profile and the mean
        spatial map over all queries. The full [layers, heads, Q, N] arrays are too big for JSON (use np.savez)."""
        layers = []
        for i in range(self.num_layers):
            layers.append({"layer": i, "latent_share": self.latent_share(i),
                           "temporal_profile": self.temporal_profile(i), "spatial_mean": self.spatial(i)})
        return to_jsonable({
            "connector_type": self.connector_type, "num_layers": self.num_layers, "num_heads": self.num_heads,
            "num_queries": self.num_queries, "num_visual_tokens": int(self.media.shape[-1]),
            "num_frames": self.num_frames, "tokens_per_frame": self.tokens_per_frame, "grid": list(self.grid),
            "first_cell": int(self.layout.first_cell), "frame_indices": list(self.frame_indices),
            "timestamps": [round(float(t), 6) for t in self.timestamps], "query_groups": self.query_groups,
            "group_spans": [list(s) for s in self.group_spans], "frame_aspect": self.frame_aspect,
            "layers": layers,
        })


def _prepared(lmm: "VideoLMM", video, sampling) -> "PreparedVideo":
    from ..pipeline import PreparedVideo

    return video if isinstance(video, PreparedVideo) else lmm.prepare(str(video), sampling)[0]


def frame_aspect(processor, clip) -> float:
    """Width / height at which to draw the tower's square view of a clip's frames: the source's shape for a
    squash (SigLIP), square for a centre crop (CLIP, DINOv2; see preprocess.ImageProcessor)."""
    width, height = clip.source_size
    if getattr(processor, "mode", "squash") != "squash" or not (width and height):
        return 1.0
    return width / height


def attention_maps(lmm: "VideoLMM", video, *, sampling=None) -> AttentionMaps:
    """The connector's attention over one video (a path or a PreparedVideo; the vision features are cached).

    Memory: media holds layers x heads x Q x N float32 (about 0.6 GB for the published 512-query model at 16
    frames of 728 tokens), the same the connector builds when asked for its attention.
    """
    model = lmm.model
    prepared = _prepared(lmm, video, sampling)
    out = lmm.visual_tokens(prepared, output_attentions=True)
    name = model.connector.registry_name
    if not out.attentions:
        if getattr(out, "picture", None) is not None:  # pooling / merging / pruning: a picture, no attention
            raise VidlmmError(f"The '{name}' connector has no attention to show; connector_picture shows what it "
                              "does to each frame.")
        raise VidlmmError(f"The '{name}' connector has no attention to show (it maps every token on its own).")
    media = np.stack([a.media[0].float().cpu().numpy() for a in out.attentions])
    latents = np.stack([a.latents[0].float().cpu().numpy() for a in out.attentions])
    clip = prepared.clip
    layout = model.token_layout(prepared.num_frames)
    return AttentionMaps(
        media=media, latents=latents, layout=layout, query_groups=out.query_groups.cpu().numpy(),
        group_spans=[(int(a), int(b)) for a, b in out.group_spans], frames=clip.sampled_frames(),
        frame_indices=[int(i) for i in clip.indices], timestamps=[float(t) for t in clip.timestamps],
        grid=tuple(layout.grid), tokens=out.tokens[0].float().cpu().numpy(), connector_type=name,
        frame_aspect=frame_aspect(model.image_processor, clip))


def _token_cosine(tokens) -> tuple[np.ndarray, float]:
    """(cosine [Q, Q] of the tokens, effective_tokens: participation ratio of its eigenvalues)."""
    tokens = np.asarray(tokens, dtype=np.float64)
    unit = tokens / np.maximum(np.linalg.norm(tokens, axis=-1, keepdims=True), 1e-12)
    cosine = unit @ unit.T
    eig = np.clip(np.linalg.eigvalsh(cosine), 0, None)
    return cosine, float(eig.sum() ** 2 / max((eig**2).sum(), 1e-12))


def token_redundancy(tokens, connector_type: str = "") -> dict:
    """The output-token half of `redundancy_stats`, for connectors with no attention (pool, tome, topk, MLP):
    tokens [Q, D] (e.g. `connector_picture(...)["tokens"]`) -> cosine [Q, Q] float32 and a summary with
    cosine_mean (off-diagonal) and effective_tokens (Q when orthogonal, 1 when all parallel)."""
    cosine, effective = _token_cosine(tokens)
    off = ~np.eye(cosine.shape[0], dtype=bool)
    mean = float(cosine[off].mean()) if off.any() else float("nan")
    return {"connector_type": connector_type, "cosine": cosine.astype(np.float32),
            "summary": {"tokens": int(cosine.shape[0]), "cosine_mean": mean, "effective_tokens": effective}}


def redundancy_stats(maps: AttentionMaps, layer: int = -1) -> dict:
    """How much the queries repeat each other, from one layer's head-mean attention and the output tokens.

    entropy [Q] (nats) of each query's visual attention renormalised to sum 1; entropy_normalized divides by
    log(tokens the query can see), so 1 = uniform over its own group. overlap [Q, Q]: Bhattacharyya coefficient
    sum_i sqrt(p_i q_i) of two queries' distributions (1 = identical, 0 = disjoint). cosine [Q_out, Q_out]: of
    the output tokens. effective_tokens: participation ratio of the cosine matrix's eigenvalues (Q_out when the
    tokens are orthogonal, 1 when they are all parallel). `rows` are per-query CSV rows.
    """
    index = _check_layer(maps.num_layers, layer)
    attn = maps.layer(index).astype(np.float64)
    visual = attn.sum(-1)
    p = attn / np.where(visual > 0, visual, 1.0)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = -np.where(p > 0, p * np.log(p), 0.0).sum(-1)
    span_sizes = np.array([end - start for start, end in maps.group_spans])
    support = span_sizes[maps.query_groups]  # visual tokens each query can attend to
    entropy_norm = entropy / np.log(np.maximum(support, 2))
    root = np.sqrt(p)
    overlap = root @ root.T
    cosine, effective = _token_cosine(maps.tokens)
    q = maps.num_queries
    off = ~np.eye(q, dtype=bool)
    same = (maps.query_groups[:, None] == maps.query_groups[None, :]) & off
    across = (maps.query_groups[:, None] != maps.query_groups[None, :])
    latent_share = maps.latent_share(index)
    qo = cosine.shape[0]
    off_out = ~np.eye(qo, dtype=bool)

    def mean(x, where):
        return float(x[where].mean()) if where.any() else float("nan")

    summary = {
        "queries": q, "groups": int(len(maps.groups)), "entropy_mean": float(entropy.mean()),
        "entropy_normalized_mean": float(entropy_norm.mean()), "latent_share_mean": float(latent_share.mean()),
        "overlap_mean": mean(overlap, off), "overlap_within_group_mean": mean(overlap, same),
        "overlap_across_groups_mean": mean(overlap, across), "cosine_mean": mean(cosine, off_out),
        "effective_tokens": effective,
    }
    rows = [{"query": i, "group": int(maps.query_groups[i]), "entropy": float(entropy[i]),
             "entropy_normalized": float(entropy_norm[i]), "latent_share": float(latent_share[i]),
             "overlap_mean": float(overlap[i, off[i]].mean()) if q > 1 else float("nan"),
             "cosine_mean": float(cosine[i, off_out[i]].mean()) if qo > 1 and i < qo else float("nan")}
            for i in range(q)]
    return {"layer": index, "connector_type": maps.connector_type, "query_groups": maps.query_groups,
            "entropy": entropy.astype(np.float32), "entropy_normalized": entropy_norm.astype(np.float32),
            "latent_share": latent_share.astype(np.float32), "overlap": overlap.astype(np.float32),
            "cosine": cosine.astype(np.float32), "summary": summary, "rows": rows}


__all__ = ["AttentionMaps", "attention_maps", "frame_aspect", "redundancy_stats", "token_redundancy"]
