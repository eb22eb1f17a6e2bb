"""Where the embedded default model lives, and the stand-in used until it is built.

The app and the CLI use `assets/models/group` (trained by `train/` on the synthetic world) when it exists.
Before that, a tiny random-weight checkpoint in the published layout is written once to the user's cache
dir, so every command works offline; it answers nonsense, and says so on stderr.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

ASSETS = Path(__file__).resolve().parent.parent / "assets"
EMBEDDED_MODELS = ASSETS / "models"
DEFAULT_CONNECTOR = "group"


def cache_dir() -> Path:
    return Path(os.environ.get("VIDLMM_CACHE_DIR", Path.home() / ".cache" / "vidlmm"))


def embedded_model(name: str = DEFAULT_CONNECTOR) -> Path | None:
    folder = EMBEDDED_MODELS / name
    return folder if (folder / "config.json").is_file() else None


def tiny_random_model() -> Path:
    """A tiny random group-resampler checkpoint, written atomically on first use."""
    folder = cache_dir() / "tiny-random-group-v1"
    if (folder / "config.json").is_file():
        return folder
    from .tiny import write_tiny_checkpoint

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    try:
        write_tiny_checkpoint(tmp, "groupresampler", seed=0, num_queries=64, group=4,
                              video_sampling={"mode": "uniform", "num_frames": 16})
        try:
            os.replace(tmp, folder)
        except OSError:  # another process won the race and wrote the same files
            if not (folder / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def default_model() -> tuple[str, bool]:
    """(folder or hub id, is_trained): $VIDLMM_MODEL, else the embedded group model, else the tiny stand-in."""
    if os.environ.get("VIDLMM_MODEL"):
        return os.environ["VIDLMM_MODEL"], True
    embedded = embedded_model()
    if embedded is not None:
        return str(embedded), True
    return str(tiny_random_model()), False
