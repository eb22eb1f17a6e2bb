"""Loading the LLM tokenizer from a local folder, and building a small offline one for tests.

Two folder layouts are supported by :func:`load_tokenizer`:

* ``tokenizer.json`` (the fast-tokenizer file, which fully describes the pipeline), and
* the hub layout of the published TinyLLaVA-Video checkpoints: ``vocab.json`` + ``merges.txt`` +
  ``tokenizer_config.json`` (``tokenizer_class: "Qwen2Tokenizer"``, ``tokenizer_use_fast: false``) +
  ``special_tokens_map.json`` + ``added_tokens.json``.

transformers 5 has no separate "slow" tokenizers any more: ``Qwen2Tokenizer`` itself is backed by the Rust
``tokenizers`` library and builds its BPE pipeline (NFC, Qwen2 split regex, byte level) from ``vocab.json`` and
``merges.txt``; ``use_fast`` / ``tokenizer_use_fast`` are ignored. The pitfall is a vocab/merges folder that does not
name its tokenizer class: ``AutoTokenizer`` then falls back to the generic ``TokenizersBackend``, whose default
pipeline is not Qwen2's, so we resolve the class ourselves (tokenizer_config, then config.json, then Qwen2).

:func:`build_bpe_tokenizer` trains a byte-level BPE with Qwen2's pre-tokenization on a few KB of text, so tests and
tiny models run with a real tokenizer and no downloads.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import CheckpointError

EOS_TOKEN = "<|endoftext|>"

# Qwen2's pre-tokenization regex (same string as transformers' Qwen2Tokenizer and Qwen's tokenizer.json).
QWEN2_SPLIT_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

_TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "spiece.model", "vocab.txt")


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _model_type_for_folder(folder: Path) -> str | None:
    """Tokenizer type to force when the folder has vocab/merges but its tokenizer_config names no class."""
    from transformers.models.auto.tokenization_auto import TOKENIZER_MAPPING_NAMES

    cfg = _read_json(folder / "config.json")
    for candidate in (cfg.get("model_type"), (cfg.get("text_config") or {}).get("model_type")):
        if isinstance(candidate, str) and TOKENIZER_MAPPING_NAMES.get(candidate):
            return candidate
    return "qwen2"  # the project's LLM family; also what the published checkpoints use


def load_tokenizer(
    folder: str | os.PathLike,
    *,
    model_max_length: int = 3072,
    padding_side: str = "right",
    use_fast: bool | None = None,
):
    """Load the tokenizer of a local checkpoint folder (never touches the network).

    ``use_fast`` is accepted for API compatibility with the reference and ignored: transformers 5 only has
    tokenizers-backed classes. After loading, the reference's Qwen2 rule is applied: ``pad = eos`` if pad is unset,
    then ``unk = pad`` if unk is unset. Raises :class:`CheckpointError` (one line) when the folder is missing, has no
    tokenizer files, or they cannot be loaded.
    """
    del use_fast  # transformers 5 ignores it; kept so callers can pass the reference's setting
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise CheckpointError(f"Tokenizer folder not found: {path}")
    present = [name for name in _TOKENIZER_FILES if (path / name).is_file()]
    if not present:
        raise CheckpointError(
            f"No tokenizer files in {path} (expected tokenizer.json, or vocab.json and merges.txt)."
        )
    has_fast_file = (path / "tokenizer.json").is_file()
    if not has_fast_file and (path / "vocab.json").is_file() != (path / "merges.txt").is_file():
        missing = "merges.txt" if (path / "vocab.json").is_file() else "vocab.json"
        raise CheckpointError(f"Incomplete tokenizer files in {path}: {missing} is missing.")

    from transformers import AutoTokenizer, PreTrainedConfig

    # A blank config stops AutoTokenizer from parsing config.json: a TinyLLaVA one (model_type "tinyllava") is
    # unknown to transformers and only produces a misleading warning; the class comes from tokenizer_config.json.
    kwargs: dict = dict(
        local_files_only=True,
        model_max_length=model_max_length,
        padding_side=padding_side,
        config=PreTrainedConfig(),
    )
    tok_cfg = _read_json(path / "tokenizer_config.json")
    if not has_fast_file and not tok_cfg.get("tokenizer_class") and (path / "vocab.json").is_file():
        # Without a class name AutoTokenizer would pick the generic TokenizersBackend, which does not rebuild
        # Qwen2's pre-tokenizer from vocab/merges; name the tokenizer type explicitly instead.
        kwargs["tokenizer_type"] = _model_type_for_folder(path)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path), **kwargs)
    except Exception as err:  # noqa: BLE001 - any failure here is a broken checkpoint for the user
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(f"Cannot load the tokenizer in {path}: {first}") from err

    tokenizer.model_max_length = model_max_length
    tokenizer.padding_side = padding_side
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.unk_token is None and tokenizer.pad_token is not None:
        tokenizer.unk_token = tokenizer.pad_token
    return tokenizer


# ---------------------------------------------------------------------------------------------------------------
# Offline tokenizer building


def tiny_corpus() -> list[str]:
    """A few dozen short English sentences (videos, colours, shapes, motion) plus the template strings."""
    from .conversation import get_template

    sentences = [
        "The video shows a red ball rolling across a wooden table.",
        "A blue square moves slowly from the left side of the frame to the right side.",
        "A green circle bounces up and down in the middle of the screen.",
        "The yellow triangle rotates clockwise while the camera stays still.",
        "A person walks into the room, picks up a cup, and leaves.",
        "Two cars drive along a street at night under orange lights.",
        "The background is white and the shapes are black.",
        "What is happening in the video?",
        "Describe the video in detail.",
        "What color is the ball?",
        "How many objects appear in the clip?",
        "Which direction is the square moving?",
        "The ball is red.",
        "There are three objects: a circle, a square and a triangle.",
        "The square is moving to the right.",
        "At the beginning of the video a small purple star appears in the corner.",
        "Then it grows larger and fades away at the end.",
        "A dog runs across a green field and jumps over a fence.",
        "The camera zooms in on a white cat sleeping on a sofa.",
        "A hand draws a circle on a piece of paper with a pencil.",
        "The sky changes from blue to pink as the sun sets.",
        "Water flows down a small waterfall between gray rocks.",
        "A child throws a yellow ball and a dog catches it.",
        "The frames show a slow motion shot of a falling leaf.",
        "Is the object moving fast or slow? It is moving slowly.",
        "What shape is in the top left corner? A square.",
        "The rectangle changes color from red to green to blue.",
        "Bright light flashes twice near the end of the clip.",
        "A woman is cooking in a kitchen and stirring a pot.",
        "The man opens the door, looks outside, and closes it again.",
        "Colours: red, orange, yellow, green, blue, indigo, violet, black, white, gray, brown, pink.",
        "Shapes: circle, square, triangle, rectangle, star, line, dot, oval, hexagon.",
        "Motion: moving, rolling, bouncing, spinning, sliding, falling, rising, shaking, stopping.",
        "Numbers: 0 1 2 3 4 5 6 7 8 9 10 16 32 64 128 256 512 1024 2048 3072.",
        "The video lasts about ten seconds and has no sound.",
        "First the circle appears, then the square, and finally the triangle.",
        "The answer is yes.",
        "The answer is no.",
    ]
    extra = []
    for name in ("qwen2_base",):
        t = get_template(name)
        extra.append(t.system + "USER: <image>\nWhat is happening in the video? ASSISTANT: " + sentences[0] + EOS_TOKEN)
        extra.append("USER: Describe the video. ASSISTANT:")
    return sentences + extra


def _train_backend(texts: list[str], vocab_size: int):
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=max(int(vocab_size) - 1, len(alphabet)),  # one id is kept for <|endoftext|>
        min_frequency=2,
        special_tokens=[],
        initial_alphabet=alphabet,
        show_progress=False,
    )
    # The special token must not be learned as ordinary text: remove it from the training data.
    cleaned = [t.replace(EOS_TOKEN, " ") for t in texts]
    tok.train_from_iterator(cleaned, trainer=trainer)
    # Like Qwen, the special token comes after the BPE vocabulary.
    tok.add_special_tokens([AddedToken(EOS_TOKEN, special=True, normalized=False)])
    return tok


def _added_tokens_decoder(eos_id: int) -> dict:
    """tokenizer_config.json's entry for the one special token, `<|endoftext|>` (eos = pad)."""
    return {str(eos_id): {"content": EOS_TOKEN, "lstrip": False, "normalized": False, "rstrip": False,
                          "single_word": False, "special": True}}


