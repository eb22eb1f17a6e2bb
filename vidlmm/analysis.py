"""What the connector looks at, how redundant its tokens are, and what the LLM pays for them.

    maps = attention_maps(lmm, "clip.mp4")               # the connector's own attention, one forward pass
    stats = redundancy_stats(maps)                        # entropy, overlap, cosine of the queries
    curve = zeroing_curve(lmm, "clip.mp4", "What happens?")   # zero queries, score the full model's answer
    budget = token_budget({"group": model.config})        # visual tokens and prefill cost vs frames
    picture = connector_picture(lmm, "clip.mp4")          # pooling grid / merge map / kept mask of a compressor

Everything here is built on return values (`ConnectorOutput.attentions`, `TokenLayout`) and on the pipeline's
`visual=` override: no hooks and no second pass. Results are numpy arrays and small dataclasses with
`to_json()` (and `rows()` for CSV); `visualizations/` turns them into figures.

Conventions: attention arrays are float32 ``[layers, heads, Q, N]`` with Q the connector's queries (= its output
tokens for every Perceiver connector) and N = T * P the flat frame-major visual tokens. Zeroing masks are bool
``[Q]``, True = the token is kept; zeroed tokens stay in the sequence as zero vectors.

torch is imported inside the functions that need it, so `visualizations` can import the JSON helper cheaply.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import numpy as np

from .errors import VidlmmError

if TYPE_CHECKING:
    from .connectors import TokenLayout
    from .pipeline import PreparedVideo, VideoLMM

STRATEGIES = ("random", "contiguous", "groups", "even")
FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.125, 0.0625)
# Connectors without groups (naive, MLP) are cut into this many equal chunks for the "groups" and "even"
# strategies: the paper's group count, so the two families are zeroed at the same granularity.
DEFAULT_CHUNKS = 16

Progress = Callable[[int, int, str], None]  # progress(done, total, description)


# ---- JSON ----------------------------------------------------------------------------------------------------

def to_jsonable(value):
    """numpy arrays and scalars, tuples and dataclass results -> plain JSON values; NaN and inf -> None."""
    if hasattr(value, "to_json") and callable(value.to_json):
        value = value.to_json()
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if isinstance(value, dict):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(value) else None
    return value


def _check_layer(num_layers: int, layer: int) -> int:
    if not -num_layers <= layer < num_layers:
        raise VidlmmError(f"Layer {layer} does not exist: the connector has {num_layers} layers.")
    return layer % num_layers


# ---- attention ------------------------------------------------------------------------------------------------

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
    from .pipeline import PreparedVideo

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


# ---- per-connector pictures -----------------------------------------------------------------------------------

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


# ---- query zeroing -------------------------------------------------------------------------------------------

def _count(fraction: float, n: int) -> int:
    """How many of n to keep at `fraction` (rounded half up; at least one while fraction > 0)."""
    k = int(math.floor(fraction * n + 0.5))
    return min(n, max(k, 1 if fraction > 0 else 0))


def query_group_spans(query_groups) -> list[tuple[int, int]]:
    """[start, end) output-token spans of each group, from the per-token group ids (groups are contiguous)."""
    ids = np.asarray(query_groups)
    cuts = np.flatnonzero(np.diff(ids)) + 1
    starts = np.concatenate([[0], cuts]).astype(int)
    ends = np.concatenate([cuts, [len(ids)]]).astype(int)
    return [(int(s), int(e)) for s, e in zip(starts, ends)]


def zero_mask(num_tokens: int, fraction_active: float, strategy: str, *, seed: int = 0,
              group_spans: list[tuple[int, int]] | None = None) -> np.ndarray:
    """bool [num_tokens], True = kept. About `fraction_active` of the tokens are kept.

    random: a seeded random subset. contiguous: the first k tokens. groups: whole groups kept, a seeded random
    choice of round(fraction * G) of them. even: in every group, tokens evenly spread over the group.
    group_spans: [start, end) spans of the *output* tokens per group (see `query_group_spans`); None or a single
    span cuts the tokens into DEFAULT_CHUNKS equal chunks (for connectors with no groups, like the naive one).
    """
    if strategy not in STRATEGIES:
        raise VidlmmError(f"Unknown zeroing strategy '{strategy}' (use {', '.join(STRATEGIES)}).")
    if not 0.0 <= float(fraction_active) <= 1.0:
        raise VidlmmError(f"The active fraction must be between 0 and 1, got {fraction_active}.")
    n = int(num_tokens)
    mask = np.zeros(n, dtype=bool)
    if group_spans is None or len(group_spans) < 2:  # one group (naive) is no grouping: use equal chunks
        bounds = np.cumsum([0] + [len(c) for c in np.array_split(np.arange(n), min(DEFAULT_CHUNKS, max(n, 1)))])
        group_spans = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    rng = np.random.default_rng(seed)
    if strategy == "random":
        mask[rng.choice(n, _count(fraction_active, n), replace=False)] = True
    elif strategy == "contiguous":
        mask[: _count(fraction_active, n)] = True
    elif strategy == "groups":
        for g in rng.choice(len(group_spans), _count(fraction_active, len(group_spans)), replace=False):
            start, end = group_spans[g]
            mask[start:end] = True
    else:  # even
        for start, end in group_spans:
            size = end - start
            m = _count(fraction_active, size)
            if m:
                mask[start + np.floor((np.arange(m) + 0.5) * size / m).astype(int)] = True
    return mask


def zero_tokens(tokens, mask):
    """tokens [Q, D] with the rows where mask [Q] is False set to zero vectors (they stay in the sequence).

    A mask with every token kept returns the tokens bit for bit."""
    import torch

    keep = torch.as_tensor(np.asarray(mask, dtype=bool), device=tokens.device)
    return torch.where(keep[:, None], tokens, torch.zeros((), dtype=tokens.dtype, device=tokens.device))


def zeroed_output(out, mask):
    """A connector output of one video with its tokens zeroed where mask [Q] is False (see `zero_tokens`) and the
    rest kept: zeroing acts on the visual tokens only, and LLaVA-Mini's fusion_context still fuses the prompt."""
    import torch

    keep = torch.as_tensor(np.asarray(mask, dtype=bool))
    return replace(out, tokens=zero_tokens(out.tokens[0], mask).unsqueeze(0), active=keep)


