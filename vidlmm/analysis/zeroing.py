"""Query zeroing (the paper's Figure 5): zero a share of the connector's output tokens and measure what the
language model loses, on one video and question (`zeroing_curve`) or a multiple-choice set (`zeroing_mc_curve`,
in `zeroing_mc.py`).

Masks are bool ``[Q]``, True = the token is kept; zeroed tokens stay in the sequence as zero vectors. The video is
decoded and encoded once and the connector runs once (the pipeline's `visual=` override). The attention strategies
rank the tokens by one traced pass of the full answer (`llm_attention`).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Callable

import numpy as np

from ..errors import VidlmmError
from .attention import _prepared
from .jsonable import to_jsonable

if TYPE_CHECKING:
    from ..pipeline import VideoLMM

STRATEGIES = ("random", "contiguous", "groups", "even")
# guided by where the language model looks (`llm_attention`): the tokens it attends to most (or least) go first
ATTENTION_STRATEGIES = ("most_attended", "least_attended")
FRACTIONS = (1.0, 0.75, 0.5, 0.25, 0.125, 0.0625)
# Connectors without groups (naive, MLP) are cut into this many equal chunks for the "groups" and "even"
# strategies: the paper's group count, so the two families are zeroed at the same granularity.
DEFAULT_CHUNKS = 16

Progress = Callable[[int, int, str], None]  # progress(done, total, description)


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
              group_spans: list[tuple[int, int]] | None = None, scores=None) -> np.ndarray:
    """bool [num_tokens], True = kept. About `fraction_active` of the tokens are kept.

    random: a seeded random subset. contiguous: the first k tokens. groups: whole groups kept, a seeded random
    choice of round(fraction * G) of them. even: in every group, tokens evenly spread over the group.
    most_attended / least_attended: the tokens with the highest (lowest) `scores` (the LLM's attention on each,
    `LLMAttention.token_relevance`) are zeroed first; ties go by position.
    group_spans: [start, end) spans of the *output* tokens per group (see `query_group_spans`); None or a single
    span cuts the tokens into DEFAULT_CHUNKS equal chunks (for connectors with no groups, like the naive one).
    """
    if strategy not in STRATEGIES + ATTENTION_STRATEGIES:
        raise VidlmmError(f"Unknown zeroing strategy '{strategy}' (use "
                          f"{', '.join(STRATEGIES + ATTENTION_STRATEGIES)}).")
    if not 0.0 <= float(fraction_active) <= 1.0:
        raise VidlmmError(f"The active fraction must be between 0 and 1, got {fraction_active}.")
    n = int(num_tokens)
    mask = np.zeros(n, dtype=bool)
    if group_spans is None or len(group_spans) < 2:  # one group (naive) is no grouping: use equal chunks
        bounds = np.cumsum([0] + [len(c) for c in np.array_split(np.arange(n), min(DEFAULT_CHUNKS, max(n, 1)))])
        group_spans = [(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
    rng = np.random.default_rng(seed)
    if strategy in ATTENTION_STRATEGIES:
        if scores is None or len(scores) != n:
            raise VidlmmError(f"The '{strategy}' strategy needs the language model's attention on each token.")
        order = np.argsort(np.asarray(scores, dtype=np.float64), kind="stable")  # least attended first
        kept = order[: _count(fraction_active, n)] if strategy == "most_attended" else \
            order[::-1][: _count(fraction_active, n)]
        mask[kept] = True
    elif strategy == "random":
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
    items answered as the full model did), and with `margin=True` margin (the mean of the right option's
    log-likelihood minus the best wrong one's). Every point also has strategy, fraction, seed, active (the share
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
        """The kind's metrics, and the likelihood margin of a multiple-choice curve run with one."""
        extra = ("margin",) if self.points and "margin" in self.points[0] else ()
        return self.METRICS[self.kind] + extra

    @property
    def default_metric(self) -> str:
        return self.metrics[0]

    def summary(self) -> list[dict]:
        """Per (strategy, fraction): mean, std (sample, 0 for one seed), min and max over seeds of each metric;
        for a multiple-choice set also ``<metric>_lo`` / ``_hi``, its 95 % bootstrap interval over the videos."""
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
                for entry in self.reference.get("intervals", ()):  # multiple-choice sets: over videos, seeds averaged
                    if entry["strategy"] == strategy and entry["fraction"] == fraction:
                        for metric in self.metrics:
                            if metric in entry:
                                row[f"{metric}_lo"], row[f"{metric}_hi"] = entry[metric]
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