def _write_hub_layout(tok, out: Path, model_max_length: int) -> None:
    vocab = tok.get_vocab(with_added_tokens=False)
    eos_id = tok.token_to_id(EOS_TOKEN)
    model_files = tok.model.save(str(out))  # vocab.json + merges.txt
    assert {Path(p).name for p in model_files} == {"vocab.json", "merges.txt"}, model_files
    with open(out / "vocab.json", "w", encoding="utf-8") as f:  # rewrite sorted by id, like the hub files
        json.dump(dict(sorted(vocab.items(), key=lambda kv: kv[1])), f, ensure_ascii=False)
    config = {
        "add_prefix_space": False,
        "added_tokens_decoder": _added_tokens_decoder(eos_id),
        "additional_special_tokens": [],
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": EOS_TOKEN,
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "tokenizer_use_fast": False,
        "unk_token": None,
    }
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
    with open(out / "special_tokens_map.json", "w", encoding="utf-8") as f:
        json.dump({"eos_token": EOS_TOKEN, "pad_token": EOS_TOKEN}, f, indent=2)
    with open(out / "added_tokens.json", "w", encoding="utf-8") as f:
        json.dump({EOS_TOKEN: eos_id}, f, indent=2)


def _write_fast_layout(tok, out: Path, model_max_length: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    eos_id = tok.token_to_id(EOS_TOKEN)
    config = {
        "added_tokens_decoder": _added_tokens_decoder(eos_id),
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": EOS_TOKEN,
        "model_max_length": model_max_length,
        "pad_token": EOS_TOKEN,
        "padding_side": "right",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    with open(out / "tokenizer_config.json", "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)


def build_bpe_tokenizer(
    texts: Iterable[str] | None,
    vocab_size: int,
    out_dir: str | os.PathLike | None = None,
    layout: str = "hub",
    *,
    model_max_length: int = 3072,
):
    """Train a byte-level BPE with Qwen2 pre-tokenization on ``texts`` (default :func:`tiny_corpus`), save it to
    ``out_dir`` (a temporary folder when None) and return it loaded through :func:`load_tokenizer`.

    ``layout="hub"`` writes vocab.json/merges.txt/tokenizer_config.json (Qwen2Tokenizer, tokenizer_use_fast false)/
    special_tokens_map.json/added_tokens.json; ``layout="fast"`` writes tokenizer.json + tokenizer_config.json.
    ``<|endoftext|>`` is the last id and serves as eos and pad; there is no bos. The vocabulary can come out smaller
    than ``vocab_size`` (never below 256 bytes + eos): size models from ``len(tokenizer)``. Deterministic.
    """
    if layout not in ("hub", "fast"):
        raise ValueError(f"layout must be 'hub' or 'fast', not {layout!r}")
    texts = tiny_corpus() if texts is None else [str(t) for t in texts]
    if not texts:
        raise ValueError("build_bpe_tokenizer needs at least one training text")
    tok = _train_backend(texts, vocab_size)
    out = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix="vidlmm-tok-"))
    out.mkdir(parents=True, exist_ok=True)
    if layout == "hub":
        _write_hub_layout(tok, out, model_max_length)
    else:
        _write_fast_layout(tok, out, model_max_length)
    return load_tokenizer(out, model_max_length=model_max_length)
