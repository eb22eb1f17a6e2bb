"""Multiple-choice video QA evaluation (MVBench / Video-MME style), deterministic end to end.

    items = load_mc_items("mvbench_subset.json", video_root="videos/")
    result = evaluate(VideoLMM(model), items)
    print(result.to_markdown())

What it does like the reference (spec section 8): the prompt patterns (`build_mc_question`), greedy decoding,
an MMMU-style answer parser, the micro average over questions.

Where it differs, on purpose:

* **No random fallback.** The reference's parser picks `random.choice(letters)` when nothing matches (and
  crashes on an empty reply). `parse_choice` returns ``None`` instead; such an item counts as wrong and is
  reported in ``EvalResult.unparsable``. Scores are therefore reproducible, and can be slightly lower than
  the reference's (which gets ``1/len(options)`` of the unparsable items right by luck, on average).
* **First-letter rule.** The reference returns the first character whenever it is a valid letter, so
  "Because ..." parses as "B". We only accept it when the next character is not a letter ("B", "B. x", "B) x").
* **Case.** Letters are upper-case only, like the reference ("a" is an English word), except when the whole
  reply is one letter, possibly in brackets ("b", "(b)") which we read as that letter.
* **Option text.** The reference only searches for an option's text in replies of more than 5 words; we do it
  for any reply (a short reply that repeats an option, "a red car", is still an answer). Option texts are
  compared without a trailing period and case-insensitively.
* **One decode per video.** Items are grouped by video; each video is read and encoded once
  (`VideoLMM.prepare`) and every question about it reuses the features (reference issue #5).
"""

from __future__ import annotations

import json
import os
import re
import string
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from .errors import VidlmmError
from .intervals import bootstrap_interval, format_accuracy

LETTERS = string.ascii_uppercase
SUFFIX = "Answer with the option's letter from the given choices directly."
STYLES = ("mvbench", "videomme")
_STRIP_CHARS = ",.!?;:'"
# "A. text", "A) text", "A: text", "(A) text", "(A). text"; a plain "A cat" has no prefix.
_PREFIX = re.compile(r"^\s*(?:\(([A-Za-z])\)[.:]?|([A-Z])[.):])\s*(.*)$", re.S)


@dataclass
class MCItem:
    """One multiple-choice question, normalised: `options` are bare texts, `letters[i]` labels `options[i]`.

    start / end: the seconds of the clip the question is about (MVBench's bounded tasks), None for the whole
    video; fps: the frame rate of a folder of frames (MVBench's TV task); groups: other labels results are
    broken down by, e.g. {"duration": "short"} (Video-MME)."""

    id: str
    video: str
    question: str
    options: list[str]
    letters: list[str]
    answer_letter: str
    category: str = "all"
    start: float | None = None
    end: float | None = None
    fps: float | None = None
    groups: dict = field(default_factory=dict)

    @property
    def answer_text(self) -> str:
        return self.options[self.letters.index(self.answer_letter)]


# ---- loading ----------------------------------------------------------------------------------------------

def _split_prefixed(options: list) -> tuple[list[str], list[str]]:
    """Options given as a list: prefixed ("A. x", "(A) x") when all of them are, with distinct letters."""
    texts = [str(o) for o in options]
    matches = [_PREFIX.match(t) for t in texts]
    if all(matches):
        letters = [(m.group(1) or m.group(2)).upper() for m in matches]
        if len(set(letters)) == len(letters):
            return [m.group(3).strip() for m in matches], letters
    return [t.strip() for t in texts], list(LETTERS[:len(texts)])


def _dict_options(options: dict, where: str) -> tuple[list[str], list[str]]:
    pairs = []
    for key, text in options.items():
        letter = str(key).strip().strip("().:").strip().upper()
        if len(letter) != 1 or letter not in LETTERS:
            raise VidlmmError(f"{where}: option key {key!r} is not a single letter A-Z.")
        pairs.append((letter, str(text).strip()))
    pairs.sort()
    if len({p[0] for p in pairs}) != len(pairs):
        raise VidlmmError(f"{where}: the same option letter appears twice.")
    return [p[1] for p in pairs], [p[0] for p in pairs]


