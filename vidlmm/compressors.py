"""Per-frame token compressors from the related work, registered as connectors beside the resamplers.

================ ================================================= ===========================================
name             what each frame becomes                            picture (``CompressorOutput.picture``)
================ ================================================= ===========================================
llava_mini       C x C learnable queries, one cross-attention layer per-query attention over the patch grid
                 (LLaVA-Mini), then optional modality pre-fusion
pool             adaptive average pooling of the patch grid to      the pooling grid (bin edges, cell -> token)
                 k x k (Dynamic-VLM's released compressor)
tome             ToMe bipartite soft matching down to M tokens,     source map (patch -> merged token), sizes
                 size-weighted (a reimplementation: Dynamic-VLM
                 never released its merging code)
topk             the K highest-scoring patches of a trainable       kept-token mask, scorer logits
                 scorer (Gumbel top-k + straight-through in
                 training; a reimplementation, never released)
================ ================================================= ===========================================

All four work in the vision tower's feature space (Dv) and then map the kept tokens to the LLM with a
`projector` (Linear -> GELU -> Linear, the `mlp2x_gelu` of LLaVA). Output tokens are frame-major: frame t's
tokens are [t * k, (t + 1) * k). State-dict keys sit under `connector.` (published: `connector._connector.`) like every connector.

Config keys (config.json; `TinyLlavaConfig` keeps them in `extra`; `connectors.connector_kwargs_from_config`
passes each class's `config_keys`):

- llava_mini: ``num_queries`` = C * C queries per frame (a perfect square; LLaVA-Mini's released model uses 1),
  ``prefusion_layers`` (0-4 decoder layers built from the LLM's own config; default 4 as in LLaVA-Mini; 0 turns
  pre-fusion off), ``compressor_heads`` (default 8).
- pool / tome / topk share one budget rule (Dynamic-VLM's): output tokens per frame
  k = min(``token_budget`` // frames, ``max_frame_tokens``), at least 1 and at most the frame's input tokens;
  ``frame_tokens`` fixes k instead; ``min_frame_tokens`` turns on Dynamic-VLM's training-time random k (drawn
  in [min_frame_tokens, max_frame_tokens] per batch, then capped by the budget). pool floors k to a square (k = s * s). Defaults: token_budget 512 (the
  published TinyLLaVA-Video's visual tokens), max_frame_tokens = every input token. topk also reads
  ``topk_temperature`` (Gumbel temperature, default 1.0; anneal it by setting the module's `temperature`).

The patch grid behind P tokens per frame is inferred from P (see `patch_grid`): P = s*s - 1 is SigLIP with the
`patch` strategy (cell 0 dropped), P = s*s + e has e leading non-patch tokens (a class token, registers).
"""

from __future__ import annotations

import importlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .connectors import BudgetControls, ConnectorModule, ConnectorOutput, LayerAttention, register_connector

DEFAULT_TOKEN_BUDGET = 512


@dataclass
class CompressorOutput(ConnectorOutput):
    """ConnectorOutput plus what the compressors know that resamplers do not.

    picture: tensors for the attention tab, per connector (the keys are listed in each class's docstring), all
    over flat per-frame token indices; `analysis.connector_picture` maps them onto the patch grid.
    fusion_context: [B, T, S, D] the pre-fusion input of LLaVA-Mini's visual prefix (S = P + C*C), or None.
    Hand the whole output (batch 1) to `TinyLlavaVideo.build_inputs` to fuse the prompt's text with it.
    """

    picture: dict | None = None
    fusion_context: torch.Tensor | None = None


# ---- shared pieces -------------------------------------------------------------------------------------------

def patch_grid(tokens_per_frame: int) -> tuple[int, int]:
    """(side, first_cell) of the square patch grid behind P tokens per frame; token i sits in cell
    i + first_cell (a negative cell: not a patch). P = s*s - 1 -> (s, 1); otherwise P = s*s + e -> (s, -e)."""
    p = int(tokens_per_frame)
    side = math.isqrt(p + 1)
    if side > 1 and side * side == p + 1:
        return side, 1
    side = math.isqrt(p)
    return side, side * side - p


