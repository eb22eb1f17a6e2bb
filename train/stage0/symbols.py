"""A symbolic video for stage 0's LM: each sampled frame as a few tokens, one per visible object, each token
binding the object's colour, shape and place on the 3x3 grid, as one visual token can.

Why: a fresh LM of the stage-0 shape learns to find a value bound with its key in one token within a few hundred
steps, and does not learn it in 2,000 when the two are neighbouring tokens, as in a caption ("red square";
`python -m train.diagnose recall --layout pairs bound`). Reading captions, the LM never learns to find the object a
question names; reading these videos, it can. Stage 1 then trains the connector to give this LM what it reads:
with the recipe's ``symbol_weight``, stage 1 also pulls each frame's visual tokens towards the embeddings of that
frame's symbols (`alignment_loss`), read from caption annotations that carry each clip's symbolic video
(`write_symbol_annotations`).

The ids lie past the tokenizer's vocabulary (the model's embedding has rows no text produces, as Qwen2.5's padded
vocabulary does): ``len(tokenizer)`` is a blank slot, the combinations follow. The tokenizer is unchanged."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from train import world as W
from train.world.spec import _CELL_FRACTIONS, timeline
from vidlmm.video import FrameSampling, sample_frame_indices

FRAMES = 16  # the frames the embedded models sample (toy recipe: uniform 16)
SLOTS = 4    # tokens per frame: the image-level and group connectors' visual tokens per frame
CELLS = len(_CELL_FRACTIONS) ** 2


def symbol_count() -> int:
    """Ids a symbolic video uses: a blank and one per (colour, shape, cell)."""
    return 1 + len(W.COLOUR_NAMES) * len(W.SHAPES) * CELLS


def symbol_index(colour: int, shape: int, row: int, col: int) -> int:
    """The index of a (colour, shape, cell) symbol among the symbols past the blank: a symbolic video writes it as
    ``first_id + 1 + index``."""
    return (colour * len(W.SHAPES) + shape) * CELLS + row * len(_CELL_FRACTIONS) + col


def symbol_parts(index: int) -> tuple[int, int, int, int]:
    """(colour, shape, row, col) of a symbol's index past the blank: `symbol_index` undone."""
    pair, cell = divmod(index, CELLS)
    return (*divmod(pair, len(W.SHAPES)), *divmod(cell, len(_CELL_FRACTIONS)))


class ComposedSymbols(torch.nn.Module):
    """The symbolic video's embedding rows as sums of learned parts: each (colour, shape, cell) row is its colour's
    + its shape's + its cell's part, each part ~ N(0, std / sqrt(3)) at the start, so a row starts as long as the
    LM's other rows; the blank row is a part of its own. An LM trained on these rows (``llm.symbol_init=composed``)
    cannot tell two symbols apart by anything but their parts, so what it learns to read from a symbol (find the
    square, read its colour) it reads from the parts, which a connector's token can carry when it is unsure of the
    rest (an object's cell, say). `rows` gives them in `symbolic_video`'s order. ``cells="grid"``: a cell's part is
    its row's plus its column's, which start on a line (top to bottom, left to right), so that which way an object
    moved is one difference along one direction, not a comparison of two of nine unrelated parts."""

    def __init__(self, width: int, std: float, seed: int = 0, cells: str = "free"):
        super().__init__()
        if cells not in ("free", "grid"):
            raise ValueError(f"cells must be 'free' or 'grid', not {cells!r}")
        gen = torch.Generator().manual_seed(seed)
        part = std / 3 ** 0.5
        self.colour = torch.nn.Parameter(torch.randn(len(W.COLOUR_NAMES), width, generator=gen) * part)
        self.shape = torch.nn.Parameter(torch.randn(len(W.SHAPES), width, generator=gen) * part)
        self.grid = cells == "grid"
        if self.grid:  # a cell's part is its row's + its column's, each starting on a line: top to bottom, left to right
            line = torch.linspace(-1.0, 1.0, len(_CELL_FRACTIONS))[:, None]
            self.row = torch.nn.Parameter(line * torch.randn(1, width, generator=gen) * part)
            self.col = torch.nn.Parameter(line * torch.randn(1, width, generator=gen) * part)
        else:
            self.cell = torch.nn.Parameter(torch.randn(CELLS, width, generator=gen) * part)
        self.blank = torch.nn.Parameter(torch.randn(1, width, generator=gen) * std)

    def cell_parts(self) -> torch.Tensor:
        """[CELLS, width] in `symbolic_video`'s cell order (row * 3 + column)."""
        if self.grid:
            return (self.row[:, None] + self.col[None, :]).reshape(CELLS, -1)
        return self.cell

    def rows(self) -> torch.Tensor:
        """[symbol_count(), width]: the blank, then (colour, shape, cell) in `symbolic_video`'s id order."""
        combos = self.colour[:, None, None] + self.shape[None, :, None] + self.cell_parts()[None, None, :]
        return torch.cat([self.blank, combos.reshape(-1, combos.shape[-1])])