def _norm_text(text: str) -> str:
    return " ".join(str(text).lower().split()).rstrip(".").strip()


def _resolve_answer(answer, texts: list[str], letters: list[str], where: str) -> str:
    if isinstance(answer, int) and not isinstance(answer, bool) and 0 <= answer < len(letters):
        return letters[answer]  # an option index (some datasets)
    if not isinstance(answer, str) or not answer.strip():
        raise VidlmmError(f"{where}: 'answer' must be an option letter or an option's text, got {answer!r}.")
    raw = answer.strip()
    bare = raw.strip("().: ").upper()
    if len(bare) == 1 and bare in letters and raw.upper() == raw:  # "A", "(A)", "A."
        return bare
    m = _PREFIX.match(raw)  # "A. text" / "(A) text"
    if m and (m.group(1) or m.group(2)).upper() in letters:
        letter = (m.group(1) or m.group(2)).upper()
        if not m.group(3).strip() or _norm_text(m.group(3)) == _norm_text(texts[letters.index(letter)]):
            return letter
    hits = [letter for letter, text in zip(letters, texts) if _norm_text(text) == _norm_text(raw)]
    if len(hits) == 1:
        return hits[0]
    if len(bare) == 1 and bare in letters:  # a lone lower-case letter, when no option's text is that letter
        return bare
    why = "matches several options" if hits else "is neither an option letter nor an option's text"
    raise VidlmmError(f"{where}: answer {raw[:60]!r} {why}.")


def _read_json_items(path: Path) -> list:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VidlmmError(f"Cannot read data file '{path}': no such file.") from None
    except IsADirectoryError:
        raise VidlmmError(f"Cannot read data file '{path}': it is a directory.") from None
    except (OSError, UnicodeDecodeError) as err:
        raise VidlmmError(f"Cannot read data file '{path}': {err}.") from None
    try:
        if path.suffix.lower() == ".jsonl":
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            data = json.loads(text)
    except json.JSONDecodeError as err:
        raise VidlmmError(f"Data file '{path.name}' is not valid JSON: {err}.") from None
    if isinstance(data, dict) and isinstance(data.get("items"), list):
        data = data["items"]
    if not isinstance(data, list):
        raise VidlmmError(f"Data file '{path.name}' must hold a JSON list of questions.")
    return data


def load_mc_items(path, video_root=None, *, check_videos: bool = True) -> list[MCItem]:
    """Read a JSON list (or .jsonl) of multiple-choice questions.

    Each item: ``video`` (relative to `video_root`, else to the JSON file's folder; absolute paths kept),
    ``question``, ``options`` (alias ``candidates``: a list of "A. x" / "(A) x" / plain texts, or a dict
    {"A": x}), ``answer`` (a letter, an option's text, or "A. x"), optional ``category`` (alias ``task_type``,
    default "all") and ``id`` (default: the item's index). A malformed item raises a one-line
    :class:`VidlmmError` naming its index; so does a missing video when `check_videos`.
    """
    path = Path(path)
    data = _read_json_items(path)
    base = Path(video_root) if video_root is not None else path.parent
    if video_root is not None and not base.is_dir():
        raise VidlmmError(f"Video root '{video_root}' is not a folder.")
    items: list[MCItem] = []
    for index, raw in enumerate(data):
        where = f"Item {index} of '{path.name}'"
        if not isinstance(raw, dict):
            raise VidlmmError(f"{where} is not a JSON object.")
        video, question = raw.get("video"), raw.get("question")
        options = raw.get("options", raw.get("candidates"))
        if not isinstance(video, str) or not video.strip():
            raise VidlmmError(f"{where}: missing 'video' (a path).")
        if not isinstance(question, str) or not question.strip():
            raise VidlmmError(f"{where}: missing 'question' (a string).")
        if isinstance(options, dict):
            texts, letters = _dict_options(options, where)
        elif isinstance(options, list) and all(isinstance(o, (str, int, float)) for o in options):
            texts, letters = _split_prefixed(options)
        else:
            raise VidlmmError(f"{where}: 'options' must be a list of strings or a dict letter -> text.")
        if not 2 <= len(texts) <= len(LETTERS):
            raise VidlmmError(f"{where}: needs 2 to 26 options, got {len(texts)}.")
        if any(not t for t in texts):
            raise VidlmmError(f"{where}: an option's text is empty.")
        if "answer" not in raw:
            raise VidlmmError(f"{where}: missing 'answer'.")
        answer = _resolve_answer(raw["answer"], texts, letters, where)
        video_path = Path(os.path.expanduser(video.strip()))
        if not video_path.is_absolute():
            video_path = base / video_path
        if check_videos and not video_path.is_file():
            raise VidlmmError(f"{where}: video '{video}' not found under '{base}'.")
        category = raw.get("category", raw.get("task_type", "all"))
        items.append(MCItem(id=str(raw.get("id", index)), video=str(video_path), question=question.strip(),
                            options=texts, letters=letters, answer_letter=answer,
                            category=str(category) if category not in (None, "") else "all"))
    return items