def frame_token_count(num_frames: int, tokens_per_frame: int, *, frame_tokens: int | None = None,
                      token_budget: int = DEFAULT_TOKEN_BUDGET, max_frame_tokens: int | None = None,
                      square: bool = False) -> int:
    """Output tokens per frame under Dynamic-VLM's rule: min(budget // frames, max), clamped to [1, P], and
    floored to a square when `square`. `frame_tokens` replaces the budget rule with a fixed count."""
    cap = int(tokens_per_frame) if max_frame_tokens is None else min(int(max_frame_tokens), int(tokens_per_frame))
    k = int(frame_tokens) if frame_tokens is not None else int(token_budget) // max(int(num_frames), 1)
    k = max(1, min(k, cap))
    return math.isqrt(k) ** 2 if square else k


def projector(vision_hidden_size: int, hidden_size: int) -> nn.Sequential:
    """LLaVA's mlp2x_gelu: Linear(Dv, D) -> GELU -> Linear(D, D)."""
    return nn.Sequential(nn.Linear(vision_hidden_size, hidden_size), nn.GELU(), nn.Linear(hidden_size, hidden_size))


def _frame_spans(t: int, p: int) -> list[tuple[int, int]]:
    return [(f * p, (f + 1) * p) for f in range(t)]


def _grid(layout, values: torch.Tensor, fill):
    """Per-token values [T, P] -> numpy [T, rows, cols] over each frame's patch grid (`fill`: cells without one)."""
    return layout.to_grid(values.detach().cpu().reshape(-1), fill).numpy()


class _BudgetCompressor(ConnectorModule):
    """A per-frame compressor with the shared budget rule and a projector to the LLM."""

    config_keys = ("frame_tokens", "token_budget", "max_frame_tokens", "min_frame_tokens", "train_token_budget")
    family = "compressor"
    square = False

    def __init__(self, *, vision_hidden_size: int, hidden_size: int, frame_tokens: int | None = None,
                 token_budget: int = DEFAULT_TOKEN_BUDGET, max_frame_tokens: int | None = None,
                 min_frame_tokens: int | None = None, train_token_budget: int | None = None, **_):
        super().__init__()
        for name, value in (("frame_tokens", frame_tokens), ("token_budget", token_budget),
                            ("max_frame_tokens", max_frame_tokens), ("min_frame_tokens", min_frame_tokens),
                            ("train_token_budget", train_token_budget)):
            if value is not None and int(value) < 1:
                raise ValueError(f"{name} must be at least 1, got {value}.")
        self.frame_tokens = frame_tokens
        self.token_budget = int(token_budget)
        self.max_frame_tokens = max_frame_tokens
        self.min_frame_tokens = min_frame_tokens
        self.train_token_budget = None if train_token_budget is None else int(train_token_budget)
        self.projector = projector(vision_hidden_size, hidden_size)

    @classmethod
    def describe_config(cls, config) -> str:
        extra = config.extra
        if extra.get("frame_tokens") is not None:
            return f"{cls.registry_name}, {extra['frame_tokens']} tokens per frame"
        cap, budget = extra.get("max_frame_tokens"), extra.get("token_budget")
        return (f"{cls.registry_name}, budget {DEFAULT_TOKEN_BUDGET if budget is None else budget} tokens"
                + (f", at most {cap} per frame" if cap else ""))

    def budget_controls(self) -> BudgetControls:
        return BudgetControls(frame_tokens=str(self.frame_tokens or f"{self.token_budget} // frames"))

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(x)

    def settings(self) -> dict:
        """The constructor arguments that rebuild this module."""
        return dict(vision_hidden_size=self.projector[0].in_features, hidden_size=self.projector[2].out_features,
                    frame_tokens=self.frame_tokens, token_budget=self.token_budget,
                    max_frame_tokens=self.max_frame_tokens, min_frame_tokens=self.min_frame_tokens,
                    train_token_budget=self.train_token_budget)

    def _budget_settings(self, *, groups, queries, frame_tokens, num_visual):
        if frame_tokens < 1:
            raise ValueError("Tokens per frame must be at least 1 (0: the checkpoint's).")
        return {**self.settings(), "frame_tokens": frame_tokens}, {}

    def budget(self) -> int:
        """The video's token budget for this forward pass: `train_token_budget` in training when it is set (the
        range of token counts Dynamic-VLM trains over may reach above the budget the model is served at),
        else `token_budget`."""
        return self.train_token_budget if (self.training and self.train_token_budget) else self.token_budget

    def tokens_out_per_frame(self, num_frames: int, tokens_per_frame: int) -> int:
        """k at inference (in training: the most k a step can draw)."""
        return frame_token_count(num_frames, tokens_per_frame, frame_tokens=self.frame_tokens,
                                 token_budget=self.budget(), max_frame_tokens=self.max_frame_tokens,
                                 square=self.square)

    def _step_tokens_per_frame(self, num_frames: int, tokens_per_frame: int) -> int:
        """k for this forward pass. In training with `min_frame_tokens` set, Dynamic-VLM's random count: k drawn
        uniformly from [min_frame_tokens, max_frame_tokens (or P)] and then capped by budget // frames, so
        the model learns to read frames at every density it may get at inference. Drawn once per batch (the
        original draws per video; our batches are one tensor)."""
        if not (self.training and self.min_frame_tokens and self.frame_tokens is None):
            return self.tokens_out_per_frame(num_frames, tokens_per_frame)
        cap = tokens_per_frame if self.max_frame_tokens is None else min(self.max_frame_tokens, tokens_per_frame)
        low = min(int(self.min_frame_tokens), cap)
        drawn = int(torch.randint(low, cap + 1, ()).item())
        return frame_token_count(num_frames, tokens_per_frame, token_budget=self.budget(),
                                 max_frame_tokens=drawn, square=self.square)

    def num_output_tokens(self, num_frames: int, tokens_per_frame: int) -> int:
        return num_frames * self.tokens_out_per_frame(num_frames, tokens_per_frame)

    def _output(self, kept, b, t, p, k, picture) -> CompressorOutput:
        """kept [B*T, k, Dv] -> projected tokens [B, T*k, D] with frame groups and spans."""
        tokens = self.projector(kept).reshape(b, t * k, -1)
        groups = torch.arange(t).repeat_interleave(k)
        return CompressorOutput(tokens, groups, _frame_spans(t, p), None, picture=picture)


