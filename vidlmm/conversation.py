"""Conversation templates, prompt building, prompt tokenization and training labels.

Reproduces the reference's ``qwen2_base`` (== ``phi``) and ``pretrain`` templates string for string.

Conventions used throughout:

* A conversation for :func:`build_prompt` is a list of ``(question, answer)`` pairs. Every answer is a string,
  except that the LAST answer is ``None`` when a generation prompt is wanted (the open ``"ASSISTANT:"`` slot).
  Multi-turn chat = the previous Q/A pairs plus ``(new_question, None)``.
* Training data (the annotation JSON's ``conversations``) goes through :func:`normalize_conversations`, which
  accepts ``{"from": "human"|"gpt", "value": ...}`` and ``{"role"|"from": "user"|"assistant", "content"|"value": ...}``
  turns and ``<video>`` placeholders, and returns the canonical ``{"from", "value"}`` form.
* The video is always carried by the FIRST user turn, as ``"<image>\\n"`` at its start (the reference moves the
  token there); ``<image>``/``<video>`` in later turns is removed.
* ``tokenizer_image_token`` tokenizes the pieces between ``<image>`` separately and joins them with -200.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"
IMAGE_TOKEN_INDEX = -200
IGNORE_INDEX = -100

_CONTENT = "{content}"

_QWEN2_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions. "
)


@dataclass(frozen=True)
class Template:
    """One conversation template. Slots use ``{content}`` (filled with ``str.replace``, so braces are safe).

    ``assistant_prefix`` is the part of the assistant slot before the answer that is masked in training and is the
    open slot at inference (``"ASSISTANT:"``; the reference computes it as ``slot.split(':')[0] + ':'``).
    """

    name: str
    system: str
    image_slot: str  # how the first user turn carries the video; "" when the user slot is constant
    user: str  # "{content}" is the question; a slot without it ignores the question (pretrain)
    assistant: str  # "{content}" is the answer
    assistant_prefix: str
    stop_string: str  # separator[1] in the reference; "" = none
    supports_generation: bool = True

    @property
    def separator(self) -> tuple[str, str]:
        """The reference's ``separator`` pair: (`` ASSISTANT: `` style split string, stop string)."""
        if not self.assistant_prefix:
            return ("", self.stop_string)
        return (" " + self.assistant_prefix + " ", self.stop_string)

    def format_user(self, question: str) -> str:
        return self.user.replace(_CONTENT, question)

    def format_assistant(self, answer: str) -> str:
        return self.assistant.replace(_CONTENT, answer)

    def format_image_question(self, question: str) -> str:
        """The reference's image move: drop every ``<image>``, strip, fill the image slot, strip again."""
        q = question.replace(IMAGE_TOKEN, "").strip()
        return self.image_slot.replace(_CONTENT, q).strip()

    def generation_prompt(self) -> str:
        if not self.supports_generation:
            raise ValueError(
                f"The {self.name!r} template is for stage-1 (caption) training only and has no generation prompt; "
                "use 'qwen2_base' for inference."
            )
        return self.assistant_prefix


_QWEN2_BASE = dict(
    system=_QWEN2_SYSTEM,
    image_slot=IMAGE_TOKEN + "\n" + _CONTENT,
    user="USER: " + _CONTENT + " ",
    assistant="ASSISTANT: " + _CONTENT + "<|endoftext|>",
    assistant_prefix="ASSISTANT:",
    stop_string="<|endoftext|>",
)

TEMPLATES: dict[str, Template] = {
    "qwen2_base": Template(name="qwen2_base", **_QWEN2_BASE),
    "phi": Template(name="phi", **_QWEN2_BASE),  # character-for-character the same as qwen2_base
    "pretrain": Template(
        name="pretrain",
        system="",
        image_slot="",
        user=IMAGE_TOKEN,  # constant: the human text is discarded
        assistant=_CONTENT + "\n",
        assistant_prefix="",
        stop_string="",
        supports_generation=False,
    ),
}


