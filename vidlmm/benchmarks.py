"""The public video multiple-choice benchmarks read as they ship, with no conversion step.

    data = load_benchmark("MVBench/")            # a benchmark root or a file; the format is detected
    data = load_benchmark("videomme/test-00000-of-00001.parquet", video_root="data/", format="videomme")
    data.items, data.missing, data.open_ended

Formats (`FORMATS`; `../shared/spec/benchmarks.md` of the project has each layout):

* ``mvbench``: a root with ``json/<task>.json`` and ``video/``; each task's videos sit in its own folder
  (`MVBENCH_TASKS`); the bounded tasks carry ``start`` / ``end`` in seconds; the TV task's "videos" are folders of
  JPEG frames at 3 fps. The gold letter is the candidate whose text equals ``answer``.
* ``videomme``: the parquet file (read with pyarrow); videos ``<video root>/<videoID>.mp4`` (``.MP4``, ``.mkv``);
  results per ``duration`` (short / medium / long) beside the task types.
* ``mlvu``: the dev root, ``json/<n>_<task>.json`` + ``video/<n>_<task>/``; M-Avg is the mean over tasks. The
  hub's copy (``video_name``, the options as the question's last lines, a letter answer, ``task_type``) reads too.
* ``mmvu``: ``validation.json`` (choices as a dict; video URLs mapped under the local root); open-ended questions
  are kept apart (`Benchmark.open_ended`), scored by containment.
* ``longvideobench``: ``lvb_val.json`` (``correct_choice`` is an index), videos under ``videos/``.
* ``egoschema``: ``questions.json`` + ``subset_answers.json`` (the 500 answered questions; the rest are scored only
  by the benchmark's server), or lmms-eval's copy (``question_idx``, ``video_idx``, ``option`` list, ``answer``).
* ``json``: the project's flat JSON / JSONL list (`evaluate.load_mc_items`).

Nothing here aborts on a video that is not there: the item goes to `Benchmark.missing` with the reason, and the
run goes on with the rest. A malformed file or item is still a one-line `VidlmmError`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from .decoders import FRAME_EXTENSIONS
from .errors import VidlmmError
from .evaluate import MCItem, _dict_options, _read_json_items, _resolve_answer, _split_prefixed

FORMATS = ("json", "mvbench", "videomme", "mlvu", "mmvu", "longvideobench", "egoschema")
VIDEO_EXTENSIONS = (".mp4", ".MP4", ".mkv", ".webm", ".avi", ".mov")

# MVBench: task json -> (folder under video/, data type, bounded), as the benchmark ships
MVBENCH_TASKS = {
    **{t: ("star/Charades_v1_480", "video", True) for t in ("action_sequence", "action_prediction",
                                                               "object_interaction")},
    "action_localization": ("sta/sta_video", "video", True),
    "episodic_reasoning": ("tvqa/frames_fps3_hq", "frames", True),
    "fine_grained_pose": ("nturgbd", "video", False),
    "action_antonym": ("ssv2_video", "video", False),
    "fine_grained_action": ("Moments_in_Time_Raw/videos", "video", False),
    "unexpected_action": ("FunQA_test/test", "video", False),
    **{t: ("clevrer/video_validation", "video", False) for t in ("object_existence", "moving_direction",
                                                                 "moving_count", "moving_attribute",
                                                                 "counterfactual_inference")},
    **{t: ("perception/videos", "video", False) for t in ("object_shuffle", "action_count", "state_change",
                                                           "character_order")},
    "scene_transition": ("scene_qa/video", "video", False),
    "egocentric_navigation": ("vlnqa", "video", False),
}
MVBENCH_FRAME_FPS = 3.0  # the TV task's frame folders (frames_fps3_hq)
MLVU_TASK = re.compile(r"^(\d+)_(.+)$")


@dataclass
class OpenItem:
    """An open-ended question (MMVU): scored by case-insensitive containment of the answer in the reply or of the
    reply in the answer."""

    id: str
    video: str
    question: str
    answer: str
    category: str = "all"


@dataclass
class Benchmark:
    """What a benchmark's files hold, ready for `evaluate`: the multiple-choice items whose video is here, the
    ones whose video is not (`missing`: {"id", "video", "why"}, all of the benchmark's), open-ended items (MMVU),
    the prompt style of the reference for it, and how its published headline averages (`macro`: MLVU's M-Avg,
    `EvalResult.macro_accuracy`; else `micro`, `EvalResult.accuracy`)."""

    format: str
    items: list[MCItem]
    missing: list[dict] = field(default_factory=list)
    open_ended: list[OpenItem] = field(default_factory=list)
    style: str = "mvbench"
    average: str = "micro"
    notes: list[str] = field(default_factory=list)


# ---- detection ----------------------------------------------------------------------------------------------

def detect_format(path: str | Path) -> str:
    """The format of a benchmark file or root (one of FORMATS); a one-line VidlmmError when none fits."""
    path = Path(path)
    if not path.exists():
        raise VidlmmError(f"Cannot read data '{path.name}': no such file or folder.")
    if path.is_file():
        if path.suffix == ".parquet":
            return "videomme"
        try:
            data = _read_json_items(path)
        except VidlmmError:
            return "json"  # not a list of questions: the flat reader says why in one sentence
        first = data[0] if data and isinstance(data[0], dict) else {}
        if "q_uid" in first or "question_idx" in first:
            return "egoschema"
        if "correct_choice" in first:
            return "longvideobench"
        if isinstance(first.get("choices"), dict) and "question_type" in first:
            return "mmvu"
        return "json"
    if (path / "json").is_dir() and (path / "video").is_dir():
        names = [p.stem for p in (path / "json").glob("*.json")]
        return "mlvu" if names and all(MLVU_TASK.match(n) for n in names) else "mvbench"
    for name, fmt in (("lvb_val.json", "longvideobench"), ("questions.json", "egoschema"),
                      ("validation.json", "mmvu")):
        if (path / name).is_file():
            return fmt
    if _parquet_files(path):  # after the named files: some copies of the others ship parquet beside them
        return "videomme"
    raise VidlmmError(f"'{path.name}' is a folder but no benchmark layout was recognised (MVBench / MLVU: json/ + "
                      "video/; Video-MME: a .parquet; LongVideoBench: lvb_val.json; EgoSchema: questions.json; "
                      "MMVU: validation.json); name the data file itself.")


def _parquet_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.parquet") if p.is_file())


def load_benchmark(path: str | Path, video_root: str | Path | None = None, *, format: str | None = None) -> Benchmark:
    """Read a benchmark file or root in its shipped format (detected unless `format` names one)."""
    path = Path(path)
    fmt = format or detect_format(path)
    if fmt not in FORMATS:
        raise VidlmmError(f"Unknown data format '{fmt}' (use {', '.join(FORMATS)}).")
    if video_root is not None and not Path(video_root).is_dir():
        raise VidlmmError(f"Video root '{Path(video_root).name}' is not a folder.")
    reader = {"json": _read_flat, "mvbench": _read_mvbench, "videomme": _read_videomme, "mlvu": _read_mlvu,
              "mmvu": _read_mmvu, "longvideobench": _read_longvideobench, "egoschema": _read_egoschema}[fmt]
    return reader(path, Path(video_root) if video_root is not None else None)


# ---- shared pieces ------------------------------------------------------------------------------------------

def _item(raw_id, video: Path, question, texts, letters, answer, where: str, category="all", **extra) -> MCItem:
    if not isinstance(question, str) or not question.strip():
        raise VidlmmError(f"{where}: missing 'question' (a string).")
    if not 2 <= len(texts) <= 26 or any(not t for t in texts):
        raise VidlmmError(f"{where}: needs 2 to 26 non-empty options, got {len(texts)}.")
    letter = _resolve_answer(answer, texts, letters, where)
    return MCItem(id=str(raw_id), video=str(video), question=question.strip(), options=texts, letters=letters,
                  answer_letter=letter, category=str(category) if category not in (None, "") else "all", **extra)


def _options(raw, where: str) -> tuple[list[str], list[str]]:
    if isinstance(raw, dict):
        return _dict_options(raw, where)
    if isinstance(raw, list) and all(isinstance(o, (str, int, float)) for o in raw):
        return _split_prefixed(raw)
    raise VidlmmError(f"{where}: the options must be a list of strings or a dict letter -> text.")


def _video_file(folder: Path, name: str, extensions=VIDEO_EXTENSIONS) -> tuple[Path, str | None]:
    """(path, None) for the video `name` under `folder` (tried as given, then with each extension), or (the path
    as given, why it is not usable)."""
    given = folder / name
    if given.is_file():
        return given, None
    for ext in extensions:
        candidate = folder / f"{name}{ext}"
        if candidate.is_file():
            return candidate, None
    return given, "not found"


def _frame_folder(path: Path) -> str | None:
    """Why `path` is not a folder of numbered frames, or None."""
    if not path.is_dir():
        return "not found"
    if not any(p.suffix.lower() in FRAME_EXTENSIONS for p in path.iterdir()):
        return "a folder without frame images"
    return None


def _seconds(value, where: str) -> float:
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not (seconds >= 0 and seconds < float("inf")):
        raise VidlmmError(f"{where}: 'start' / 'end' must be seconds, got {value!r}.")
    return seconds


def _collect(items: list, missing: list, item: MCItem, why: str | None) -> None:
    if why is None:
        items.append(item)
    else:
        missing.append({"id": item.id, "video": Path(item.video).name, "why": why})


# ---- readers ------------------------------------------------------------------------------------------------

def _read_flat(path: Path, video_root: Path | None) -> Benchmark:
    from .evaluate import load_mc_items

    items = load_mc_items(path, video_root, check_videos=False)
    bench = Benchmark("json", [])
    for item in items:
        _collect(bench.items, bench.missing, item, None if Path(item.video).is_file() else "not found")
    return bench


def _read_mvbench(root: Path, video_root: Path | None) -> Benchmark:
    """MVBench: one json per task; `video_root` defaults to `root/video`."""
    videos = video_root or root / "video"
    bench = Benchmark("mvbench", [], style="mvbench")
    files = sorted((root / "json").glob("*.json")) if root.is_dir() else [root]
    if not files:
        raise VidlmmError(f"'{root.name}' has no json/<task>.json files.")
    for file in files:
        task = file.stem
        if task not in MVBENCH_TASKS:
            raise VidlmmError(f"MVBench task file '{file.name}' is not one of the 20 tasks "
                              f"({', '.join(sorted(MVBENCH_TASKS)[:3])}, ...).")
        folder, kind, bounded = MVBENCH_TASKS[task]
        for index, raw in enumerate(_read_json_items(file)):
            where = f"Item {index} of '{file.name}'"
            if not isinstance(raw, dict) or not isinstance(raw.get("video"), str):
                raise VidlmmError(f"{where}: missing 'video'.")
            texts, letters = _options(raw.get("candidates"), where)
            extra = {}
            if bounded and raw.get("start") is not None and raw.get("end") is not None:
                extra = {"start": _seconds(raw["start"], where), "end": _seconds(raw["end"], where)}
            if kind == "frames":
                path = videos / folder / raw["video"]
                why = _frame_folder(path)
                extra["fps"] = MVBENCH_FRAME_FPS
            else:
                path, why = _video_file(videos / folder, raw["video"])
            item = _item(f"{task}_{index}", path, raw.get("question"), texts, letters, raw.get("answer"), where,
                         category=task, **extra)
            _collect(bench.items, bench.missing, item, why)
    return bench


def _read_videomme(path: Path, video_root: Path | None) -> Benchmark:
    """Video-MME's parquet; videos in `video_root`, else the first of root/data, root/videos, root."""
    files = [path] if path.is_file() else _parquet_files(path)
    if not files:
        raise VidlmmError(f"'{path.name}' holds no .parquet file.")
    root = path.parent.parent if path.is_file() and path.parent.name == "videomme" else \
        (path.parent if path.is_file() else path)
    videos = video_root or next((d for d in (root / "data", root / "videos") if d.is_dir()), root)
    bench = Benchmark("videomme", [], style="videomme")
    for file in files:
        for index, raw in enumerate(_read_parquet(file)):
            where = f"Row {index} of '{file.name}'"
            texts, letters = _options(_as_list(raw.get("options")), where)
            video_id = str(raw.get("videoID") or raw.get("video_id") or "")
            if not video_id:
                raise VidlmmError(f"{where}: no videoID.")
            video, why = _video_file(videos, video_id, (".mp4", ".MP4", ".mkv"))
            item = _item(raw.get("question_id", index), video, raw.get("question"), texts, letters,
                         raw.get("answer"), where, category=raw.get("task_type") or "all",
                         groups={"duration": str(raw.get("duration") or "unknown")})
            _collect(bench.items, bench.missing, item, why)
    return bench


def _read_parquet(file: Path) -> list[dict]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise VidlmmError("Reading Video-MME's parquet needs pyarrow (pip install pyarrow).") from None
    try:
        return pq.read_table(file).to_pylist()
    except Exception as err:  # ArrowInvalid and friends: a damaged or non-parquet file
        raise VidlmmError(f"'{file.name}' could not be read as parquet ({type(err).__name__}).") from None


def _as_list(value):
    """A parquet list column arrives as a list; some exports store it as a numpy array or a JSON string."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError:
            return value
    return list(value) if value is not None and not isinstance(value, (dict, str)) else value


def _read_mlvu(root: Path, video_root: Path | None) -> Benchmark:
    if not (root / "json").is_dir():
        raise VidlmmError(f"'{root.name}' is not an MLVU root (json/<n>_<task>.json + video/).")
    videos = video_root or root / "video"
    bench = Benchmark("mlvu", [], style="mvbench", average="macro")
    files = [p for p in (root / "json").glob("*.json") if MLVU_TASK.match(p.stem)]
    files.sort(key=lambda p: int(MLVU_TASK.match(p.stem).group(1)))
    for file in files:
        task = MLVU_TASK.match(file.stem).group(2)
        for index, raw in enumerate(_read_json_items(file)):
            where = f"Item {index} of '{file.name}'"
            if not isinstance(raw, dict):
                raise VidlmmError(f"{where}: missing 'video'.")
            if isinstance(raw.get("video"), str):
                question, (texts, letters) = raw.get("question"), _options(raw.get("candidates"), where)
                category, path, why = task, *_video_file(videos / file.stem, raw["video"])
            elif isinstance(raw.get("video_name"), str):  # the hub's copy: options inside the question
                question, texts, letters = _options_in_question(raw.get("question"), where)
                name = raw["video_name"]
                category = raw.get("task_type") or task
                path, why = _video_file(videos, name) if "/" in name else _video_file(videos / file.stem, name)
            else:
                raise VidlmmError(f"{where}: missing 'video' (or the hub copy's 'video_name').")
            item = _item(f"{file.stem}_{index}", path, question, texts, letters, raw.get("answer"), where,
                         category=category)
            _collect(bench.items, bench.missing, item, why)
    return bench


OPTION_LINE = re.compile(r"^\s*\(?([A-Z])[).:]\s*(.+?)\s*$")


def _options_in_question(text, where: str) -> tuple[str, list[str], list[str]]:
    """(question, option texts, letters) from a question whose last lines are its options, "(A) text" or
    "A. text" (MLVU's hub copy)."""
    if not isinstance(text, str):
        raise VidlmmError(f"{where}: missing 'question' (a string).")
    lines = [line for line in text.strip().splitlines() if line.strip()]
    first = len(lines)
    while first > 0 and OPTION_LINE.match(lines[first - 1]):
        first -= 1  # the trailing run of option lines
    found = [OPTION_LINE.match(line) for line in lines[first:]]
    letters = [m.group(1) for m in found]
    while letters and letters[0] != "A":  # "Q: what..." just above "(A)" is the question's line, not an option
        first, found, letters = first + 1, found[1:], letters[1:]
    if len(letters) < 2 or letters != [chr(ord("A") + k) for k in range(len(letters))] or first == 0:
        raise VidlmmError(f"{where}: the question's last lines must be its options, '(A) text' each, from A on.")
    return "\n".join(lines[:first]), [m.group(2) for m in found], letters


def _local_video(url: str, root: Path) -> Path:
    """MMVU's video URLs point at the hub; the part after `resolve/<revision>/` is the path under the local root."""
    match = re.search(r"/resolve/[^/]+/(.+)$", url)
    return root / (match.group(1) if match else url.lstrip("/"))


def _read_mmvu(path: Path, video_root: Path | None) -> Benchmark:
    file = path / "validation.json" if path.is_dir() else path
    root = video_root or file.parent
    bench = Benchmark("mmvu", [], style="videomme")
    for index, raw in enumerate(_read_json_items(file)):
        where = f"Item {index} of '{file.name}'"
        if not isinstance(raw, dict) or not isinstance(raw.get("video"), str):
            raise VidlmmError(f"{where}: missing 'video'.")
        video = _local_video(raw["video"], root)
        category = (raw.get("metadata") or {}).get("subject") if isinstance(raw.get("metadata"), dict) else None
        category = category or raw.get("subject") or "all"
        if raw.get("question_type") == "open-ended":
            if video.is_file():
                bench.open_ended.append(OpenItem(str(raw.get("id", index)), str(video), str(raw.get("question")),
                                                 str(raw.get("answer")), str(category)))
            else:
                bench.missing.append({"id": str(raw.get("id", index)), "video": video.name, "why": "not found"})
            continue
        texts, letters = _options(raw.get("choices"), where)
        item = _item(raw.get("id", index), video, raw.get("question"), texts, letters, raw.get("answer"), where,
                     category=category)
        _collect(bench.items, bench.missing, item, None if video.is_file() else "not found")
    return bench


def _read_longvideobench(path: Path, video_root: Path | None) -> Benchmark:
    file = path / "lvb_val.json" if path.is_dir() else path
    videos = video_root or file.parent / "videos"
    bench = Benchmark("longvideobench", [], style="videomme")
    for index, raw in enumerate(_read_json_items(file)):
        where = f"Item {index} of '{file.name}'"
        if not isinstance(raw, dict) or not isinstance(raw.get("video_path"), str):
            raise VidlmmError(f"{where}: missing 'video_path'.")
        texts, letters = _options(raw.get("candidates"), where)
        answer = raw.get("correct_choice")
        if not isinstance(answer, int) or isinstance(answer, bool):
            raise VidlmmError(f"{where}: 'correct_choice' must be an option index.")
        path_, why = _video_file(videos, raw["video_path"])
        groups = {"duration": str(raw["duration_group"])} if raw.get("duration_group") is not None else {}
        item = _item(raw.get("id", index), path_, raw.get("question"), texts, letters, answer, where,
                     category=raw.get("question_category") or "all", groups=groups)
        _collect(bench.items, bench.missing, item, why)
    return bench


def _read_egoschema(path: Path, video_root: Path | None) -> Benchmark:
    """Both layouts: the benchmark's questions.json + subset_answers.json, or lmms-eval's item list."""
    file = path / "questions.json" if path.is_dir() else path
    videos = video_root or next((d for d in (file.parent / "videos", file.parent / "good_clips_git")
                                 if d.is_dir()), file.parent)
    data = _read_json_items(file)
    bench = Benchmark("egoschema", [], style="videomme")
    answers_file = file.parent / "subset_answers.json"
    answers = {}
    if answers_file.is_file():
        try:
            answers = json.loads(answers_file.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError):
            answers = None
        if not isinstance(answers, dict):
            raise VidlmmError(f"'{answers_file.name}' must map question ids to option indices.")
    unanswered = 0
    for index, raw in enumerate(data):
        where = f"Item {index} of '{file.name}'"
        if not isinstance(raw, dict):
            raise VidlmmError(f"{where} is not a JSON object.")
        if "q_uid" in raw:  # the benchmark's own layout
            uid = str(raw["q_uid"])
            texts = [str(raw.get(f"option {i}", "")).strip() for i in range(5)]
            letters = list("ABCDE")
            answer, video_name = answers.get(uid), uid
        else:  # lmms-eval: question_idx, video_idx, option ["A. text", ...], answer
            uid = str(raw.get("question_idx", index))
            texts, letters = _options(raw.get("option"), where)
            answer, video_name = raw.get("answer"), str(raw.get("video_idx", uid))
        if answer is None or answer == "":
            unanswered += 1  # scored only by the benchmark's server
            continue
        if isinstance(answer, str) and answer.strip().isdigit():
            answer = int(answer)
        video, why = _video_file(videos, video_name)
        item = _item(uid, video, raw.get("question"), texts, letters, answer, where)
        _collect(bench.items, bench.missing, item, why)
    if unanswered:
        bench.notes.append(f"{unanswered} questions have no public answer (scored by the benchmark's server only)")
    return bench


__all__ = ["Benchmark", "FORMATS", "MVBENCH_TASKS", "OpenItem", "detect_format", "load_benchmark"]