# ---- prompting and parsing ----------------------------------------------------------------------------------

def build_mc_question(item: MCItem, style: str = "mvbench") -> str:
    """The reference's prompt (without `<image>`, which the pipeline puts first).

    mvbench (also MLVU): ``question\\n(A) x\\n(B) y\\n<suffix>``;
    videomme (also MMVU): ``question\\nA. x\\nB. y\\n<suffix>``.
    """
    if style == "mvbench":
        lines = [f"({letter}) {text}" for letter, text in zip(item.letters, item.options)]
    elif style == "videomme":
        lines = [f"{letter}. {text}" for letter, text in zip(item.letters, item.options)]
    else:
        raise VidlmmError(f"Unknown prompt style '{style}' (use {' or '.join(STYLES)}).")
    return item.question + "\n" + "\n".join(lines) + "\n" + SUFFIX


def parse_choice(response: str, options_texts: list[str], letters: list[str] | None = None) -> str | None:
    """The letter a reply chooses, or None (never a random guess). See the module docstring for the rules.

    Order: first character (a valid letter not followed by a letter) -> "(X)" -> " X " -> an option's text
    (case-insensitive substring). Several matches of one kind: the one appearing last in the reply wins.
    """
    letters = list(letters) if letters is not None else list(LETTERS[:len(options_texts)])
    text = (response or "").strip().strip(_STRIP_CHARS).strip()
    if not text:
        return None
    valid = set(letters)
    # a whole reply of one letter, in any case, possibly bracketed: "b", "(B)", "[c]"
    bare = text.strip("()[]{} ").upper()
    if len(bare) == 1 and bare in valid:
        return bare
    if text[0] in valid and (len(text) == 1 or not text[1].isalpha()):
        return text[0]
    padded = f" {text} "
    for pattern in ("({})", " {} "):
        found = {c: padded.rfind(pattern.format(c)) for c in letters if pattern.format(c) in padded}
        if found:
            return max(found, key=found.get)  # the last one, like the reference's rfind + argmax
    lower = " " + " ".join(text.lower().split()) + " "
    found = {}
    for letter, option in zip(letters, options_texts):
        needle = _norm_text(option)
        if needle and needle in lower:
            found[letter] = lower.rfind(needle)
    if found:
        return max(found, key=found.get)
    return None


# ---- evaluation ---------------------------------------------------------------------------------------------

@dataclass
class ItemRecord:
    id: str
    video: str
    category: str
    question: str
    answer: str
    response: str
    parsed: str | None
    correct: bool
    num_options: int
    groups: dict = field(default_factory=dict)
    scores: list | None = None  # likelihood scoring: each option's log-likelihood