def factored_rows(width: int, std: float, seed: int = 0) -> torch.Tensor:
    """[symbol_count(), width] embedding rows in which the symbols of one colour, one shape or one cell share a
    part (`ComposedSymbols`' rows at the start): an object's symbols in two cells start close. What an LM
    initialised this way need not learn: that two symbols are one object in two places."""
    with torch.no_grad():
        return ComposedSymbols(width, std, seed).rows()


def sampled_objects(spec, frames: int = FRAMES) -> list[list[tuple[int, int, int, int]]]:
    """Per uniformly sampled frame (the models' sampling), its visible objects as (col, row, colour, object):
    the cell of the 3x3 grid nearest the object's centre, its colour index then, its index in ``spec.objects``."""
    tl = timeline(spec)
    grid = np.array(_CELL_FRACTIONS) * spec.size
    out = []
    for t in sample_frame_indices(spec.frames, spec.fps, FrameSampling.uniform(frames)):
        here = []
        for i in np.flatnonzero(tl.visible[:, t]):
            row, col = (int(np.abs(grid - v).argmin()) for v in (tl.y[i, t], tl.x[i, t]))
            here.append((col, row, int(tl.colour[i, t]), int(i)))
        out.append(here)
    return out


def symbolic_video(spec, first_id: int, *, frames: int = FRAMES, slots: int = SLOTS) -> list[int]:
    """``frames`` x ``slots`` ids: per uniformly sampled frame (the models' sampling), its visible objects left to
    right (then top to bottom), each as the id of its (colour, shape, cell), the rest of the slots blank."""
    ids: list[int] = []
    for here in sampled_objects(spec, frames):
        frame = sorted((col, row, first_id + 1 + symbol_index(colour, W.SHAPES.index(spec.objects[i].shape), row, col))
                       for col, row, colour, i in here)
        ids += [s for _, _, s in frame][:slots] + [first_id] * max(0, slots - len(frame))
    return ids


def patch_symbols(spec, grid: int, frames: int = FRAMES) -> list[int]:
    """``frames`` x ``grid * grid`` ids: per uniformly sampled frame, the symbol of the object on each cell of the
    tower's patch grid (raster order; `train.stage0.tower.patch_objects`), as `symbolic_video` writes that object
    with ``first_id=0``, and 0 (the blank) where no object covers the cell. The targets of `patch_alignment_loss`."""
    from .tower import patch_objects

    tl = timeline(spec)
    ids: list[int] = []
    sampled = sample_frame_indices(spec.frames, spec.fps, FrameSampling.uniform(frames))
    for t, here in zip(sampled, sampled_objects(spec, frames)):
        symbol = {i: 1 + symbol_index(colour, W.SHAPES.index(spec.objects[i].shape), row, col)
                  for col, row, colour, i in here}
        ids += [symbol.get(int(i), 0) for i in patch_objects(spec, tl, int(t), grid)]
    return ids


