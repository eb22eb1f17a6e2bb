"""The decoder backends behind :func:`vidlmm.video.read_video`: decord, PyAV and OpenCV, one class each.

Every backend opens a file by path, validates its metadata (frame count, a sane frame rate) in its constructor,
and yields the requested frame indices as uint8 RGB from ``frames(unique, per_call)``. A backend that cannot
read a file raises :class:`DecoderFailure` with a reason ranked by how much it tells the user; ``read_video``
tries the next backend and reports the best reason. Decoder libraries are imported on first use.
"""

from __future__ import annotations

import bisect
import contextlib
import importlib
import math
import os
import re
import sys
import threading
from typing import Iterator

import numpy as np

BACKENDS = ("decord", "pyav", "opencv")

class DecoderFailure(Exception):
    """A backend could not read the file; ``rank`` orders how informative ``reason`` is."""

    def __init__(self, kind: str, reason: str, rank: int = 0):
        super().__init__(reason)
        self.kind, self.reason, self.rank = kind, reason, rank


# --- keep decoders' own stderr lines (decord may echo file contents) out of the user's terminal -----------
_quiet_lock = threading.Lock()
_quiet_depth = 0
_saved_fd: int | None = None


@contextlib.contextmanager
def quiet_stderr():
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


def import_decord():
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
        return import_decord() if module == "decord" else importlib.import_module(module)
    except ImportError as exc:
        raise DecoderFailure("not_a_video", f"{label} is not installed") from exc


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
                raise DecoderFailure("no_video_stream", "it has no video stream (audio only?)", 3) from exc
            raise DecoderFailure("not_a_video", f"decord cannot open it ({type(exc).__name__})") from exc
        if self.total < 1 or not _sane_fps(self.fps):
            raise DecoderFailure("no_frames", "decord finds no frames in it")

    def frames(self, unique: np.ndarray, per_call: int) -> Iterator[np.ndarray]:
        for start in range(0, len(unique), per_call):  # a few frames per call: decord seeks well in batches
            try:
                batch = self.vr.get_batch([int(i) for i in unique[start:start + per_call]])
            except Exception as exc:  # noqa: BLE001
                raise DecoderFailure("no_frames", f"decord cannot decode its frames ({type(exc).__name__})", 1) from exc
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
            raise DecoderFailure("not_a_video", f"PyAV cannot open it ({type(exc).__name__})") from exc
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
                raise DecoderFailure("no_video_stream", "it contains only audio, no video stream", 3)
            raise DecoderFailure("not_a_video", "it contains no video stream", 2)
        if fmt.endswith("_pipe") or fmt == "image2":  # ffmpeg's single-image demuxers
            kind = fmt.replace("_pipe", "").upper()
            raise DecoderFailure("not_a_video", f"it is a still image ({kind}), not a video", 2)
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
                    raise DecoderFailure("no_frames", "its video packets carry no timestamps", 1)
                pts.append(t)
                if pkt.is_keyframe:
                    keys.append(t)
        except self.av.error.FFmpegError:
            pass  # damaged tail: keep the packets read so far
        if not pts:
            raise DecoderFailure("no_frames", "its video stream holds no frames", 2)
        self.pts, self.keys = sorted(pts), sorted(keys)
        self.total = len(self.pts)
        rate = s.average_rate or s.guessed_rate
        self.fps = float(rate) if rate and _sane_fps(float(rate)) else 0.0
        if not self.fps and self.total > 1 and s.time_base:  # no rate in the header: from the timestamps
            self.fps = (self.total - 1) / float((self.pts[-1] - self.pts[0]) * s.time_base)
        if not _sane_fps(self.fps):
            raise DecoderFailure("no_frames", "it has no usable frame rate", 1)

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
                        raise DecoderFailure("no_frames", "decoded frames carry no timestamps", 1)
                    last = t
                    if t >= target:
                        break
                else:
                    raise DecoderFailure("no_frames", f"decoding stopped before frame {int(i)} of {self.total} "
                                "(the file is damaged or truncated)", 2)
                rgb = frame.to_ndarray(format="rgb24", width=w, height=h)
                yield rgb
        except self.av.error.FFmpegError as exc:
            raise DecoderFailure("no_frames", f"its frames fail to decode ({type(exc).__name__}); "
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
            raise DecoderFailure("not_a_video", "OpenCV cannot open it")
        count = self.cap.get(cv2.CAP_PROP_FRAME_COUNT)
        self.fps = float(self.cap.get(cv2.CAP_PROP_FPS))
        # OpenCV "opens" still images with a frame count like -9.2e18: demand a plausible count and rate
        if not (1 <= count < 1e8 and _sane_fps(self.fps)):
            self.cap.release()
            raise DecoderFailure("not_a_video", "OpenCV reports no plausible frame count or rate")
        self.total = int(count)

    def frames(self, unique: np.ndarray, per_call: int) -> Iterator[np.ndarray]:
        cv2, wanted = self.cv2, set(int(i) for i in unique)
        for pos in range(int(unique[-1]) + 1):  # sequential grab: exact frame positions, one frame in memory
            if not self.cap.grab():
                raise DecoderFailure("no_frames", f"decoding stopped at frame {pos} of {self.total} "
                            "(the file is damaged or truncated)", 2 if pos else 1)
            if pos in wanted:
                ok, bgr = self.cap.retrieve()
                if not ok:
                    raise DecoderFailure("no_frames", f"frame {pos} does not decode", 1)
                if self.size:
                    bgr = cv2.resize(bgr, tuple(self.size), interpolation=cv2.INTER_AREA)
                yield cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)

    def close(self):
        self.cap.release()


