"""Stage 0: pretrain the backbones that stage 1 starts from, on the synthetic world only (no downloads).

The published TinyLLaVA-Video starts from a pretrained SigLIP tower and a pretrained Qwen2.5 LLM. We cannot download
them, so stage 0 makes small real ones for the world (``train/world/``), in the folder layout that
:func:`vidlmm.checkpoint.build_from_parts` reads:

1. **Tokenizer** (:func:`build_tokenizer`): a byte-level BPE with Qwen2's pre-tokenization
   (:func:`vidlmm.tokenizer.build_bpe_tokenizer`, hub layout) trained on the world's training text plus the
   ``qwen2_base`` template strings and the multiple-choice prompt pieces, weighted by how often every training
   sequence contains them, so the system prompt, ``USER:``/``ASSISTANT:``, the MC suffix and ``(A)``-style options
   come out as few tokens.
2. **LLM** (:func:`pretrain_llm`): a ``Qwen2ForCausalLM`` (tied embeddings, eos = pad = ``<|endoftext|>``) trained
   as a plain causal LM on the world's training conversations rendered exactly as stage 2 renders them (the
   ``qwen2_base`` template with the ``<image>`` placeholder removed, the pieces around it tokenized separately as
   :func:`vidlmm.conversation.tokenizer_image_token` does), more caption / QA draws of the same *training* clips
   from the world's public generators, and multiple-choice prompts of training clips in both evaluation styles
   with letter answers, so the LM knows the answer format. Eval clips are never used for training; 5% of the
   training clips are held out for a validation loss.
3. **Vision tower** (:func:`pretrain_vision`): a ``SiglipModel`` (the vision tower plus a small text tower over a
   word-level vocabulary of frame descriptions) trained with SigLIP's sigmoid image-text loss on (frame,
   description) pairs: random frames of training clips rendered with :func:`train.world.render_clip` and resized
   exactly like inference (:class:`vidlmm.preprocess.ImageProcessor`, PIL bicubic squash), described from
   :func:`train.world.timeline` ("two objects: a red circle at the top left and a blue square in the centre").
   Pairs whose descriptions are equal count as positives, so identical scenes in one batch are not negatives, and
   every frame adds a one-change hard-negative text (another shape, colour or cell for one object, one object more
   or less), which makes the tower bind shape, colour and place per object.
   The vision half is saved as a ``SiglipVisionModel`` folder (the whole ``SiglipModel``, with the description
   vocabulary, goes to ``siglip/`` for zero-shot use). Its report: image->text top-1 retrieval among frames of
   eval clips and linear probes of static facts (count, colours, shapes, occupied grid cells) on the
   penultimate-layer patch features the connector reads, next to the same probes on the untrained tower.

Everything is deterministic given the seed (torch.manual_seed, numpy generators for the data order).

    python -m train.stage0 --world /tmp/w1000 --out /tmp/s0 [--smoke] [--seed 0]

writes ``OUT/tokenizer``, ``OUT/llm`` (causal LM + tokenizer files), ``OUT/vision`` (SiglipVisionModel),
``OUT/siglip`` and ``OUT/stage0.json`` (the stats), and prints a summary.

Modules: `common` (budgets, schedule, loop), `text` (conversations, tokenizer), `symbols` (a video as one token per
object, for the LLM), `lm` (the LLM), `tower`
(the vision tower), `run` (the driver and `python -m train.stage0`).
"""

from .common import BUDGETS, HOLDOUT_EVERY, MC_STYLES, TEMPLATE, split_clips
from .lm import greedy_reply, mc_check, pretrain_llm, symbolic_read, symbolic_video_qa
from .run import format_summary, main, run_stage0
from .symbols import (alignment_loss, factored_rows, patch_alignment_loss, patch_symbols, symbol_count, symbolic_video,
                      write_symbol_annotations)
from .text import (
    build_tokenizer, context_conversations, conversation_ids, mc_conversations, render_conversation,
    restatement_ids, symbolic_ids, template_strings, tokenizer_report, world_conversations, write_lookup_annotations,
    write_mc_annotations, write_other_video_annotations, write_single_object_annotations,
)
from .tower import (
    DESCRIPTION_WORDS, FrameSet, PATCH_CLASSES, describe_objects, frame_description, frame_objects, hard_negative,
    patch_features, patch_labels, patch_objects, pretrain_vision,
)

__all__ = [
    "BUDGETS", "DESCRIPTION_WORDS", "HOLDOUT_EVERY", "MC_STYLES", "PATCH_CLASSES", "TEMPLATE", "FrameSet",
    "alignment_loss", "build_tokenizer", "context_conversations", "conversation_ids", "describe_objects",
    "factored_rows", "format_summary", "frame_description", "frame_objects", "greedy_reply", "hard_negative", "main",
    "mc_check", "mc_conversations", "patch_alignment_loss", "patch_features", "patch_labels", "patch_objects",
    "patch_symbols", "pretrain_llm", "pretrain_vision",
    "render_conversation", "restatement_ids", "run_stage0", "split_clips", "symbol_count", "symbolic_ids",
    "symbolic_read", "symbolic_video", "symbolic_video_qa", "template_strings", "tokenizer_report",
    "world_conversations", "write_lookup_annotations", "write_mc_annotations", "write_other_video_annotations",
    "write_single_object_annotations",
    "write_symbol_annotations",
]
