"""Helpers for tests (and benchmarks) that need small synthetic videos on disk.

Stable API, used by several test files:

* ``make_moving_square_frames(T, H, W, seed=0, noise=0) -> uint8 [T, H, W, 3]`` RGB frames.
* ``iter_moving_square_frames(...)`` the same, one ``[H, W, 3]`` frame at a time (for big clips).
* ``square_box(t, T, H, W) -> (x0, y0, side)`` where the white square of frame ``t`` is, in pixels.
* ``index_level(t, T) -> int`` the blue background level (0..255) that encodes frame ``t``.
* ``locate_square(frame) -> int`` left edge x0 of the white square found in a decoded RGB frame.
* ``write_video(path, frames, fps, fourcc="mp4v") -> path`` writes RGB frames with OpenCV
  (``mp4v`` -> .mp4, ``MJPG`` -> .avi, ``VP80``/``VP90`` -> .webm).
* ``write_gif(path, frames, fps) -> path`` animated GIF with Pillow.
* ``write_audio_only(path, seconds=1.0) -> path`` an audio-only container with PyAV
  (raises ``RuntimeError`` if this PyAV build cannot encode audio; callers skip then).

Frame content: a dark background whose blue channel encodes the frame index (``index_level``), plus a
white square moving left to right (``square_box``), so decoded frames can be checked for the right
index and position even after lossy compression.
"""

from __future__ import annotations

import os
from typing import Iterable, Iterator

import numpy as np


def index_level(t: int, T: int) -> int:
    """Blue background level (0..255) of frame ``t`` of ``T``: 20 at the first frame, 220 at the last."""
    return 20 + (200 * t) // max(T - 1, 1)


def square_box(t: int, T: int, H: int, W: int) -> tuple[int, int, int]:
    """``(x0, y0, side)`` in pixels of the white square in frame ``t``; it moves 2 px per frame, wrapping."""
    side = max(2, min(H, W) // 4)
    span = max(W - side + 1, 1)
    x0 = (2 * t) % span
    y0 = (H - side) // 2
    return x0, y0, side


def locate_square(frame: np.ndarray) -> int:
    """Left edge (px) of the white square in a decoded RGB uint8 ``[H, W, 3]`` frame (-1 if none is found).

    Uses the red channel (background 30, square 255), so it is robust to lossy codecs; the square moves
    2 px per frame, so an off-by-one frame shows up as a 2 px shift.
    """
    bright = frame[..., 0].astype(np.float32).max(axis=0) > 140  # any row bright in this column
    cols = np.flatnonzero(bright)
    return int(cols[0]) if cols.size else -1


def iter_moving_square_frames(T: int, H: int, W: int, seed: int = 0, noise: int = 0) -> Iterator[np.ndarray]:
    """Yield ``T`` RGB uint8 frames ``[H, W, 3]``; ``noise`` > 0 adds fresh per-frame noise of that amplitude
    (makes the clip hard to compress, e.g. for benchmarks)."""
    rng = np.random.default_rng(seed)
    for t in range(T):
        frame = np.empty((H, W, 3), np.uint8)
        frame[..., 0] = 30
        frame[..., 1] = 40
        frame[..., 2] = index_level(t, T)
        x0, y0, side = square_box(t, T, H, W)
        frame[y0:y0 + side, x0:x0 + side] = 255
        if noise > 0:
            jitter = rng.integers(-noise, noise + 1, size=(H, W, 3), dtype=np.int16)
            frame = np.clip(frame.astype(np.int16) + jitter, 0, 255).astype(np.uint8)
        yield frame


def make_moving_square_frames(T: int, H: int, W: int, seed: int = 0, noise: int = 0) -> np.ndarray:
    """All ``T`` frames of ``iter_moving_square_frames`` stacked: uint8 ``[T, H, W, 3]`` RGB."""
    return np.stack(list(iter_moving_square_frames(T, H, W, seed=seed, noise=noise)))


def write_video(path, frames: np.ndarray | Iterable[np.ndarray], fps: float, fourcc: str = "mp4v") -> str:
    """Write RGB uint8 frames (``[T, H, W, 3]`` array or an iterable of ``[H, W, 3]``) with OpenCV.

    Returns ``str(path)``. Raises ``RuntimeError`` if OpenCV cannot open a writer for this fourcc.
    """
    import cv2

    path = str(path)
    writer = None
    count = 0
    try:
        for frame in frames:
            frame = np.ascontiguousarray(frame, dtype=np.uint8)
            if writer is None:
                h, w = frame.shape[:2]
                writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*fourcc), float(fps), (w, h))
                if not writer.isOpened():
                    raise RuntimeError(f"OpenCV cannot write {fourcc!r} to {os.path.basename(path)}")
            writer.write(cv2.cvtColor(frame, cv2.COLOR_RGB2BGR))
            count += 1
    finally:
        if writer is not None:
            writer.release()
    if count == 0:
        raise ValueError("write_video needs at least one frame")
    return path


def write_gif(path, frames: np.ndarray, fps: float) -> str:
    """Write an animated GIF (looping) from RGB uint8 ``[T, H, W, 3]`` with Pillow; returns ``str(path)``."""
    from PIL import Image

    images = [Image.fromarray(np.asarray(f, np.uint8)) for f in frames]
    images[0].save(str(path), save_all=True, append_images=images[1:], duration=int(round(1000 / fps)), loop=0)
    return str(path)


def write_audio_only(path, seconds: float = 1.0, rate: int = 16000) -> str:
    """Write a container holding one audio stream (a sine tone) and no video, with PyAV.

    The container format follows the extension (e.g. ``.mp4`` with AAC, ``.wav`` with PCM). Raises
    ``RuntimeError`` if no usable audio encoder exists in this PyAV build.
    """
    import av

    path = str(path)
    codec = "pcm_s16le" if path.endswith(".wav") else "aac"
    try:
        with av.open(path, "w") as out:
            stream = out.add_stream(codec, rate=rate)
            stream.layout = "mono"
            n = int(seconds * rate)
            tone = (0.2 * np.sin(2 * np.pi * 440 * np.arange(n) / rate) * 32767).astype(np.int16)
            chunk = 1024
            for start in range(0, n, chunk):
                piece = tone[start:start + chunk].reshape(1, -1)
                frame = av.AudioFrame.from_ndarray(piece, format="s16", layout="mono")
                frame.sample_rate = rate
                for packet in stream.encode(frame):
                    out.mux(packet)
            for packet in stream.encode(None):
                out.mux(packet)
    except Exception as exc:  # noqa: BLE001 - any encoder problem means "cannot make one here"
        raise RuntimeError(f"cannot write an audio-only file with PyAV: {exc}") from exc
    return path
