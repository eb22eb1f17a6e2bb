"""Stage 0's text: the conversations and multiple-choice prompts the LM is trained on (rendered as stage 2
renders them) and the BPE tokenizer built for them."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Iterable

import numpy as np

from train import world as W
from vidlmm.conversation import IMAGE_TOKEN, IMAGE_TOKEN_INDEX, build_prompt, get_template, tokenizer_image_token
from vidlmm.evaluate import SUFFIX, MCItem, build_mc_question
from vidlmm.tokenizer import EOS_TOKEN, build_bpe_tokenizer

from .common import MC_STYLES, TEMPLATE, split_clips


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


def _mc_answer(item: MCItem, letter: bool = False) -> str:
    """The correct option's text ("Red"), which `vidlmm.evaluate.parse_choice` reads as that option, as the
    reference's parser does. Not the letter: a 0.9 M-parameter LM does not learn to bind an option's text to its
    letter in this budget (`python -m train.diagnose context`: 29.7 % right with letter answers even with the
    clip's caption in context; one constant letter after stage 2), while answering with the content is the same
    skill as open-ended QA. With ``letter``, the text then its letter ("Red (B)"), meant to be copied from the
    option line that holds the text just written, so that every reply names an option: tried on group, the LM
    writes the right text as often but not the letter of its line (33.4 % right; docs/embedded-models.md)."""
    return f"{item.answer_text} ({item.answer_letter})" if letter else item.answer_text


def _option_answers(item: MCItem, letter: bool = False) -> list[str]:
    """The answer each option would be (`_mc_answer` with that option right), for stage 2's option loss."""
    return [_mc_answer(replace(item, answer_letter=c), letter) for c in item.letters]


def _mc_prompts(spec, rng: np.random.Generator, per_clip: int, first: str = "static"):
    """(MC item, its prompt in a random evaluation style) for `per_clip` of the clip's questions."""
    for d in W.mc_items(spec, rng, n=per_clip, first=first):
        item = _mc_item(d)
        yield item, build_mc_question(item, MC_STYLES[int(rng.integers(len(MC_STYLES)))])


def _mc_asked(specs: Iterable, seed: int, per_clip: int, first: str):
    """(MC item, prompt) for `per_clip` questions of each clip, one random stream per clip."""
    for k, spec in enumerate(specs):
        yield from _mc_prompts(spec, np.random.default_rng([seed, 7, k]), per_clip, first)


def mc_conversations(specs: Iterable, seed: int, *, per_clip: int = 2, first: str = "static",
                     letter: bool = False) -> list[list[tuple[str, str]]]:
    """Multiple-choice (question, answer) conversations of the given clips (pass TRAINING clips only), in both
    evaluation prompt styles, built with the world's own MC generator and :func:`vidlmm.evaluate.build_mc_question`.
    Each clip's first question is of category ``first`` (static or temporal), its second of the other; ``letter``:
    the answers end with the option's letter (`_mc_answer`)."""
    return [[(prompt, _mc_answer(item, letter))] for item, prompt in _mc_asked(specs, seed, per_clip, first)]


def write_mc_annotations(world_dir, out_file, *, seed: int = 0, per_clip: int = 3, letter: bool = False,
                         turns: bool = False) -> Path:
    """Multiple-choice QA on every TRAINING clip in the reference annotation format (``<image>`` first), for
    stage 2: the paper's mix has multiple-choice QA beside open-ended QA, and the held-out set is multiple-choice.
    Clips alternate which category comes first, so that even ``per_clip=1`` asks static and temporal questions
    (half each), as the held-out set does (with static first everywhere, a model never saw a temporal question with
    options and answered "Which object moves?" with a colour). ``letter``: answers end with the option's letter.
    Each record is one question, its ``options`` the answer each option would be (stage 2's ``option_weight``);
    with ``turns``, a clip's questions are the turns of one record instead (the same questions: stage 2 reads the
    clip once for all of them), without ``options``, which scores one answer."""
    train = W.load_clips(world_dir)["train"]
    records = []
    for n, spec in enumerate(train):
        # a seed per clip (not the LM's: these draws are new questions and letter orders for the same clips)
        asked = list(_mc_asked([spec], 1_000_003 * (seed + 1) + n, per_clip, ("static", "temporal")[n % 2]))
        if turns:
            records.append(_record(spec, "mc", [(question, _mc_answer(item, letter)) for item, question in asked]))
            continue
        for k, (item, question) in enumerate(asked):
            records.append({**_record(spec, f"mc{k}", [(question, _mc_answer(item, letter))]),
                            "options": _option_answers(item, letter)})
    return _write_records(records, out_file)


def write_other_video_annotations(world_dir, out_file, *, seed: int = 0, per_clip: int = 1) -> Path:
    """Multiple-choice questions about each TRAINING clip, asked of another clip's video (the one half the
    training set on): the options say what the answer may be, the video says something else. Each record has its
    ``options`` and ``"answer_known": false``, so stage 2 trains it with the option loss alone (`option_weight`):
    whatever the video shows, the reply stays on one of the options. On stage 2's own clips the model's answer
    is nearly always right and on the options (`python -m train.diagnose gap`), so they teach that little; a
    held-out clip read wrongly is where a reply leaves them. Tried on group with weight 1: 77 unparsable replies
    against 90, the accuracy not shown apart; with weight 4, 11.6 points less (docs/embedded-models.md). Off."""
    train = W.load_clips(world_dir)["train"]
    records = []
    for n, spec in enumerate(train):
        other = train[(n + len(train) // 2) % len(train)]
        asked = _mc_asked([spec], 2_000_003 * (seed + 1) + n, per_clip, ("static", "temporal")[n % 2])
        for k, (item, question) in enumerate(asked):
            record = _record(spec, f"other{k}", [(question, _mc_answer(item))])
            records.append({**record, "video": f"videos/{other.id}.mp4", "answer_known": False,
                            "options": _option_answers(item)})
    return _write_records(records, out_file)


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
            records.append(_record(spec, q.key, [(question, f"{q.answer}.")]))
    return _write_records(records, out_file)


def write_lookup_annotations(world_dir, out_file, *, seed: int = 0) -> Path:
    """Every colour and shape question about each TRAINING clip with several objects, in random order as one
    conversation per clip, for stage 2: the lookups of stage 0's `lookup_conversations`, read off the visual
    tokens. In the world's QA mix a clip's objects are asked about once or twice, and the embedded models find an
    object by its colour ("Which shape is red?") but not by its shape ("What colour is the square?": on clips of
    two or three objects, another object's colour about half the time; `python -m train.diagnose types`)."""
    records = []
    for k, spec in enumerate(W.load_clips(world_dir)["train"]):
        if len(spec.objects) < 2:
            continue
        turns = every_question(spec, np.random.default_rng([seed, 43, k]), ("colour", "shape"))
        if turns:
            records.append(_record(spec, "lookups", turns))
    return _write_records(records, out_file)


def _record(spec, name: str, turns: list[tuple[str, str]]) -> dict:
    """A stage-2 annotation record of a training clip (the reference's format): id ``<clip>_<name>``, its video,
    the (question, answer) turns as a conversation with ``<image>`` before the first question."""
    conv = [(f"{IMAGE_TOKEN}\n{turns[0][0]}", turns[0][1]), *turns[1:]]
    return {"id": f"{spec.id}_{name}", "video": f"videos/{spec.id}.mp4",
            "conversations": [{"from": who, "value": text}
                              for pair in conv for who, text in zip(("human", "gpt"), pair)]}


def _write_records(records: list[dict], out_file) -> Path:
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
        # a caption after each prompt: this draw order fixes the seeded data
        for item, prompt in _mc_prompts(spec, rng, per_clip):
            convs.append([(f"{W.caption(spec, rng)}\n{prompt}", _mc_answer(item))])
        turns = W.qa_turns(spec, rng, min_turns=1, max_turns=2)
        convs.append([(f"{W.caption(spec, rng)}\n{turns[0][0]}", turns[0][1]), *turns[1:]])
    return convs


def every_question(spec, rng: np.random.Generator, types) -> list[tuple[str, str]]:
    """Every question of the given types about a clip as (question, answer.) turns, in random order."""
    asked = W.asked_questions(spec, rng, types)
    return [(asked[i][1], asked[i][0].answer + ".") for i in rng.permutation(len(asked))]


def lookup_conversations(specs: Iterable, seed: int, *, per_clip: int = 1) -> list[list[tuple[str, str]]]:
    """The clip's caption where stage 2 puts the video, then every colour and shape question about it in one
    conversation, in random order: dense practice in finding the object one word names and reading its other word.
    Without it the LM answers with the first object of the caption (`python -m train.diagnose context`: "The video
    shows a red triangle, a green circle and a purple square ... What colour is the square?" -> "Red")."""
    convs = []
    for k, spec in enumerate(specs):
        for r in range(per_clip):
            rng = np.random.default_rng([seed, 29, k, r])
            turns = every_question(spec, rng, ("colour", "shape"))
            if not turns:
                continue
            convs.append([(f"{W.caption(spec, rng)}\n{turns[0][0]}", turns[0][1]), *turns[1:]])
    return convs


def symbolic_ids(specs: Iterable, tokenizer, seed: int, *, per_clip: int = 1,
                 temporal: bool = False, extra: tuple = (), where: bool = False) -> list[list[int]]:
    """Sequences with the clip's symbolic video (`train.stage0.symbols`) where stages 1 and 2 put the visual
    tokens: per clip and draw, its caption in stage 1's layout (video, caption, eos), a QA conversation, a
    multiple-choice question and every colour and shape question (stage 2's template); with ``temporal``, also
    every temporal question of the clip in one conversation; with ``extra`` (question types), one more conversation
    of every question of those types; with ``where``, one more of where each object is at first and at the end
    (`train.stage0.symbols.where_turns`). The video's ids are inputs only: a batch scores no id at or past
    ``len(tokenizer)`` (`train.stage0.lm`)."""
    from .symbols import symbolic_video, where_turns

    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    seqs = []
    for k, spec in enumerate(specs):
        video = symbolic_video(spec, len(tokenizer))
        for r in range(per_clip):
            rng = np.random.default_rng([seed, 41, k, r])
            seqs.append(video + tokenizer(W.caption(spec, rng), add_special_tokens=False)["input_ids"] + [eos])
            lookups = every_question(spec, rng, ("colour", "shape"))
            item, prompt = next(_mc_prompts(spec, rng, 1, first=("static", "temporal")[(k + r) % 2]))
            convs = [W.qa_turns(spec, rng, min_turns=1, max_turns=3), [(prompt, _mc_answer(item))], lookups]
            if temporal:  # drawn last: the other sequences stay those of a run without it
                convs.append(every_question(spec, rng, W.QUESTION_TYPES["temporal"]))
            if extra:
                convs.append(every_question(spec, rng, tuple(extra)))
            if where:
                convs.append(where_turns(spec, rng))
            for turns in convs:
                if turns:
                    ids = conversation_ids([(f"{IMAGE_TOKEN}\n{turns[0][0]}", turns[0][1]), *turns[1:]], tokenizer,
                                           video=video)
                    seqs.append(ids)
    return seqs


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


def conversation_ids(pairs: list[tuple[str, str]], tokenizer, video: list[int] = ()) -> list[int]:
    """Token ids as stage 2 sees them, pieces around ``<image>`` tokenized separately; ``video`` (symbolic ids)
    where ``<image>`` stands, or nothing."""
    return prompt_ids(render_conversation(pairs), tokenizer, video)


def prompt_ids(prompt: str, tokenizer, video: list[int] = ()) -> list[int]:
    """A rendered prompt's ids with ``video`` (symbolic ids, or nothing) where its ``<image>`` stands."""
    ids = []
    for i in tokenizer_image_token(prompt, tokenizer):
        ids += list(video) if i == IMAGE_TOKEN_INDEX else [i]
    return ids


def build_tokenizer(world_dir, out_dir, vocab_size: int = 512, *, seed: int = 0):
    """Train the world's BPE tokenizer (Qwen2 pre-tokenization, hub layout) into ``out_dir`` and return it loaded.

    Corpus: the world's training text (:func:`train.world.world_corpus`), MC prompts of training clips, and the
    template strings repeated as often as they occur in training sequences (so they get merged early)."""
    fit, held, _ = split_clips(world_dir)
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
