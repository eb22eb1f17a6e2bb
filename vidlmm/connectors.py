"""Connectors: visual features [B, T, P, Dv] -> visual tokens [B, Q, D] for the language model.

Every resampler here shares one Perceiver implementation (`PerceiverResampler`); they differ only in how
they split the visual tokens into groups and where the sinusoidal position encoding goes:

============== =================================== ====================== ==========================
name            groups (what one query set sees)    queries                position encoding
============== =================================== ====================== ==========================
naiveresampler  one group: all T*P tokens           num_queries            added to the input tokens
groupresampler  `group` contiguous chunks of T*P    num_queries // group   added to the output tokens
resampler       one group per frame (image-level)   num_queries per frame  none
mlp2x_gelu      no compression (baseline)           T*P                    none
============== =================================== ====================== ==========================

The per-frame compressors of the related work (`llava_mini`, `pool`, `tome`, `topk`) live in `compressors.py`
and register into the same `CONNECTORS`.

State-dict keys equal the reference's (`latents`, `linear`, `layers.{i}.0.to_q`, ...) below the model's
`connector.` (the published files' `connector._connector.`, renamed at load and save by `checkpoint.py`).

Each forward can also return the query-to-token attention of every layer and head (`output_attentions`)
together with which group each output token belongs to and which span of visual tokens each group saw,
so analysis needs no hooks and no second pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.utils import ModelOutput

CONNECTORS: dict[str, type["ConnectorModule"]] = {}
# Older checkpoints (before the reference renamed the module) call the naive resampler `resamplerwithpe`.
CONNECTOR_ALIASES = {"resamplerwithpe": "naiveresampler"}


def register_connector(name: str):
    def wrap(cls):
        CONNECTORS[name] = cls
        cls.registry_name = name
        return cls

    return wrap


def resolve_connector_name(connector_type: str) -> str:
    """Map a config's `connector_type` to a registry name (case-insensitive; legacy names accepted)."""
    name = connector_type.lower()
    name = CONNECTOR_ALIASES.get(name, name)
    if name not in CONNECTORS:
        known = ", ".join(sorted([*CONNECTORS, *CONNECTOR_ALIASES]))
        raise ValueError(f"Unknown connector type '{connector_type}' (known: {known}).")
    return name


def connector_class(connector_type: str) -> type["ConnectorModule"]:
    """The registered class of a config's `connector_type` (see `resolve_connector_name`)."""
    return CONNECTORS[resolve_connector_name(connector_type)]


def create_connector(connector_type: str, *, vision_hidden_size: int, hidden_size: int, **kwargs) -> "ConnectorModule":
    """Build a connector from its checkpoint name, e.g. ``create_connector("groupresampler", ...)``."""
    cls = connector_class(connector_type)
    return cls(vision_hidden_size=vision_hidden_size, hidden_size=hidden_size, **kwargs)


def sinusoidal_position_encoding(seq_len: int, dim: int, *, dtype=torch.float32, device=None) -> torch.Tensor:
    """The reference's sinusoid [1, seq_len, dim]: sin in even channels, cos in odd ones.

    The reference stores it in a float16 buffer, so the values are rounded through fp16 before the cast to
    `dtype`; we do the same to reproduce its outputs exactly.
    """
    position = torch.arange(seq_len, dtype=torch.float32, device=device).unsqueeze(1)
    div_term = torch.exp(torch.arange(0, dim, 2, dtype=torch.float32, device=device) * -(math.log(10000.0) / dim))
    pe = torch.zeros(seq_len, dim, dtype=torch.float16, device=device)
    pe[:, 0::2] = torch.sin(position * div_term)
    pe[:, 1::2] = torch.cos(position * div_term)
    return pe.unsqueeze(0).to(dtype)


def group_sizes(num_tokens: int, groups: int) -> list[int]:
    """The reference's split of N tokens into `groups` contiguous chunks: the first N mod G are one longer."""
    avg, rem = divmod(num_tokens, groups)
    return [avg + 1] * rem + [avg] * (groups - rem)


