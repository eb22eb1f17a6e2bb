"""Text from the ground truth: event sentences, captions, multi-turn QA and 4-option multiple-choice items."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable

import numpy as np

from .spec import COLOUR_NAMES, ClipSpec, DIRECTIONS, Event, NUMBER_WORDS, SHAPES, TIMES_WORDS, Timeline, _rng, timeline


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


# every question type the world asks, by category (the held-out set's ``type`` and ``category``)
QUESTION_TYPES = {
    "static": ("colour", "shape", "exists", "count"),
    "temporal": ("direction", "which_move", "which_colour", "new_colour", "start_colour", "blink_count",
                 "which_blink", "count_start", "count_end", "which_appear", "which_disappear", "first", "last",
                 "before", "after"),
}


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
