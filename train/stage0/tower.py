"""The vision tower: a SigLIP-architecture model trained with the sigmoid image-text loss on frames of
training clips and their descriptions (`pretrain_vision`), with retrieval and linear-probe reports."""

from __future__ import annotations

import json
import math
import re
import time
from pathlib import Path

import numpy as np
import torch

from train import world as W
from vidlmm.preprocess import ImageProcessor

from .common import _count_params, _fit


_CELL_PHRASE = {(0, 0): "at the top left", (0, 1): "at the top", (0, 2): "at the top right",
                (1, 0): "on the left", (1, 1): "in the centre", (1, 2): "on the right",
                (2, 0): "at the bottom left", (2, 1): "at the bottom", (2, 2): "at the bottom right"}
DESCRIPTION_WORDS = (["<pad>", ",", ":", "a", "an", "and", "empty", "screen", "object", "objects", "at", "on", "in",
                      "the", "top", "bottom", "left", "right", "centre"]
                     + list(W.NUMBER_WORDS) + list(W.COLOUR_NAMES) + list(W.SHAPES))


def _cell(spec, x: float, y: float) -> tuple[int, int]:
    """(row, col) of the frame third a centre lies in (the world's 3x3 grid cells sit in the thirds' middles)."""
    return min(int(3 * y / spec.size), 2), min(int(3 * x / spec.size), 2)


def frame_objects(spec, tl, t: int) -> list[tuple[str, str, tuple[int, int]]]:
    """(colour, shape, (row, col)) of every object visible in frame ``t``, in reading order."""
    objs = [(tl.colour_name(i, t), spec.objects[i].shape, _cell(spec, tl.x[i, t], tl.y[i, t]))
            for i in range(len(spec.objects)) if tl.visible[i, t]]
    return sorted(objs, key=lambda o: (o[2], o[1]))


def describe_objects(objs) -> str:
    """E.g. ``"two objects: a red circle at the top left and a blue square in the centre"``."""
    if not objs:
        return "zero objects: an empty screen"
    items = [f"a {c} {s} {_CELL_PHRASE[cell]}" for c, s, cell in objs]
    head = f"{W.NUMBER_WORDS[len(objs)]} object{'s' if len(objs) > 1 else ''}: "
    return head + (items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1])


def frame_description(spec, tl, t: int) -> str:
    """The description of frame ``t`` (see :func:`describe_objects`)."""
    return describe_objects(frame_objects(spec, tl, t))


def hard_negative(objs, rng: np.random.Generator) -> list:
    """The frame's objects with exactly one thing changed (an object's shape, colour or cell; one object more or
    less): a text negative that only a tower which binds shape, colour and place to each object can reject."""
    objs = list(objs)
    kinds = ["shape", "colour", "cell", "add", "drop"] if objs else ["add"]
    kind = kinds[int(rng.integers(len(kinds)))]
    if kind == "add" and len(objs) >= 3:
        kind = "drop"
    cells = [(r, c) for r in range(3) for c in range(3)]
    if kind == "add":
        used = {o[2] for o in objs}
        free = [x for x in cells if x not in used]
        objs.append((W.COLOUR_NAMES[int(rng.integers(len(W.COLOUR_NAMES)))],
                     W.SHAPES[int(rng.integers(len(W.SHAPES)))], free[int(rng.integers(len(free)))]))
    elif kind == "drop":
        objs.pop(int(rng.integers(len(objs))))
    else:
        i = int(rng.integers(len(objs)))
        c, s, cell = objs[i]
        if kind == "shape":
            s = rng.choice([x for x in W.SHAPES if x != s])
        elif kind == "colour":
            c = rng.choice([x for x in W.COLOUR_NAMES if x != c])
        else:
            cell = cells[rng.choice([k for k, x in enumerate(cells) if x != cell])]
        objs[i] = (str(c), str(s), cell)
    return sorted(objs, key=lambda o: (o[2], o[1]))


def _description_ids(text: str, length: int) -> list[int]:
    index = {w: i for i, w in enumerate(DESCRIPTION_WORDS)}
    ids = [index[w] for w in re.findall(r"[a-z]+|[,:]", text)][:length]
    return ids + [0] * (length - len(ids))


