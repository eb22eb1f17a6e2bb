"""The token budget a user can set on a loaded connector without retraining it.

- groups (group resampler): how many contiguous chunks the T*P visual tokens are cut into; each chunk is summarised
  by the same latents, so tokens = groups x queries per group.
- queries: how many of the learned latent queries to use (the first k): per group for the group resampler, per
  frame for the image-level one, in total for the naive one.
- tokens per frame (pool, tome, topk): a fixed k output tokens per frame instead of the checkpoint's budget rule
  (`frame_tokens` in `vidlmm.compressors`; at most the frame's patches, pool floors it to a square).
- active fraction: a share of the output tokens is zeroed before the LLM (query zeroing, the masks of
  `vidlmm.analysis.zero_mask`); the LLM still receives every position, but only the active ones carry information.

Which of these a connector takes is its own `budget_controls()`; `ConnectorModule.at_budget` builds it at them.
Settings other than the checkpoint's are untrained configurations: the app says so next to the token count.
`TinyLlavaVideo.connect(features, budget=...)` is the one way to run a connector under a budget.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .analysis.zeroing import query_group_spans, zero_mask


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

    def connector(self, module, num_visual: int | None = None):
        """`module` at this budget's groups / queries / tokens per frame (`module` itself when none is set).
        Raises ValueError with one sentence for settings the connector cannot take."""
        return module.at_budget(groups=self.groups, queries=self.queries, frame_tokens=self.frame_tokens,
                                num_visual=num_visual)

    def active_mask(self, query_groups) -> np.ndarray | None:
        """bool [Q], True = kept, for output tokens with these group ids; None when every token stays active."""
        if self.active_fraction >= 1:
            return None
        ids = np.asarray(query_groups)
        return zero_mask(len(ids), self.active_fraction, self.strategy, seed=self.seed,
                         group_spans=zeroing_spans(ids))


def zeroing_spans(query_groups):
    """Output-token spans per group for zero_mask; None for a connector with one group (zero_mask then cuts the
    tokens into equal chunks, so "groups" and "even" mean the same granularity for every connector)."""
    spans = query_group_spans(query_groups)
    return spans if len(spans) > 1 else None


def token_counts(module, budget: TokenBudget, num_frames: int, tokens_per_frame: int) -> tuple[int, int]:
    """(visual tokens the LLM receives, how many of them stay active) for a clip of num_frames, before any
    forward pass."""
    connector = budget.connector(module, num_frames * tokens_per_frame)
    total = int(connector.num_output_tokens(num_frames, tokens_per_frame))
    keep = budget.active_mask(connector.output_groups(num_frames, tokens_per_frame).numpy())
    return total, total if keep is None else int(keep.sum())


__all__ = ["TokenBudget", "token_counts", "zeroing_spans"]
