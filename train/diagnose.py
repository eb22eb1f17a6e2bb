"""Does a trained model read the video? Checks for when accuracy sits at chance.

    python -m train.diagnose gap     --model M --annotations qa.json --video-root DIR [--limit 48] [--as-asked]
    python -m train.diagnose open    --model M --data eval_mc.json [--video-root DIR] [--limit 200]
    python -m train.diagnose types   --model M --data eval_mc.json [--video-root DIR] [--world WORLD] [--records R]
    python -m train.diagnose probe   --model M | --tower STAGE0/vision --world WORLD [--train-clips 1200]
    python -m train.diagnose symbols --model M --world WORLD [--clips 200]
    python -m train.diagnose context --llm STAGE0/llm --world WORLD [--limit 64]
    python -m train.diagnose lmprobe --llm STAGE0/llm --world WORLD [--train-clips 600] [--test-clips 200]
    python -m train.diagnose recall  [--init-std 0.02 0.1] [--layout pairs bound] [--steps 1000] [--seed 0]

`gap`: the mean answer loss of training-format samples with their own video, with another sample's video and with
all-zero tower features. A model that uses the video has a clearly lower loss with its own; equal losses mean the
LLM answers from the text alone. It also prints how much of the connector's output changes from video to video
(the across-video spread of the tokens relative to their norm), and for multiple-choice records (stage 2's, or an
MC JSON `--as-asked`) the mean option loss: -log of the probability the answer's tokens keep on the options.
`open`: the multiple-choice questions asked open-ended (no options); an answer counts as right when it contains
the correct option's text. This separates "cannot read the video" from "cannot map an answer to a letter".
`types`: the multiple-choice evaluation (`vidlmm.evaluate`) broken down by the items' question ``type`` (and, with
the world's folder, by how many objects the clip shows, and for the questions that look one object's colour or
shape up by the other, whether a wrong reply names another object's: read but not bound, `lookup_errors`, and
whether the colours named follow a fixed order of colours instead of the object asked about, `colour_order`; for
the order and direction questions, where the wrong replies go: `order_errors`).
`probe`: is a frame's content readable at each step (tower patches, connector tokens)? See `token_probe`.
`symbols`: for a model whose LM was trained with a video of symbols (`llm.symbolic_per_clip`), does the connector
emit those symbols? Each visual token's nearest symbol embedding against the frame's symbols (`symbol_readout`).
`context`: does a stage-0 LM read its context at all (stage 1 can only steer one that does)? On held-out training
clips of the world: the caption loss with the clip's own caption in front of it (stage 1's layout, a caption
where the video goes) against another clip's caption; and held-out MC prompts answered without context and with
the clip's caption where the video goes, parsed as the evaluation parses replies; and `static_qa`, open questions
about one object's colour or shape ("What colour is the cross?") without and with the caption in front.
`lmprobe`: where a stage-0 LM loses the direction of a move, by linear probes of its hidden states, layer by layer
(`lm_probe`).
`recall`: can a freshly initialised LM of the stage-0 shape (Qwen2, width 128, 4 layers) learn a lookup at all,
per initializer_range and per layout of the context? Multi-query associative recall on abstract tokens: six
key-value pairs, then keys drawn from them, each query's value to be found in the context (chance 1/6); held-out
accuracy every quarter of the steps. Layout "pairs" holds a pair as two tokens in a row, as a caption holds "red
square"; "bound" as one token per combination, as a visual token holds an object. Measured (1,000 steps): "bound"
is learned by step 500-750 (0.1 sooner than 0.02), "pairs" stays at chance with either init.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable

from .world.text import QUESTION_TYPES as WORLD_TYPES


def video_gap(model, samples: list[dict], video_root: Path, template: str, shift: int = 7) -> dict:
    """Mean answer loss with the right video, a wrong one (the sample `shift` places on) and zero features; for
    samples with ``options`` (multiple-choice records), also the mean `option_loss`: how much probability the
    answer's tokens leave off the options (`train.trainer.option_loss`)."""
    import torch

    from vidlmm.conversation import make_training_example
    from vidlmm.pipeline import default_sampling
    from vidlmm.preprocess import read_pixels

    from .data import sample_option_continuations
    from .trainer import option_loss

    sampling = default_sampling(model)
    with torch.no_grad():
        feats = [model.encode_frames(read_pixels(video_root / s["video"], sampling, model.image_processor)[1])
                 for s in samples]

        def mean_losses(features_of) -> tuple[float, float | None]:
            total, options, with_options = 0.0, 0.0, 0
            for i, sample in enumerate(samples):
                out = model.connect(features_of(i))

                def example_of(conversations):
                    return make_training_example(template, conversations, model.tokenizer, max_length=3072,
                                                 num_visual_tokens=out.tokens.shape[1])

                ex = example_of(sample["conversations"])
                embeds, mask, lab = model.build_inputs([ex.input_ids], [out], [ex.labels], padding_side="right")
                result = model(embeds, mask, labels=lab)
                total += result.loss.item()
                if sample.get("options"):
                    allowed = sample_option_continuations(sample["conversations"], sample["options"],
                                                          lambda conv: example_of(conv).labels)
                    options += option_loss(result.logits, lab, [allowed]).item()
                    with_options += 1
            return total / len(samples), (options / with_options if with_options else None)

        tokens = torch.stack([model.connect(f).tokens[0] for f in feats])  # [N, Q, D]
        norm = tokens.norm(dim=-1).mean().item()
        result = {"samples": len(samples)}
        for name, features_of in (("right_video", lambda i: feats[i]),
                                  ("wrong_video", lambda i: feats[(i + shift) % len(feats)]),
                                  ("zero_features", lambda i: torch.zeros_like(feats[i]))):
            result[name], off = mean_losses(features_of)
            if off is not None:
                result[f"option_loss_{name}"] = off
        return {**result, "token_norm": norm,
                "video_dependent_share": tokens.std(0).norm(dim=-1).mean().item() / norm}


