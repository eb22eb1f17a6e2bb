"""What the app does, without Gradio: preview a video, answer (streamed), attention (or a compressor's picture),
redundancy and comparison.

Every method takes plain values (paths, strings, numbers, dataclasses) and returns plain values, so the UI in
`app/ui.py` is thin glue and these are testable directly. Errors a user can cause are `UserError` (or a
`VidlmmError`) carrying one sentence. Model work takes a `Job` (`app.jobs`): its `report` gives progress and stops
the work once the request is cancelled; models are loaded and run only inside the service's `ModelSlot`.
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from vidlmm.budget import TokenBudget, token_counts
from vidlmm.errors import VidlmmError, VideoReadError

from .config import AppConfig
from visualizations.io import Exporter, slug
from .gpu import across, gpu, peak_memory, reset_peak_memory
from .jobs import Job, ModelSlot
from .limits import Limits, RefusedInput, UserError
from .models import ModelPool, discover_models, has_picture
from .session import Session, SessionCache
from .thumbnails import ThumbnailStore

TIMING_ORDER = ("decode", "preprocess", "vision", "connector", "prefill", "generation")
THUMB_HEIGHT = 96
MAX_THUMBS = 64
MAX_TRACED = 64  # answer tokens the LLM-attention views trace
SHOW_DPI = 110  # the PNG shown in the page when the download is SVG or PDF

# an absolute path of two or more parts (a server folder): a visitor sees only its last part
_SERVER_PATH = re.compile(r"(?<![\w.])/(?:[^\s'\"/:]+/)+([^\s'\"/:]*)")


def one_sentence(err: BaseException) -> str:
    """The message a user sees for any error: ours verbatim, anything else named but without a traceback; never a
    server path (only a file's own name)."""
    if isinstance(err, VidlmmError):
        text = str(err)
    elif isinstance(err, (ValueError, FileNotFoundError)):
        text = " ".join(str(err).split()) or type(err).__name__
    else:
        text = f"Something went wrong ({type(err).__name__}: {' '.join(str(err).split())[:200]})."
    return _SERVER_PATH.sub(lambda m: m.group(1) or "…", text)


def format_timings(timings: dict, memory: dict | None = None) -> str:
    parts = [f"{k} {timings[k] * 1000:.0f} ms" for k in TIMING_ORDER if k in timings]
    if "tokens_per_s" in timings:
        parts.append(f"{timings['tokens_per_s']:.1f} tokens/s")
    for key, label in (("peak_rss_mb", "peak RSS"), ("peak_gpu_mb", "peak GPU")):
        if memory and key in memory:
            parts.append(f"{label} {memory[key]:.0f} MiB")
    return " · ".join(parts)


# ---- results ----------------------------------------------------------------------------------------------------
@dataclass
class Preview:
    frames: list[tuple[np.ndarray, str]]  # thumbnails [h, w, 3] uint8 with "#index · t s" captions
    num_frames: int
    visual_tokens: int
    active_tokens: int
    details: dict
    summary: str


@dataclass
class AskResult:
    answer: str
    details: dict
    summary: str


@dataclass
class FigureSet:
    images: dict[str, Path] | list[tuple[str, Path]]  # name -> PNG to show (a list when names may repeat)
    data: dict                              # numbers behind the figures
    downloads: list[Path] = field(default_factory=list)


class Service:
    """Owns the model pool and the slot it is used in, the shared byte-bounded feature cache, the request limits
    and a temporary folder for downloads."""

    def __init__(self, config: AppConfig):
        from vidlmm.cache import ByteLRU
        from vidlmm.video import ReadLimits

        config = config.resolved()
        self.config = config
        self.limits = Limits(config)
        self.read_limits = ReadLimits(max_pixels=config.max_video_pixels, time_limit=config.max_decode_s,
                                      max_duration=config.max_duration_s)
        source, trained = (config.model, True) if config.model else _default_model()
        self.default_source, self.default_trained = source, trained
        self.choices = discover_models(config.models_dir, source, trained, hub=config.hub_models)
        self.slot = ModelSlot(config.concurrency)
        self.models = ModelPool(self.choices, max_bytes=_model_memory_bytes(config), dtype=config.dtype,
                                device=config.device, quantization=config.quantization,
                                allow_custom=config.allow_custom_models, default_trained=trained)
        self.features = ByteLRU(config.cache_mb * 1024**2)
        self.files_root = Path(tempfile.mkdtemp(prefix="vidlmm-app-"))
        atexit.register(shutil.rmtree, self.files_root, ignore_errors=True)
        self.thumbnails = ThumbnailStore(self.files_root / "thumbnails")

    # ---- models and videos -------------------------------------------------------------------------------------
    def model(self, name: str | None, job: Job | None = None):
        """The loaded model for a name; a checkpoint that is not loaded yet is loaded inside the model slot."""
        loaded = self.models.loaded(name)
        if loaded is not None:
            return loaded
        with self.slot.hold(job, "waiting for the model slot to load the model"):
            if job is not None:
                job.report(0.02, "loading the model")
            return self.models.get(name)

    def lmm(self, session: Session, model: str | None, job: Job | None = None):
        """(LoadedModel, VideoLMM view with this session's cache and the app's read limits)."""
        loaded = self.model(model, job)
        return loaded, loaded.lmm.view(cache=SessionCache(self.features, session.id), limits=self.read_limits)

    def check_video(self, video) -> tuple[str, float]:
        """A readable video within the limits -> (path, duration s); otherwise a one-sentence error. Reads only
        the container's headers (no frame is decoded), so it also runs in the validators."""
        if isinstance(video, RefusedInput):
            raise UserError(video.message, "video")
        if not video:
            raise UserError("Upload a video (or pick an example) first.", "video")
        path = _video_path(video)
        from vidlmm.video import check_video_path, frame_size

        name = check_video_path(path)
        st = os.stat(path)
        if st.st_size > self.config.max_upload_bytes:
            raise VideoReadError("too_long", f"Cannot read video '{name}': it is {st.st_size / 1024**2:.0f} MiB, "
                                 f"over the {self.config.max_upload_mb} MiB upload limit.", path)
        total, fps = _probe(os.path.realpath(path), st.st_size, st.st_mtime_ns)
        duration = total / fps
        if duration > self.config.max_duration_s:
            raise VideoReadError("too_long", f"Cannot read video '{name}': it lasts {duration:.0f} s, longer than "
                                 f"the {self.config.max_duration_s:g} s limit.", path)
        size = frame_size(path)
        pixels = self.config.max_video_pixels
        if size is not None and size[0] * size[1] > pixels:
            raise VideoReadError("too_large", f"Cannot read video '{name}': its frames are {size[0]}x{size[1]}, "
                                 f"over the {pixels / 1e6:.1f}-megapixel limit.", path)
        return path, duration

    def budget_info(self, model: str | None) -> dict:
        loaded = self.model(model)
        controls = loaded.lmm.model.connector.budget_controls()
        return {"connector": loaded.connector, **dataclasses.asdict(controls),
                "tokens_per_frame_in": loaded.lmm.model.vision_tower.tokens_per_frame,
                "sampling": loaded.lmm.sampling, "precision": loaded.precision}

    # ---- before running ------------------------------------------------------------------------------------------
    def preview(self, video, model: str | None, sampling, budget: TokenBudget) -> Preview:
        """The frames the model will see (thumbnails with timestamps) and how many visual tokens the LLM gets.
        CPU only: decodes the sampled frames straight to thumbnails, never runs the model."""
        from vidlmm.video import read_video

        path, duration = self.check_video(video)
        clip = read_video(path, sampling, transform=_thumbnail, **self.read_limits.kwargs())
        loaded = self.model(model)
        model_obj = loaded.lmm.model
        t = clip.num_frames
        per_frame = model_obj.vision_tower.tokens_per_frame
        try:
            tokens, active = token_counts(model_obj.connector, budget, t, per_frame)
        except ValueError as err:
            raise UserError(str(err)) from None
        default = model_obj.num_visual_tokens(t)
        frames = [(clip.frame(k), f"#{int(i)} · {ts:.2f} s")
                  for k, (i, ts) in enumerate(zip(clip.indices[:MAX_THUMBS], clip.timestamps))]
        untrained = budget.overrides_connector()
        details = {"video": os.path.basename(path), "duration_s": round(duration, 3), "source_fps": round(clip.fps, 3),
                   "frames": t, "frame_indices": clip.indices.tolist(),
                   "timestamps": [round(float(x), 3) for x in clip.timestamps], "tokens_per_frame_in": per_frame,
                   "visual_tokens": tokens, "active_tokens": active, "checkpoint_tokens": default,
                   "connector": loaded.connector, "untrained_setting": bool(untrained)}
        summary = (f"**{t} frames** ({sampling.describe()}) of a {duration:.1f} s video → {t} × {per_frame} patch "
                   f"features → **{tokens} visual tokens** to the LLM ({loaded.connector})")
        if active < tokens:
            summary += f", **{active} active** after zeroing"
        if untrained:
            summary += f"; the checkpoint was trained with {default} (this setting is untrained)"
        if not loaded.trained:
            summary += ". Note: this model is a random stand-in; its answers are meaningless"
        return Preview(frames, t, tokens, active, details, summary + ".")

    # ---- chat -------------------------------------------------------------------------------------------------------
    def ask(self, session: Session, video, question: str, *, model: str | None = None, sampling=None,
            budget: TokenBudget | None = None, generation=None, history: list | None = None,
            job: Job | None = None) -> Iterator[str | AskResult]:
        """Stream the answer: text pieces, then one AskResult. history: earlier (question, answer) pairs (None:
        the session's conversation, which this answer extends). Holds the model slot while it runs."""
        job = job or Job()
        question = self.limits.question(question)
        path, _ = self.check_video(video)
        budget = budget or TokenBudget()
        with self.slot.hold(job):
            job.report(0.05, "loading model")
            loaded, lmm = self.lmm(session, model, job)
            sampling = sampling or lmm.sampling
            turns = list(session.history if history is None else history)
            result = None
            for item in _ask_gpu(lmm, path, question, turns, sampling, budget, generation, across(job.report),
                                 job.cancelled):
                if isinstance(item, str):
                    yield item
                else:
                    result = item
        answer, connector_s, active, prepared_timings, cached, memory = result
        timings = dict(answer.timings)
        timings.update({k: (0.0 if cached else v) for k, v in prepared_timings.items()})
        timings["connector"] = connector_s
        details = {"model": loaded.name, "connector": loaded.connector, "answer": answer.text,
                   "question": question, "turn": len(turns) + 1, "frames": len(answer.frame_indices),
                   "frame_indices": answer.frame_indices, "timestamps": [round(t, 3) for t in answer.timestamps],
                   "visual_tokens": answer.num_visual_tokens, "active_tokens": active, "cached_video": cached,
                   "new_tokens": max(0, len(answer.token_ids) - 1), "token_ids": answer.token_ids,
                   "timings_s": {k: round(v, 4) for k, v in timings.items()}, "memory": memory,
                   "budget": {"groups": budget.groups, "queries": budget.queries,
                              "frame_tokens": budget.frame_tokens, "active_fraction": budget.active_fraction,
                              "strategy": budget.strategy},
                   "precision": loaded.precision, "trained_model": loaded.trained}
        if history is None:
            session.history.append((question, answer.text))
        summary = f"{answer.num_visual_tokens} visual tokens"
        if active < answer.num_visual_tokens:
            summary += f" ({active} active)"
        summary += (" · vision features from cache" if cached else "") + " · " + format_timings(timings, memory)
        yield AskResult(answer.text, details, summary)

    # ---- analysis -------------------------------------------------------------------------------------------------
    def attention(self, session: Session, video, *, model: str | None = None, sampling=None, layer: int = -1,
                  head: int | None = None, log_scale: bool = False, query: int | None = None,
                  group: int | None = None, fmt: str = "png", dpi: int = 150, job: Job | None = None) -> FigureSet:
        """The connector's attention for this video: queries x tokens heatmap, per-frame overlays (all queries, one
        query or one group), temporal profile per group, redundancy statistics."""
        from vidlmm.analysis import to_jsonable
        from visualizations import (plot_attention_heatmap, plot_frame_overlays, plot_redundancy_stats,
                                    plot_temporal_profile)

        job = job or Job()
        path, _ = self.check_video(video)
        with self.slot.hold(job):
            job.report(0.05, "loading model")
            loaded, lmm = self.lmm(session, model, job)
            job.report(0.2, "running the connector with attention")
            maps, stats = _attention_gpu(lmm, path, self._analysis_sampling(sampling, lmm), int(layer))
        job.report(0.7, "drawing")
        out = self._exporter(session, fmt, dpi)
        stem = f"{slug(loaded.name)}-{Path(path).stem}"
        layer = int(layer)
        figures = {
            "heatmap": lambda: plot_attention_heatmap(maps, layer, head, "log" if log_scale else "linear"),
            "overlays": lambda: plot_frame_overlays(maps, layer, head, query=query, group=group),
            "temporal": lambda: plot_temporal_profile(maps, layer, head),
            "redundancy_stats": lambda: plot_redundancy_stats(stats),
        }
        images, downloads = {}, []
        for name, draw in figures.items():
            job.report(0.7, f"drawing {name}")
            images[name], files = out.figure(draw(), f"{stem}-{name}")
            downloads += files
        downloads += out.data({"model": loaded.name, "layer": layer, "head": head, "attention": maps.to_json()},
                              f"{stem}-attention", csv_rows=maps.rows(layer, head))
        downloads += out.data({"model": loaded.name, **stats}, f"{stem}-redundancy", csv_rows=stats["rows"])
        job.report(1.0, "done")
        data = {"model": loaded.name, "connector": loaded.connector, "layer": stats["layer"],
                "frames": maps.num_frames, "queries": maps.num_queries, "visual_tokens_in": int(maps.media.shape[-1]),
                "heads": maps.num_heads, "layers": maps.num_layers, "summary": to_jsonable(stats["summary"])}
        return FigureSet(images, data, downloads)

    def llm_attention(self, session: Session, video, question: str, *, model: str | None = None, sampling=None,
                      token: int | None = None, fmt: str = "png", dpi: int = 150, job: Job | None = None) -> FigureSet:
        """Where the language model looks while it answers: each answer word's frames, the patches of one word
        (token) or of the whole answer (None), the share of attention on the video per LLM layer. The trace is
        kept in the session: another word of the same answer is redrawn without the model."""
        from vidlmm.cache import source_digest
        from visualizations import plot_frame_relevance, plot_patch_relevance, plot_visual_share

        job = job or Job()
        question = self.limits.question(question)
        path, _ = self.check_video(video)
        key = (source_digest(path), model, str(sampling), question)
        trace = session.trace
        if trace is None or trace[0] != key:
            with self.slot.hold(job):
                job.report(0.05, "loading model")
                loaded, lmm = self.lmm(session, model, job)
                job.report(0.2, "answering, then tracing the language model's attention")
                result = _llm_attention_gpu(lmm, path, self._analysis_sampling(sampling, lmm), question,
                                            self.config.max_new_tokens)
            # per-head detail is not drawn here: the session keeps an H-th of it
            trace = session.trace = (key, loaded.name, result.collapse_heads())
        _, name, result = trace
        if token is not None and not 0 <= token < len(result.tokens):
            raise UserError(f"The answer has {len(result.tokens)} tokens; pick one from 0 to "
                            f"{len(result.tokens) - 1} (or -1 for the whole answer).", "token")
        job.report(0.8, "drawing")
        out = self._exporter(session, fmt, dpi)
        stem = f"{slug(name)}-{Path(path).stem}-llm"
        share = result.visual_share()
        images, downloads = {}, []
        for kind, draw in (("frames", lambda: plot_frame_relevance(result)),
                           ("patches", lambda: plot_patch_relevance(result, token)),
                           ("layers", lambda: plot_visual_share({name: share if token is None else share[[token]]},
                                                                over="the answer's tokens" if token is None else
                                                                f"token {token}"))):
            images[kind], files = out.figure(draw(), f"{stem}-{kind}")
            downloads += files
        data = {"model": name, "token": token, **result.to_json()}
        downloads += out.data(data, f"{stem}-attention")
        job.report(1.0, "done")
        return FigureSet(images, data, downloads)

    def _exporter(self, session: Session, fmt: str, dpi: int) -> Exporter:
        """The request's figures in the chosen format for download, a PNG preview where that is not PNG."""
        return Exporter(session.files_dir(self.files_root), (fmt,), dpi, preview_dpi=SHOW_DPI)

    def _analysis_sampling(self, sampling, lmm):
        """The request's sampling, or the checkpoint's own within the attention frame limit (the maps hold layers x
        heads x queries x frames x patches)."""
        if sampling is not None:
            return sampling
        most = self.config.max_attention_frames
        if lmm.sampling.max_frames_taken() <= most:
            return lmm.sampling
        return self.limits.sampling("uniform", most)

    def picture(self, session: Session, video, *, model: str | None = None, sampling=None, frames: int = 4,
                fmt: str = "png", dpi: int = 150, job: Job | None = None) -> FigureSet:
        """What a per-frame compressor (llava_mini, pool, tome, topk) does to `frames` frames of this video,
        drawn over them (`visualizations.plot_connector_picture`), with its numbers and the output tokens'
        redundancy summary."""
        from vidlmm.analysis import to_jsonable
        from visualizations import picture_data, plot_connector_picture

        job = job or Job()
        path, _ = self.check_video(video)
        frames = self.limits.picture_frames(frames)
        with self.slot.hold(job):
            job.report(0.05, "loading model")
            loaded, lmm = self.lmm(session, model, job)
            if not has_picture(loaded.connector):
                raise UserError(f"The '{loaded.connector}' connector has no picture of its own; its attention shows "
                                "what it looks at.")
            job.report(0.2, "running the connector")
            picture, redundancy = _picture_gpu(lmm, path, self._analysis_sampling(sampling, lmm))
        job.report(0.7, "drawing")
        out = self._exporter(session, fmt, dpi)
        stem = f"{slug(loaded.name)}-{Path(path).stem}-picture"
        shown, downloads = out.figure(plot_connector_picture(picture, int(frames)), stem)
        downloads += out.data({"model": loaded.name, **picture_data(picture)}, stem)
        job.report(1.0, "done")
        t, k = picture["num_frames"], picture["output_tokens_per_frame"]
        data = {"model": loaded.name, "connector": loaded.connector, "kind": picture["kind"], "frames": t,
                "tokens_per_frame_in": picture["tokens_per_frame"], "tokens_per_frame_out": k,
                "visual_tokens": t * k, "summary": to_jsonable(redundancy["summary"])}
        return FigureSet({"picture": shown}, data, downloads)

    def redundancy(self, session: Session, video, question: str, *, models: list[str] | None = None,
                   source: str = "video", fractions=(1, 0.75, 0.5, 0.25, 0.125, 0.0625),
                   strategies=("random",), seeds: int = 3, sampling=None, max_items: int = 20, fmt: str = "png",
                   dpi: int = 150, job: Job | None = None) -> FigureSet:
        """Query-zeroing curves for several connectors on one plot: this video and question (source "video"), or
        the first max_items questions of the held-out multiple-choice set (source "heldout"). The work stops
        between batches of masks once the job is cancelled."""
        from vidlmm.analysis import to_jsonable
        from visualizations import plot_zeroing

        job = job or Job()
        fractions = self.limits.fractions(fractions)
        strategies = self.limits.strategies(list(strategies or []))
        seeds = self.limits.seeds(seeds)
        models = self.limits.models(models or ["default"], self.config.max_redundancy_models, "to overlay")
        if source not in ("video", "heldout"):
            raise UserError(f"Unknown source '{str(source)[:40]}' (use video or heldout).", "source")
        if source == "heldout":
            items, root = self.heldout_items(self.limits.heldout_items(max_items))
        else:
            path, _ = self.check_video(video)
            question = self.limits.question(question)
        results = []
        with self.slot.hold(job):
            for k, name in enumerate(models):
                def step(done, total, text="", k=k, name=name):  # vidlmm.analysis reports (done, total, text)
                    job.report((k + min(max(done / max(total, 1), 0.0), 1.0)) / len(models), f"{name}: {text}")

                step(0, 1, "loading model")
                loaded, lmm = self.lmm(session, name, job)
                if source == "heldout":
                    results.append(_zeroing_mc_gpu(lmm, items, root, fractions, strategies, seeds,
                                                   sampling or lmm.sampling, loaded.name, across(step)))
                else:
                    results.append(_zeroing_gpu(lmm, path, question, fractions, strategies, seeds,
                                                sampling or lmm.sampling, loaded.name, across(step)))
        out = self._exporter(session, fmt, dpi)
        stem = f"zeroing-{source}-{'-'.join(slug(m) for m in models)}"
        shown, files = out.figure(plot_zeroing(results), stem)
        data = {"source": source, "results": [_no_server_paths(r.to_json()) for r in results]}
        files += out.data(data, stem, csv_rows=[row for r in results for row in r.rows()])
        job.report(1.0, "done")

        def brief(point: dict) -> dict:  # mean and spread per metric; every seed's value is in the downloads
            return {k: v for k, v in point.items() if not k.endswith(("_min", "_max")) and k != "model"}

        summary = {"source": source, "models": [{"model": r.model, "connector": r.connector_type, "kind": r.kind,
                                                  "tokens": r.num_tokens, "points": [brief(p) for p in r.summary()]}
                                                 for r in results]}
        return FigureSet({"zeroing": shown}, to_jsonable(summary), files)

    def heldout_items(self, max_items: int = 20):
        from vidlmm.benchmarks import load_benchmark

        path = self.config.eval_set or _find_heldout_set()
        if not path:
            raise UserError("No held-out multiple-choice set is installed (start the app with --eval-set FILE).")
        return load_benchmark(path).items[: max(1, int(max_items))], None

    def compare(self, session: Session, video, question: str, *, models: list[str], sampling=None, generation=None,
                layer: int = -1, fmt: str = "png", dpi: int = 150, job: Job | None = None) -> FigureSet:
        """The same video and question through 1-3 models: answers, attention heatmaps (a per-frame compressor's
        picture instead), where each language model looks while it answers (its attention on the video per layer,
        side by side), token counts, timings. Stops between models (and between tokens) once cancelled."""
        from visualizations import plot_attention_heatmap, plot_connector_picture, plot_visual_share

        job = job or Job()
        models = self.limits.models(models, self.config.max_compare_models, "to compare")
        path, _ = self.check_video(video)
        question = self.limits.question(question)
        out = self._exporter(session, fmt, dpi)
        rows, images, downloads, shares = [], [], [], {}
        with self.slot.hold(job):
            for k, name in enumerate(models):
                job.report(k / len(models), f"{name}: answering")
                own = Session(id=session.id)  # same cache, own (empty) conversation
                result = None
                for item in self.ask(own, path, question, model=name, sampling=sampling, generation=generation,
                                     history=[], job=job):
                    if isinstance(item, AskResult):
                        result = item
                loaded, lmm = self.lmm(session, name, job)
                # compressors have no attention maps to draw: their picture
                if has_picture(loaded.connector):
                    job.report((k + 0.6) / len(models), f"{name}: picture")
                    picture, _ = _picture_gpu(lmm, path, self._analysis_sampling(sampling, lmm))
                    figure, kind = plot_connector_picture(picture), "picture"
                else:
                    job.report((k + 0.6) / len(models), f"{name}: attention")
                    maps, _ = _attention_gpu(lmm, path, self._analysis_sampling(sampling, lmm), int(layer),
                                             stats=False)
                    figure, kind = plot_attention_heatmap(maps, int(layer)), "heatmap"
                label = f"{k + 1}-{slug(loaded.name)}"
                shown, files = out.figure(figure, f"compare-{label}-{kind}")
                images.append((f"{loaded.name} ({loaded.connector})", shown))
                downloads += files
                d = result.details
                visual_share = None
                if d["token_ids"]:
                    job.report((k + 0.8) / len(models), f"{name}: where the language model looks")
                    # the answer's own frames; a long answer is traced over its first MAX_TRACED tokens
                    traced = _llm_attention_gpu(lmm, path, sampling, question,
                                                answer_ids=d["token_ids"][:MAX_TRACED])
                    shares[f"{loaded.name} ({loaded.connector})"] = traced.visual_share()
                    visual_share = float(traced.visual_share().mean())
                rows.append({"model": loaded.name, "connector": loaded.connector, "answer": d["answer"],
                             "llm_visual_share": visual_share, "frames": d["frames"],
                             "trace_reproduces_answer": traced.teacher_forced_reproduces_answer if visual_share
                             is not None else None,
                             "visual_tokens": d["visual_tokens"],
                             **{(k if k == "tokens_per_s" else f"{k}_s"): v for k, v in d["timings_s"].items()},
                             **{k: v for k, v in d["memory"].items()}})
        if shares:
            shown, files = out.figure(plot_visual_share(shares), f"compare-{Path(path).stem}-llm-visual-share")
            images.append(("where each language model looks: attention on the video per layer", shown))
            downloads += files
        downloads += out.data({"question": question, "video": os.path.basename(path), "rows": rows},
                              f"compare-{Path(path).stem}", csv_rows=rows)
        job.report(1.0, "done")
        return FigureSet(images, {"question": question, "rows": rows}, downloads)


# ---- GPU work (decorated for ZeroGPU; each returns CPU objects) --------------------------------------------------
@gpu(duration=120)
def _ask_gpu(lmm, path, question, history, sampling, budget, generation, progress, should_stop=None):
    reset_peak_memory()
    progress(0.15, "reading video and running the vision tower")
    prepared, cached = lmm.prepare(path, sampling)
    progress(0.5, "connector")
    t0 = time.perf_counter()
    try:
        out = lmm.model.connect(prepared.features, budget=budget)
    except ValueError as err:
        raise UserError(str(err)) from None
    connector_s = time.perf_counter() - t0
    _check_context(lmm, question, history, int(out.tokens.shape[1]), generation)
    progress(0.6, "generating")
    answer = None
    # the whole output, not just its tokens: LLaVA-Mini's pre-fusion rewrites the prompt from its fusion_context
    for item in lmm.stream(prepared, question, history, generation, visual=out, should_stop=should_stop):
        if isinstance(item, str):
            yield item
        else:
            answer = item
    yield answer, connector_s, out.num_active(), dict(prepared.timings), cached, peak_memory()


def _check_context(lmm, question, history, visual_tokens: int, generation) -> None:
    """Refuse, in one sentence, an answer that cannot fit the model's context (prompt + visual + new tokens)."""
    from vidlmm.pipeline import GenerationSettings

    model = lmm.model
    context = min(model.config.tokenizer_model_max_length,
                  model.config.text_config.get("max_position_embeddings") or 10**9)
    prompt = len(lmm.prompt_ids(question, list(history))) - 1 + visual_tokens  # the placeholder becomes the video
    new = (generation or GenerationSettings()).max_new_tokens
    if prompt + new > context:
        raise UserError(f"The prompt ({prompt} tokens with the video) and {new} new tokens do not fit the model's "
                        f"context of {context} tokens; ask for fewer new tokens or frames, or start a new "
                        "conversation.", "max_new_tokens")


@gpu(duration=120)
def _attention_gpu(lmm, path, sampling, layer, stats: bool = True):
    from vidlmm.analysis import attention_maps, redundancy_stats

    prepared, _ = lmm.prepare(path, sampling)
    maps = attention_maps(lmm, prepared, sampling=sampling)
    return maps, (redundancy_stats(maps, layer=layer) if stats else None)


@gpu(duration=120)
def _llm_attention_gpu(lmm, path, sampling, question, max_new_tokens: int = MAX_TRACED, answer_ids=None):
    """The traced answer (at most MAX_TRACED tokens: the tab's answer may stop before the Chat tab's would)."""
    from vidlmm.analysis import llm_attention

    prepared, _ = lmm.prepare(path, sampling)
    return llm_attention(lmm, prepared, question, max_new_tokens=min(max_new_tokens, MAX_TRACED),
                         answer_ids=answer_ids)


@gpu(duration=120)
def _picture_gpu(lmm, path, sampling):
    from vidlmm.analysis import connector_picture, token_redundancy

    prepared, _ = lmm.prepare(path, sampling)
    picture = connector_picture(lmm, prepared, sampling=sampling)
    return picture, token_redundancy(picture["tokens"], picture["connector_type"])


@gpu(duration=300)
def _zeroing_gpu(lmm, path, question, fractions, strategies, seeds, sampling, name, progress):
    from vidlmm.analysis import zeroing_curve

    return zeroing_curve(lmm, path, question, fractions=fractions, strategies=strategies, seeds=seeds,
                         sampling=sampling, name=name, progress=progress)


@gpu(duration=300)
def _zeroing_mc_gpu(lmm, items, root, fractions, strategies, seeds, sampling, name, progress):
    from vidlmm.analysis import zeroing_mc_curve

    return zeroing_mc_curve(lmm, items, video_root=root, fractions=fractions, strategies=strategies, seeds=seeds,
                            sampling=sampling, name=name, progress=progress)


# ---- helpers -----------------------------------------------------------------------------------------------------
def _default_model() -> tuple[str, bool]:
    from vidlmm.defaults import default_model

    return default_model()


def _video_path(video) -> str:
    """Gradio hands a path string; API callers may send a FileData-like dict."""
    if isinstance(video, dict):
        video = video.get("path") or video.get("video", {}).get("path")
    if isinstance(video, (list, tuple)):
        video = video[0] if video else None
    return os.fspath(video) if video else ""


@functools.lru_cache(maxsize=256)
def _probe(path: str, size: int, mtime_ns: int) -> tuple[int, float]:
    from vidlmm.video import probe_video

    total, fps, _ = probe_video(path)
    return total, fps


def _thumbnail(frame: np.ndarray) -> np.ndarray:
    from PIL import Image

    h, w = frame.shape[:2]
    if h <= THUMB_HEIGHT:
        return frame
    size = (max(1, round(w * THUMB_HEIGHT / h)), THUMB_HEIGHT)
    return np.asarray(Image.fromarray(frame).resize(size, Image.BILINEAR))


def _no_server_paths(result: dict) -> dict:
    """A zeroing result's JSON with its video named by the file's own name (a visitor never sees server paths)."""
    reference = result.get("reference") or {}
    if reference.get("video"):
        result = {**result, "reference": {**reference, "video": os.path.basename(str(reference["video"]))}}
    return result


def _model_memory_bytes(config: AppConfig) -> int:
    """The loaded models' budget: the configured MiB, else half of what the model device has free at startup."""
    if config.model_memory_mb:
        return int(config.model_memory_mb) * 1024**2
    from vidlmm.checkpoint import pick_device
    from vidlmm.memory import free_memory_bytes

    return free_memory_bytes(pick_device(config.device)) // 2


def _find_heldout_set() -> str | None:
    from .config import ROOT

    for candidate in ("assets/eval/eval_mc.json", "assets/heldout/eval_mc.json", "assets/models/eval_mc.json"):
        if (ROOT / candidate).is_file():
            return str(ROOT / candidate)
    return None
