"""Video loading: pick frame indices like the reference, then decode only those frames.

The reference (pytorchvideo's decord wrapper) decodes every frame of the clip to float32 and subsamples
afterwards. We compute the same indices from the frame count and fps, and ask the decoder for just those
frames, one at a time, as uint8 RGB. Memory follows what the caller keeps, not the source: a ``transform``
(the tower's resize, a thumbnail) runs on each frame as it is decoded, a frame sampled twice is decoded and
stored once (``VideoClip.frame_map``), and a pixel-count limit is checked from the container before decoding.

Backends, tried in this order by ``backend="auto"``: decord (by path; its frame count and average fps are
the reference's ground truth), PyAV, OpenCV. Decoder libraries are imported lazily. Every failure the
user can cause ends as a one-line :class:`~vidlmm.errors.VideoReadError`.
"""

from __future__ import annotations

import bisect
import contextlib
import importlib
import math
import os
import stat
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable, Iterator

import numpy as np

from vidlmm.errors import VideoReadError

BACKENDS = ("decord", "pyav", "opencv")
MAX_PIXELS = 4096 * 2160  # DCI 4K: the default largest frame read_video decodes (UHD 3840x2160 fits)
CHUNK_BYTES = 64 << 20  # full-size frames a backend may hold at once before the transform shrinks them


@dataclass(frozen=True)
class FrameSampling:
    """Which frames to take from a clip.

    ``mode``: ``"uniform"`` (``num_frames`` evenly spread, endpoints included), ``"fps"`` (the reference's
    "1fps": ``floor(duration_s)`` frames evenly spread, capped at ``max_frames``) or ``"rate"`` (one frame
    every ``1/rate`` seconds from t=0, capped at ``max_frames``).
    """

    mode: str = "uniform"
    num_frames: int = 16
    max_frames: int = 64
    rate: float = 1.0

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
            return f"uniform {self.num_frames}"
        if self.mode == "fps":
            return f"fps (max {self.max_frames})"
        return f"{self.rate:g} fps (max {self.max_frames})"


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


class _Fail(Exception):
    """A backend could not read the file; ``rank`` orders how informative ``reason`` is."""

    def __init__(self, kind: str, reason: str, rank: int = 0):
        super().__init__(reason)
        self.kind, self.reason, self.rank = kind, reason, rank


# --- keep decoders' own stderr lines (decord may echo file contents) out of the user's terminal -----------
_quiet_lock = threading.Lock()
_quiet_depth = 0
_saved_fd: int | None = None


@contextlib.contextmanager
def _quiet_stderr():
    global _quiet_depth, _saved_fd
    if os.environ.get("VIDLMM_DECODER_LOGS"):  # set to see the decoders' own messages
        yield
        return
    with _quiet_lock:
        if _quiet_depth == 0:
            try:
                sys.stderr.flush()
                _saved_fd = os.dup(2)
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 2)
                os.close(devnull)
            except (OSError, ValueError):
                _saved_fd = None
        _quiet_depth += 1
    try:
        yield
    finally:
        with _quiet_lock:
            _quiet_depth -= 1
            if _quiet_depth == 0 and _saved_fd is not None:
                os.dup2(_saved_fd, 2)
                os.close(_saved_fd)
                _saved_fd = None


def _sane_fps(fps) -> bool:
    return fps is not None and math.isfinite(float(fps)) and 0 < float(fps) <= 1000


_decord_import_lock = threading.Lock()


def _import_decord():
    """``import decord``, keeping decord's own FFmpeg out of the process's global symbol scope.

    decord loads ``libdecord.so`` with ``RTLD_GLOBAL``, and with it its bundled FFmpeg 4 and libvpx 6. libvpx's
    symbols are not versioned, so every FFmpeg user loaded after that (PyAV, OpenCV: each bundles its own
    FFmpeg and a newer libvpx) binds its VP8/VP9 encoders to decord's old libvpx, and they fail ("ABI version
    mismatch"): after one decode, ``write_clip``'s WebM fallbacks and OpenCV's VP80/VP90 writers no longer
    work in that process. decord's Python side finds its functions on its own library handle, so it works
    the same loaded ``RTLD_LOCAL``; `ctypes.RTLD_GLOBAL` is read when decord loads, so it is swapped for the
    length of the import (once per process)."""
    import ctypes

    with _decord_import_lock:
        if sys.modules.get("decord") is not None:
            return sys.modules["decord"]
        saved = ctypes.RTLD_GLOBAL
        ctypes.RTLD_GLOBAL = ctypes.RTLD_LOCAL
        try:
            return importlib.import_module("decord")
        finally:
            ctypes.RTLD_GLOBAL = saved


