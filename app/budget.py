"""The token budget a user can set on a loaded resampler without retraining it.

- groups (group resampler): how many contiguous chunks the T*P visual tokens are cut into; each chunk is summarised
  by the same latents, so tokens = groups x queries per group.
- queries: how many of the learned latent queries to use (the first k): per group for the group resampler, per
  frame for the image-level one, in total for the naive one.
- tokens per frame (pool, tome, topk): a fixed k output tokens per frame instead of the checkpoint's budget rule
  (`frame_tokens` in `vidlmm.compressors`; at most the frame's patches, pool floors it to a square).
- active fraction: a share of the output tokens is zeroed before the LLM (query zeroing); the LLM still receives
  every position, but only the active ones carry information.

Settings other than the checkpoint's are untrained configurations: the app says so next to the token count.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

STRATEGIES = ("random", "contiguous", "groups", "even")


@dataclass(frozen=True)
class TokenBudget:
    groups: int | None = None      # None or 0: the checkpoint's
    queries: int | None = None     # None or 0: the checkpoint's
    frame_tokens: int | None = None  # None or 0: the checkpoint's (compressors only)
    active_fraction: float = 1.0   # (0, 1]
    strategy: str = "random"
    seed: int = 0

    def overrides_connector(self) -> bool:
        return bool(self.groups) or bool(self.queries) or bool(self.frame_tokens)


def latent_count(module) -> int:
    return int(module.latents.shape[0]) if hasattr(module, "latents") else 0


def describe_limits(module) -> dict:
    """What the budget controls mean for this connector: {"groups": default or None, "queries": default or None,
    "queries_unit": "per group" | "per frame" | "in total" | None, "frame_tokens": the checkpoint's tokens per
    frame as text (e.g. "5" or "512 // frames") or None}."""
    name = getattr(module, "registry_name", "")
    limits = {"groups": None, "queries": None, "queries_unit": None, "frame_tokens": None}
    if name == "groupresampler":
        limits.update(groups=module.group, queries=module.queries_per_group, queries_unit="per group")
    elif name == "resampler":
        limits.update(queries=module.num_queries, queries_unit="per frame")
    elif name == "naiveresampler":
        limits.update(queries=module.num_queries, queries_unit="in total")
    elif hasattr(module, "tokens_out_per_frame"):  # pool / tome / topk: Dynamic-VLM's budget rule
        limits["frame_tokens"] = str(module.frame_tokens or f"{module.token_budget} // frames")
    return limits


def budgeted_connector(module, budget: TokenBudget, num_visual: int | None = None):
    """A view of `module` with the budget's groups / queries; `module` itself is never changed (other sessions
    use it concurrently). Raises ValueError with one sentence for settings the connector cannot take."""
    if not budget.overrides_connector():
        return module
    limits = describe_limits(module)
    if budget.groups and limits["groups"] is None:
        raise ValueError(f"The {module.registry_name} connector has no groups to set.")
    if budget.queries and limits["queries"] is None:
        raise ValueError(f"The {module.registry_name} connector has no learned queries to choose from.")
    if budget.frame_tokens and limits["frame_tokens"] is None:
        raise ValueError(f"The {module.registry_name} connector has no tokens per frame to set.")
    view = copy.copy(module)  # shares layers and weights; own attribute dicts below
    view.__dict__["_parameters"] = dict(module._parameters)
    if budget.queries:
        available = latent_count(module)
        if not 1 <= budget.queries <= available:
            raise ValueError(f"Queries must be between 1 and {available} ({limits['queries_unit']}) for this model.")
        import torch

        view._parameters["latents"] = torch.nn.Parameter(module.latents[: budget.queries].detach(),
                                                         requires_grad=False)
        if limits["queries_unit"] == "per group":
            view.queries_per_group = budget.queries
        else:
            view.num_queries = budget.queries
    if budget.groups:
        if budget.groups < 1 or (num_visual is not None and budget.groups > num_visual):
            raise ValueError(f"Groups must be between 1 and the number of visual tokens ({num_visual}).")
        view.group = budget.groups
    if budget.frame_tokens:
        if budget.frame_tokens < 1:
            raise ValueError("Tokens per frame must be at least 1 (0: the checkpoint's).")
        view.frame_tokens = budget.frame_tokens  # read by tokens_out_per_frame on every forward
    return view


def output_groups(view, num_frames: int, tokens_per_frame: int):
    """Group id of each output token [Q'] for a clip of num_frames (what ConnectorOutput.query_groups will be)."""
    import numpy as np

    name = getattr(view, "registry_name", "")
    if name == "groupresampler":
        return np.repeat(np.arange(view.group), view.queries_per_group)
    if name == "resampler":
        return np.repeat(np.arange(num_frames), view.num_queries)
    if name in ("mlp2x_gelu", "llava_mini", "pool", "tome", "topk"):  # the same number of tokens from every frame
        return np.repeat(np.arange(num_frames), view.num_output_tokens(num_frames, tokens_per_frame) // num_frames)
    return np.zeros(view.num_output_tokens(num_frames, tokens_per_frame), dtype=int)


def zeroing_spans(query_groups):
    """Output-token spans per group for zero_mask; None for a connector with one group (zero_mask then cuts the
    tokens into equal chunks, so "groups" and "even" mean the same granularity for every connector)."""
    from vidlmm.analysis import query_group_spans

    spans = query_group_spans(query_groups)
    return spans if len(spans) > 1 else None


def token_counts(module, budget: TokenBudget, num_frames: int, tokens_per_frame: int) -> tuple[int, int]:
    """(visual tokens the LLM receives, how many of them stay active) for a clip of num_frames."""
    view = budgeted_connector(module, budget, num_frames * tokens_per_frame)
    total = int(view.num_output_tokens(num_frames, tokens_per_frame))
    if budget.active_fraction >= 1:
        return total, total
    from vidlmm.analysis import zero_mask

    groups = output_groups(view, num_frames, tokens_per_frame)
    mask = zero_mask(total, budget.active_fraction, budget.strategy, seed=budget.seed,
                     group_spans=zeroing_spans(groups))
    return total, int(mask.sum())


def connect(model, features, budget: TokenBudget, output_attentions: bool = False):
    """Vision features [T, P, Dv] -> (ConnectorOutput under the budget with tokens [1, Q', D], active tokens).

    Zeroed tokens are zero rows; the mask comes from vidlmm.analysis (the same masks as the redundancy curves)."""
    import torch

    module = model.connector._connector
    feats = features.unsqueeze(0) if features.dim() == 3 else features
    view = budgeted_connector(module, budget, int(feats.shape[1] * feats.shape[2]))
    with torch.no_grad():
        out = view(feats.to(device=model.device, dtype=model.dtype), output_attentions=output_attentions)
    if budget.active_fraction < 1:
        from vidlmm.analysis import zero_mask, zeroed_output

        keep = zero_mask(out.tokens.shape[1], budget.active_fraction, budget.strategy, seed=budget.seed,
                         group_spans=zeroing_spans(out.query_groups.cpu().numpy()))
        return zeroed_output(out, keep), int(keep.sum())
    return out, int(out.tokens.shape[1])
