"""What one request may ask for, checked on the server: raw endpoint values (whatever a widget or a `gradio_client`
script sends) -> settings, or a `UserError` whose one sentence names the limit.

The same parsers run twice: in each event's Gradio validator (before the request joins the queue, so a refusal
arrives at once, whatever runs on the model) and in the callback itself (the values it then uses).
Limits are `AppConfig` options (`python app.py --help`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from vidlmm.errors import VidlmmError

from .config import AppConfig
from visualizations.io import FIGURE_FORMATS

SEED_LIMIT = 2**32 - 1
MAX_PICTURE_FRAMES = 16  # frames drawn in one connector picture
INDEX_LIMIT = 10**6  # layer / head / query / group numbers: anything larger is no index of any model


class UserError(VidlmmError):
    """A request the app refuses, in one sentence (bad setting, over a limit, video too long, unknown model...).
    `field`: the input it is about, when there is one (the validator marks that input)."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message)
        self.field = field


@dataclass(frozen=True)
class RefusedInput:
    """A value Gradio's own preprocessing refused (an upload of a type the File input does not take): passed on as
    this, so the callback refuses it with Gradio's sentence instead of the request failing as a bare HTTP 400."""

    message: str


def _number(value, what: str, field: str, kind=float):
    """A finite number from a widget or JSON value (int, float, numeric string), or a one-sentence error."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number, not {str(value)[:40]!r}.", field) from None
    if not math.isfinite(number):
        raise UserError(f"{what} must be a finite number.", field)
    if kind is int:
        if number != int(number):
            raise UserError(f"{what} must be a whole number, not {number:g}.", field)
        return int(number)
    return number


def _in_range(value, low, high, what: str, field: str, kind=int):
    number = _number(value, what, field, kind)
    if not low <= number <= high:
        raise UserError(f"{what} must be between {low:g} and {high:g} (got {number:g}).", field)
    return number


@dataclass(frozen=True)
class Limits:
    """The parsers, with the config's limits."""

    config: AppConfig

    # ---- text ------------------------------------------------------------------------------------------------
    def question(self, text, field: str = "question") -> str:
        if text is not None and not isinstance(text, str):
            raise UserError("The question must be text.", field)
        text = (text or "").strip()
        if not text:
            raise UserError("Type a question first.", field)
        if len(text) > self.config.max_question_chars:
            raise UserError(f"The question is {len(text):,} characters long, over the limit of "
                            f"{self.config.max_question_chars:,}.", field)
        return text

    def history(self, history, field: str = "history") -> list[tuple[str, str]]:
        """An API caller's history ([[question, answer], ...]) as pairs, within the turn and character limits."""
        if history in (None, ""):
            return []
        if not isinstance(history, list) or not all(isinstance(t, (list, tuple)) and len(t) == 2 for t in history):
            raise UserError("history must be a list of [question, answer] pairs.", field)
        if len(history) > self.config.max_history_turns:
            raise UserError(f"The history has {len(history)} turns, over the limit of {self.config.max_history_turns}; "
                            "start a new conversation.", field)
        pairs = [(str(q), str(a)) for q, a in history]
        chars = sum(len(q) + len(a) for q, a in pairs)
        if chars > self.config.max_history_chars:
            raise UserError(f"The history is {chars:,} characters long, over the limit of "
                            f"{self.config.max_history_chars:,}; start a new conversation.", field)
        return pairs

    # ---- frames, generation, budget ---------------------------------------------------------------------------
    def sampling(self, mode="uniform", num_frames=16, max_frames=64, rate=1.0, *, most: int | None = None):
        """uniform: num_frames evenly spread. fps: `rate` frames per second capped at max_frames; rate 1 is the
        reference's "1fps" mode (floor(duration) frames evenly spread). most: a lower frame limit for this
        endpoint (attention maps grow with frames x queries)."""
        from vidlmm.video import FrameSampling

        limit = min(self.config.max_frames, most or self.config.max_frames)
        mode = (mode or "uniform").lower() if isinstance(mode, str) else mode
        if mode == "uniform":
            return FrameSampling.uniform(_in_range(num_frames, 1, limit, "Frames", "num_frames"))
        if mode == "fps":
            cap = _in_range(max_frames, 1, limit, "Max frames", "max_frames")
            rate = _in_range(rate, 0.01, 30, "Frames per second", "fps", float)
            return FrameSampling.fps(cap) if abs(rate - 1.0) < 1e-9 else FrameSampling.at_rate(rate, cap)
        raise UserError(f"Unknown frame sampling '{str(mode)[:40]}' (use uniform or fps).", "mode")

    def generation(self, max_new_tokens=128, do_sample=False, temperature=0.2, top_p=0.9, seed=None):
        from vidlmm.pipeline import GenerationSettings

        tokens = _in_range(max_new_tokens, 1, self.config.max_new_tokens, "Max new tokens", "max_new_tokens")
        do_sample = bool(do_sample)
        temperature = _number(temperature, "Temperature", "temperature")
        top_p = _number(top_p, "Top-p", "top_p")
        if do_sample and not (0 < temperature <= 10 and 0 < top_p <= 1):
            raise UserError("Sampling needs a temperature in (0, 10] and a top-p in (0, 1].", "temperature")
        seed = None if seed in (None, "", -1) else _in_range(seed, 0, SEED_LIMIT, "The seed", "seed")
        return GenerationSettings(max_new_tokens=tokens, do_sample=do_sample, temperature=temperature, top_p=top_p,
                                  seed=seed)

    def budget(self, groups=0, queries=0, frame_tokens=0, active_fraction=1.0, strategy="random", seed=0):
        from vidlmm.budget import TokenBudget

        fraction = 1.0 if active_fraction in (None, "") else _number(active_fraction, "The active fraction",
                                                                      "active_fraction")
        if not 0 < fraction <= 1:
            raise UserError("The active fraction must be above 0 and at most 1.", "active_fraction")
        counts = [_in_range(v or 0, 0, INDEX_LIMIT, what, field) for v, what, field in (
            (groups, "Groups", "groups"), (queries, "Queries", "queries"), (frame_tokens, "Tokens per frame",
                                                                           "frame_tokens"))]
        return TokenBudget(*[c or None for c in counts], active_fraction=fraction,
                           strategy=self.strategies([strategy or "random"], field="strategy")[0],
                           seed=_in_range(seed or 0, 0, SEED_LIMIT, "The seed", "seed"))

    # ---- analysis -------------------------------------------------------------------------------------------
    def fractions(self, text, field: str = "fractions") -> list[float]:
        """'1, 0.5, 25%' or a list -> [1.0, 0.5, 0.25]: each in (0, 1], distinct, at most max_fractions of them."""
        if isinstance(text, (list, tuple)):
            items = list(text)
        elif isinstance(text, (str, int, float)):
            items = str(text).replace(";", ",").split(",")
        else:
            raise UserError("Active fractions must be text like '1, 0.5, 0.25' or a list of numbers.", field)
        items = [item for item in items if str(item).strip()]
        if len(items) > self.config.max_fractions:  # before parsing any of them
            raise UserError(f"{len(items)} active fractions asked, over the limit of {self.config.max_fractions}.",
                            field)
        out = []
        for item in items:
            item = str(item).strip()
            if not item:
                continue
            try:
                value = float(item[:-1]) / 100 if item.endswith("%") else float(item)
            except ValueError:
                raise UserError(f"'{item[:20]}' is not a fraction (write e.g. 1, 0.5, 0.25 or 50%).", field) from None
            if not 0 < value <= 1:
                raise UserError(f"Fraction {item[:20]} is not in (0, 1].", field)
            out.append(value)
        out = sorted(set(out), reverse=True)
        if not out:
            raise UserError("Give at least one active fraction.", field)
        return out

    def strategies(self, names, field: str = "strategies") -> list[str]:
        from vidlmm.analysis import STRATEGIES

        if isinstance(names, str):
            names = [names]
        if not isinstance(names, (list, tuple)):
            raise UserError("Strategies must be a list of names.", field)
        picked = list(dict.fromkeys(str(n) for n in names if n)) or ["random"]
        unknown = [n for n in picked if n not in STRATEGIES]
        if unknown:
            raise UserError(f"Unknown zeroing strategy '{unknown[0][:40]}' (use {', '.join(STRATEGIES)}).", field)
        return picked

    def seeds(self, count, field: str = "seeds") -> list[int]:
        return list(range(_in_range(count, 1, self.config.max_seeds, "Seeds", field)))

    def models(self, names, most: int, what: str, field: str = "models") -> list[str]:
        """1..most distinct model names."""
        if isinstance(names, str):
            names = [names]
        if names is not None and not isinstance(names, (list, tuple)):
            raise UserError("Models must be a list of names.", field)
        picked = list(dict.fromkeys(str(n)[:300] for n in (names or []) if n))
        if not 1 <= len(picked) <= most:
            raise UserError(f"Pick one to {most} different models {what} (got {len(picked)}).", field)
        return picked

    def heldout_items(self, count, field: str = "max_items") -> int:
        return _in_range(count, 1, self.config.max_heldout_items, "Held-out questions", field)

    def index(self, value, what: str, field: str) -> int | None:
        """A layer / head / query / group number; negative or empty: None (all, the mean, the last layer...)."""
        if value in (None, ""):
            return None
        number = _in_range(value, -INDEX_LIMIT, INDEX_LIMIT, what, field)
        return None if number < 0 else number

    def layer(self, value, field: str = "layer") -> int:
        return -1 if value in (None, "") else _in_range(value, -INDEX_LIMIT, INDEX_LIMIT, "The layer", field)

    def picture_frames(self, value, field: str = "frames") -> int:
        return _in_range(value, 1, MAX_PICTURE_FRAMES, "Frames shown", field)

    def figure(self, fmt="png", dpi=150) -> tuple[str, int]:
        fmt = str(fmt or "png").lower()
        if fmt not in FIGURE_FORMATS:
            raise UserError(f"Unknown figure format '{fmt[:20]}' (use {', '.join(FIGURE_FORMATS)}).", "fmt")
        return fmt, _in_range(dpi, 50, self.config.max_dpi, "DPI", "dpi")
