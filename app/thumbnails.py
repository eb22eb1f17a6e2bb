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
from pathlib import Path

import numpy as np

KEEP_FILES = 4096  # about 10 KB each: the store stays under ~40 MB however many videos are previewed


class ThumbnailStore:
    """Content-addressed WebP files in one folder (a picture shown twice is one file), the oldest removed past
    `keep` files."""

    def __init__(self, folder: Path, keep: int = KEEP_FILES):
        self.folder, self.keep = Path(folder), keep
        self.folder.mkdir(parents=True, exist_ok=True)

    def path(self, frame: np.ndarray) -> str:
        from PIL import Image

        buf = io.BytesIO()
        Image.fromarray(frame).save(buf, format="WEBP")
        data = buf.getvalue()
        path = self.folder / f"{hashlib.sha256(data).hexdigest()[:32]}.webp"
        if path.exists():
            os.utime(path)  # shown again: the newest, the last to be removed
        else:
            fd, staging = tempfile.mkstemp(dir=self.folder, suffix=".part")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(staging, path)
        return str(path)

    def paths(self, frames: list[tuple[np.ndarray, str]]) -> list[tuple[str, str]]:
        """(thumbnail, caption) pairs as (file path, caption)."""
        out = [(self.path(frame), caption) for frame, caption in frames]
        self.prune()
        return out

    def prune(self) -> None:
        entries = [e for e in os.scandir(self.folder) if e.name.endswith(".webp")]
        if len(entries) <= self.keep:
            return
        entries.sort(key=lambda e: e.stat().st_mtime)
        for entry in entries[:len(entries) - self.keep * 3 // 4]:
            Path(entry.path).unlink(missing_ok=True)