@dataclass
class LayerAttention:
    """Attention of one Perceiver layer, softmax over [visual tokens of the query's group; its latents].

    media:   [B, H, Q, N] over all N visual tokens; exactly 0 outside the query's own group.
    latents: [B, H, Q, L] over the L latents that share the query's group (L = queries per group).
    Each row of media and latents together sums to 1.
    """

    media: torch.Tensor
    latents: torch.Tensor


@dataclass
class ConnectorOutput(ModelOutput):
    """tokens: [B, Q, D] visual tokens for the LLM (a transformers `ModelOutput`, so the tensors inside are seen
    by whatever walks a module's outputs: DeepSpeed ZeRO-3's backward hooks, FSDP2, torch.compile).

    query_groups: [Q] group index of each output token (all 0 for the naive resampler, the frame for
    image-level). group_spans: per group, the [start, end) range of flat visual-token indices it attends to.
    attentions: one LayerAttention per layer when asked for, else None. active: bool [Q] when some tokens were
    zeroed under a token budget (True = kept), else None.
    """

    tokens: torch.Tensor = None
    query_groups: torch.Tensor = None
    group_spans: list[tuple[int, int]] = None
    attentions: list[LayerAttention] | None = None
    active: torch.Tensor | None = None

    def num_active(self) -> int:
        """Tokens that carry information: all of them unless some were zeroed (`active`: bool [Q], True = kept)."""
        return int(self.tokens.shape[1]) if self.active is None else int(self.active.sum())


@dataclass(frozen=True)
class BudgetControls:
    """The token-budget settings a connector takes at serving time without retraining (None: not one of its
    settings). groups: its number of groups; queries: its learned queries, counted `queries_unit` ("per group",
    "per frame" or "in total"); frame_tokens: its output tokens per frame as text ("5" or "512 // frames")."""

    groups: int | None = None
    queries: int | None = None
    queries_unit: str | None = None
    frame_tokens: str | None = None


