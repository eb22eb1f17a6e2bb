"""The callbacks of the app's events (`Handlers`): thin glue over `app.service.Service`, one method per event.

The named endpoints' methods (preview, ask, attention, show_connector_picture for "picture", redundancy, compare) take
one positional parameter per input: gradio_client calls them by these names. Each endpoint's values are parsed by
`app.limits`, whose checks also run as the event's validator (the `check_*` methods), so an over-limit request is
refused before it joins the queue.
"""

from __future__ import annotations

import functools
import html
import logging
import re
from pathlib import Path

import gradio as gr

from .jobs import HEARTBEAT, relay
from .models import has_picture, matching_model, resampler_switch, switch_name_of
from .service import AskResult, Service, one_sentence
from .session import ensure_session

log = logging.getLogger("vidlmm.app")


def user_error(err: BaseException) -> gr.Error:
    """One readable sentence in the UI (and as the API error); unexpected errors are logged with their traceback."""
    from vidlmm.errors import VidlmmError

    if not isinstance(err, (VidlmmError, ValueError, FileNotFoundError)):
        log.exception("request failed")
    return gr.Error(html.escape(one_sentence(err), quote=False), print_exception=False)


def _progress(progress):
    return lambda fraction, text: progress(fraction, desc=text)


def _figure_job(work, progress, outputs: int):
    """Run `work(job)` through `relay` (cancelled, with the model slot freed, when the client goes away); each
    heartbeat yields a no-change update of the event's `outputs` outputs. Returns what `work` returned."""
    out = None
    for out in relay(work, _progress(progress)):
        if out is HEARTBEAT:
            yield (gr.skip(),) * outputs
    return out


def _ask_job(service: Service, session, video, question, model, settings: dict, job):
    return service.ask(session, video, question, model=model, job=job, **settings)