@dataclass
class EvalResult:
    """accuracy: micro average (correct / n); macro_accuracy: mean over categories (MLVU's M-Avg).

    per_category: {category: {"n", "correct", "accuracy", "chance", "unparsable"}}; chance: the mean of
    1/len(options). Unparsable replies count as wrong. per_group: the same stats for each label of each of the
    items' other groupings ({"duration": {"short": {...}}}). missing: {"id", "video", "why"} for each question not
    scored because its video is not there or could not be read.
    """

    n: int
    correct: int
    accuracy: float
    macro_accuracy: float
    chance: float
    unparsable: int
    per_category: dict[str, dict]
    items: list[ItemRecord]
    seconds: float
    style: str = "mvbench"
    extra: dict = field(default_factory=dict)
    per_group: dict = field(default_factory=dict)
    missing: list = field(default_factory=list)
    interval: list | None = None  # the accuracy's 95 % bootstrap interval over videos (vidlmm.intervals)

    def to_json(self) -> dict:
        return {"accuracy": self.accuracy, "interval": self.interval, "macro_accuracy": self.macro_accuracy,
                "n": self.n,
                "correct": self.correct, "chance": self.chance, "unparsable": self.unparsable,
                "per_category": self.per_category, "per_group": self.per_group, "missing": self.missing,
                "seconds": round(self.seconds, 3), "style": self.style, **self.extra,
                "items": [asdict(r) for r in self.items]}

    def to_markdown(self) -> str:
        rows = ["| category | n | accuracy [95 % interval] | chance |", "|---|---:|---:|---:|"]
        for name, cat in self.per_category.items():
            rows.append(f"| {name} | {cat['n']} | {format_accuracy(cat)} | {100 * cat['chance']:.1f} |")
        overall = {"accuracy": self.accuracy, "interval": self.interval}
        rows.append(f"| **overall** | {self.n} | {format_accuracy(overall)} | {100 * self.chance:.1f} |")
        for grouping, labels in self.per_group.items():
            rows.append(f"| *by {grouping}* | | | |")
            rows += [f"| {label} | {g['n']} | {format_accuracy(g)} | {100 * g['chance']:.1f} |" for label, g in labels.items()]
        notes = [f"unparsable replies: {self.unparsable} (counted as wrong)"]
        if self.extra.get("open_ended"):
            open_ = self.extra["open_ended"]
            notes.append(f"open-ended questions (apart): {open_['correct']}/{open_['n']} right")
        if self.missing:
            notes.append(f"not scored: {len(self.missing)} question(s) whose video is missing or unreadable")
        if len(self.per_category) > 1:
            notes.append(f"macro accuracy: {100 * self.macro_accuracy:.1f}")
        notes.append(f"time: {self.seconds:.1f} s")
        return "\n".join(rows) + "\n\n" + "; ".join(notes)


def summarize(records: list[ItemRecord], seconds: float = 0.0, style: str = "mvbench") -> EvalResult:
    """Aggregate per-item records (categories in order of first appearance)."""
    def stats(rs):
        n = len(rs)
        correct = sum(r.correct for r in rs)
        return {"n": n, "correct": correct, "accuracy": correct / n if n else 0.0,
                "interval": list(bootstrap_interval([r.correct for r in rs], [r.video for r in rs])) if n else None,
                "chance": sum(1 / r.num_options for r in rs) / n if n else 0.0,
                "unparsable": sum(r.parsed is None for r in rs)}

    def split(key) -> dict[str, list[ItemRecord]]:
        out: dict[str, list[ItemRecord]] = {}
        for r in records:
            label = key(r)
            if label is not None:
                out.setdefault(label, []).append(r)
        return out

    per_category = {name: stats(rs) for name, rs in split(lambda r: r.category).items()}
    groupings = list(dict.fromkeys(g for r in records for g in r.groups))
    per_group = {g: {label: stats(rs) for label, rs in split(lambda r: r.groups.get(g)).items()} for g in groupings}
    total = stats(records)
    macro = sum(c["accuracy"] for c in per_category.values()) / len(per_category) if per_category else 0.0
    return EvalResult(n=total["n"], correct=total["correct"], accuracy=total["accuracy"], macro_accuracy=macro,
                      chance=total["chance"], unparsable=total["unparsable"], per_category=per_category,
                      items=list(records), seconds=seconds, style=style, per_group=per_group,
                      interval=total["interval"])


