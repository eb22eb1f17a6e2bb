"""The held-out results of trained models, kept compactly and compared with intervals.

    python -m train.results --data WORLD/eval_mc.json --model group=assets/models/group --model ... \
        [--records DIR] [--out results.json] [--types]

A model's row keeps its accuracies with their 95 % bootstrap intervals (over videos, `vidlmm.intervals`) and its
choice on every question as one string (one letter per question, "-" for an unparsable reply), so any two models
scored on the same questions can be compared afterwards without the models: `comparisons` gives the paper's
comparisons as paired differences with intervals. Used by the embedded rebuild (`build_embedded`) and the
ablations (`ablations`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from vidlmm.intervals import bootstrap_interval, format_accuracy, format_interval, paired_difference

CATEGORIES = ("static", "temporal")
# the paper's comparisons on the embedded models: (what it says, model a, model b, category or None for all)
PAPER_COMPARISONS = (
    ("video-level (group) vs image-level resampler", "group", "image", None),
    ("video-level (naive) vs image-level resampler", "naive", "image", None),
    ("group vs naive video-level resampler, temporal questions", "group", "naive", "temporal"),
    ("group vs naive video-level resampler, static questions", "group", "naive", "static"),
)


def questions(path) -> list[dict]:
    """The id, video, category, type and answer letter of every question of a held-out JSON file, in order."""
    items = json.loads(Path(path).read_text())
    return [{"id": it["id"], "video": it["video"], "category": it.get("category", "all"),
             "type": it.get("type", ""), "answer": it["answer"][:1]} for it in items]


def model_row(result, qs: list[dict]) -> dict:
    """A model's compact row from its `EvalResult` on the questions ``qs`` (the same order)."""
    parsed = {r.id: r.parsed for r in result.items}
    choices = "".join(parsed.get(q["id"]) or "-" for q in qs)
    keep = ("n", "correct", "accuracy", "interval", "chance", "unparsable")
    return {"accuracy": result.accuracy, "interval": result.interval, "n": result.n, "correct": result.correct,
            "chance": result.chance, "unparsable": result.unparsable,
            "per_category": {c: {k: v[k] for k in keep} for c, v in result.per_category.items()},
            "choices": choices}


def correct_vector(row: dict, qs: list[dict], category: str | None = None, *,
                   qtype: str | None = None) -> tuple[np.ndarray, list[str]]:
    """(1/0 per question, its video) for a row's choices, on one category (and/or question type) or all."""
    pick = [k for k, q in enumerate(qs)
            if (category is None or q["category"] == category) and (qtype is None or q["type"] == qtype)]
    right = np.array([row["choices"][k] == qs[k]["answer"] for k in pick], dtype=np.float64)
    return right, [qs[k]["video"] for k in pick]


def per_type(row: dict, qs: list[dict]) -> dict[str, dict]:
    """Accuracy with its interval for each question type."""
    out = {}
    for t in dict.fromkeys(q["type"] for q in qs):
        right, videos = correct_vector(row, qs, qtype=t)
        out[t] = {"n": len(right), "correct": int(right.sum()), "accuracy": float(right.mean()),
                  "interval": list(bootstrap_interval(right, videos))}
    return out


def comparisons(rows: dict[str, dict], qs: list[dict], pairs=PAPER_COMPARISONS) -> list[dict]:
    """Each pair whose two models are in ``rows``: a's accuracy minus b's on the same questions, with the
    interval of the difference; ``verdict``: which way the interval says, or that it cannot tell."""
    out = []
    for label, a, b, category in pairs:
        if a not in rows or b not in rows or "choices" not in rows[a] or "choices" not in rows[b]:
            continue
        ra, videos = correct_vector(rows[a], qs, category)
        rb, _ = correct_vector(rows[b], qs, category)
        d = paired_difference(ra, rb, videos)
        lo, hi = d["interval"]
        verdict = f"{a} better" if lo > 0 else f"{b} better" if hi < 0 else "no difference shown"
        out.append({"comparison": label, "a": a, "b": b, "category": category or "all", **d, "verdict": verdict})
    return out


def table(rows: dict[str, dict], extra_columns: dict[str, dict] | None = None) -> str:
    """The markdown table: overall, static and temporal accuracy with 95 % intervals, chance and unparsable."""
    extra_columns = extra_columns or {}
    heads = list(dict.fromkeys(k for cols in extra_columns.values() for k in cols))
    lines = ["| model | " + "".join(f"{h} | " for h in heads)
             + "overall [95 % interval] | static | temporal | chance | unparsable |",
             "|---|" + "---:|" * (len(heads) + 5)]
    for name, r in rows.items():
        cat = r.get("per_category", {})
        extra = "".join(f"{extra_columns.get(name, {}).get(h, '-')} | " for h in heads)
        lines.append(f"| {name} | {extra}{format_accuracy(r)} | {format_accuracy(cat.get('static'))} | "
                     f"{format_accuracy(cat.get('temporal'))} | {100 * r['chance']:.1f} | {r['unparsable']} |")
    return "\n".join(lines) + "\n"