def get_template(name: str | Template) -> Template:
    """Return the template called ``name`` (a :class:`Template` is passed through)."""
    if isinstance(name, Template):
        return name
    try:
        return TEMPLATES[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown conversation template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None


# ---------------------------------------------------------------------------------------------------------------
# Prompt building


def _strip_media(text: str) -> str:
    return text.replace(IMAGE_TOKEN, "").replace(VIDEO_TOKEN, "")


def _segments(
    template: Template, pairs: Sequence[tuple[str, str | None]], add_generation_prompt: bool, with_video: bool = True
) -> list[tuple[str, bool]]:
    """The prompt as (text, supervised) spans; ``"".join`` of the texts is the reference's prompt string."""
    if not pairs:
        raise ValueError("A conversation needs at least one question.")
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"Turn {i + 1} must be a (question, answer) pair, got {type(pair).__name__}.")
        q, a = pair
        if not isinstance(q, str):
            raise ValueError(f"Question {i + 1} must be a string, got {type(q).__name__}.")
        last = i == len(pairs) - 1
        if a is None and not (last and add_generation_prompt):
            if last:
                raise ValueError("The last answer is None but add_generation_prompt is False.")
            raise ValueError(f"Answer {i + 1} is None; only the last answer may be open.")
        if a is not None and not isinstance(a, str):
            raise ValueError(f"Answer {i + 1} must be a string or None, got {type(a).__name__}.")
    if add_generation_prompt and pairs[-1][1] is not None:
        raise ValueError("add_generation_prompt is True but the last question is already answered (use None).")
    if add_generation_prompt:
        template.generation_prompt()  # raises for templates without one
    if not template.supports_generation and len(pairs) != 1:
        raise ValueError(f"The {template.name!r} template takes exactly one (question, caption) pair.")
    if _CONTENT not in template.user and not with_video:
        raise ValueError(f"The {template.name!r} template always carries the video.")

    spans: list[tuple[str, bool]] = []
    masked = template.system
    for i, (q, a) in enumerate(pairs):
        if i == 0 and with_video:
            q = template.format_image_question(q.replace(VIDEO_TOKEN, IMAGE_TOKEN))
        elif IMAGE_TOKEN in q or VIDEO_TOKEN in q:
            q = _strip_media(q).strip()  # only the first user turn carries the video
        masked += template.format_user(q) + template.assistant_prefix
        if a is None:
            spans.append((masked, False))
            masked = ""
            break
        full_answer = template.format_assistant(a)
        assert full_answer.startswith(template.assistant_prefix)
        spans.append((masked, False))
        spans.append((full_answer[len(template.assistant_prefix) :], True))
        masked = ""
    return [(t, s) for t, s in spans if t or s]


def build_prompt(
    template: str | Template,
    messages: Sequence[tuple[str, str | None]],
    add_generation_prompt: bool = True,
    *,
    with_video: bool = True,
) -> str:
    """The reference prompt string for ``messages``, a list of ``(question, answer)`` pairs.

    With ``add_generation_prompt=True`` the last answer must be ``None`` and the prompt ends with the open slot
    (``"... ASSISTANT:"``); with False every answer is given and the result is the training string (answers end with
    ``<|endoftext|>``). The first question always gets the video (``"<image>\\n"`` + stripped text, inserted if
    absent, ``<video>`` accepted); ``<image>``/``<video>`` in later questions is dropped.
    """
    t = get_template(template)
    return "".join(text for text, _ in _segments(t, list(messages), add_generation_prompt, with_video))


# ---------------------------------------------------------------------------------------------------------------
# Tokenization


def _adds_bos(tokenizer) -> bool:
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos


def _encode_pieces(text: str, tokenizer, bos: bool, image_token_index: int) -> list[int]:
    ids: list[int] = [tokenizer.bos_token_id] if bos else []
    for k, piece in enumerate(text.split(IMAGE_TOKEN)):
        if k:
            ids.append(image_token_index)
        if piece:
            ids.extend(tokenizer(piece, add_special_tokens=False)["input_ids"])
    return ids