SCORINGS = ("generate", "likelihood")


# What the likelihood scoring scores, kept in a run's settings: records scored another way are not mixed in.
LIKELIHOOD_OF = "the option's text as the start of the reply"


def option_loglikelihoods(lmm, prepared, item: MCItem) -> list[float]:
    """The `likelihood` scoring: for each option, the log-likelihood of its text as the start of the answer to
    the bare question (no options listed), teacher-forced on the video's visual tokens. The reply's end (the
    template's stop string) is not scored: a model that says "Two." gave its answer at "Two", and the
    probability of ending the reply without the period it always writes (the world's answers, most chat models')
    would outweigh which option it chose (measured on the embedded group's count questions, docs/embedded-models.md).
    Summed over tokens, not normalised by length, like lm-evaluation-harness's multiple-choice accuracy."""
    return options_loglikelihoods(lmm, item, [lmm.visual_tokens(prepared)])[0]


def options_loglikelihoods(lmm, item: MCItem, visuals: list) -> list[list[float]]:
    """`option_loglikelihoods` under several visual-token variants (connector outputs, e.g. zeroed): [variant]
    [option], one batched teacher-forced pass per option."""
    from .analysis.zeroing import score_answer
    from .conversation import build_prompt, clean_answer, tokenizer_image_token

    prompt = lmm.prompt_ids(item.question)
    per_option = []
    for text in item.options:
        # the training string of the question answered by the option, its reply's end (stop string) cut off
        whole = clean_answer(build_prompt(lmm.template, [(item.question, text)], add_generation_prompt=False),
                             lmm.template)
        whole = tokenizer_image_token(whole, lmm.model.tokenizer)
        if whole[:len(prompt)] != prompt or len(whole) == len(prompt):
            raise VidlmmError(f"Question {item.id}: the template does not put the answer after the prompt.")
        per_option.append([ll for ll, _ in score_answer(lmm, prompt, whole[len(prompt):], visuals)])
    return [list(row) for row in zip(*per_option)]


def missing_entry(item_id: str, video: str, err: BaseException) -> dict:
    """A question not scored because its video could not be read: {"id", "video" (base name), "why" (the
    error's first line)}."""
    text = str(err).strip()
    return {"id": item_id, "video": Path(video).name, "why": text.splitlines()[0] if text else type(err).__name__}


def item_sampling(item: MCItem, sampling, bounds: bool = True):
    """The frames to read for `item`: `sampling` restricted to the item's [start, end] window (MVBench's rule;
    for a video file only when `bounds`, for a folder of frames always, as the reference's MVBench script does)
    and told the frame rate of a folder of frames."""
    from dataclasses import replace

    bounded = item.start is not None or item.end is not None
    window = {"start": item.start, "end": item.end} if bounded and (bounds or item.fps) else {}
    rate = {"folder_fps": item.fps} if item.fps else {}
    return replace(sampling, **window, **rate) if window or rate else sampling


def _differ(written: dict, now: dict) -> list[str]:
    """The settings keys in which two runs differ. The model's folder counts only when a side lacks the weights'
    fingerprint: the same weights read from another folder (a copied or moved model) keep their records."""
    keys = {**written, **now}
    if written.get("weights") is not None and now.get("weights") is not None:
        keys.pop("model", None)
    return sorted(k for k in keys if written.get(k) != now.get(k))