_CLASSES = {"decord": _Decord, "pyav": _PyAV, "opencv": _OpenCV}
FRAME_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_NUMBER = re.compile(r"(\d+)(?!.*\d)")


class FrameFolder:
    """A folder of numbered frame images (MVBench's TV task: 00001.jpg ...) read like a video: frames in the order
    of the last number in their names, at the frame rate the caller gives (a folder carries none)."""

    name = "frames"

    def __init__(self, path: str, size, fps: float | None):
        names = [n for n in os.listdir(path) if n.lower().endswith(FRAME_EXTENSIONS)]
        if not names:
            raise DecoderFailure("not_a_file", "it is a directory, not a file (and holds no frame images)", 3)
        if not (fps and _sane_fps(fps)):
            raise DecoderFailure("not_a_file", "it is a folder of frames, which is read only with its frame rate "
                                 "(folder_fps)", 3)
        key = lambda n: (int(m.group(1)) if (m := _NUMBER.search(n)) else -1, n)  # noqa: E731
        self.files = [os.path.join(path, n) for n in sorted(names, key=key)]
        self.total, self.fps, self.size = len(self.files), float(fps), size

    def first_size(self) -> tuple[int, int] | None:
        """(width, height) of the first frame from its header, without decoding it."""
        from PIL import Image

        try:
            with Image.open(self.files[0]) as image:
                return image.size
        except Exception:  # noqa: BLE001 - judged again when it is decoded
            return None

    def frames(self, unique: np.ndarray, per_call: int) -> Iterator[np.ndarray]:
        from PIL import Image

        for i in unique:
            try:
                with Image.open(self.files[int(i)]) as image:
                    image = image.convert("RGB")
                    if self.size:
                        image = image.resize(self.size, Image.BILINEAR)
                    frame = np.asarray(image)
            except Exception as exc:  # noqa: BLE001 - a damaged or non-image file among the frames
                raise DecoderFailure("no_frames", f"frame {os.path.basename(self.files[int(i)])} cannot be read "
                                     f"({type(exc).__name__})", 2) from exc
            yield frame

    def close(self):
        self.files = []


_SIGNATURES = ((4, b"ftyp", "an MP4/MOV"), (0, b"\x1a\x45\xdf\xa3", "a WebM/Matroska"), (8, b"AVI ", "an AVI"),
               (0, b"GIF8", "a GIF"), (0, b"\x00\x00\x01\xba", "an MPEG"), (0, b"OggS", "an Ogg"),
               (0, b"FLV", "an FLV"))


def sniff(path: str) -> str:
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


def backend_order(backend: str) -> tuple[str, ...]:
    if backend == "auto":
        return BACKENDS
    if backend not in BACKENDS:
        raise ValueError(f"unknown video backend {backend!r} (use auto, {', '.join(BACKENDS)})")
    return (backend,)


def open_first(path: str, backend: str, size, fails: list):
    """The first backend (from ``backend``'s order) whose metadata validates, or None; failures go to ``fails``."""
    for which in backend_order(backend):
        try:
            with quiet_stderr():
                return _CLASSES[which](path, size)
        except DecoderFailure as fail:
            fails.append(fail)
        except Exception as exc:  # noqa: BLE001 - a decoder's surprise must not reach the user as a traceback
            fails.append(DecoderFailure("not_a_video", f"{which} failed ({type(exc).__name__})"))
    return None