def patch_symbols_of_tokens(ids, layout) -> torch.Tensor:
    """A clip's `patch_symbols` (per frame, over the tower's whole patch grid) for the tokens the tower passes on
    (a `vidlmm.connectors.TokenLayout`): [T * P] long, the blank for a token that is not a patch. ValueError with
    one sentence when the grids differ."""
    rows, cols = layout.grid
    cells = torch.as_tensor(ids).reshape(layout.num_frames, -1)
    if cells.shape[1] != rows * cols:
        raise ValueError(f"patch_symbols has {cells.shape[1]} cells per frame; the tower's patch grid has "
                         f"{rows} x {cols}.")
    patch = layout.row >= 0
    out = torch.zeros(len(layout.frame), dtype=torch.long)
    out[patch] = cells[layout.frame[patch], layout.row[patch] * cols + layout.col[patch]]
    return out


ROWS, COLUMNS = ("top", "middle", "bottom"), ("left", "middle", "right")


def where_turns(spec, rng: np.random.Generator, frames: int = FRAMES) -> list[tuple[str, str]]:
    """Where each object is in the first and in the last sampled frame, as (question, answer) turns in random order
    ("Where is the red square at the end?" -> "Top left."): the only questions that read the symbols' cells, which
    the direction of a move is made of. Training text of stage 0 only, not a question type of the world."""
    seen = sampled_objects(spec, frames)
    turns = []
    for when, here in (("at first", seen[0]), ("at the end", seen[-1])):
        for col, row, colour, i in here:
            cell = "middle" if (row, col) == (1, 1) else f"{ROWS[row]} {COLUMNS[col]}"
            question = f"Where is the {W.COLOUR_NAMES[colour]} {spec.objects[i].shape} {when}?"
            turns.append((question, cell[:1].upper() + cell[1:] + "."))
    return [turns[k] for k in rng.permutation(len(turns))]


def write_symbol_annotations(world_dir: Path, source: Path, out: Path, patch_grid: int | None = None) -> Path:
    """``source`` (annotations of the world's clips) with each item's symbolic video as ``"symbols"``: ids relative
    to the first symbolic id (0 is the blank slot), as `symbolic_video` gives them with ``first_id=0``; with a
    ``patch_grid`` (the tower's patches per side) also each patch's symbol as ``"patch_symbols"`` (`patch_symbols`)."""
    from train.world import load_clips

    specs = {f"videos/{spec.id}.mp4": spec for split in load_clips(world_dir).values() for spec in split}
    items = json.loads(Path(source).read_text())
    for item in items:
        item["symbols"] = symbolic_video(specs[item["video"]], 0)
        if patch_grid:
            item["patch_symbols"] = patch_symbols(specs[item["video"]], patch_grid)
    out.write_text(json.dumps(items))
    return out


def has_symbol_rows(rows: int, tokenizer) -> bool:
    """Whether an LM embedding of ``rows`` rows over ``tokenizer`` has the symbolic video's rows past the text's
    (an LM trained with `llm.symbolic_per_clip`)."""
    return rows >= len(tokenizer) + symbol_count()


def symbol_rows(model, tokenizer=None) -> torch.Tensor:
    """The LM embedding rows of the symbolic video ([symbol_count(), D], past the tokenizer) of a TinyLLaVA model,
    or of a bare LM given its ``tokenizer``; ValueError with one sentence when the LM has none (it was not trained
    with `llm.symbolic_per_clip`)."""
    lm, tokenizer = (model, tokenizer) if tokenizer is not None else (model.language_model, model.tokenizer)
    table = lm.get_input_embeddings().weight
    first = len(tokenizer)
    if not has_symbol_rows(table.shape[0], tokenizer):
        raise ValueError("This model's LM has no embedding rows for the symbolic video (a stage-0 LM trained with "
                         "llm.symbolic_per_clip has them).")
    return table[first:first + symbol_count()]


