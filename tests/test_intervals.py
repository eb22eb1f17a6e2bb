"""Bootstrap intervals (vidlmm.intervals), the compact held-out rows and the paper's comparisons (train.results),
and the ablations' settings and report (train.ablations)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from vidlmm.intervals import bootstrap_interval, paired_difference


def test_the_interval_matches_the_binomial_width_and_is_reproducible():
    rng = np.random.default_rng(0)
    right = rng.random(2000) < 0.6
    lo, hi = bootstrap_interval(right)
    half = 1.96 * np.sqrt(right.mean() * (1 - right.mean()) / len(right))  # normal approximation
    assert lo < right.mean() < hi
    assert (hi - lo) / 2 == pytest.approx(half, rel=0.1)
    assert bootstrap_interval(right) == (lo, hi)  # seeded


def test_questions_on_one_video_widen_the_interval_as_the_videos_warrant():
    # each video's question asked twice with the same outcome: 1000 independent answers, not 2000
    rng = np.random.default_rng(1)
    per_video = rng.random(1000) < 0.6
    right, videos = np.repeat(per_video, 2), np.repeat(np.arange(1000), 2)
    naive_lo, naive_hi = bootstrap_interval(right)
    lo, hi = bootstrap_interval(right, videos)
    assert (hi - lo) / (naive_hi - naive_lo) == pytest.approx(np.sqrt(2), rel=0.12)
    assert (lo, hi) == pytest.approx(bootstrap_interval(per_video), abs=0.004)


def test_a_paired_difference_sees_what_two_separate_intervals_cannot():
    # b is a copy of a with 40 of 2000 answers flipped to wrong: the two intervals overlap, the paired one is > 0
    rng = np.random.default_rng(2)
    a = (rng.random(2000) < 0.6).astype(float)
    b = a.copy()
    b[np.flatnonzero(a)[:40]] = 0
    videos = np.arange(2000) // 2
    a_lo, a_hi = bootstrap_interval(a, videos)
    b_lo, b_hi = bootstrap_interval(b, videos)
    assert b_hi > a_lo  # overlapping
    d = paired_difference(a, b, videos)
    assert d["difference"] == pytest.approx(0.02)
    assert 0 < d["interval"][0] < 0.02 < d["interval"][1]
    assert d["p_not_above"] == 0.0
    same = paired_difference(a, a, videos)
    assert same["interval"] == [0.0, 0.0] and same["p_not_above"] == 1.0
    with pytest.raises(ValueError):
        paired_difference(a, a[:10])


def _questions(n_videos: int = 300) -> list[dict]:
    return [{"id": f"v{v}_{k}", "video": f"videos/v{v}.mp4", "category": ("static", "temporal")[k],
             "type": ("colour", "direction")[k], "answer": "ABCD"[(v + k) % 4]}
            for v in range(n_videos) for k in range(2)]


def _row(qs, right_static: float, right_temporal: float, seed: int) -> dict:
    """A results row whose choices are right at the given rates (wrong ones the next letter, 5 % unparsable)."""
    from vidlmm.evaluate import ItemRecord, summarize
    from train.results import model_row

    rng = np.random.default_rng(seed)
    records = []
    for q in qs:
        rate = right_static if q["category"] == "static" else right_temporal
        u = rng.random()
        parsed = q["answer"] if u < rate else None if u > 0.95 else "ABCD"["ABCD".index(q["answer"]) - 1]
        records.append(ItemRecord(id=q["id"], video=q["video"], category=q["category"], question="?",
                                  answer=q["answer"], response=parsed or "no idea", parsed=parsed,
                                  correct=parsed == q["answer"], num_options=4))
    return model_row(summarize(records), qs)


def test_a_row_keeps_every_choice_and_the_comparisons_read_them():
    from train.results import comparisons, comparisons_table, correct_vector, per_type, table

    qs = _questions()
    rows = {"group": _row(qs, 0.8, 0.7, 0), "naive": _row(qs, 0.8, 0.4, 1), "image": _row(qs, 0.5, 0.4, 2)}
    group = rows["group"]
    assert len(group["choices"]) == len(qs) and group["choices"].count("-") == group["unparsable"]
    right, videos = correct_vector(group, qs, "static")
    assert right.sum() == group["per_category"]["static"]["correct"] and len(set(videos)) == len(videos)
    lo, hi = group["per_category"]["temporal"]["interval"]
    assert lo < group["per_category"]["temporal"]["accuracy"] < hi
    assert per_type(group, qs)["colour"]["correct"] == group["per_category"]["static"]["correct"]
    comps = {(c["a"], c["b"], c["category"]): c for c in comparisons(rows, qs)}
    assert comps[("group", "image", "all")]["verdict"] == "group better"
    assert comps[("group", "naive", "temporal")]["verdict"] == "group better"
    assert comps[("group", "naive", "static")]["verdict"] == "no difference shown"  # both drawn at 0.8
    text = table(rows) + comparisons_table(list(comps.values()))
    assert "| group | " in text and "[" in text and "group better" in text
    # a comparison whose models are not both there is left out
    assert [c["b"] for c in comparisons({"group": group}, qs)] == []


def test_the_eval_table_prints_each_accuracy_with_its_interval():
    from vidlmm.evaluate import ItemRecord, summarize

    records = [ItemRecord(id=str(k), video=f"v{k // 2}", category="static", question="?", answer="A",
                          response="A", parsed="A", correct=k % 3 > 0, num_options=4) for k in range(60)]
    result = summarize(records)
    lo, hi = result.interval
    assert lo < result.accuracy < hi
    assert result.per_category["static"]["interval"] == result.interval
    assert f"{100 * result.accuracy:.1f} [{100 * lo:.1f}, {100 * hi:.1f}]" in result.to_markdown()
    assert json.loads(json.dumps(result.to_json()))["interval"] == [lo, hi]


def test_the_ablation_studies_cover_the_papers_settings_and_share_the_embedded_runs(tmp_path):
    from train.ablations import STUDIES, neighbour_pairs, plot_study, report_markdown, run_name
    from train.build_embedded import CONNECTORS
    from train.results import comparisons

    label, resamplers = STUDIES["resamplers"]
    assert [run_name(spec) for _, spec in resamplers] == ["image", "naive", "group"]  # the embedded models
    assert [v for v, _ in STUDIES["image_queries"][1]] == [1, 2, 4, 8, 16]
    groups = dict(STUDIES["groups"][1])
    assert groups[1] == CONNECTORS["naive"] and groups[16] == CONNECTORS["group"]
    assert {spec["num_queries"] for spec in groups.values()} == {64}
    names = {run_name(spec) for _, settings in STUDIES.values() for _, spec in settings}
    # 13 settings, 11 runs: the resamplers study's three are the embedded models; the image-level study's 4 per frame
    # trains without the symbols' loss (as all its settings), so it is a run of its own, not the embedded image model
    assert len(names) == 11 and run_name(dict(STUDIES["image_queries"][1])[4]) == "image_q4"

    qs = _questions(50)
    rows = {"image_q1": _row(qs, 0.5, 0.5, 0), "image_q2": _row(qs, 0.95, 0.5, 1), "image_q4": _row(qs, 0.95, 0.5, 2)}
    entries = [{"value": v, "run": name, "seconds": 40.0, "accuracy": rows[name]["accuracy"],
                "interval": rows[name]["interval"], "per_category": rows[name]["per_category"]}
               for v, name in ((1, "image_q1"), (2, "image_q2"), (4, "image_q4"))]
    # each setting minus the one before it, paired on the same questions, overall and per category
    comps = comparisons(rows, qs, neighbour_pairs(entries))
    assert [(c["comparison"], c["a"], c["b"]) for c in comps] == [
        ("2 vs 1", "image_q2", "image_q1"), ("2 vs 1, static", "image_q2", "image_q1"),
        ("2 vs 1, temporal", "image_q2", "image_q1"), ("4 vs 2", "image_q4", "image_q2"),
        ("4 vs 2, static", "image_q4", "image_q2"), ("4 vs 2, temporal", "image_q4", "image_q2")]
    assert comps[1]["interval"][0] > 0.2 and comps[1]["verdict"] == "image_q2 better"
    report = {"seed": 0, "questions": len(qs), "wall_time_s": 120.0,
              "studies": {"image_queries": {"label": "queries per frame", "entries": entries, "comparisons": comps}}}
    text = report_markdown(report, rows)
    assert "| 1 | image_q1 | 0.7 min |" in text and "wall time of the runs: 2.0 min" in text
    assert "Paired differences between neighbouring settings" in text
    assert "| 2 vs 1, static (image_q2 - image_q1) | 50 |" in text
    plot_study(report["studies"]["image_queries"], tmp_path / "q.png")
    assert (tmp_path / "q.png").stat().st_size > 1000


def test_an_ablation_run_trains_only_the_settings_asked_for_and_keeps_reporting_earlier_ones(tmp_path,
                                                                                            monkeypatch):
    import train.ablations as ablations

    qs = _questions(40)
    called = []

    def train_and_score(name, spec, work, phases, **kw):  # stands in for stages 1 + 2 and the scoring
        called.append(name)
        phases.record(f"train_{name}", 60.0)
        phases.record(f"eval_{name}", 6.0)
        return {**_row(qs, 0.6, 0.4, len(called)), "phases": [f"train_{name}", f"eval_{name}"]}, None

    monkeypatch.setattr(ablations, "prepare", lambda work, phases, **kw: tmp_path / "world")
    monkeypatch.setattr(ablations, "train_and_score", train_and_score)
    monkeypatch.setattr(ablations, "questions", lambda path: qs)
    first = ablations.run_ablations(tmp_path / "work", tmp_path / "out", studies=("image_queries",),
                                    settings=["16"], progress=False)
    assert called == ["image_q16"]
    assert [e["value"] for e in first["studies"]["image_queries"]["entries"]] == [16]
    later = ablations.run_ablations(tmp_path / "work", tmp_path / "out", studies=("image_queries", "resamplers"),
                                    settings=["4"], progress=False)
    # 16 is reported again (the real train_and_score finds its phase done and reads its kept records); the
    # resamplers study has no setting named "4" and none trained earlier
    assert called == ["image_q16", "image_q4", "image_q16"]
    assert [e["value"] for e in later["studies"]["image_queries"]["entries"]] == [4, 16]
    assert [c["comparison"] for c in later["studies"]["image_queries"]["comparisons"]] == [
        "16 vs 4", "16 vs 4, static", "16 vs 4, temporal"]
    assert later["studies"]["resamplers"]["entries"] == []
    assert later["wall_time_s"] == 2 * 66.0
    assert (tmp_path / "out" / "image_queries.png").is_file()


def test_zeroing_curves_on_a_set_carry_intervals_over_videos_and_the_figure_draws_them():
    from visualizations.curves import plot_zeroing
    from vidlmm.analysis.zeroing import ZeroingResult
    from vidlmm.analysis.zeroing_mc import ZeroingRecord, zeroing_mc_result

    rng = np.random.default_rng(3)
    records = []
    for k in range(200):
        full = "A" if rng.random() < 0.7 else "B"
        points = [["random", f, s, "A" if rng.random() < (0.7 if f == 1.0 else 0.4) else "C", f, int(64 * f)]
                  for f in (1.0, 0.25) for s in (0, 1, 2)]
        records.append(ZeroingRecord(id=str(k), video=f"v{k // 2}", answer="A", num_options=4, tokens=64,
                                     full_response=full, full_choice=full, points=points))
    result = zeroing_mc_result(records, [], fractions=(1.0, 0.25), strategies=("random",), seeds=(0, 1, 2),
                               style="mvbench", model="m")
    rows = {r["fraction"]: r for r in ZeroingResult.from_json(result.to_json()).summary()}
    for fraction, row in rows.items():
        assert row["accuracy_lo"] < row["accuracy_mean"] < row["accuracy_hi"], fraction
        assert row["relative_accuracy_lo"] < row["relative_accuracy_mean"] < row["relative_accuracy_hi"], fraction
    assert rows[0.25]["accuracy_hi"] < rows[1.0]["accuracy_lo"]  # 0.4 against 0.7 on 200 questions
    fig = plot_zeroing(result)
    band = [c for c in fig.axes[0].collections if c.get_paths()]
    assert band, "the interval band is drawn"


def test_train_results_scores_models_resumes_from_records_and_compares(tmp_path, capsys):
    from pathlib import Path

    from train.results import main
    from vidlmm.tiny import write_tiny_checkpoint

    heldout = Path(__file__).resolve().parent.parent / "assets" / "heldout"
    items = json.loads((heldout / "eval_mc.json").read_text())[:6]
    for item in items:
        item["video"] = str(heldout / item["video"])
    data = tmp_path / "eval_mc.json"
    data.write_text(json.dumps(items))
    args = ["--data", str(data), "--records", str(tmp_path / "records"), "--out", str(tmp_path / "rows.json"),
            "--types", "--compare", "image:group"]
    for name, kind in (("group", "groupresampler"), ("image", "resampler")):
        write_tiny_checkpoint(tmp_path / name, kind, video_sampling={"mode": "uniform", "num_frames": 4})
        args += ["--model", f"{name}={tmp_path / name}"]
    assert main(args) == 0
    first = capsys.readouterr().out
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [q["id"] for q in rows["questions"]] == [i["id"] for i in items]
    assert all(len(r["choices"]) == 6 for r in rows["results"].values())
    assert "video-level (group) vs image-level resampler" in first and "| shape |" in first
    assert "| image vs group, temporal questions (image - group) |" in first
    def scored() -> dict:
        return {n: (tmp_path / "records" / f"{n}.jsonl").read_text().count('{"record"') for n in ("group", "image")}

    assert scored() == {"group": 6, "image": 6}
    assert main(args) == 0  # everything is in the records: nothing is scored again, the same table
    assert capsys.readouterr().out == first
    assert scored() == {"group": 6, "image": 6}
