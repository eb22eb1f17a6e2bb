"""The synthetic video world: short clips of a few large coloured shapes, with captions, QA and MC evaluation.

Everything is deterministic from ``WorldConfig.seed``. A clip is 1-3 objects (distinct shapes *and* distinct
colours, so "the circle" and "the red object" always name one object) on a plain dark background, sitting on a
3x3 grid, plus 1-3 events that happen one after another, never overlapping in time:

* ``move``: the object slides one or two grid cells left/right/up/down;
* ``appear`` / ``disappear``: it is absent before / after the event;
* ``colour``: it turns another colour (one no other object of the clip ever has);
* ``blink``: it vanishes and comes back N times (1-3).

Timings are chosen so that every event, every blink and the order of events are visible in the
``model_frames`` (16) frames a model samples uniformly (``np.linspace(0, T-1, n)``, like ``vidlmm.video``):
each blink gap, each pause between events and the margins at both ends last at least as long as the largest
gap between two sampled frames.

Text is templated from the ground truth: captions (a few phrasings), multi-turn QA with static questions
(answerable from one frame: colour, shape, count, existence) and temporal ones (direction, order of events,
blink counts, colour changes, appear/disappear), and held-out 4-option multiple-choice items. Answers use a
small fixed vocabulary: ``Red.``, ``Circle.``, ``Two.``, ``Left.``, ``Twice.``, ``Yes.``, ``The red circle.``,
``The red circle moves left.``; MC options are the same strings without the final period.

Files written by :func:`generate_world` (video paths are relative to ``out_dir``):
``videos/{train,eval}_NNNNN.mp4``, ``captions.json`` and ``qa.json`` (training clips, reference annotation
format), ``eval_mc.json`` (held-out clips), ``clips.json`` (the structured ground truth of every clip) and
``world.json`` (config, counts, checksums; no timings, so it is byte-identical for the same config).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

FORMAT = "vidlmm-world/1"

SHAPES = ("circle", "square", "triangle", "cross")
COLOURS = {
    "red": (230, 40, 40),
    "green": (40, 200, 70),
    "blue": (50, 100, 255),
    "yellow": (240, 220, 40),
    "purple": (170, 70, 230),
    "white": (240, 240, 240),
}
COLOUR_NAMES = tuple(COLOURS)
DIRECTIONS = ("left", "right", "up", "down")
EVENT_KINDS = ("move", "appear", "disappear", "colour", "blink")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")
TIMES_WORDS = {1: "once", 2: "twice", 3: "three times", 4: "four times"}
CAPTION_PROMPTS = (
    "Describe the video.",
    "What happens in the video?",
    "Describe what happens in this video.",
    "Give a short description of the video.",
)
IMAGE_TOKEN = "<image>"

_DIR_STEP = {"left": (0, -1), "right": (0, 1), "up": (-1, 0), "down": (1, 0)}  # (d_row, d_col)
_CELL_FRACTIONS = (0.1875, 0.5, 0.8125)  # grid line positions as fractions of the frame size
_KIND_WEIGHTS = {"move": 4.0, "colour": 2.0, "blink": 2.0, "appear": 1.5, "disappear": 1.5}
_SPLIT_CODES = {"train": 0, "eval": 1}


# ---------------------------------------------------------------------------------------------- config / spec
@dataclass
class WorldConfig:
    """How big the world is and what its clips look like. ``frames / fps`` is the clip length in seconds."""

    seed: int = 0
    num_train: int = 1000
    num_eval: int = 200
    frames: int = 32
    fps: int = 8
    size: int = 128
    model_frames: int = 16     # frames a model samples uniformly; events are timed to be visible in them
    max_objects: int = 3
    max_events: int = 3
    max_blinks: int = 3
    mc_per_clip: int = 2       # MC items per eval clip (one static, one temporal, then random)
    min_turns: int = 2         # QA turns per training clip
    max_turns: int = 4
    crf: int = 18              # H.264 quality (lower = better); 18 keeps colours within a few levels
    background: tuple = (36, 36, 36)

    def __post_init__(self):
        self.background = tuple(int(v) for v in self.background)
        if self.size < 32 or self.size % 2:
            raise ValueError("size must be an even number of pixels >= 32")
        if not 1 <= self.max_objects <= len(SHAPES) or not 1 <= self.max_events <= 3:
            raise ValueError("max_objects must be 1..4 and max_events 1..3")
        if not 1 <= self.max_blinks <= 4:
            raise ValueError("max_blinks must be 1..4")
        if self.model_frames < 2 or self.frames < self.model_frames:
            raise ValueError("need frames >= model_frames >= 2")
        w = sample_window(self.frames, self.model_frames)
        if 2 * w + _move_length(self.frames, w) > self.frames:
            raise ValueError(f"{self.frames} frames are too few to show a move in {self.model_frames} samples")
        if not 1 <= self.min_turns <= self.max_turns or self.mc_per_clip < 1:
            raise ValueError("need 1 <= min_turns <= max_turns and mc_per_clip >= 1")
        if self.num_train < 0 or self.num_eval < 0:
            raise ValueError("num_train and num_eval must be >= 0")


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    colour: str          # colour at the start (see the clip's ``colour`` event for a change)
    x: int               # centre in pixels at the start
    y: int
    cell: tuple          # (row, col) on the 3x3 grid at the start


@dataclass(frozen=True)
class Event:
    """One thing that happens. ``start`` is the first frame that shows the change; ``length`` frames in all.

    move: the centre goes linearly from the object's position to ``(to_x, to_y)``, reached at frame
    ``start + length - 1``. appear/disappear/colour: instantaneous (``length`` 1). blink: ``count`` times,
    hidden for ``period`` frames then shown for ``period`` frames (the last "shown" gap is not part of it).
    """

    kind: str
    obj: int
    start: int
    length: int
    direction: str = ""
    to_x: int = 0
    to_y: int = 0
    colour: str = ""
    count: int = 0
    period: int = 0

    @property
    def end(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class ClipSpec:
    id: str
    seed: tuple            # entropy the clip was sampled from; text RNGs derive from it
    frames: int
    fps: int
    size: int
    radius: int
    background: tuple
    objects: tuple
    events: tuple          # sorted by start, non-overlapping

    @property
    def duration(self) -> float:
        return self.frames / self.fps

    def to_dict(self) -> dict:
        d = asdict(self)
        d["seed"] = list(self.seed)
        d["background"] = list(self.background)
        for o in d["objects"]:
            o["cell"] = list(o["cell"])
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "ClipSpec":
        objects = tuple(ObjectSpec(**{**o, "cell": tuple(o["cell"])}) for o in d["objects"])
        events = tuple(Event(**e) for e in d["events"])
        return cls(id=d["id"], seed=tuple(d["seed"]), frames=d["frames"], fps=d["fps"], size=d["size"],
                   radius=d["radius"], background=tuple(d["background"]), objects=objects, events=events)

    def signature(self) -> str:
        """Content hash (everything but id and seed): two clips with the same signature look the same."""
        d = self.to_dict()
        d.pop("id"), d.pop("seed")
        return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class WorldManifest:
    out_dir: str
    config: WorldConfig
    codec: str
    num_train: int
    num_eval: int
    files: dict               # name -> sha256 of the annotation files
    counts: dict
    video_bytes: int
    videos_sha256: str        # over the sorted (name, sha256) of every video file
    total_duration_s: float
    seconds: float            # wall time of generate_world


# ---------------------------------------------------------------------------------------------- geometry
def sample_window(frames: int, model_frames: int) -> int:
    """Largest gap between two frames a model samples uniformly: any run of this many frames holds a sample."""
    idx = np.linspace(0, frames - 1, model_frames).astype(np.int64)
    return max(int(np.diff(idx).max()) if len(idx) > 1 else frames, 2)


def _move_length(frames: int, window: int) -> int:
    return max(2 * window, round(frames / 4))


def _radius(size: int) -> int:
    return int(round(0.13 * size))


def _grid(size: int) -> tuple[int, ...]:
    return tuple(int(round(size * f)) for f in _CELL_FRACTIONS)


@dataclass
class Timeline:
    """Per-object, per-frame state: ``visible`` bool [N, T], centre ``x``/``y`` float [N, T], ``colour``
    int [N, T] (index into ``COLOUR_NAMES``)."""

    visible: np.ndarray
    x: np.ndarray
    y: np.ndarray
    colour: np.ndarray

    def colour_name(self, obj: int, t: int) -> str:
        return COLOUR_NAMES[int(self.colour[obj, t])]


def timeline(spec: ClipSpec) -> Timeline:
    n, T = len(spec.objects), spec.frames
    t = np.arange(T, dtype=np.float64)
    vis = np.ones((n, T), bool)
    x = np.array([[o.x] * T for o in spec.objects], np.float64).reshape(n, T)
    y = np.array([[o.y] * T for o in spec.objects], np.float64).reshape(n, T)
    col = np.array([[COLOUR_NAMES.index(o.colour)] * T for o in spec.objects], np.int64).reshape(n, T)
    for e in spec.events:
        i = e.obj
        if e.kind == "appear":
            vis[i, :e.start] = False
        elif e.kind == "disappear":
            vis[i, e.start:] = False
        elif e.kind == "blink":
            for k in range(e.count):
                s = e.start + 2 * k * e.period
                vis[i, s:s + e.period] = False
        elif e.kind == "colour":
            col[i, e.start:] = COLOUR_NAMES.index(e.colour)
        elif e.kind == "move":
            f = np.clip((t - (e.start - 1)) / e.length, 0.0, 1.0)
            o = spec.objects[i]
            x[i] = o.x + (e.to_x - o.x) * f
            y[i] = o.y + (e.to_y - o.y) * f
        else:
            raise ValueError(f"unknown event kind {e.kind!r}")
    return Timeline(vis, x, y, col)


def _collides(spec: ClipSpec, tl: Timeline) -> bool:
    lim = 2 * spec.radius + 2
    n = len(spec.objects)
    for i in range(n):
        for j in range(i + 1, n):
            both = tl.visible[i] & tl.visible[j]
            close = (np.abs(tl.x[i] - tl.x[j]) < lim) & (np.abs(tl.y[i] - tl.y[j]) < lim)
            if np.any(both & close):
                return True
    return False


# ---------------------------------------------------------------------------------------------- sampling
def _rng(*entropy: int) -> np.random.Generator:
    return np.random.default_rng([int(v) for v in entropy])


def sample_clip(rng: np.random.Generator, config: WorldConfig | None = None, *, clip_id: str = "clip",
                seed: tuple = ()) -> ClipSpec:
    """Draw one valid clip (no overlaps, distinct shapes/colours, every event visible in sampled frames)."""
    cfg = config or WorldConfig()
    for _ in range(1000):
        spec = _try_sample(rng, cfg, clip_id, tuple(int(v) for v in seed))
        if spec is not None:
            return spec
    raise RuntimeError("could not sample a valid clip; the configuration is too tight")


def _try_sample(rng, cfg: WorldConfig, clip_id: str, seed: tuple) -> ClipSpec | None:
    S, T = cfg.size, cfg.frames
    r, grid = _radius(S), _grid(S)
    step = grid[1] - grid[0]
    w = sample_window(T, cfg.model_frames)

    counts = np.arange(1, cfg.max_objects + 1)
    p = np.array([0.25, 0.4, 0.35, 0.2][:cfg.max_objects])
    n_obj = int(rng.choice(counts, p=p / p.sum()))
    shapes = [SHAPES[k] for k in rng.choice(len(SHAPES), n_obj, replace=False)]
    colours = [COLOUR_NAMES[k] for k in rng.choice(len(COLOUR_NAMES), n_obj, replace=False)]
    cells = [(int(c) // 3, int(c) % 3) for c in rng.choice(9, n_obj, replace=False)]
    objects = []
    for shape, colour, (row, col) in zip(shapes, colours, cells):
        jx, jy = (int(v) for v in rng.integers(-2, 3, size=2))
        objects.append(ObjectSpec(shape, colour, grid[col] + jx, grid[row] + jy, (row, col)))

    ev_counts = np.arange(1, cfg.max_events + 1)
    p = np.array([0.3, 0.4, 0.3][:cfg.max_events])
    n_ev = int(rng.choice(ev_counts, p=p / p.sum()))

    used_colours = set(colours)
    done = [set() for _ in objects]        # event kinds each object already has
    gone = [False] * n_obj
    raw = []                               # (kind, obj, params, length)
    for _ in range(n_ev):
        options = []
        for i, o in enumerate(objects):
            if gone[i]:
                continue
            if not done[i]:
                options.append(("appear", i))
            if "move" not in done[i] and _legal_moves(o.cell):
                options.append(("move", i))
            for kind in ("colour", "blink", "disappear"):
                if kind not in done[i]:
                    options.append((kind, i))
        if not options:
            break
        weights = np.array([_KIND_WEIGHTS[k] for k, _ in options])
        kind, i = options[int(rng.choice(len(options), p=weights / weights.sum()))]
        done[i].add(kind)
        o = objects[i]
        if kind == "move":
            moves = _legal_moves(o.cell)
            direction, steps = moves[int(rng.integers(len(moves)))]
            dr, dc = _DIR_STEP[direction]
            params = dict(direction=direction, to_x=o.x + dc * steps * step, to_y=o.y + dr * steps * step)
            length = _move_length(T, w)
        elif kind == "colour":
            free = [c for c in COLOUR_NAMES if c not in used_colours]
            new = free[int(rng.integers(len(free)))]
            used_colours.add(new)
            params, length = dict(colour=new), 1
        elif kind == "blink":
            count = int(rng.integers(1, cfg.max_blinks + 1))
            params, length = dict(count=count, period=w), (2 * count - 1) * w
        else:
            params, length = {}, 1
            gone[i] = kind == "disappear"
        raw.append((kind, i, params, length))

    k = len(raw)
    need = sum(item[3] for item in raw) + (k - 1) * w + 2 * w
    if need > T:
        return None
    slack = rng.multinomial(T - need, [1.0 / (k + 1)] * (k + 1))
    t = w + int(slack[0])
    events = []
    for j, (kind, i, params, length) in enumerate(raw):
        events.append(Event(kind=kind, obj=i, start=t, length=length, **params))
        t += length + w + int(slack[j + 1])
    spec = ClipSpec(id=clip_id, seed=seed, frames=T, fps=cfg.fps, size=S, radius=r,
                    background=tuple(cfg.background), objects=tuple(objects), events=tuple(events))
    if _collides(spec, timeline(spec)):
        return None
    return spec


def _legal_moves(cell) -> list[tuple[str, int]]:
    row, col = cell
    out = []
    for d in DIRECTIONS:
        dr, dc = _DIR_STEP[d]
        for steps in (1, 2):
            if 0 <= row + dr * steps < 3 and 0 <= col + dc * steps < 3:
                out.append((d, steps))
    return out


# ---------------------------------------------------------------------------------------------- rendering
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


# ---------------------------------------------------------------------------------------------- language
def _text_rng(spec: ClipSpec, purpose: int) -> np.random.Generator:
    return _rng(*spec.seed, 1000 + purpose)


def _pick(rng, options):
    return options[int(rng.integers(len(options)))]


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _colour_before(spec: ClipSpec, tl: Timeline, e: Event) -> str:
    t = e.start if e.kind == "appear" else max(e.start - 1, 0)
    return tl.colour_name(e.obj, t)


def _desc(spec: ClipSpec, tl: Timeline, e: Event) -> str:
    return f"{_colour_before(spec, tl, e)} {spec.objects[e.obj].shape}"


def _first_desc(spec: ClipSpec, tl: Timeline, i: int) -> str:
    """Object ``i`` as seen the first time it is visible."""
    t = int(np.flatnonzero(tl.visible[i])[0]) if tl.visible[i].any() else 0
    return f"{tl.colour_name(i, t)} {spec.objects[i].shape}"


def _object_descs(spec: ClipSpec, tl: Timeline, i: int) -> set[str]:
    """Every "colour shape" the object ever is."""
    return {f"{COLOUR_NAMES[c]} {spec.objects[i].shape}" for c in np.unique(tl.colour[i])}


def _verb(e_kind: str, direction="", colour="", count=0) -> str:
    if e_kind == "move":
        return f"moves {direction}"
    if e_kind == "colour":
        return f"turns {colour}"
    if e_kind == "blink":
        return f"blinks {TIMES_WORDS[count]}"
    return {"appear": "appears", "disappear": "disappears"}[e_kind]


def event_clause(spec: ClipSpec, e: Event, tl: Timeline | None = None) -> str:
    """Canonical lower-case clause, e.g. ``"the red circle moves left"``."""
    tl = tl or timeline(spec)
    return f"the {_desc(spec, tl, e)} {_verb(e.kind, e.direction, e.colour, e.count)}"


def event_sentence(spec: ClipSpec, e: Event, tl: Timeline | None = None) -> str:
    """Canonical sentence used as a QA answer, e.g. ``"The red circle moves left."``."""
    return _cap(event_clause(spec, e, tl)) + "."


def _caption_clause(spec: ClipSpec, tl: Timeline, e: Event, rng) -> str:
    d = _desc(spec, tl, e)
    if e.kind == "appear":
        return f"a {d} " + _pick(rng, ("appears", "shows up"))
    if e.kind == "disappear":
        return f"the {d} " + _pick(rng, ("disappears", "vanishes"))
    if e.kind == "move":
        verbs = ["moves {}", "slides {}"] + (["moves to the {}"] if e.direction in ("left", "right") else [])
        return f"the {d} " + _pick(rng, verbs).format(e.direction)
    if e.kind == "colour":
        return f"the {d} " + _pick(rng, ("turns {}", "changes colour to {}", "becomes {}")).format(e.colour)
    return f"the {d} " + _pick(rng, ("blinks {}", "flashes {}")).format(TIMES_WORDS[e.count])


def _listing(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def caption(spec: ClipSpec, rng: np.random.Generator) -> str:
    """A templated description: who is there at the start (left to right), then the events in order."""
    tl = timeline(spec)
    start = sorted((i for i in range(len(spec.objects)) if tl.visible[i, 0]),
                   key=lambda i: (spec.objects[i].cell[1], spec.objects[i].cell[0]))
    if not start:
        intro = _pick(rng, ("The screen is empty at first.", "At first the screen is empty."))
    else:
        things = [f"a {tl.colour_name(i, 0)} {spec.objects[i].shape}" for i in start]
        if len(things) == 1:
            forms = ("There is {}.", "The video shows {}.", "{} is on the screen.")
        else:
            forms = ("There are {}.", "The video shows {}.", "{} are on the screen.")
        intro = _cap(_pick(rng, forms).format(_listing(things)))
    sentences = [intro]
    n = len(spec.events)
    for j, e in enumerate(spec.events):
        clause = _caption_clause(spec, tl, e, rng)
        if n == 1:
            lead = ""
        elif j == 0:
            lead = _pick(rng, ("", "First, "))
        elif j == n - 1 and n >= 3:
            lead = _pick(rng, ("Then ", "After that, ", "Finally, "))
        else:
            lead = _pick(rng, ("Then ", "After that, ", "Next, "))
        sentences.append(_cap(lead + clause) + ".")
    return " ".join(sentences)


@dataclass
class _Question:
    type: str
    category: str                    # "static" | "temporal"
    texts: tuple                     # phrasings of the question
    answer: str                      # canonical short answer, no final period
    space: tuple | None = None       # wrong answers for MC (None: not used for MC)
    hard: tuple = ()                 # wrong answers preferred as MC distractors
    key: str = ""


def _absent_descs(spec: ClipSpec, tl: Timeline) -> list[str]:
    present = set().union(*(_object_descs(spec, tl, i) for i in range(len(spec.objects))))
    return [f"{c} {s}" for s in SHAPES for c in COLOUR_NAMES if f"{c} {s}" not in present]


def _question_pool(spec: ClipSpec, rng: np.random.Generator) -> list[_Question]:
    tl = timeline(spec)
    objs, events = spec.objects, spec.events
    kinds = Counter(e.kind for e in events)
    changed = {e.obj for e in events if e.kind == "colour"}
    numbers = tuple(_cap(w) for w in NUMBER_WORDS)
    pool: list[_Question] = []

    # ---- static: answerable from one frame
    for i, o in enumerate(objs):
        if i not in changed:
            c = _cap(o.colour)
            pool.append(_Question("colour", "static",
                                  (f"What colour is the {o.shape}?", f"What is the colour of the {o.shape}?"),
                                  c, tuple(_cap(x) for x in COLOUR_NAMES if _cap(x) != c), key=f"colour{i}"))
        for c in sorted(_object_descs(spec, tl, i)):
            colour = c.split()[0]
            pool.append(_Question("shape", "static",
                                  (f"What shape is the {colour} object?", f"Which shape is {colour}?"),
                                  _cap(o.shape), tuple(_cap(s) for s in SHAPES if s != o.shape),
                                  key=f"shape{colour}"))
        d = _first_desc(spec, tl, i)
        pool.append(_Question("exists", "static", (f"Is there a {d}?", f"Is there a {d} in the video?"),
                              "Yes", key=f"yes{i}"))
    absent = _absent_descs(spec, tl)
    d = _pick(rng, absent)
    pool.append(_Question("exists", "static", (f"Is there a {d}?", f"Is there a {d} in the video?"), "No",
                          key="no"))
    if not kinds["appear"] and not kinds["disappear"]:
        ans = numbers[len(objs)]
        pool.append(_Question("count", "static", ("How many objects are there?", "How many objects are in the video?"),
                              ans, tuple(x for x in numbers if x != ans), key="count"))

    # ---- temporal: need the order of frames
    for e in events:
        o, d = objs[e.obj], _desc(spec, tl, e)
        if e.kind == "move":
            ans = _cap(e.direction)
            pool.append(_Question("direction", "temporal",
                                  (f"Which way does the {d} move?", f"In which direction does the {d} move?"),
                                  ans, tuple(_cap(x) for x in DIRECTIONS if x != e.direction), key=f"dir{e.obj}"))
        elif e.kind == "blink":
            ans = _cap(TIMES_WORDS[e.count])
            pool.append(_Question("blink_count", "temporal",
                                  (f"How many times does the {d} blink?", f"How often does the {d} blink?"),
                                  ans, tuple(_cap(v) for k, v in TIMES_WORDS.items() if k != e.count),
                                  key=f"blink{e.obj}"))
        elif e.kind == "colour":
            old, new = _colour_before(spec, tl, e), e.colour
            pool.append(_Question("new_colour", "temporal",
                                  (f"What colour does the {o.shape} turn?",
                                   f"What colour does the {o.shape} change to?"),
                                  _cap(new), tuple(_cap(x) for x in COLOUR_NAMES if x != new), hard=(_cap(old),),
                                  key=f"new{e.obj}"))
            pool.append(_Question("start_colour", "temporal",
                                  (f"What colour is the {o.shape} at first?",
                                   f"What colour is the {o.shape} in the beginning?"),
                                  _cap(old), tuple(_cap(x) for x in COLOUR_NAMES if x != old), hard=(_cap(new),),
                                  key=f"old{e.obj}"))
    verbs = {"move": "moves", "appear": "appears", "disappear": "disappears", "colour": "changes colour",
             "blink": "blinks"}
    for kind, verb in verbs.items():
        if kinds[kind] != 1:
            continue
        e = next(e for e in events if e.kind == kind)
        ans = f"The {_desc(spec, tl, e)}"
        own = _object_descs(spec, tl, e.obj)
        others = tuple(f"The {_first_desc(spec, tl, i)}" for i in range(len(objs)) if i != e.obj)
        space = others + tuple(f"The {x}" for x in absent if x not in own)
        pool.append(_Question(f"which_{kind}", "temporal",
                              (f"Which object {verb}?", f"Which object {verb} in the video?"), ans, space,
                              hard=others, key=f"which_{kind}"))
    sentences = [event_sentence(spec, e, tl)[:-1] for e in events]
    if len(events) >= 2:
        def event_q(qtype, texts, j, key):
            wrong = tuple(s for k, s in enumerate(sentences) if k != j)
            fakes = tuple(x for x in _fake_events(spec, tl, events[j]) if x not in sentences)
            pool.append(_Question(qtype, "temporal", texts, sentences[j], wrong + fakes, hard=wrong, key=key))

        event_q("first", ("What happens first?", "What happens first in the video?"), 0, "first")
        event_q("last", ("What happens last?", "What is the last thing that happens?"), len(events) - 1, "last")
        for j in range(len(events) - 1):
            c = event_clause(spec, events[j], tl)
            event_q("after", (f"What happens right after {c}?", f"What happens just after {c}?"), j + 1, f"after{j}")
        for j in range(1, len(events)):
            c = event_clause(spec, events[j], tl)
            event_q("before", (f"What happens right before {c}?", f"What happens just before {c}?"), j - 1,
                    f"before{j}")
    if kinds["appear"] or kinds["disappear"]:
        for where, t, texts in (("start", 0, ("How many objects are there at first?",
                                               "How many objects are there at the start?")),
                                ("end", spec.frames - 1, ("How many objects are there at the end?",
                                                          "How many objects are left at the end?"))):
            ans = numbers[int(tl.visible[:, t].sum())]
            pool.append(_Question(f"count_{where}", "temporal", texts, ans, tuple(x for x in numbers if x != ans),
                                  key=f"count_{where}"))
    return pool


def _fake_events(spec: ClipSpec, tl: Timeline, e: Event) -> list[str]:
    """Sentences close to event ``e`` that did not happen (never naming e's object by another colour)."""
    d = _desc(spec, tl, e)
    out = []
    if e.kind == "move":
        out += [f"The {d} moves {x}" for x in DIRECTIONS if x != e.direction]
    elif e.kind == "appear":
        out.append(f"The {d} disappears")
    elif e.kind == "disappear":
        out.append(f"The {d} appears")
    elif e.kind == "colour":
        old = _colour_before(spec, tl, e)
        out += [f"The {d} turns {x}" for x in COLOUR_NAMES if x not in (old, e.colour)]
    elif e.kind == "blink":
        out += [f"The {d} blinks {v}" for k, v in TIMES_WORDS.items() if k != e.count]
    others = [_first_desc(spec, tl, i) for i in range(len(spec.objects)) if i != e.obj]
    verb = _verb(e.kind, e.direction, e.colour, e.count)
    out += [f"The {x} {verb}" for x in others if not (e.kind == "colour" and x.split()[0] == e.colour)]
    if e.kind != "move":
        out.append(f"The {d} moves {DIRECTIONS[len(d) % 4]}")
    return list(dict.fromkeys(out))


def asked_questions(spec: ClipSpec, rng: np.random.Generator, types: Iterable[str]) -> list[tuple[_Question, str]]:
    """The clip's questions of the given ``type``\ s, each with one of its phrasings drawn from ``rng``:
    [(question, text)]. Its ``answer`` is the short answer, without the final period."""
    types = set(types)
    return [(q, q.texts[int(rng.integers(len(q.texts)))]) for q in _question_pool(spec, rng) if q.type in types]


def qa_turns(spec: ClipSpec, rng: np.random.Generator, *, min_turns: int = 2, max_turns: int = 4) -> list[tuple]:
    """2-4 (question, answer) pairs, at least one static and one temporal question, no question type twice."""
    return [(text, q.answer + ".") for q, text in _qa_select(spec, rng, min_turns, max_turns)]


def _qa_select(spec: ClipSpec, rng, min_turns: int, max_turns: int) -> list[tuple]:
    pool = _question_pool(spec, rng)
    by_type: dict[str, list[_Question]] = {}
    for q in pool:
        by_type.setdefault(q.type, []).append(q)
    types = list(by_type)
    n = min(int(rng.integers(min_turns, max_turns + 1)), len(types))
    chosen: list[str] = []
    for cat in ("static", "temporal"):
        cands = [t for t in types if by_type[t][0].category == cat and t not in chosen]
        if cands and len(chosen) < n:
            chosen.append(_weighted_type(rng, cands))
    while len(chosen) < n:
        chosen.append(_weighted_type(rng, [t for t in types if t not in chosen]))
    order = rng.permutation(len(chosen))
    turns = []
    for k in order:
        q = _pick(rng, by_type[chosen[k]])
        turns.append((q, _pick(rng, q.texts)))
    return turns


def _family(qtype: str) -> str:
    if qtype in ("first", "last", "after", "before"):
        return "order"
    return qtype.split("_")[0] if qtype.startswith(("which_", "count_")) else qtype


_FAMILY_WEIGHTS = {"order": 1.5, "which": 1.0, "count": 1.0, "exists": 0.5}


def _weighted_type(rng, types: list[str]) -> str:
    """Pick a question type; related types (order questions, which-object, counts) share one weight."""
    fam = Counter(_family(t) for t in types)
    w = np.array([_FAMILY_WEIGHTS.get(_family(t), 1.0) / fam[_family(t)] for t in types])
    return types[int(rng.choice(len(types), p=w / w.sum()))]


def mc_items(spec: ClipSpec, rng: np.random.Generator, *, n: int = 2, video: str | None = None,
             first: str = "static") -> list[dict]:
    """``n`` four-option items: the first of category ``first`` (static or temporal), the second of the other, the
    rest random; letters are random."""
    pool = [q for q in _question_pool(spec, rng) if q.space is not None and len(set(q.space)) >= 3]
    by_type: dict[str, list[_Question]] = {}
    for q in pool:
        by_type.setdefault(q.type, []).append(q)
    chosen: list[str] = []
    if first not in ("static", "temporal"):
        raise ValueError(f"first must be 'static' or 'temporal', not {first!r}")
    for cat in (first, "temporal" if first == "static" else "static"):
        cands = [t for t in by_type if by_type[t][0].category == cat]
        if cands and len(chosen) < n:
            chosen.append(_weighted_type(rng, cands))
    while len(chosen) < n and len(chosen) < len(by_type):
        chosen.append(_weighted_type(rng, [t for t in by_type if t not in chosen]))
    video = video or f"videos/{spec.id}.mp4"
    items = []
    for k, qtype in enumerate(chosen):
        q = _pick(rng, by_type[qtype])
        hard = [x for x in dict.fromkeys(q.hard) if x != q.answer]
        rest = [x for x in dict.fromkeys(q.space) if x != q.answer and x not in hard]
        hard = [hard[j] for j in rng.permutation(len(hard))][:2]
        rest = [rest[j] for j in rng.permutation(len(rest))]
        wrong = (hard + rest)[:3]
        options = [q.answer] + wrong
        options = [options[j] for j in rng.permutation(4)]
        items.append({"id": f"{spec.id}_mc{k}", "video": video, "question": _pick(rng, q.texts),
                      "options": [f"{'ABCD'[j]}. {x}" for j, x in enumerate(options)],
                      "answer": "ABCD"[options.index(q.answer)], "category": q.category, "type": q.type})
    return items


def option_text(option: str) -> str:
    """``"B. Red"`` -> ``"Red"``."""
    return option.split(". ", 1)[1]


def _move_answer(item: dict, letter: str) -> None:
    """Swap the correct option into position ``letter`` (keeps the other options where they were)."""
    texts = [option_text(o) for o in item["options"]]
    a, b = "ABCD".index(item["answer"]), "ABCD".index(letter)
    texts[a], texts[b] = texts[b], texts[a]
    item["options"] = [f"{'ABCD'[j]}. {x}" for j, x in enumerate(texts)]
    item["answer"] = letter


# ---------------------------------------------------------------------------------------------- records
def _caption_record(spec: ClipSpec, video: str) -> dict:
    rng = _text_rng(spec, 1)
    text = caption(spec, rng)
    prompt = _pick(rng, CAPTION_PROMPTS)
    return {"id": spec.id, "video": video, "conversations": [
        {"from": "human", "value": f"{IMAGE_TOKEN}\n{prompt}"}, {"from": "gpt", "value": text}]}


def _qa_record(spec: ClipSpec, video: str, cfg: WorldConfig) -> tuple[dict, list[str]]:
    """The QA conversation of a training clip and the question type of each turn."""
    turns = _qa_select(spec, _text_rng(spec, 2), cfg.min_turns, cfg.max_turns)
    conv = []
    for k, (q, text) in enumerate(turns):
        conv.append({"from": "human", "value": f"{IMAGE_TOKEN}\n{text}" if k == 0 else text})
        conv.append({"from": "gpt", "value": q.answer + "."})
    return {"id": spec.id, "video": video, "conversations": conv}, [q.type for q, _ in turns]


def _conversation_text(record: dict) -> str:
    return "\n".join(m["value"].replace(IMAGE_TOKEN + "\n", "").replace(IMAGE_TOKEN, "")
                     for m in record["conversations"])


def world_corpus(source, *, config: WorldConfig | None = None, include_eval: bool = False) -> list[str]:
    """All training text of the world, one string per conversation (turns joined by newlines, no ``<image>``).

    ``source``: a world folder (reads ``captions.json`` and ``qa.json``; ``include_eval`` adds the MC questions
    and options) or an iterable of :class:`ClipSpec` (regenerates the same caption and QA text).
    """
    if isinstance(source, (str, os.PathLike)):
        root = Path(source)
        records = json.loads((root / "captions.json").read_text()) + json.loads((root / "qa.json").read_text())
        texts = [_conversation_text(r) for r in records]
        if include_eval:
            for item in json.loads((root / "eval_mc.json").read_text()):
                texts.append("\n".join([item["question"]] + item["options"]))
        return texts
    cfg = config or WorldConfig()
    specs = list(source)
    caps = [_conversation_text(_caption_record(s, "")) for s in specs]
    qas = [_conversation_text(_qa_record(s, "", cfg)[0]) for s in specs]
    return caps + qas


def load_clips(out_dir) -> dict[str, list[ClipSpec]]:
    """The ground truth written by :func:`generate_world`: ``{"train": [...], "eval": [...]}``."""
    data = json.loads((Path(out_dir) / "clips.json").read_text())
    return {k: [ClipSpec.from_dict(d) for d in v] for k, v in data.items()}


# ---------------------------------------------------------------------------------------------- world
def _render_job(job: tuple) -> tuple[str, int, str]:
    spec_dict, path, crf = job
    spec = ClipSpec.from_dict(spec_dict)
    written = write_clip(path, render_clip(spec), spec.fps, crf=crf)
    data = written.read_bytes()
    return written.name, len(data), hashlib.sha256(data).hexdigest()


def _dump(path: Path, obj) -> str:
    text = json.dumps(obj, indent=1, ensure_ascii=False) + "\n"
    path.write_text(text, encoding="utf-8")
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sample_specs(config: WorldConfig) -> tuple[list[ClipSpec], list[ClipSpec]]:
    """The train and eval clip specs of a world; eval clips never look like a train clip (or each other)."""
    cfg = config
    train = []
    for i in range(cfg.num_train):
        seed = (cfg.seed, _SPLIT_CODES["train"], i, 0)
        train.append(sample_clip(_rng(*seed), cfg, clip_id=f"train_{i:05d}", seed=seed))
    seen = {s.signature() for s in train}
    evals = []
    for i in range(cfg.num_eval):
        for attempt in range(1000):
            seed = (cfg.seed, _SPLIT_CODES["eval"], i, attempt)
            spec = sample_clip(_rng(*seed), cfg, clip_id=f"eval_{i:05d}", seed=seed)
            if spec.signature() not in seen:
                break
        seen.add(spec.signature())
        evals.append(spec)
    return train, evals


def generate_world(out_dir, config: WorldConfig | None = None, *, workers: int = 1,
                   progress: bool = False) -> WorldManifest:
    """Sample, render, encode and annotate a world under ``out_dir`` (see the module docstring for files)."""
    t0 = time.perf_counter()
    cfg = config or WorldConfig()
    out = Path(out_dir)
    (out / "videos").mkdir(parents=True, exist_ok=True)
    ext = video_extension()
    train, evals = sample_specs(cfg)
    rel = {s.id: f"videos/{s.id}{ext}" for s in train + evals}

    jobs = [(s.to_dict(), str(out / rel[s.id]), cfg.crf) for s in train + evals]
    results = []
    if workers > 1 and len(jobs) > 1:
        ctx = multiprocessing.get_context("spawn")  # safe even if the caller imported torch
        with ctx.Pool(min(workers, len(jobs))) as pool:
            for k, res in enumerate(pool.imap(_render_job, jobs, chunksize=8)):
                results.append(res)
                _progress(progress, k + 1, len(jobs))
    else:
        for k, job in enumerate(jobs):
            results.append(_render_job(job))
            _progress(progress, k + 1, len(jobs))

    captions, qa, counts = [], [], {"qa_types": Counter(), "mc_types": Counter(), "mc_categories": Counter(),
                                     "mc_letters": Counter(), "events": Counter(), "objects": Counter(),
                                     "qa_turns": 0}
    for s in train:
        captions.append(_caption_record(s, rel[s.id]))
        rec, types = _qa_record(s, rel[s.id], cfg)
        qa.append(rec)
        counts["qa_turns"] += len(types)
        counts["qa_types"].update(types)
    mc = []
    for s in evals:
        mc.extend(mc_items(s, _text_rng(s, 3), n=cfg.mc_per_clip, video=rel[s.id]))
    per_cat: Counter = Counter()
    for item in mc:  # exact balance of answer letters within each category
        _move_answer(item, "ABCD"[per_cat[item["category"]] % 4])
        per_cat[item["category"]] += 1
    for item in mc:
        counts["mc_types"][item["type"]] += 1
        counts["mc_categories"][item["category"]] += 1
        counts["mc_letters"][item["answer"]] += 1
    for s in train + evals:
        counts["events"].update(e.kind for e in s.events)
        counts["objects"][str(len(s.objects))] += 1
    counts = {k: (dict(sorted(v.items())) if isinstance(v, Counter) else v) for k, v in counts.items()}
    counts.update(captions=len(captions), qa=len(qa), mc=len(mc))

    files = {
        "captions.json": _dump(out / "captions.json", captions),
        "qa.json": _dump(out / "qa.json", qa),
        "eval_mc.json": _dump(out / "eval_mc.json", mc),
        "clips.json": _dump(out / "clips.json", {"train": [s.to_dict() for s in train],
                                                 "eval": [s.to_dict() for s in evals]}),
    }
    video_bytes = sum(r[1] for r in results)
    videos_sha = hashlib.sha256("".join(f"{n}:{h}\n" for n, _, h in sorted(results)).encode()).hexdigest()
    total = sum(s.duration for s in train + evals)
    meta = {"format": FORMAT, "config": asdict(cfg), "codec": video_codec(), "video_extension": ext,
            "vocabulary": {"shapes": list(SHAPES), "colours": list(COLOUR_NAMES), "directions": list(DIRECTIONS),
                           "events": list(EVENT_KINDS)},
            "num_train": len(train), "num_eval": len(evals), "counts": counts, "files": files,
            "videos": {"count": len(results), "bytes": video_bytes, "sha256": videos_sha,
                       "total_duration_s": total}}
    meta["config"]["background"] = list(cfg.background)
    _dump(out / "world.json", meta)
    return WorldManifest(out_dir=str(out), config=cfg, codec=video_codec(), num_train=len(train),
                         num_eval=len(evals), files=files, counts=counts, video_bytes=video_bytes,
                         videos_sha256=videos_sha, total_duration_s=total, seconds=time.perf_counter() - t0)


def _progress(on: bool, k: int, n: int) -> None:
    if on and (k == n or k % 100 == 0):
        print(f"  rendered {k}/{n} clips", file=sys.stderr, flush=True)


def format_summary(m: WorldManifest) -> str:
    c = m.counts
    lines = [
        f"world: {m.out_dir}  (seed {m.config.seed}, codec {m.codec}, {m.config.size}x{m.config.size}, "
        f"{m.config.frames} frames @ {m.config.fps} fps)",
        f"clips: {m.num_train} train + {m.num_eval} eval = {m.num_train + m.num_eval}, "
        f"{m.total_duration_s / 60:.1f} min of video, {m.video_bytes / 1e6:.2f} MB "
        f"({m.video_bytes / max(m.num_train + m.num_eval, 1) / 1e3:.1f} kB/clip)",
        f"objects per clip: {c['objects']}   events: {c['events']}",
        f"captions: {c['captions']}   qa conversations: {c['qa']} ({c['qa_turns']} turns)",
        "qa question types: " + ", ".join(f"{k} {v}" for k, v in c["qa_types"].items()),
        f"mc items: {c['mc']}  categories {c['mc_categories']}  answer letters {c['mc_letters']}",
        "mc question types: " + ", ".join(f"{k} {v}" for k, v in c["mc_types"].items()),
        f"time: {m.seconds:.1f} s",
    ]
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m train.world", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-train", type=int, default=WorldConfig.num_train)
    p.add_argument("--num-eval", type=int, default=WorldConfig.num_eval)
    p.add_argument("--size", type=int, default=WorldConfig.size)
    p.add_argument("--frames", type=int, default=WorldConfig.frames)
    p.add_argument("--fps", type=int, default=WorldConfig.fps)
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    a = p.parse_args(None if argv is None else list(argv))
    cfg = WorldConfig(seed=a.seed, num_train=a.num_train, num_eval=a.num_eval, size=a.size, frames=a.frames,
                      fps=a.fps)
    manifest = generate_world(a.out, cfg, workers=a.workers, progress=not a.quiet)
    print(format_summary(manifest))
    return 0


if __name__ == "__main__":
    sys.exit(main())
