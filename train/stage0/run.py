"""Stage 0 from end to end (`run_stage0`), its summary and `python -m train.stage0`."""

from __future__ import annotations

import argparse
import inspect
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable

import torch

from .common import BUDGETS
from .lm import pretrain_llm, symbolic_read
from .text import build_tokenizer, tokenizer_report
from .tower import pretrain_vision


TRAINERS = {"llm": pretrain_llm, "vision": pretrain_vision}


DRAW_RECORD = "draw.json"  # a judged draw's stats and read, beside its weights
DRAW_SETTINGS = {"draws", "min_colour_read"}  # the LM's settings `drawn_llm` reads, not `pretrain_llm`


def settable(part: str) -> set[str]:
    """The settings of a stage-0 part a budget or an override may set: its trainer's keyword arguments (and the
    LM's `DRAW_SETTINGS`). ``seed`` among them: a part at its own seed ("llm.seed=1", the LM's weights and data
    draws; the run's seed otherwise); an LM at its own seed is that one draw unless ``llm.draws`` is set too."""
    own = {"progress", "siglip_dir"}  # set by run_stage0 itself
    return {name for name, p in inspect.signature(TRAINERS[part]).parameters.items()
            if p.kind is p.KEYWORD_ONLY and name not in own} | (DRAW_SETTINGS if part == "llm" else set())


def _colour_read(read: dict) -> float:
    right, asked = map(int, read.get("colour", "0/0").split("/"))
    return right / asked if asked else 0.0


def drawn_llm(world_dir, out: Path, settings: dict, progress: bool) -> dict:
    """`pretrain_llm` into ``out/llm``, drawn again at the next seeds (up to ``draws`` in all) until the LM reads the
    colour of at least ``min_colour_read`` of the named objects in exact symbolic videos of held-out training clips
    (`symbolic_read`, about 20 s). Why: with one recipe, some draws of the LM learn to find an object by its shape
    and others never do, and the connectors trained on a draw that does not read colours answer colour questions
    far worse (docs/embedded-models.md, "A third draw of stage 0's LM": reads of 107, 90 and 58 of 108 gave group
    97, 63 and 65 % of its colour questions). A rejected draw stays in ``out/llm.seed<N>``; when none reaches the
    floor, the best is kept. Returns the kept draw's `pretrain_llm` stats with its ``seed`` and ``draws``: every
    draw's seed, read and seconds.

    Each judged draw keeps its stats and read in its folder (``draw.json``), so a stage 0 stopped after some draws
    (a draw is about 16-20 min on 2 cores) starts again at the first draw it had not finished."""
    settings = dict(settings)
    draws, floor, first = settings.pop("draws", 1), settings.pop("min_colour_read", 0.0), settings.pop("seed")
    if draws > 1 and not settings.get("symbolic_per_clip"):
        raise ValueError("llm.draws > 1 judges each draw by reading symbolic videos: it needs llm.symbolic_per_clip.")
    tried, kept = [], None
    for seed in range(first, first + max(1, draws)):
        if draws <= 1:
            return pretrain_llm(world_dir, out / "tokenizer", out / "llm", progress=progress, seed=seed, **settings)
        done = _judged_draw(out / f"llm.seed{seed}", seed) or _judged_draw(out / "llm", seed)
        if done is None:
            _put_aside(out)  # an earlier run's judged draw of another seed, not trained over
            stats = pretrain_llm(world_dir, out / "tokenizer", out / "llm", progress=progress, seed=seed, **settings)
            read = symbolic_read(out / "llm", world_dir)
            done = {"stats": stats, "draw": {"seed": seed, "colour_read": _colour_read(read),
                                             "symbolic_video_qa": read, "seconds": stats["seconds"]}}
            (out / "llm" / DRAW_RECORD).write_text(json.dumps(done, indent=1) + "\n")
        elif progress:
            print(f"llm draw at seed {seed}: trained and read by an earlier run", file=sys.stderr, flush=True)
        stats, entry = done["stats"], done["draw"]
        tried.append(entry)
        if progress:
            print(f"llm draw at seed {seed}: colours read {entry['symbolic_video_qa'].get('colour')} (floor "
                  f"{floor:.2f})", file=sys.stderr, flush=True)
        if kept is None or entry["colour_read"] > kept[1]["colour_read"]:
            kept = (stats, entry)
        if entry["colour_read"] >= floor:
            _bring_back(out, seed)
            break
        _put_aside(out)
    else:  # no draw reached the floor: the best comes back
        _bring_back(out, kept[1]["seed"])
    return {**kept[0], "seed": kept[1]["seed"], "draws": tried}


def _judged_draw(folder: Path, seed: int) -> dict | None:
    """``{"stats", "draw"}`` of the LM in ``folder`` if it is the draw at ``seed``, trained and read; else None."""
    record = folder / DRAW_RECORD
    if not record.is_file():
        return None
    done = json.loads(record.read_text())
    return done if done["draw"]["seed"] == seed else None


