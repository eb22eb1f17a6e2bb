"""What a clip is: the world's vocabulary, `WorldConfig`, `ClipSpec` (objects and events), the `Timeline` of
where each object is in every frame, and the seeded sampling of clips whose events are all visible in the frames
a model samples."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

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
