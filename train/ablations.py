"""The paper's resampler ablations at toy scale, as one command on the embedded models' world and stage 0.

    python -m train.ablations [--work runs/embedded] [--out runs/ablations] [--studies ...] [--settings ...] [--smoke]

Studies (each a list of connector settings trained with the embedded recipe, stages 1 and 2, and scored on the
held-out set with 95 % bootstrap intervals):

- ``resamplers`` (the paper's Figure 10): image-level, naive video-level and group video-level resamplers at the
  same 64 visual tokens;
- ``image_queries`` (Figure 8): the image-level resampler with 1, 2, 4, 8 and 16 queries per frame;
- ``groups`` (Figures 11-12): 64 queries in 1 group (the naive video-level resampler) up to 16 groups, one per
  frame.

The work folder is the rebuild's (``python -m train.build_embedded --work W``): its world and stage 0 are reused
(made when missing), and a setting that equals an embedded model (the same connector fields) is trained once
under that model's name. Every run is a phase of the work folder's ``build_state.json``: a killed run resumes at
its first unfinished setting. Writes ``<out>/ablations.json``, ``<out>/ablations.md`` (tables with intervals and
wall times, paired differences between neighbouring settings) and one figure per study (accuracy against the
setting, static and temporal, with interval bars).
"""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from pathlib import Path

from .build_embedded import CONNECTORS, Phases, prepare, train_and_score
from .results import CATEGORIES, comparisons, comparisons_table, questions, table


CONFIG = Path(__file__).resolve().parent / "configs" / "ablations.yaml"


def load_studies(path=CONFIG) -> dict:
    """{study: (what varies, [(value, connector spec)])} from the ablations config."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text())
    return {study: (body["label"], [(value, {**body.get("common", {}), **spec})
                                    for value, spec in body["settings"].items()])
            for study, body in raw.items()}


STUDIES = load_studies()


def run_name(spec: dict) -> str:
    """The work-folder name of a setting: the embedded model's when it is one, else derived from its fields."""
    for name, embedded in CONNECTORS.items():
        if embedded == spec:
            return name
    if spec["connector_type"] == "resampler":
        return f"image_q{spec['num_queries']}"
    return f"group_g{spec['group']}_q{spec['num_queries']}"


def run_ablations(work: Path, out: Path, *, studies=tuple(STUDIES), settings=None, seed: int = 0,
                  smoke: bool = False, progress: bool = True) -> dict:
    """Train and score every setting of ``studies`` (each distinct setting once) in the work folder; with
    ``settings``, only the values named there plus those an earlier run trained. Writes the report, its table and
    the figures to ``out``; returns the report."""
    phases = Phases(work, {"seed": seed, "smoke": smoke}, progress)
    world = prepare(work, phases, seed=seed, smoke=smoke, progress=progress)
    qs = questions(world / "eval_mc.json")
    rows: dict[str, dict] = {}
    report = {"seed": seed, "smoke": smoke, "studies": {}}
    for study in studies:
        label, values = STUDIES[study]
        entries = []
        for value, spec in values:
            name = run_name(spec)
            if settings is not None and str(value) not in settings and f"train_{name}" not in phases.state["phases"]:
                continue  # neither asked for nor trained by an earlier run
            if name not in rows:
                rows[name], _ = train_and_score(name, spec, work, phases, seed=seed, smoke=smoke, progress=progress)
            seconds = sum(phases.state["phases"].get(phase, 0.0) for phase in rows[name]["phases"])
            entries.append({"value": value, "run": name, "seconds": seconds, **_summary(rows[name])})
        report["studies"][study] = {"label": label, "entries": entries,
                                    "comparisons": comparisons(rows, qs, neighbour_pairs(entries))}
    report["wall_time_s"] = sum(phases.state["phases"].get(phase, 0.0)
                                for row in rows.values() for phase in row["phases"])
    report["questions"] = len(qs)
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablations.json").write_text(json.dumps(report, indent=1))
    (out / "ablations.md").write_text(report_markdown(report, rows))
    for study in studies:
        if report["studies"][study]["entries"]:
            plot_study(report["studies"][study], out / f"{study}.png")
    return report