def _frame_pairs(spec, tl, t: int):
    """Which (colour, shape) objects frame ``t`` shows: 24 binary facts (6 colours x 4 shapes)."""
    import numpy as np

    from .stage0.tower import frame_objects
    from .world import COLOUR_NAMES, SHAPES

    facts = np.zeros(len(COLOUR_NAMES) * len(SHAPES))
    for colour, shape, _ in frame_objects(spec, tl, t):
        facts[COLOUR_NAMES.index(colour) * len(SHAPES) + SHAPES.index(shape)] = 1
    return facts


def _ridge(train_x, train_y, test_x, test_y, lam: float = 1.0) -> dict:
    """Ridge read-out (dual form) of binary facts: the share of test frames with every fact right, and the
    share of present objects found (their (colour, shape) fact above 0.5)."""
    from .stage0.tower import ridge_predict

    pred = ridge_predict(train_x, train_y, test_x, lam) > 0.5
    truth = test_y > 0.5
    return {"frames_all_right": float((pred == truth).all(1).double().mean()),
            "objects_found": float((pred & truth).sum() / truth.sum())}


class _TowerOnly:
    """A stage-0 tower folder standing in for a model in `token_probe`: the patch views only (no connector)."""

    def __init__(self, folder: Path):
        from transformers import SiglipVisionModel

        from vidlmm.preprocess import ImageProcessor
        from vidlmm.video import FrameSampling
        from vidlmm.vision import VisionTower

        vision = SiglipVisionModel.from_pretrained(folder).eval()
        self.tower = VisionTower.around(vision)
        self.image_processor = ImageProcessor.for_tower("siglip", vision.config.image_size)
        self.sampling = FrameSampling.from_dict({"mode": "uniform", "num_frames": 16})  # the embedded models'

    def encode_frames(self, pixels):
        return self.tower(pixels)


def token_probe(model, world_dir: Path, *, train_clips: int = 1200, test_clips: int = 400, seed: int = 0) -> dict:
    """Where along tower -> connector is a frame's content lost? Linear (ridge) read-outs of which (colour, shape)
    objects the first sampled frame shows, fitted on training clips, scored on held-out clips, from: the tower's
    patches of that frame (``patches_flat``: every patch; ``patches_mean``: their mean), the connector's tokens
    computed from that frame's group of the sampling (``connector_frame``: the tokens whose group holds frame 0,
    all of them for a connector with one group) and all the connector's tokens (``connector_all``). A fact
    readable from the patches but not from the tokens is lost in the connector; readable from the tokens but
    wrongly answered, it is lost in the LLM."""
    import numpy as np
    import torch

    from vidlmm.pipeline import default_sampling
    from vidlmm.preprocess import read_pixels

    from .world import load_clips, timeline

    clips = load_clips(world_dir)
    connector = not isinstance(model, _TowerOnly)
    rng = np.random.default_rng([seed, 11])
    picks = {"train": rng.permutation(len(clips["train"]))[:train_clips],
             "eval": rng.permutation(len(clips["eval"]))[:test_clips]}
    sampling = default_sampling(model) if connector else model.sampling
    views: dict[str, dict[str, list]] = {}
    with torch.no_grad():
        for split, idx in picks.items():
            got = views[split] = {"facts": [], "patches_flat": [], "patches_mean": [], "connector_frame": [],
                                  "connector_all": []}
            for k in idx:
                spec = clips[split][int(k)]
                clip, pixels = read_pixels(world_dir / "videos" / f"{spec.id}.mp4", sampling, model.image_processor)
                feats = model.encode_frames(pixels)  # [T, P, C]
                got["facts"].append(_frame_pairs(spec, timeline(spec), int(clip.indices[0])))
                got["patches_flat"].append(feats[0].flatten().double())
                got["patches_mean"].append(feats[0].mean(0).double())
                if connector:
                    out = model.connect(feats)
                    groups = out.query_groups
                    first = groups == groups[0] if groups is not None else torch.ones(out.tokens.shape[1], dtype=bool)
                    got["connector_frame"].append(out.tokens[0, first].flatten().double())
                    got["connector_all"].append(out.tokens[0].flatten().double())
    facts = {split: torch.tensor(np.stack(v["facts"])) for split, v in views.items()}
    result = {"train_clips": len(picks["train"]), "test_clips": len(picks["eval"]),
              "objects_per_frame": float(facts["eval"].sum(1).mean())}
    for view in ("patches_flat", "patches_mean") + (("connector_frame", "connector_all") if connector else ()):
        x, y = torch.stack(views["train"][view]), torch.stack(views["eval"][view])
        result[view] = {"dims": int(x.shape[1]), **_ridge(x, facts["train"], y, facts["eval"])}
    return result


