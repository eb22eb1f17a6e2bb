"""The world on disk: annotation records, `generate_world` (rendering in worker processes), its summary and
`python -m train.world`."""

from __future__ import annotations

import argparse
import hashlib
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Iterable

from .render import render_clip, video_codec, video_extension, write_clip
from .spec import (
    CAPTION_PROMPTS, COLOUR_NAMES, ClipSpec, DIRECTIONS, EVENT_KINDS, FORMAT, IMAGE_TOKEN, SHAPES, WorldConfig,
    WorldManifest, _SPLIT_CODES, _rng, sample_clip,
)
from .text import _move_answer, _pick, _qa_select, _text_rng, caption, mc_items


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
    summary = sys.modules[__package__].__doc__.split("\n\n")[0]  # the package's docstring
    p = argparse.ArgumentParser(prog="python -m train.world", description=summary)
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