def neighbour_pairs(entries: list[dict]) -> list[tuple]:
    """The paired comparisons of a study (as `train.results.comparisons` takes them): each setting minus the one
    before it, on all questions and on each category (does the next step of the curve change anything)."""
    return [(f"{e['value']} vs {before['value']}" + (f", {category}" if category else ""), e["run"], before["run"],
             category)
            for before, e in zip(entries, entries[1:]) for category in (None, *CATEGORIES)]


def _summary(row: dict) -> dict:
    keep = ("accuracy", "interval", "unparsable", "visual_tokens")
    return {**{k: row.get(k) for k in keep},
            "per_category": {c: {"accuracy": v["accuracy"], "interval": v["interval"]}
                             for c, v in row.get("per_category", {}).items()}}


def report_markdown(report: dict, rows: dict[str, dict]) -> str:
    text = [f"# Ablations at toy scale (seed {report['seed']}, {report['questions']} held-out questions)\n"]
    for study, body in report["studies"].items():
        text.append(f"## {study}: {body['label']}\n")
        shown = {f"{e['value']}": rows[e["run"]] for e in body["entries"]}
        extra = {f"{e['value']}": {"run": e["run"], "train + eval": f"{e['seconds'] / 60:.1f} min"}
                 for e in body["entries"]}
        text.append(table(shown, extra))
        if body.get("comparisons"):
            text.append("Paired differences between neighbouring settings (the same questions):\n")
            text.append(comparisons_table(body["comparisons"]))
    text.append(f"wall time of the runs: {report['wall_time_s'] / 60:.1f} min (settings shared between studies "
                f"train once)\n")
    return "\n".join(text)


def plot_study(body: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = body["entries"]
    xs = range(len(entries))
    fig, ax = plt.subplots(figsize=(5.5, 3.4))
    for k, (cat, colour) in enumerate((("static", "tab:blue"), ("temporal", "tab:orange"))):
        stats = [e["per_category"].get(cat) for e in entries]
        if not all(stats):
            continue
        ys = [100 * s["accuracy"] for s in stats]
        err = [[y - 100 * s["interval"][0] for y, s in zip(ys, stats)],
               [100 * s["interval"][1] - y for y, s in zip(ys, stats)]]
        ax.errorbar([x + 0.06 * (2 * k - 1) for x in xs], ys, yerr=err, marker="o", capsize=3, color=colour,
                    label=cat)
    ax.set_xticks(list(xs), [str(e["value"]) for e in entries])
    ax.set_xlabel(textwrap.fill(body["label"], 70), fontsize=9)
    ax.set_ylabel("held-out accuracy, % (95 % interval)")
    ax.axhline(25, color="grey", lw=0.8, ls=":", label="chance")
    ax.legend(frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.ablations", description=__doc__.split("\n")[0])
    parser.add_argument("--work", default="runs/embedded", help="the rebuild's work folder (world and stage 0)")
    parser.add_argument("--out", default="runs/ablations")
    parser.add_argument("--studies", nargs="+", choices=list(STUDIES), default=list(STUDIES))
    parser.add_argument("--settings", nargs="+", metavar="VALUE",
                        help="train only these settings of the studies (e.g. 4 16); the report also shows those an "
                             "earlier run trained, the others wait for a later run")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--smoke", action="store_true", help="tiny world and budgets (tests)")
    args = parser.parse_args(argv)
    report = run_ablations(Path(args.work), Path(args.out), studies=args.studies,
                           settings=args.settings, seed=args.seed, smoke=args.smoke)
    print((Path(args.out) / "ablations.md").read_text())
    print(f"wall time: {report['wall_time_s'] / 60:.1f} min", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