def symbol_readout(model, world_dir: Path, clips: int = 200) -> dict:
    """Does the connector emit the symbolic video its LM was trained to read (`train.stage0.symbols`)? On the
    first ``clips`` held-out clips, each visual token's nearest symbol (cosine, among the LM's symbol rows) is its
    reading; per frame, against the frame's symbols: ``precision`` (readings other than blank that the frame
    shows), ``recall`` (the frame's objects read by some token), ``frames_exact`` (the frame's 4 readings are its
    4 symbols), and the tokens' mean length beside the symbols' embeddings' (the LM reads lengths too). Part by
    part, of the readings other than blank: ``colour_shown``, ``shape_shown`` (an object of the frame has that
    colour, that shape) and ``pair_shown`` (one object has both, in any cell): a connector whose tokens name the
    frame's colours but not which shape has which leaves the LM nothing to find an object by."""
    import torch
    import torch.nn.functional as F

    from vidlmm.pipeline import default_sampling
    from vidlmm.preprocess import read_pixels

    from .stage0.symbols import SLOTS, symbol_parts, symbol_rows, symbolic_video
    from .world import load_clips

    symbols = symbol_rows(model).detach()
    specs = load_clips(world_dir)["eval"][:clips]
    sampling = default_sampling(model)
    right = read = shown = found = exact = frames = 0
    parts, lengths = Counter(), []

    def pair(symbol: int) -> tuple[int, int]:  # (colour, shape) of a symbol other than blank
        return symbol_parts(symbol - 1)[:2]

    with torch.no_grad():
        for spec in specs:
            _, pixels = read_pixels(world_dir / "videos" / f"{spec.id}.mp4", sampling, model.image_processor)
            tokens = model.connect(model.encode_frames(pixels)).tokens[0]
            lengths.append(tokens.norm(dim=-1).mean())
            readings = (F.normalize(tokens, dim=-1) @ F.normalize(symbols, dim=-1).T).argmax(-1).view(-1, SLOTS)
            for got, want in zip(readings.tolist(), torch.tensor(symbolic_video(spec, 0)).view(-1, SLOTS).tolist()):
                objects, named = set(want) - {0}, [g for g in got if g]
                right += sum(g in objects for g in named)
                read += len(named)
                shown += len(objects)
                found += len(objects & set(named))
                exact += sorted(got) == sorted(want)
                frames += 1
                pairs = {pair(w) for w in objects}
                colours, shapes = {c for c, _ in pairs}, {s for _, s in pairs}
                for colour, shape in map(pair, named):
                    parts["colour"] += colour in colours
                    parts["shape"] += shape in shapes
                    parts["pair"] += (colour, shape) in pairs
    return {"clips": len(specs), "precision": right / max(read, 1),
            "recall": found / max(shown, 1), "frames_exact": exact / max(frames, 1),
            **{f"{part}_shown": parts[part] / max(read, 1) for part in ("colour", "shape", "pair")},
            "token_length": float(torch.stack(lengths).mean()), "symbol_length": float(symbols.norm(dim=-1).mean())}


def patch_readout(model, world_dir: Path, clips: int = 60) -> dict:
    """Where the visual tokens of a connector that passes the tower's patches on (pool, ToMe, top-k) come from and
    what they name, on the first ``clips`` held-out clips. ``on_objects``: the share of the tokens' weight over the
    patches (`token_sources`) that lies on objects, beside ``object_patches``, the share of the patches that do;
    ``objects_reached``: a frame's objects with a token mostly on them; ``named``: of those tokens, the ones whose
    nearest symbol among the LM's rows has their object's colour and shape (None for an LM without symbol rows)."""
    import torch
    import torch.nn.functional as F

    from vidlmm.pipeline import default_sampling
    from vidlmm.preprocess import read_pixels

    from .stage0.symbols import (patch_symbols, patch_symbols_of_tokens, symbol_count, symbol_parts,
                                 symbol_rows)
    from .world import load_clips

    try:
        symbols = symbol_rows(model).detach()
    except ValueError:
        symbols = None
    specs = load_clips(world_dir)["eval"][:clips]
    sampling = default_sampling(model)
    on = total = patches_on = patches = reached = objects = named = mostly_on = 0
    with torch.no_grad():
        for spec in specs:
            _, pixels = read_pixels(world_dir / "videos" / f"{spec.id}.mp4", sampling, model.image_processor)
            out = model.connect(model.encode_frames(pixels))
            layout = model.token_layout(len(pixels))
            ids = patch_symbols_of_tokens(patch_symbols(spec, layout.grid[0], len(pixels)), layout)
            sources = model.connector.token_sources(out, layout).float()  # [N, T * P]
            weights = sources @ F.one_hot(ids, symbol_count()).float()  # [N, symbols]
            on += float(weights[:, 1:].sum())
            total += float(weights.sum())
            patches_on += int((ids > 0).sum())
            patches += len(ids)
            main = weights[:, 1:].argmax(-1) + 1
            mostly = weights.gather(1, main[:, None])[:, 0] > 0.5 * weights.sum(-1)
            frame = layout.frame[sources.argmax(-1)]
            for f in range(len(pixels)):
                shown = set(ids[layout.frame == f].tolist()) - {0}
                objects += len(shown)
                reached += len(shown & set(main[mostly & (frame == f)].tolist()))
            if symbols is not None and mostly.any():
                nearest = (F.normalize(out.tokens[0][mostly].float(), dim=-1)
                           @ F.normalize(symbols.float(), dim=-1).T).argmax(-1)
                named += sum(g > 0 and symbol_parts(g - 1)[:2] == symbol_parts(w - 1)[:2]
                             for g, w in zip(nearest.tolist(), main[mostly].tolist()))
            mostly_on += int(mostly.sum())
    return {"clips": len(specs), "on_objects": on / max(total, 1e-9), "object_patches": patches_on / max(patches, 1),
            "objects_reached": reached / max(objects, 1),
            "named": named / max(mostly_on, 1) if symbols is not None else None}


