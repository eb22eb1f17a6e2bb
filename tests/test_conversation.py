"""Templates, prompt tokenization, label masks and tokenizer loading (offline, a few seconds)."""

from __future__ import annotations

import json
import os
import shutil

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402

from vidlmm.conversation import (  # noqa: E402
    IGNORE_INDEX,
    IMAGE_TOKEN_INDEX,
    TEMPLATES,
    build_prompt,
    clean_answer,
    get_template,
    make_training_example,
    normalize_conversations,
    tokenizer_image_token,
)
from vidlmm.errors import CheckpointError  # noqa: E402
from vidlmm.tokenizer import build_bpe_tokenizer, load_tokenizer, tiny_corpus  # noqa: E402

SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions. "
)
EOS = "<|endoftext|>"


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    build_bpe_tokenizer(tiny_corpus(), 700, root / "hub", layout="hub")
    build_bpe_tokenizer(tiny_corpus(), 700, root / "fast", layout="fast")
    return root


@pytest.fixture(scope="module")
def tok(tok_dirs):
    return load_tokenizer(tok_dirs / "hub")


@pytest.fixture(scope="module")
def tok_fast(tok_dirs):
    return load_tokenizer(tok_dirs / "fast")


# ------------------------------------------------------------------ reference computations (from the spec, §4)


def ref_prompt(pairs, open_last=False):
    msg = ""
    for i, (q, a) in enumerate(pairs):
        if i == 0:
            msg += SYSTEM
        if "<image>" in q:
            q = q.replace("<image>", "").strip()
            q = ("<image>\n" + q).strip()
        msg += "USER: " + q + " "
        msg += "ASSISTANT:" if (a is None and open_last) else "ASSISTANT: " + a + EOS
    return msg


def ref_tokenizer_image_token(prompt, tokenizer):
    chunks = [tokenizer(c).input_ids for c in prompt.split("<image>")]
    ids, offset = [], 0
    if chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id:
        offset = 1
        ids.append(chunks[0][0])
    for k, x in enumerate(chunks):
        if k:
            ids.append(IMAGE_TOKEN_INDEX)
        ids.extend(x[offset:])
    return ids


def ref_labels(prompt, input_ids, tokenizer, sep=" ASSISTANT: ", eos=EOS, model_max_length=3072):
    labels = list(input_ids)
    total_len = sum(1 for i in input_ids if i != tokenizer.pad_token_id)
    if tokenizer.pad_token_id == tokenizer.eos_token_id:
        total_len += prompt.count(eos)
    eos_len = len(tokenizer(eos).input_ids)
    cur = 0
    for rou in prompt.split(eos):
        if rou == "":
            break
        parts = rou.split(sep)
        if len(parts) != 2:
            break
        parts[0] += sep
        round_len = len(ref_tokenizer_image_token(rou, tokenizer)) + eos_len
        instruction_len = len(ref_tokenizer_image_token(parts[0], tokenizer)) - 1
        for k in range(cur, min(cur + instruction_len, len(labels))):
            labels[k] = IGNORE_INDEX
        cur += round_len
    for k in range(cur, len(labels)):
        labels[k] = IGNORE_INDEX
    if cur < model_max_length and cur != total_len:
        labels = [IGNORE_INDEX] * len(labels)
    return labels


# ------------------------------------------------------------------ prompt strings


def test_single_turn_prompt_exact():
    q = "What is happening in the video?"
    want = SYSTEM + "USER: <image>\n" + q + " ASSISTANT:"
    assert build_prompt("qwen2_base", [(q, None)]) == want
    assert build_prompt("qwen2_base", [("<image>\n" + q, None)]) == want  # eval style
    assert build_prompt("qwen2_base", [(q + " <image>", None)]) == want  # token moved to the start
    assert build_prompt("qwen2_base", [("<video>\n" + q, None)]) == want
    assert build_prompt("phi", [(q, None)]) == want
    assert want == ref_prompt([("<image>\n" + q, None)], open_last=True)