def _frame_facts(objs) -> np.ndarray:
    """Binary static facts of a frame: count (4 one-hot), colours (6), shapes (4), occupied cells (9)."""
    count = np.zeros(4)
    count[min(len(objs), 3)] = 1
    colours = np.array([any(c == name for c, _, _ in objs) for name in W.COLOUR_NAMES], np.float64)
    shapes = np.array([any(s == name for _, s, _ in objs) for name in W.SHAPES], np.float64)
    cells = np.zeros(9)
    for _, _, (r, c) in objs:
        cells[3 * r + c] = 1
    return np.concatenate([count, colours, shapes, cells])


_FACT_GROUPS = {"count": slice(0, 4), "colour": slice(4, 10), "shape": slice(10, 14), "cell": slice(14, 23)}
PATCH_CLASSES = 1 + len(W.COLOUR_NAMES) * len(W.SHAPES)  # background, then every (colour, shape) pair


def patch_objects(spec, tl, t: int, grid: int, min_cover: float = 0.2) -> np.ndarray:
    """The index (in ``spec.objects``) of the object covering most of each cell of a ``grid`` x ``grid`` patch grid
    over frame ``t``, -1 where no object covers ``min_cover`` of the cell; raster order, int64 [grid * grid]."""
    S = spec.size
    placed = list(W.sprite_placements(spec, tl, t))
    cover = np.zeros((len(placed) + 1, S, S), np.float32)
    cover[0] = min_cover * 0.999  # background wins unless an object covers enough of the cell
    for k, (_, (ya, yb, xa, xb), alpha) in enumerate(placed, start=1):
        cover[k, ya:yb, xa:xb] = alpha
    edges = np.linspace(0, S, grid + 1).round().astype(np.int64)
    cells = np.add.reduceat(np.add.reduceat(cover, edges[:-1], axis=1), edges[:-1], axis=2)
    area = np.diff(edges)[:, None] * np.diff(edges)[None, :]
    return np.asarray([-1] + [i for i, _, _ in placed])[(cells / area).argmax(0)].reshape(-1)


def patch_labels(spec, tl, t: int, grid: int, min_cover: float = 0.2) -> np.ndarray:
    """The (colour, shape) class of the object covering most of each cell of a ``grid`` x ``grid`` patch grid over
    frame ``t`` (0 = background: no object covers ``min_cover`` of the cell, `patch_objects`), raster order, int64
    [grid * grid].

    These are the dense targets of the tower's auxiliary loss: they make every patch feature say which object it
    sits on, colour and shape together, so a connector that pools patches keeps shape bound to colour."""
    classes = [0] + [1 + W.COLOUR_NAMES.index(tl.colour_name(i, t)) * len(W.SHAPES)
                     + W.SHAPES.index(spec.objects[i].shape) for i in range(len(spec.objects))]
    return np.asarray(classes)[patch_objects(spec, tl, t, grid, min_cover) + 1]


class FrameSet:
    """Frames of some clips (the ``frames_per_clip`` frames a model samples uniformly), resized to the tower's
    input exactly like inference (uint8 after the PIL resize), with their descriptions and static facts."""

    def __init__(self, specs: list, image_size: int, *, frames_per_clip: int = 16, text_length: int = 40,
                 patch_grid: int | None = None):
        proc = ImageProcessor.for_tower("siglip", image_size)
        images, texts, facts, clip_of, objects, dense = [], [], [], [], [], []
        for k, spec in enumerate(specs):
            frames = W.render_clip(spec)
            tl = W.timeline(spec)
            for t in np.linspace(0, spec.frames - 1, min(frames_per_clip, spec.frames)).astype(np.int64):
                images.append(np.asarray(proc.resize(frames[t])))
                objs = frame_objects(spec, tl, int(t))
                objects.append(objs)
                texts.append(describe_objects(objs))
                facts.append(_frame_facts(objs))
                clip_of.append(k)
                if patch_grid:
                    dense.append(patch_labels(spec, tl, int(t), patch_grid))
        self.images = np.stack(images)  # [N, S, S, 3] uint8
        self.texts = texts
        self.objects = objects
        self.text_length = text_length
        self.text_ids = torch.tensor([_description_ids(t, text_length) for t in texts], dtype=torch.long)
        self.facts = torch.tensor(np.stack(facts), dtype=torch.float32)
        self.clip_of = np.array(clip_of)
        self.patch_labels = torch.from_numpy(np.stack(dense)) if dense else None  # [N, grid * grid]
        # [N, colours x shapes]: which (colour, shape) objects each frame shows
        self.object_sets = torch.zeros(len(objects), PATCH_CLASSES - 1)
        for n, objs in enumerate(objects):
            for c, s, _ in objs:
                self.object_sets[n, W.COLOUR_NAMES.index(c) * len(W.SHAPES) + W.SHAPES.index(s)] = 1
        self.num_clips = len(specs)
        self.proc = proc

    def pixels(self, idx) -> torch.Tensor:
        """Normalised pixel values [n, 3, S, S], the same arithmetic as ImageProcessor.__call__."""
        x = (self.images[idx].astype(np.float64) * (1 / 255)).astype(np.float32)
        x = (x - np.float32(0.5)) / np.float32(0.5)
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))

    def positives(self, idx, texts: list[str] | None = None) -> torch.Tensor:
        """[len(texts), n] 1 where a text is the description of a frame (default texts: the frames' own)."""
        own = [self.texts[i] for i in idx]
        texts = own if texts is None else texts
        return torch.tensor([[float(a == b) for b in own] for a in texts])

    def batch_texts(self, idx, rng: np.random.Generator | None) -> tuple[torch.Tensor, list[str]]:
        """Token ids and strings of the frames' descriptions, then (with ``rng``) one hard negative per frame."""
        texts = [self.texts[i] for i in idx]
        if rng is not None:
            texts += [describe_objects(hard_negative(self.objects[i], rng)) for i in idx]
        ids = torch.tensor([_description_ids(t, self.text_length) for t in texts], dtype=torch.long)
        return ids, texts