class RecordLog:
    """`--records FILE.jsonl`: every scored question is appended as one JSON line the moment it is scored (a
    single write on an append-mode file, so the processes of a distributed run can share it on a local disk; not
    on NFS, where appends are not atomic), and a rerun skips the questions already there. A line holds the run's
    settings; a file written with other settings is refused, or with ``restart`` emptied (a cache its caller
    owns, like the rebuild's scores of the model it trained). The same weights in another folder are the same
    settings (`_differ`). A line torn by a kill is ignored (its question is scored again). record_type: the
    dataclass of a record (`ItemRecord`; the zeroing curves keep `analysis.ZeroingRecord`)."""

    def __init__(self, path, settings: dict, record_type=None, restart: bool = False):
        self.path, self.settings = Path(path), settings
        if self.path.is_dir():
            raise VidlmmError(f"--records '{self.path.name}' is a folder; name a .jsonl file.")
        text = self.path.read_text(encoding="utf-8", errors="replace") if self.path.is_file() else ""
        try:
            self.done = self._read(text, record_type or ItemRecord)
        except VidlmmError:
            if not restart:
                raise
            text, self.done = "", {}
            self.path.unlink()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        # a new line first: after a torn last line, the next record must not be glued onto it
        self._write({"settings": settings}, lead="\n" if text and not text.endswith("\n") else "")

    def _read(self, text: str, record_type) -> dict:
        """{id: record} of the file's lines; refuses other settings and lines of another version."""
        done = {}
        for line in text.splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue  # torn by a kill
            if isinstance(entry, dict) and "settings" in entry and (changed := _differ(entry["settings"],
                                                                                      self.settings)):
                raise VidlmmError(f"--records '{self.path.name}' was written by a run with other settings "
                                  f"({', '.join(changed)}); use another file.")
            if isinstance(entry, dict) and "record" in entry:
                try:
                    done[entry["record"]["id"]] = record_type(**entry["record"])
                except (TypeError, KeyError):
                    raise VidlmmError(f"--records '{self.path.name}' holds a line that is not a question's record "
                                      "of this version; use another file.") from None
        return done

    def _write(self, entry: dict, lead: str = "") -> None:
        os.write(self._fd, (lead + json.dumps(entry) + "\n").encode())

    def add(self, record: ItemRecord) -> None:
        self._write({"record": asdict(record)})

    def close(self) -> None:
        os.close(self._fd)


def evaluate(lmm, items: list[MCItem], *, generation=None, style: str = "mvbench", sampling=None,
             progress: bool = False, bounds: bool = True, scoring: str = "generate", records=None,
             restart_records: bool = False, shard: tuple[int, int] = (0, 1)) -> EvalResult:
    """Answer every item with `lmm` (a VideoLMM) and score it; greedy, 16 new tokens unless `generation`.
    bounds: sample a bounded item's [start, end] window (MVBench's rule); False samples the whole video file, as
    TinyLLaVA-Video's MVBench script does (which keeps the window for folders of frames). scoring: "generate"
    (the reference's prompt, a greedy reply, `parse_choice`) or "likelihood" (the option whose text is the most
    likely start of the answer, `option_loglikelihoods`: never unparsable). records: a `RecordLog` (or a path for
    one) that keeps every scored question and skips those scored before; restart_records: a path's file written
    with other settings is started again instead of refused (`RecordLog`'s restart). shard (rank, processes):
    score only the videos whose first-appearance index is rank modulo processes (a distributed run; merge with
    `merge_results`).

    Items are grouped by video (first-appearance order): each video is decoded and encoded once, then all of
    its questions reuse the features. Records come back in the items' order. A video that cannot be read costs
    its questions, listed in `EvalResult.missing` with the reason; the run goes on.
    """
    from .pipeline import GenerationSettings

    if style not in STYLES:
        raise VidlmmError(f"Unknown prompt style '{style}' (use {' or '.join(STYLES)}).")
    if scoring not in SCORINGS:
        raise VidlmmError(f"Unknown scoring '{scoring}' (use {' or '.join(SCORINGS)}).")
    generation = generation or GenerationSettings(max_new_tokens=16, do_sample=False)
    base = sampling or getattr(lmm, "sampling", None)
    if (records is not None or shard[1] > 1) and len({item.id for item in items}) != len(items):
        raise VidlmmError("Question ids must be unique to keep records or split the questions over processes.")
    own_log = records is not None and not isinstance(records, RecordLog)
    if own_log:
        records = RecordLog(records, run_settings(lmm, base, style, scoring, bounds, generation.max_new_tokens),
                            restart=restart_records)
    try:
        return _evaluate(lmm, items, records, base, bounds, shard, style, scoring, generation, progress)
    finally:
        if own_log:
            records.close()