def test_multi_turn_prompt_exact():
    train = build_prompt("qwen2_base", [("<image>\nq1", "a1"), ("q2", "a2")], add_generation_prompt=False)
    assert train == SYSTEM + "USER: <image>\nq1 ASSISTANT: a1<|endoftext|>USER: q2 ASSISTANT: a2<|endoftext|>"
    chat = build_prompt("qwen2_base", [("q1", "a1"), ("q2 <image>", None)])
    assert chat == SYSTEM + "USER: <image>\nq1 ASSISTANT: a1<|endoftext|>USER: q2 ASSISTANT:"
    assert build_prompt("qwen2_base", [("q1", "a1")], add_generation_prompt=False) == ref_prompt(
        [("<image>\nq1", "a1")]
    )
    with pytest.raises(ValueError):
        build_prompt("qwen2_base", [("q1", "a1")])  # generation prompt wanted but already answered
    with pytest.raises(ValueError):
        build_prompt("qwen2_base", [("q1", None), ("q2", None)])


def test_template_registry_and_pretrain():
    assert TEMPLATES["phi"].system == TEMPLATES["qwen2_base"].system == SYSTEM
    assert get_template("qwen2_base").separator == (" ASSISTANT: ", EOS)
    assert build_prompt("pretrain", [("<image>\nDescribe.", "A red ball.")], add_generation_prompt=False) == (
        "<image>A red ball.\n"
    )
    with pytest.raises(ValueError, match="pretrain"):
        build_prompt("pretrain", [("Describe.", None)])
    with pytest.raises(ValueError):
        get_template("llama3")


def test_clean_answer():
    assert clean_answer("  The ball is red. <|endoftext|>\n", "qwen2_base") == "The ball is red."
    assert clean_answer(" red ", "pretrain") == "red"


# ------------------------------------------------------------------ tokenization


def test_tokenizer_image_token_structure(tok):
    prompt = build_prompt("qwen2_base", [("What color is the ball?", None)])
    ids = tokenizer_image_token(prompt, tok)
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    k = ids.index(IMAGE_TOKEN_INDEX)
    space = tok(" ", add_special_tokens=False).input_ids
    newline = tok("\n", add_special_tokens=False).input_ids
    assert len(space) == 1 and len(newline) == 1
    assert ids[k - 1] == space[0]  # "USER: " ends in a lone-space token
    assert ids[k + 1] == newline[0]
    assert ids[:k] == tok(prompt.split("<image>")[0], add_special_tokens=False).input_ids
    assert ids == ref_tokenizer_image_token(prompt, tok)
    assert tok.bos_token_id is None and IMAGE_TOKEN_INDEX not in tok(prompt.replace("<image>", "")).input_ids
    assert tokenizer_image_token("<image>", tok) == [IMAGE_TOKEN_INDEX]


class _BosTokenizer:
    """A tokenizer that prepends a BOS, to check the reference's keep-the-first-BOS behaviour."""

    def __init__(self, inner):
        self.inner, self.bos_token_id, self.eos_token_id = inner, len(inner) + 10, inner.eos_token_id

    def __call__(self, text, add_special_tokens=True):
        ids = self.inner(text, add_special_tokens=False).input_ids
        return {"input_ids": ([self.bos_token_id] if add_special_tokens else []) + ids}


def test_tokenizer_image_token_bos(tok):
    btok = _BosTokenizer(tok)
    prompt = build_prompt("qwen2_base", [("Describe the video.", None)])
    ids = tokenizer_image_token(prompt, btok)
    bos = btok.bos_token_id
    assert ids[0] == bos and ids.count(bos) == 1 and ids[1:] == tokenizer_image_token(prompt, tok)
    ref = [(btok(c)["input_ids"]) for c in prompt.split("<image>")]
    assert ids == ref[0] + [IMAGE_TOKEN_INDEX] + ref[1][1:]
    assert tokenizer_image_token(prompt, tok, add_bos=False) == ids[1:]


