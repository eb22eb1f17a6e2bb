"""Video loading: pick frame indices like the reference, then decode only those frames.

The reference (pytorchvideo's decord wrapper) decodes every frame of the clip to float32 and subsamples
afterwards. We compute the same indices from the frame count and fps, and ask the decoder for just those
frames, one at a time, as uint8 RGB. Memory follows what the caller keeps, not the source: a ``transform``
(the tower's resize, a thumbnail) runs on each frame as it is decoded, a frame sampled twice is decoded and
stored once (``VideoClip.frame_map``), and a pixel-count limit is checked from the container before decoding.

Backends (:mod:`vidlmm.decoders`), tried in this order by ``backend="auto"``: decord (by path; its frame count
and average fps are the reference's ground truth), PyAV, OpenCV. Decoder libraries are imported lazily. Every
failure the user can cause ends as a one-line :class:`~vidlmm.errors.VideoReadError`.
"""

from __future__ import annotations

import importlib
import math
import os
import stat
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np

from vidlmm.decoders import (BACKENDS, DecoderFailure, FrameFolder, backend_order, import_decord, open_first,
                             quiet_stderr, sniff)
from vidlmm.errors import VideoReadError

__all__ = ["BACKENDS", "CHUNK_BYTES", "MAX_PIXELS", "FrameSampling", "ReadLimits", "TransformError", "VideoClip",
           "check_video_path", "frame_size", "import_decord", "probe_video", "read_video", "sample_frame_indices"]
MAX_PIXELS = 4096 * 2160  # DCI 4K: the default largest frame read_video decodes (UHD 3840x2160 fits)
CHUNK_BYTES = 64 << 20  # full-size frames a backend may hold at once before the transform shrinks them


@dataclass(frozen=True)
class FrameSampling:
    """Which frames to take from a clip.

    ``mode``: ``"uniform"`` (``num_frames`` evenly spread, endpoints included), ``"fps"`` (the reference's
    "1fps": ``floor(duration_s)`` frames evenly spread, capped at ``max_frames``) or ``"rate"`` (one frame
    every ``1/rate`` seconds from t=0, capped at ``max_frames``).

    ``start`` / ``end``: a window in seconds (MVBench's bounded questions). Uniform sampling then follows
    MVBench's loader: the window's frames split into ``num_frames`` equal segments and the middle frame of each
    taken; the other modes sample the window as if it were the clip. ``folder_fps``: the frame rate of a folder
    of frame images, which has none of its own.
    """

    mode: str = "uniform"
    num_frames: int = 16
    max_frames: int = 64
    rate: float = 1.0
    start: float | None = None
    end: float | None = None
    folder_fps: float | None = None

    def __post_init__(self):
        if self.mode not in ("uniform", "fps", "rate"):
            raise ValueError(f"unknown frame sampling mode {self.mode!r} (use uniform, fps or rate)")
        if self.num_frames < 1 or self.max_frames < 1:
            raise ValueError("num_frames and max_frames must be at least 1")
        if not (self.rate > 0 and math.isfinite(self.rate)):
            raise ValueError("rate must be a positive number of frames per second")

    @classmethod
    def uniform(cls, num_frames: int = 16) -> "FrameSampling":
        return cls(mode="uniform", num_frames=num_frames)

    @classmethod
    def fps(cls, max_frames: int = 64) -> "FrameSampling":
        return cls(mode="fps", max_frames=max_frames)

    @classmethod
    def at_rate(cls, rate: float = 1.0, max_frames: int = 64) -> "FrameSampling":
        return cls(mode="rate", rate=float(rate), max_frames=max_frames)

    @classmethod
    def from_dict(cls, spec: dict | None) -> "FrameSampling":
        """From a config dict like {"mode": "fps", "max_frames": 64} (a checkpoint's `video_sampling`, a training
        recipe's `sampling`). max_frames 0 means uncapped, as the reference trains in fps mode."""
        spec = spec or {}
        mode = spec.get("mode", "uniform")
        if mode == "uniform":
            return cls.uniform(int(spec.get("num_frames", 16)))
        cap = int(spec.get("max_frames", 64)) or 10**6
        if mode == "fps":
            return cls.fps(cap)
        return cls.at_rate(float(spec.get("rate", 1.0)), cap)

    @classmethod
    def from_reference(cls, num_frame: int, max_frame: int = 64) -> "FrameSampling":
        """The reference's CLI convention: ``num_frame > 0`` is uniform, ``num_frame <= 0`` is fps mode."""
        return cls.uniform(num_frame) if num_frame > 0 else cls.fps(max_frame)

    def max_frames_taken(self) -> int:
        """The most frames this sampling takes from any clip."""
        return self.num_frames if self.mode == "uniform" else self.max_frames

    def describe(self) -> str:
        if self.mode == "uniform":
            text = f"uniform {self.num_frames}"
        elif self.mode == "fps":
            text = f"fps (max {self.max_frames})"
        else:
            text = f"{self.rate:g} fps (max {self.max_frames})"
        if self.start is not None or self.end is not None:
            text += f" in [{self.start or 0:g}, {'end' if self.end is None else f'{self.end:g}'}] s"
        return text