class Handlers:
    """The callbacks of every event. The named endpoints' parameters are the API's: gradio_client calls them
    by these names, so they stay one positional parameter per input.

    Each endpoint's raw values are parsed by one function (`app.limits`), which also runs as the event's
    validator: an over-limit request is refused before it joins the queue. Model work runs through `relay`, so
    a cancelled or disconnected request stops and frees the model slot."""

    def __init__(self, service: Service):
        self.service, self.config, self.limits = service, service.config, service.limits
        self.switch = resampler_switch()

    def sampling_of(self, mode, num_frames, fps, max_frames, most=None):
        return self.limits.sampling(mode, num_frames, max_frames, fps, most=most)

    def attention_sampling(self, mode, num_frames, fps, max_frames):
        """The sampling of the views that keep per-frame attention or pictures (at most max_attention_frames)."""
        return self.sampling_of(mode, num_frames, fps, max_frames, self.config.max_attention_frames)

    def budget_of(self, groups, queries, frame_tokens, active_fraction, strategy):
        return self.limits.budget(groups, queries, frame_tokens, active_fraction, strategy)

    def generation_of(self, do_sample, temperature, top_p, max_new_tokens, seed):
        return self.limits.generation(max_new_tokens, do_sample, temperature, top_p, seed)

    def check_settings(self, model, mode, num_frames, fps, max_frames, groups, queries, frame_tokens,
                       active_fraction, strategy):
        self.service.models.resolve(model)
        self.sampling_of(mode, num_frames, fps, max_frames)
        self.budget_of(groups, queries, frame_tokens, active_fraction, strategy)

    def check_preview(self, video, model, *settings):
        self.check_settings(model, *settings)
        if video:
            self.service.check_video(video)

    def check_ask(self, session, video, question, model, mode, num_frames, fps, max_frames, groups, queries,
                  frame_tokens, active_fraction, strategy, do_sample, temperature, top_p, max_new_tokens, seed,
                  history=None):
        self.limits.question(question)
        self.limits.history(history)
        self.check_settings(model, mode, num_frames, fps, max_frames, groups, queries, frame_tokens, active_fraction,
                       strategy)
        self.generation_of(do_sample, temperature, top_p, max_new_tokens, seed)
        self.service.check_video(video)

    def check_chat(self, session, video, question, messages, model, *settings):
        self.check_ask(session, video, question, model, *settings)

    def check_attention(self, session, video, model, mode, num_frames, fps, max_frames, layer, head, query, group,
                        log_scale, fmt, dpi):
        self.service.models.resolve(model)
        self.attention_sampling(mode, num_frames, fps, max_frames)
        self.limits.layer(layer)
        for value, what, name in ((head, "The head", "head"), (query, "The query", "query"),
                                  (group, "The group", "group")):
            self.limits.index(value, what, name)
        self.limits.figure(fmt, dpi)
        self.service.check_video(video)

    def check_picture(self, session, video, model, mode, num_frames, fps, max_frames, frames, fmt, dpi):
        self.service.models.resolve(model)
        self.limits.picture_frames(frames)
        self.attention_sampling(mode, num_frames, fps, max_frames)
        self.limits.figure(fmt, dpi)
        self.service.check_video(video)

    def check_llm_attention(self, session, video, question, token, model, mode, num_frames, fps, max_frames, fmt,
                            dpi):
        self.service.models.resolve(model)
        self.limits.question(question)
        self.limits.index(token, "The token", "token")
        self.attention_sampling(mode, num_frames, fps, max_frames)
        self.limits.figure(fmt, dpi)
        self.service.check_video(video)

    def check_redundancy(self, session, video, question, models, source, fractions, strategies, seeds, max_items,
                         mode, num_frames, fps, max_frames, fmt, dpi):
        for name in self.limits.models(models or ["default"], self.config.max_redundancy_models, "to overlay"):
            self.service.models.resolve(name)
        self.limits.fractions(fractions)
        self.limits.strategies(strategies or [])
        self.limits.seeds(seeds)
        self.sampling_of(mode, num_frames, fps, max_frames)
        self.limits.figure(fmt, dpi)
        if source == "heldout":
            self.limits.heldout_items(max_items)
        else:
            self.limits.question(question)
            self.service.check_video(video)

    def check_compare(self, session, video, question, models, mode, num_frames, fps, max_frames, do_sample,
                      temperature, top_p, max_new_tokens, seed, fmt, dpi):
        for name in self.limits.models(models, self.config.max_compare_models, "to compare"):
            self.service.models.resolve(name)
        self.limits.question(question)
        self.attention_sampling(mode, num_frames, fps, max_frames)
        self.generation_of(do_sample, temperature, top_p, max_new_tokens, seed)
        self.limits.figure(fmt, dpi)
        self.service.check_video(video)

    def preview(self, video: str | None, model: str, mode: str, num_frames: int, fps: float, max_frames: int,
                groups: int, queries: int, frame_tokens: int, active_fraction: float, strategy: str):
        """Sampled frames with timestamps, and the visual-token count the LLM will receive."""
        if not video:
            return [], "Upload a video to see its frames and visual-token count."
        try:
            result = self.service.preview(video, model, self.sampling_of(mode, num_frames, fps, max_frames),
                                     self.budget_of(groups, queries, frame_tokens, active_fraction, strategy))
            frames = self.service.thumbnails.paths(result.frames)
        except Exception as err:  # noqa: BLE001 - shown as one sentence
            raise user_error(err) from None
        return frames, result.summary

    def on_model(self, model: str):
        """Load the model (inside the model slot; progress shown) and adapt the resampler switch, budget
        controls and attention tab to it."""
        try:
            info = self.service.budget_info(model)
        except Exception as err:  # noqa: BLE001
            gr.Warning(html.escape(one_sentence(err), quote=False))
            return (gr.skip(), f"⚠ {html.escape(one_sentence(err), quote=False)}", *[gr.skip()] * 5)
        short = switch_name_of(info["connector"])
        status = f"Loaded **{html.escape(str(model))}** · connector `{info['connector']}`"
        if info["groups"]:
            status += f" · {info['groups']} groups × {info['queries']} queries"
        elif info["queries"]:
            status += f" · {info['queries']} queries {info['queries_unit']}"
        status += f" · trained sampling: {info['sampling'].describe()}"
        if info["precision"]:
            status += f" · runs in **{info['precision']['name']}**: {html.escape(info['precision']['reason'])}"
        group_update = gr.update(value=0, interactive=bool(info["groups"]),
                                 label=f"Groups (0 = checkpoint's {info['groups'] or '-'})")
        query_update = gr.update(value=0, interactive=bool(info["queries"]), maximum=max(1, info["queries"] or 0),
                                 label=f"Queries {info['queries_unit'] or ''} (0 = checkpoint's "
                                       f"{info['queries'] or '-'})")
        frame_update = gr.update(value=0, interactive=bool(info["frame_tokens"]),
                                 maximum=info["tokens_per_frame_in"],
                                 label=f"Tokens per frame (0 = checkpoint's {info['frame_tokens'] or '-'})")
        compressor = has_picture(info["connector"])
        return ((gr.update(value=short) if short else gr.skip()), status, group_update, query_update, frame_update,
                gr.update(visible=not compressor), gr.update(visible=compressor))

    def on_resampler(self, resampler: str, model: str):
        """Switch to a model with this connector; when none is installed, say so and keep the current one."""
        picked = matching_model(self.service.choices, model, resampler)
        current = self.service.models.resolve(model).connector
        wanted = self.switch.get(resampler)
        if wanted is None:
            return gr.skip(), gr.skip()
        if picked == model and current != wanted.registry_name:
            hint = "; type its checkpoint folder to load one." if self.config.allow_custom_models else "."
            gr.Warning(f"No installed checkpoint uses {wanted.label} ({wanted.registry_name})" + hint)
            short = switch_name_of(current)
            return gr.skip(), (gr.update(value=short) if short else gr.skip())
        return gr.update(value=picked), gr.skip()

    def use_local_folder(self, folder: str):
        folder = (folder or "").strip()
        if not folder or not self.config.allow_custom_models:
            return gr.skip()
        if not (Path(folder).expanduser() / "config.json").is_file():
            gr.Warning(html.escape(f"'{Path(folder).name}' is not a checkpoint folder (it has no config.json).",
                                   quote=False))
            return gr.skip()
        return gr.update(value=str(Path(folder).expanduser()))

    def new_conversation(self, session):
        session = ensure_session(session)
        session.history.clear()
        return session, [], "", None

    def chat(self, session, video: str | None, question: str, messages: list, model: str, mode: str,
             num_frames: int, fps: float, max_frames: int, groups: int, queries: int, frame_tokens: int,
             active_fraction: float, strategy: str, do_sample: bool, temperature: float, top_p: float,
             max_new_tokens: int, seed: int, progress=gr.Progress()):
        session = ensure_session(session)
        question = (question or "").strip()
        if not question:
            yield session, messages, question, gr.skip(), gr.skip()
            return
        messages = list(messages or []) + [{"role": "user", "content": question},
                                           {"role": "assistant", "content": ""}]
        yield session, messages, "", "…", gr.skip()
        try:
            settings = dict(sampling=self.sampling_of(mode, num_frames, fps, max_frames),
                            budget=self.budget_of(groups, queries, frame_tokens, active_fraction, strategy),
                            generation=self.generation_of(do_sample, temperature, top_p, max_new_tokens, seed))
            work = functools.partial(_ask_job, self.service, session, video, question, model, settings)
            for item in relay(work, _progress(progress)):
                if item is HEARTBEAT:
                    yield session, messages, "", gr.skip(), gr.skip()
                elif isinstance(item, AskResult):
                    messages[-1] = {"role": "assistant", "content": item.answer}
                    yield session, messages, "", item.summary, item.details
                else:
                    messages[-1] = {"role": "assistant", "content": messages[-1]["content"] + item}
                    yield session, messages, "", gr.skip(), gr.skip()
        except Exception as err:  # noqa: BLE001 - the chat so far stays; the error is one sentence in it
            sentence = one_sentence(err)
            user_error(err)  # logs unexpected errors
            gr.Warning(html.escape(sentence, quote=False))
            messages[-1] = {"role": "assistant", "content": f"⚠️ {sentence}"}
            yield session, messages, question, f"⚠️ {html.escape(sentence, quote=False)}", gr.skip()

    def ask(self, session, video: str | None, question: str, model: str, mode: str, num_frames: int, fps: float,
            max_frames: int, groups: int, queries: int, frame_tokens: int, active_fraction: float, strategy: str,
            do_sample: bool, temperature: float, top_p: float, max_new_tokens: int, seed: int, history: list | None,
            progress=gr.Progress()):
        """Answer a question about a video, streamed. history: earlier [question, answer] pairs.
        Returns (answer so far, details with timings and memory once done)."""
        session = ensure_session(session)
        text = ""
        try:
            settings = dict(sampling=self.sampling_of(mode, num_frames, fps, max_frames),
                            budget=self.budget_of(groups, queries, frame_tokens, active_fraction, strategy),
                            generation=self.generation_of(do_sample, temperature, top_p, max_new_tokens, seed),
                            history=self.limits.history(history))
            work = functools.partial(_ask_job, self.service, session, video, question, model, settings)
            for item in relay(work, _progress(progress)):
                if item is HEARTBEAT:
                    yield gr.skip(), gr.skip(), gr.skip()
                elif isinstance(item, AskResult):
                    yield session, item.answer, item.details
                else:
                    text += item
                    yield session, text, None
        except Exception as err:  # noqa: BLE001
            raise user_error(err) from None

    def attention(self, session, video: str | None, model: str, mode: str, num_frames: int, fps: float,
                  max_frames: int, layer: int, head: int, query: int, group: int, log_scale: bool, fmt: str,
                  dpi: int, progress=gr.Progress()):
        """Connector attention: heatmap, per-frame overlays, temporal profile, redundancy statistics, files."""
        session = ensure_session(session)
        try:
            fmt, dpi = self.limits.figure(fmt, dpi)
            settings = dict(model=model, layer=self.limits.layer(layer),
                            head=self.limits.index(head, "The head", "head"),
                            query=self.limits.index(query, "The query", "query"),
                            group=self.limits.index(group, "The group", "group"), log_scale=bool(log_scale),
                            fmt=fmt, dpi=dpi,
                            sampling=self.attention_sampling(mode, num_frames, fps, max_frames))
            work = lambda job: self.service.attention(session, video, job=job, **settings)  # noqa: E731
            out = yield from _figure_job(work, progress, 7)
        except Exception as err:  # noqa: BLE001
            raise user_error(err) from None
        im = out.images
        yield (session, str(im["heatmap"]), str(im["overlays"]), str(im["temporal"]),
               str(im["redundancy_stats"]), out.data, [str(p) for p in out.downloads])

    def show_connector_picture(self, session, video: str | None, model: str, mode: str, num_frames: int, fps: float,
                               max_frames: int, frames: int, fmt: str, dpi: int, progress=gr.Progress()):
        """What a per-frame compressor (llava_mini, pool, tome, topk) does to each frame: figure, numbers, files."""
        session = ensure_session(session)
        try:
            fmt, dpi = self.limits.figure(fmt, dpi)
            settings = dict(model=model, frames=frames, fmt=fmt, dpi=dpi,
                            sampling=self.attention_sampling(mode, num_frames, fps, max_frames))
            work = lambda job: self.service.picture(session, video, job=job, **settings)  # noqa: E731
            out = yield from _figure_job(work, progress, 4)
        except Exception as err:  # noqa: BLE001
            raise user_error(err) from None
        yield session, str(out.images["picture"]), out.data, [str(p) for p in out.downloads]

    def llm_attention(self, session, video: str | None, question: str, token: int, model: str, mode: str,
                      num_frames: int, fps: float, max_frames: int, fmt: str, dpi: int, progress=gr.Progress()):
        """Where the language model looks while it answers: the answer's words (to pick one), each word's frames,
        the patches of the picked word (-1: the whole answer) and the share of attention on the video per layer."""
        session = ensure_session(session)
        try:
            fmt, dpi = self.limits.figure(fmt, dpi)
            settings = dict(model=model, token=self.limits.index(token, "The token", "token"), fmt=fmt, dpi=dpi,
                            sampling=self.attention_sampling(mode, num_frames, fps, max_frames))
            work = lambda job: self.service.llm_attention(session, video, question, job=job, **settings)  # noqa: E731
            out = yield from _figure_job(work, progress, 7)
        except Exception as err:  # noqa: BLE001
            raise user_error(err) from None
        words = [("whole answer", -1)] + [(f"{k}: {t['text'].strip() or repr(t['text'])}", k)
                                          for k, t in enumerate(out.data["tokens"])]
        chosen = -1 if out.data["token"] is None else out.data["token"]
        yield (session, gr.update(choices=words, value=chosen), str(out.images["frames"]),
               str(out.images["patches"]), str(out.images["layers"]), out.data, [str(p) for p in out.downloads])

    def redundancy(self, session, video: str | None, question: str, models: list[str], source: str, fractions: str,
                   strategies: list[str], seeds: int, max_items: int, mode: str, num_frames: int, fps: float,
                   max_frames: int, fmt: str, dpi: int, progress=gr.Progress()):
        """Query-zeroing curves (several connectors overlaid) on this video and question or the held-out set."""
        session = ensure_session(session)
        try:
            fmt, dpi = self.limits.figure(fmt, dpi)
            settings = dict(models=models, source=source, fractions=fractions, strategies=strategies,
                            seeds=seeds, max_items=max_items, fmt=fmt, dpi=dpi,
                            sampling=self.sampling_of(mode, num_frames, fps, max_frames))
            work = lambda job: self.service.redundancy(session, video, question, job=job, **settings)  # noqa: E731
            out = yield from _figure_job(work, progress, 4)
        except Exception as err:  # noqa: BLE001
            raise user_error(err) from None
        yield session, str(out.images["zeroing"]), out.data, [str(p) for p in out.downloads]

    def compare(self, session, video: str | None, question: str, models: list[str], mode: str, num_frames: int,
                fps: float, max_frames: int, do_sample: bool, temperature: float, top_p: float,
                max_new_tokens: int, seed: int, fmt: str, dpi: int, progress=gr.Progress()):
        """The same video and question through 1-3 models: answers, attention maps (compressors: their picture),
        token counts, timings."""
        session = ensure_session(session)
        try:
            fmt, dpi = self.limits.figure(fmt, dpi)
            settings = dict(models=models, fmt=fmt, dpi=dpi,
                            sampling=self.attention_sampling(mode, num_frames, fps, max_frames),
                            generation=self.generation_of(do_sample, temperature, top_p, max_new_tokens, seed))
            work = lambda job: self.service.compare(session, video, question, job=job, **settings)  # noqa: E731
            out = yield from _figure_job(work, progress, 5)
        except Exception as err:  # noqa: BLE001
            raise user_error(err) from None
        yield (session, compare_table(out.data["rows"]), [(str(p), name) for name, p in out.images],
               out.data, [str(p) for p in out.downloads])


def compare_table(rows: list[dict]) -> str:
    """Markdown: one row of numbers per model, then each model's answer."""
    if not rows:
        return ""

    def text(value) -> str:
        value = "".join(ch if ch.isprintable() else " " for ch in str(value))[:400]
        value = re.sub(r"([\\`*_~\[\]#|])", r"\\\1", value)  # shown as typed, not as markdown
        return html.escape(value, quote=False)

    lines = ["| model | connector | visual tokens | vision s | connector s | prefill s | tokens/s |",
             "|---|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {text(r['model'])} | {r['connector']} | {r['visual_tokens']} | {r.get('vision_s', 0):.3f} | "
              f"{r.get('connector_s', 0):.3f} | {r.get('prefill_s', 0):.3f} | {r.get('tokens_per_s', 0):.1f} |"
              for r in rows]
    lines += [""] + [f"**{text(r['model'])}**: {text(r['answer'])}  " for r in rows]
    return "\n".join(lines)