def mc_as_conversations(items: list[dict]) -> list[dict]:
    """MC items as one-turn samples answered with the correct option's text (so `gap` runs on held-out clips)."""
    return [{"video": it["video"], "conversations": [
        {"from": "human", "value": f"<image>\n{it['question']}"},
        {"from": "gpt", "value": _gold(it) + "."}]} for it in items]


def mc_as_asked(items: list) -> list[dict]:
    """MC items (`vidlmm.evaluate.MCItem`) as stage 2's multiple-choice records: the prompt the evaluation asks
    (MVBench's style), answered with the correct option's text, with every option's text as ``options``."""
    from vidlmm.evaluate import build_mc_question

    return [{"video": str(Path(item.video).resolve()), "options": item.options, "conversations": [
        {"from": "human", "value": f"<image>\n{build_mc_question(item)}"},
        {"from": "gpt", "value": item.answer_text}]} for item in items]


def _gold(item: dict) -> str:
    return next(o.split(". ", 1)[1] for o in item["options"] if o.startswith(item["answer"] + ". "))


def open_ended(lmm, items: list[dict], video_root: Path) -> dict:
    """Accuracy per question type when the MC questions are asked without their options."""
    from vidlmm.pipeline import GenerationSettings

    right, total = Counter(), Counter()
    for item in items:
        gold = _gold(item)
        reply = lmm.ask(str(video_root / item["video"]), item["question"],
                        generation=GenerationSettings(max_new_tokens=16)).text
        kind = item.get("type", item.get("category", "all"))
        right[kind] += gold.lower().rstrip(".") in reply.lower()
        total[kind] += 1
    return {"accuracy": sum(right.values()) / max(1, sum(total.values())),
            "per_type": {k: f"{right[k]}/{total[k]}" for k in sorted(total)}}


def by_type(result, items: list[dict], objects: dict[str, int] | None = None) -> dict:
    """Per question type "right/total" of an EvalResult over the raw MC items (their optional ``type``). With
    ``objects`` ({clip video stem: number of objects}, from the world's clips.json), per type and object count
    ("shape, 1 object"): a type that is wrong even with one object is not read at all, not merely unbound."""
    kind = {item["id"]: item.get("type", item.get("category", "all")) for item in items}
    if objects is not None:
        kind = {item["id"]: _with_objects(kind[item["id"]], objects[Path(item["video"]).stem]) for item in items}
    right, total = Counter(), Counter()
    for record in result.items:
        right[kind[record.id]] += record.correct
        total[kind[record.id]] += 1
    return {k: f"{right[k]}/{total[k]}" for k in sorted(total)}


def _with_objects(kind: str, count: int) -> str:
    """"shape, 1 object", "colour, 3 objects": a question type split by the clip's object count."""
    return f"{kind}, {count} object" + ("s" if count > 1 else "")


LOOKUPS = {"colour": "colour", "shape": "shape"}  # question type -> the object attribute its answer names


def lookup_errors(result, items: list[dict], clips: dict) -> dict:
    """The questions that find one object by an attribute and ask another ("What colour is the square?", type
    colour; "Which shape is red?", type shape), per type and object count: right; wrong with another object's
    attribute of the clip (read from the video, not bound to the object asked about); wrong otherwise. A reply that
    names no option counts by its text ("Purple" when purple is not offered). ``clips``: {video stem: ClipSpec}."""
    item_of = {item["id"]: item for item in items}
    out: dict[str, Counter] = {}
    for record in result.items:
        item = item_of[record.id]
        attribute = LOOKUPS.get(item.get("type"))
        if attribute is None:
            continue
        objects = clips[Path(item["video"]).stem].objects
        tally = out.setdefault(_with_objects(item["type"], len(objects)), Counter())
        if record.correct:
            tally["right"] += 1
            continue
        said = _said(record, item)
        tally["another object's" if said in {getattr(o, attribute) for o in objects} else "other"] += 1
    return {k: dict(out[k]) for k in sorted(out)}


def colour_order(result, items: list[dict], clips: dict) -> dict | None:
    """Does a model answer "What colour is the square?" on a clip of several objects by a fixed order of colours
    (the clip's highest-ranked colour, whichever object was asked about) rather than by the object? Over the colour
    questions of clips with objects of two or more colours whose reply names one of the clip's colours: the order
    of the six colours that agrees with the most replies (every order tried), how many it agrees with, and how many
    are right. A model that binds colour to shape is right more often than any order agrees; one that reads the
    clip's colours but not which object has which is explained by an order. None without such questions."""
    from itertools import permutations

    from .world import COLOUR_NAMES

    item_of = {item["id"]: item for item in items}
    asked = []  # (the clip's colours, the reply's colour, whether right)
    for record in result.items:
        item = item_of[record.id]
        colours = {o.colour for o in clips[Path(item["video"]).stem].objects}
        said = _said(record, item)
        if item.get("type") == "colour" and len(colours) > 1 and said in colours:
            asked.append((colours, said, record.correct))
    if not asked:
        return None

    def agrees(order) -> int:
        return sum(said == min(colours, key=order.index) for colours, said, _ in asked)

    best = max(permutations(COLOUR_NAMES), key=agrees)
    return {"order": list(best), "agrees": f"{agrees(best)}/{len(asked)}",
            "right": f"{sum(ok for *_, ok in asked)}/{len(asked)}"}


ORDERS = ("first", "last", "before", "after")
OPPOSITE = {"left": "right", "right": "left", "up": "down", "down": "up"}


def _option(item: dict, letter: str) -> str:
    """The text of an MC item's option ``letter``, lower case, without its period."""
    return next(o.split(".", 1)[1] for o in item["options"] if o.startswith(f"{letter}.")).strip().strip(".").lower()