@dataclass
class ZeroingResult:
    """One connector's zeroing curves.

    kind "likelihood" (`zeroing_curve`): per point log_likelihood of the full model's answer, its difference
    to the full model (delta_log_likelihood), relative_likelihood = exp(delta / answer tokens) (the per-token
    likelihood ratio, 1 = unchanged) and answer_changed (1 if the greedy answer differs). kind "mc"
    (`zeroing_mc_curve`): accuracy, relative_accuracy (to the full model's accuracy) and agreement (share of
    items answered as the full model did). Every point also has strategy, fraction, seed, active (the share
    really kept) and kept_tokens. `reference` describes the full model's run.
    """

    model: str
    fractions: list[float]
    strategies: list[str]
    seeds: list[int]
    points: list[dict]
    kind: str = "likelihood"
    connector_type: str = ""
    num_tokens: int = 0
    reference: dict = field(default_factory=dict)

    METRICS = {"likelihood": ("relative_likelihood", "delta_log_likelihood", "log_likelihood", "answer_changed"),
               "mc": ("relative_accuracy", "accuracy", "agreement")}

    @property
    def metrics(self) -> tuple[str, ...]:
        return self.METRICS[self.kind]

    @property
    def default_metric(self) -> str:
        return self.metrics[0]

    def summary(self) -> list[dict]:
        """Per (strategy, fraction): mean, std (sample, 0 for one seed), min and max over seeds of each metric."""
        out = []
        for strategy in self.strategies:
            for fraction in self.fractions:
                pts = [p for p in self.points if p["strategy"] == strategy and p["fraction"] == fraction]
                if not pts:
                    continue
                row = {"model": self.model, "strategy": strategy, "fraction": fraction, "seeds": len(pts),
                       "active": float(np.mean([p["active"] for p in pts]))}
                for metric in self.metrics:
                    values = np.array([float(p[metric]) for p in pts], dtype=np.float64)
                    values = values[np.isfinite(values)]
                    if values.size == 0:
                        row.update({f"{metric}_{s}": float("nan") for s in ("mean", "std", "min", "max")})
                        continue
                    row[f"{metric}_mean"] = float(values.mean())
                    row[f"{metric}_std"] = float(values.std(ddof=1)) if np.ptp(values) > 0 else 0.0
                    row[f"{metric}_min"], row[f"{metric}_max"] = float(values.min()), float(values.max())
                out.append(row)
        return out

    def rows(self) -> list[dict]:
        """Every point as a flat CSV row (answer texts left out)."""
        return [{"model": self.model, **{k: v for k, v in p.items() if not isinstance(v, (list, dict, str))
                                         or k == "strategy"}} for p in self.points]

    def to_json(self) -> dict:
        return to_jsonable({"model": self.model, "kind": self.kind, "connector_type": self.connector_type,
                            "num_tokens": self.num_tokens, "fractions": self.fractions, "strategies": self.strategies,
                            "seeds": self.seeds, "reference": self.reference, "points": self.points,
                            "summary": self.summary()})

    @classmethod
    def from_json(cls, data: dict) -> "ZeroingResult":
        """Back from `to_json()` (e.g. to overlay saved curves)."""
        return cls(model=data["model"], fractions=list(data["fractions"]), strategies=list(data["strategies"]),
                   seeds=list(data["seeds"]), points=list(data["points"]), kind=data.get("kind", "likelihood"),
                   connector_type=data.get("connector_type", ""), num_tokens=data.get("num_tokens", 0),
                   reference=data.get("reference", {}))


