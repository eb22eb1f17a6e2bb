"""Training data in the reference's annotation format, read with the same frame sampler as inference.

An annotation file is a JSON list of `{"id", "video": relative path, "conversations": [{"from": "human"|"gpt",
"value": ...}, ...]}`. `<video>` placeholders and user/assistant roles are normalised (with a warning). Our own
files may add `"symbols"` (the clip's symbolic video, for stage 1's `symbol_weight`), `"patch_symbols"` (the
symbol on each of the tower's patches per frame, for `patch_symbol_weight`) and, on a one-turn
multiple-choice record, `"options"` (the answer each option would be, for stage 2's `option_weight`), with
`"answer_known": false` where only the option loss is to be trained (a question asked of another clip's video). A
video that cannot be read (or whose decoder hangs or crashes, see `decode_worker`) is dropped from the run and
logged with its path: it never stops a run.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from vidlmm.conversation import IGNORE_INDEX, make_training_example, normalize_conversations
from vidlmm.errors import VideoReadError
from vidlmm.preprocess import read_pixels
from vidlmm.video import FrameSampling

from .decode_worker import DecodeFailed, DecodeWorker

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class VisualTokenCount:
    """frames -> visual tokens a connector makes, tabulated for 1..N frames. A per-frame compressor's tokens per
    frame depend on the frame count (pool / tome / topk: min(budget // frames, P)), so no fixed + per-frame rule
    fits every connector. N is the sampling's most frames (at most TABLE_LIMIT; only uncapped fps mode goes past
    it, where the last step is extended). A plain picklable value (not the model) so DataLoader workers can
    carry it."""

    counts: tuple[int, ...]

    TABLE_LIMIT = 4096

    @classmethod
    def of(cls, model, max_frames: int = 64) -> "VisualTokenCount":
        n = max(2, min(int(max_frames), cls.TABLE_LIMIT))
        return cls(tuple(int(model.num_visual_tokens(t)) for t in range(1, n + 1)))

    def __call__(self, frames: int) -> int:
        if frames < 1:
            raise ValueError(f"a clip has at least one frame, got {frames}")
        if frames <= len(self.counts):
            return self.counts[frames - 1]
        step = self.counts[-1] - self.counts[-2]
        return self.counts[-1] + step * (frames - len(self.counts))


@dataclass
class Sample:
    id: str
    video: Path
    conversations: list
    symbols: list | None = None  # the clip's symbolic video (`train.stage0.symbols`), for stage 1's symbol_weight
    options: list | None = None  # a multiple-choice record's answer for each option, for stage 2's option_weight
    answer_known: bool = True  # False: the answer's own loss is not trained, only the option loss
    patch_symbols: list | None = None  # each frame's symbol per patch (`train.stage0.symbols`), for patch_symbol_weight


def load_annotations(files: list[str | Path], video_roots: list[str | Path]) -> tuple[list[Sample], Counter]:
    """Read annotation files; resolve each video against the roots (first that has it). Returns samples and
    a Counter of problems (malformed entries, missing videos, normalisation warnings)."""
    samples, problems = [], Counter()
    roots = [Path(r) for r in video_roots] or [Path(".")]
    for file in files:
        file = Path(file)
        items = json.loads(file.read_text())
        for n, item in enumerate(items):
            try:
                _, warnings = normalize_conversations(item["conversations"])
                for w in warnings:
                    problems[f"normalised: {w.split(';')[0]}"] += 1
            except (KeyError, ValueError, TypeError) as err:
                problems["malformed entry"] += 1
                log.warning("%s item %d skipped: %s", file.name, n, err)
                continue
            rel = item.get("video")
            path = next((r / rel for r in [*roots, file.parent] if rel and (r / rel).is_file()), None)
            if path is None:
                problems["missing video"] += 1
                log.warning("%s item %d: video '%s' not found under the video roots; skipped", file.name, n, rel)
                continue
            samples.append(Sample(str(item.get("id", n)), path, item["conversations"], item.get("symbols"),
                                  item.get("options"), bool(item.get("answer_known", True)),
                                  item.get("patch_symbols")))
    return samples, problems


class FeatureCache:
    """Vision-tower features per video, for runs where the tower is frozen: its output for a clip never changes,
    so each clip is decoded and encoded once per process instead of once per epoch (and, in one process, once
    for every stage and connector trained on the same tower). Keys hold the tower's weight fingerprint and the
    sampling, so a different tower or sampling never reads another's features. Bounded in bytes (LRU)."""

    def __init__(self, max_bytes: int = 2 << 30):
        from vidlmm.cache import ByteLRU

        self._lru = ByteLRU(max_bytes)
        self.scope = ""

    def bind(self, tower: torch.nn.Module, sampling: FrameSampling) -> None:
        import hashlib

        digest = hashlib.sha1()
        for p in tower.parameters():
            digest.update(p.detach().cpu().float().numpy().tobytes())
        self.scope = f"{digest.hexdigest()}|{sampling}"

    def key(self, video: Path) -> str:
        return f"{self.scope}|{video}"

    def get(self, key: str):
        return self._lru.get(key)

    def put(self, key: str, features: torch.Tensor) -> None:
        self._lru.put(key, features.detach())

    @property
    def hits(self) -> int:
        return self._lru.hits


_SHARED_CACHES: dict[int, FeatureCache] = {}


def shared_feature_cache(max_bytes: int) -> FeatureCache:
    """One cache per process and size, reused by every run() in it (build_embedded trains 3 connectors x 2 stages
    on the same frozen tower in one process)."""
    return _SHARED_CACHES.setdefault(max_bytes, FeatureCache(max_bytes))


def option_continuations(labels: list[int], answers: list[list[int]]) -> list[list[int]]:
    """For each supervised token of a multiple-choice answer (`labels`, IGNORE_INDEX elsewhere), in order: the
    tokens that keep the reply on some option there, given the answer's tokens before it. `answers`: each
    option's labels as that option's answer (same prompt). The answer's own token comes first."""
    target = [t for t in labels if t != IGNORE_INDEX]
    others = [[t for t in a if t != IGNORE_INDEX] for a in answers]
    return [list(dict.fromkeys([token] + [o[j] for o in others if len(o) > j and o[:j] == target[:j]]))
            for j, token in enumerate(target)]


def sample_option_continuations(conversations: list, options: list[str], labels_of) -> list[list[int]]:
    """`option_continuations` of a one-turn multiple-choice sample: ``labels_of(conversations)`` gives a
    conversation's training labels; each option's are those of the same prompt answered with that option."""
    *prompt, last = conversations
    return option_continuations(labels_of(conversations), [labels_of([*prompt, {**last, "value": answer}])
                                                           for answer in options])


def _decode_pixels(path, sampling: FrameSampling, image_processor) -> torch.Tensor:
    """A video file -> the model's pixel tensor [T, 3, S, S]: the one place training turns a video into pixels."""
    return read_pixels(path, sampling, image_processor)[1]


class VideoConversationDataset(torch.utils.data.Dataset):
    """Items: {"pixel_values" [T,3,S,S] or None, "features" [T,N,C] or None, "cache_key", "input_ids", "labels",
    "id", "index", "video", "weight", "skipped", "num_visual_tokens", "symbols", "patch_symbols", "allowed",
    "answer_weight"}. With a feature cache that already holds a clip, the clip is not decoded at all.

    A sample whose video cannot be read is dropped, not replaced by the next readable one: its item is a
    placeholder (a blank one-frame clip with the sample's own text) of weight 0 and `skipped` says why. Every
    process thus runs the same forward and backward and enters every collective, and the trainer takes each step's
    gradient as the mean over the samples of weight 1, so a step with a skipped sample is exactly that step without
    it (a replacement would instead add a neighbour, seen twice that epoch). A sample in `excluded` (skipped
    earlier in the run, restored from the checkpoint) is not tried again, so a resumed run repeats the same steps
    whether or not its file has since been repaired.

    decode_time_limit_s > 0 decodes in a child process (`DecodeWorker`), so a hang or a crash costs the sample;
    0 decodes in this process. ``options``: a sample with options gets ``allowed``, its answer tokens'
    `option_continuations` (None otherwise). ``answer_weight`` is 0 for a sample whose answer is not known (its
    option loss only), else 1.
    """

    def __init__(self, samples: list[Sample], *, tokenizer, image_processor, template: str,
                 sampling: FrameSampling, visual_tokens_for, max_length: int = 3072,
                 feature_cache: FeatureCache | None = None, decode_time_limit_s: float = 0.0,
                 options: bool = False):
        self.samples = samples
        self.options = options
        self.feature_cache = feature_cache
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.template, self.sampling = template, sampling
        # frames -> visual tokens the connector makes (the image-level resampler's grow with the frame count)
        self.visual_tokens_for, self.max_length = visual_tokens_for, max_length
        self.excluded: set[int] = set()
        self.placeholder = image_processor(np.zeros((1, 2, 2, 3), np.uint8))
        self.worker = (DecodeWorker(_decode_pixels, sampling, image_processor, time_limit_s=decode_time_limit_s)
                       if decode_time_limit_s > 0 else None)

    def __len__(self) -> int:
        return len(self.samples)

    def decode(self, path: Path) -> torch.Tensor:
        if self.worker is not None:
            return self.worker(path)
        return _decode_pixels(path, self.sampling, self.image_processor)

    def close(self) -> None:
        if self.worker is not None:
            self.worker.close()

    def __getitem__(self, index: int):
        sample = self.samples[index]
        pixels = features = key = why = None
        if index not in self.excluded:
            if self.feature_cache is not None:
                key = self.feature_cache.key(sample.video)
                features = self.feature_cache.get(key)
            if features is None:
                try:
                    pixels = self.decode(sample.video)
                except (VideoReadError, DecodeFailed) as err:
                    why = str(err)
                    log.warning("skipping unreadable video %s: %s", sample.video, why)
        read = pixels is not None or features is not None
        if not read:
            pixels, key = self.placeholder, None
        frames = len(features if features is not None else pixels)
        num_visual = self.visual_tokens_for(frames)

        def example_of(conversations):
            return make_training_example(self.template, conversations, self.tokenizer, max_length=self.max_length,
                                         num_visual_tokens=num_visual)

        example = example_of(sample.conversations)
        allowed = None
        if self.options and sample.options:
            allowed = sample_option_continuations(sample.conversations, sample.options,
                                                  lambda conv: example_of(conv).labels)
        return {"pixel_values": pixels, "features": features, "cache_key": key, "input_ids": example.input_ids,
                "labels": example.labels, "id": sample.id, "index": index, "video": str(sample.video),
                "weight": float(read), "skipped": why, "num_visual_tokens": num_visual,
                "symbols": sample.symbols if read else None,  # a placeholder's one frame has no symbols
                "patch_symbols": sample.patch_symbols if read else None,
                "allowed": allowed, "answer_weight": float(sample.answer_known)}


def collate(batch: list) -> dict:
    """Keep lists (clips may have different frame counts in fps mode); `weights` [B] is 0 for a placeholder;
    `skipped` lists the samples that failed just now."""
    return {"pixel_values": [b["pixel_values"] for b in batch], "features": [b["features"] for b in batch],
            "cache_keys": [b["cache_key"] for b in batch], "input_ids": [b["input_ids"] for b in batch],
            "labels": [b["labels"] for b in batch], "ids": [b["id"] for b in batch],
            "symbols": [b["symbols"] for b in batch], "patch_symbols": [b["patch_symbols"] for b in batch],
            "allowed": [b["allowed"] for b in batch],
            "answer_weights": torch.tensor([b["answer_weight"] for b in batch]),
            "weights": torch.tensor([b["weight"] for b in batch]),
            "visual_tokens": sum(b["num_visual_tokens"] for b in batch if b["weight"]),
            "skipped": [{"index": b["index"], "id": b["id"], "video": b["video"], "why": b["skipped"]}
                        for b in batch if b["skipped"]]}