@dataclass(frozen=True)
class ReadLimits:
    """What one read may cost (see `read_video`): pixels per frame, seconds of decoding, seconds of video.
    None: no limit."""

    max_pixels: int | None = MAX_PIXELS
    time_limit: float | None = None
    max_duration: float | None = None

    def kwargs(self) -> dict:
        return {"max_pixels": self.max_pixels, "time_limit": self.time_limit, "max_duration": self.max_duration}


def _linspace(total: int, n: int) -> np.ndarray:
    # the reference's np.linspace(0, total-1, n, dtype=int): truncation, endpoints kept, repeats allowed
    return np.linspace(0, total - 1, n).astype(np.int64)


def sample_frame_indices(total_frames: int, fps: float, sampling: FrameSampling) -> np.ndarray:
    """Source frame indices to take, int64 ``[T]`` (sorted, may repeat for short clips).

    ``total_frames`` >= 1; ``fps`` is the source's average frames per second (> 0).
    In ``rate`` mode, if one frame every ``1/rate`` s would exceed ``max_frames``, we instead take
    ``max_frames`` frames spread over the whole clip with the uniform formula (so long clips stay covered).
    """
    if total_frames < 1:
        raise ValueError("a video needs at least one frame")
    if sampling.start is not None or sampling.end is not None:
        return _window_indices(total_frames, fps, sampling)
    if sampling.mode == "uniform":
        return _linspace(total_frames, sampling.num_frames)
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be positive, got {fps}")
    duration = total_frames / fps
    if sampling.mode == "fps":
        return _linspace(total_frames, min(sampling.max_frames, max(1, int(duration))))
    n = max(1, math.ceil(duration * sampling.rate - 1e-9))  # count of t = k/rate with t < duration
    if n > sampling.max_frames:
        return _linspace(total_frames, sampling.max_frames)
    idx = np.floor(np.arange(n) * (fps / sampling.rate) + 1e-6).astype(np.int64)  # int(t*fps), float-safe
    return np.minimum(idx, total_frames - 1)


def _window_indices(total_frames: int, fps: float, sampling: FrameSampling) -> np.ndarray:
    """Frames of the [start, end] window (MVBench's `get_index`: the window's bounds rounded to frames and
    clamped to the clip; uniform: the middle frame of each of num_frames equal segments). A folder of frames
    (folder_fps set) is numbered from 1 there, as MVBench numbers its JPEGs; the result is 0-based either way."""
    if not (fps > 0 and math.isfinite(fps)):
        raise ValueError(f"fps must be positive, got {fps}")
    base = 1 if sampling.folder_fps else 0
    first = max(base, round((sampling.start or 0.0) * fps))
    last = total_frames - 1 + base
    last = last if sampling.end is None else min(round(sampling.end * fps), last)
    first = min(first, last)  # a window past the clip's end: its last frame
    if sampling.mode == "uniform":
        segment = (last - first) / sampling.num_frames
        picked = np.array([int(first + segment / 2 + np.round(segment * i)) for i in range(sampling.num_frames)],
                          dtype=np.int64)
    else:
        whole = FrameSampling(mode=sampling.mode, num_frames=sampling.num_frames, max_frames=sampling.max_frames,
                              rate=sampling.rate)
        picked = first + sample_frame_indices(last - first + 1, fps, whole)
    return picked - base


@dataclass
class VideoClip:
    """Decoded frames of one video.

    ``frames`` uint8 ``[U, h, w, 3]`` RGB: each distinct sampled frame once, as decoded or as the read's
    ``transform`` made it; ``frame_map`` int64 ``[T]``: which of ``frames`` each sampled position shows
    (``frames[frame_map]`` is the clip in sampling order; a short clip sampled at many frames repeats some);
    ``indices`` int64 ``[T]`` source frame indices; ``timestamps`` float64 ``[T]`` seconds (index / fps);
    ``fps`` source average fps; ``duration`` seconds (total_frames / fps, as the reference computes it);
    ``source_size`` (width, height) of the source frames in pixels.
    """

    frames: np.ndarray
    frame_map: np.ndarray
    indices: np.ndarray
    timestamps: np.ndarray
    fps: float
    duration: float
    total_frames: int
    backend: str
    path: str
    source_size: tuple[int, int] = (0, 0)

    @property
    def num_frames(self) -> int:
        """Sampled positions T (frames repeat for a clip shorter than the sampling)."""
        return len(self.frame_map)

    def frame(self, t: int) -> np.ndarray:
        """The frame at sampled position t, ``[h, w, 3]`` uint8 (no copy)."""
        return self.frames[self.frame_map[t]]

    def sampled_frames(self) -> np.ndarray:
        """``[T, h, w, 3]`` in sampling order: a copy, repeats included (for small frames only)."""
        return self.frames[self.frame_map]