def tokenizer_image_token(
    prompt: str, tokenizer, *, image_token_index: int = IMAGE_TOKEN_INDEX, add_bos: bool | None = None
) -> list[int]:
    """Token ids of ``prompt``: the pieces between ``<image>`` tokenized separately (no special tokens), joined with
    ``image_token_index``. A BOS is put once at the very start when the tokenizer adds one by default (``add_bos``
    None) or when ``add_bos`` is True, as the reference's helper keeps only the first chunk's BOS (Qwen has none).
    """
    bos = _adds_bos(tokenizer) if add_bos is None else bool(add_bos)
    if bos and getattr(tokenizer, "bos_token_id", None) is None:
        raise ValueError("add_bos=True but the tokenizer has no bos_token")
    return _encode_pieces(prompt, tokenizer, bos, image_token_index)


# ---------------------------------------------------------------------------------------------------------------
# Training data

_HUMAN_ROLES = {"human", "user"}
_GPT_ROLES = {"gpt", "assistant"}


def normalize_conversations(
    conversations: Any, *, with_video: bool = True
) -> tuple[list[dict[str, str]], list[str]]:
    """Canonicalise one sample's ``conversations`` and return ``(turns, warnings)``.

    Accepts ``from``/``role`` = ``human``/``user`` and ``gpt``/``assistant`` with ``value``/``content`` text and
    ``<video>`` placeholders. The result is ``[{"from": "human"|"gpt", "value": str}, ...]``, alternating, starting
    with human and ending with gpt; with ``with_video`` the first human turn contains ``<image>`` (added if missing)
    and no other turn does. Leading ``system`` turns are dropped. Fixes are reported as warning strings; malformed
    data raises ``ValueError`` with a one-line message.
    """
    if not isinstance(conversations, (list, tuple)) or not conversations:
        raise ValueError("conversations must be a non-empty list of turns")
    warnings: list[str] = []
    turns: list[dict[str, str]] = []
    for n, turn in enumerate(conversations, start=1):
        if not isinstance(turn, dict):
            raise ValueError(f"turn {n} is a {type(turn).__name__}, not a dict with 'from' and 'value'")
        role = turn.get("from", turn.get("role"))
        text = turn.get("value", turn.get("content"))
        if not isinstance(role, str):
            raise ValueError(f"turn {n} has no 'from'/'role' string")
        if not isinstance(text, str):
            raise ValueError(f"turn {n} has no 'value'/'content' string")
        r = role.strip().lower()
        if r in _HUMAN_ROLES:
            kind = "human"
        elif r in _GPT_ROLES:
            kind = "gpt"
        elif r == "system":
            if turns:
                raise ValueError(f"turn {n} is a system turn in the middle of the conversation")
            warnings.append("dropped a leading system turn (the template has its own system prompt)")
            continue
        else:
            raise ValueError(f"turn {n} has unknown role {role!r} (expected human/user or gpt/assistant)")
        turns.append({"from": kind, "value": text})

    if not turns:
        raise ValueError("conversations has no human/user turn")
    if turns[0]["from"] != "human":
        raise ValueError("the first turn must come from the human/user, not the gpt/assistant")
    for i, t in enumerate(turns):
        expected = "human" if i % 2 == 0 else "gpt"
        if t["from"] != expected:
            raise ValueError(f"turns must alternate human/gpt, but turn {i + 1} is a second {t['from']} turn in a row")
    if turns[-1]["from"] != "gpt":
        raise ValueError("the last human/user turn has no answer")

    if any(VIDEO_TOKEN in t["value"] for t in turns):
        warnings.append("read the '<video>' placeholder as '<image>'")
        for t in turns:
            t["value"] = t["value"].replace(VIDEO_TOKEN, IMAGE_TOKEN)

    for i, t in enumerate(turns):
        if i == 0 and with_video:
            count = t["value"].count(IMAGE_TOKEN)
            if count == 0:
                t["value"] = IMAGE_TOKEN + "\n" + t["value"]
                warnings.append("added the missing '<image>' to the first user turn")
            elif count > 1:
                t["value"] = IMAGE_TOKEN + "\n" + t["value"].replace(IMAGE_TOKEN, "").strip()
                warnings.append("kept one '<image>' of several in the first user turn")
        elif IMAGE_TOKEN in t["value"]:
            t["value"] = t["value"].replace(IMAGE_TOKEN, "").strip()
            where = f"turn {i + 1}" if with_video else "the conversation (with_video is off)"
            warnings.append(f"removed '<image>' from {where}; only the first user turn carries the video")
    return turns, warnings