class ConnectorModule(nn.Module):
    """Base for connectors: ``forward(x [B, T, P, Dv], output_attentions=False) -> ConnectorOutput``.

    A connector describes itself, so the rest of the code (analysis, the app, the CLI, `train/`) asks it rather
    than switching on its name:

    - registry_name (set by `register_connector`, the checkpoint's `connector_type`), label (what a user reads),
      short_name (the app's resampler switch; the registry name when empty), family ("resampler", "compressor"
      or "projector"; the switch offers the first two);
    - config_keys: extra config.json keys passed to the constructor when present (`connector_kwargs_from_config`);
      `describe_config(config)`: its setting in a few words;
    - `num_output_tokens` and `output_groups` for a clip before any forward pass;
    - `budget_controls()` and `at_budget(...)`: the settings it can be served at and a module built at them;
    - picture_kind and `picture_grids(...)`: its own picture for connectors without attention maps (None: none).
    """

    registry_name = ""
    label = ""
    short_name = ""
    family = "resampler"
    picture_kind: str | None = None
    config_keys: tuple[str, ...] = ()

    @classmethod
    def switch_name(cls) -> str:
        return cls.short_name or cls.registry_name

    @classmethod
    def describe_config(cls, config) -> str:
        """A config's setting of this connector in a few words, e.g. 'groupresampler, 512 queries, 16 groups'."""
        return f"{cls.registry_name}, {config.num_queries} queries"

    def num_output_tokens(self, num_frames: int, tokens_per_frame: int) -> int:
        raise NotImplementedError

    def output_groups(self, num_frames: int, tokens_per_frame: int) -> torch.Tensor:
        """[Q] group of each output token for a clip (what `ConnectorOutput.query_groups` will be); by default
        the frame, every frame giving the same number of tokens."""
        per_frame = self.num_output_tokens(num_frames, tokens_per_frame) // num_frames
        return torch.arange(num_frames).repeat_interleave(per_frame)

    def budget_controls(self) -> BudgetControls:
        return BudgetControls()

    def at_budget(self, *, groups: int | None = None, queries: int | None = None, frame_tokens: int | None = None,
                  num_visual: int | None = None) -> "ConnectorModule":
        """This connector at another token budget: a module of the same class built with those settings that
        shares this one's weights (nothing is copied and this module is unchanged, so other users of it are not
        affected). None or 0 keeps the checkpoint's setting; `num_visual` (T * P) bounds the groups. Raises
        ValueError with one sentence for a setting this connector cannot take."""
        controls = self.budget_controls()
        for value, have, what in ((groups, controls.groups, "groups to set"),
                                  (queries, controls.queries, "learned queries to choose from"),
                                  (frame_tokens, controls.frame_tokens, "tokens per frame to set")):
            if value and have is None:
                raise ValueError(f"The {self.registry_name} connector has no {what}.")
        if not (groups or queries or frame_tokens):
            return self
        kwargs, replaced = self._budget_settings(groups=groups or None, queries=queries or None,
                                                 frame_tokens=frame_tokens or None, num_visual=num_visual)
        with torch.device("meta"):
            module = type(self)(**kwargs)
        for name, child in self.named_children():
            setattr(module, name, child)
        for name, param in self.named_parameters(recurse=False):
            setattr(module, name, replaced.get(name, param))
        for name, buffer in self.named_buffers(recurse=False):
            setattr(module, name, buffer)
        return module.train(self.training)

    def _budget_settings(self, *, groups, queries, frame_tokens, num_visual) -> tuple[dict, dict]:
        """(constructor arguments at this budget, own parameters to use instead of the shared ones)."""
        raise NotImplementedError

    def patch_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., P, Dv] -> [..., P, D]: each patch as this connector would pass it on to the LLM alone (its
        projection), for a connector whose tokens are the tower's patches pooled, merged or kept."""
        raise ValueError(f"The {self.registry_name} connector does not pass the tower's patches on: its tokens "
                         "have no per-patch form.")

    def picture_grids(self, picture: dict, layout: "TokenLayout", tokens_per_frame_out: int) -> dict:
        """The forward pass's `picture` tensors (batch 1) as numpy arrays over each frame's patch grid (see
        `analysis.connector_picture`); only for connectors with a picture_kind."""
        raise NotImplementedError

    def token_sources(self, out: ConnectorOutput, layout: "TokenLayout") -> torch.Tensor:
        """[Q, N] float32: how much of each output token comes from each flat input token (frame-major patches),
        rows summing to 1, from a forward pass with output_attentions (batch 1).

        By default the attention rollout of the connector's layers (Abnar & Zuidema's, with the residual): the
        learned latents start with nothing of the video, and at each layer a query gets its head-mean attention on
        the visual tokens plus, through the residual and its attention on its group's latents, what those carried
        (R = A_media + (A_latents + I) R_previous, rows normalised). Connectors without attention override it."""
        if not out.attentions:
            raise ValueError(f"The {self.registry_name} connector reports no attention to trace its tokens with.")
        groups = out.query_groups.cpu()
        members = [(groups == g).nonzero().flatten() for g in groups.unique()]  # a group's latents, in order
        sources = None
        for layer in out.attentions:
            media = layer.media[0].float().mean(0).cpu()  # [Q, N]
            latents = layer.latents[0].float().mean(0).cpu()  # [Q, L]
            if sources is None:
                mixed = media
            else:
                mixed = media + sources
                if latents.shape[1]:
                    for idx in members:
                        mixed[idx] += latents[idx] @ sources[idx]
            sources = mixed / mixed.sum(-1, keepdim=True).clamp_min(torch.finfo(mixed.dtype).tiny)
        return sources


class PerceiverAttention(nn.Module):
    """Flamingo cross-attention: queries from the latents, keys/values over [media; latents]."""

    def __init__(self, dim: int, dim_head: int = 64, heads: int = 8):
        super().__init__()
        self.scale = dim_head**-0.5
        self.heads = heads
        inner = dim_head * heads
        self.norm_media = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, inner * 2, bias=False)
        self.to_out = nn.Linear(inner, dim, bias=False)

    def forward(self, x, latents, media_mask=None):
        """x: [B, N, D] media, latents: [B, L, D], media_mask: [B, N] bool (False = padding) or None.

        Returns (out [B, L, D], attn [B, H, L, N + L]).
        """
        x = self.norm_media(x)
        latents = self.norm_latents(latents)
        b, n_lat, h = x.shape[0], latents.shape[1], self.heads
        q = self.to_q(latents)
        k, v = self.to_kv(torch.cat([x, latents], dim=1)).chunk(2, dim=-1)
        q, k, v = (t.reshape(b, t.shape[1], h, -1).transpose(1, 2) for t in (q, k, v))
        sim = (q * self.scale) @ k.transpose(-1, -2)  # [B, H, L, N + L]
        if media_mask is not None:
            keep = torch.cat([media_mask, media_mask.new_ones(b, n_lat)], dim=1)
            sim = sim.masked_fill(~keep[:, None, None, :], float("-inf"))
        sim = sim - sim.amax(dim=-1, keepdim=True).detach()
        attn = sim.softmax(dim=-1)
        out = (attn @ v).transpose(1, 2).reshape(b, n_lat, -1)
        return self.to_out(out), attn