# ---- Dynamic-VLM pooling ---------------------------------------------------------------------------------------

def pooling_edges(size: int, out: int) -> list[tuple[int, int]]:
    """[start, end) of each of `out` adaptive-average-pooling bins over `size` cells (bins may overlap by one)."""
    return [((i * size) // out, -((-(i + 1) * size) // out)) for i in range(out)]


@register_connector("pool")
class PoolCompressor(_BudgetCompressor):
    """Dynamic-VLM's dynamic spatial pooling: each frame's patch grid (side x side) is adaptive-average-pooled to
    s x s with s * s = the budget rule's k floored to a square. Cells without a patch (SigLIP's dropped cell 0,
    class tokens) are left out of the averages. No parameters besides the projector.

    picture: `pool_size` (s), `row_edges` / `col_edges` [s, 2] bin bounds in grid cells, `cell_token` [P]:
    the (first) output token of the frame whose bin holds each input token (-1 for non-patch tokens).
    """

    label = "Dynamic-VLM pooling"
    picture_kind = "pooling_grid"
    square = True

    def picture_grids(self, picture, layout, tokens_per_frame_out):
        t = layout.num_frames
        return {"pool_size": int(picture["pool_size"]), "row_edges": picture["row_edges"].numpy(),
                "col_edges": picture["col_edges"].numpy(),
                "cell_token": _grid(layout, picture["cell_token"].expand(t, -1), -1)}

    def token_sources(self, out, layout) -> torch.Tensor:
        """Each output token is the mean of the patches in its bin (bins may overlap by one cell)."""
        t, p = layout.num_frames, layout.tokens_per_frame
        side, first = patch_grid(p)
        edges = out.picture["row_edges"].tolist()
        per_frame = torch.zeros(len(edges) ** 2, p)
        cell = torch.arange(p) + first
        row, col = cell.clamp(min=0) // side, cell.clamp(min=0) % side
        for i, (r0, r1) in enumerate(edges):
            for j, (c0, c1) in enumerate(out.picture["col_edges"].tolist()):
                inside = (cell >= 0) & (row >= r0) & (row < r1) & (col >= c0) & (col < c1)
                per_frame[i * len(edges) + j] = inside.float() / inside.sum().clamp_min(1)
        return torch.block_diag(*[per_frame] * t)

    def pool(self, x: torch.Tensor, out: int) -> torch.Tensor:
        """x [F, P, Dv] -> [F, out * out, Dv] (raster order) averages of the patch cells of each bin."""
        f, p, d = x.shape
        side, first = patch_grid(p)
        cells = torch.arange(p, device=x.device) + first
        inside = cells >= 0
        grid = x.new_zeros(f, side * side, d)
        grid[:, cells[inside]] = x[:, inside]
        valid = x.new_zeros(side * side)
        valid[cells[inside]] = 1.0
        pooled = F.adaptive_avg_pool2d(grid.transpose(1, 2).reshape(f, d, side, side), out)
        share = F.adaptive_avg_pool2d(valid.reshape(1, 1, side, side), out)  # fraction of each bin that has patches
        pooled = pooled / share.clamp_min(torch.finfo(share.dtype).tiny)
        return pooled.reshape(f, d, out * out).transpose(1, 2)

    def forward(self, x, output_attentions: bool = False) -> CompressorOutput:
        b, t, p, d = x.shape
        k = self._step_tokens_per_frame(t, p)
        out = math.isqrt(k)
        kept = self.pool(x.reshape(b * t, p, d), out)
        side, first = patch_grid(p)
        edges = pooling_edges(side, out)
        bin_of = torch.tensor([next(j for j, (s, e) in enumerate(edges) if s <= i < e) for i in range(side)])
        cells = torch.arange(p) + first
        inside = cells >= 0
        cell_token = torch.where(inside, bin_of[cells.clamp(min=0) // side] * out + bin_of[cells.clamp(min=0) % side],
                                 -1)
        picture = {"pool_size": out, "row_edges": torch.tensor(edges), "col_edges": torch.tensor(edges),
                   "cell_token": cell_token}
        return self._output(kept, b, t, p, k, picture)


# ---- ToMe merging ----------------------------------------------------------------------------------------------

def bipartite_merge(x: torch.Tensor, size: torch.Tensor, source: torch.Tensor, r: int):
    """One ToMe bipartite soft-matching step removing r tokens (r <= N // 2), size-weighted.

    x [F, N, D] tokens, size [F, N] how many original patches each token stands for, source [F, N0] the current
    token each original patch belongs to. Tokens at even positions (set A) are matched to their most similar
    (cosine) token at odd positions (set B); the r best-matched A tokens are averaged into their B partners,
    weighted by size. Returns (x [F, N - r, D], size, source) ordered [unmerged A; B].
    """
    f, n, d = x.shape
    with torch.no_grad():
        metric = F.normalize(x.float(), dim=-1)
        scores = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # [F, Na, Nb]
        best, partner = scores.max(dim=-1)
        order = best.argsort(dim=-1, descending=True)
        merged_a, kept_a = order[:, :r], order[:, r:]
        target = partner.gather(1, merged_a)  # B index each merged A token joins
    na, nb = scores.shape[1], scores.shape[2]
    weighted = x * size[..., None]
    xa, xb = weighted[:, ::2], weighted[:, 1::2]
    sa, sb = size[:, ::2], size[:, 1::2]
    xb = xb.scatter_add(1, target[..., None].expand(-1, -1, d), xa.gather(1, merged_a[..., None].expand(-1, -1, d)))
    sb = sb.scatter_add(1, target, sa.gather(1, merged_a))
    new_size = torch.cat([sa.gather(1, kept_a), sb], dim=1)
    new_x = torch.cat([xa.gather(1, kept_a[..., None].expand(-1, -1, d)), xb], dim=1) / new_size[..., None]
    # where each current token goes: kept A -> its rank, merged A -> its partner, B -> after the kept A
    where = torch.empty(f, n, dtype=torch.long, device=x.device)
    a_new = torch.empty(f, na, dtype=torch.long, device=x.device)
    a_new.scatter_(1, kept_a, torch.arange(na - r, device=x.device).expand(f, -1))
    a_new.scatter_(1, merged_a, na - r + target)
    where[:, ::2] = a_new
    where[:, 1::2] = na - r + torch.arange(nb, device=x.device)
    return new_x, new_size, where.gather(1, source)


def merge_to(x: torch.Tensor, m: int):
    """Repeated bipartite steps (r = min(N - m, N // 2)) until m tokens per frame remain, then the tokens are
    put in raster order of their first original patch. x [F, N, D] -> (x [F, m, D], size [F, m] patches per
    token, source [F, N] output token of each original patch). m >= N returns x unchanged."""
    f, n, _ = x.shape
    dtype, x = x.dtype, x.to(torch.promote_types(x.dtype, torch.float32))  # sizes: not exact in bfloat16
    size = x.new_ones(f, n)
    source = torch.arange(n, device=x.device).expand(f, -1)
    while x.shape[1] > m:
        cur = x.shape[1]
        x, size, source = bipartite_merge(x, size, source, min(cur - m, cur // 2))
    first = torch.full((f, x.shape[1]), n, dtype=torch.long, device=x.device)
    first = first.scatter_reduce(1, source, torch.arange(n, device=x.device).expand(f, -1), reduce="amin")
    order = first.argsort(dim=-1)
    rank = order.argsort(dim=-1)
    x = x.gather(1, order[..., None].expand(-1, -1, x.shape[2]))
    return x.to(dtype), size.gather(1, order), rank.gather(1, source)


@register_connector("tome")
class ToMeCompressor(_BudgetCompressor):
    """ToMe bipartite soft matching applied once per frame after the tower, down to M = the budget rule's k
    tokens per frame (Dynamic-VLM's merging variant). The similarity is the cosine of the features themselves
    (ToMe inside a ViT uses the attention keys). Merges are size-weighted means, so a merged token is the mean
    of the patches it covers; tokens come out in raster order of their first patch. Proportional attention is
    not applied: the LLM sees the merged tokens as ordinary tokens.

    A reimplementation from the ToMe paper and code (facebookresearch/ToMe); Dynamic-VLM never released its
    version. picture: `source` [T, P] the frame's output token each input token was merged into, `size`
    [T, M] input tokens per output token.
    """

    label = "ToMe merging (reimplementation)"
    picture_kind = "source_map"

    def picture_grids(self, picture, layout, tokens_per_frame_out):
        return {"source": _grid(layout, picture["source"], -1),
                "size": picture["size"].detach().cpu().round().long().numpy()}

    def token_sources(self, out, layout) -> torch.Tensor:
        """Each output token is the mean of the patches merged into it."""
        source = out.picture["source"].cpu()  # [T, P] the frame's output token of each patch
        t, p = source.shape
        k = int(out.tokens.shape[1]) // t
        sources = torch.zeros(t * k, t * p)
        for f in range(t):
            onehot = torch.nn.functional.one_hot(source[f], k).T.float()  # [k, P]
            sources[f * k:(f + 1) * k, f * p:(f + 1) * p] = onehot / onehot.sum(-1, keepdim=True).clamp_min(1)
        return sources

    def forward(self, x, output_attentions: bool = False) -> CompressorOutput:
        b, t, p, d = x.shape
        k = self._step_tokens_per_frame(t, p)
        kept, size, source = merge_to(x.reshape(b * t, p, d), k)
        picture = {"source": source.reshape(b, t, p)[0], "size": size.reshape(b, t, k)[0]}
        return self._output(kept, b, t, p, k, picture)


# ---- top-k pruning ---------------------------------------------------------------------------------------------

@register_connector("topk")
class TopKCompressor(_BudgetCompressor):
    """Keep the K = budget rule's k highest-scoring tokens of each frame, in raster order.

    A scorer (LayerNorm -> Linear(Dv, Dv/4) -> GELU -> Linear(Dv/4, 1)) gives each token a logit. In training, K
    tokens are drawn by Gumbel top-k on (logits + Gumbel noise) / temperature, and the kept features are scaled
    by a straight-through mask (1 in the forward pass, the gradient of a softmax over the perturbed logits in
    the backward pass), so the scorer learns from the LLM loss. At inference the top K logits are kept.

    A reconstruction of Dynamic-VLM's pruning variant from its description (never released). picture: `kept`
    [T, P] bool, `scores` [T, P] scorer logits, `kept_indices` [T, K] in raster order.
    """

    config_keys = _BudgetCompressor.config_keys + ("topk_temperature",)
    label = "top-k pruning"
    picture_kind = "kept_mask"

    def __init__(self, *, vision_hidden_size: int, hidden_size: int, topk_temperature: float = 1.0, **kwargs):
        budget = {k: kwargs[k] for k in _BudgetCompressor.config_keys if k in kwargs}
        super().__init__(vision_hidden_size=vision_hidden_size, hidden_size=hidden_size, **budget)
        if float(topk_temperature) <= 0:
            raise ValueError(f"topk_temperature must be positive, got {topk_temperature}.")
        self.temperature = float(topk_temperature)
        inner = max(1, vision_hidden_size // 4)
        self.scorer = nn.Sequential(nn.LayerNorm(vision_hidden_size), nn.Linear(vision_hidden_size, inner), nn.GELU(),
                                    nn.Linear(inner, 1))

    def settings(self) -> dict:
        return {**super().settings(), "topk_temperature": self.temperature}

    def picture_grids(self, picture, layout, tokens_per_frame_out):
        return {"kept": _grid(layout, picture["kept"], False), "scores": _grid(layout, picture["scores"].float(),
                                                                              float("nan")),
                "kept_indices": picture["kept_indices"].cpu().numpy()}

    def token_sources(self, out, layout) -> torch.Tensor:
        """Each output token is one kept patch."""
        kept = out.picture["kept_indices"].cpu()  # [T, K] within each frame
        t, k = kept.shape
        p = layout.tokens_per_frame
        sources = torch.zeros(t * k, t * p)
        sources[torch.arange(t * k), (kept + torch.arange(t)[:, None] * p).flatten()] = 1.0
        return sources

    def select(self, x: torch.Tensor, k: int):
        """x [F, P, Dv] -> (kept [F, k, Dv], indices [F, k] sorted, logits [F, P])."""
        logits = self.scorer(x).squeeze(-1)
        mask = None
        if self.training:
            u = torch.rand_like(logits, dtype=torch.float32).clamp_(1e-10, 1.0 - 1e-7)
            perturbed = (logits.float() - torch.log(-torch.log(u))) / self.temperature
            index = perturbed.topk(k, dim=-1).indices
            soft = perturbed.softmax(dim=-1)
            hard = torch.zeros_like(soft).scatter_(1, index, 1.0)
            mask = hard - soft.detach() + soft  # straight-through: forward 1 / 0, backward d softmax
        else:
            index = logits.topk(k, dim=-1).indices
        index = index.sort(dim=-1).values  # raster order
        kept = x.gather(1, index[..., None].expand(-1, -1, x.shape[2]))
        if mask is not None:
            kept = kept * mask.gather(1, index)[..., None].to(kept.dtype)
        return kept, index, logits

    def forward(self, x, output_attentions: bool = False) -> CompressorOutput:
        b, t, p, d = x.shape
        k = self._step_tokens_per_frame(t, p)
        kept, index, logits = self.select(x.reshape(b * t, p, d), k)
        first = index.reshape(b, t, k)[0]
        mask = torch.zeros(t, p, dtype=torch.bool, device=x.device).scatter_(1, first, True)
        picture = {"kept": mask, "scores": logits.reshape(b, t, p)[0].detach(), "kept_indices": first}
        return self._output(kept, b, t, p, k, picture)


# ---- LLaVA-Mini --------------------------------------------------------------------------------------------------

def sincos_2d(rows: torch.Tensor, cols: torch.Tensor, dim: int) -> torch.Tensor:
    """MAE-style 2D sin-cos encoding [n, dim] of (possibly fractional) grid positions: the first half of the
    channels encodes the row, the second the column, each as [sin, cos] at frequencies 1 / 10000^(i / (dim/4)).
    Channels beyond a multiple of 4 are zero."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=rows.device) / max(quarter, 1))

    def encode(pos):
        angle = pos.float()[:, None] * omega[None]
        return torch.cat([angle.sin(), angle.cos()], dim=-1)

    out = torch.cat([encode(rows), encode(cols)], dim=-1)
    return F.pad(out, (0, dim - out.shape[1]))


def _decoder_classes(model_type: str):
    """The LLM's own decoder-layer and rotary-embedding classes (e.g. Qwen2DecoderLayer, Qwen2RotaryEmbedding)."""
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    names = dir(module)
    layer = [n for n in names if n.endswith("DecoderLayer") and not n.startswith("_")]
    rotary = [n for n in names if n.endswith("RotaryEmbedding") and not n.startswith("_")]
    if len(layer) != 1 or len(rotary) < 1:
        raise ValueError(f"Cannot build pre-fusion layers for LLM type '{model_type}'.")
    rotary.sort(key=len)  # the plain one, not a scaled variant
    return getattr(module, layer[0]), getattr(module, rotary[0])


@register_connector("llava_mini")
class LlavaMiniCompressor(ConnectorModule):
    """LLaVA-Mini (arXiv 2501.03895): query-based compression of each frame, then modality pre-fusion.

    Compression (in the tower's space Dv): C x C learnable `query` [C*C, Dv]; one cross-attention layer
    (`attn`, nn.MultiheadAttention) with queries LN(query) + PE_q, keys LN(x) + PE_k, values LN(x); no FFN, no
    output norm. The 2D sin-cos PE is computed at the key grid's own resolution (integer patch positions) and
    at the queries' cell centres in the same patch units. The original instead bicubically interpolates a
    C x C table up to the key grid, which carries no spatial information when C = 1 (every key gets the same
    vector), the setting of the released model. The compressed tokens go through `projector` (mlp2x_gelu).

    Pre-fusion: `prefusion_layers` decoder layers built from the LLM's own config (new weights, not the LLM's),
    run per frame over [projected patches (P); projected compressed tokens (C*C); prompt text (L)] with a causal
    mask. The compressed tokens come out of them as the frame's visual tokens; being before the text, they never
    see it, so the visual tokens do not depend on the prompt. The text positions come out as fusion tokens,
    averaged over frames (`fuse_text`), and replace the prompt's embeddings. With 0 layers this is compression
    alone: tokens = projector(compress(x)) and the text is untouched.

    T frames give T * C * C tokens. attentions: one LayerAttention whose media [B, H, T*C*C, T*P] is each query's
    attention over its own frame (0 elsewhere); there are no latent columns. picture (with output_attentions):
    `attention` [T, C*C, P] head-mean attention of each frame's queries over its tokens.
    """

    config_keys = ("prefusion_layers", "compressor_heads")
    label = "LLaVA-Mini"
    family = "compressor"
    picture_kind = "query_attention"

    @classmethod
    def describe_config(cls, config) -> str:
        layers = config.extra.get("prefusion_layers")
        return (f"{cls.registry_name}, {config.num_queries} queries per frame, "
                f"{4 if layers is None else layers} pre-fusion layers")

    def picture_grids(self, picture, layout, tokens_per_frame_out):
        t, p, k = layout.num_frames, layout.tokens_per_frame, tokens_per_frame_out
        attn = picture["attention"].detach().float().cpu()  # [T, k, P]
        maps = layout.to_grid(attn.transpose(0, 1).reshape(k, t * p))  # [k, T, rows, cols]
        return {"attention": maps.transpose(0, 1).numpy()}

    def __init__(self, *, vision_hidden_size: int, hidden_size: int, num_queries: int = 1, prefusion_layers: int = 4,
                 compressor_heads: int = 8, text_config: dict | None = None, **_):
        super().__init__()
        side = math.isqrt(int(num_queries))
        if side < 1 or side * side != int(num_queries):
            raise ValueError(f"llava_mini needs num_queries = C * C per frame (1, 4, 9, ...), got {num_queries}.")
        if vision_hidden_size % int(compressor_heads):
            raise ValueError(f"compressor_heads ({compressor_heads}) must divide the tower width "
                             f"({vision_hidden_size}).")
        if int(prefusion_layers) < 0:
            raise ValueError(f"prefusion_layers must be 0 or more, got {prefusion_layers}.")
        self.query_side = side
        self.num_queries = side * side
        self.query = nn.Parameter(torch.randn(self.num_queries, vision_hidden_size) * 0.02)
        self.ln_q = nn.LayerNorm(vision_hidden_size)
        self.ln_kv = nn.LayerNorm(vision_hidden_size)
        self.attn = nn.MultiheadAttention(vision_hidden_size, int(compressor_heads), batch_first=True)
        self.projector = projector(vision_hidden_size, hidden_size)
        self.prefusion_layers = nn.ModuleList()
        self.rotary = None
        if int(prefusion_layers) > 0:
            if not text_config or "model_type" not in text_config:
                raise ValueError("Pre-fusion layers need the LLM's config (text_config with a model_type).")
            from .vision import build_transformers_config

            cfg = dict(text_config, num_hidden_layers=int(prefusion_layers))
            cfg.pop("layer_types", None)  # recomputed for the new layer count
            cfg = build_transformers_config("text", cfg)
            cfg._attn_implementation = "sdpa"  # takes the explicit 4D mask the text padding needs
            layer_cls, rotary_cls = _decoder_classes(cfg.model_type)
            self.prefusion_layers = nn.ModuleList([layer_cls(cfg, i) for i in range(int(prefusion_layers))])
            self.rotary = rotary_cls(config=cfg)

    def num_output_tokens(self, num_frames: int, tokens_per_frame: int) -> int:
        return num_frames * self.num_queries

    def position_encodings(self, p: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(PE of the queries [C*C, Dv], PE of the P key tokens [P, Dv]; zero for non-patch tokens)."""
        dim = self.query.shape[1]
        side, first = patch_grid(p)
        cells = torch.arange(p, device=device) + first
        pe_k = sincos_2d(cells.clamp(min=0) // side, cells.clamp(min=0) % side, dim)
        pe_k = pe_k * (cells >= 0)[:, None]
        q = torch.arange(self.num_queries, device=device)
        centre = lambda i: (i.float() + 0.5) * side / self.query_side - 0.5  # noqa: E731  query cell centre
        pe_q = sincos_2d(centre(q // self.query_side), centre(q % self.query_side), dim)
        return pe_q, pe_k

    def compress(self, x: torch.Tensor, need_weights: bool = False):
        """x [F, P, Dv] -> (compressed [F, C*C, Dv], per-head attention [F, H, C*C, P] or None)."""
        f, p, _ = x.shape
        pe_q, pe_k = self.position_encodings(p, x.device)
        kv = self.ln_kv(x)
        q = (self.ln_q(self.query) + pe_q.to(x.dtype)).unsqueeze(0).expand(f, -1, -1)
        out, weights = self.attn(q, kv + pe_k.to(x.dtype), kv, need_weights=need_weights,
                                 average_attn_weights=False)
        return out, weights

    def prefuse(self, hidden: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Run the pre-fusion layers: hidden [F, S, D], valid [F, S] bool (False = padding, never attended to;
        positions count valid tokens only, as LLaVA-Mini's do) -> [F, S, D]."""
        f, s, _ = hidden.shape
        if valid is None:
            valid = torch.ones(f, s, dtype=torch.bool, device=hidden.device)
        position = (valid.long().cumsum(-1) - 1).clamp(min=0)
        allowed = torch.ones(s, s, dtype=torch.bool, device=hidden.device).tril()[None] & valid[:, None, :]
        allowed = allowed | torch.eye(s, dtype=torch.bool, device=hidden.device)[None]  # no empty rows
        mask = torch.zeros(f, 1, s, s, dtype=hidden.dtype, device=hidden.device)
        mask = mask.masked_fill(~allowed[:, None], torch.finfo(hidden.dtype).min)
        rope = self.rotary(hidden, position)
        for layer in self.prefusion_layers:
            hidden = layer(hidden, attention_mask=mask, position_ids=position, position_embeddings=rope)
            if isinstance(hidden, tuple):
                hidden = hidden[0]
        return hidden

    def forward(self, x, output_attentions: bool = False) -> CompressorOutput:
        b, t, p, d = x.shape
        c = self.num_queries
        frames = x.reshape(b * t, p, d)
        compressed, weights = self.compress(frames, need_weights=output_attentions)
        tokens = self.projector(compressed)  # [B*T, C*C, D]
        context = None
        if len(self.prefusion_layers):
            context = torch.cat([self.projector(frames), tokens], dim=1)  # [B*T, P + C*C, D]
            tokens = self.prefuse(context)[:, p:]
            context = context.reshape(b, t, p + c, -1)
        tokens = tokens.reshape(b, t * c, -1)
        groups = torch.arange(t).repeat_interleave(c)
        attentions, picture = None, None
        if weights is not None:
            h = weights.shape[1]
            w = weights.reshape(b, t, h, c, p)
            media = w.new_zeros(b, h, t * c, t * p)
            for f in range(t):  # block diagonal: a copy, not compute
                media[:, :, f * c:(f + 1) * c, f * p:(f + 1) * p] = w[:, f]
            attentions = [LayerAttention(media=media, latents=w.new_zeros(b, h, t * c, 0))]
            picture = {"attention": w[0].mean(dim=1)}
        return CompressorOutput(tokens, groups, _frame_spans(t, p), attentions, picture=picture,
                                fusion_context=context)

    def fuse_text(self, context: torch.Tensor, text: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
        """Fusion tokens for the prompt: context [T, P + C*C, D] (`CompressorOutput.fusion_context[i]`), text
        [L, D] the prompt's embeddings without the video placeholder, valid [L] bool (False: keep the raw
        embedding and hide the token from pre-fusion, e.g. answer tokens in training). Returns [L, D]: each
        frame's pre-fusion output at the text positions, averaged over frames in float32."""
        if not len(self.prefusion_layers) or text.shape[0] == 0:
            return text
        t, s, _ = context.shape
        n = text.shape[0]
        if valid is None:
            valid = torch.ones(n, dtype=torch.bool, device=text.device)
        valid = valid.to(context.device)
        if not bool(valid.any()):
            return text
        seq = torch.cat([context, text.to(context).unsqueeze(0).expand(t, -1, -1)], dim=1)
        mask = torch.cat([torch.ones(t, s, dtype=torch.bool, device=context.device), valid.expand(t, -1)], dim=1)
        fused = self.prefuse(seq, mask)[:, s:].float().mean(dim=0).to(text.dtype).to(text.device)
        return torch.where(valid.to(text.device)[:, None], fused, text)


__all__ = [
    "CompressorOutput", "LlavaMiniCompressor", "PoolCompressor", "ToMeCompressor", "TopKCompressor",
    "bipartite_merge", "frame_token_count", "merge_to", "patch_grid", "pooling_edges", "sincos_2d",
]