def _import_decoder(module: str, label: str):
    """Decoder libraries load lazily; a missing one is a backend failure like any other (the next is tried)."""
    try:
        return _import_decord() if module == "decord" else importlib.import_module(module)
    except ImportError as exc:
        raise _Fail("not_a_video", f"{label} is not installed") from exc


class _Decord:
    name = "decord"

    def __init__(self, path: str, size):
        decord = _import_decoder("decord", "decord")
        w, h = size if size else (-1, -1)
        try:
            self.vr = decord.VideoReader(path, ctx=decord.cpu(0), width=w, height=h)
            self.total, self.fps = len(self.vr), float(self.vr.get_avg_fps())
        except Exception as exc:  # noqa: BLE001 - decord raises several unrelated types
            if "cannot find video stream" in str(exc):
                raise _Fail("no_video_stream", "it has no video stream (audio only?)", 3) from exc
            raise _Fail("not_a_video", f"decord cannot open it ({type(exc).__name__})") from exc
        if self.total < 1 or not _sane_fps(self.fps):
            raise _Fail("no_frames", "decord finds no frames in it")

    def frames(self, unique: np.ndarray, per_call: int) -> Iterator[np.ndarray]:
        for start in range(0, len(unique), per_call):  # a few frames per call: decord seeks well in batches
            try:
                batch = self.vr.get_batch([int(i) for i in unique[start:start + per_call]])
            except Exception as exc:  # noqa: BLE001
                raise _Fail("no_frames", f"decord cannot decode its frames ({type(exc).__name__})", 1) from exc
            # a globally set decord bridge (e.g. torch) changes the return type
            batch = np.asarray(batch.asnumpy() if hasattr(batch, "asnumpy") else batch.cpu().numpy())
            for k in range(len(batch)):
                yield batch[k]
            del batch

    def close(self):
        self.vr = None


