"""The synthetic video world: short clips of a few large coloured shapes, with captions, QA and MC evaluation.

Everything is deterministic from ``WorldConfig.seed``. A clip is 1-3 objects (distinct shapes *and* distinct
colours, so "the circle" and "the red object" always name one object) on a plain dark background, sitting on a
3x3 grid, plus 1-3 events that happen one after another, never overlapping in time:

* ``move``: the object slides one or two grid cells left/right/up/down;
* ``appear`` / ``disappear``: it is absent before / after the event;
* ``colour``: it turns another colour (one no other object of the clip ever has);
* ``blink``: it vanishes and comes back N times (1-3).

Timings are chosen so that every event, every blink and the order of events are visible in the
``model_frames`` (16) frames a model samples uniformly (``np.linspace(0, T-1, n)``, like ``vidlmm.video``):
each blink gap, each pause between events and the margins at both ends last at least as long as the largest
gap between two sampled frames.

Text is templated from the ground truth: captions (a few phrasings), multi-turn QA with static questions
(answerable from one frame: colour, shape, count, existence) and temporal ones (direction, order of events,
blink counts, colour changes, appear/disappear), and held-out 4-option multiple-choice items. Answers use a
small fixed vocabulary: ``Red.``, ``Circle.``, ``Two.``, ``Left.``, ``Twice.``, ``Yes.``, ``The red circle.``,
``The red circle moves left.``; MC options are the same strings without the final period.

Files written by :func:`generate_world` (video paths are relative to ``out_dir``):
``videos/{train,eval}_NNNNN.mp4``, ``captions.json`` and ``qa.json`` (training clips, reference annotation
format), ``eval_mc.json`` (held-out clips), ``clips.json`` (the structured ground truth of every clip) and
``world.json`` (config, counts, checksums; no timings, so it is byte-identical for the same config).

Modules: `spec` (what a clip is, sampling), `render` (pixels, video files), `text` (captions, QA, MC),
`generate` (the world on disk, `python -m train.world`).
"""

from .generate import format_summary, generate_world, load_clips, main, sample_specs, world_corpus
from .render import render_clip, sprite_placements, video_codec, video_extension, write_clip
from .spec import (
    CAPTION_PROMPTS, COLOURS, COLOUR_NAMES, ClipSpec, DIRECTIONS, EVENT_KINDS, Event, FORMAT, IMAGE_TOKEN,
    NUMBER_WORDS, ObjectSpec, SHAPES, TIMES_WORDS, Timeline, WorldConfig, WorldManifest, sample_clip, sample_window,
    timeline,
)
from .text import (QUESTION_TYPES, asked_questions, caption, event_clause, event_sentence, mc_items, option_text,
                   qa_turns)

__all__ = [
    "CAPTION_PROMPTS", "COLOURS", "COLOUR_NAMES", "ClipSpec", "DIRECTIONS", "EVENT_KINDS", "Event", "FORMAT",
    "IMAGE_TOKEN", "NUMBER_WORDS", "ObjectSpec", "QUESTION_TYPES", "SHAPES", "TIMES_WORDS", "Timeline", "WorldConfig",
    "WorldManifest", "asked_questions", "caption", "event_clause", "event_sentence", "format_summary",
    "generate_world", "load_clips", "main", "mc_items", "option_text", "qa_turns", "render_clip", "sample_clip",
    "sample_specs", "sample_window", "sprite_placements", "timeline", "video_codec", "video_extension",
    "world_corpus", "write_clip",
]
