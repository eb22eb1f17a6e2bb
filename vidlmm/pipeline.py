"""Video in, answer out: read -> preprocess -> vision -> connector -> splice -> generate, with timings.

`VideoLMM` owns a model and a byte-bounded cache of vision features keyed by the video's content, the frame
sampling and the model, so a follow-up question on the same video skips decoding and the vision tower.
"""

from __future__ import annotations

import copy
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .cache import ByteLRU, source_digest
from .connectors import ConnectorOutput
from .conversation import build_prompt, clean_answer, tokenizer_image_token
from .video import FrameSampling, ReadLimits, VideoClip, check_video_path, read_video


@dataclass
class GenerationSettings:
    """Greedy by default (the reference's evaluation setting). seed only matters when sampling."""

    max_new_tokens: int = 512
    do_sample: bool = False
    temperature: float = 0.2
    top_p: float = 1.0
    seed: int | None = None


@dataclass
class PreparedVideo:
    """A decoded, encoded video: its clip (frames as the tower sees them, for display) and vision features
    [T, P, Dv] (for any question)."""

    clip: VideoClip
    features: torch.Tensor
    key: str
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def num_frames(self) -> int:
        return int(self.features.shape[0])


@dataclass
class Answer:
    text: str
    token_ids: list[int]
    frame_indices: list[int]
    timestamps: list[float]
    num_visual_tokens: int
    timings: dict[str, float]
    cached_video: bool = False

    def to_json(self) -> dict:
        return {"answer": self.text, "token_ids": self.token_ids, "frame_indices": self.frame_indices,
                "timestamps": [round(t, 6) for t in self.timestamps], "num_visual_tokens": self.num_visual_tokens,
                "timings": {k: round(v, 6) for k, v in self.timings.items()}, "cached_video": self.cached_video}


class StepClock:
    """A logits processor that only notes when each decoding step's logits arrive (prefill = first step).
    Also used by the benchmarks to split prefill from generation."""

    def __init__(self):
        self.stamps: list[float] = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


class StopWhen:
    """A stopping criterion: generation ends after the current token once `should_stop()` is true (a cancelled
    request, a closed stream)."""

    def __init__(self, should_stop: Callable[[], bool]):
        self.should_stop = should_stop

    def __call__(self, input_ids, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), bool(self.should_stop()), dtype=torch.bool,
                          device=input_ids.device)