def _put_aside(out: Path) -> None:
    """The judged draw in ``out/llm``, if any, to ``out/llm.seed<its seed>``."""
    record = out / "llm" / DRAW_RECORD
    if record.is_file():
        aside = out / f"llm.seed{json.loads(record.read_text())['draw']['seed']}"
        shutil.rmtree(aside, ignore_errors=True)
        (out / "llm").rename(aside)


def _bring_back(out: Path, seed: int) -> None:
    """Make the draw at ``seed`` the stage's LM (``out/llm``), wherever a run left it."""
    if _judged_draw(out / "llm", seed) is None:
        _put_aside(out)
        (out / f"llm.seed{seed}").rename(out / "llm")


def parse_settings(options: Iterable[str]) -> dict:
    """``["llm.steps=2800", "vision.set_weight=1"]`` -> ``{"llm": {"steps": 2800}, "vision": {"set_weight": 1}}``
    (values read as JSON)."""
    out: dict = {}
    for option in options:
        key, _, value = option.partition("=")
        part, _, name = key.partition(".")
        out.setdefault(part, {})[name] = json.loads(value)
    return out


def run_stage0(world_dir, out_dir, *, budget: str = "full", seed: int = 0, progress: bool = True,
               overrides: dict | None = None, reuse_text=None, reuse_vision=None, vision: bool = True) -> dict:
    """Tokenizer -> LLM -> vision tower into ``out_dir/{tokenizer,llm,vision,siglip}``; returns and saves stats.

    overrides: {"llm": {...}, "vision": {...}} changes to the budget's settings (any keyword of `pretrain_llm` /
    `pretrain_vision`). reuse_text: a finished stage-0 folder of the same world and seed whose tokenizer and LLM are
    copied instead of trained again (when only the tower changes); reuse_vision: one whose tower is copied (when only
    the LLM changes). vision=False stops after the LLM (an experiment on the LLM alone, measured with
    `python -m train.diagnose context`)."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, not {budget!r}")
    b = {k: (dict(v) if isinstance(v, dict) else v) for k, v in BUDGETS[budget].items()}
    for part, changes in (overrides or {}).items():
        unknown = set(changes) - settable(part) if part in TRAINERS else {"*"}
        if unknown:
            raise ValueError(f"unknown stage-0 setting(s): {part}.{', '.join(sorted(unknown))}")
        b[part].update(changes)
        if part == "llm" and "seed" in changes and "draws" not in changes:
            b[part]["draws"] = 1  # an LM asked for at one seed is that draw, kept whatever it reads
    threads = torch.get_num_threads()
    if b.get("threads"):
        torch.set_num_threads(b["threads"])
    try:
        return _run_stage0(world_dir, Path(out_dir), b, budget, seed, progress, reuse_text, vision, reuse_vision)
    finally:
        torch.set_num_threads(threads)


def _copy_parts(source: Path, out: Path, parts: tuple) -> dict:
    """Copy finished parts of another stage-0 folder into ``out``; returns that folder's stats (empty without its
    stage0.json)."""
    for part in parts:
        if (source / part).is_dir():
            shutil.rmtree(out / part, ignore_errors=True)
            shutil.copytree(source / part, out / part)
    file = source / "stage0.json"
    return json.loads(file.read_text()) if file.is_file() else {}


def _run_stage0(world_dir, out: Path, b: dict, budget: str, seed: int, progress: bool, reuse_text=None,
                vision: bool = True, reuse_vision=None) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    if reuse_text is not None:
        reused = _copy_parts(Path(reuse_text), out, ("tokenizer", "llm"))
        stats = {**{k: reused[k] for k in ("budget", "seed", "world", "tokenizer", "llm")},
                 "text_from": str(reuse_text), "threads": torch.get_num_threads()}
    else:
        tok = build_tokenizer(world_dir, out / "tokenizer", b["vocab_size"], seed=seed)
        stats = {"budget": budget, "seed": seed, "world": str(world_dir), "tokenizer": tokenizer_report(tok),
                 "threads": torch.get_num_threads()}
        stats["tokenizer"]["seconds"] = time.perf_counter() - t0
        if progress:
            print(f"tokenizer: {stats['tokenizer']}", file=sys.stderr, flush=True)
        stats["llm"] = drawn_llm(world_dir, out, {"seed": seed, **b["llm"]}, progress)
    if reuse_vision is not None:
        reused = _copy_parts(Path(reuse_vision), out, ("vision", "siglip"))
        stats["vision_from"] = str(reuse_vision)
        if "vision" in reused:
            stats["vision"] = reused["vision"]
    elif vision:
        stats["vision"] = pretrain_vision(world_dir, out / "vision", progress=progress, siglip_dir=out / "siglip",
                                          **{"seed": seed, **b["vision"]})
    stats["seconds"] = time.perf_counter() - t0
    (out / "stage0.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def format_summary(stats: dict) -> str:
    tk, lm, vi = stats["tokenizer"], stats["llm"], stats.get("vision")
    lines = [
        f"stage 0 ({stats['budget']}, seed {stats['seed']}, {stats['threads']} threads): {stats['seconds']:.0f} s",
        f"tokenizer: vocab {tk['vocab']}; tokens: system {tk['system']}, 'USER: ' {tk['USER: ']}, "
        f"' ASSISTANT:' {tk[' ASSISTANT:']}, MC suffix {tk['mc_suffix']}, '(A) Red' {tk['(A) Red']} "
        f"({tk['seconds']:.1f} s)",
        f"llm: {lm['params'] / 1e6:.2f} M params, {lm['steps']} steps x {lm['batch_size']} seqs "
        f"({lm['train_sequences']} sequences, {lm['train_tokens'] / 1e6:.2f} M tokens"
        + (f"; {lm['tokens_seen'] / 1e6:.2f} M seen, {100 * lm['padding']:.0f} % padding" if "padding" in lm else "")
        + f"), loss {lm['first_loss']:.3f} -> "
        f"{lm['final_loss']:.3f}, held-out {lm['val_loss_init']:.3f} -> {lm['val_loss']:.3f} ({lm['seconds']:.0f} s); "
        f"held-out MC prompts without video: replies naming an option {lm['mc_check']['parsed_rate']:.2f}, right "
        f"{lm['mc_check']['accuracy_no_video']:.2f} (chance 0.25)"
        + (f", with the caption in the video's place {lm['mc_check']['accuracy_with_caption']:.2f}"
           if "accuracy_with_caption" in lm["mc_check"] else ""),
    ]
    if lm.get("draws"):
        lines.append("llm draws (colours read from exact symbols, held-out training clips): " + ", ".join(
            f"seed {d['seed']} {d['symbolic_video_qa'].get('colour', '-')} ({d['seconds']:.0f} s)" for d in lm["draws"])
            + f"; kept seed {lm['seed']}")
    if vi is None:
        return "\n".join(lines + [f"vision: copied from {stats['vision_from']}" if "vision_from" in stats
                                   else "vision: not trained (--no-vision)"])
    lines.append(f"vision: {vi['params'] / 1e6:.2f} M params, {vi['tokens_per_frame']} tokens/frame, {vi['steps']} "
                 f"steps x {vi['batch_size']} frames, sigmoid loss {vi['first_loss']:.3f} -> {vi['final_loss']:.3f} "
                 f"({vi['seconds']:.0f} s, data {vi['data_seconds']:.0f} s)")
    if vi.get("retrieval"):
        r = vi["retrieval"]
        lines.append(f"retrieval on eval frames (batch {r['batch']}, chance {r['chance']:.3f}): image->text "
                     f"{r['image_to_text_top1']:.3f}, text->image {r['text_to_image_top1']:.3f}; own description "
                     f"above a one-change hard negative {r['own_vs_hard_negative']:.3f} (chance 0.5)")
    if vi.get("patch_classes"):
        d = vi["patch_classes"]
        lines.append(f"patch (colour, shape) head on eval frames: object patches {d['object_patches']:.3f}, "
                     f"background {d['background']:.3f}")
    if vi.get("probe"):
        for kind in ("flat", "mean"):
            pi, pf = vi["probe_init"][kind], vi["probe"][kind]
            lines.append(f"linear probe ({kind} layer -2 patches), eval frames, untrained -> trained tower: "
                         + ", ".join(f"{k} {pi[k]:.2f}->{pf[k]:.2f}" for k in pf))
    return "\n".join(lines)


def main(argv: Iterable[str] | None = None) -> int:
    summary = sys.modules[__package__].__doc__.split("\n\n")[0]  # the package's docstring
    p = argparse.ArgumentParser(prog="python -m train.stage0", description=summary)
    p.add_argument("--world", required=True, help="a world folder written by `python -m train.world`")
    p.add_argument("--out", required=True, help="output folder (tokenizer/, llm/, vision/, siglip/, stage0.json)")
    p.add_argument("--smoke", action="store_true", help="tiny models, a few steps (seconds; for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--set", nargs="*", default=[], metavar="PART.KEY=VALUE",
                   help="change a setting of the budget (train/stage0/common.py) or any keyword of pretrain_llm / "
                        "pretrain_vision, e.g. llm.context_per_clip=6 vision.set_weight=1")
    p.add_argument("--no-vision", action="store_true",
                   help="stop after the LLM (then `python -m train.diagnose context --llm OUT/llm` measures it)")
    a = p.parse_args(None if argv is None else list(argv))
    if a.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    stats = run_stage0(a.world, a.out, budget="smoke" if a.smoke else "full", seed=a.seed, progress=not a.quiet,
                       overrides=parse_settings(a.set), vision=not a.no_vision)
    print(format_summary(stats))
    return 0