def _plan(num_tokens: int, spans, fractions, strategies, seeds) -> tuple[list[dict], dict[bytes, np.ndarray]]:
    """Every (strategy, fraction, seed) point with its mask, and the distinct masks (deterministic strategies
    and 100 % give the same mask for every seed: each distinct mask is evaluated once)."""
    points, distinct = [], {}
    for strategy in strategies:
        for fraction in fractions:
            for seed in seeds:
                mask = zero_mask(num_tokens, fraction, strategy, seed=seed, group_spans=spans)
                key = mask.tobytes()
                distinct.setdefault(key, mask)
                points.append({"strategy": strategy, "fraction": float(fraction), "seed": int(seed),
                               "active": float(mask.mean()) if num_tokens else 0.0, "kept_tokens": int(mask.sum()),
                               "_key": key})
    return points, distinct


def _check_plan(fractions, strategies, seeds):
    if not fractions or not strategies or not seeds:
        raise VidlmmError("Zeroing needs at least one fraction, one strategy and one seed.")
    for s in strategies:
        if s not in STRATEGIES:
            raise VidlmmError(f"Unknown zeroing strategy '{s}' (use {', '.join(STRATEGIES)}).")
    for f in fractions:
        if not 0.0 <= float(f) <= 1.0:
            raise VidlmmError(f"The active fraction must be between 0 and 1, got {f}.")


def _batches(items: list, size: int):
    for start in range(0, len(items), max(1, size)):
        yield items[start:start + max(1, size)]


def _score_answer(lmm: "VideoLMM", prompt_ids: list[int], answer_ids: list[int], visuals: list):
    """Teacher-forced pass of prompt + answer for each visual-token variant (connector outputs, one batch, equal
    lengths).

    Returns per variant (log-likelihood of the answer tokens, index of the first answer token that is not the
    greedy choice or -1)."""
    import torch

    from .conversation import IGNORE_INDEX

    model = lmm.model
    ids = list(prompt_ids) + list(answer_ids)
    a = len(answer_ids)
    # answer labels keep the answer's raw embeddings out of LLaVA-Mini's pre-fusion, as in generation
    labels = [IGNORE_INDEX] * len(prompt_ids) + list(answer_ids)
    with torch.no_grad(), lmm.exclusive():
        embeds, mask, _ = model.build_inputs([ids] * len(visuals), visuals, [labels] * len(visuals))
        expected = len(ids) - 1 + int(visuals[0].tokens.shape[1])
        if embeds.shape[1] != expected:
            raise VidlmmError("The prompt and answer are longer than the model's context; use fewer frames.")
        logits = model(embeds, mask, logits_to_keep=a + 1).logits[:, -a - 1:-1].float()
    target = torch.as_tensor(answer_ids, device=logits.device)
    logp = torch.log_softmax(logits, dim=-1).gather(-1, target.expand(len(visuals), a)[..., None])[..., 0]
    miss = logits.argmax(-1) != target
    first = torch.where(miss.any(-1), miss.float().argmax(-1), torch.full_like(miss[:, 0], -1, dtype=torch.long))
    return [(float(ll), int(f)) for ll, f in zip(logp.sum(-1).tolist(), first.tolist())]