def feed_forward(dim: int, mult: int = 4) -> nn.Sequential:
    inner = int(dim * mult)
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, inner, bias=False), nn.GELU(), nn.Linear(inner, dim, bias=False))


class PerceiverResampler(ConnectorModule):
    """Shared Perceiver: `linear` (Dv -> D), `depth` x [attention, feed-forward], final `norm`.

    Parameters (reference key names): latents [L, D], linear, layers.{i}.{0: attn, 1: ff}, norm.
    """

    def __init__(self, *, vision_hidden_size: int, hidden_size: int, num_latents: int, depth: int = 3,
                 dim_head: int = 64, heads: int = 8, ff_mult: int = 4):
        super().__init__()
        self.hidden_size = hidden_size
        self.latents = nn.Parameter(torch.randn(num_latents, hidden_size))
        self.linear = nn.Linear(vision_hidden_size, hidden_size)
        self.layers = nn.ModuleList(
            [nn.ModuleList([PerceiverAttention(hidden_size, dim_head, heads), feed_forward(hidden_size, ff_mult)])
             for _ in range(depth)]
        )
        self.norm = nn.LayerNorm(hidden_size)

    def _budget_settings(self, *, groups, queries, frame_tokens, num_visual):
        controls = self.budget_controls()
        available = int(self.latents.shape[0])
        if queries and not 1 <= queries <= available:
            raise ValueError(f"Queries must be between 1 and {available} ({controls.queries_unit}) for this model.")
        if groups and (groups < 1 or (num_visual is not None and groups > num_visual)):
            raise ValueError(f"Groups must be between 1 and the number of visual tokens ({num_visual}).")
        kwargs = dict(vision_hidden_size=self.linear.in_features, hidden_size=self.hidden_size,
                      num_resampler_layers=len(self.layers), **self._query_settings(groups, queries))
        latents = nn.Parameter(self.latents[:queries].detach(), requires_grad=False) if queries else self.latents
        return kwargs, {"latents": latents}

    def _query_settings(self, groups: int | None, queries: int | None) -> dict:
        """The constructor's query arguments for `groups` and `queries` (None: this module's)."""
        raise NotImplementedError

    def resample(self, x, media_mask=None, output_attentions=False):
        """x: [B, N, D] (already projected) -> ([B, L, D], list of [B, H, L, N + L] or None)."""
        latents = self.latents.unsqueeze(0).expand(x.shape[0], -1, -1)
        attentions = [] if output_attentions else None
        for attn, ff in self.layers:
            out, weights = attn(x, latents, media_mask)
            latents = out + latents
            latents = ff(latents) + latents
            if output_attentions:
                attentions.append(weights)
        return self.norm(latents), attentions


@register_connector("naiveresampler")
class NaiveResampler(PerceiverResampler):
    """Video-level resampler: num_queries latents attend to every token of every frame.

    The position encoding is added to the T*P input tokens (frame-major flat index).
    """

    label = "naive resampler"
    short_name = "naive"

    def __init__(self, *, vision_hidden_size: int, hidden_size: int, num_queries: int = 512,
                 num_resampler_layers: int = 3, **_):
        super().__init__(vision_hidden_size=vision_hidden_size, hidden_size=hidden_size, num_latents=num_queries,
                         depth=num_resampler_layers)
        self.num_queries = num_queries

    def num_output_tokens(self, num_frames: int, tokens_per_frame: int) -> int:
        return self.num_queries

    def output_groups(self, num_frames: int, tokens_per_frame: int) -> torch.Tensor:
        return torch.zeros(self.num_queries, dtype=torch.long)

    def budget_controls(self) -> BudgetControls:
        return BudgetControls(queries=self.num_queries, queries_unit="in total")

    def _query_settings(self, groups, queries) -> dict:
        return {"num_queries": queries or self.num_queries}

    def forward(self, x, output_attentions: bool = False) -> ConnectorOutput:
        b, t, p, _ = x.shape
        x = self.linear(x.reshape(b, t * p, -1))
        x = x + sinusoidal_position_encoding(t * p, self.hidden_size, dtype=x.dtype, device=x.device)
        tokens, attn = self.resample(x, output_attentions=output_attentions)
        layers = None
        if attn is not None:
            layers = [LayerAttention(media=a[..., : t * p], latents=a[..., t * p:]) for a in attn]
        return ConnectorOutput(tokens, self.output_groups(t, p), [(0, t * p)], layers)


