"""Data curation, as the paper describes it for its training mix (spec section 6), one command per filter:

    python -m train.curate scan     --annotations A.json --video-root DIR [--out clean.json]
    python -m train.curate duration --annotations A.json --video-root DIR --preset llava-video-178k|valley
                                    [--max-seconds S] [--out short.json]
    python -m train.curate captions --annotations A.json [--out kept.json] [--show 5]

`scan` opens every video and decodes a few frames (corrupt, empty, audio-only and missing files are found);
`duration` keeps videos of at most 1 minute (the LLaVA-Video-178K subsets) or 5 minutes (Valley); `captions` drops
samples whose answers talk about when a video was filmed, the camera angle or the place (the Valley filter).
Each prints a summary and, with --out, writes the kept samples in the same annotation format.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from vidlmm.errors import VideoReadError
from vidlmm.video import FrameSampling, probe_video, read_video

PRESETS = {"llava-video-178k": 60.0, "valley": 300.0}

# The Valley caption filter: answers about filming time, camera work or geography say nothing the frames show.
CAPTION_PATTERNS = {
    "filming time": r"\b(filmed|shot|recorded|captured|taken)\b.{0,40}\b(in|on|during|at)\b.{0,20}"
                    r"\b(\d{4}|\d{1,2}(st|nd|rd|th)|january|february|march|april|may|june|july|august|september|"
                    r"october|november|december|morning|afternoon|evening|night|spring|summer|autumn|fall|winter)\b"
                    r"|\b(date|time) of (filming|recording|shooting)\b",
    "camera angle": r"\b(camera|shot|lens)\b.{0,30}\b(angle|pans?|panning|zooms?|zooming|tilts?|tilting|"
                    r"perspective|close-?up|wide-?angle|aerial|overhead|drone|handheld|tracking)\b"
                    r"|\b(aerial|drone|bird'?s[- ]eye|overhead|low[- ]angle|high[- ]angle|wide[- ]angle) "
                    r"(shot|view|footage)\b",
    # a place name is a capitalised word, so only the keywords around it ignore case
    "geographic location": r"(?i:\b(filmed|shot|recorded|taken|located|takes place|set)\b.{0,20}\bin\b)\s+"
                           r"(the )?[A-Z][a-z]+"
                           r"|(?i:\b(city|country|state|province|region|continent) of) [A-Z][a-z]+"
                           r"|(?i:\b(latitude|longitude|coordinates|gps)\b)",
}
_COMPILED = {reason: re.compile(p, 0 if reason == "geographic location" else re.IGNORECASE)
             for reason, p in CAPTION_PATTERNS.items()}


@dataclass
class Report:
    """What a filter did: counts, reasons and the samples kept."""

    command: str
    total: int = 0
    kept: list = field(default_factory=list)
    dropped: Counter = field(default_factory=Counter)
    examples: dict = field(default_factory=dict)  # reason -> a few (id, detail)
    extra: dict = field(default_factory=dict)

    def drop(self, reason: str, item: dict, detail: str = "") -> None:
        self.dropped[reason] += 1
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append((str(item.get("id", "?")), detail))

    def summary(self) -> str:
        lines = [f"{self.command}: {self.total} samples, kept {len(self.kept)}, dropped {sum(self.dropped.values())}"]
        for reason, n in self.dropped.most_common():
            lines.append(f"  {reason}: {n}")
            for ident, detail in self.examples.get(reason, []):
                lines.append(f"    {ident}: {detail}" if detail else f"    {ident}")
        for key, value in self.extra.items():
            lines.append(f"  {key}: {value}")
        return "\n".join(lines)

    def to_json(self) -> dict:
        return {"command": self.command, "total": self.total, "kept": len(self.kept), "dropped": dict(self.dropped),
                "examples": self.examples, **self.extra}


def load_items(files: Iterable[str | Path]) -> list[dict]:
    items = []
    for file in files:
        data = json.loads(Path(file).read_text())
        if not isinstance(data, list):
            raise ValueError(f"{file}: an annotation file is a JSON list of samples")
        items.extend(data)
    return items


def _resolve(item: dict, roots: list[Path]) -> Path | None:
    rel = item.get("video")
    if not rel:
        return None
    return next((r / rel for r in roots if (r / rel).exists()), None)


def _videos(items: list[dict], roots: list[Path], report: Report):
    """(item, path) for every item whose video exists; items without one are dropped as missing."""
    for item in items:
        path = _resolve(item, roots)
        if path is None:
            report.drop("missing video", item, str(item.get("video")))
            continue
        yield item, path


def scan(items: list[dict], roots: list[Path], *, frames: int = 4) -> Report:
    """Open every video and decode `frames` uniformly spaced frames; unreadable ones are dropped by kind."""
    report = Report("scan", total=len(items))
    ok = {}
    sampling = FrameSampling(mode="uniform", num_frames=frames)
    for item, path in _videos(items, roots, report):
        key = str(path)
        if key not in ok:
            try:
                read_video(path, sampling)
                ok[key] = None
            except VideoReadError as err:
                ok[key] = err
        if ok[key] is None:
            report.kept.append(item)
        else:
            report.drop(f"unreadable ({ok[key].kind})", item, f"{path}: {ok[key]}")
    report.extra["distinct videos"] = len(ok)
    return report


def filter_duration(items: list[dict], roots: list[Path], max_seconds: float) -> Report:
    """Keep samples whose video lasts at most `max_seconds` (frames / fps from the container, nothing decoded)."""
    report = Report(f"duration <= {max_seconds:g} s", total=len(items))
    seconds: dict[str, float | VideoReadError] = {}
    for item, path in _videos(items, roots, report):
        key = str(path)
        if key not in seconds:
            try:
                total, fps, _ = probe_video(path)
                seconds[key] = total / fps if fps > 0 else float("inf")
            except VideoReadError as err:
                seconds[key] = err
        value = seconds[key]
        if isinstance(value, VideoReadError):
            report.drop(f"unreadable ({value.kind})", item, str(path))
        elif value > max_seconds:
            report.drop("too long", item, f"{value:.1f} s")
        else:
            report.kept.append(item)
    durations = sorted(v for v in seconds.values() if isinstance(v, float))
    if durations:
        report.extra["duration median / max (s)"] = f"{durations[len(durations) // 2]:.1f} / {durations[-1]:.1f}"
    return report


def caption_problem(text: str) -> str | None:
    """The Valley filter's reason to drop a caption, or None to keep it."""
    return next((reason for reason, pattern in _COMPILED.items() if pattern.search(text)), None)


