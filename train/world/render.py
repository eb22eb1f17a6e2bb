"""Pixels: a clip's frames drawn from its timeline (`render_clip`) and written as a video with the best codec
this machine has (`write_clip`)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .spec import COLOURS, ClipSpec, Timeline, timeline


_SPRITES: dict = {}


def _sprite(shape: str, r: int) -> np.ndarray:
    """Anti-aliased alpha mask float32 [2r+1, 2r+1] of ``shape`` centred on the middle pixel (4x supersampled)."""
    key = (shape, r)
    if key not in _SPRITES:
        ss, side = 4, 2 * r + 1
        u = ((np.arange(side * ss) + 0.5) / ss - (r + 0.5)) / r
        X, Y = np.meshgrid(u, u)
        if shape == "circle":
            m = X * X + Y * Y <= 1.0
        elif shape == "square":
            m = (np.abs(X) <= 0.85) & (np.abs(Y) <= 0.85)
        elif shape == "triangle":  # apex up: (0, -1), base corners (+-1, 0.8)
            m = (Y <= 0.8) & (Y >= -1.0 + 1.8 * np.abs(X))
        elif shape == "cross":
            a = 0.36
            m = ((np.abs(X) <= a) & (np.abs(Y) <= 1.0)) | ((np.abs(Y) <= a) & (np.abs(X) <= 1.0))
        else:
            raise ValueError(f"unknown shape {shape!r}")
        _SPRITES[key] = m.reshape(side, ss, side, ss).mean(axis=(1, 3)).astype(np.float32)
    return _SPRITES[key]


def sprite_placements(spec: ClipSpec, tl: Timeline, t: int):
    """Where each visible object of frame ``t`` is drawn: (object index, (ya, yb, xa, xb) frame slice, alpha crop
    [yb - ya, xb - xa] float32), clipped to the frame; objects entirely outside it are skipped."""
    S, r = spec.size, spec.radius
    for i in np.flatnonzero(tl.visible[:, t]):
        x0, y0 = int(np.floor(tl.x[i, t] + 0.5)) - r, int(np.floor(tl.y[i, t] + 0.5)) - r
        xa, ya = max(x0, 0), max(y0, 0)
        xb, yb = min(x0 + 2 * r + 1, S), min(y0 + 2 * r + 1, S)
        if xa < xb and ya < yb:
            yield int(i), (ya, yb, xa, xb), _sprite(spec.objects[i].shape, r)[ya - y0:yb - y0, xa - x0:xb - x0]


def render_clip(spec: ClipSpec) -> np.ndarray:
    """RGB uint8 frames ``[T, H, W, 3]`` of the clip (exact, before any compression)."""
    T, S = spec.frames, spec.size
    frames = np.empty((T, S, S, 3), np.uint8)
    frames[:] = np.array(spec.background, np.uint8)
    tl = timeline(spec)
    cx = np.floor(tl.x + 0.5).astype(np.int64)
    cy = np.floor(tl.y + 0.5).astype(np.int64)
    previous = None
    for t in range(T):
        state = tuple((int(cx[i, t]), int(cy[i, t]), int(tl.colour[i, t]))
                      for i in range(len(spec.objects)) if tl.visible[i, t])
        if state == previous:  # most frames repeat the previous one
            frames[t] = frames[t - 1]
            continue
        previous = state
        for i, (ya, yb, xa, xb), alpha in sprite_placements(spec, tl, t):
            region = frames[t, ya:yb, xa:xb].astype(np.float32)
            colour = np.array(COLOURS[tl.colour_name(i, t)], np.float32)
            region += alpha[:, :, None] * (colour - region)
            frames[t, ya:yb, xa:xb] = (region + 0.5).astype(np.uint8)
    return frames


# ---------------------------------------------------------------------------------------------- encoding
_CODEC: str | None = None


def video_codec() -> str:
    """``"h264"`` (PyAV libx264, .mp4), else ``"vp9"``/``"vp8"`` (PyAV libvpx, .webm), else ``"opencv-vp8"``."""
    global _CODEC
    if _CODEC is None:
        try:
            import av
            have = av.codecs_available
            _CODEC = ("h264" if "libx264" in have else "vp9" if "libvpx-vp9" in have
                      else "vp8" if "libvpx" in have else "opencv-vp8")
        except ImportError:
            _CODEC = "opencv-vp8"
    return _CODEC


def video_extension() -> str:
    return ".mp4" if video_codec() == "h264" else ".webm"


def write_clip(path, frames: np.ndarray, fps: int, *, crf: int = 18) -> Path:
    """Encode RGB uint8 ``[T, H, W, 3]`` frames (H, W even) to a browser-playable file; returns the path written.

    H.264 yuv420p in MP4 (faststart) with libx264 single-threaded: the same frames give byte-identical files.
    Without libx264 the suffix becomes ``.webm`` (VP9/VP8).
    """
    path = Path(path)
    codec = video_codec()
    if codec != "h264":
        path = path.with_suffix(".webm")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".part" + path.suffix)
    frames = np.ascontiguousarray(frames, dtype=np.uint8)
    T, H, W = frames.shape[:3]
    if codec == "opencv-vp8":
        import cv2
        writer = cv2.VideoWriter(str(tmp), cv2.VideoWriter_fourcc(*"VP80"), float(fps), (W, H))
        if not writer.isOpened():
            raise RuntimeError("no video encoder available (need PyAV with libx264/libvpx, or OpenCV with VP8)")
        for f in frames:
            writer.write(f[..., ::-1].copy())
        writer.release()
    else:
        import av
        fmt, name, opts = {
            "h264": ("mp4", "libx264", {"crf": str(crf), "preset": "medium"}),
            "vp9": ("webm", "libvpx-vp9", {"crf": str(crf + 12), "b": "0", "deadline": "good"}),
            "vp8": ("webm", "libvpx", {"crf": str(crf - 8), "b": "1M"}),
        }[codec]
        container_opts = {"movflags": "+faststart"} if fmt == "mp4" else {}
        with av.open(str(tmp), "w", format=fmt, options=container_opts) as out:
            stream = out.add_stream(name, rate=int(fps), options=opts)
            stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
            stream.codec_context.thread_count = 1
            for f in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
    os.replace(tmp, path)
    return path
