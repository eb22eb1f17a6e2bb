"""Stage 0: pretrain the backbones that stage 1 starts from, on the synthetic world only (no downloads).

The published TinyLLaVA-Video starts from a pretrained SigLIP tower and a pretrained Qwen2.5 LLM. We cannot download
them, so stage 0 makes small real ones for the world (``train/world.py``), in the folder layout that
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
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import torch

from train import world as W
from vidlmm.conversation import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, build_prompt, get_template, tokenizer_image_token
from vidlmm.evaluate import SUFFIX, MCItem, build_mc_question
from vidlmm.preprocess import ImageProcessor
from vidlmm.tokenizer import EOS_TOKEN, build_bpe_tokenizer, load_tokenizer

TEMPLATE = "qwen2_base"
MC_STYLES = ("mvbench", "videomme")
HOLDOUT_EVERY = 20  # every 20th training clip is held out of LM training for the validation loss

# "full" takes about 10 minutes on 2 CPU cores; "smoke" a few seconds (tests).
BUDGETS = {
    "full": dict(
        vocab_size=1024,  # the world has ~110 distinct words: BPE stops at ~650 ids, one token per word
        llm=dict(hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate=384, steps=1400, batch_size=32,
                 lr=2e-3, variants=3, init_std=0.1),
        vision=dict(image_size=64, patch_size=8, hidden_size=96, layers=4, heads=4, intermediate=256, steps=1000,
                    batch_size=128, lr=1e-3, text_hidden_size=96, text_layers=2),
    ),
    "smoke": dict(
        vocab_size=320,
        threads=1,  # tiny matrices: one thread is as fast, and robust when other jobs share the cores
        llm=dict(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate=64, steps=30, batch_size=8, lr=5e-3,
                 variants=0, init_std=0.1),
        vision=dict(image_size=32, patch_size=8, hidden_size=32, layers=2, heads=2, intermediate=64, steps=12,
                    batch_size=16, lr=2e-3, text_hidden_size=32, text_layers=1),
    ),
}


# ---------------------------------------------------------------------------------------------- shared bits
def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))  # floor at 10% of the peak


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float, steps: int, warmup_ratio: float = 0.05):
    from .trainer import optimizer_groups

    opt = torch.optim.AdamW(optimizer_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-8)
    warmup = max(1, int(steps * warmup_ratio))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, warmup))
    return opt, sched


def _fit(model: torch.nn.Module, next_loss, *, steps: int, lr: float, weight_decay: float, desc: str,
         progress: bool) -> list[float]:
    """The shared loop of both stage-0 models: `next_loss()` gives the next batch's loss; returns all losses."""
    opt, sched = _optimizer(model, lr, weight_decay, steps)
    losses = []
    bar = _progress(range(steps), desc, progress)
    for step in bar:
        loss = next_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress and step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return losses