def _plan(num_tokens: int, spans, fractions, strategies, seeds, scores=None) -> tuple[list[dict],
                                                                                       dict[bytes, np.ndarray]]:
    """Every (strategy, fraction, seed) point with its mask, and the distinct masks (deterministic strategies
    and 100 % give the same mask for every seed: each distinct mask is evaluated once). scores: the LLM's attention
    on each token, for the attention strategies."""
    points, distinct = [], {}
    for strategy in strategies:
        for fraction in fractions:
            for seed in seeds:
                mask = zero_mask(num_tokens, fraction, strategy, seed=seed, group_spans=spans, scores=scores)
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
        if s not in STRATEGIES + ATTENTION_STRATEGIES:
            raise VidlmmError(f"Unknown zeroing strategy '{s}' (use {', '.join(STRATEGIES + ATTENTION_STRATEGIES)}).")
    for f in fractions:
        if not 0.0 <= float(f) <= 1.0:
            raise VidlmmError(f"The active fraction must be between 0 and 1, got {f}.")


def _batches(items: list, size: int):
    for start in range(0, len(items), max(1, size)):
        yield items[start:start + max(1, size)]


def score_answer(lmm: "VideoLMM", prompt_ids: list[int], answer_ids: list[int], visuals: list):
    """Teacher-forced pass of prompt + answer for each visual-token variant (connector outputs, one batch, equal
    lengths).

    Returns per variant (log-likelihood of the answer tokens, index of the first answer token that is not the
    greedy choice or -1)."""
    import torch

    from ..conversation import IGNORE_INDEX

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
    return [model.trim_at_eos(row) for row in out]


def _decode(lmm: "VideoLMM", ids: list[int]) -> str:
    from ..conversation import clean_answer

    return clean_answer(lmm.model.tokenizer.decode(ids, skip_special_tokens=True), lmm.template)


def _attention_scores(lmm: "VideoLMM", prepared, question: str, answer_ids: list[int], strategies):
    """The LLM's attention on each visual token while it writes `answer_ids` (whole answer, every layer and head),
    when an attention strategy is asked for; else None."""
    if not set(strategies) & set(ATTENTION_STRATEGIES):
        return None
    from .llm_attention import llm_attention

    return llm_attention(lmm, prepared, question, answer_ids=list(answer_ids), trace_sources=False).token_relevance()


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
    from ..pipeline import GenerationSettings

    _check_plan(fractions, strategies, seeds)
    prepared = _prepared(lmm, video, sampling)
    out = lmm.visual_tokens(prepared)
    tokens = out.tokens[0]
    spans = query_group_spans(out.query_groups.cpu().numpy())
    full = lmm.ask(prepared, question, generation=GenerationSettings(max_new_tokens=max_new_tokens))
    prompt = lmm.prompt_ids(question)
    answer_ids = list(full.token_ids)
    scores = _attention_scores(lmm, prepared, question, answer_ids, strategies)
    points, distinct = _plan(tokens.shape[0], spans, fractions, strategies, seeds, scores)
    full_mask = np.ones(tokens.shape[0], dtype=bool)
    full_key = full_mask.tobytes()
    keys = [full_key] + [k for k in distinct if k != full_key]  # the reference first, in the same batches
    scores: dict[bytes, dict] = {}
    total = len(keys)
    for batch in _batches(keys, batch_size):
        visuals = [zeroed_output(out, distinct.get(k, full_mask)) for k in batch]
        for key, (ll, first) in zip(batch, score_answer(lmm, prompt, answer_ids, visuals)):
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


__all__ = ["ATTENTION_STRATEGIES", "DEFAULT_CHUNKS", "FRACTIONS", "STRATEGIES", "ZeroingResult", "query_group_spans",
           "score_answer", "zero_mask", "zero_tokens", "zeroed_output", "zeroing_curve"]