def test_layouts_identical(tok_dirs, tok, tok_fast):
    assert sorted(p.name for p in (tok_dirs / "hub").iterdir()) == [
        "added_tokens.json",
        "merges.txt",
        "special_tokens_map.json",
        "tokenizer_config.json",
        "vocab.json",
    ]
    cfg = json.loads((tok_dirs / "hub" / "tokenizer_config.json").read_text())
    assert cfg["tokenizer_class"] == "Qwen2Tokenizer" and cfg["tokenizer_use_fast"] is False
    assert (tok_dirs / "fast" / "tokenizer.json").is_file()
    assert len(tok) == len(tok_fast) <= 700
    texts = tiny_corpus() + ["Ünïcödé  spaces\n\n  and\ttabs 12345 <|endoftext|> end", "  ", "x<|endoftext|>y"]
    for text in texts:
        assert tok(text).input_ids == tok_fast(text).input_ids, text
        assert tok.decode(tok(text).input_ids) == text
    for t in (tok, tok_fast):
        assert t.eos_token == t.pad_token == t.unk_token == EOS
        assert t.eos_token_id == len(t) - 1 and t.bos_token is None
        assert t.model_max_length == 3072 and t.padding_side == "right"
    assert tok(EOS).input_ids == [tok.eos_token_id]


def test_build_is_deterministic(tmp_path, tok_dirs):
    build_bpe_tokenizer(tiny_corpus(), 700, tmp_path / "again", layout="hub")
    for name in ("vocab.json", "merges.txt"):
        assert (tmp_path / "again" / name).read_bytes() == (tok_dirs / "hub" / name).read_bytes()


