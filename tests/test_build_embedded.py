"""The one-command rebuild of the embedded models, in smoke mode (a tiny world, minimal budgets). Slow: about
3 minutes on 2 cores, so it runs with `-m slow`, not in CI."""

from __future__ import annotations

import json

import pytest

from train.build_embedded import build
from vidlmm.checkpoint import load_model


@pytest.mark.slow
def test_smoke_rebuild_writes_loadable_models_and_a_table(tmp_path):
    summary = build(tmp_path / "models", tmp_path / "work", seed=0, smoke=True, progress=False,
                    heldout=tmp_path / "heldout")
    for name in ("group", "naive", "image"):
        model = load_model(tmp_path / "models" / name)
        assert model.config.video_sampling == {"mode": "uniform", "num_frames": 16}
        assert summary["results"][name]["n"] > 0
    table = (tmp_path / "models" / "results.md").read_text()
    assert table.startswith("| model | overall | static | temporal | chance |")
    assert json.loads((tmp_path / "models" / "results.json").read_text())["smoke"] is True
    items = json.loads((tmp_path / "heldout" / "eval_mc.json").read_text())
    assert all((tmp_path / "heldout" / item["video"]).is_file() for item in items)
    # a second run finds every phase done: nothing is retrained, the recorded phase times are reused
    state = json.loads((tmp_path / "work" / "build_state.json").read_text())
    again = build(tmp_path / "models", tmp_path / "work", seed=0, smoke=True, progress=False)
    for phase in ("world", "stage0", "train_group", "train_naive", "train_image"):
        assert again["timings_s"][phase] == state["phases"][phase]