def _greedy_batch(lmm: "VideoLMM", prompt_ids: list[int], visuals: list, max_new_tokens: int) -> list[list[int]]:
    """Greedy answers (token ids, cut after EOS) of one prompt under several visual-token variants."""
    import torch

    model = lmm.model
    with torch.no_grad(), lmm.exclusive():
        embeds, mask, _ = model.build_inputs([list(prompt_ids)] * len(visuals), visuals)
        out = model.generate(embeds, mask, max_new_tokens=max_new_tokens, do_sample=False).tolist()
    eos = model.config.eos_token_id
    eos = set(eos if isinstance(eos, (list, tuple)) else [eos])
    rows = []
    for row in out:
        cut = next((i for i, t in enumerate(row) if t in eos), None)
        rows.append(row[: cut + 1] if cut is not None else row)
    return rows


def _decode(lmm: "VideoLMM", ids: list[int]) -> str:
    from .conversation import clean_answer

    return clean_answer(lmm.model.tokenizer.decode(ids, skip_special_tokens=True), lmm.template)


def _model_name(lmm: "VideoLMM", name: str | None) -> str:
    if name:
        return name
    source = getattr(lmm.model, "source", None)
    return os.path.basename(str(source).rstrip("/")) if source else lmm.model.connector.registry_name


def zeroing_curve(lmm: "VideoLMM", video, question: str, *, fractions=FRACTIONS, strategies=STRATEGIES,
                  seeds=(0, 1, 2), sampling=None, name: str | None = None, progress: Progress | None = None,
                  max_new_tokens: int = 64, batch_size: int = 8, regenerate: bool = False) -> ZeroingResult:
    """Zero connector output tokens and score the full model's greedy answer under each zeroed model.

    The video is decoded and encoded once and the connector runs once; each distinct mask costs one
    teacher-forced LLM pass (batched). answer_changed is exact for greedy decoding: the answer stays the same
    iff every answer token is still the zeroed model's argmax. With `regenerate` each zeroed model's answer is
    generated as well (and kept as text). The 100 % point is the unmodified model itself.
    """
    from .pipeline import GenerationSettings

    _check_plan(fractions, strategies, seeds)
    prepared = _prepared(lmm, video, sampling)
    out = lmm.visual_tokens(prepared)
    tokens = out.tokens[0]
    spans = query_group_spans(out.query_groups.cpu().numpy())
    full = lmm.ask(prepared, question, generation=GenerationSettings(max_new_tokens=max_new_tokens))
    prompt = lmm.prompt_ids(question)
    answer_ids = list(full.token_ids)
    points, distinct = _plan(tokens.shape[0], spans, fractions, strategies, seeds)
    full_mask = np.ones(tokens.shape[0], dtype=bool)
    full_key = full_mask.tobytes()
    keys = [full_key] + [k for k in distinct if k != full_key]  # the reference first, in the same batches
    scores: dict[bytes, dict] = {}
    total = len(keys)
    for batch in _batches(keys, batch_size):
        visuals = [zeroed_output(out, distinct.get(k, full_mask)) for k in batch]
        for key, (ll, first) in zip(batch, _score_answer(lmm, prompt, answer_ids, visuals)):
            scores[key] = {"log_likelihood": ll, "first_divergence": first}
        if regenerate:
            for key, ids in zip(batch, _greedy_batch(lmm, prompt, visuals, max_new_tokens)):
                scores[key]["answer"] = _decode(lmm, ids)
                scores[key]["regenerated_changed"] = ids != answer_ids
        if progress:
            progress(len(scores), total, f"zeroing: {len(scores)}/{total} masks scored")
    ref = scores[full_key]
    # the 100 % point is the unmodified model: its greedy answer is the reference by definition; the
    # teacher-forced check of it is kept in `reference` as a numerical sanity check
    teacher_forced_ok = ref["first_divergence"] < 0
    ref.update(first_divergence=-1, answer=full.text, regenerated_changed=False)
    n_answer = max(len(answer_ids), 1)
    for p in points:
        s = scores[p.pop("_key")]
        delta = s["log_likelihood"] - ref["log_likelihood"]
        changed = s["regenerated_changed"] if regenerate else s["first_divergence"] >= 0
        p.update(log_likelihood=s["log_likelihood"], delta_log_likelihood=delta,
                 relative_likelihood=math.exp(delta / n_answer), answer_changed=float(changed),
                 first_divergence=s["first_divergence"])
        if regenerate:
            p["answer"] = s["answer"]
    clip = prepared.clip
    reference = {"question": question, "answer": full.text, "answer_token_ids": answer_ids,
                 "log_likelihood": ref["log_likelihood"], "answer_tokens": len(answer_ids),
                 "frames": prepared.num_frames, "frame_indices": clip.indices.tolist(),
                 "timestamps": [round(float(t), 6) for t in clip.timestamps], "video": clip.path,
                 "masks_evaluated": total, "teacher_forced_reproduces_answer": teacher_forced_ok}
    return ZeroingResult(model=_model_name(lmm, name), fractions=[float(f) for f in fractions],
                         strategies=list(strategies), seeds=[int(s) for s in seeds], points=points,
                         kind="likelihood", connector_type=lmm.model.connector.registry_name,
                         num_tokens=int(tokens.shape[0]), reference=reference)