def _siglip_loss(logits_per_text: torch.Tensor, positives: torch.Tensor) -> torch.Tensor:
    """SigLIP's sigmoid loss over every (text, image) pair, normalised per image as transformers' SiglipModel
    does for a square batch; ``positives`` [texts, images] marks the true pairs (several when descriptions repeat,
    none for a hard-negative text)."""
    signs = 2 * positives - 1
    return -torch.nn.functional.logsigmoid(signs * logits_per_text).sum() / logits_per_text.shape[1]


def _siglip_config(vocab: int, *, image_size, patch_size, hidden_size, layers, heads, intermediate, text_hidden_size,
                   text_layers, text_length):
    from transformers import SiglipConfig

    vision = dict(hidden_size=hidden_size, intermediate_size=intermediate, num_hidden_layers=layers,
                  num_attention_heads=heads, image_size=image_size, patch_size=patch_size, num_channels=3)
    text = dict(vocab_size=vocab, hidden_size=text_hidden_size, intermediate_size=2 * text_hidden_size,
                num_hidden_layers=text_layers, num_attention_heads=max(1, text_hidden_size // 32),
                max_position_embeddings=text_length, pad_token_id=0, bos_token_id=None, eos_token_id=None,
                projection_size=hidden_size)
    return SiglipConfig(text_config=text, vision_config=vision)


@torch.no_grad()
def patch_features(vision_model, pixels: torch.Tensor, feature_layer: int = -2,
                   select_strategy: str = "patch") -> torch.Tensor:
    """What the TinyLLaVA connector reads from ``vision_model``: the library's own tower read-out (hidden layer
    ``feature_layer``; "patch" drops token 0 like the reference, "cls_patch" keeps every token)."""
    from vidlmm.vision import VisionTower

    return VisionTower.around(vision_model, feature_layer=feature_layer, select_strategy=select_strategy)(pixels)


def ridge_predict(train_x, train_y, test_x, lam: float = 1.0) -> torch.Tensor:
    """Ridge regression in dual form (standardised inputs, penalty ``lam * sqrt(dims)``): predictions for test_x.
    Shared by the stage-0 probe and `train.diagnose probe`."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    ym = train_y.mean(0)
    alpha = torch.linalg.solve(a @ a.T + lam * a.shape[1] ** 0.5 * torch.eye(len(a), dtype=a.dtype), train_y - ym)
    return (b @ a.T) @ alpha + ym


def _ridge_probe(train_x, train_y, test_x, test_y, lam: float = 1.0) -> dict:
    """Linear read-out of static facts (ridge regression, dual form), accuracy per fact group on test frames."""
    pred = ridge_predict(train_x, train_y, test_x, lam)
    res = {}
    for name, sl in _FACT_GROUPS.items():
        p, y = pred[:, sl], test_y[:, sl]
        if name == "count":
            res[name] = float((p.argmax(1) == y.argmax(1)).double().mean())
        else:
            res[name] = float(((p > 0.5) == (y > 0.5)).all(1).double().mean())  # every colour/shape/cell right
    return res


def _probe(vision_model, train: FrameSet, test: FrameSet, n_train: int, n_test: int, seed: int) -> dict:
    """Ridge read-outs of the static facts from layer -2 patch features: ``flat`` (all patches concatenated: is
    the fact there at all) and ``mean`` (the patches' mean: readable without knowing where to look)."""
    rng = np.random.default_rng([seed, 5])
    tr = np.sort(rng.choice(len(train.texts), size=min(n_train, len(train.texts)), replace=False))
    te = np.sort(rng.choice(len(test.texts), size=min(n_test, len(test.texts)), replace=False))
    fx = patch_features(vision_model, train.pixels(tr)).double()
    gx = patch_features(vision_model, test.pixels(te)).double()
    fy, gy = train.facts[tr].double(), test.facts[te].double()
    return {"flat": _ridge_probe(fx.flatten(1), fy, gx.flatten(1), gy),
            "mean": _ridge_probe(fx.mean(1), fy, gx.mean(1), gy, lam=1e-2)}


@torch.no_grad()
def _dense_accuracy(vision_model, head, frames: FrameSet, n: int = 1000) -> dict:
    """The auxiliary head's per-patch (colour, shape) accuracy on eval frames, over object patches only."""
    idx = np.arange(min(n, len(frames.texts)))
    pred = head(patch_features(vision_model, frames.pixels(idx), select_strategy="cls_patch")).argmax(-1)
    y = frames.patch_labels[idx]
    on = y > 0
    return {"object_patches": float((pred[on] == y[on]).double().mean()),
            "background": float((pred[~on] == 0).double().mean())}


@torch.no_grad()
def _retrieval(model, frames: FrameSet, batch: int, seed: int) -> dict:
    """Image->text top-1 among ``batch`` frames of distinct eval clips (a hit when the retrieved description
    equals the frame's own), averaged over a few batches (chance is about 1 / batch), and how often a frame scores
    its own description above a one-change hard negative (chance 0.5)."""
    rng = np.random.default_rng([seed, 9])
    hits = total = t2i = binding = 0
    for _ in range(4):
        clips = rng.permutation(frames.num_clips)[:batch]
        idx = np.array([rng.choice(np.flatnonzero(frames.clip_of == c)) for c in clips])
        ids, texts = frames.batch_texts(idx, rng)
        out = model(input_ids=ids, pixel_values=frames.pixels(idx))
        n = len(idx)
        pos = frames.positives(idx)
        logits = out.logits_per_image  # [images, 2n texts]
        hits += int(pos[logits[:, :n].argmax(1), torch.arange(n)].sum())
        t2i += int(pos[torch.arange(n), logits[:, :n].argmax(0)].sum())
        binding += int((logits.diagonal()[:n] > logits[torch.arange(n), n + torch.arange(n)]).sum())
        total += n
    return {"image_to_text_top1": hits / total, "text_to_image_top1": t2i / total,
            "own_vs_hard_negative": binding / total, "batch": int(n), "chance": 1 / max(1, n)}


def pretrain_vision(world_dir, out_dir, *, image_size: int = 64, patch_size: int = 8, hidden_size: int = 96,
                    layers: int = 4, heads: int = 4, intermediate: int = 256, steps: int = 1000,
                    batch_size: int = 128, lr: float = 1e-3, seed: int = 0, text_hidden_size: int = 96,
                    text_layers: int = 2, text_length: int = 40, weight_decay: float = 0.05,
                    hard_negatives: bool = True, dense_weight: float = 1.0, set_weight: float = 0.0,
                    probe: bool = True, progress: bool = True, siglip_dir=None) -> dict:
    """Train a SiglipModel with the sigmoid loss on (frame, description) pairs of training clips; save the vision
    half as a SiglipVisionModel folder in ``out_dir`` (and the whole model in ``siglip_dir`` when given).

    With ``dense_weight`` > 0 a linear head on the penultimate layer (the one the connector reads) also learns
    every patch's (colour, shape) class (:func:`patch_labels`); the head is thrown away afterwards. The sigmoid
    loss alone leaves shape only weakly readable per patch (its pooling head does the binding, and the
    connector never sees that head). With ``set_weight`` > 0 a linear head on the MEAN of those patches also
    learns which (colour, shape) objects the frame shows, to push the binding into every patch (tried for issue 23
    and not kept: the mean's read-out rose from 41 to 45 % of the objects, docs/embedded-models.md)."""
    from transformers import SiglipModel, SiglipVisionModel

    t0 = time.perf_counter()
    clips = W.load_clips(world_dir)
    grid = image_size // patch_size if dense_weight > 0 else None
    train = FrameSet(clips["train"], image_size, text_length=text_length, patch_grid=grid)
    evals = FrameSet(clips["eval"], image_size, text_length=text_length, patch_grid=grid) if clips["eval"] else None
    data_s = time.perf_counter() - t0

    torch.manual_seed(seed)
    config = _siglip_config(len(DESCRIPTION_WORDS), image_size=image_size, patch_size=patch_size,
                            hidden_size=hidden_size, layers=layers, heads=heads, intermediate=intermediate,
                            text_hidden_size=text_hidden_size, text_layers=text_layers, text_length=text_length)
    model = SiglipModel(config)
    with torch.no_grad():  # the paper's init: t' = log 10, b = -10
        model.logit_scale.fill_(math.log(10.0))
        model.logit_bias.fill_(-10.0)
    head = torch.nn.Linear(hidden_size, PATCH_CLASSES)
    trained = torch.nn.ModuleDict({"siglip": model, "patch_head": head})
    if set_weight > 0:  # made only when used: the torch random stream of the other recipes stays as it was
        set_head = trained["set_head"] = torch.nn.Linear(hidden_size, PATCH_CLASSES - 1)
    t1 = time.perf_counter()
    probe_init = _probe(model.vision_model, train, evals, 2000, 1000, seed) if (probe and evals) else None
    eval_s = time.perf_counter() - t1

    model.train()
    t1 = time.perf_counter()
    rng = np.random.default_rng([seed, 2])
    per_clip = [np.flatnonzero(train.clip_of == c) for c in range(train.num_clips)]
    clip_order: list[int] = []
    bsz = min(batch_size, train.num_clips)

    def next_loss():
        nonlocal clip_order
        if len(clip_order) < bsz:
            clip_order += rng.permutation(train.num_clips).tolist()
        chosen, clip_order = clip_order[:bsz], clip_order[bsz:]
        idx = np.array([per_clip[c][rng.integers(len(per_clip[c]))] for c in chosen])
        ids, texts = train.batch_texts(idx, rng if hard_negatives else None)
        out = model(input_ids=ids, pixel_values=train.pixels(idx), output_hidden_states=dense_weight + set_weight > 0)
        loss = _siglip_loss(out.logits_per_text, train.positives(idx, texts))
        if dense_weight > 0:
            logits = head(out.vision_model_output.hidden_states[-2])
            loss = loss + dense_weight * torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), train.patch_labels[idx].flatten())
        if set_weight > 0:  # the frame's (colour, shape) objects, read linearly from the MEAN of its patches
            pooled = out.vision_model_output.hidden_states[-2][:, 1:].mean(1)
            loss = loss + set_weight * torch.nn.functional.binary_cross_entropy_with_logits(
                set_head(pooled), train.object_sets[idx])
        return loss

    losses = _fit(trained, next_loss, steps=steps, lr=lr, weight_decay=weight_decay, desc="vision",
                  progress=progress)
    model.eval()
    train_s = time.perf_counter() - t1
    t1 = time.perf_counter()
    retrieval = _retrieval(model, evals, min(64, evals.num_clips), seed) if evals else None
    dense = _dense_accuracy(model.vision_model, head, evals) if (evals and dense_weight > 0) else None
    probe_final = _probe(model.vision_model, train, evals, 2000, 1000, seed) if (probe and evals) else None
    eval_s += time.perf_counter() - t1

    out = Path(out_dir)
    tower = model.vision_model  # a SiglipVisionModel in transformers 5
    assert isinstance(tower, SiglipVisionModel), type(tower)
    tower.save_pretrained(out)
    if siglip_dir is not None:
        model.save_pretrained(siglip_dir)
        (Path(siglip_dir) / "description_vocab.json").write_text(json.dumps(DESCRIPTION_WORDS))
    tail = max(1, min(20, len(losses) // 5))
    return {"params": _count_params(tower), "tokens_per_frame": (image_size // patch_size) ** 2 - 1,
            "train_frames": len(train.texts), "steps": steps, "batch_size": bsz, "first_loss": losses[0],
            "final_loss": float(np.mean(losses[-tail:])), "retrieval": retrieval, "probe_init": probe_init,
            "probe": probe_final, "patch_classes": dense, "data_seconds": data_s, "train_seconds": train_s,
            "eval_seconds": eval_s, "seconds": time.perf_counter() - t0}
