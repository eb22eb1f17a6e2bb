"""The default model when none is named: $VIDLMM_MODEL, else the embedded group model, else the tiny stand-in.

This checkout ships the embedded models, so the CLI and app tests never reach the stand-in; here the embedded
folder is pointed at an empty place to run that path as a fresh install without built models would.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from vidlmm import defaults
from vidlmm.checkpoint import load_model
from vidlmm.connectors import GroupResampler
from vidlmm.pipeline import GenerationSettings, VideoLMM

STAND_IN = "tiny-random-group-v1"


@pytest.fixture
def no_embedded(tmp_path, monkeypatch):
    """No embedded model, no $VIDLMM_MODEL, an empty cache dir; returns the cache dir."""
    monkeypatch.setattr(defaults, "EMBEDDED_MODELS", tmp_path / "no-models")
    monkeypatch.setenv("VIDLMM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VIDLMM_MODEL", raising=False)
    return tmp_path / "cache"


def test_stand_in_is_written_once_and_answers(no_embedded, small_video, monkeypatch):
    """Without an embedded model the default is the stand-in, written atomically into the cache dir (no temporary
    folder left), reused as is on the next call, and a working group-resampler model with its uniform-16
    sampling."""
    import vidlmm.tiny

    source, trained = defaults.default_model()
    assert (Path(source), trained) == (no_embedded / STAND_IN, False)
    assert sorted(p.name for p in no_embedded.iterdir()) == [STAND_IN]
    stamp = (Path(source) / "config.json").stat().st_mtime_ns

    def write_again(*args, **kwargs):
        raise AssertionError("the stand-in was written a second time")

    monkeypatch.setattr(vidlmm.tiny, "write_tiny_checkpoint", write_again)
    assert defaults.default_model() == (source, False)
    assert (Path(source) / "config.json").stat().st_mtime_ns == stamp  # not rewritten
    model = load_model(source)
    assert isinstance(model.connector, GroupResampler)
    answer = VideoLMM(model).ask(small_video, "What moves?", generation=GenerationSettings(max_new_tokens=3))
    assert len(answer.frame_indices) == 16 and answer.num_visual_tokens == 64
    assert 1 <= len(answer.token_ids) <= 3


def test_named_and_embedded_models_come_first(no_embedded, monkeypatch, tmp_path):
    """$VIDLMM_MODEL wins over everything; an embedded group model (a folder with config.json) over the stand-in;
    neither writes the stand-in."""
    embedded = tmp_path / "no-models" / "group"
    embedded.mkdir(parents=True)
    (embedded / "config.json").write_text("{}")
    assert defaults.default_model() == (str(embedded), True)
    monkeypatch.setenv("VIDLMM_MODEL", "org/some-model")
    assert defaults.default_model() == ("org/some-model", True)
    assert not no_embedded.exists()


def test_stand_in_race_lost_to_another_process(no_embedded, monkeypatch):
    """Two processes writing the stand-in at once: the one whose rename fails because the other's folder is
    already there uses that folder and removes its own temporary copy."""
    import vidlmm.tiny

    write = vidlmm.tiny.write_tiny_checkpoint

    def write_then_lose(folder, *args, **kwargs):
        out = write(folder, *args, **kwargs)
        winner = no_embedded / STAND_IN  # the other process finishes first
        winner.mkdir()
        (winner / "config.json").write_text(json.dumps({"written_by": "the other process"}))
        (winner / "other").write_text("x")  # a non-empty folder: os.replace onto it fails
        return out

    monkeypatch.setattr(vidlmm.tiny, "write_tiny_checkpoint", write_then_lose)
    source, trained = defaults.default_model()
    assert (Path(source), trained) == (no_embedded / STAND_IN, False)
    assert json.loads((Path(source) / "config.json").read_text()) == {"written_by": "the other process"}
    assert sorted(os.listdir(no_embedded)) == [STAND_IN]  # the temporary folder is gone


def test_cli_without_model_uses_the_stand_in_and_says_so(no_embedded, small_video, capsys):
    """`python -m vidlmm ask` with no --model: the stand-in answers and stderr carries one note saying so."""
    from vidlmm.cli import main

    code = main(["ask", "--video", small_video, "--question", "What moves?", "--num-frames", "4",
                 "--max-new-tokens", "3", "--json"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert err.startswith("note: using a tiny random-weight stand-in model") and err.count("\n") == 1
    result = json.loads(out)
    assert len(result["frame_indices"]) == 4 and result["num_visual_tokens"] == 64
    assert (no_embedded / STAND_IN / "config.json").is_file()


def test_app_without_model_offers_the_stand_in_labelled_as_such(no_embedded, tmp_path):
    """The app's service takes the same default: the stand-in, first in the model list, labelled meaningless,
    and loadable through the model pool."""
    from app.config import AppConfig
    from app.service import Service

    service = Service(AppConfig(models_dir=str(tmp_path / "no-models"), hub_models=False, preload=False,
                                model_memory_mb=256))
    assert (Path(service.default_source), service.default_trained) == (no_embedded / STAND_IN, False)
    first = service.choices[0]
    assert first.source == service.default_source and "random stand-in" in first.label
    assert len(service.choices) == 1  # nothing embedded, no hub models
    loaded = service.model(None)
    assert not loaded.trained and isinstance(loaded.lmm.model.connector, GroupResampler)
