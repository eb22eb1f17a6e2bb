"""The Gradio layout and its callbacks: thin glue over `app.service.Service`.

Named API endpoints (every feature is one; see `API_NAMES`): preview, ask (streamed), attention, picture (what a
per-frame compressor does to each frame), redundancy, compare. They take plain values (a video file, strings,
numbers) plus the caller's session, which gradio_client keeps per Client, so a follow-up from the same client
reuses its cached vision features.
"""

from __future__ import annotations

import functools
import html
import inspect
import logging
import re
from pathlib import Path

import gradio as gr

from vidlmm.analysis import STRATEGIES

from .config import EXAMPLES_DIR, AppConfig
from .models import distinct_models, has_picture, matching_model, resampler_switch, switch_name_of
from .jobs import HEARTBEAT, relay
from .limits import MAX_PICTURE_FRAMES, RefusedInput
from .service import AskResult, Service, one_sentence
from .session import close_session, ensure_session

log = logging.getLogger("vidlmm.app")
API_NAMES = ("preview", "ask", "attention", "picture", "redundancy", "compare")
VIDEO_TYPES = [".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif"]
DEFAULT_QUESTION = "What happens in the video?"
CSS = """
#frame-strip .thumbnail-item { min-width: 72px; }
#token-count { font-size: 0.95em; }
"""


def user_error(err: BaseException) -> gr.Error:
    """One readable sentence in the UI (and as the API error); unexpected errors are logged with their traceback."""
    from vidlmm.errors import VidlmmError

    if not isinstance(err, (VidlmmError, ValueError, FileNotFoundError)):
        log.exception("request failed")
    return gr.Error(html.escape(one_sentence(err), quote=False), print_exception=False)


def _progress(progress):
    return lambda fraction, text: progress(fraction, desc=text)


def checked_by_limits(*components) -> None:
    """Let these inputs hand their raw values to the callbacks. Gradio's own range and choice checks run while it
    preprocesses the inputs of an event's validator, and a refusal there reaches `gradio_client` as a bare HTTP 400
    without its message; `app.limits` checks every one of these values with a sentence that names the limit."""
    for component in components:
        component.preprocess = _unchanged


def _unchanged(payload):
    return payload


def refusals_as_values(component) -> None:
    """Gradio's own refusal of an upload (a file type the input does not take) becomes a `RefusedInput` value that
    the callbacks refuse with its sentence (raised while a validator's inputs are preprocessed, it would reach
    `gradio_client` as a bare HTTP 400)."""
    preprocess = component.preprocess

    def refusing(payload):
        try:
            return preprocess(payload)
        except Exception as err:  # noqa: BLE001 - Gradio's Error or a bad payload: one sentence either way
            return RefusedInput(one_sentence(err))

    component.preprocess = refusing


def validator(fn, check):
    """A Gradio validator for the event of `fn`: it runs `check` on the same values before the request joins the
    queue. A refusal marks the input the error names (else the first that is not the session) with its one
    sentence; `gradio_client` raises it as a ValidationError at once."""
    names = [n for n in inspect.signature(fn).parameters if n != "progress"]

    @functools.wraps(fn)  # the same parameter names: Gradio names the refused input by them
    def validate(*values, **ignored):
        try:
            check(*values[: len(names)])
        except Exception as err:  # noqa: BLE001 - any refusal is shown as one sentence
            field = getattr(err, "field", None)
            field = field if field in names else next(n for n in names if n != "session")
            return [gr.validate(name != field, html.escape(one_sentence(err), quote=False) if name == field else "")
                    for name in names]
        return [gr.validate(True, "") for _ in names]

    return validate


def _ask_job(service: Service, session, video, question, model, settings: dict, job):
    return service.ask(session, video, question, model=model, job=job, **settings)


def example_videos(folder: Path = EXAMPLES_DIR) -> list[str]:
    if not folder.is_dir():
        return []
    return [str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in VIDEO_TYPES]