def group_reads(items: list[MCItem], sampling, bounds: bool = True) -> dict[tuple, list[int]]:
    """{(video, sampling of the read): indices of the items it answers}, in first-appearance order: one decode
    and encode per entry (a bounded item's window is its own read). sampling None: the pipeline's own."""
    reads: dict[tuple, list[int]] = {}
    for i, item in enumerate(items):
        frames = item_sampling(item, sampling, bounds) if sampling is not None else None
        reads.setdefault((item.video, frames), []).append(i)
    return reads


def _evaluate(lmm, items, records, base, bounds, shard, style, scoring, generation, progress) -> EvalResult:
    mine = [group for k, group in enumerate(group_reads(items, base, bounds).items()) if k % shard[1] == shard[0]]
    scored: dict[int, ItemRecord] = {}
    missing = []
    ticker = _Progress(sum(len(indices) for _, indices in mine), progress)
    t0 = time.perf_counter()
    for (video, frames), indices in mine:
        todo = []
        for i in indices:
            if records is not None and items[i].id in records.done:
                scored[i] = records.done[items[i].id]
                ticker.tick(f"kept {items[i].id} from the records", reused=True)
            else:
                todo.append(i)
        if todo:
            missing += _score_video(lmm, video, frames, [(i, items[i]) for i in todo], scored, style, scoring,
                                    generation, records, ticker)
    result = summarize([scored[i] for i in sorted(scored)], time.perf_counter() - t0, style)
    order = {item.id: k for k, item in enumerate(items)}
    result.missing = sorted(missing, key=lambda m: order.get(m["id"], -1))  # item order, as merge_results
    return result


