"""Errors a user can cause. Each carries one human sentence; callers print it, never a traceback."""

from __future__ import annotations


class VidlmmError(Exception):
    """Base class: ``str(err)`` is a single line meant for the user."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))  # force one line


class VideoReadError(VidlmmError):
    """A video could not be read.

    ``kind`` is one of: ``missing`` (no such path), ``not_a_file`` (a directory, FIFO, device...),
    ``empty`` (zero bytes), ``not_a_video`` (no decoder recognises it), ``no_video_stream`` (a container
    with audio only), ``no_frames`` (opens, but no frame decodes), ``too_long`` (over a configured limit).
    """

    def __init__(self, kind: str, message: str, path: str | None = None):
        super().__init__(message)
        self.kind = kind
        self.path = path


class CheckpointError(VidlmmError):
    """A checkpoint folder or hub id cannot be loaded (missing files, wrong keys, unknown connector...)."""
