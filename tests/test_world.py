"""Tests for train.world: determinism, readable videos whose pixels match the ground truth, events visible in
the 16 frames a model samples, well-formed annotations and balanced, unambiguous multiple-choice items."""

from __future__ import annotations

import hashlib
import json
from collections import Counter

import numpy as np
import pytest

from train import world as W
from train.world import text as WT
from train.world import (COLOURS, SHAPES, ClipSpec, WorldConfig, generate_world, load_clips, mc_items, option_text,
                         qa_turns, render_clip, sample_clip, timeline, world_corpus, write_clip)
from vidlmm.video import FrameSampling, read_video

CFG = WorldConfig(seed=7, num_train=12, num_eval=8)
JSON_FILES = ("captions.json", "qa.json", "eval_mc.json", "clips.json", "world.json")


@pytest.fixture(scope="module")
def worlds(tmp_path_factory):
    root = tmp_path_factory.mktemp("world")
    return (root / "a", generate_world(root / "a", CFG)), (root / "b", generate_world(root / "b", CFG, workers=2))


@pytest.fixture(scope="module")
def specs():
    """300 clips sampled with the default config (no rendering)."""
    return [sample_clip(np.random.default_rng([99, i]), seed=(99, i), clip_id=f"c{i}") for i in range(300)]


def _find(specs, kind):
    return next(s for s in specs if any(e.kind == kind for e in s.events))


# ------------------------------------------------------------------ determinism
def test_same_seed_same_world(worlds):
    (a, ma), (b, mb) = worlds
    for name in JSON_FILES:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    # fixed encoder settings (single-threaded libx264): the video files are byte-identical too
    assert ma.videos_sha256 == mb.videos_sha256
    for p in sorted((a / "videos").iterdir()):
        assert p.read_bytes() == (b / "videos" / p.name).read_bytes(), p.name
    assert not list((a / "videos").glob("*.part*"))


def test_different_seed_differs(worlds, tmp_path):
    (a, _), _ = worlds
    generate_world(tmp_path, WorldConfig(seed=8, num_train=3, num_eval=2))
    for name in ("captions.json", "clips.json"):
        assert (tmp_path / name).read_bytes()[:3000] != (a / name).read_bytes()[:3000]


def test_spec_roundtrip_and_sampling_determinism():
    s1 = sample_clip(np.random.default_rng(5), seed=(5,))
    s2 = sample_clip(np.random.default_rng(5), seed=(5,))
    assert s1 == s2 and ClipSpec.from_dict(json.loads(json.dumps(s1.to_dict()))) == s1
    assert np.array_equal(render_clip(s1), render_clip(s2))
    assert W.caption(s1, np.random.default_rng(1)) == W.caption(s2, np.random.default_rng(1))


# ------------------------------------------------------------------ videos
def test_videos_readable(worlds):
    (a, m), _ = worlds
    clips = load_clips(a)
    assert len(clips["train"]) == CFG.num_train and len(clips["eval"]) == CFG.num_eval
    for spec in clips["train"][:6] + clips["eval"][:4]:
        path = a / "videos" / f"{spec.id}{W.video_extension()}"
        clip = read_video(path, FrameSampling.uniform(16))
        assert clip.frames.shape == (16, CFG.size, CFG.size, 3)
        assert clip.total_frames == CFG.frames and abs(clip.fps - CFG.fps) < 1e-6
        assert abs(clip.duration - CFG.frames / CFG.fps) < 1e-6
    assert m.video_bytes > 0 and m.codec in ("h264", "vp9", "vp8", "opencv-vp8")


def _centre(tl, i, t):
    return int(np.floor(tl.y[i, t] + 0.5)), int(np.floor(tl.x[i, t] + 0.5))


