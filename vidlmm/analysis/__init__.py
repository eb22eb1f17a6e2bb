"""What the connector looks at, how redundant its tokens are, and what the LLM pays for them.

    maps = attention_maps(lmm, "clip.mp4")               # the connector's own attention, one forward pass
    stats = redundancy_stats(maps)                        # entropy, overlap, cosine of the queries
    curve = zeroing_curve(lmm, "clip.mp4", "What happens?")   # zero queries, score the full model's answer
    budget = token_budget({"group": model.config})        # visual tokens and prefill cost vs frames
    picture = connector_picture(lmm, "clip.mp4")          # pooling grid / merge map / kept mask of a compressor
    looks = llm_attention(lmm, "clip.mp4", "What happens?")   # the LLM's attention per answer word -> frames, patches

The connector's views are built on its return values (`ConnectorOutput.attentions`, `TokenLayout`) and on the
pipeline's `visual=` override: no hooks and no second pass. `llm_attention` is the one exception: one teacher-forced
pass with hooks on the language model's attention layers, reduced as it runs. Results are numpy arrays and small
dataclasses with `to_json()` (and `rows()` for CSV); `visualizations/` turns them into figures.

Conventions: attention arrays are float32 ``[layers, heads, Q, N]`` with Q the connector's queries (= its output
tokens for every Perceiver connector) and N = T * P the flat frame-major visual tokens. Zeroing masks are bool
``[Q]``, True = the token is kept; zeroed tokens stay in the sequence as zero vectors.

torch is imported inside the functions that need it, so `visualizations` can import the JSON helper cheaply.
"""

from .attention import AttentionMaps, attention_maps, frame_aspect, redundancy_stats, token_redundancy
from .costs import BudgetResult, connector_setting, connector_variants, model_config, token_budget
from .jsonable import to_jsonable
from .llm_attention import LLMAttention, llm_attention
from .pictures import connector_picture
from .zeroing import (
    ATTENTION_STRATEGIES, DEFAULT_CHUNKS, FRACTIONS, STRATEGIES, ZeroingResult, query_group_spans, zero_mask,
    zero_tokens, zeroed_output, zeroing_curve,
)
from .zeroing_mc import ZeroingRecord, zeroing_mc_curve, zeroing_mc_records, zeroing_mc_result

__all__ = [
    "ATTENTION_STRATEGIES", "AttentionMaps", "BudgetResult", "DEFAULT_CHUNKS", "FRACTIONS", "LLMAttention",
    "STRATEGIES", "ZeroingRecord", "ZeroingResult", "attention_maps", "connector_picture", "connector_setting",
    "connector_variants", "frame_aspect", "llm_attention", "model_config", "query_group_spans", "redundancy_stats",
    "to_jsonable", "token_budget", "token_redundancy", "zero_mask", "zero_tokens", "zeroed_output", "zeroing_curve",
    "zeroing_mc_curve", "zeroing_mc_records", "zeroing_mc_result",
]