@dataclass
class TrainingExample:
    """``input_ids`` (with -200 for the video) and ``labels`` (IGNORE_INDEX where not supervised), same length."""

    input_ids: list[int]
    labels: list[int]
    prompt: str
    warnings: list[str] = field(default_factory=list)
    truncated: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"input_ids": self.input_ids, "labels": self.labels}


def make_training_example(
    template: str | Template,
    conversations: Any,
    tokenizer,
    *,
    max_length: int | None = 3072,
    num_visual_tokens: int | None = None,
    with_video: bool = True,
) -> TrainingExample:
    """Tokenize one training sample and build its labels exactly as the reference does.

    ``qwen2_base``/``phi``: the system prompt, user turns and ``"ASSISTANT:"`` are masked; each answer (with the
    space after ``ASSISTANT:``) and its ``<|endoftext|>`` are supervised. ``pretrain``: ``<image>{caption}\\n`` with
    only the video slot masked (extra turns are dropped with a warning). Labels are built by construction: each span
    is tokenized separately and the concatenation is checked against the whole-prompt ids (if a tokenizer ever
    merges across a span boundary, the sample is fully masked with a warning, as the reference does on mismatch).

    ``max_length`` counts positions after the video is expanded: with ``num_visual_tokens`` set, each -200 costs that
    many positions (the reference's 3072 includes the 512 visual tokens); with None it costs one (collator-level
    truncation only). ``conversations`` is raw annotation data (see :func:`normalize_conversations`).
    """
    t = get_template(template)
    turns, warnings = normalize_conversations(conversations, with_video=with_video)
    pairs = [(turns[i]["value"], turns[i + 1]["value"]) for i in range(0, len(turns), 2)]
    if not t.supports_generation and len(pairs) > 1:
        warnings.append(f"the {t.name!r} template uses only the first answer; dropped {len(pairs) - 1} more")
        pairs = pairs[:1]
    spans = _segments(t, pairs, add_generation_prompt=False, with_video=with_video)
    prompt = "".join(text for text, _ in spans)

    bos = _adds_bos(tokenizer)
    input_ids = _encode_pieces(prompt, tokenizer, bos, IMAGE_TOKEN_INDEX)
    concat: list[int] = []
    labels: list[int] = []
    for k, (text, supervised) in enumerate(spans):
        ids = _encode_pieces(text, tokenizer, bos and k == 0, IMAGE_TOKEN_INDEX)
        concat.extend(ids)
        if supervised:
            labels.extend(i if i != IMAGE_TOKEN_INDEX else IGNORE_INDEX for i in ids)
        else:
            labels.extend([IGNORE_INDEX] * len(ids))
    if concat != input_ids:
        warnings.append("the tokenizer merges text across turn boundaries; the sample is fully masked")
        labels = [IGNORE_INDEX] * len(input_ids)

    truncated = False
    if max_length is not None:
        n_images = input_ids.count(IMAGE_TOKEN_INDEX)
        extra = (num_visual_tokens - 1) * n_images if num_visual_tokens else 0
        limit = max_length - extra
        if n_images and limit <= max(k for k, i in enumerate(input_ids) if i == IMAGE_TOKEN_INDEX):
            raise ValueError(
                f"max_length {max_length} cannot hold the video ({num_visual_tokens} visual tokens) and the prompt"
            )
        if len(input_ids) > limit:
            input_ids, labels = input_ids[:limit], labels[:limit]
            truncated = True
            warnings.append(f"truncated to {max_length} positions (visual tokens included)")
    if all(label == IGNORE_INDEX for label in labels):
        warnings.append("no supervised token left in this sample")
    return TrainingExample(input_ids=input_ids, labels=labels, prompt=prompt, warnings=warnings, truncated=truncated)


def clean_answer(text: str, template: str | Template) -> str:
    """Reference decode post-processing: strip, drop one trailing stop string, strip again."""
    stop = get_template(template).stop_string
    out = text.strip()
    if stop and out.endswith(stop):
        out = out[: -len(stop)]
    return out.strip()