class _ChunkedResampler(PerceiverResampler):
    """Runs the shared latents over several contiguous chunks of the flat token sequence in one batched pass.

    Chunks of unequal length are right-padded to the longest and the padding is masked out of the softmax,
    which is mathematically the reference's per-chunk loop.
    """

    def _chunks(self, num_frames: int, tokens_per_frame: int) -> list[int]:
        raise NotImplementedError

    def run_chunks(self, x, sizes: list[int], output_attentions: bool):
        """x: [B, N, D] -> tokens [B, G*L, D], spans, attentions."""
        b, n, d = x.shape
        g, longest, lat = len(sizes), max(sizes), self.latents.shape[0]
        starts = [sum(sizes[:i]) for i in range(g)]
        spans = [(s, s + size) for s, size in zip(starts, sizes)]
        if all(size == longest for size in sizes):
            chunks, mask = x.reshape(b * g, longest, d), None
        else:
            # index [G, longest] into the flat sequence; padded slots point at token 0 and are masked
            offsets = torch.arange(longest, device=x.device)
            start_t = torch.tensor(starts, device=x.device)
            size_t = torch.tensor(sizes, device=x.device)
            valid = offsets[None, :] < size_t[:, None]
            index = torch.where(valid, start_t[:, None] + offsets[None, :], torch.zeros_like(offsets)[None, :])
            chunks = x[:, index.reshape(-1)].reshape(b * g, longest, d)
            mask = valid.repeat(b, 1)
        if output_attentions or x.device.type != "cpu":
            tokens, attn = self.resample(chunks, media_mask=mask, output_attentions=output_attentions)
        else:
            tokens, attn = self._resample_in_slices(chunks, mask, longest), None
        tokens = tokens.reshape(b, g * lat, d)
        layers = None
        if attn is not None:
            layers = [self._scatter_attention(a, b, n, sizes, starts, longest) for a in attn]
        return tokens, spans, layers

    # On CPU one pass over all groups builds intermediates G times larger than one group's; past a few MB
    # the page faults cost more than the Python loop saves (benchmarks/bench_connectors.py), so the groups go
    # through in slices of about this many bytes of key/value activations.
    cpu_slice_bytes = 16 * 1024**2

    def _resample_in_slices(self, chunks, mask, longest):
        inner = self.layers[0][0].to_kv.out_features
        per_slice = max(1, self.cpu_slice_bytes // (longest * inner * chunks.element_size()))
        outs = []
        for start in range(0, chunks.shape[0], per_slice):
            part_mask = None if mask is None else mask[start:start + per_slice]
            outs.append(self.resample(chunks[start:start + per_slice], media_mask=part_mask)[0])
        return torch.cat(outs)

    def _scatter_attention(self, a, b, n, sizes, starts, longest) -> LayerAttention:
        """[B*G, H, L, longest + L] per-chunk weights -> LayerAttention over the full flat sequence."""
        g, lat = len(sizes), self.latents.shape[0]
        h = a.shape[1]
        a = a.reshape(b, g, h, lat, longest + lat)
        media = a.new_zeros(b, g, h, lat, n)
        for gi, (start, size) in enumerate(zip(starts, sizes)):  # a copy, not compute: cheap
            media[:, gi, :, :, start:start + size] = a[:, gi, :, :, :size]
        media = media.permute(0, 2, 1, 3, 4).reshape(b, h, g * lat, n)
        latents = a[..., longest:].permute(0, 2, 1, 3, 4).reshape(b, h, g * lat, lat)
        return LayerAttention(media=media, latents=latents)


@register_connector("groupresampler")
class GroupResampler(_ChunkedResampler):
    """Video-level group resampler: the flat T*P sequence is cut into `group` contiguous chunks (ignoring frame
    boundaries; the first N mod G chunks one token longer); the same num_queries // group latents summarise
    each chunk; the position encoding is added to the G * L output tokens.
    """

    label = "group resampler"
    short_name = "group"

    def __init__(self, *, vision_hidden_size: int, hidden_size: int, num_queries: int = 512, group: int = 16,
                 num_resampler_layers: int = 3, **_):
        super().__init__(vision_hidden_size=vision_hidden_size, hidden_size=hidden_size,
                         num_latents=int(num_queries / group), depth=num_resampler_layers)
        self.group = group
        self.queries_per_group = int(num_queries / group)

    @classmethod
    def describe_config(cls, config) -> str:
        return f"{cls.registry_name}, {config.num_queries} queries, {config.group} groups"

    def num_output_tokens(self, num_frames: int, tokens_per_frame: int) -> int:
        return self.group * self.queries_per_group

    def output_groups(self, num_frames: int, tokens_per_frame: int) -> torch.Tensor:
        return torch.arange(self.group).repeat_interleave(self.queries_per_group)

    def budget_controls(self) -> BudgetControls:
        return BudgetControls(groups=self.group, queries=self.queries_per_group, queries_unit="per group")

    def _query_settings(self, groups, queries) -> dict:
        groups, queries = groups or self.group, queries or self.queries_per_group
        return {"num_queries": groups * queries, "group": groups}

    def forward(self, x, output_attentions: bool = False) -> ConnectorOutput:
        b, t, p, _ = x.shape
        x = self.linear(x.reshape(b, t * p, -1))
        tokens, spans, layers = self.run_chunks(x, group_sizes(t * p, self.group), output_attentions)
        tokens = tokens + sinusoidal_position_encoding(tokens.shape[1], self.hidden_size, dtype=tokens.dtype,
                                                       device=tokens.device)
        return ConnectorOutput(tokens, self.output_groups(t, p), spans, layers)


@register_connector("resampler")
class ImageResampler(_ChunkedResampler):
    """Image-level resampler: each frame is summarised on its own by `num_queries` shared latents (the
    TinyLLaVA Factory's per-image `resampler`, no position encoding). T frames give T * num_queries tokens.

    Note `num_queries` is per frame here, as in the Factory; the token budget is frames x num_queries.
    """

    label = "image-level resampler"
    short_name = "image"

    def __init__(self, *, vision_hidden_size: int, hidden_size: int, num_queries: int = 32,
                 num_resampler_layers: int = 3, **_):
        super().__init__(vision_hidden_size=vision_hidden_size, hidden_size=hidden_size, num_latents=num_queries,
                         depth=num_resampler_layers)
        self.num_queries = num_queries

    @classmethod
    def describe_config(cls, config) -> str:
        return f"{cls.registry_name}, {config.num_queries} queries per frame"

    def num_output_tokens(self, num_frames: int, tokens_per_frame: int) -> int:
        return num_frames * self.num_queries

    def budget_controls(self) -> BudgetControls:
        return BudgetControls(queries=self.num_queries, queries_unit="per frame")

    def _query_settings(self, groups, queries) -> dict:
        return {"num_queries": queries or self.num_queries}

    def forward(self, x, output_attentions: bool = False) -> ConnectorOutput:
        b, t, p, _ = x.shape
        x = self.linear(x.reshape(b, t * p, -1))
        tokens, spans, layers = self.run_chunks(x, [p] * t, output_attentions)
        return ConnectorOutput(tokens, self.output_groups(t, p), spans, layers)


@register_connector("mlp2x_gelu")
class MLPConnector(ConnectorModule):
    """Baseline with no compression: Linear -> GELU -> Linear on every visual token (T*P tokens out)."""

    label = "MLP projector (no compression)"
    short_name = "mlp"
    family = "projector"

    @classmethod
    def describe_config(cls, config) -> str:
        return f"{cls.registry_name}, every patch"

    def __init__(self, *, vision_hidden_size: int, hidden_size: int, **_):
        super().__init__()
        # registered as "0" / "2" so the keys match the Factory's bare Sequential (`_connector.0.weight`)
        self.add_module("0", nn.Linear(vision_hidden_size, hidden_size))
        self.add_module("1", nn.GELU())
        self.add_module("2", nn.Linear(hidden_size, hidden_size))

    def num_output_tokens(self, num_frames: int, tokens_per_frame: int) -> int:
        return num_frames * tokens_per_frame

    def forward(self, x, output_attentions: bool = False) -> ConnectorOutput:
        b, t, p, _ = x.shape
        tokens = x.reshape(b, t * p, -1)
        for layer in self.children():
            tokens = layer(tokens)
        # token i comes from frame i // P: no attention to report
        return ConnectorOutput(tokens, self.output_groups(t, p), [(f * p, (f + 1) * p) for f in range(t)], None)

    def token_sources(self, out: ConnectorOutput, layout: "TokenLayout") -> torch.Tensor:
        """Every output token is its own input token."""
        return torch.eye(int(out.tokens.shape[1]))


@dataclass
class TokenLayout:
    """Where each flat visual token (frame-major, index i in [0, T*P)) came from.

    frame[i], row[i], col[i] (row = col = -1 for a token that is not a patch, e.g. a CLIP class token);
    grid = (rows, cols) of the tower's patch grid. `first_cell` is the grid cell of a frame's first kept token:
    1 for SigLIP with the `patch` strategy (the reference drops token 0, which is a real patch there).
    """

    num_frames: int
    tokens_per_frame: int
    grid: tuple[int, int]
    first_cell: int
    frame: torch.Tensor = field(init=False)
    row: torch.Tensor = field(init=False)
    col: torch.Tensor = field(init=False)

    def __post_init__(self):
        i = torch.arange(self.num_frames * self.tokens_per_frame)
        cell = i % self.tokens_per_frame + self.first_cell
        inside = cell >= 0
        self.frame = i // self.tokens_per_frame
        self.row = torch.where(inside, cell // self.grid[1], -1)
        self.col = torch.where(inside, cell % self.grid[1], -1)

    def to_grid(self, values: torch.Tensor, fill: float = float("nan")) -> torch.Tensor:
        """Per-token values [..., T*P] -> per-frame maps [..., T, rows, cols]; cells with no token get `fill`."""
        rows, cols = self.grid
        out = values.new_full((*values.shape[:-1], self.num_frames, rows * cols), fill)
        keep = self.row >= 0
        cell = (self.row * cols + self.col)[keep]
        out[..., self.frame[keep], cell] = values[..., keep]
        return out.reshape(*values.shape[:-1], self.num_frames, rows, cols)


def connector_kwargs_from_config(config) -> dict:
    """The constructor arguments a TinyLLaVA config implies for its connector: the common fields, the LLM's
    config (LLaVA-Mini builds its pre-fusion layers from it) and the extra config.json keys the connector class
    lists in `config_keys` (e.g. `token_budget` for `pool`; see `compressors`)."""
    kwargs = dict(vision_hidden_size=config.vision_hidden_size, hidden_size=config.hidden_size,
                  num_queries=config.num_queries, num_resampler_layers=config.num_resampler_layers,
                  text_config=dict(config.text_config))
    if "model_type" not in kwargs["text_config"]:
        try:
            kwargs["text_config"]["model_type"] = config.llm_type
        except ValueError:  # only pre-fusion needs it, and says so
            pass
    if config.group is not None:
        kwargs["group"] = config.group
    cls = connector_class(config.connector_type)
    kwargs.update({key: config.extra[key] for key in cls.config_keys if config.extra.get(key) is not None})
    return kwargs


# the per-frame compressors of the related work (llava_mini, pool, tome, topk) register into the same registry
from . import compressors  # noqa: E402,F401

__all__ = [
    "BudgetControls", "CONNECTORS", "ConnectorModule", "ConnectorOutput", "GroupResampler", "ImageResampler",
    "LayerAttention", "MLPConnector", "NaiveResampler", "PerceiverResampler", "TokenLayout", "connector_class",
    "create_connector", "group_sizes", "register_connector", "resolve_connector_name", "sinusoidal_position_encoding",
]
