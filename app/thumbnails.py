"""The preview's thumbnails as files, each written whole before anyone can read it.

Gradio 6 caches an image array an endpoint returns by writing it in place under its content hash. Two sessions
previewing the same video write the same file at once, and one truncated it while the server was sending it to the
other: that client read 0 of the bytes it was promised (seen in the load test). A path is copied into Gradio's cache
under a temporary name and renamed, so the preview hands Gradio paths, written the same way here.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import threading
from pathlib import Path

import numpy as np

KEEP_FILES = 4096  # about 10 KB each: the store stays under ~40 MB however many videos are previewed


class ThumbnailStore:
    """Content-addressed WebP files in one folder (a picture shown twice is one file), the oldest removed past
    `keep` files."""

    def __init__(self, folder: Path, keep: int = KEEP_FILES):
        self.folder, self.keep = Path(folder), keep
        self.folder.mkdir(parents=True, exist_ok=True)
        self._prune = threading.Lock()

    def path(self, frame: np.ndarray) -> str:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="WEBP")
        data = buf.getvalue()
        path = self.folder / f"{hashlib.sha256(data).hexdigest()[:32]}.webp"
        try:
            os.utime(path)  # shown again: the newest, the last to be removed
            return str(path)
        except FileNotFoundError:  # new, or pruned a moment ago
            pass
        fd, staging = tempfile.mkstemp(dir=self.folder, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(staging, path)
        finally:
            Path(staging).unlink(missing_ok=True)
        return str(path)

    def paths(self, frames: list[tuple[np.ndarray, str]]) -> list[tuple[str, str]]:
        """(thumbnail, caption) pairs as (file path, caption)."""
        out = [(self.path(frame), caption) for frame, caption in frames]
        self.prune()
        return out

    def prune(self) -> None:
        with self._prune:
            dated = []
            for entry in os.scandir(self.folder):
                try:
                    if entry.name.endswith(".webp"):
                        dated.append((entry.stat().st_mtime, entry.path))
                except FileNotFoundError:  # replaced or removed meanwhile
                    continue
            if len(dated) <= self.keep:
                return
            dated.sort()
            for _, path in dated[:len(dated) - self.keep * 3 // 4]:
                Path(path).unlink(missing_ok=True)
