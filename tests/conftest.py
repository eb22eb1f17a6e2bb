"""Shared fixtures: tiny checkpoints in the published layout and small videos, built offline in seconds."""

from __future__ import annotations

import os

for _key, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
                     "MPLBACKEND": "Agg", "TRANSFORMERS_VERBOSITY": "error"}.items():
    os.environ.setdefault(_key, _value)

import json  # noqa: E402

import pytest  # noqa: E402

from tests.videos import make_moving_square_frames, write_video  # noqa: E402

from vidlmm.tiny import write_tiny_checkpoint  # noqa: E402
from vidlmm.decoders import import_decord  # noqa: E402

# decord loaded the way vidlmm loads it (its FFmpeg kept out of the global symbol scope), before any test or the
# parity reference imports it directly: loaded globally, it breaks every later libvpx encoder in the process
# (OpenCV's VP80 writer in tests/videos.py), so test files would pass or fail by the order they run in
try:
    import_decord()
except ImportError:  # decord is optional: read_video falls back to PyAV / OpenCV
    pass


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Folders of tiny checkpoints: group (sharded), naive, legacy `resamplerwithpe`, image-level, split layout.

    A larger init range makes the random LLM's greedy output vary, so id-parity tests compare real sequences.
    """
    root = tmp_path_factory.mktemp("ckpt")
    out = {
        "group": write_tiny_checkpoint(root / "group", "groupresampler", seed=1, num_queries=64, group=4,
                                       max_shard_bytes=300_000, initializer_range=0.4),
        "naive": write_tiny_checkpoint(root / "naive", "naiveresampler", seed=2, num_queries=32,
                                       initializer_range=0.4),
        "image": write_tiny_checkpoint(root / "image", "resampler", seed=3, num_queries=4, initializer_range=0.4),
        "split": write_tiny_checkpoint(root / "split", "groupresampler", seed=4, layout="split", num_queries=16,
                                       group=4),
    }
    legacy = write_tiny_checkpoint(root / "legacy", "naiveresampler", seed=5, num_queries=32, initializer_range=0.4)
    config = json.loads((legacy / "config.json").read_text())
    config["connector_type"] = "resamplerwithpe"
    (legacy / "config.json").write_text(json.dumps(config))
    out["legacy"] = legacy
    return out


@pytest.fixture(scope="session")
def small_video(tmp_path_factory):
    """A 3 s, 10 fps, 96x72 mp4 with a moving square (30 frames)."""
    path = tmp_path_factory.mktemp("video") / "square.mp4"
    return write_video(path, make_moving_square_frames(30, 72, 96, seed=0), fps=10)