class TransformError(Exception):
    """A read_video transform returned frames of the wrong type or of changing shapes (a bug, not a bad file)."""


def check_video_path(path: str) -> str:
    """Stat the path before any decoder sees it (a FIFO would block a decoder forever); returns basename."""
    name = os.path.basename(os.path.normpath(path)) or path
    head = f"Cannot read video '{name}':"
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise VideoReadError("missing", f"{head} no such file.", path) from None
    except OSError as exc:
        raise VideoReadError("missing", f"{head} the path cannot be accessed ({exc.strerror}).", path) from None
    if stat.S_ISDIR(st.st_mode):
        raise VideoReadError("not_a_file", f"{head} it is a directory, not a file.", path)
    if not stat.S_ISREG(st.st_mode):
        raise VideoReadError("not_a_file", f"{head} it is not a regular file (a pipe, socket or device).", path)
    if st.st_size == 0:
        raise VideoReadError("empty", f"{head} the file is empty (0 bytes).", path)
    if not os.access(path, os.R_OK):
        raise VideoReadError("not_a_file", f"{head} the file is not readable (permission denied).", path)
    return name


def _raise_best(path: str, name: str, fails: list[DecoderFailure]):
    best = max(fails, key=lambda f: f.rank)  # first of the most informative reasons
    reason = best.reason if best.rank > 0 or os.path.isdir(path) else sniff(path)
    raise VideoReadError(best.kind, f"Cannot read video '{name}': {reason}.", path)


def probe_video(path, *, backend: str = "auto") -> tuple[int, float, str]:
    """``(total_frames, fps, backend)`` of the first backend that opens the file, without decoding frames.

    (A backend that opens a file can still fail to decode it; :func:`read_video` then falls back.)
    """
    path = os.fspath(path)
    name, fails = check_video_path(path), []
    reader = open_first(path, backend, None, fails)
    if reader is None:
        _raise_best(path, name, fails)
    try:
        return reader.total, reader.fps, reader.name
    finally:
        reader.close()


def frame_size(path) -> tuple[int, int] | None:
    """``(width, height)`` of the video stream from the container's headers (PyAV, else OpenCV), without
    decoding a frame into our memory; None when neither can tell."""
    path = os.fspath(path)
    with quiet_stderr():
        try:
            av = importlib.import_module("av")
            with av.open(path) as container:
                if container.streams.video:
                    ctx = container.streams.video[0].codec_context
                    if ctx.width and ctx.height:
                        return int(ctx.width), int(ctx.height)
        except Exception:  # noqa: BLE001 - not readable by PyAV: ask OpenCV
            pass
        try:
            cv2 = importlib.import_module("cv2")
            cap = cv2.VideoCapture(path)
            try:
                w, h = int(cap.get(cv2.CAP_PROP_FRAME_WIDTH)), int(cap.get(cv2.CAP_PROP_FRAME_HEIGHT))
            finally:
                cap.release()
            if w > 0 and h > 0:
                return w, h
        except Exception:  # noqa: BLE001
            pass
    return None


def _too_large(name: str, path: str, width: int, height: int, max_pixels: int) -> VideoReadError:
    return VideoReadError("too_large", f"Cannot read video '{name}': its frames are {width}x{height} "
                          f"({width * height / 1e6:.1f} megapixels), over the {max_pixels / 1e6:.1f}-megapixel "
                          "limit.", path)