def zeroing_mc_curve(lmm: "VideoLMM", items, *, video_root=None, fractions=FRACTIONS, strategies=STRATEGIES,
                     seeds=(0, 1, 2), name: str | None = None, progress: Progress | None = None,
                     sampling=None, style: str = "mvbench", max_new_tokens: int = 16,
                     batch_size: int = 8) -> ZeroingResult:
    """Multiple-choice accuracy with zeroed tokens, relative to the full model (the paper's Figure 5).

    items: `vidlmm.evaluate` MCItems, or the path of an MC JSON file (read with `load_mc_items`, videos under
    `video_root`). Each video is decoded and encoded once and its connector output reused for every level and
    seed; the full model answers exactly as `evaluate` does, the zeroed ones greedily in batches.
    """
    from .evaluate import build_mc_question, load_mc_items, parse_choice
    from .pipeline import GenerationSettings

    _check_plan(fractions, strategies, seeds)
    if isinstance(items, (str, os.PathLike)):
        items = load_mc_items(items, video_root)
    items = list(items)
    if not items:
        raise VidlmmError("The multiple-choice set holds no questions.")
    by_video: dict[str, list] = {}
    for item in items:
        by_video.setdefault(item.video, []).append(item)
    generation = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False)
    plan_points = None
    correct: dict[tuple, list[bool]] = {}
    agree: dict[tuple, list[bool]] = {}
    active: dict[tuple, list[float]] = {}
    kept: dict[tuple, list[int]] = {}
    full_correct, records, done, num_tokens = [], [], 0, 0
    for video, video_items in by_video.items():
        prepared = lmm.prepare(video, sampling)[0]
        out = lmm.visual_tokens(prepared)
        tokens = out.tokens[0]
        num_tokens = int(tokens.shape[0])
        spans = query_group_spans(out.query_groups.cpu().numpy())
        points, distinct = _plan(num_tokens, spans, fractions, strategies, seeds)
        plan_points = plan_points or [{k: v for k, v in p.items() if k != "_key"} for p in points]
        full_key = np.ones(num_tokens, dtype=bool).tobytes()
        keys = [k for k in distinct if k != full_key]
        for item in video_items:
            question = build_mc_question(item, style)
            full = lmm.ask(prepared, question, generation=generation)
            full_choice = parse_choice(full.text, item.options, item.letters)
            choices = {full_key: full_choice}
            prompt = lmm.prompt_ids(question)
            for batch in _batches(keys, batch_size):
                visuals = [zeroed_output(out, distinct[k]) for k in batch]
                for key, ids in zip(batch, _greedy_batch(lmm, prompt, visuals, max_new_tokens)):
                    choices[key] = parse_choice(_decode(lmm, ids), item.options, item.letters)
            full_correct.append(full_choice == item.answer_letter)
            records.append({"id": item.id, "video": item.video, "answer": item.answer_letter,
                            "full_response": full.text, "full_choice": full_choice})
            for p in points:
                point = (p["strategy"], p["fraction"], p["seed"])
                choice = choices[p["_key"]]
                correct.setdefault(point, []).append(choice == item.answer_letter)
                agree.setdefault(point, []).append(choice == full_choice)
                active.setdefault(point, []).append(p["active"])
                kept.setdefault(point, []).append(p["kept_tokens"])
            done += 1
            if progress:
                progress(done, len(items), f"zeroing: {done}/{len(items)} questions")
        del prepared
    full_acc = float(np.mean(full_correct))
    out_points = []
    for p in plan_points:
        point = (p["strategy"], p["fraction"], p["seed"])
        acc = float(np.mean(correct[point]))
        out_points.append({"strategy": p["strategy"], "fraction": p["fraction"], "seed": p["seed"],
                           "active": float(np.mean(active[point])), "kept_tokens": float(np.mean(kept[point])),
                           "accuracy": acc, "relative_accuracy": acc / full_acc if full_acc > 0 else float("nan"),
                           "agreement": float(np.mean(agree[point])), "n": len(correct[point])})
    reference = {"accuracy": full_acc, "n": len(items), "videos": len(by_video), "style": style,
                 "chance": float(np.mean([1 / len(i.options) for i in items])), "items": records}
    return ZeroingResult(model=_model_name(lmm, name), fractions=[float(f) for f in fractions],
                         strategies=list(strategies), seeds=[int(s) for s in seeds], points=out_points, kind="mc",
                         connector_type=lmm.model.connector.registry_name, num_tokens=num_tokens,
                         reference=reference)