def _check_pixels(spec, frames, tol):
    """Every visible object shows its colour at its centre; every hidden one leaves the background there."""
    tl = timeline(spec)
    bg = np.array(spec.background)
    for t in range(spec.frames):
        for i in range(len(spec.objects)):
            y, x = _centre(tl, i, t)
            px = frames[t, y, x].astype(int)
            want = np.array(COLOURS[tl.colour_name(i, t)]) if tl.visible[i, t] else bg
            assert np.abs(px - want).max() <= tol, (spec.id, t, i, px, want)


@pytest.mark.parametrize("kind", W.EVENT_KINDS)
def test_rendered_and_decoded_content_matches_spec(specs, kind, tmp_path):
    spec = _find(specs, kind)
    frames = render_clip(spec)
    assert frames.shape == (spec.frames, spec.size, spec.size, 3) and frames.dtype == np.uint8
    _check_pixels(spec, frames, tol=0)
    path = write_clip(tmp_path / "clip.mp4", frames, spec.fps)
    decoded = read_video(path, FrameSampling.uniform(spec.frames)).frames
    assert decoded.shape == frames.shape
    assert np.abs(decoded.astype(int) - frames).mean() < 3
    _check_pixels(spec, decoded, tol=40)

    tl = timeline(spec)
    e = next(e for e in spec.events if e.kind == kind)
    y, x = _centre(tl, e.obj, max(e.start - 1, 0))
    bg = np.array(spec.background)
    if kind == "appear":  # absent at its place in every frame before, present from its start on
        assert all(np.abs(decoded[t, y, x].astype(int) - bg).max() <= 20 for t in range(e.start))
        assert all(np.abs(decoded[t, y, x].astype(int) - bg).max() > 60 for t in range(e.start, e.start + 3))
    if kind == "move":  # the object's centre ends where the event says
        assert (abs(tl.x[e.obj, -1] - e.to_x) < 1e-9 and abs(tl.y[e.obj, -1] - e.to_y) < 1e-9)
        assert np.abs(decoded[-1, y, x].astype(int) - bg).max() <= 40  # it left its start cell


def test_blinks_countable_in_sixteen_decoded_frames(specs, tmp_path):
    spec = next(s for s in specs if any(e.kind == "blink" and e.count == 3 for e in s.events))
    e = next(e for e in spec.events if e.kind == "blink")
    path = write_clip(tmp_path / "blink.mp4", render_clip(spec), spec.fps)
    frames = read_video(path, FrameSampling.uniform(16)).frames
    y, x = _centre(timeline(spec), e.obj, e.start)
    on = [np.abs(f[y, x].astype(int) - np.array(spec.background)).max() > 60 for f in frames]
    assert sum(1 for a, b in zip(on, on[1:]) if a and not b) == 3


def test_events_observable_in_sampled_frames(specs):
    idx = np.linspace(0, 31, 16).astype(int)
    for spec in specs:
        tl = timeline(spec)
        for e in spec.events:
            if e.kind == "blink":  # count within the blink (+- the gap that separates it from other events)
                near = tl.visible[e.obj, [s for s in idx if e.start - 3 <= s < e.end + 3]]
                assert sum(1 for a, b in zip(near, near[1:]) if a and not b) == e.count, spec.id
            elif e.kind in ("appear", "disappear"):  # a sampled frame just before and one just after
                before = [tl.visible[e.obj, s] for s in idx if e.start - 3 <= s < e.start]
                after = [tl.visible[e.obj, s] for s in idx if e.start <= s < e.start + 3]
                assert before and after and before[-1] == (e.kind == "disappear") != after[0]
            elif e.kind == "move":
                assert (tl.x[e.obj, idx[0]], tl.y[e.obj, idx[0]]) != (tl.x[e.obj, idx[-1]], tl.y[e.obj, idx[-1]])
        for a, b in zip(spec.events, spec.events[1:]):  # a sampled frame shows a finished and b not started
            assert a.end <= b.start
            assert any(a.end - 1 <= s < b.start for s in idx), spec.id