def _said(record, item: dict) -> str:
    """A reply as the option it picked (its text), or as written when it names no option; lower case, no period."""
    return _option(item, record.parsed) if record.parsed else record.response.strip().strip(".").lower()


def order_errors(result, items: list[dict], clips: dict) -> dict:
    """Where the answers to the order questions (first, last, right before / after an event) and to direction
    go, per type: right; the event the question itself names ("What happens right after the red square moves
    left?" -> "The red square moves left"); another event of the clip (seen, but not ordered); an event that did
    not happen, "a near miss" when a real event has its shape and verb ("The green triangle moves up" when it moved
    left); and for direction the opposite way or a perpendicular one. A reply that names no option counts by
    its text, with "(unparsable)" added. Tells apart "does not see the events" from "sees them, cannot order
    them". ``clips``: {video stem: ClipSpec}."""
    from .world import event_clause, event_sentence
    from .world.spec import timeline

    item_of = {item["id"]: item for item in items}
    out: dict[str, Counter] = {}
    for record in result.items:
        item = item_of[record.id]
        kind = item.get("type")
        if kind not in ORDERS and kind != "direction":
            continue
        tally = out.setdefault(kind, Counter())
        if record.correct:
            tally["right"] += 1
            continue
        said = _said(record, item)
        if kind == "direction":
            where = ("the opposite way" if OPPOSITE.get(_option(item, item["answer"])) == said else
                     "a perpendicular way" if said in OPPOSITE else "no direction")
        else:
            spec = clips[Path(item["video"]).stem]
            tl = timeline(spec)
            events = {event_sentence(spec, e, tl)[:-1].lower(): event_clause(spec, e, tl) for e in spec.events}
            if said in events:
                where = ("the event the question names" if events[said] in item["question"].lower()
                         else "another event of the clip")
            else:  # "the green triangle moves up" when the green triangle moved left: shape and verb of a real one
                near = {tuple(clause.split()[2:4]) for clause in events.values()}
                where = "an event that did not happen" + (", a near miss" if tuple(said.split()[2:4]) in near else "")
        tally[where + ("" if record.parsed else " (unparsable)")] += 1
    return {k: dict(sorted(out[k].items())) for k in sorted(out)}


def context_reading(llm_dir: Path, world_dir: Path, limit: int = 64, seed: int = 0) -> dict:
    """See `context` in the module docstring."""
    import numpy as np
    import torch
    from transformers import AutoModelForCausalLM

    from vidlmm.evaluate import SUFFIX
    from vidlmm.tokenizer import load_tokenizer

    from . import stage0, world
    from .stage0.symbols import has_symbol_rows

    model = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    tokenizer = load_tokenizer(llm_dir)
    _, held, _ = stage0.split_clips(world_dir)  # the clips stage 0 kept out of LM training
    held = held[:limit]
    captions = [tokenizer(world.caption(spec, np.random.default_rng([seed, k])), add_special_tokens=False)
                ["input_ids"] for k, spec in enumerate(held)]

    def caption_loss(context: list[int], target: list[int]) -> float:
        ids = torch.tensor([context + target])
        labels = ids.clone()
        labels[0, :len(context)] = -100
        return model(input_ids=ids, labels=labels).loss.item()

    shift = 7 % max(1, len(held))
    with torch.no_grad():
        own = float(np.mean([caption_loss(c, c) for c in captions]))
        other = float(np.mean([caption_loss(captions[(k + shift) % len(held)], c) for k, c in enumerate(captions)]))
    with_caption = [c for c in stage0.context_conversations(held, seed + 1, per_clip=1) if SUFFIX in c[0][0]]
    lookup, several = static_lookup(model, tokenizer, held, seed)
    symbolic = ({"symbolic_video_qa": stage0.symbolic_video_qa(model, tokenizer, held, seed)}
                if has_symbol_rows(model.config.vocab_size, tokenizer) else {})
    return {"static_qa": lookup, "several_objects": several, **symbolic, "clips": len(held),
            "caption_loss_own_caption_before": own, "caption_loss_other_caption_before": other,
            "mc_without_context": stage0.mc_check(model, tokenizer, stage0.mc_conversations(held, seed + 1)),
            "mc_with_caption": stage0.mc_check(model, tokenizer, with_caption)}


LOOKUP_TYPES = WORLD_TYPES["static"]


def lm_probe(llm_dir: Path, world_dir: Path, *, train_clips: int = 600, test_clips: int = 200, seed: int = 0) -> dict:
    """`direction_probe` of a saved stage-0 LM, fitted on LM training clips and tested on the clips stage 0 held
    out of LM training (never the evaluation set), and its symbol rows' `part_lengths` (``parts``)."""
    from transformers import AutoModelForCausalLM

    from vidlmm.tokenizer import load_tokenizer

    from . import stage0
    from .stage0.symbols import part_lengths, symbol_rows

    fit, held, _ = stage0.split_clips(world_dir)
    model, tokenizer = AutoModelForCausalLM.from_pretrained(llm_dir).eval(), load_tokenizer(llm_dir)
    return {**direction_probe(model, tokenizer, fit, held, train_clips=train_clips, test_clips=test_clips, seed=seed),
            "parts": part_lengths(symbol_rows(model, tokenizer).detach())}