def comparisons_table(comps: list[dict]) -> str:
    if not comps:
        return ""
    lines = ["| comparison | questions | difference (points) [95 % interval] | verdict |", "|---|---:|---:|---|"]
    for c in comps:
        lines.append(f"| {c['comparison']} ({c['a']} - {c['b']}) | {c['n']} | "
                     f"{format_interval(c['difference'], c['interval'])} | {c['verdict']} |")
    return "\n".join(lines) + "\n"


def score_models(models: dict[str, Path], data: Path, *, records: Path | None = None, scoring: str = "generate",
                 progress: bool = False) -> dict:
    """Score each model folder on a held-out JSON file: {"questions", "results": {name: row}}. With ``records``
    every scored question is kept in ``records/<name>.jsonl`` as it is scored, so a killed run resumes."""
    from vidlmm.checkpoint import load_model
    from vidlmm.evaluate import evaluate, load_mc_items
    from vidlmm.pipeline import VideoLMM

    qs, items = questions(data), load_mc_items(data)
    rows = {}
    for name, folder in models.items():
        log = None
        if records is not None:
            records.mkdir(parents=True, exist_ok=True)
            log = records / f"{name}{'' if scoring == 'generate' else '.' + scoring}.jsonl"
        result = evaluate(VideoLMM(load_model(folder)), items, records=log, scoring=scoring, progress=progress)
        rows[name] = model_row(result, qs)
        if progress:
            print(f"{name}: {100 * result.accuracy:.1f} %", file=sys.stderr)
    return {"questions": qs, "results": rows}


def pairs_of(specs) -> list[tuple]:
    """``["a:b", ...]`` -> comparisons of a against b overall and on each category."""
    out = []
    for spec in specs:
        a, _, b = spec.partition(":")
        out += [(f"{a} vs {b}" + (f", {c} questions" if c else ""), a, b, c) for c in (None, *CATEGORIES)]
    return out


def report(summary: dict, types: bool = False, compare=()) -> str:
    """The table, the paper's comparisons (and the ``compare`` pairs, "a:b") and (``types``) every question
    type's accuracy per model."""
    rows, qs = summary["results"], summary["questions"]
    text = table(rows) + "\n" + comparisons_table(comparisons(rows, qs, PAPER_COMPARISONS + tuple(pairs_of(compare))))
    if types:
        per = {name: per_type(row, qs) for name, row in rows.items()}
        names = list(per)
        kinds = list(next(iter(per.values())))
        text += "\n| type | n | " + " | ".join(names) + " |\n|---|---:|" + "---:|" * len(names) + "\n"
        for t in kinds:
            text += (f"| {t} | {per[names[0]][t]['n']} | "
                     + " | ".join(format_interval(per[m][t]["accuracy"], per[m][t]["interval"], 0) for m in names)
                     + " |\n")
    return text


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.results",
                                     description="Score model folders on a held-out set; table with 95 % intervals "
                                                 "and the paper's comparisons")
    parser.add_argument("--data", required=True, help="held-out multiple-choice JSON (a world's eval_mc.json)")
    parser.add_argument("--model", action="append", required=True, metavar="NAME=FOLDER",
                        help="a model folder, named as in the comparisons (group, naive, image, ...)")
    parser.add_argument("--records", help="folder for each model's scored questions (a rerun resumes)")
    parser.add_argument("--scoring", choices=("generate", "likelihood"), default="generate")
    parser.add_argument("--out", help="write the rows (with every choice) to this JSON file")
    parser.add_argument("--types", action="store_true", help="also every question type per model")
    parser.add_argument("--compare", nargs="*", default=[], metavar="A:B",
                        help="also compare model A with model B (overall, static, temporal)")
    args = parser.parse_args(argv)
    models = {}
    for spec in args.model:
        name, _, folder = spec.partition("=")
        models[name if folder else Path(name).name] = Path(folder or name)
    summary = score_models(models, Path(args.data), records=Path(args.records) if args.records else None,
                           scoring=args.scoring, progress=True)
    if args.out:
        Path(args.out).write_text(json.dumps(summary, indent=1))
    print(report(summary, args.types, args.compare))
    return 0


__all__ = ["PAPER_COMPARISONS", "comparisons", "comparisons_table", "correct_vector", "model_row", "per_type",
           "questions", "report", "score_models", "table"]


if __name__ == "__main__":
    sys.exit(main())
