"""A symbolic video for stage 0's LM: each sampled frame as a few tokens, one per visible object, each token
binding the object's colour, shape and place on the 3x3 grid, as one visual token can.

Why: a fresh LM of the stage-0 shape learns to find a value bound with its key in one token within a few hundred
steps, and does not learn it in 2,000 when the two are neighbouring tokens, as in a caption ("red square";
`python -m train.diagnose recall --layout pairs bound`). Reading captions, the LM never learns to find the object a
question names; reading these videos, it can. Stage 1 then trains the connector to give this LM what it reads.

The ids lie past the tokenizer's vocabulary (the model's embedding has rows no text produces, as Qwen2.5's padded
vocabulary does): ``len(tokenizer)`` is a blank slot, the combinations follow. The tokenizer is unchanged."""

from __future__ import annotations

import numpy as np

from train import world as W
from train.world.spec import _CELL_FRACTIONS, timeline
from vidlmm.video import FrameSampling, sample_frame_indices

FRAMES = 16  # the frames the embedded models sample (toy recipe: uniform 16)
SLOTS = 4    # tokens per frame: the image-level and group connectors' visual tokens per frame
CELLS = len(_CELL_FRACTIONS) ** 2


def symbol_count() -> int:
    """Ids a symbolic video uses: a blank and one per (colour, shape, cell)."""
    return 1 + len(W.COLOUR_NAMES) * len(W.SHAPES) * CELLS


def symbolic_video(spec, first_id: int, *, frames: int = FRAMES, slots: int = SLOTS) -> list[int]:
    """``frames`` x ``slots`` ids: per uniformly sampled frame (the models' sampling), its visible objects left to
    right (then top to bottom), each as the id of its (colour, shape, cell), the rest of the slots blank."""
    tl = timeline(spec)
    grid = np.array(_CELL_FRACTIONS) * spec.size
    ids: list[int] = []
    for t in sample_frame_indices(spec.frames, spec.fps, FrameSampling.uniform(frames)):
        here = []
        for i in np.flatnonzero(tl.visible[:, t]):
            row, col = (int(np.abs(grid - v).argmin()) for v in (tl.y[i, t], tl.x[i, t]))
            combo = (int(tl.colour[i, t]) * len(W.SHAPES) + W.SHAPES.index(spec.objects[i].shape)) * CELLS
            here.append((col, row, first_id + 1 + combo + row * len(_CELL_FRACTIONS) + col))
        ids += [s for _, _, s in sorted(here)][:slots] + [first_id] * max(0, slots - len(here))
    return ids