def direction_probe(model, tokenizer, fit: list, held: list, *, train_clips: int = 600, test_clips: int = 200,
                    tokens: int = 4000, seed: int = 0) -> dict:
    """Where a stage-0 LM loses the direction of a move, read by linear probes (ridge, argmax over the classes) of
    its hidden states after each layer (0: the embeddings), with "Which way does the <object> move?" asked of each
    clip's symbolic video (the first ``train_clips`` clips of ``fit`` with a move for fitting, of ``held`` for
    testing):

    - ``cell`` / ``colour``: a symbol token's cell (9) and colour (6), from that token's state (``tokens`` tokens
      drawn for each side): is the place in the video's tokens at all, layer by layer;
    - ``moved_token``: the direction (4) from the state of the moving object's token in the last sampled frame: has
      that token compared itself with the object's earlier tokens;
    - ``answer``: the direction from the state at the last prompt position, where the answer is read out.

    ``{probe: [accuracy per layer]}``, with ``chance`` (each probe's majority share on the test side) and ``n``
    (train and test samples); a probe with no samples on a side is None."""
    import numpy as np
    import torch

    from vidlmm.conversation import build_prompt

    from . import stage0, world
    from .stage0.symbols import SLOTS, sampled_objects, symbol_index, symbol_parts
    from .stage0.tower import ridge_predict

    first = len(tokenizer)
    directions = {d: k for k, d in enumerate(world.DIRECTIONS)}

    def collect(specs, n_clips):
        rows = {"cell": [], "colour": [], "moved_token": [], "answer": []}
        for k, spec in enumerate(specs):
            asked = list(world.asked_questions(spec, np.random.default_rng([seed, 47, k]), ("direction",)))
            if not asked:
                continue
            if n_clips == 0:
                break
            n_clips -= 1
            q, question = asked[0]
            mover = int(q.key[len("dir"):])  # the world keys a direction question by its object: "dir<index>"
            video = stage0.symbolic_video(spec, first)
            ids = stage0.text.prompt_ids(build_prompt(stage0.TEMPLATE, [(f"<image>\n{question}", None)]), tokenizer,
                                         video)
            with torch.no_grad():
                states = torch.stack(model(input_ids=torch.tensor([ids]), output_hidden_states=True)
                                     .hidden_states)[:, 0].double()  # [layers + 1, positions, width]
            start = next(i for i, t in enumerate(ids) if t >= first)
            label = directions[q.answer.lower().rstrip(".")]
            for j, t in enumerate(video):
                if t > first:
                    colour, _, row, col = symbol_parts(t - first - 1)
                    rows["cell"].append((states[:, start + j], row * 3 + col))
                    rows["colour"].append((states[:, start + j], colour))
            last = video[-SLOTS:]  # the last sampled frame's slots
            shape = world.SHAPES.index(spec.objects[mover].shape)
            mine = [first + 1 + symbol_index(colour, shape, row, col)
                    for col, row, colour, i in sampled_objects(spec)[-1] if i == mover]
            if mine and mine[0] in last:  # the mover's token in the last sampled frame
                rows["moved_token"].append((states[:, start + len(video) - SLOTS + last.index(mine[0])], label))
            rows["answer"].append((states[:, -1], label))
        return rows

    train, test = collect(fit, train_clips), collect(held, test_clips)
    rng = np.random.default_rng([seed, 53])
    out: dict = {"chance": {}, "n": {}}
    for name in train:
        a = [train[name][i] for i in rng.permutation(len(train[name]))[:tokens]]
        b = [test[name][i] for i in rng.permutation(len(test[name]))[:tokens]]
        out["n"][name] = [len(a), len(b)]
        if not a or not b:
            out[name] = None
            continue
        classes = max(y for _, y in a + b) + 1
        ya = torch.nn.functional.one_hot(torch.tensor([y for _, y in a]), classes).double()
        yb = torch.tensor([y for _, y in b])
        xa, xb = torch.stack([x for x, _ in a], 1), torch.stack([x for x, _ in b], 1)  # [layers + 1, n, width]
        out[name] = [round(float((ridge_predict(xa[layer], ya, xb[layer]).argmax(1) == yb).double().mean()), 3)
                     for layer in range(len(xa))]
        out["chance"][name] = round(float(torch.bincount(yb).max() / len(yb)), 3)
    return out


def static_lookup(model, tokenizer, specs: list, seed: int = 0) -> tuple[dict, dict]:
    """The world's static questions, answered greedily without and with the clip's caption where the video goes
    (the stage-2 template). "What colour is the cross?" or "Is there a red cross?" after "There are a red cross
    and a blue square." needs finding one object in the context; "How many objects are there?" needs only the
    caption as a whole. A stage-0 LM that cannot find an object in a caption in front of it cannot find it in
    visual tokens that stand for the caption either.

    Returns ("<type>_<setting>": "right/asked", and for colour and shape questions with the caption whose caption
    names two or more colours (shapes): {"right", "first_named", "other"}, where ``first_named`` counts the wrong
    replies that name the caption's first colour (shape): an LM that copies from the context without finding the
    object answers with the first one)."""
    import numpy as np

    from . import stage0, world

    right = Counter()
    n = Counter()
    several = {t: Counter() for t in ("colour", "shape")}
    for k, spec in enumerate(specs):
        rng = np.random.default_rng([seed, 19, k])
        caption = world.caption(spec, rng)
        named = {t: _named_in_order(caption, words) for t, words in (("colour", world.COLOUR_NAMES),
                                                                      ("shape", world.SHAPES))}
        for q, question in world.asked_questions(spec, rng, LOOKUP_TYPES):
            for setting, prompt in (("without_caption", question), ("with_caption", f"{caption}\n{question}")):
                reply = stage0.greedy_reply(model, tokenizer, prompt, max_new_tokens=6).lower()
                ok = q.answer.lower() in reply
                right[(q.type, setting)] += ok
                n[(q.type, setting)] += 1
                if setting == "with_caption" and q.type in several and len(set(named[q.type])) > 1:
                    several[q.type]["right" if ok else "first_named" if named[q.type][0] in reply else "other"] += 1
    return ({f"{t}_{s}": f"{right[(t, s)]}/{n[(t, s)]}" for t, s in sorted(n)},
            {t: dict(c) for t, c in several.items()})