def build_ui(service: Service, config: AppConfig) -> gr.Blocks:
    config, limits = service.config, service.limits  # the resolved settings (custom models, hub models)
    # figures are drawn in job threads while Gradio switches matplotlib's backend around each event: pyplot's
    # first import must not race with that, so it happens here
    import matplotlib.pyplot  # noqa: F401
    choices = [(c.label, c.value) for c in service.choices]
    default_choice = service.choices[0]
    switch = resampler_switch()
    default_resampler = switch_name_of(default_choice.connector) or "group"
    limit = config.max_frames
    heavy = dict(concurrency_id="model", concurrency_limit=config.concurrency)
    light = dict(concurrency_id="cpu", concurrency_limit=2)

    # uploads and returned files in Gradio's cache are deleted once a session's files are an hour old
    with gr.Blocks(title="vidlmm: watch a video LMM's connector", analytics_enabled=config.analytics,
                   delete_cache=(900, config.session_ttl_s)) as demo:
        session = gr.State(None, time_to_live=config.session_ttl_s, delete_callback=close_session)
        gr.Markdown("## vidlmm · watch the connector of a video language model work\n"
                    "Upload a video, pick a resampler, frames and token budget, then chat, and look at what the "
                    "learned queries attend to. Every feature is also an API endpoint (see *Use via API* below).")
        with gr.Row():
            # ---- inputs -------------------------------------------------------------------------------------
            with gr.Column(scale=4, min_width=320):
                video = gr.File(label="Video (mp4, webm, mov, avi, mkv, gif)", file_types=VIDEO_TYPES,
                                type="filepath", elem_id="video-upload")
                examples = example_videos()
                if examples:
                    gr.Examples([[p] for p in examples], inputs=[video], label="Examples (offline)")
                model = gr.Dropdown(choices, value=default_choice.value, label="Model",
                                    allow_custom_value=config.allow_custom_models,
                                    info="embedded checkpoints, published hub ids"
                                         + (", or type a local checkpoint folder" if config.allow_custom_models
                                            else ""))
                local_folder = gr.Textbox(label="Local checkpoint folder", placeholder="/path/to/checkpoint",
                                          visible=config.allow_custom_models, submit_btn="Use",
                                          info="a folder in the published layout (config.json + safetensors)")
                resampler = gr.Radio([(cls.label or k, k) for k, cls in switch.items()], value=default_resampler,
                                     label="Resampler", info="switching loads the matching checkpoint")
                model_status = gr.Markdown(elem_id="model-status")
                with gr.Accordion("Frames", open=True):
                    mode = gr.Radio(["uniform", "fps"], value="uniform", label="Sampling",
                                    info="uniform N frames, or frames per second with a cap")
                    num_frames = gr.Slider(1, limit, value=min(16, limit), step=1, label="Frames (uniform)")
                    fps = gr.Slider(0.25, 8, value=1.0, step=0.25, label="Frames per second (fps mode)",
                                    info="1 = the reference's 1fps mode")
                    max_frames = gr.Slider(1, limit, value=min(64, limit), step=1, label="Max frames (fps mode)")
                with gr.Accordion("Token budget", open=False):
                    groups = gr.Slider(0, 64, value=0, step=1, label="Groups (0 = checkpoint's)",
                                       info="group resampler only")
                    queries = gr.Slider(0, 512, value=0, step=1, label="Queries (0 = checkpoint's)")
                    frame_tokens = gr.Slider(0, 1024, value=0, step=1, label="Tokens per frame (0 = checkpoint's)",
                                             info="pool / tome / topk (pool floors it to a square)")
                    active_fraction = gr.Slider(0.05, 1.0, value=1.0, step=0.05, label="Active fraction",
                                                info="zero the other visual tokens before the LLM")
                    strategy = gr.Dropdown(list(STRATEGIES), value="random", label="Zeroing strategy")
                with gr.Accordion("Generation", open=False):
                    do_sample = gr.Checkbox(False, label="Sample (off: greedy)")
                    temperature = gr.Slider(0.05, 2.0, value=0.2, step=0.05, label="Temperature")
                    top_p = gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p")
                    max_new_tokens = gr.Slider(1, config.max_new_tokens, value=min(128, config.max_new_tokens), step=1,
                                               label="Max new tokens")
                    seed = gr.Number(0, precision=0, label="Seed (sampling)")
                with gr.Accordion("Downloads", open=False):
                    fmt = gr.Radio(["png", "svg", "pdf"], value="png", label="Figure format")
                    dpi = gr.Slider(72, config.max_dpi, value=min(150, config.max_dpi), step=1, label="DPI")
            # ---- outputs ------------------------------------------------------------------------------------
            with gr.Column(scale=8):
                strip = gr.Gallery(label="Frames the model sees", columns=8, height=190, object_fit="contain",
                                   elem_id="frame-strip", allow_preview=True)
                token_count = gr.Markdown("Upload a video to see its frames and visual-token count.",
                                          elem_id="token-count")
                with gr.Tabs():
                    with gr.Tab("Chat", id="chat"):
                        chatbot = gr.Chatbot(label="Chat", height=380, elem_id="chatbot")
                        with gr.Row():
                            question = gr.Textbox(placeholder="Ask about the video…", show_label=False, scale=6,
                                                  elem_id="question", submit_btn=False)
                            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
                            clear = gr.Button("New chat", scale=1)
                        timings = gr.Markdown(elem_id="timings")
                        with gr.Accordion("Answer details (JSON)", open=False):
                            details = gr.JSON(label="details")
                    with gr.Tab("Attention", id="attention", elem_id="attention-tab"):
                        # resamplers: their attention; per-frame compressors: their picture (see on_model)
                        compressor = has_picture(default_choice.connector)
                        with gr.Column(visible=not compressor) as attention_view:
                            with gr.Row():
                                layer = gr.Number(-1, precision=0, label="Layer (-1 = last)")
                                head = gr.Number(-1, precision=0, label="Head (-1 = mean)")
                                query = gr.Number(-1, precision=0, label="Query for overlays (-1 = all)")
                                group = gr.Number(-1, precision=0, label="Group for overlays (-1 = all)")
                                log_scale = gr.Checkbox(False, label="Log scale")
                            attend = gr.Button("Show attention", variant="primary", elem_id="attend")
                            heatmap = gr.Image(label="Queries × visual tokens", type="filepath", elem_id="heatmap")
                            overlays = gr.Image(label="Per-frame overlays", type="filepath")
                            with gr.Row():
                                temporal = gr.Image(label="Temporal profile", type="filepath")
                                stats_plot = gr.Image(label="Redundancy statistics", type="filepath")
                        with gr.Column(visible=compressor) as picture_view:
                            picture_frames = gr.Slider(1, MAX_PICTURE_FRAMES, value=4, step=1,
                                                       label="Frames shown")
                            show_picture = gr.Button("Show what the connector does to each frame", variant="primary",
                                                     elem_id="show-picture")
                            picture = gr.Image(label="Per-frame picture of the connector", type="filepath",
                                               elem_id="picture")
                        stats = gr.JSON(label="Redundancy statistics")
                        attention_files = gr.File(label="Download figures and data", file_count="multiple")
                    with gr.Tab("Redundancy", id="redundancy"):
                        with gr.Row():
                            red_models = gr.Dropdown(choices, value=[default_choice.value], multiselect=True,
                                                     label="Connectors to overlay",
                                                     max_choices=config.max_redundancy_models)
                            red_source = gr.Radio([("this video and question", "video"),
                                                   ("held-out set", "heldout")], value="video", label="Measured on")
                        red_question = gr.Textbox(DEFAULT_QUESTION, label="Question")
                        with gr.Row():
                            fractions = gr.Textbox("1, 0.75, 0.5, 0.25, 0.125, 0.0625", label="Active fractions")
                            strategies = gr.CheckboxGroup(list(STRATEGIES), value=["random"], label="Strategies")
                            seeds = gr.Slider(1, config.max_seeds, value=min(3, config.max_seeds), step=1,
                                              label="Seeds (random)")
                            max_items = gr.Slider(1, config.max_heldout_items, value=min(20, config.max_heldout_items), step=1,
                                                  label="Held-out questions")
                        zero = gr.Button("Run query zeroing", variant="primary")
                        zeroing_plot = gr.Image(label="Query-zeroing curve", type="filepath")
                        zeroing_summary = gr.JSON(label="Summary")
                        zeroing_files = gr.File(label="Download figure and data", file_count="multiple")
                    with gr.Tab("Compare", id="compare"):
                        cmp_models = gr.Dropdown(choices, value=distinct_models(service.choices),
                                                 multiselect=True, max_choices=config.max_compare_models,
                                                 label=f"Models (2-{config.max_compare_models})")
                        cmp_question = gr.Textbox(DEFAULT_QUESTION, label="Question")
                        run_compare = gr.Button("Compare", variant="primary")
                        cmp_table = gr.Markdown()
                        cmp_maps = gr.Gallery(label="Attention (last layer, head mean); compressors: their picture",
                                              columns=3, height=320, object_fit="contain")
                        cmp_data = gr.JSON(label="Comparison")
                        cmp_files = gr.File(label="Download figures and data", file_count="multiple")
        # API-only inputs and outputs (hidden): the chat history for stateless multi-turn calls, the answer text.
        with gr.Column(visible=False):
            api_history = gr.JSON([], label="history")
            api_answer = gr.Textbox(label="answer")
            api_details = gr.JSON(label="details")
            api_trigger = gr.Button("ask")

        sampling_inputs = [mode, num_frames, fps, max_frames]
        budget_inputs = [groups, queries, frame_tokens, active_fraction, strategy]
        generation_inputs = [do_sample, temperature, top_p, max_new_tokens, seed]
        checked_by_limits(*sampling_inputs, *budget_inputs, *generation_inputs, model, red_models, red_source,
                          strategies, seeds, max_items, fmt, dpi, layer, head, query, group, picture_frames, cmp_models)
        refusals_as_values(video)

        # ---- callbacks --------------------------------------------------------------------------------------
        # Each endpoint's raw values are parsed by one function (`app.limits`), which also runs as the event's
        # validator: an over-limit request is refused before it joins the queue. Model work runs through
        # `relay`, so a cancelled or disconnected request stops and frees the model slot.
        def sampling_of(mode, num_frames, fps, max_frames, most=None):
            return limits.sampling(mode, num_frames, max_frames, fps, most=most)

        def budget_of(groups, queries, frame_tokens, active_fraction, strategy):
            return limits.budget(groups, queries, frame_tokens, active_fraction, strategy)

        def generation_of(do_sample, temperature, top_p, max_new_tokens, seed):
            return limits.generation(max_new_tokens, do_sample, temperature, top_p, seed)

        def check_settings(model, mode, num_frames, fps, max_frames, groups, queries, frame_tokens,
                           active_fraction, strategy):
            service.models.resolve(model)
            sampling_of(mode, num_frames, fps, max_frames)
            budget_of(groups, queries, frame_tokens, active_fraction, strategy)

        def check_preview(video, model, *settings):
            check_settings(model, *settings)
            if video:
                service.check_video(video)

        def check_ask(session, video, question, model, mode, num_frames, fps, max_frames, groups, queries,
                      frame_tokens, active_fraction, strategy, do_sample, temperature, top_p, max_new_tokens, seed,
                      history=None):
            limits.question(question)
            limits.history(history)
            check_settings(model, mode, num_frames, fps, max_frames, groups, queries, frame_tokens, active_fraction,
                           strategy)
            generation_of(do_sample, temperature, top_p, max_new_tokens, seed)
            service.check_video(video)

        def check_chat(session, video, question, messages, model, *settings):
            check_ask(session, video, question, model, *settings)

        def check_attention(session, video, model, mode, num_frames, fps, max_frames, layer, head, query, group,
                            log_scale, fmt, dpi):
            service.models.resolve(model)
            sampling_of(mode, num_frames, fps, max_frames, config.max_attention_frames)
            limits.layer(layer)
            for value, what, name in ((head, "The head", "head"), (query, "The query", "query"),
                                      (group, "The group", "group")):
                limits.index(value, what, name)
            limits.figure(fmt, dpi)
            service.check_video(video)

        def check_picture(session, video, model, mode, num_frames, fps, max_frames, frames, fmt, dpi):
            service.models.resolve(model)
            limits.picture_frames(frames)
            sampling_of(mode, num_frames, fps, max_frames, config.max_attention_frames)
            limits.figure(fmt, dpi)
            service.check_video(video)

        def check_redundancy(session, video, question, models, source, fractions, strategies, seeds, max_items,
                             mode, num_frames, fps, max_frames, fmt, dpi):
            for name in limits.models(models or ["default"], config.max_redundancy_models, "to overlay"):
                service.models.resolve(name)
            limits.fractions(fractions)
            limits.strategies(strategies or [])
            limits.seeds(seeds)
            sampling_of(mode, num_frames, fps, max_frames)
            limits.figure(fmt, dpi)
            if source == "heldout":
                limits.heldout_items(max_items)
            else:
                limits.question(question)
                service.check_video(video)

        def check_compare(session, video, question, models, mode, num_frames, fps, max_frames, do_sample,
                          temperature, top_p, max_new_tokens, seed, fmt, dpi):
            for name in limits.models(models, config.max_compare_models, "to compare"):
                service.models.resolve(name)
            limits.question(question)
            sampling_of(mode, num_frames, fps, max_frames, config.max_attention_frames)
            generation_of(do_sample, temperature, top_p, max_new_tokens, seed)
            limits.figure(fmt, dpi)
            service.check_video(video)

        def preview(video: str | None, model: str, mode: str, num_frames: int, fps: float, max_frames: int,
                    groups: int, queries: int, frame_tokens: int, active_fraction: float, strategy: str):
            """Sampled frames with timestamps, and the visual-token count the LLM will receive."""
            if not video:
                return [], "Upload a video to see its frames and visual-token count."
            try:
                result = service.preview(video, model, sampling_of(mode, num_frames, fps, max_frames),
                                         budget_of(groups, queries, frame_tokens, active_fraction, strategy))
            except Exception as err:  # noqa: BLE001 - shown as one sentence
                raise user_error(err) from None
            return result.frames, result.summary

        def on_model(model: str):
            """Load the model (inside the model slot; progress shown) and adapt the resampler switch, budget
            controls and attention tab to it."""
            try:
                info = service.budget_info(model)
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
            query_update = gr.update(value=0, interactive=bool(info["queries"]), maximum=max(1, info["latents"]),
                                     label=f"Queries {info['queries_unit'] or ''} (0 = checkpoint's "
                                           f"{info['queries'] or '-'})")
            frame_update = gr.update(value=0, interactive=bool(info["frame_tokens"]),
                                     maximum=info["tokens_per_frame_in"],
                                     label=f"Tokens per frame (0 = checkpoint's {info['frame_tokens'] or '-'})")
            compressor = has_picture(info["connector"])
            return ((gr.update(value=short) if short else gr.skip()), status, group_update, query_update, frame_update,
                    gr.update(visible=not compressor), gr.update(visible=compressor))

        def on_resampler(resampler: str, model: str):
            """Switch to a model with this connector; when none is installed, say so and keep the current one."""
            picked = matching_model(service.choices, model, resampler)
            current = service.models.resolve(model).connector
            wanted = switch.get(resampler)
            if wanted is None:
                return gr.skip(), gr.skip()
            if picked == model and current != wanted.registry_name:
                hint = "; type its checkpoint folder to load one." if config.allow_custom_models else "."
                gr.Warning(f"No installed checkpoint uses {wanted.label} ({wanted.registry_name})" + hint)
                short = switch_name_of(current)
                return gr.skip(), (gr.update(value=short) if short else gr.skip())
            return gr.update(value=picked), gr.skip()

        def use_local_folder(folder: str):
            folder = (folder or "").strip()
            if not folder or not config.allow_custom_models:
                return gr.skip()
            if not (Path(folder).expanduser() / "config.json").is_file():
                gr.Warning(html.escape(f"'{Path(folder).name}' is not a checkpoint folder (it has no config.json).",
                                       quote=False))
                return gr.skip()
            return gr.update(value=str(Path(folder).expanduser()))

        def new_conversation(session):
            session = ensure_session(session)
            session.history.clear()
            return session, [], "", None

        def chat(session, video: str | None, question: str, messages: list, model: str, mode: str,
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
                settings = dict(sampling=sampling_of(mode, num_frames, fps, max_frames),
                                budget=budget_of(groups, queries, frame_tokens, active_fraction, strategy),
                                generation=generation_of(do_sample, temperature, top_p, max_new_tokens, seed))
                work = functools.partial(_ask_job, service, session, video, question, model, settings)
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

        def ask(session, video: str | None, question: str, model: str, mode: str, num_frames: int, fps: float,
                max_frames: int, groups: int, queries: int, frame_tokens: int, active_fraction: float, strategy: str,
                do_sample: bool, temperature: float, top_p: float, max_new_tokens: int, seed: int, history: list | None,
                progress=gr.Progress()):
            """Answer a question about a video, streamed. history: earlier [question, answer] pairs.
            Returns (answer so far, details with timings and memory once done)."""
            session = ensure_session(session)
            text = ""
            try:
                settings = dict(sampling=sampling_of(mode, num_frames, fps, max_frames),
                                budget=budget_of(groups, queries, frame_tokens, active_fraction, strategy),
                                generation=generation_of(do_sample, temperature, top_p, max_new_tokens, seed),
                                history=limits.history(history))
                work = functools.partial(_ask_job, service, session, video, question, model, settings)
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

        def attention(session, video: str | None, model: str, mode: str, num_frames: int, fps: float,
                      max_frames: int, layer: int, head: int, query: int, group: int, log_scale: bool, fmt: str,
                      dpi: int, progress=gr.Progress()):
            """Connector attention: heatmap, per-frame overlays, temporal profile, redundancy statistics, files."""
            session = ensure_session(session)
            try:
                fmt, dpi = limits.figure(fmt, dpi)
                settings = dict(model=model, layer=limits.layer(layer), head=limits.index(head, "The head", "head"),
                                query=limits.index(query, "The query", "query"),
                                group=limits.index(group, "The group", "group"), log_scale=bool(log_scale),
                                fmt=fmt, dpi=dpi,
                                sampling=sampling_of(mode, num_frames, fps, max_frames, config.max_attention_frames))
                out = None
                for out in relay(lambda job: service.attention(session, video, job=job, **settings),
                                 _progress(progress)):
                    if out is HEARTBEAT:
                        yield (gr.skip(),) * 7
            except Exception as err:  # noqa: BLE001
                raise user_error(err) from None
            im = out.images
            yield (session, str(im["heatmap"]), str(im["overlays"]), str(im["temporal"]),
                   str(im["redundancy_stats"]), out.data, [str(p) for p in out.downloads])

        def show_connector_picture(session, video: str | None, model: str, mode: str, num_frames: int, fps: float,
                                   max_frames: int, frames: int, fmt: str, dpi: int, progress=gr.Progress()):
            """What a per-frame compressor (llava_mini, pool, tome, topk) does to each frame: figure, numbers, files."""
            session = ensure_session(session)
            try:
                fmt, dpi = limits.figure(fmt, dpi)
                settings = dict(model=model, frames=frames, fmt=fmt, dpi=dpi,
                                sampling=sampling_of(mode, num_frames, fps, max_frames, config.max_attention_frames))
                out = None
                for out in relay(lambda job: service.picture(session, video, job=job, **settings),
                                 _progress(progress)):
                    if out is HEARTBEAT:
                        yield (gr.skip(),) * 4
            except Exception as err:  # noqa: BLE001
                raise user_error(err) from None
            yield session, str(out.images["picture"]), out.data, [str(p) for p in out.downloads]

        def redundancy(session, video: str | None, question: str, models: list[str], source: str, fractions: str,
                       strategies: list[str], seeds: int, max_items: int, mode: str, num_frames: int, fps: float,
                       max_frames: int, fmt: str, dpi: int, progress=gr.Progress()):
            """Query-zeroing curves (several connectors overlaid) on this video and question or the held-out set."""
            session = ensure_session(session)
            try:
                fmt, dpi = limits.figure(fmt, dpi)
                settings = dict(models=models, source=source, fractions=fractions, strategies=strategies,
                                seeds=seeds, max_items=max_items, fmt=fmt, dpi=dpi,
                                sampling=sampling_of(mode, num_frames, fps, max_frames))
                out = None
                for out in relay(lambda job: service.redundancy(session, video, question, job=job, **settings),
                                 _progress(progress)):
                    if out is HEARTBEAT:
                        yield (gr.skip(),) * 4
            except Exception as err:  # noqa: BLE001
                raise user_error(err) from None
            yield session, str(out.images["zeroing"]), out.data, [str(p) for p in out.downloads]

        def compare(session, video: str | None, question: str, models: list[str], mode: str, num_frames: int,
                    fps: float, max_frames: int, do_sample: bool, temperature: float, top_p: float,
                    max_new_tokens: int, seed: int, fmt: str, dpi: int, progress=gr.Progress()):
            """The same video and question through 1-3 models: answers, attention maps (compressors: their picture),
            token counts, timings."""
            session = ensure_session(session)
            try:
                fmt, dpi = limits.figure(fmt, dpi)
                settings = dict(models=models, fmt=fmt, dpi=dpi,
                                sampling=sampling_of(mode, num_frames, fps, max_frames, config.max_attention_frames),
                                generation=generation_of(do_sample, temperature, top_p, max_new_tokens, seed))
                out = None
                for out in relay(lambda job: service.compare(session, video, question, job=job, **settings),
                                 _progress(progress)):
                    if out is HEARTBEAT:
                        yield (gr.skip(),) * 5
            except Exception as err:  # noqa: BLE001
                raise user_error(err) from None
            yield (session, compare_table(out.data["rows"]), [(str(p), name) for name, p in out.images],
                   out.data, [str(p) for p in out.downloads])

        # ---- wiring -----------------------------------------------------------------------------------------
        preview_inputs = [video, model, *sampling_inputs, *budget_inputs]
        # while a slider moves, only the latest value is previewed (always_last)
        gr.on([c.change for c in (video, mode, num_frames, fps, max_frames, groups, queries, frame_tokens,
                                  active_fraction, strategy)],
              preview, preview_inputs, [strip, token_count], api_name="preview", show_progress="minimal",
              trigger_mode="always_last", validator=validator(preview, check_preview), **light)
        video.change(new_conversation, [session], [session, chatbot, timings, details], api_visibility="private",
                     queue=False)
        clear.click(new_conversation, [session], [session, chatbot, timings, details], api_visibility="private",
                    queue=False)
        # a new model: load it, reset the budget controls to its own, then preview (never with the old budget)
        model_outputs = [resampler, model_status, groups, queries, frame_tokens, attention_view, picture_view]
        model.change(on_model, [model], model_outputs, api_visibility="private",
                     **light).then(preview, preview_inputs, [strip, token_count], api_visibility="private",
                                   show_progress="minimal", **light)
        demo.load(on_model, [model], model_outputs, api_visibility="private", **light)
        local_folder.submit(use_local_folder, [local_folder], [model], api_visibility="private", queue=False)
        resampler.input(on_resampler, [resampler, model], [model, resampler], api_visibility="private", **light)
        chat_inputs = [session, video, question, chatbot, model, *sampling_inputs, *budget_inputs,
                       *generation_inputs]
        chat_outputs = [session, chatbot, question, timings, details]
        gr.on([send.click, question.submit], chat, chat_inputs, chat_outputs, api_visibility="private",
              show_progress="minimal", **heavy)  # the chat shows its own refusals in the conversation
        api_trigger.click(ask, [session, video, question, model, *sampling_inputs, *budget_inputs,
                                *generation_inputs, api_history], [session, api_answer, api_details],
                          api_name="ask", validator=validator(ask, check_ask), **heavy)
        attend.click(attention, [session, video, model, *sampling_inputs, layer, head, query, group, log_scale, fmt,
                                 dpi], [session, heatmap, overlays, temporal, stats_plot, stats, attention_files],
                     api_name="attention", validator=validator(attention, check_attention), **heavy)
        show_picture.click(show_connector_picture, [session, video, model, *sampling_inputs, picture_frames, fmt, dpi],
                           [session, picture, stats, attention_files], api_name="picture",
                           validator=validator(show_connector_picture, check_picture), **heavy)
        zero.click(redundancy, [session, video, red_question, red_models, red_source, fractions, strategies, seeds,
                                max_items, *sampling_inputs, fmt, dpi],
                   [session, zeroing_plot, zeroing_summary, zeroing_files], api_name="redundancy",
                   validator=validator(redundancy, check_redundancy), **heavy)
        run_compare.click(compare, [session, video, cmp_question, cmp_models, *sampling_inputs, *generation_inputs,
                                    fmt, dpi], [session, cmp_table, cmp_maps, cmp_data, cmp_files],
                          api_name="compare", validator=validator(compare, check_compare), **heavy)
    return demo


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
