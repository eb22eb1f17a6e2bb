"""The language model: a Qwen2-architecture causal LM pretrained on the world's training text
(`pretrain_llm`), with its validation loss and multiple-choice check."""

from __future__ import annotations

import re
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from vidlmm.conversation import build_prompt
from vidlmm.evaluate import SUFFIX
from vidlmm.tokenizer import EOS_TOKEN, load_tokenizer

from train import world as W

from .common import TEMPLATE, _count_params, _fit, split_clips
from .symbols import ComposedSymbols, factored_rows, symbol_count, symbol_parts, symbolic_video, where_turns
from .text import (context_conversations, conversation_ids, lookup_conversations, mc_conversations, prompt_ids,
                   restatement_ids, symbolic_ids, world_conversations)


def _lm_batch(seqs: list[list[int]], pad_id: int, text_vocab: int | None = None
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Padded ids, attention mask and labels; ids at or past ``text_vocab`` (a symbolic video) are not scored."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, :len(s)] = torch.tensor(s)
        mask[r, :len(s)] = 1
    labels = ids.masked_fill(mask == 0, -100)
    if text_vocab is not None:
        labels = labels.masked_fill(ids >= text_vocab, -100)
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
def greedy_reply(model, tokenizer, question: str, max_new_tokens: int = 12, video: list[int] = ()) -> str:
    """The LM's greedy reply to one user turn in the stage-2 template; ``video``: symbolic ids where the question's
    ``<image>`` stands (`train.stage0.symbols`), or no video."""
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    ids = prompt_ids(build_prompt(TEMPLATE, [(question, None)]), tokenizer, video)
    reply: list[int] = []
    for _ in range(max_new_tokens):
        nxt = int(model(input_ids=torch.tensor([ids + reply])).logits[0, -1].argmax())
        if nxt == eos:
            break
        reply.append(nxt)
    return tokenizer.decode(reply)


SYMBOLIC_QA_TYPES = W.QUESTION_TYPES["static"] + W.QUESTION_TYPES["temporal"]


def symbolic_video_qa(model, tokenizer, specs: list, seed: int = 0) -> dict:
    """Every question type of the world, answered greedily with the clip's symbolic video where the video goes
    (an LM trained with `llm.symbolic_per_clip`): what this LM can read from visual tokens that say exactly what a
    frame shows, one token per object. ``{"<type>": "right/asked"}``, and ``"where"``: where each object is at
    first and at the end (`train.stage0.symbols.where_turns`, the cells a move's direction is read from), a reply
    right when it is the cell's name."""
    right, n = Counter(), Counter()
    with torch.no_grad():
        for k, spec in enumerate(specs):
            rng = np.random.default_rng([seed, 43, k])
            video = symbolic_video(spec, len(tokenizer))
            for q, question in W.asked_questions(spec, rng, SYMBOLIC_QA_TYPES):
                reply = greedy_reply(model, tokenizer, f"<image>\n{question}", max_new_tokens=6, video=video)
                right[q.type] += q.answer.lower() in reply.lower()
                n[q.type] += 1
            for question, answer in where_turns(spec, rng):  # drawn last: the questions above stay the same
                reply = greedy_reply(model, tokenizer, f"<image>\n{question}", max_new_tokens=6, video=video)
                right["where"] += reply.strip().rstrip(".").lower() == answer.rstrip(".").lower()
                n["where"] += 1
    return {t: f"{right[t]}/{n[t]}" for t in (*SYMBOLIC_QA_TYPES, "where") if n[t]}


def symbolic_read(llm_dir, world_dir, limit: int = 64, seed: int = 0) -> dict:
    """`symbolic_video_qa` of a saved stage-0 LM on the first ``limit`` clips stage 0 held out of LM training
    (training clips of the world, never the held-out evaluation set): what `python -m train.diagnose context`
    reports as ``symbolic_video_qa``."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    _, held, _ = split_clips(world_dir)
    return symbolic_video_qa(model, load_tokenizer(llm_dir), held[:limit], seed)


def mc_check(model, tokenizer, convs: list, limit: int = 200, max_new_tokens: int = 12) -> dict:
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
                 restatements: int = 2, lookup_per_clip: int = 0, recall_steps: int = 0, symbolic_per_clip: int = 0,
                 symbolic_temporal: bool = False, symbolic_extra: tuple = (), symbolic_where: bool = False,
                 symbol_init: str = "random", symbol_cells: str = "free", motion_weight: float = 0.0,
                 motion_layer: int = 2, motion_detach: bool = False,
                 bucket: bool = False, weight_decay: float = 0.05, max_length: int = 512, init_std: float = 0.02,
                 progress: bool = True) -> dict:
    """Train a Qwen2ForCausalLM on the world's training text and save it (with the tokenizer) to ``out_dir``.

    ``init_std`` is the config's ``initializer_range`` (every Linear and the embeddings ~ N(0, init_std)). Qwen2's
    0.02 is made for width 2048+; at width 128 it leaves query-key logits near zero, attention uniform, and the model
    on a long plateau where it learns token statistics but no lookup: it counts the objects of a caption yet cannot
    find the colour of a named one. About 1/sqrt(width) (0.1 here) lets it leave that plateau: with the caption in
    front, colour of a named object 18 -> 46 of 108 and shape 40 -> 82 of 154 (`python -m train.diagnose context`,
    static_qa; `diagnose recall` shows the plateau on abstract tokens). The connector of stages 1-2 is initialised
    with the same value, as the reference initialises it with the LLM's initializer_range.

    ``symbolic_per_clip``: draws per training clip of `train.stage0.text.symbolic_ids` (the clip's symbolic video
    where the video goes); the embedding then has `train.stage0.symbols.symbol_count` rows past the tokenizer's.
    ``symbolic_temporal``: each draw also asks every temporal question of the clip; ``symbolic_extra`` (question
    types, e.g. ``["colour"]``): each draw also asks every question of those types; ``symbolic_where``: each draw
    also asks where every object is at first and at the end (`train.stage0.symbols.where_turns`: the cells a
    move's direction is read from). ``symbol_init``: "random" (the rows drawn as every other row), "factored"
    (`train.stage0.symbols.factored_rows`: rows that start as sums of a colour's, a shape's and a cell's part) or
    "composed" (rows that stay such sums through training, only the parts learned:
    `train.stage0.symbols.ComposedSymbols`; written into the embedding when saved); ``symbol_cells`` "grid": with
    "composed", a cell's part is its row's plus its column's (`ComposedSymbols`' cells). ``motion_weight``: with
    "composed", a linear head on the states after layer ``motion_layer`` learns, at each object symbol, where the
    object is against its first symbol (`motion_labels`; the head is not saved): the comparison across frames a
    move's direction needs, asked of every token; ``motion_detach``: that loss does not train the symbols' parts
    (a second pass on the rows detached), so the LM's layers, not longer cell parts, must carry the cell to that
    layer. ``bucket``: batches of sequences of similar length
    (`length_batches`), which pad less: the same steps in less time."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    if symbol_init not in ("random", "factored", "composed"):
        raise ValueError(f"symbol_init must be 'random', 'factored' or 'composed', not {symbol_init!r}")
    if symbol_init == "composed" and recall_steps:
        raise ValueError("symbol_init='composed' keeps the symbols' rows outside the embedding while training; the "
                         "recall warm-up (recall_steps) would train the embedding's own rows, then lost.")
    if motion_weight and symbol_init != "composed":
        raise ValueError("motion_weight reads the composed symbols' states: it needs symbol_init='composed'.")
    if motion_weight and not 1 <= motion_layer <= layers:
        raise ValueError(f"motion_layer must name a layer, 1 to {layers}, not {motion_layer}.")
    if symbol_cells != "free" and symbol_init != "composed":
        raise ValueError("symbol_cells sets the composed rows' cell parts: it needs symbol_init='composed'.")
    if symbol_init != "random" and not symbolic_per_clip:
        raise ValueError(f"symbol_init={symbol_init!r} sets the symbolic video's rows: it needs symbolic_per_clip > 0.")
    t0 = time.perf_counter()
    tokenizer = load_tokenizer(tokenizer_dir)
    eos = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    fit, held, _ = split_clips(world_dir)
    train_convs = (world_conversations(world_dir, fit, seed, variants=variants) + mc_conversations(fit, seed)
                   + (context_conversations(fit, seed, per_clip=context_per_clip) if context_per_clip else [])
                   + lookup_conversations(fit, seed, per_clip=lookup_per_clip))
    val_convs = world_conversations(world_dir, held, seed) + mc_conversations(held, seed + 1)
    train = [conversation_ids(c, tokenizer)[:max_length] for c in train_convs]
    for r in range(restatements):
        train += [ids[:max_length] for ids in restatement_ids(fit, tokenizer, seed + 100 * r)]
    if symbolic_per_clip:
        train += [ids[:max_length] for ids in symbolic_ids(fit, tokenizer, seed, per_clip=symbolic_per_clip,
                                                           temporal=symbolic_temporal, extra=symbolic_extra,
                                                           where=symbolic_where)]
    text_vocab = len(tokenizer)
    val = [conversation_ids(c, tokenizer)[:max_length] for c in val_convs]

    torch.manual_seed(seed)
    config = Qwen2Config(vocab_size=text_vocab + (symbol_count() if symbolic_per_clip else 0),
                         hidden_size=hidden_size, intermediate_size=intermediate, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
                         tie_word_embeddings=True, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                         use_sliding_window=False, initializer_range=init_std)
    model = Qwen2ForCausalLM(config)
    if symbol_init == "factored":
        with torch.no_grad():
            model.get_input_embeddings().weight[text_vocab:] = factored_rows(hidden_size, init_std, seed)
    composed = ComposedSymbols(hidden_size, init_std, seed, symbol_cells) if symbol_init == "composed" else None
    if composed is not None:
        model.composed_symbols = composed  # trained with the model; written into the embedding before saving
    motion = None
    if motion_weight:  # a linear head trained with the model and dropped before saving
        model.motion_head = torch.nn.Linear(hidden_size, MOTIONS)
        motion = MotionLoss(model.motion_head, motion_layer, motion_weight, motion_detach)
    model.train()
    rng = np.random.default_rng([seed, 1])
    lengths = np.array([len(s) for s in train]) if bucket else None  # only the length batches read them
    order: list[int] = []
    batches: list[np.ndarray] = []
    fed = [0, 0]  # tokens fed to the model: real, with padding
    val_before = _lm_eval_loss(model, val, eos) if val else float("nan")

    def next_loss():
        nonlocal order
        if bucket:
            if not batches:
                batches.extend(length_batches(rng, lengths, batch_size))
            batch = [train[i] for i in batches.pop()]
        else:
            if len(order) < batch_size:
                order += rng.permutation(len(train)).tolist()
            batch, order = [train[i] for i in order[:batch_size]], order[batch_size:]
        ids, mask, labels = _lm_batch(batch, eos, text_vocab)
        fed[0] += int(mask.sum())
        fed[1] += mask.numel()
        if composed is None:
            return model(input_ids=ids, attention_mask=mask, labels=labels).loss
        return _composed_loss(model, composed, ids, mask, labels, text_vocab, motion)

    recall = _recall_warmup(model, train, tokenizer, recall_steps, batch_size, lr, weight_decay, seed, progress) \
        if recall_steps else None
    losses = _fit(model, next_loss, steps=steps, lr=lr, weight_decay=weight_decay, desc="llm", progress=progress)
    if composed is not None:
        with torch.no_grad():
            model.get_input_embeddings().weight[text_vocab:] = composed.rows()
        del model.composed_symbols
    if motion is not None:
        del model.motion_head
    model.eval()
    val_after = _lm_eval_loss(model, val, eos) if val else float("nan")
    mc = mc_check(model, tokenizer, mc_conversations(held, seed + 1))
    if context_per_clip:  # the same check with the clip's caption where the video goes: can it read a context?
        with_caption = [c for c in context_conversations(held, seed + 1, per_clip=1) if SUFFIX in c[0][0]]
        mc["accuracy_with_caption"] = mc_check(model, tokenizer, with_caption)["accuracy_no_video"]

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    for f in Path(tokenizer_dir).iterdir():
        if f.is_file():
            shutil.copy2(f, out / f.name)
    tail = max(1, min(20, len(losses) // 5))
    return {"params": _count_params(model), "vocab": len(tokenizer), "steps": steps, "batch_size": batch_size,
            "train_sequences": len(train), "train_tokens": int(sum(map(len, train))),
            "tokens_seen": fed[0], "padding": round(1 - fed[0] / max(fed[1], 1), 3),
            "first_loss": losses[0], "final_loss": float(np.mean(losses[-tail:])),
            "val_loss_init": val_before, "val_loss": val_after, "mc_check": mc, "seconds": time.perf_counter() - t0,
            **({"recall": recall} if recall else {})}


MOTIONS = 9  # where an object is against its first token: (column change sign + 1) * 3 + (row change sign + 1)


class MotionLoss(NamedTuple):
    """`pretrain_llm`'s motion head and its settings (``motion_layer``, ``motion_weight``, ``motion_detach``)."""
    head: torch.nn.Module
    layer: int
    weight: float
    detach: bool


def motion_labels(ids: torch.Tensor, text_vocab: int) -> torch.Tensor:
    """[batch, positions]: for each object symbol of a symbolic video, where the object is against its first symbol
    in the sequence, one of `MOTIONS` classes (4: the same cell); -100 elsewhere. An object is its shape: a clip's
    objects have distinct shapes, and an object may change colour."""
    out = torch.full_like(ids, -100)
    rel = ids - text_vocab - 1  # >= 0 for an object symbol: its `symbol_index`
    first: dict = {}
    for b, t in torch.nonzero(rel >= 0).tolist():  # row-major: each sequence's symbols in order
        _, shape, row, col = symbol_parts(int(rel[b, t]))
        r0, c0 = first.setdefault((b, shape), (row, col))
        out[b, t] = (int(np.sign(col - c0)) + 1) * 3 + int(np.sign(row - r0)) + 1
    return out


def _composed_loss(model, composed: ComposedSymbols, ids: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor,
                   text_vocab: int, motion: MotionLoss | None = None) -> torch.Tensor:
    """The LM's loss with the symbolic video's rows taken from ``composed`` in its input and in its (tied) output
    layer, so the rows the LM is trained with are the ones saved. With ``motion``: plus its
    weight x the cross-entropy of `motion_labels` read by a linear head from the states after that layer; with
    detach, those states come from a second pass on the rows detached, so that loss trains the layers only."""
    table = torch.cat([model.get_input_embeddings().weight[:text_vocab], composed.rows()])
    detach = motion is not None and motion.detach
    out = model.model(inputs_embeds=table[ids], attention_mask=mask,
                      output_hidden_states=motion is not None and not detach)
    logits = out.last_hidden_state[:, :-1] @ table.T
    loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                             ignore_index=-100)
    if motion is not None:
        target = motion_labels(ids, text_vocab)
        if bool((target >= 0).any()):
            states = (model.model(inputs_embeds=table.detach()[ids], attention_mask=mask, output_hidden_states=True)
                      if detach else out).hidden_states[motion.layer]
            loss = loss + motion.weight * torch.nn.functional.cross_entropy(
                motion.head(states).reshape(-1, MOTIONS), target.reshape(-1), ignore_index=-100)
    return loss


def length_batches(rng: np.random.Generator, lengths: np.ndarray, batch_size: int, chunk: int = 64
                   ) -> list[np.ndarray]:
    """One pass over the sequences as batches of similar length: a random permutation cut into chunks of
    ``chunk`` batches, each chunk sorted by length and cut into batches, the batches shuffled. Every sequence is
    in one batch (the last may be short); a batch pads to its longest sequence, so similar lengths pad little."""
    order = rng.permutation(len(lengths))
    batches = []
    for start in range(0, len(order), batch_size * chunk):
        part = order[start:start + batch_size * chunk]
        part = part[np.argsort(lengths[part], kind="stable")]
        batches += [part[i:i + batch_size] for i in range(0, len(part), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def recall_batch(rng: np.random.Generator, n: int, words: np.ndarray, sep: int, pairs: int = 6):
    """Associative recall on the LM's own tokens, both ways: ``<sep> a1 b1 ... aP bP <sep>`` then each pair once
    more in random order as a query and its answer, ``a -> b`` (the token after the match, as "Which shape is red?"
    after "a red square") or ``b -> a`` (the token before it, as "What colour is the square?"). Returns
    (ids [n, 4P+2], labels: the answers only)."""
    rows, labels = [], []
    for _ in range(n):
        a, b = rng.choice(words, (2, pairs), replace=False)
        queries = []
        for j in rng.permutation(pairs):
            queries += [a[j], b[j]] if rng.random() < 0.5 else [b[j], a[j]]
        row = [sep, *np.stack([a, b], 1).ravel(), sep, *queries]
        rows.append(row)
        labels.append([-100] * (2 * pairs + 2) + [-100 if k % 2 == 0 else t for k, t in enumerate(queries)])
    return torch.tensor(np.array(rows, np.int64)), torch.tensor(np.array(labels, np.int64))


def _recall_warmup(model, train: list[list[int]], tokenizer, steps: int, batch_size: int, lr: float,
                   weight_decay: float, seed: int, progress: bool) -> dict:
    """`recall_steps` of `recall_batch` on the token ids of the world's text (``train``) before that text: the lookup
    circuit (find a token in the context, read its neighbour) trained where it is the only way to lower the loss.
    Returns the held-out recall accuracy."""
    words = np.array(sorted(set().union(*map(set, train)) - set(tokenizer.all_special_ids)))
    sep = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
    rng = np.random.default_rng([seed, 31])
    test_ids, test_labels = recall_batch(np.random.default_rng([seed, 37]), 256, words, sep)

    def next_loss():
        ids, labels = recall_batch(rng, batch_size, words, sep)
        return model(input_ids=ids, labels=labels).loss

    t0 = time.perf_counter()
    losses = _fit(model, next_loss, steps=steps, lr=lr, weight_decay=weight_decay, desc="llm recall",
                  progress=progress)
    with torch.no_grad():
        predicted = model(input_ids=test_ids).logits[:, :-1].argmax(-1)
    scored = test_labels[:, 1:] != -100
    accuracy = float((predicted[scored] == test_labels[:, 1:][scored]).float().mean())
    return {"steps": steps, "final_loss": float(np.mean(losses[-20:])), "accuracy": round(accuracy, 3),
            "seconds": time.perf_counter() - t0}