def _named_in_order(text: str, words) -> list[str]:
    """The words of ``words`` that ``text`` names, in the order it first names them."""
    tokens = [w.strip(".,").lower() for w in text.split()]
    return [t for i, t in enumerate(tokens) if t in words and t not in tokens[:i]]


def associative_recall(init_std: float, *, steps: int = 1000, pairs: int = 6, layout: str = "pairs",
                       hidden_size: int = 128, layers: int = 4, batch_size: int = 32, lr: float = 1e-3,
                       checks: int = 4, seed: int = 0) -> dict:
    """Train a fresh Qwen2ForCausalLM on multi-query associative recall; return its held-out accuracy curve.

    P pairs of a key (one of 20 ids) and a value (one of 30), all distinct within a sequence, then P queries, each
    a key of the context drawn at random (with replacement, so ruling out the values already asked does not help)
    and its value, the only scored target. ``layout`` is how the context holds a pair: "pairs" as two tokens in a
    row, ``<bos> k1 v1 ... kP vP <sep>``, as a caption holds "red square" (a lookup must find the key, then read
    the token after it: two attention steps); "bound" as one token of its own per (key, value) combination,
    ``<bos> [k1 v1] ... [kP vP] <sep>``, as a visual token holds one object's colour and shape together (one
    attention step). Chance, a uniform pick among the context's values: 1/P."""
    import numpy as np
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if layout not in ("pairs", "bound"):
        raise ValueError(f"layout must be 'pairs' or 'bound', not {layout!r}")
    n_keys, n_values, first_key = 20, 30, 10
    keys_ids = np.arange(first_key, first_key + n_keys)
    values_ids = np.arange(first_key + n_keys, first_key + n_keys + n_values)
    first_bound = 64  # bound tokens: 64 + key index * 30 + value index
    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=first_bound + n_keys * n_values, hidden_size=hidden_size,
                         intermediate_size=3 * hidden_size, num_hidden_layers=layers, num_attention_heads=4,
                         num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=0, eos_token_id=0, pad_token_id=0, initializer_range=init_std)
    model = Qwen2ForCausalLM(config)
    rng = np.random.default_rng([seed, 23])

    def batch(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows, labels = [], []
        for _ in range(n):
            k, v = rng.choice(n_keys, pairs, replace=False), rng.choice(n_values, pairs, replace=False)
            context = (np.stack([keys_ids[k], values_ids[v]], 1).ravel() if layout == "pairs"
                       else first_bound + k * n_values + v)
            asked = rng.integers(0, pairs, pairs)
            queries = np.stack([keys_ids[k[asked]], values_ids[v[asked]]], 1).ravel()
            rows.append([1, *context, 2, *queries])
            labels.append([-100] * (len(context) + 2) + [-100 if j % 2 == 0 else t for j, t in enumerate(queries)])
        return torch.tensor(np.array(rows, dtype=np.int64)), torch.tensor(np.array(labels, dtype=np.int64))

    test_ids, test_labels = batch(256)
    scored = test_labels[:, 1:] != -100
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    curve = []
    for step in range(1, steps + 1):
        ids, labels = batch(batch_size)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % max(1, steps // checks) == 0 or step == steps:
            with torch.no_grad():
                predicted = model(input_ids=test_ids).logits[:, :-1].argmax(-1)
            right = (predicted[scored] == test_labels[:, 1:][scored]).float().mean()
            curve.append((step, round(float(right), 3)))
    return {"init_std": init_std, "layout": layout, "steps": steps, "chance": round(1 / pairs, 3),
            "accuracy": dict(curve)}


def main(argv: Iterable[str] | None = None) -> int:
    from vidlmm.cli import run_user_command

    parser = argparse.ArgumentParser(prog="python -m train.diagnose", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gap = sub.add_parser("gap", help="answer loss with the right video, a wrong one and none")
    gap.add_argument("--annotations", required=True,
                     help="annotations (reference format), or an MC JSON (answered with the correct option's text)")
    gap.add_argument("--template", default=None, help="default: the model's conv_version")
    gap.add_argument("--as-asked", action="store_true",
                     help="an MC JSON's questions as the evaluation asks them (with options), answered with the "
                          "option's text; also reports the option loss")
    opened = sub.add_parser("open", help="the MC questions asked open-ended")
    opened.add_argument("--data", required=True, help="multiple-choice JSON (options 'A. text')")
    types = sub.add_parser("types", help="multiple-choice accuracy per question type")
    types.add_argument("--data", required=True, help="multiple-choice JSON with a 'type' per item")
    types.add_argument("--world", help="the world the clips come from: also split each type by object count")
    types.add_argument("--records", help="the scored questions' JSONL (kept, or reused: train.results --records "
                                         "DIR keeps DIR/NAME.jsonl)")
    for p in (gap, opened, types):
        p.add_argument("--model", required=True)
        p.add_argument("--video-root", help="default: the JSON's folder")
        p.add_argument("--limit", type=int, default=48 if p is gap else 200 if p is opened else None)
    probe = sub.add_parser("probe", help="is a frame's content readable from the tower's patches and from the "
                                         "connector's tokens? (linear read-outs)")
    probe_of = probe.add_mutually_exclusive_group(required=True)
    probe_of.add_argument("--model")
    probe_of.add_argument("--tower", help="a stage-0 tower folder (STAGE0/vision) instead: the patch views only")
    probe.add_argument("--world", required=True, help="the world the model was trained on")
    probe.add_argument("--train-clips", type=int, default=1200)
    probe.add_argument("--test-clips", type=int, default=400)
    symbols = sub.add_parser("symbols", help="does the connector emit the symbols its LM reads? (nearest symbol)")
    symbols.add_argument("--model", required=True, help="a model whose LM has symbol rows (llm.symbolic_per_clip)")
    symbols.add_argument("--world", required=True, help="the world the model was trained on")
    symbols.add_argument("--clips", type=int, default=200)
    patches = sub.add_parser("patches", help="do a compressor's tokens come from objects' patches, and name them?")
    patches.add_argument("--model", required=True, help="a pool, ToMe or top-k model")
    patches.add_argument("--world", required=True, help="the world the model was trained on")
    patches.add_argument("--clips", type=int, default=60)
    lmprobe = sub.add_parser("lmprobe", help="where does a stage-0 LM lose the direction of a move?")
    lmprobe.add_argument("--llm", required=True, help="a stage-0 LM folder trained with the symbolic video")
    lmprobe.add_argument("--world", required=True)
    lmprobe.add_argument("--train-clips", type=int, default=600)
    lmprobe.add_argument("--test-clips", type=int, default=200)
    context = sub.add_parser("context", help="does a stage-0 LM read its context?")
    context.add_argument("--llm", required=True, help="a stage-0 LM folder (OUT/llm of python -m train.stage0)")
    context.add_argument("--world", required=True, help="the world it was trained on")
    context.add_argument("--limit", type=int, default=64)
    recall = sub.add_parser("recall", help="can a fresh stage-0-shaped LM learn a lookup? (per initializer_range)")
    recall.add_argument("--init-std", type=float, nargs="+", default=[0.02, 0.1])
    recall.add_argument("--steps", type=int, default=1000)
    recall.add_argument("--hidden-size", type=int, default=128)
    recall.add_argument("--layers", type=int, default=4)
    recall.add_argument("--layout", choices=("pairs", "bound"), nargs="+", default=["pairs", "bound"],
                        help="a pair as two tokens in a row (as a caption) or as one token (as a visual token)")
    recall.add_argument("--seed", type=int, default=0, help="weights and data draws")
    args = parser.parse_args(list(argv) if argv is not None else None)

    def command() -> int:
        from vidlmm.checkpoint import load_model
        from vidlmm.pipeline import VideoLMM

        if args.command == "recall":
            for layout in args.layout:
                for std in args.init_std:
                    print(json.dumps(associative_recall(std, steps=args.steps, layout=layout, seed=args.seed,
                                                        hidden_size=args.hidden_size, layers=args.layers)), flush=True)
            return 0
        if args.command == "probe":
            model = (load_model(args.model, dtype="fp32", device="cpu").eval() if args.model
                     else _TowerOnly(Path(args.tower)))
            print(json.dumps(token_probe(model, Path(args.world), train_clips=args.train_clips,
                                         test_clips=args.test_clips), indent=1))
            return 0
        if args.command == "symbols":
            model = load_model(args.model, dtype="fp32", device="cpu").eval()
            print(json.dumps(symbol_readout(model, Path(args.world), args.clips), indent=1))
            return 0
        if args.command == "patches":
            model = load_model(args.model, dtype="fp32", device="cpu").eval()
            print(json.dumps(patch_readout(model, Path(args.world), args.clips), indent=1))
            return 0
        if args.command == "context":
            print(json.dumps(context_reading(Path(args.llm), Path(args.world), args.limit), indent=1))
            return 0
        if args.command == "lmprobe":
            print(json.dumps(lm_probe(Path(args.llm), Path(args.world), train_clips=args.train_clips,
                                      test_clips=args.test_clips), indent=1))
            return 0
        data = Path(args.annotations if args.command == "gap" else args.data)
        items = json.loads(data.read_text())[: args.limit]
        root = Path(args.video_root) if args.video_root else data.parent
        model = load_model(args.model, dtype="fp32", device="cpu").eval()
        if args.command == "gap":
            if items and "conversations" not in items[0]:  # held-out MC items, not training records
                from vidlmm.evaluate import load_mc_items

                items = (mc_as_asked(load_mc_items(data, root)[: args.limit]) if args.as_asked
                         else mc_as_conversations(items))
            result = video_gap(model, items, root, args.template or model.config.conv_version)
        elif args.command == "types":
            from vidlmm.evaluate import evaluate, load_mc_items

            evaluated = evaluate(VideoLMM(model), load_mc_items(data, root)[: args.limit], records=args.records)
            result = {"accuracy": evaluated.accuracy, "unparsable": evaluated.unparsable,
                      "per_type": by_type(evaluated, items)}
            if args.world:
                from .world import load_clips

                clips = {s.id: s for s in load_clips(args.world)["eval"]}
                counts = {k: len(clip.objects) for k, clip in clips.items()}
                result["per_type_and_objects"] = by_type(evaluated, items, counts)
                result["lookups"] = lookup_errors(evaluated, items, clips)
                result["colour_order"] = colour_order(evaluated, items, clips)
                result["order"] = order_errors(evaluated, items, clips)
        else:
            result = open_ended(VideoLMM(model), items, root)
        print(json.dumps(result, indent=1))
        return 0

    return run_user_command(command)


if __name__ == "__main__":
    sys.exit(main())
