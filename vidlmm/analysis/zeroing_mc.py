"""The paper's Figure 5 on a multiple-choice set: accuracy with a share of the connector's output tokens zeroed.

Hours-long on a real benchmark, so built like `vidlmm.evaluate`: every question becomes one `ZeroingRecord` (the
full model's reply and the choice at every (strategy, fraction, seed) point) that a `RecordLog` can keep as it is
scored, a rerun skips the questions already kept, and `shard` splits the videos over processes. The curve is a
function of the records alone (`zeroing_mc_result`), so a resumed or distributed run gives the one-process curve.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..errors import VidlmmError
from ..intervals import bootstrap_interval, ratio_interval
from .zeroing import (
    FRACTIONS, STRATEGIES, Progress, ZeroingResult, _attention_scores, _batches, _check_plan, _decode, _greedy_batch,
    _model_name, _plan, query_group_spans, zeroed_output,
)


@dataclass
class ZeroingRecord:
    """One question: its answer letter and option count, the connector's output token count, the full model's
    reply and choice, and per point [strategy, fraction, seed, choice, active share, kept tokens]."""

    id: str
    video: str
    answer: str
    num_options: int
    tokens: int
    full_response: str
    full_choice: str | None
    points: list


def zeroing_settings(lmm, sampling, style: str, max_new_tokens: int, fractions, strategies, seeds) -> dict:
    """What a zeroing record depends on (a `RecordLog` refuses a file written with other settings)."""
    from ..evaluate import run_settings

    return {**run_settings(lmm, sampling, style, "generate", True, max_new_tokens),
            "zeroing": {"fractions": [float(f) for f in fractions], "strategies": list(strategies),
                        "seeds": [int(s) for s in seeds]}}


def zeroing_mc_records(lmm, items, *, fractions=FRACTIONS, strategies=STRATEGIES, seeds=(0, 1, 2), sampling=None,
                       style: str = "mvbench", max_new_tokens: int = 16, batch_size: int = 8,
                       progress: Progress | None = None, records=None, shard: tuple[int, int] = (0, 1),
                       margin: bool = False) -> tuple[list[ZeroingRecord], list[dict]]:
    """(records in the items' order, missing) for this process's share of `items` (MCItems).

    Each video is decoded and encoded once and its connector output reused for every level, seed and question; the
    full model answers exactly as `evaluate` does, the zeroed ones greedily in batches. records: a `RecordLog` (or a
    path for one) that keeps every record and skips the questions it holds. shard (rank, processes): only the reads
    whose first-appearance index is rank modulo processes. A video that cannot be read is listed in missing.
    margin: also score every option's text under every mask (`evaluate.option_loglikelihoods`) and keep the
    likelihood margin, the right option's log-likelihood minus the best wrong one's (a point's 7th value).
    The attention strategies (`most_attended`, `least_attended`) rank the tokens by the LLM's attention while it
    wrote the full model's answer to each question (`llm_attention`), so their masks differ from question to question.
    """
    from ..errors import VideoReadError
    from ..evaluate import LIKELIHOOD_OF, RecordLog, build_mc_question, group_reads, missing_entry, parse_choice
    from ..pipeline import GenerationSettings

    _check_plan(fractions, strategies, seeds)
    base = sampling or getattr(lmm, "sampling", None)
    if (records is not None or shard[1] > 1) and len({item.id for item in items}) != len(items):
        raise VidlmmError("Question ids must be unique to keep records or split the questions over processes.")
    own_log = records is not None and not isinstance(records, RecordLog)
    if own_log:
        settings = zeroing_settings(lmm, base, style, max_new_tokens, fractions, strategies, seeds)
        settings["zeroing"]["margin"] = bool(margin)
        if margin:  # the margins are likelihood scores: records of another likelihood are not mixed in
            settings["likelihood_of"] = LIKELIHOOD_OF
        records = RecordLog(records, settings, record_type=ZeroingRecord)
    generation = GenerationSettings(max_new_tokens=max_new_tokens, do_sample=False)
    reads = [group for k, group in enumerate(group_reads(items, base).items()) if k % shard[1] == shard[0]]
    total = sum(len(indices) for _, indices in reads)
    scored: dict[int, ZeroingRecord] = {}
    missing = []
    try:
        for (video, frames), indices in reads:
            done = records.done if records is not None else {}
            scored.update({i: done[items[i].id] for i in indices if items[i].id in done})
            todo = [i for i in indices if i not in scored]
            if not todo:
                continue
            try:
                prepared = lmm.prepare(video, frames)[0]
            except (VideoReadError, OSError) as err:  # the questions are listed, the curve goes on
                missing += [missing_entry(items[i].id, video, err) for i in todo]
                continue
            out = lmm.visual_tokens(prepared)
            num_tokens = int(out.tokens.shape[1])
            spans = query_group_spans(out.query_groups.cpu().numpy())
            full_key = np.ones(num_tokens, dtype=bool).tobytes()
            for i in todo:
                item = items[i]
                question = build_mc_question(item, style)
                full = lmm.ask(prepared, question, generation=generation)
                # the attention strategies follow where the LLM looked while answering this question
                scores = _attention_scores(lmm, prepared, question, full.token_ids, strategies)
                points, distinct = _plan(num_tokens, spans, fractions, strategies, seeds, scores)
                keys = [k for k in distinct if k != full_key]
                choices = {full_key: parse_choice(full.text, item.options, item.letters)}
                prompt = lmm.prompt_ids(question)
                for batch in _batches(keys, batch_size):
                    visuals = [zeroed_output(out, distinct[k]) for k in batch]
                    for key, ids in zip(batch, _greedy_batch(lmm, prompt, visuals, max_new_tokens)):
                        choices[key] = parse_choice(_decode(lmm, ids), item.options, item.letters)
                margins = _margins(lmm, out, item, [full_key, *keys], distinct, batch_size) if margin else {}
                scored[i] = ZeroingRecord(
                    id=item.id, video=item.video, answer=item.answer_letter, num_options=len(item.options),
                    tokens=num_tokens, full_response=full.text, full_choice=choices[full_key],
                    points=[[p["strategy"], p["fraction"], p["seed"], choices[p["_key"]], p["active"],
                             p["kept_tokens"], *([margins[p["_key"]]] if margin else [])] for p in points])
                if records is not None:
                    records.add(scored[i])
                if progress:
                    progress(len(scored) + len(missing), total, f"zeroing: {len(scored)}/{total} questions")
            del prepared
    finally:
        if own_log:
            records.close()
    order = {item.id: k for k, item in enumerate(items)}
    return [scored[i] for i in sorted(scored)], sorted(missing, key=lambda m: order.get(m["id"], -1))


def _margins(lmm, out, item, keys, distinct, batch_size: int) -> dict[bytes, float]:
    """{mask key: right option's log-likelihood minus the best wrong one's} with the tokens zeroed by each mask."""
    from ..evaluate import options_loglikelihoods

    full = np.ones(int(out.tokens.shape[1]), dtype=bool)
    right = item.letters.index(item.answer_letter)
    margins = {}
    for batch in _batches(keys, batch_size):
        scores = options_loglikelihoods(lmm, item, [zeroed_output(out, distinct.get(k, full)) for k in batch])
        for key, row in zip(batch, scores):
            margins[key] = float(row[right] - max(v for j, v in enumerate(row) if j != right))
    return margins


def zeroing_mc_result(records: list[ZeroingRecord], missing: list[dict], *, fractions, strategies, seeds,
                      style: str, model: str, connector_type: str = "") -> ZeroingResult:
    """The curve of a set of records (one process's, a resumed run's or every process's, in the items' order):
    accuracy, relative_accuracy (to the full model's accuracy) and agreement with the full model per point, and the
    mean likelihood margin where the records have one."""
    if not records:
        raise VidlmmError("No video of the multiple-choice set could be read.")
    full_acc = float(np.mean([r.full_choice == r.answer for r in records]))
    by_point: dict[tuple, list] = {}
    for r in records:
        for strategy, fraction, seed, choice, active, kept, *margin in r.points:
            by_point.setdefault((strategy, float(fraction), int(seed)), []).append(
                (choice == r.answer, choice == r.full_choice, active, kept, *margin))
    points = []
    for strategy in strategies:
        for fraction in fractions:
            for seed in seeds:
                rows = by_point[(strategy, float(fraction), int(seed))]
                correct, agree, active, kept, *margin = (np.array(col, dtype=np.float64) for col in zip(*rows))
                acc = float(correct.mean())
                points.append({"strategy": strategy, "fraction": float(fraction), "seed": int(seed),
                               "active": float(active.mean()), "kept_tokens": float(kept.mean()), "accuracy": acc,
                               "relative_accuracy": acc / full_acc if full_acc > 0 else float("nan"),
                               "agreement": float(agree.mean()), "n": len(rows),
                               **({"margin": float(margin[0].mean())} if margin else {})})
    reference = {"accuracy": full_acc, "n": len(records), "videos": len({r.video for r in records}), "style": style,
                 "intervals": _point_intervals(records, strategies, fractions),
                 "chance": float(np.mean([1 / r.num_options for r in records])),
                 "items": [{"id": r.id, "video": r.video, "answer": r.answer, "full_response": r.full_response,
                            "full_choice": r.full_choice} for r in records],
                 "missing": missing}
    return ZeroingResult(model=model, fractions=[float(f) for f in fractions], strategies=list(strategies),
                         seeds=[int(s) for s in seeds], points=points, kind="mc", connector_type=connector_type,
                         num_tokens=records[0].tokens, reference=reference)


def _point_intervals(records: list[ZeroingRecord], strategies, fractions) -> list[dict]:
    """Per (strategy, fraction): 95 % bootstrap intervals over the videos (`vidlmm.intervals`) of the accuracy and
    of the accuracy relative to the full model's, each question's correctness averaged over the seeds."""
    videos = [r.video for r in records]
    full = [float(r.full_choice == r.answer) for r in records]
    out = []
    for strategy in strategies:
        for fraction in fractions:
            right = []
            for r in records:
                hits = [choice == r.answer for s, f, _, choice, *_ in r.points
                        if s == strategy and float(f) == float(fraction)]
                right.append(float(np.mean(hits)) if hits else float("nan"))
            out.append({"strategy": strategy, "fraction": float(fraction),
                        "accuracy": list(bootstrap_interval(right, videos)),
                        "relative_accuracy": list(ratio_interval(right, full, videos))})
    return out


def zeroing_mc_curve(lmm, items, *, video_root=None, fractions=FRACTIONS, strategies=STRATEGIES, seeds=(0, 1, 2),
                     name: str | None = None, progress: Progress | None = None, sampling=None,
                     style: str = "mvbench", max_new_tokens: int = 16, batch_size: int = 8,
                     records=None, margin: bool = False) -> ZeroingResult:
    """Multiple-choice accuracy with zeroed tokens, relative to the full model, in one process.

    items: `vidlmm.evaluate` MCItems, or a benchmark file or root (read with `benchmarks.load_benchmark`, videos
    under `video_root`; the loader's missing videos join the curve's `reference["missing"]`). records: see
    `zeroing_mc_records` (and margin).
    """
    from ..benchmarks import load_benchmark

    _check_plan(fractions, strategies, seeds)
    missing = []
    if isinstance(items, (str, os.PathLike)):
        bench = load_benchmark(items, video_root)
        items, missing = bench.items, list(bench.missing)
    items = list(items)
    if not items:
        raise VidlmmError("The multiple-choice set holds no questions.")
    scored, unread = zeroing_mc_records(lmm, items, fractions=fractions, strategies=strategies, seeds=seeds,
                                        sampling=sampling, style=style, max_new_tokens=max_new_tokens,
                                        batch_size=batch_size, progress=progress, records=records, margin=margin)
    return zeroing_mc_result(scored, missing + unread, fractions=fractions, strategies=strategies, seeds=seeds,
                             style=style, model=_model_name(lmm, name),
                             connector_type=lmm.model.connector.registry_name)


__all__ = ["ZeroingRecord", "zeroing_mc_curve", "zeroing_mc_records", "zeroing_mc_result", "zeroing_settings"]
