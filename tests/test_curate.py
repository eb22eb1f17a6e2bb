"""The curation commands: corrupt-video scan, duration filters and the Valley caption filter."""

from __future__ import annotations

import json

import pytest

from tests.videos import make_moving_square_frames, write_video
from train import curate


def _item(i, video, answer="A red circle moves left."):
    return {"id": f"s{i}", "video": video,
            "conversations": [{"from": "human", "value": "<image>\nDescribe the video."},
                              {"from": "gpt", "value": answer}]}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("curate")
    videos = root / "videos"
    videos.mkdir()
    write_video(videos / "short.mp4", make_moving_square_frames(10, 32, 32), fps=10)   # 1 s
    write_video(videos / "long.mp4", make_moving_square_frames(40, 32, 32), fps=5)     # 8 s
    (videos / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"garbage" * 50)
    (videos / "empty.mp4").write_bytes(b"")
    items = [_item(0, "videos/short.mp4"), _item(1, "videos/long.mp4"), _item(2, "videos/broken.mp4"),
             _item(3, "videos/empty.mp4"), _item(4, "videos/nowhere.mp4"), _item(5, "videos/short.mp4")]
    ann = root / "ann.json"
    ann.write_text(json.dumps(items))
    return root, ann


def test_scan_keeps_readable_videos_and_counts_each_problem(corpus, capsys):
    root, ann = corpus
    out = root / "clean.json"
    assert curate.main(["scan", "--annotations", str(ann), "--video-root", str(root), "--out", str(out)]) == 0
    kept = [x["id"] for x in json.loads(out.read_text())]
    assert kept == ["s0", "s1", "s5"]
    text = capsys.readouterr().out
    assert "6 samples, kept 3, dropped 3" in text
    assert "missing video: 1" in text and "unreadable (empty): 1" in text
    assert "broken.mp4" in text  # the path of a corrupt file is logged


def test_duration_presets_and_explicit_limit(corpus, capsys):
    root, ann = corpus
    items = curate.load_items([ann])
    report = curate.filter_duration(items, [root], 3.0)
    assert [x["id"] for x in report.kept] == ["s0", "s5"]
    assert report.dropped["too long"] == 1
    # the presets are the paper's limits: 1 minute (LLaVA-Video-178K subsets), 5 minutes (Valley)
    assert curate.PRESETS == {"llava-video-178k": 60.0, "valley": 300.0}
    assert curate.main(["duration", "--annotations", str(ann), "--video-root", str(root), "--preset", "valley",
                        "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["kept"] == 3 and summary["dropped"]["missing video"] == 1
    assert curate.main(["duration", "--annotations", str(ann)]) == 2  # neither preset nor limit


@pytest.mark.parametrize("text, reason", [
    ("The video was filmed in 2019 during the summer.", "filming time"),
    ("This footage was recorded on a winter evening.", "filming time"),
    ("The camera angle is low, looking up at the tower.", "camera angle"),
    ("An aerial shot of a river.", "camera angle"),
    ("This was recorded in Paris, France.", "geographic location"),
    ("A man rides a bike down a street.", None),
    ("The red square disappears, then the blue circle moves left.", None),
    ("The video is set in the kitchen.", None),  # lower-case: a room, not a place name
])
def test_caption_filter_reasons(text, reason):
    assert curate.caption_problem(text) == reason


def test_caption_filter_reads_only_answers(tmp_path, capsys):
    items = [_item(0, "v.mp4"), _item(1, "v.mp4", "Shot in Tokyo, this clip shows a crowd."),
             {**_item(2, "v.mp4"), "conversations": [{"from": "human", "value": "Where was it filmed in Rome?"},
                                                     {"from": "gpt", "value": "A fountain."}]}]
    ann = tmp_path / "a.json"
    ann.write_text(json.dumps(items))
    out = tmp_path / "kept.json"
    assert curate.main(["captions", "--annotations", str(ann), "--out", str(out)]) == 0
    assert [x["id"] for x in json.loads(out.read_text())] == ["s0", "s2"]
    assert "geographic location: 1" in capsys.readouterr().out


def test_unreadable_annotation_file_is_one_line(tmp_path, capsys):
    assert curate.main(["captions", "--annotations", str(tmp_path / "nope.json")]) == 2
    assert capsys.readouterr().err.count("\n") == 1