class _PyAV:
    name = "pyav"

    def __init__(self, path: str, size):
        av = _import_decoder("av", "PyAV")
        self.av, self.size = av, size
        try:
            self.container = av.open(path)
        except Exception as exc:  # noqa: BLE001
            raise _Fail("not_a_video", f"PyAV cannot open it ({type(exc).__name__})") from exc
        try:
            self._scan()
        except BaseException:
            self.container.close()
            raise

    def _scan(self):
        c = self.container
        fmt = c.format.name
        if not c.streams.video:
            if c.streams.audio:
                raise _Fail("no_video_stream", "it contains only audio, no video stream", 3)
            raise _Fail("not_a_video", "it contains no video stream", 2)
        if fmt.endswith("_pipe") or fmt == "image2":  # ffmpeg's single-image demuxers
            kind = fmt.replace("_pipe", "").upper()
            raise _Fail("not_a_video", f"it is a still image ({kind}), not a video", 2)
        self.stream = s = c.streams.video[0]
        # count frames by demuxing (no decoding): container metadata lies for truncated files, and the
        # packet timestamps map frame index -> pts exactly for seeking
        pts, keys = [], []
        try:
            for pkt in c.demux(s):
                if not pkt.size:
                    continue
                t = pkt.pts if pkt.pts is not None else pkt.dts
                if t is None:
                    raise _Fail("no_frames", "its video packets carry no timestamps", 1)
                pts.append(t)
                if pkt.is_keyframe:
                    keys.append(t)
        except self.av.error.FFmpegError:
            pass  # damaged tail: keep the packets read so far
        if not pts:
            raise _Fail("no_frames", "its video stream holds no frames", 2)
        self.pts, self.keys = sorted(pts), sorted(keys)
        self.total = len(self.pts)
        rate = s.average_rate or s.guessed_rate
        self.fps = float(rate) if rate and _sane_fps(float(rate)) else 0.0
        if not self.fps and self.total > 1 and s.time_base:  # no rate in the header: from the timestamps
            self.fps = (self.total - 1) / float((self.pts[-1] - self.pts[0]) * s.time_base)
        if not _sane_fps(self.fps):
            raise _Fail("no_frames", "it has no usable frame rate", 1)

    def _frames(self):
        for pkt in self.container.demux(self.stream):
            yield from pkt.decode()

    def frames(self, unique: np.ndarray, per_call: int) -> Iterator[np.ndarray]:
        it, last = None, None
        w, h = self.size if self.size else (None, None)
        try:
            for i in unique:
                target = self.pts[int(i)]
                # seek when not decoding yet, going backwards, or when a keyframe lies between here and the
                # target (decoding forward would pass through it anyway; seeking skips the frames before it)
                keyframe_ahead = it is not None and bisect.bisect_right(self.keys, target) > bisect.bisect_right(
                    self.keys, last)
                if it is None or target <= last or keyframe_ahead:
                    self.container.seek(target, stream=self.stream, backward=True, any_frame=False)
                    it = self._frames()
                for frame in it:
                    t = frame.pts if frame.pts is not None else frame.dts
                    if t is None:
                        raise _Fail("no_frames", "decoded frames carry no timestamps", 1)
                    last = t
                    if t >= target:
                        break
                else:
                    raise _Fail("no_frames", f"decoding stopped before frame {int(i)} of {self.total} "
                                "(the file is damaged or truncated)", 2)
                rgb = frame.to_ndarray(format="rgb24", width=w, height=h)
                yield rgb
        except self.av.error.FFmpegError as exc:
            raise _Fail("no_frames", f"its frames fail to decode ({type(exc).__name__}); "
                        "the file is damaged", 2) from exc

    def close(self):
        self.container.close()


class _OpenCV:
    name = "opencv"

    def __init__(self, path: str, size):
        cv2 = _import_decoder("cv2", "OpenCV")
        self.cv2, self.size = cv2, size
        self.cap = cv2.VideoCapture(path)
        if not self.cap.isOpened():
            raise _Fail("not_a_video", "OpenCV cannot open it")
        count = self.cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.fps = float(self.cap.get(cv2.CAP_PROP_FPS))
        # OpenCV "opens" still images with a frame count like -9.2e18: demand a plausible count and rate
        if not (1 <= count < 1e8 and _sane_fps(self.fps)):
            self.cap.release()
            raise _Fail("not_a_video", "OpenCV reports no plausible frame count or rate")
        self.total = int(count)

    def frames(self, unique: np.ndarray, per_call: int) -> Iterator[np.ndarray]:
        cv2, wanted = self.cv2, set(int(i) for i in unique)
        for pos in range(int(unique[-1]) + 1):  # sequential grab: exact frame positions, one frame in memory
            if not self.cap.grab():
                raise _Fail("no_frames", f"decoding stopped at frame {pos} of {self.total} "
                            "(the file is damaged or truncated)", 2 if pos else 1)
            if pos in wanted:
                ok, bgr = self.cap.retrieve()
                if not ok:
                    raise _Fail("no_frames", f"frame {pos} does not decode", 1)
                if self.size:
                    bgr = cv2.resize(bgr, tuple(self.size), interpolation=cv2.INTER_AREA)
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def close(self):
        self.cap.release()


_CLASSES = {"decord": _Decord, "pyav": _PyAV, "opencv": _OpenCV}


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


_SIGNATURES = ((4, b"ftyp", "an MP4/MOV"), (0, b"\x1a\x45\xdf\xa3", "a WebM/Matroska"), (8, b"AVI ", "an AVI"),
               (0, b"GIF8", "a GIF"), (0, b"\x00\x00\x01\xba", "an MPEG"), (0, b"OggS", "an Ogg"),
               (0, b"FLV", "an FLV"))


