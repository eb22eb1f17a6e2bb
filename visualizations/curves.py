"""Figures of query-zeroing curves (`ZeroingResult`) and of the token budget (`BudgetResult`)."""

from __future__ import annotations

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import FixedLocator, NullLocator

from .style import LINESTYLES, MARKERS, NARROW, WIDE, colour, paper_style

METRIC_LABELS = {
    "relative_likelihood": "answer likelihood per token\n(relative to the full model)",
    "delta_log_likelihood": "change in answer log-likelihood (nats)",
    "log_likelihood": "answer log-likelihood (nats)",
    "answer_changed": "share of runs whose answer changed",
    "relative_accuracy": "accuracy relative to the full model",
    "accuracy": "accuracy",
    "agreement": "answers equal to the full model's",
}
RELATIVE = {"relative_likelihood", "relative_accuracy", "agreement"}


def _as_list(results) -> list:
    if isinstance(results, dict):
        return [r if getattr(r, "model", None) == name else _renamed(r, name) for name, r in results.items()]
    if hasattr(results, "points"):
        return [results]
    return list(results)


def _renamed(result, name: str):
    from dataclasses import replace

    return replace(result, model=name)


def _percent(f: float) -> str:
    return f"{100 * f:g}%"


def plot_zeroing(results, metric: str | None = None, *, strategies=None, figsize=(NARROW * 1.7, 3.0)) -> Figure:
    """Zeroing curves of one or several connectors on one plot: mean over seeds, with a band: for a
    multiple-choice set the 95 % bootstrap interval over its videos, for one video +/- one standard deviation over
    the seeds. Colour = connector, line style and marker = strategy.

    results: {name: ZeroingResult}, a list of them, or one. metric: default the first result's main metric
    (relative likelihood for one video, relative accuracy for a multiple-choice set).
    """
    results = _as_list(results)
    if not results:
        raise ValueError("No zeroing results to plot.")
    metric = metric or results[0].default_metric
    all_strategies = list(dict.fromkeys(s for r in results for s in r.strategies))
    strategies = list(strategies) if strategies else all_strategies
    fractions = sorted({f for r in results for f in r.fractions}, reverse=True)
    log_x = all(f > 0 for f in fractions)
    with paper_style():
        fig = Figure(figsize=figsize, layout="constrained")
        ax = fig.add_subplot()
        for ci, result in enumerate(results):
            if metric not in result.metrics:
                raise ValueError(f"Result '{result.model}' has no metric '{metric}' "
                                 f"(it has {', '.join(result.metrics)}).")
            summary = result.summary()
            for si, strategy in enumerate(all_strategies):
                if strategy not in strategies:
                    continue
                rows = sorted((r for r in summary if r["strategy"] == strategy), key=lambda r: r["fraction"])
                if not rows:
                    continue
                x = np.array([r["fraction"] for r in rows]) * 100
                y = np.array([r[f"{metric}_mean"] for r in rows])
                if all(f"{metric}_lo" in r for r in rows):  # a 95 % interval over the videos
                    low, high = (np.array([r[f"{metric}_{k}"] for r in rows]) for k in ("lo", "hi"))
                else:  # one video: the spread over seeds
                    spread = np.array([r[f"{metric}_std"] for r in rows])
                    low, high = y - spread, y + spread
                label = result.model if len(strategies) == 1 else f"{result.model}, {strategy}"
                ax.plot(x, y, color=colour(ci), ls=LINESTYLES[si % len(LINESTYLES)], marker=MARKERS[si % len(MARKERS)],
                        ms=3.5, lw=1.3, label=label)
                if np.any(high > low):
                    ax.fill_between(x, low, high, color=colour(ci), alpha=0.15, lw=0)
        if log_x:
            ax.set_xscale("log", base=2)
        ax.xaxis.set_major_locator(FixedLocator([100 * f for f in fractions]))
        ax.xaxis.set_minor_locator(NullLocator())
        ax.set_xticks([100 * f for f in fractions], [_percent(f) for f in fractions])
        ax.invert_xaxis()  # fewer tokens to the right
        if metric in RELATIVE:
            ax.axhline(1.0, color="0.5", lw=0.7, ls=":")
        ax.set_xlabel("connector output tokens kept (rest zeroed)")
        ax.set_ylabel(METRIC_LABELS.get(metric, metric))
        kind = results[0].kind
        what = "one video and question" if kind == "likelihood" else \
            f"{results[0].reference.get('n', '?')} multiple-choice questions"
        ax.set_title(f"Query zeroing, {what}")
        ax.legend(frameon=False, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    return fig


def plot_token_budget(budget, *, figsize=(WIDE, 3.2)) -> Figure:
    """Visual tokens reaching the LLM vs frames (left; dashed: the context length) and the estimated LLM
    prefill cost (right), one line per connector / setting."""
    names = budget.names
    with paper_style():
        fig = Figure(figsize=figsize, layout="constrained")
        ax_t, ax_f = fig.subplots(1, 2)
        contexts = set()
        for i, name in enumerate(names):
            rows = [r for r in budget.rows if r["name"] == name]
            label = f"{name}: {rows[0]['setting']}"
            frames, tokens = budget.series(name, "visual_tokens")
            _, flops = budget.series(name, "prefill_gflops")
            style = dict(color=colour(i), marker="os^Dv"[i % 5], ms=3.5, lw=1.3, label=label)
            ax_t.plot(frames, tokens, **style)
            ax_f.plot(frames, flops, **style)
            contexts.add(rows[0]["context"])
        frames = sorted({r["frames"] for r in budget.rows})
        for ax in (ax_t, ax_f):
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xticks(frames, [str(f) for f in frames])
            ax.xaxis.set_minor_locator(NullLocator())
            ax.set_xlabel("frames")
        for c in sorted(contexts):
            ax_t.axhline(c, color="0.4", lw=0.8, ls="--")
            ax_t.annotate(f"context {c}", (frames[0], c), textcoords="offset points", xytext=(2, 2), fontsize=6.5,
                          color="0.3")
        text = budget.rows[0]["text_tokens"]
        ax_t.set_ylabel("visual tokens into the LLM")
        ax_t.set_title("Visual tokens vs frames")
        ax_f.set_ylabel("LLM prefill GFLOPs (estimate)")
        ax_f.set_title(f"Prefill cost, with {text} text tokens")
        handles, labels = ax_f.get_legend_handles_labels()
        fig.legend(handles, labels, frameon=False, loc="outside lower center", ncols=min(len(labels), 2))
    return fig