def part_lengths(rows: torch.Tensor) -> dict:
    """How a stage-0 LM's symbol rows ([symbol_count(), D], the blank first) tell objects apart: the rows fitted
    as sums of a colour's, a shape's and a cell's part (least squares; ``residual``: the share of the rows the
    sums miss, 0 for `ComposedSymbols`' rows), each part family's ``spread`` (its parts' mean distance from their
    mean: how far apart it sets two symbols), and ``cos_other``: the mean cosine of a row with the row that
    differs from it in that part only (near 1: a token must be exact to be told from its neighbour)."""
    colours, shapes = len(W.COLOUR_NAMES), len(W.SHAPES)
    rows = rows[1:].float()
    design = torch.zeros(len(rows), colours + shapes + CELLS)
    for i, (c, s, k) in enumerate(itertools.product(range(colours), range(shapes), range(CELLS))):
        design[i, [c, colours + s, colours + shapes + k]] = 1.0
    parts = torch.linalg.pinv(design) @ rows
    unit = F.normalize(rows, dim=-1).reshape(colours, shapes, CELLS, -1)
    out = {"residual": round(float((rows - design @ parts).norm() / rows.norm()), 3),
           "row_length": round(float(rows.norm(dim=-1).mean()), 3)}
    for axis, (name, part) in enumerate(zip(("colour", "shape", "cell"), parts.split([colours, shapes, CELLS]))):
        out[name] = {"spread": round(float((part - part.mean(0)).norm(dim=-1).mean()), 3),
                     "cos_other": round(float((unit * unit.roll(1, axis)).sum(-1).mean()), 3)}
    return out


_ORDERS = torch.tensor(list(itertools.permutations(range(SLOTS))))  # every order of a frame's slots
SCALE = 10.0  # inverse temperature of the cosine logits


def alignment_loss(tokens: torch.Tensor, table: torch.Tensor, ids) -> torch.Tensor:
    """How far a clip's visual tokens [FRAMES * SLOTS, D] are from the symbols of its symbolic video ``ids``
    (relative ids, as `write_symbol_annotations` stores them), whose embeddings are the rows of ``table``
    [symbol_count(), D]. Frame by frame (tokens ``f * SLOTS ...`` against frame f's symbols), each token is
    scored as a classifier over the symbols, its cosine to every row times `SCALE` the logits: cross-entropy of
    its symbol, plus the squared log ratio of its length to the symbol's (the LM reads lengths too). A frame's
    tokens meet its symbols in the order that fits them best, so a connector need not learn the symbolic video's
    left-to-right order. Mean per token; cross-entropy's log(symbol_count()) for tokens that know nothing."""
    t = tokens.float().reshape(-1, SLOTS, tokens.shape[-1])
    table = table.float()
    ids = torch.as_tensor(ids, device=t.device).reshape(-1, 1, SLOTS).expand(-1, SLOTS, -1)  # [frame, token, slot]
    logits = SCALE * F.normalize(t, dim=-1) @ F.normalize(table, dim=-1).T
    nll = -torch.gather(logits.log_softmax(-1), 2, ids)
    length = (t.norm(dim=-1, keepdim=True).clamp_min(1e-6) / table.norm(dim=-1)[ids]).log().pow(2)
    cost = nll + length  # [frame, token, symbol of the frame]
    per_order = cost[:, torch.arange(SLOTS)[None], _ORDERS.to(cost.device)].sum(-1)  # [frame, orders]
    return per_order.min(-1).values.mean() / SLOTS


def patch_alignment_loss(tokens: torch.Tensor, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """How far the tower's patches, each as a connector that passes patches on would give it to the LM alone
    ([M, D], `ConnectorModule.patch_tokens`), are from the symbols of the objects on them (``ids`` [M],
    `patch_symbols`; 0, the blank, for background). Each patch is scored as `alignment_loss` scores a token
    (cross-entropy of its symbol among all, from cosine logits, plus the squared log ratio of its length to the
    symbol's); the mean over the patches on objects and the mean over the background weigh the same (an object
    covers about a seventh of a frame). Per patch, not per output token: a loss on the tokens a connector kept would
    teach top-k's scorer to keep the background, whose blank is the easiest symbol to name."""
    t, table = tokens.float(), table.float()
    ids = ids.to(t.device)
    logits = SCALE * F.normalize(t, dim=-1) @ F.normalize(table, dim=-1).T
    nll = -logits.log_softmax(-1).gather(1, ids[:, None])[:, 0]
    length = (t.norm(dim=-1).clamp_min(1e-6) / table.norm(dim=-1)[ids]).log().pow(2)
    cost = nll + length
    on = ids > 0
    return torch.stack([cost[part].mean() for part in (on, ~on) if part.any()]).mean()