# ---- token budget ---------------------------------------------------------------------------------------------

@dataclass
class BudgetResult:
    """rows: one per (name, frames) with connector, setting, visual_tokens, text_tokens, sequence_length,
    fits_context, prefill_gflops (LLM forward over the prompt: 2 x non-embedding parameters x tokens + causal
    attention 2 x layers x tokens^2 x width, an estimate) and kv_cache_mib (bf16)."""

    rows: list[dict]

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(r["name"] for r in self.rows))

    def series(self, name: str, key: str) -> tuple[np.ndarray, np.ndarray]:
        """(frames, values of `key`) for one name."""
        rows = [r for r in self.rows if r["name"] == name]
        return np.array([r["frames"] for r in rows]), np.array([r[key] for r in rows], dtype=np.float64)

    def to_json(self) -> dict:
        return to_jsonable({"rows": self.rows})


def model_config(value):
    """A TinyLlavaConfig from a config, a config dict, a model, a VideoLMM or a checkpoint folder / hub id."""
    from .config import TinyLlavaConfig

    if isinstance(value, TinyLlavaConfig):
        return value
    if hasattr(value, "model") and hasattr(value.model, "config"):  # a VideoLMM
        return value.model.config
    if hasattr(value, "config") and isinstance(value.config, TinyLlavaConfig):
        return value.config
    if isinstance(value, dict):
        return TinyLlavaConfig.from_dict(value)
    if isinstance(value, (str, os.PathLike)):
        from .checkpoint import resolve_checkpoint

        return TinyLlavaConfig.from_json_file(resolve_checkpoint(value) / "config.json")
    raise VidlmmError(f"Cannot read a model configuration from {type(value).__name__}.")


