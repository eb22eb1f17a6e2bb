"""python -m train.diagnose on a tiny checkpoint: the video-use gap and the open-ended check run and report."""

from __future__ import annotations

import json
import shutil

import pytest

from tests.videos import make_moving_square_frames, write_video
from train import diagnose


@pytest.fixture(scope="module")
def mc_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("diag")
    items = []
    for i in range(3):
        write_video(root / f"v{i}.mp4", make_moving_square_frames(12 + 10 * i, 48, 48), fps=6)  # different motion
        items.append({"id": f"q{i}", "video": f"v{i}.mp4", "question": "What moves?", "type": "shape",
                      "options": ["A. A square", "B. A circle"], "answer": "A"})
    (root / "mc.json").write_text(json.dumps(items))
    return root / "mc.json"


def test_gap_compares_own_other_and_no_video(tiny_checkpoints, mc_set, capsys):
    assert diagnose.main(["gap", "--model", str(tiny_checkpoints["group"]), "--annotations", str(mc_set)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["samples"] == 3
    assert out["right_video"] > 0 and out["wrong_video"] > 0 and out["zero_features"] > 0
    assert out["right_video"] != out["zero_features"]  # the random connector's tokens do depend on the video
    assert 0 < out["video_dependent_share"] < 1


def test_open_ended_scores_by_option_text(tiny_checkpoints, mc_set, capsys):
    assert diagnose.main(["open", "--model", str(tiny_checkpoints["naive"]), "--data", str(mc_set)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert 0 <= out["accuracy"] <= 1 and out["per_type"]["shape"].endswith("/3")


def test_missing_video_is_one_line(tiny_checkpoints, mc_set, tmp_path, capsys):
    shutil.copy(mc_set, tmp_path / "mc.json")  # the videos are not beside this copy
    assert diagnose.main(["open", "--model", str(tiny_checkpoints["naive"]), "--data",
                          str(tmp_path / "mc.json")]) == 2
    assert capsys.readouterr().err.startswith("error: ")