def filter_captions(items: list[dict]) -> Report:
    """Drop samples where any answer (a `gpt` turn) is about filming time, camera angle or location."""
    report = Report("caption filter", total=len(items))
    for item in items:
        answers = [t.get("value", "") for t in item.get("conversations", []) if t.get("from") in ("gpt", "assistant")]
        reason = next((r for r in map(caption_problem, answers) if r), None)
        if reason:
            text = next(a for a in answers if caption_problem(a) == reason)
            report.drop(reason, item, text[:80])
        else:
            report.kept.append(item)
    return report


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.curate", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, text in (("scan", "find corrupt, empty and missing videos"),
                       ("duration", "keep videos up to a maximum duration"),
                       ("captions", "drop answers about filming time, camera angle or location (Valley)")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--annotations", nargs="+", required=True, help="annotation JSON file(s)")
        if name != "captions":
            p.add_argument("--video-root", nargs="+", default=[], help="folder(s) the video paths are relative to")
        p.add_argument("--out", help="write the kept samples here (same format)")
        p.add_argument("--json", action="store_true", help="print the summary as JSON")
        if name == "duration":
            p.add_argument("--preset", choices=list(PRESETS), help="llava-video-178k: 60 s; valley: 300 s")
            p.add_argument("--max-seconds", type=float)
        if name == "scan":
            p.add_argument("--frames", type=int, default=4, help="frames decoded per video")
    args = parser.parse_args(list(argv) if argv is not None else None)
    try:
        items = load_items(args.annotations)
    except (OSError, ValueError) as err:
        print(f"error: cannot read annotations: {err}", file=sys.stderr)
        return 2
    roots = [Path(r) for r in getattr(args, "video_root", [])]
    roots += [Path(f).parent for f in args.annotations]
    if args.command == "scan":
        report = scan(items, roots, frames=args.frames)
    elif args.command == "duration":
        limit = args.max_seconds if args.max_seconds is not None else PRESETS.get(args.preset)
        if limit is None:
            print("error: give --preset or --max-seconds", file=sys.stderr)
            return 2
        report = filter_duration(items, roots, limit)
    else:
        report = filter_captions(items)
    if args.out:
        Path(args.out).write_text(json.dumps(report.kept, indent=1, ensure_ascii=False))
    print(json.dumps(report.to_json(), indent=2) if args.json else report.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