def read_video(path, sampling: FrameSampling = FrameSampling(), *, backend: str = "auto",
               size: tuple[int, int] | None = None, max_duration: float | None = None,
               transform: Callable[[np.ndarray], np.ndarray] | None = None,
               max_pixels: int | None = MAX_PIXELS, time_limit: float | None = None) -> VideoClip:
    """Decode the sampled frames of the video at ``path`` (opened by path, never from memory), or of a folder of
    numbered frame images at ``sampling.folder_fps``.

    ``backend``: ``"auto"`` (decord, then PyAV, then OpenCV) or one of them only. ``size=(W, H)`` has the
    decoder scale frames (its own resampling; previews); by default frames keep the source size.
    ``transform``: applied to each decoded ``[H, W, 3]`` uint8 frame as soon as it is decoded and must return
    a uint8 ``[h, w, 3]`` of one size for every frame (the tower's resize, a thumbnail), so at most a few
    full-size frames are alive at once. Each distinct frame is decoded and kept once (``VideoClip.frame_map``).
    Limits, each a one-sentence :class:`VideoReadError`: ``max_duration`` seconds of video and ``max_pixels``
    per frame (None: no limit), both checked from the container before decoding; ``time_limit`` seconds for
    the whole read, checked between frames (a decoder stuck inside one frame is not interrupted).
    """
    started = time.monotonic()
    path = os.fspath(path)
    folder = os.path.isdir(path)  # a folder of numbered frames at sampling.folder_fps
    name = os.path.basename(os.path.normpath(path)) if folder else check_video_path(path)
    if size is not None:
        size = (int(size[0]), int(size[1]))
        if min(size) < 1:
            raise ValueError(f"size must be (width, height) >= 1, got {size}")
    fails: list[DecoderFailure] = []
    frames_reader = None
    if folder:
        try:
            frames_reader = FrameFolder(path, size, sampling.folder_fps)
        except DecoderFailure as fail:
            raise VideoReadError(fail.kind, f"Cannot read video '{name}': {fail.reason}.", path) from None
    source = frames_reader.first_size() if folder else frame_size(path)
    if max_pixels is not None and source is not None and source[0] * source[1] > max_pixels:
        raise _too_large(name, path, *source, max_pixels)

    def check_time():
        if time_limit is not None and time.monotonic() - started > time_limit:
            raise VideoReadError("too_slow", f"Cannot read video '{name}': decoding it takes longer than the "
                                 f"{time_limit:g} s limit.", path)

    for which in ("frames",) if folder else backend_order(backend):
        reader = frames_reader if folder else open_first(path, which, size, fails)
        if reader is None:
            continue
        try:
            check_time()
            duration = reader.total / reader.fps
            if max_duration is not None and duration > max_duration:
                raise VideoReadError("too_long", f"Cannot read video '{name}': it lasts {duration:.0f} s, "
                                     f"longer than the {max_duration:g} s limit.", path)
            indices = sample_frame_indices(reader.total, reader.fps, sampling)
            unique, frame_map = np.unique(indices, return_inverse=True)
            frames, decoded_size = _decode(reader, unique, size, source, transform, max_pixels, check_time,
                                           lambda w, h: _too_large(name, path, w, h, max_pixels))
        except DecoderFailure as fail:
            fails.append(fail)
            continue
        except (ValueError, RuntimeError, OSError, MemoryError, TypeError, IndexError) as exc:
            fails.append(DecoderFailure("no_frames", f"{which} failed while decoding ({type(exc).__name__})"))
            continue
        finally:
            reader.close()
        return VideoClip(frames=frames, frame_map=frame_map.reshape(-1).astype(np.int64), indices=indices,
                         timestamps=indices / reader.fps, fps=reader.fps, duration=duration,
                         total_frames=reader.total, backend=which, path=path, source_size=source or decoded_size)
    _raise_best(path, name, fails)


def _decode(reader, unique: np.ndarray, size, source, transform, max_pixels, check_time, too_large):
    """The distinct frames ``[U, h, w, 3]`` (transformed as each arrives) and the decoded frames' (W, H)."""
    expect_hw = (size[1], size[0]) if size else None  # decord returns wrong shapes silently for small widths
    w_h = size or source
    per_call = max(1, CHUNK_BYTES // (3 * w_h[0] * w_h[1])) if w_h else 1
    out, decoded_size, count = None, None, 0
    with quiet_stderr():
        for frame in reader.frames(unique, per_call):
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise DecoderFailure("no_frames", f"{reader.name} returned a frame of an unexpected shape "
                                     f"{frame.shape}", 1)
            h, w = frame.shape[:2]
            if max_pixels is not None and h * w > max_pixels:  # the headers said less (or nothing)
                raise too_large(w, h)
            if expect_hw is not None and (h, w) != expect_hw:
                raise DecoderFailure("no_frames", f"{reader.name} returned frames of an unexpected shape "
                                     f"{frame.shape}", 1)
            if decoded_size is None:
                decoded_size = (w, h)
            elif decoded_size != (w, h):  # a mid-stream size change: nothing downstream expects it
                raise DecoderFailure("no_frames", f"{reader.name} returned frames of two sizes", 1)
            view = transform(frame) if transform is not None else frame
            if out is None:
                out = np.empty((len(unique), *view.shape), np.uint8)
            if view.dtype != np.uint8 or view.shape != out.shape[1:]:  # a caller's bug: not caught as a bad file
                raise TransformError(f"transform must return uint8 frames of one shape, got {view.dtype} "
                                     f"{view.shape}")
            out[count] = view
            count += 1
            del frame, view
            check_time()
    if count != len(unique):
        raise DecoderFailure("no_frames", f"{reader.name} returned {count} of {len(unique)} frames", 1)
    return out, decoded_size