def _progress(iterable, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def _split_clips(world_dir) -> tuple[list, list, list]:
    """(LM training clips, LM held-out training clips, eval clips)."""
    clips = W.load_clips(world_dir)
    train = clips["train"]
    held = [s for k, s in enumerate(train) if k % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    fit = [s for k, s in enumerate(train) if k % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    return fit, held, clips["eval"]


def _count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in dict.fromkeys(model.parameters()))


# ---------------------------------------------------------------------------------------------- text
def template_strings() -> list[str]:
    """The fixed strings every stage-2 / eval prompt is made of (qwen2_base template and the MC prompt pieces)."""
    t = get_template(TEMPLATE)
    letters = "ABCD"
    return [
        t.system,
        "USER: ",
        " ASSISTANT:",
        "ASSISTANT: ",
        EOS_TOKEN,
        SUFFIX,
        "\n".join(f"({c}) Red" for c in letters),
        "\n".join(f"{c}. Red" for c in letters),
        " ".join(f"({c})" for c in letters),
        " ".join(f"{c}." for c in letters),
    ]


def _mc_item(d: dict) -> MCItem:
    return MCItem(id=d["id"], video=d["video"], question=d["question"],
                  options=[W.option_text(o) for o in d["options"]], letters=list("ABCD"), answer_letter=d["answer"],
                  category=d.get("category", "all"))


def _mc_answer(item: MCItem) -> str:
    """The correct option's text ("Red"), which `vidlmm.evaluate.parse_choice` reads as that option, as the
    reference's parser does. Not the letter: a 0.9 M-parameter LM does not learn to bind an option's text to its
    letter in this budget (`python -m train.diagnose context`: 29.7 % right with letter answers even with the
    clip's caption in context; one constant letter after stage 2), while answering with the content is the same
    skill as open-ended QA."""
    return item.answer_text


def _mc_prompts(spec, rng: np.random.Generator, per_clip: int, first: str = "static"):
    """(MC item, its prompt in a random evaluation style) for `per_clip` of the clip's questions."""
    for d in W.mc_items(spec, rng, n=per_clip, first=first):
        item = _mc_item(d)
        yield item, build_mc_question(item, MC_STYLES[int(rng.integers(len(MC_STYLES)))])


def mc_conversations(specs: Iterable, seed: int, *, per_clip: int = 2,
                     first: str = "static") -> list[list[tuple[str, str]]]:
    """Multiple-choice (question, answer) conversations of the given clips (pass TRAINING clips only), in both
    evaluation prompt styles, built with the world's own MC generator and :func:`vidlmm.evaluate.build_mc_question`.
    Each clip's first question is of category ``first`` (static or temporal), its second of the other."""
    convs = []
    for k, spec in enumerate(specs):
        rng = np.random.default_rng([seed, 7, k])
        convs += [[(prompt, _mc_answer(item))] for item, prompt in _mc_prompts(spec, rng, per_clip, first)]
    return convs


def write_mc_annotations(world_dir, out_file, *, seed: int = 0, per_clip: int = 3) -> Path:
    """Multiple-choice QA on every TRAINING clip in the reference annotation format (``<image>`` first), for
    stage 2: the paper's mix has multiple-choice QA beside open-ended QA, and the held-out set is multiple-choice.
    Clips alternate which category comes first, so that even ``per_clip=1`` asks static and temporal questions
    (half each), as the held-out set does (with static first everywhere, a model never saw a temporal question with
    options and answered "Which object moves?" with a colour)."""
    train = W.load_clips(world_dir)["train"]
    records = []
    for n, spec in enumerate(train):
        # a seed per clip (not the LM's: these draws are new questions and letter orders for the same clips)
        for k, ((question, answer),) in enumerate(mc_conversations([spec], seed=1_000_003 * (seed + 1) + n,
                                                                  per_clip=per_clip,
                                                                  first=("static", "temporal")[n % 2])):
            records.append({"id": f"{spec.id}_mc{k}", "video": f"videos/{spec.id}.mp4",
                            "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                                              {"from": "gpt", "value": answer}]})
    out_file = Path(out_file)
    out_file.write_text(json.dumps(records, indent=1))
    return out_file


def write_single_object_annotations(world_dir, out_file, *, seed: int = 0) -> Path:
    """Single-turn colour and shape questions about the TRAINING clips that show one object, for stage 2.

    In the world's QA mix a single object's colour or shape is a small share of the answers, most of them about
    clips with several objects. These records put the easy case (nothing to bind: one object) in the mix, so
    reading colour and shape off the visual tokens can start there (`build_embedded --single-object-qa`; its
    measured effect, on group before the init fix and on pool now, is in the README)."""
    rng = np.random.default_rng([seed, 29])
    records = []
    for spec in W.load_clips(world_dir)["train"]:
        if len(spec.objects) != 1:
            continue
        for q, question in W.asked_questions(spec, rng, ("colour", "shape")):
            records.append({"id": f"{spec.id}_{q.key}", "video": f"videos/{spec.id}.mp4",
                            "conversations": [{"from": "human", "value": f"{IMAGE_TOKEN}\n{question}"},
                                              {"from": "gpt", "value": f"{q.answer}."}]})
    out_file = Path(out_file)
    out_file.write_text(json.dumps(records, indent=1))
    return out_file


def _record_pairs(record: dict) -> list[tuple[str, str]]:
    conv = record["conversations"]
    return [(conv[i]["value"], conv[i + 1]["value"]) for i in range(0, len(conv), 2)]


def world_conversations(world_dir, specs: list, seed: int, *, variants: int = 0) -> list[list[tuple[str, str]]]:
    """Caption and QA conversations of ``specs`` (training clips): the world's own records (captions.json,
    qa.json) plus ``variants`` more caption and QA draws per clip from the world's public text generators."""
    ids = {s.id for s in specs}
    root = Path(world_dir)
    convs = []
    for name in ("captions.json", "qa.json"):
        for rec in json.loads((root / name).read_text()):
            if rec["id"] in ids:
                convs.append(_record_pairs(rec))
    cfg = _world_config(world_dir)
    for k, spec in enumerate(specs):
        for v in range(variants):
            rng = np.random.default_rng([seed, 11, k, v])
            prompt = W.CAPTION_PROMPTS[int(rng.integers(len(W.CAPTION_PROMPTS)))]
            convs.append([(prompt, W.caption(spec, rng))])
            convs.append(W.qa_turns(spec, rng, min_turns=cfg.min_turns, max_turns=cfg.max_turns))
    return convs


def context_conversations(specs: Iterable, seed: int, *, per_clip: int = 2) -> list[list[tuple[str, str]]]:
    """Reading-comprehension conversations of the given (TRAINING) clips: a caption of the clip stands where stage 2
    puts the video (right after ``USER: ``), then a multiple-choice or open question about the clip.

    A pretrained LLM arrives knowing how to answer from its context; ours learns it here, so that stage 2 only has
    to teach it to read the video the way it reads a caption, not also how to pick an option letter."""
    convs = []
    for k, spec in enumerate(specs):
        rng = np.random.default_rng([seed, 13, k])
        for item, prompt in _mc_prompts(spec, rng, per_clip):  # a caption drawn after each prompt, as before
            convs.append([(f"{W.caption(spec, rng)}\n{prompt}", _mc_answer(item))])
        turns = W.qa_turns(spec, rng, min_turns=1, max_turns=2)
        convs.append([(f"{W.caption(spec, rng)}\n{turns[0][0]}", turns[0][1]), *turns[1:]])
    return convs


def restatement_ids(specs: Iterable, tokenizer, seed: int) -> list[list[int]]:
    """Stage 1's layout (``pretrain`` template: the video, then its caption and eos) with a caption in the video's
    place: ``caption_1 caption_2 <|endoftext|>``, where caption_2 is the same caption (half of the time) or another
    draw for the same clip (same facts, other words). Predicting caption_2 needs reading caption_1: this is what
    teaches the LM to take facts from its context (induction / copying), which a pretrained LLM brings to stage 1
    and which soft visual tokens can only steer if it is there. (`python -m train.diagnose context`: an LM trained
    on conversations alone scored a caption 3.36 after its own caption and 3.29 after another clip's; with these
    sequences 0.77 and 1.24.)"""
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    seqs = []
    for k, spec in enumerate(specs):
        rng = np.random.default_rng([seed, 17, k])
        first = W.caption(spec, rng)
        second = first if rng.random() < 0.5 else W.caption(spec, rng)
        seqs.append(tokenizer(first, add_special_tokens=False)["input_ids"]
                    + tokenizer(second, add_special_tokens=False)["input_ids"] + [eos])
    return seqs


def _world_config(world_dir) -> W.WorldConfig:
    path = Path(world_dir) / "world.json"
    if not path.is_file():
        return W.WorldConfig()
    raw = json.loads(path.read_text()).get("config", {})
    known = set(W.WorldConfig.__dataclass_fields__)
    return W.WorldConfig(**{k: v for k, v in raw.items() if k in known})


def render_conversation(pairs: list[tuple[str, str]]) -> str:
    """The stage-2 training string (qwen2_base, answers closed by <|endoftext|>) with its ``<image>`` slot."""
    return build_prompt(TEMPLATE, pairs, add_generation_prompt=False)


def conversation_ids(pairs: list[tuple[str, str]], tokenizer) -> list[int]:
    """Token ids as stage 2 sees them, minus the video: pieces around ``<image>`` tokenized separately."""
    return [i for i in tokenizer_image_token(render_conversation(pairs), tokenizer) if i != IMAGE_TOKEN_INDEX]


def build_tokenizer(world_dir, out_dir, vocab_size: int = 512, *, seed: int = 0):
    """Train the world's BPE tokenizer (Qwen2 pre-tokenization, hub layout) into ``out_dir`` and return it loaded.

    Corpus: the world's training text (:func:`train.world.world_corpus`), MC prompts of training clips, and the
    template strings repeated as often as they occur in training sequences (so they get merged early)."""
    fit, held, _ = _split_clips(world_dir)
    corpus = [t.replace(IMAGE_TOKEN, "") for t in W.world_corpus(world_dir)]
    mc = mc_conversations(fit + held, seed)
    corpus += [q + " " + a for conv in mc for q, a in conv]
    weight = max(1, len(corpus))
    corpus += template_strings() * weight
    return build_bpe_tokenizer(corpus, vocab_size, out_dir, layout="hub")


def tokenizer_report(tokenizer) -> dict:
    """Tokens per template piece (what 'compact' means here)."""
    def n(s):
        return len(tokenizer(s, add_special_tokens=False)["input_ids"])

    t = get_template(TEMPLATE)
    return {"vocab": len(tokenizer), "system": n(t.system), "USER: ": n("USER: "), " ASSISTANT:": n(" ASSISTANT:"),
            "eos": n(EOS_TOKEN), "mc_suffix": n(SUFFIX), "(A) Red": n("(A) Red"), "A. Red": n("A. Red")}


# ---------------------------------------------------------------------------------------------- LLM
def _lm_batch(seqs: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    return ids, mask, labels


@torch.no_grad()
def _lm_eval_loss(model, seqs: list[list[int]], pad_id: int, batch_size: int = 32) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(seqs), batch_size):
        ids, mask, labels = _lm_batch(seqs[i:i + batch_size], pad_id)
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target = labels[:, 1:]
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                 ignore_index=-100, reduction="sum")
        total += float(loss)
        count += int((target != -100).sum())
    model.train()
    return total / max(count, 1)


_OPTION_LINE = re.compile(r"^(?:\(([A-D])\)|([A-D])\.) (.+)$")


@torch.no_grad()
def greedy_reply(model, tokenizer, question: str, max_new_tokens: int = 12) -> str:
    """The LM's greedy reply to one user turn in the stage-2 template, without a video."""
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    ids = [i for i in tokenizer_image_token(build_prompt(TEMPLATE, [(question, None)]), tokenizer)
           if i != IMAGE_TOKEN_INDEX]
    reply: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=torch.tensor([ids + reply])).logits[0, -1].argmax())
        if nxt == eos:
            break
        reply.append(nxt)
    return tokenizer.decode(reply)


def _mc_check(model, tokenizer, convs: list, limit: int = 200, max_new_tokens: int = 12) -> dict:
    """Held-out MC prompts (generation prompt, no video): the greedy reply parsed as the evaluation parses it
    (`vidlmm.evaluate.parse_choice`). ``parsed_rate``: replies that name an option; ``accuracy_no_video``: the
    right one (text priors only without a video or caption: near chance, 0.25, is expected)."""
    from vidlmm.evaluate import parse_choice

    parsed = right = n = 0
    for conv in convs[:limit]:
        (question, answer), = conv
        options = [m.groups() for m in map(_OPTION_LINE.match, question.splitlines()) if m]
        letters, texts = [a or b for a, b, _ in options], [t for _, _, t in options]
        choice = parse_choice(greedy_reply(model, tokenizer, question, max_new_tokens), texts, letters)
        gold = letters[texts.index(answer)] if answer in texts else answer.lstrip("(")[:1]
        parsed += choice is not None
        right += choice == gold
        n += 1
    return {"parsed_rate": parsed / max(n, 1), "accuracy_no_video": right / max(n, 1), "items": n}


def pretrain_llm(world_dir, tokenizer_dir, out_dir, *, hidden_size: int = 128, layers: int = 4, heads: int = 4,
                 kv_heads: int = 2, intermediate: int = 384, steps: int = 1400, batch_size: int = 32,
                 lr: float = 2e-3, seed: int = 0, variants: int = 3, context_per_clip: int = 2,
                 restatements: int = 2, weight_decay: float = 0.05, max_length: int = 512, init_std: float = 0.02,
                 progress: bool = True) -> dict:
    """Train a Qwen2ForCausalLM on the world's training text and save it (with the tokenizer) to ``out_dir``.

    ``init_std`` is the config's ``initializer_range`` (every Linear and the embeddings ~ N(0, init_std)). Qwen2's
    0.02 is made for width 2048+; at width 128 it leaves query-key logits near zero, attention uniform, and the model
    on a long plateau where it learns token statistics but no lookup: it counts the objects of a caption yet cannot
    find the colour of a named one. About 1/sqrt(width) (0.1 here) lets it leave that plateau: with the caption in
    front, colour of a named object 18 -> 46 of 108 and shape 40 -> 82 of 154 (`python -m train.diagnose context`,
    static_qa; `diagnose recall` shows the plateau on abstract tokens). The connector of stages 1-2 is initialised with the same value,
    as the reference initialises it with the LLM's initializer_range."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    t0 = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_dir)
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    fit, held, _ = _split_clips(world_dir)
    train_convs = (world_conversations(world_dir, fit, seed, variants=variants) + mc_conversations(fit, seed)
                   + (context_conversations(fit, seed, per_clip=context_per_clip) if context_per_clip else []))
    val_convs = world_conversations(world_dir, held, seed) + mc_conversations(held, seed + 1)
    train = [conversation_ids(c, tokenizer)[:max_length] for c in train_convs]
    for r in range(restatements):
        train += [ids[:max_length] for ids in restatement_ids(fit, tokenizer, seed + 100 * r)]
    val = [conversation_ids(c, tokenizer)[:max_length] for c in val_convs]

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=len(tokenizer), hidden_size=hidden_size, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv_heads,
                         max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos,
                         pad_token_id=eos, use_sliding_window=False, initializer_range=init_std)
    model = Qwen2ForCausalLM(config)
    model.train()
    rng = np.random.default_rng([seed, 1])
    order: list[int] = []
    val_before = _lm_eval_loss(model, val, eos) if val else float("nan")

    def next_loss():
        nonlocal order
        if len(order) < batch_size:
            order += rng.permutation(len(train)).tolist()
        batch, order = [train[i] for i in order[:batch_size]], order[batch_size:]
        ids, mask, labels = _lm_batch(batch, eos)
        return model(input_ids=ids, attention_mask=mask, labels=labels).loss

    losses = _fit(model, next_loss, steps=steps, lr=lr, weight_decay=weight_decay, desc="llm", progress=progress)
    model.eval()
    val_after = _lm_eval_loss(model, val, eos) if val else float("nan")
    mc = _mc_check(model, tokenizer, mc_conversations(held, seed + 1))
    if context_per_clip:  # the same check with the clip's caption where the video goes: can it read a context?
        with_caption = [c for c in context_conversations(held, seed + 1, per_clip=1) if SUFFIX in c[0][0]]
        mc["accuracy_with_caption"] = _mc_check(model, tokenizer, with_caption)["accuracy_no_video"]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    tail = max(1, min(20, len(losses) // 5))
    return {"params": _count_params(model), "vocab": len(tokenizer), "steps": steps, "batch_size": batch_size,
            "train_sequences": len(train), "train_tokens": int(sum(map(len, train))),
            "first_loss": losses[0], "final_loss": float(np.mean(losses[-tail:])),
            "val_loss_init": val_before, "val_loss": val_after, "mc_check": mc, "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------- vision
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


def patch_labels(spec, tl, t: int, grid: int, min_cover: float = 0.2) -> np.ndarray:
    """The (colour, shape) class of the object covering most of each cell of a ``grid`` x ``grid`` patch grid over
    frame ``t`` (0 = background: no object covers ``min_cover`` of the cell), raster order, int64 [grid * grid].

    These are the dense targets of the tower's auxiliary loss: they make every patch feature say which object it
    sits on, colour and shape together, so a connector that pools patches keeps shape bound to colour."""
    S = spec.size
    placed = list(W.sprite_placements(spec, tl, t))
    cover = np.zeros((len(placed) + 1, S, S), np.float32)
    cover[0] = min_cover * 0.999  # background wins unless an object covers enough of the cell
    labels = [0]
    for k, (i, (ya, yb, xa, xb), alpha) in enumerate(placed, start=1):
        cover[k, ya:yb, xa:xb] = alpha
        labels.append(1 + W.COLOUR_NAMES.index(tl.colour_name(i, t)) * len(W.SHAPES)
                      + W.SHAPES.index(spec.objects[i].shape))
    edges = np.linspace(0, S, grid + 1).round().astype(np.int64)
    cells = np.add.reduceat(np.add.reduceat(cover, edges[:-1], axis=1), edges[:-1], axis=2)
    area = np.diff(edges)[:, None] * np.diff(edges)[None, :]
    return np.asarray(labels)[(cells / area).argmax(0)].reshape(-1)


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
def patch_features(vision_model, pixels: torch.Tensor, feature_layer: int = -2, chunk: int = 256,
                   drop_first: bool = True) -> torch.Tensor:
    """What the TinyLLaVA connector reads: hidden layer ``feature_layer`` without token 0 ("patch" strategy)."""
    out = []
    for c in pixels.split(chunk):
        hidden = vision_model(pixel_values=c, output_hidden_states=True).hidden_states[feature_layer]
        out.append(hidden[:, 1:] if drop_first else hidden)
    return torch.cat(out)


def _ridge_probe(train_x, train_y, test_x, test_y, lam: float = 1.0) -> dict:
    """Linear read-out of static facts (ridge regression, dual form), accuracy per fact group on test frames."""
    mu, sd = train_x.mean(0), train_x.std(0) + 1e-6
    a, b = (train_x - mu) / sd, (test_x - mu) / sd
    ym = train_y.mean(0)
    k = a @ a.T
    alpha = torch.linalg.solve(k + lam * a.shape[1] ** 0.5 * torch.eye(len(a), dtype=a.dtype), train_y - ym)
    pred = (b @ a.T) @ alpha + ym
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
    pred = head(patch_features(vision_model, frames.pixels(idx), drop_first=False)).argmax(-1)
    y = frames.patch_labels[idx]
    on = y > 0
    return {"object_patches": float((pred[on] == y[on]).double().mean()), "background": float((pred[~on] == 0).double().mean())}


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
                    hard_negatives: bool = True, dense_weight: float = 1.0, probe: bool = True,
                    progress: bool = True, siglip_dir=None) -> dict:
    """Train a SiglipModel with the sigmoid loss on (frame, description) pairs of training clips; save the vision
    half as a SiglipVisionModel folder in ``out_dir`` (and the whole model in ``siglip_dir`` when given).

    With ``dense_weight`` > 0 a linear head on the penultimate layer (the one the connector reads) also learns
    every patch's (colour, shape) class (:func:`patch_labels`); the head is thrown away afterwards. The sigmoid
    loss alone leaves shape only weakly readable per patch (its pooling head does the binding, and the
    connector never sees that head)."""
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
        out = model(input_ids=ids, pixel_values=train.pixels(idx), output_hidden_states=dense_weight > 0)
        loss = _siglip_loss(out.logits_per_text, train.positives(idx, texts))
        if dense_weight > 0:
            logits = head(out.vision_model_output.hidden_states[-2])
            loss = loss + dense_weight * torch.nn.functional.cross_entropy(
                logits.flatten(0, 1), train.patch_labels[idx].flatten())
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
            "probe": probe_final, "patch_classes": dense, "data_seconds": data_s, "train_seconds": train_s, "eval_seconds": eval_s,
            "seconds": time.perf_counter() - t0}


# ---------------------------------------------------------------------------------------------- driver
def run_stage0(world_dir, out_dir, *, budget: str = "full", seed: int = 0, progress: bool = True) -> dict:
    """Tokenizer -> LLM -> vision tower into ``out_dir/{tokenizer,llm,vision,siglip}``; returns and saves stats."""
    if budget not in BUDGETS:
        raise ValueError(f"budget must be one of {', '.join(BUDGETS)}, not {budget!r}")
    b = BUDGETS[budget]
    threads = torch.get_num_threads()
    if b.get("threads"):
        torch.set_num_threads(b["threads"])
    try:
        return _run_stage0(world_dir, Path(out_dir), b, budget, seed, progress)
    finally:
        torch.set_num_threads(threads)


def _run_stage0(world_dir, out: Path, b: dict, budget: str, seed: int, progress: bool) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    tok = build_tokenizer(world_dir, out / "tokenizer", b["vocab_size"], seed=seed)
    stats = {"budget": budget, "seed": seed, "world": str(world_dir), "tokenizer": tokenizer_report(tok),
             "threads": torch.get_num_threads()}
    stats["tokenizer"]["seconds"] = time.perf_counter() - t0
    if progress:
        print(f"tokenizer: {stats['tokenizer']}", file=sys.stderr, flush=True)
    stats["llm"] = pretrain_llm(world_dir, out / "tokenizer", out / "llm", seed=seed, progress=progress, **b["llm"])
    stats["vision"] = pretrain_vision(world_dir, out / "vision", seed=seed, progress=progress,
                                      siglip_dir=out / "siglip", **b["vision"])
    stats["seconds"] = time.perf_counter() - t0
    (out / "stage0.json").write_text(json.dumps(stats, indent=1) + "\n")
    return stats


def format_summary(stats: dict) -> str:
    tk, lm, vi = stats["tokenizer"], stats["llm"], stats["vision"]
    lines = [
        f"stage 0 ({stats['budget']}, seed {stats['seed']}, {stats['threads']} threads): {stats['seconds']:.0f} s",
        f"tokenizer: vocab {tk['vocab']}; tokens: system {tk['system']}, 'USER: ' {tk['USER: ']}, "
        f"' ASSISTANT:' {tk[' ASSISTANT:']}, MC suffix {tk['mc_suffix']}, '(A) Red' {tk['(A) Red']} "
        f"({tk['seconds']:.1f} s)",
        f"llm: {lm['params'] / 1e6:.2f} M params, {lm['steps']} steps x {lm['batch_size']} seqs "
        f"({lm['train_sequences']} sequences, {lm['train_tokens'] / 1e6:.2f} M tokens), loss {lm['first_loss']:.3f} -> "
        f"{lm['final_loss']:.3f}, held-out {lm['val_loss_init']:.3f} -> {lm['val_loss']:.3f} ({lm['seconds']:.0f} s); "
        f"held-out MC prompts without video: replies naming an option {lm['mc_check']['parsed_rate']:.2f}, right "
        f"{lm['mc_check']['accuracy_no_video']:.2f} (chance 0.25)"
        + (f", with the caption in the video's place {lm['mc_check']['accuracy_with_caption']:.2f}"
           if "accuracy_with_caption" in lm["mc_check"] else ""),
        f"vision: {vi['params'] / 1e6:.2f} M params, {vi['tokens_per_frame']} tokens/frame, {vi['steps']} steps x "
        f"{vi['batch_size']} frames, sigmoid loss {vi['first_loss']:.3f} -> {vi['final_loss']:.3f} "
        f"({vi['seconds']:.0f} s, data {vi['data_seconds']:.0f} s)",
    ]
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
    p = argparse.ArgumentParser(prog="python -m train.stage0", description=__doc__.split("\n\n")[0])
    p.add_argument("--world", required=True, help="a world folder written by `python -m train.world`")
    p.add_argument("--out", required=True, help="output folder (tokenizer/, llm/, vision/, siglip/, stage0.json)")
    p.add_argument("--smoke", action="store_true", help="tiny models, a few steps (seconds; for tests)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    a = p.parse_args(None if argv is None else list(argv))
    if a.quiet:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    stats = run_stage0(a.world, a.out, budget="smoke" if a.smoke else "full", seed=a.seed, progress=not a.quiet)
    print(format_summary(stats))
    return 0


if __name__ == "__main__":
    sys.exit(main())