class VideoLMM:
    """High-level inference over one loaded model. Thread-safe for concurrent callers on a CPU.

    cache_bytes bounds the vision-feature cache (0 disables it); limits bound each video read (pixels per frame,
    decode seconds, video seconds).
    """

    def __init__(self, model, *, sampling: FrameSampling | None = None, template: str | None = None,
                 cache_bytes: int = 512 * 1024**2, limits: ReadLimits | None = None):
        self.model = model
        self.sampling = sampling or default_sampling(model)
        self.template = template or model.config.conv_version or "qwen2_base"
        self.cache = ByteLRU(cache_bytes)
        self.limits = limits or ReadLimits()
        self._lock = threading.Lock()  # one generate at a time per model: torch on CPU gains nothing from more

    def view(self, *, cache=None, limits: ReadLimits | None = None) -> "VideoLMM":
        """The same model (and its one-at-a-time lock) with another feature cache (any get/put object) and
        other read limits: one per session, request or run."""
        other = copy.copy(self)
        if cache is not None:
            other.cache = cache
        if limits is not None:
            other.limits = limits
        return other

    def exclusive(self):
        """A context manager holding the model for one pass (shared by every view): torch on CPU gains nothing from
        two passes at once, and generation state must not interleave."""
        return self._lock

    # ---- video side ------------------------------------------------------------------------------------
    def prepare(self, video: str, sampling: FrameSampling | None = None) -> tuple[PreparedVideo, bool]:
        """Decode and encode a video, or fetch it from the cache. Returns (prepared, was_cached)."""
        sampling = sampling or self.sampling
        if not os.path.isdir(video):  # a folder of frames is read as a video (sampling.folder_fps)
            check_video_path(video)  # before hashing: a FIFO must fail with one sentence, not hang
        key = f"{source_digest(video)}|{sampling}|{getattr(self.model, 'source', id(self.model))}|{self.model.dtype}"
        hit = self.cache.get(key)
        if hit is not None:
            return hit, True
        t0 = time.perf_counter()
        processor = self.model.image_processor
        # each frame is resized to the tower's input as it is decoded: "decode" includes the resize
        clip = read_video(video, sampling, transform=processor.resize_frame, **self.limits.kwargs())
        t1 = time.perf_counter()
        pixels = processor.pixel_values(clip)
        t2 = time.perf_counter()
        with self._lock:
            features = self.model.encode_frames(pixels)
        t3 = time.perf_counter()
        prepared = PreparedVideo(clip, features, key, {"decode": t1 - t0, "preprocess": t2 - t1, "vision": t3 - t2})
        self.cache.put(key, prepared)
        return prepared, False

    def visual_tokens(self, prepared: PreparedVideo, output_attentions: bool = False) -> ConnectorOutput:
        with torch.no_grad():
            return self.model.connect(prepared.features, output_attentions=output_attentions)

    # ---- text side -------------------------------------------------------------------------------------
    def prompt_ids(self, question: str, history: list[tuple[str, str]] = ()) -> list[int]:
        prompt = build_prompt(self.template, [*history, (question, None)])
        return tokenizer_image_token(prompt, self.model.tokenizer)

    def _gen_kwargs(self, generation: GenerationSettings) -> dict:
        if generation.do_sample and generation.seed is not None:
            torch.manual_seed(generation.seed)
        return dict(max_new_tokens=generation.max_new_tokens, do_sample=generation.do_sample,
                    temperature=generation.temperature, top_p=generation.top_p)

    def ask(self, video: str | PreparedVideo, question: str, history: list[tuple[str, str]] = (),
            generation: GenerationSettings | None = None, sampling: FrameSampling | None = None,
            visual: torch.Tensor | None = None) -> Answer:
        """Answer one question about a video (multi-turn with `history` of (question, answer) pairs).

        `visual` [Q, D] overrides the connector output (e.g. with some queries zeroed).
        """
        answer = None
        for item in self.stream(video, question, history, generation, sampling, visual, _stream=False):
            answer = item
        return answer

    def stream(self, video, question, history=(), generation=None, sampling=None, visual=None,
               should_stop: Callable[[], bool] | None = None, _stream: bool = True) -> Iterator[str | Answer]:
        """Yield text pieces as they are generated, then the final Answer. Generation stops after the current
        token when `should_stop()` turns true or when the caller closes this generator (the answer so far is
        then not returned); either way the model is free again at once."""
        from transformers import LogitsProcessorList, StoppingCriteriaList, TextIteratorStreamer

        generation = generation or GenerationSettings()
        if isinstance(video, PreparedVideo):
            prepared, cached = video, True
        else:
            prepared, cached = self.prepare(video, sampling)
        timings = {k: (0.0 if cached else v) for k, v in prepared.timings.items()}
        t0 = time.perf_counter()
        if visual is None:
            visual = self.visual_tokens(prepared)  # the whole output: a fusing connector rewrites the prompt
        timings["connector"] = time.perf_counter() - t0
        ids = self.prompt_ids(question, list(history))
        embeds, mask, _ = self.model.build_inputs([ids], [visual])
        clock = StepClock()
        closed = threading.Event()  # set when the consumer stops reading (GeneratorExit below)
        stop = StopWhen(lambda: closed.is_set() or bool(should_stop and should_stop()))
        kwargs = dict(self._gen_kwargs(generation), logits_processor=LogitsProcessorList([clock]),
                      stopping_criteria=StoppingCriteriaList([stop]))
        result: dict = {}
        streamer = TextIteratorStreamer(self.model.tokenizer, skip_prompt=True, skip_special_tokens=True) \
            if _stream else None

        def run():
            try:
                with self._lock:
                    start = time.perf_counter()
                    result["ids"] = self.model.generate(embeds, mask, streamer=streamer, **kwargs)[0].tolist()
                    result["start"], result["end"] = start, time.perf_counter()
            except BaseException as err:  # handed to the caller's thread below
                result["error"] = err
                if streamer is not None:
                    streamer.end()

        if streamer is None:
            run()
        else:
            worker = threading.Thread(target=run, daemon=True)
            worker.start()
            try:
                for piece in streamer:
                    if piece:
                        yield piece
            finally:
                closed.set()  # a consumer that leaves early stops generation after the current token
            worker.join()
        if "error" in result:
            raise result["error"]
        token_ids = result["ids"]
        stamps = clock.stamps or [result["end"]]
        timings["prefill"] = stamps[0] - result["start"]
        timings["generation"] = result["end"] - stamps[0]
        new_tokens = max(0, len(token_ids) - 1)
        timings["tokens_per_s"] = new_tokens / timings["generation"] if timings["generation"] > 0 else 0.0
        text = clean_answer(self.model.tokenizer.decode(token_ids, skip_special_tokens=True), self.template)
        clip = prepared.clip
        num_visual = visual.tokens.shape[1] if isinstance(visual, ConnectorOutput) else visual.shape[0]
        yield Answer(text, token_ids, clip.indices.tolist(), clip.timestamps.tolist(), int(num_visual),
                     timings, cached)

    def ask_batch(self, videos: list, questions: list[str], generation: GenerationSettings | None = None,
                  sampling: FrameSampling | None = None) -> list[Answer]:
        """Answer several (video, question) pairs in one left-padded generate call."""
        generation = generation or GenerationSettings()
        prepared = [self.prepare(v, sampling)[0] if not isinstance(v, PreparedVideo) else v for v in videos]
        visual = [self.visual_tokens(p) for p in prepared]
        ids = [self.prompt_ids(q) for q in questions]
        embeds, mask, _ = self.model.build_inputs(ids, visual)
        with self._lock:
            out = self.model.generate(embeds, mask, **self._gen_kwargs(generation))
        answers = []
        for row, p, vis in zip(out.tolist(), prepared, visual):
            row = self.model.trim_at_eos(row)
            text = clean_answer(self.model.tokenizer.decode(row, skip_special_tokens=True), self.template)
            answers.append(Answer(text, row, p.clip.indices.tolist(), p.clip.timestamps.tolist(),
                                  int(vis.tokens.shape[1]), {}))
        return answers


def default_sampling(model) -> FrameSampling:
    """The sampling a checkpoint was trained with when its config says so (ours do), else uniform 16."""
    return FrameSampling.from_dict(getattr(model.config, "video_sampling", None))


__all__ = ["Answer", "GenerationSettings", "PreparedVideo", "VideoLMM", "default_sampling"]