def test_clips_are_unambiguous(specs):
    kinds = Counter()
    for spec in specs:
        shapes = [o.shape for o in spec.objects]
        assert len(set(shapes)) == len(shapes) and set(shapes) <= set(SHAPES)
        colours = [o.colour for o in spec.objects] + [e.colour for e in spec.events if e.kind == "colour"]
        assert len(set(colours)) == len(colours)  # each colour names at most one object, ever
        assert 1 <= len(spec.objects) <= 3 and 1 <= len(spec.events) <= 3
        assert all(e.end <= spec.frames for e in spec.events)
        per_obj = Counter((e.obj, e.kind) for e in spec.events)
        assert max(per_obj.values()) == 1
        kinds.update(e.kind for e in spec.events)
    assert set(kinds) == set(W.EVENT_KINDS) and min(kinds.values()) > 0.08 * sum(kinds.values())


# ------------------------------------------------------------------ annotations
def test_annotation_format(worlds):
    (a, _), _ = worlds
    caps = json.loads((a / "captions.json").read_text())
    qa = json.loads((a / "qa.json").read_text())
    assert len(caps) == len(qa) == CFG.num_train
    for rec in caps:
        conv = rec["conversations"]
        assert [m["from"] for m in conv] == ["human", "gpt"]
        assert conv[0]["value"].startswith("<image>\n") and "<image>" not in conv[1]["value"]
        assert conv[1]["value"][0].isupper() and conv[1]["value"].endswith(".")
        assert (a / rec["video"]).is_file()
    for rec in qa:
        conv = rec["conversations"]
        assert 4 <= len(conv) <= 8 and len(conv) % 2 == 0
        assert [m["from"] for m in conv] == ["human", "gpt"] * (len(conv) // 2)
        assert conv[0]["value"].startswith("<image>\n") and conv[0]["value"].count("<image>") == 1
        assert all("<image>" not in m["value"] for m in conv[1:])
        assert all(m["value"].endswith((".", "?")) for m in conv)
        assert (a / rec["video"]).is_file()


def test_qa_mixes_static_and_temporal(specs):
    cats = Counter()
    for spec in specs[:100]:
        turns = WT._qa_select(spec, np.random.default_rng(0), 2, 4)
        assert 2 <= len(turns) <= 4 and len({q.type for q, _ in turns}) == len(turns)
        cats.update({q.category for q, _ in turns})
        assert qa_turns(spec, np.random.default_rng(0)) == [(t, q.answer + ".") for q, t in turns]
    assert cats["static"] == 100 and cats["temporal"] == 100  # every conversation has both


def test_question_types_lists_every_type_the_world_asks_under_its_category(specs):
    asked = {(q.type, q.category) for spec in specs for q in WT._question_pool(spec, np.random.default_rng(0))}
    listed = {(t, c) for c, types in W.QUESTION_TYPES.items() for t in types}
    assert asked == listed


def _oracle(spec: ClipSpec, item: dict) -> str | None:
    """Independent answers for some question types, from the ground truth."""
    q, tl = item["question"], timeline(spec)
    if item["type"] == "colour":
        return next(o.colour for o in spec.objects if f" {o.shape}?" in q).capitalize()
    if item["type"] == "shape":
        return next(o.shape for i, o in enumerate(spec.objects)
                    if any(f" {W.COLOUR_NAMES[c]} " in q or q.endswith(f" {W.COLOUR_NAMES[c]}?")
                           for c in set(tl.colour[i]))).capitalize()
    if item["type"] == "count":
        return W.NUMBER_WORDS[len(spec.objects)].capitalize()
    if item["type"] == "direction":
        return next(e.direction for e in spec.events if e.kind == "move").capitalize()
    if item["type"] == "first":
        return W.event_sentence(spec, spec.events[0])[:-1]
    return None


def test_mc_items_one_correct_answer(worlds, specs):
    (a, _), _ = worlds
    items = json.loads((a / "eval_mc.json").read_text())
    clips = {s.id: s for s in load_clips(a)["eval"]}
    assert len(items) == CFG.num_eval * CFG.mc_per_clip
    checked = 0
    for spec in specs[:150]:
        items_rng = mc_items(spec, np.random.default_rng(3))
        for item in items_rng:
            _check_item(item)
            want = _oracle(spec, item)
            if want is not None:
                checked += 1
                assert option_text(item["options"]["ABCD".index(item["answer"])]) == want, item
    assert checked > 100
    for item in items:
        _check_item(item)
        assert (a / item["video"]).is_file() and item["id"].startswith(item["video"].split("/")[1].split(".")[0])
        want = _oracle(clips[item["id"].rsplit("_", 1)[0]], item)
        if want is not None:
            assert option_text(item["options"]["ABCD".index(item["answer"])]) == want
    assert {i["category"] for i in items} == {"static", "temporal"}


def _check_item(item):
    assert set(item) >= {"id", "video", "question", "options", "answer", "category"}
    assert item["category"] in ("static", "temporal") and item["answer"] in "ABCD"
    opts = item["options"]
    assert len(opts) == 4 and [o[:3] for o in opts] == ["A. ", "B. ", "C. ", "D. "]
    texts = [option_text(o) for o in opts]
    assert len(set(texts)) == 4 and all(texts)


def test_mc_letters_balanced(worlds, specs):
    (a, m), _ = worlds
    items = json.loads((a / "eval_mc.json").read_text())
    for cat in ("static", "temporal"):  # the world file cycles letters within each category: exact balance
        n = Counter(i["answer"] for i in items if i["category"] == cat)
        assert max(n.values()) - min(n.values()) <= 1 and len(n) == 4
    # mc_items alone draws letters at random: roughly uniform
    n = Counter(i["answer"] for k, s in enumerate(specs) for i in mc_items(s, np.random.default_rng([1, k])))
    total = sum(n.values())
    assert all(0.19 < n[L] / total < 0.31 for L in "ABCD"), n
    cats = Counter(i["category"] for s in specs[:50] for i in mc_items(s, np.random.default_rng(0)))
    assert cats["static"] == cats["temporal"] == 50


def test_eval_disjoint_from_train(worlds):
    (a, _), _ = worlds
    clips = load_clips(a)
    train, evals = clips["train"], clips["eval"]
    assert not {s.id for s in train} & {s.id for s in evals}
    assert not {s.signature() for s in train} & {s.signature() for s in evals}
    qa_videos = {r["video"] for r in json.loads((a / "qa.json").read_text())}
    mc_videos = {i["video"] for i in json.loads((a / "eval_mc.json").read_text())}
    assert qa_videos and mc_videos and not qa_videos & mc_videos
    hashes = lambda ss: {hashlib.sha256((a / "videos" / f"{s.id}{W.video_extension()}").read_bytes()).hexdigest()
                         for s in ss}  # noqa: E731
    assert not hashes(train) & hashes(evals)


def test_world_corpus_and_manifest(worlds):
    (a, m), _ = worlds
    corpus = world_corpus(a)
    assert len(corpus) == 2 * CFG.num_train and all(t and "<image>" not in t for t in corpus)
    assert corpus == world_corpus(load_clips(a)["train"], config=CFG)
    assert len(world_corpus(a, include_eval=True)) == len(corpus) + CFG.num_eval * CFG.mc_per_clip
    words = {w.strip(".,?").lower() for t in corpus for w in t.split()}
    assert len(words) < 120  # a small, closed vocabulary
    meta = json.loads((a / "world.json").read_text())
    assert meta["config"]["seed"] == CFG.seed and meta["num_train"] == CFG.num_train
    for name, digest in meta["files"].items():
        assert hashlib.sha256((a / name).read_bytes()).hexdigest() == digest
    assert m.counts["mc"] == CFG.num_eval * CFG.mc_per_clip and "time" in W.format_summary(m)