def _llm_costs(text_config: dict) -> tuple[int, int, int, int]:
    """(non-embedding parameters, layers, width, kv width) of the LLM from its config."""
    h = int(text_config["hidden_size"])
    layers = int(text_config["num_hidden_layers"])
    heads = int(text_config["num_attention_heads"])
    kv_heads = int(text_config.get("num_key_value_heads") or heads)
    head_dim = int(text_config.get("head_dim") or h // heads)
    inter = int(text_config.get("intermediate_size") or 4 * h)
    per_layer = h * heads * head_dim * 2 + 2 * h * kv_heads * head_dim + 3 * h * inter
    return per_layer * layers, layers, heads * head_dim, kv_heads * head_dim


def connector_setting(config) -> str:
    """A short description of a config's connector setting, e.g. 'groupresampler, 512 queries, 16 groups'."""
    from .connectors import connector_class

    return connector_class(config.connector_type).describe_config(config)


def connector_variants(config, related: bool = False) -> dict:
    """The same backbone with each connector family at the config's query budget (for Figure 3 style plots):
    naive Q queries, group Q queries in G groups (16 when unset), image-level Q/16 per frame, MLP.

    related=True adds the per-frame compressors of the related work at the same budget: "llava-mini" with the
    largest square <= Q/16 queries per frame, and "pool", "tome", "topk" with a budget of Q tokens per video
    (tokens per frame = min(Q // frames, P), pool floored to a square)."""
    q, g = int(config.num_queries), int(config.group or 16)
    variants = {"naive": replace(config, connector_type="naiveresampler", group=None),
                "group": replace(config, connector_type="groupresampler", group=g),
                "image-level": replace(config, connector_type="resampler", num_queries=max(1, q // 16), group=None),
                "mlp": replace(config, connector_type="mlp2x_gelu", group=None)}
    if related:
        budget_keys = ("frame_tokens", "token_budget", "max_frame_tokens")
        extra = {k: v for k, v in config.extra.items() if k not in budget_keys}
        variants["llava-mini"] = replace(config, connector_type="llava_mini", group=None,
                                         num_queries=math.isqrt(max(1, q // 16)) ** 2)
        for name in ("pool", "tome", "topk"):
            variants[name] = replace(config, connector_type=name, group=None, extra={**extra, "token_budget": q})
    return variants


def token_budget(models: dict, frames=(1, 2, 4, 8, 16, 32, 64), text_tokens: int = 64) -> BudgetResult:
    """Visual tokens reaching the LLM and its prefill cost vs frames, per named model or config.

    models: {name: TinyLlavaConfig | config dict | model | VideoLMM | checkpoint folder}. Nothing is loaded or
    allocated: the tower and connector are built on the meta device only to ask them their token counts.
    """
    import torch

    from .connectors import connector_kwargs_from_config, create_connector
    from .vision import VisionTower, tower_type_for

    if not models:
        raise VidlmmError("Give at least one model for the token budget.")
    if any(int(f) < 1 for f in frames):
        raise VidlmmError("Frame counts must be at least 1.")
    rows = []
    for name, value in models.items():
        config = model_config(value)
        try:
            with torch.device("meta"):
                tower = VisionTower(config.vision_config,
                                    tower_type=tower_type_for(config.vision_config, config.vision_model_name_or_path),
                                    select_strategy=config.vision_feature_select_strategy)
                connector = create_connector(config.connector_type, **connector_kwargs_from_config(config))
        except ValueError as err:
            raise VidlmmError(f"Cannot read the connector of '{name}': {err}") from None
        params, layers, width, kv_width = _llm_costs(config.text_config)
        vocab = int(config.text_config.get("vocab_size", 0))
        for t in frames:
            visual = int(connector.num_output_tokens(int(t), tower.tokens_per_frame))
            length = visual + int(text_tokens)
            flops = 2 * params * length + 2 * layers * length**2 * width + 2 * width * vocab
            rows.append({"name": str(name), "connector": connector.registry_name, "setting": connector_setting(config),
                         "frames": int(t), "tokens_per_frame": int(tower.tokens_per_frame), "visual_tokens": visual,
                         "text_tokens": int(text_tokens), "sequence_length": length,
                         "context": int(config.tokenizer_model_max_length),
                         "fits_context": length <= int(config.tokenizer_model_max_length),
                         "prefill_gflops": flops / 1e9, "kv_cache_mib": 2 * layers * length * kv_width * 2 / 2**20})
    return BudgetResult(rows)


__all__ = [
    "AttentionMaps", "BudgetResult", "DEFAULT_CHUNKS", "FRACTIONS", "STRATEGIES", "ZeroingResult",
    "attention_maps", "connector_picture", "connector_setting", "connector_variants", "model_config",
    "query_group_spans", "redundancy_stats", "to_jsonable", "token_budget", "token_redundancy", "zero_mask",
    "zero_tokens", "zeroed_output", "zeroing_curve", "zeroing_mc_curve",
]