def test_loads_without_class_name(tmp_path, tok_dirs, tok):
    text = "USER: <image>\nWhat shape is in the top left corner? 3 ASSISTANT: A square.<|endoftext|>"
    want = tok(text).input_ids
    # hub layout whose tokenizer_config names no class, next to a TinyLLaVA config.json
    d = tmp_path / "noclass"
    shutil.copytree(tok_dirs / "hub", d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["tokenizer_class"], cfg["unk_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "config.json").write_text(json.dumps({"model_type": "tinyllava", "text_config": {"model_type": "qwen2"}}))
    t = load_tokenizer(d)
    assert t(text).input_ids == want and t.pad_token_id == t.eos_token_id == tok.eos_token_id
    # ... and with no tokenizer_config at all
    (d / "tokenizer_config.json").unlink()
    assert load_tokenizer(d)(text).input_ids == want
    # tokenizer.json whose config names no class
    f = tmp_path / "fastnoclass"
    shutil.copytree(tok_dirs / "fast", f)
    cfg = json.loads((f / "tokenizer_config.json").read_text())
    del cfg["tokenizer_class"]
    (f / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(f)(text).input_ids == want


def test_load_errors(tmp_path):
    with pytest.raises(CheckpointError) as err:
        load_tokenizer(tmp_path)
    assert "\n" not in str(err.value) and "tokenizer" in str(err.value).lower()
    with pytest.raises(CheckpointError):
        load_tokenizer(tmp_path / "missing")


# ------------------------------------------------------------------ training labels

SAMPLES = [
    [("<image>\nWhat color is the ball?", "The ball is red.")],
    [("<image>\nHow many objects appear in the clip?", "3 objects: a circle, a square and a triangle.")],
    [
        ("What is happening in the video?\n<image>", "A dog runs across a green field."),
        ("Which direction is the square moving? ", "\nTo the right."),
        ("Is the object moving fast or slow?", "(slowly) It is moving slowly."),
    ],
    [("<image>\nDescribe the video in detail.", ""), ("And the colours?", "Red, green   and blue.  ")],
]


@pytest.mark.parametrize("pairs", SAMPLES)
def test_qwen2_labels_match_reference(tok, pairs):
    conv = []
    for q, a in pairs:
        conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
    ex = make_training_example("qwen2_base", conv, tok)
    prompt = ref_prompt(pairs)
    assert ex.prompt == prompt
    ref_ids = ref_tokenizer_image_token(prompt, tok)
    assert ex.input_ids == ref_ids
    want = ref_labels(prompt, ref_ids, tok)
    assert any(label != IGNORE_INDEX for label in want)  # the reference check passed
    assert ex.labels == want
    assert ex.warnings == [] and not ex.truncated
    # supervised: every answer and its <|endoftext|>
    sup = [i for i, label in zip(ex.input_ids, ex.labels) if label != IGNORE_INDEX]
    assert sup.count(tok.eos_token_id) == len(pairs)
    assert tok.decode(sup) == "".join(" " + a + EOS for _, a in pairs)


def test_pretrain_masks_only_image_slot(tok):
    conv = [{"from": "human", "value": "<image>\nDescribe the video."}, {"from": "gpt", "value": "A red ball rolls."}]
    ex = make_training_example("pretrain", conv, tok)
    assert ex.prompt == "<image>A red ball rolls.\n"
    assert ex.input_ids == [IMAGE_TOKEN_INDEX] + tok("A red ball rolls.\n").input_ids
    assert ex.labels == [IGNORE_INDEX] + ex.input_ids[1:]
    assert EOS not in tok.decode(ex.input_ids[1:])
    two = conv + [{"from": "human", "value": "More?"}, {"from": "gpt", "value": "No."}]
    ex2 = make_training_example("pretrain", two, tok)
    assert ex2.input_ids == ex.input_ids and ex2.warnings


def test_truncation_counts_visual_tokens(tok):
    conv = [{"from": "human", "value": "<image>\nDescribe."}, {"from": "gpt", "value": "A red ball. " * 30}]
    full = make_training_example("qwen2_base", conv, tok)
    ex = make_training_example("qwen2_base", conv, tok, max_length=len(full.input_ids) + 5, num_visual_tokens=16)
    assert ex.truncated and len(ex.input_ids) == len(full.input_ids) + 5 - 15
    assert ex.labels == full.labels[: len(ex.input_ids)]
    with pytest.raises(ValueError):
        make_training_example("qwen2_base", conv, tok, max_length=40, num_visual_tokens=64)


# ------------------------------------------------------------------ data normalisation


def test_normalize_user_assistant_video():
    conv = [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "<video>\nWhat happens?"},
        {"role": "assistant", "content": "A ball rolls."},
        {"from": "user", "value": "<video> Which colour?"},
        {"from": "assistant", "value": "Red."},
    ]
    turns, warnings = normalize_conversations(conv)
    assert turns == [
        {"from": "human", "value": "<image>\nWhat happens?"},
        {"from": "gpt", "value": "A ball rolls."},
        {"from": "human", "value": "Which colour?"},
        {"from": "gpt", "value": "Red."},
    ]
    text = " ".join(warnings)
    assert "<video>" in text and "system" in text and "turn 3" in text
    turns, warnings = normalize_conversations([{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}])
    assert turns[0]["value"] == "<image>\nQ" and warnings


@pytest.mark.parametrize(
    "conv",
    [
        [],
        "not a list",
        [{"from": "gpt", "value": "A"}, {"from": "human", "value": "Q"}],
        [{"from": "human", "value": "Q"}, {"from": "human", "value": "Q2"}, {"from": "gpt", "value": "A"}],
        [{"from": "human", "value": "Q"}],
        [{"from": "human"}, {"from": "gpt", "value": "A"}],
        [{"from": "robot", "value": "Q"}, {"from": "gpt", "value": "A"}],
        [["human", "Q"], ["gpt", "A"]],
    ],
)
def test_malformed_conversations(conv, tok):
    with pytest.raises(ValueError) as err:
        normalize_conversations(conv)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError):
        make_training_example("qwen2_base", conv, tok)