def weights_fingerprint(model) -> str:
    """A short hash of a model's weights as loaded: each tensor's name, shape and first and last values. Records
    name the model by its folder, and a folder can be rebuilt (`train.build_embedded`): a rerun then scores again
    instead of keeping the earlier model's answers. It reads 16 values per tensor, not the weights."""
    import hashlib

    import torch

    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        digest.update(f"{name}{tuple(tensor.shape)}".encode())
        digest.update(torch.cat([flat[:8], flat[-8:]]).float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def run_settings(lmm, sampling, style: str, scoring: str, bounds: bool, max_new_tokens: int | None = None) -> dict:
    """What a record depends on: a `RecordLog` refuses to mix runs that differ in any of these (not the data:
    keep one records file per benchmark)."""
    model = getattr(lmm, "model", None)
    return {"model": str(getattr(model, "source", None)),
            "weights": weights_fingerprint(model) if hasattr(model, "state_dict") else None,
            "sampling": sampling.describe() if sampling else None,
            "style": style, "scoring": scoring, "bounds": bounds,
            "max_new_tokens": max_new_tokens if scoring == "generate" else None,
            "likelihood_of": LIKELIHOOD_OF if scoring == "likelihood" else None}


def _score_video(lmm, video, frames, todo, scored, style, scoring, generation, records, ticker) -> list[dict]:
    """Score the (index, item) pairs of one video into `scored`; returns the missing entries when the video
    cannot be read."""
    from .errors import VideoReadError

    try:
        prepared, _ = lmm.prepare(video, frames)
    except (VideoReadError, OSError) as err:
        entries = [missing_entry(item.id, video, err) for _, item in todo]
        for entry in entries:
            ticker.tick(f"skipped {entry['video']}: {entry['why']}")
        return entries
    for i, item in todo:
        scores = None
        if scoring == "likelihood":
            scores = option_loglikelihoods(lmm, prepared, item)
            best = max(range(len(scores)), key=scores.__getitem__)
            response, parsed = item.options[best], item.letters[best]
        else:
            response = lmm.ask(prepared, build_mc_question(item, style), generation=generation).text
            parsed = parse_choice(response, item.options, item.letters)
        scored[i] = record = ItemRecord(
            id=item.id, video=item.video, category=item.category, question=item.question,
            answer=item.answer_letter, response=response, parsed=parsed, correct=parsed == item.answer_letter,
            num_options=len(item.options), groups=dict(item.groups), scores=scores)
        if records is not None:
            records.add(record)
        mark = "ok" if record.correct else ("??" if parsed is None else "no")
        ticker.tick(f"{mark} {item.id}: {response[:60]!r}")
    return []


class _Progress:
    """`--progress`: one line per question on stderr, with the estimated time left."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.enabled, self.done, self.fresh = total, enabled, 0, 0
        self.start = time.perf_counter()

    def tick(self, text: str, reused: bool = False) -> None:
        self.done += 1
        self.fresh += not reused
        if not self.enabled:
            return
        left = self.total - self.done
        eta = (time.perf_counter() - self.start) / self.fresh * left if self.fresh else 0.0
        print(f"[{self.done}/{self.total}] {text} (eta {eta:.0f} s)", file=sys.stderr, flush=True)


def open_answer_correct(reply: str, answer: str) -> bool:
    """MMVU's rule for open-ended questions: right when the answer is in the reply or the reply in the answer
    (case-insensitive, spaces collapsed, a trailing period ignored); an empty reply is wrong."""
    reply, answer = _norm_text(reply), _norm_text(answer)
    return bool(reply) and bool(answer) and (answer in reply or reply in answer)


def evaluate_open(lmm, items: list, *, generation=None, sampling=None) -> dict:
    """Score open-ended questions (`benchmarks.OpenItem`, MMVU): a greedy reply to the bare question, judged by
    `open_answer_correct`. Returns {"n", "correct", "accuracy", "per_category", "missing", "items"}; a video that
    cannot be read is listed, as in `evaluate`."""
    from .errors import VideoReadError
    from .pipeline import GenerationSettings

    generation = generation or GenerationSettings(max_new_tokens=64, do_sample=False)
    rows, missing = [], []
    for item in items:
        try:
            prepared, _ = lmm.prepare(item.video, sampling)
        except (VideoReadError, OSError) as err:
            missing.append(missing_entry(item.id, item.video, err))
            continue
        reply = lmm.ask(prepared, item.question, generation=generation).text
        rows.append({"id": item.id, "category": item.category, "answer": item.answer, "response": reply,
                     "correct": open_answer_correct(reply, item.answer)})
    per_category: dict[str, dict] = {}
    for row in rows:
        cat = per_category.setdefault(row["category"], {"n": 0, "correct": 0})
        cat["n"] += 1
        cat["correct"] += row["correct"]
    for cat in per_category.values():
        cat["accuracy"] = cat["correct"] / cat["n"]
    correct = sum(r["correct"] for r in rows)
    return {"n": len(rows), "correct": correct, "accuracy": correct / len(rows) if rows else 0.0,
            "per_category": per_category, "missing": missing, "items": rows}


def merge_results(parts: list[EvalResult], items: list[MCItem], style: str) -> EvalResult:
    """One result from the shards of a distributed run, in the items' order (identical to one process's but
    for `seconds`, the slowest shard's)."""
    order = {item.id: k for k, item in enumerate(items)}
    records = sorted((r for part in parts for r in part.items), key=lambda r: order[r.id])
    result = summarize(records, max((p.seconds for p in parts), default=0.0), style)
    result.missing = sorted((m for part in parts for m in part.missing), key=lambda m: order.get(m["id"], -1))
    return result


__all__ = ["EvalResult", "ItemRecord", "MCItem", "RecordLog", "build_mc_question", "evaluate", "evaluate_open",
           "group_reads", "load_mc_items", "merge_results", "open_answer_correct", "option_loglikelihoods",
           "options_loglikelihoods", "parse_choice", "summarize"]