def _sniff(path: str) -> str:
    """Why no decoder could read it, judged from the first bytes."""
    with open(path, "rb") as fh:
        head = fh.read(512)
    for offset, magic, what in _SIGNATURES:
        if head[offset:offset + len(magic)] == magic:
            return (f"it looks like {what} file but is damaged or incomplete (e.g. a truncated upload); "
                    "no decoder could read it")
    text = head.decode("utf-8", errors="replace")  # a multi-byte character may be cut at byte 512
    if text.count("\ufffd") <= 3 and all(ch.isprintable() or ch in "\r\n\t" for ch in text):
        return "it is a text file, not a video"
    return "its contents are not in any video format the decoders recognise"


def _order(backend: str) -> tuple[str, ...]:
    if backend == "auto":
        return BACKENDS
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r} (use auto, {', '.join(BACKENDS)})")
    return (backend,)


def _open(path: str, backend: str, size, fails: list):
    """The first backend (from ``backend``'s order) whose metadata validates, or None; failures go to ``fails``."""
    for which in _order(backend):
        try:
            with _quiet_stderr():
                return _CLASSES[which](path, size)
        except _Fail as fail:
            fails.append(fail)
        except Exception as exc:  # noqa: BLE001 - a decoder's surprise must not reach the user as a traceback
            fails.append(_Fail("not_a_video", f"{which} failed ({type(exc).__name__})"))
    return None


def _raise_best(path: str, name: str, fails: list[_Fail]):
    best = max(fails, key=lambda f: f.rank)  # first of the most informative reasons
    reason = best.reason if best.rank > 0 else _sniff(path)
    raise VideoReadError(best.kind, f"Cannot read video '{name}': {reason}.", path)


def probe_video(path, *, backend: str = "auto") -> tuple[int, float, str]:
    """``(total_frames, fps, backend)`` of the first backend that opens the file, without decoding frames.

    (A backend that opens a file can still fail to decode it; :func:`read_video` then falls back.)
    """
    path = os.fspath(path)
    name, fails = check_video_path(path), []
    reader = _open(path, backend, None, fails)
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
    with _quiet_stderr():
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
    """Decode the sampled frames of the video at ``path`` (opened by path, never from memory).

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
    name = check_video_path(path)
    if size is not None:
        size = (int(size[0]), int(size[1]))
        if min(size) < 1:
            raise ValueError(f"size must be (width, height) >= 1, got {size}")
    source = frame_size(path)
    if max_pixels is not None and source is not None and source[0] * source[1] > max_pixels:
        raise _too_large(name, path, *source, max_pixels)

    def check_time():
        if time_limit is not None and time.monotonic() - started > time_limit:
            raise VideoReadError("too_slow", f"Cannot read video '{name}': decoding it takes longer than the "
                                 f"{time_limit:g} s limit.", path)

    fails: list[_Fail] = []
    for which in _order(backend):
        reader = _open(path, which, size, fails)
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
        except _Fail as fail:
            fails.append(fail)
            continue
        except (ValueError, RuntimeError, OSError, MemoryError, TypeError, IndexError) as exc:
            fails.append(_Fail("no_frames", f"{which} failed while decoding ({type(exc).__name__})"))
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
    with _quiet_stderr():
        for frame in reader.frames(unique, per_call):
            if frame.dtype != np.uint8 or frame.ndim != 3 or frame.shape[2] != 3:
                raise _Fail("no_frames", f"{reader.name} returned a frame of an unexpected shape {frame.shape}", 1)
            h, w = frame.shape[:2]
            if max_pixels is not None and h * w > max_pixels:  # the headers said less (or nothing)
                raise too_large(w, h)
            if expect_hw is not None and (h, w) != expect_hw:
                raise _Fail("no_frames", f"{reader.name} returned frames of an unexpected shape {frame.shape}", 1)
            if decoded_size is None:
                decoded_size = (w, h)
            elif decoded_size != (w, h):  # a mid-stream size change: nothing downstream expects it
                raise _Fail("no_frames", f"{reader.name} returned frames of two sizes", 1)
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
        raise _Fail("no_frames", f"{reader.name} returned {count} of {len(unique)} frames", 1)
    return out, decoded_size
