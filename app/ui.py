"""The Gradio layout and its wiring: the input panel, the output tabs, and which event calls which of
`app.handlers.Handlers`.

Named API endpoints (every feature is one; see `API_NAMES`): preview, ask (streamed), attention, picture (what a
per-frame compressor does to each frame), llm_attention (where the language model looks), redundancy, compare.
They take plain values (a video file, strings, numbers) plus the caller's session, which gradio_client keeps per
Client, so a follow-up from the same client reuses its cached vision features.
"""

from __future__ import annotations

import functools
import html
import inspect
from pathlib import Path
from types import SimpleNamespace

import gradio as gr

from vidlmm.analysis import STRATEGIES

from .config import EXAMPLES_DIR, AppConfig
from visualizations.io import FIGURE_FORMATS
from .handlers import Handlers
from .limits import MAX_PICTURE_FRAMES, RefusedInput
from .models import distinct_models, has_picture, resampler_switch, switch_name_of
from .service import Service, one_sentence
from .session import close_session

API_NAMES = ("preview", "ask", "attention", "picture", "llm_attention", "redundancy", "compare")
VIDEO_TYPES = [".mp4", ".webm", ".mov", ".avi", ".mkv", ".gif"]
DEFAULT_QUESTION = "What happens in the video?"
CSS = """
#frame-strip .thumbnail-item { min-width: 72px; }
#token-count { font-size: 0.95em; }
"""


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


def example_videos(folder: Path = EXAMPLES_DIR) -> list[str]:
    if not folder.is_dir():
        return []
    return [str(p) for p in sorted(folder.iterdir()) if p.suffix.lower() in VIDEO_TYPES]


def build_ui(service: Service, config: AppConfig) -> gr.Blocks:
    config = service.config  # the resolved settings (custom models, hub models)
    # figures are drawn in job threads while Gradio switches matplotlib's backend around each event: pyplot's
    # first import must not race with that, so it happens here
    import matplotlib.pyplot  # noqa: F401

    # uploads and returned files in Gradio's cache are deleted once a session's files are an hour old
    with gr.Blocks(title="vidlmm: watch a video LMM's connector", analytics_enabled=config.analytics,
                   delete_cache=(900, config.session_ttl_s)) as demo:
        session = gr.State(None, time_to_live=config.session_ttl_s, delete_callback=close_session)
        gr.Markdown("## vidlmm · watch the connector of a video language model work\n"
                    "Upload a video, pick a resampler, frames and token budget, then chat, and look at what the "
                    "learned queries attend to. Every feature is also an API endpoint (see *Use via API* below).")
        with gr.Row():
            i = _input_panel(service, config)
            o = _output_tabs(service, config)
        _wire(demo, session, i, o, _api_components(), Handlers(service), config)
    return demo


def _input_panel(service: Service, config: AppConfig) -> SimpleNamespace:
    """The left column: video, model and resampler switch, frames, token budget, generation, downloads."""
    choices = [(c.label, c.value) for c in service.choices]
    default_choice = service.choices[0]
    switch = resampler_switch()
    default_resampler = switch_name_of(default_choice.connector) or "group"
    limit = config.max_frames
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
            fmt = gr.Radio(list(FIGURE_FORMATS), value="png", label="Figure format")
            dpi = gr.Slider(72, config.max_dpi, value=min(150, config.max_dpi), step=1, label="DPI")
    return SimpleNamespace(video=video, model=model, local_folder=local_folder, resampler=resampler,
                           model_status=model_status, mode=mode, num_frames=num_frames, fps=fps,
                           max_frames=max_frames, groups=groups, queries=queries, frame_tokens=frame_tokens,
                           active_fraction=active_fraction, strategy=strategy, do_sample=do_sample,
                           temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens, seed=seed, fmt=fmt,
                           dpi=dpi)


def _output_tabs(service: Service, config: AppConfig) -> SimpleNamespace:
    """The right column: the frame strip and token count, then the Chat, Attention, Redundancy and Compare tabs."""
    choices = [(c.label, c.value) for c in service.choices]
    default_choice = service.choices[0]
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
            with gr.Tab("Where the LLM looks", id="llm-attention", elem_id="llm-tab"):
                llm_question = gr.Textbox(DEFAULT_QUESTION, label="Question")
                with gr.Row():
                    trace = gr.Button("Answer and trace the language model's attention", variant="primary",
                                      elem_id="trace", scale=3)
                    # any value reaches the server, which checks it against the answer (one sentence)
                    llm_word = gr.Dropdown([("whole answer", -1)], value=-1, label="Word of the answer", scale=2,
                                           elem_id="llm-word", allow_custom_value=True)
                llm_frames = gr.Image(label="Frames each word rests on", type="filepath", elem_id="llm-frames")
                llm_patches = gr.Image(label="Patches (the picked word, or the whole answer)", type="filepath")
                llm_layers = gr.Image(label="Attention on the video per LLM layer", type="filepath")
                llm_data = gr.JSON(label="Per word: visual share per layer, frame relevance")
                llm_files = gr.File(label="Download figures and data", file_count="multiple")
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
    return SimpleNamespace(strip=strip, token_count=token_count, chatbot=chatbot, question=question, send=send,
                           clear=clear, timings=timings, details=details, layer=layer, head=head, query=query,
                           group=group, log_scale=log_scale, attend=attend, heatmap=heatmap, overlays=overlays,
                           temporal=temporal, stats_plot=stats_plot, picture_frames=picture_frames,
                           show_picture=show_picture, picture=picture, stats=stats, attention_files=attention_files,
                           red_models=red_models, red_source=red_source, red_question=red_question,
                           fractions=fractions, strategies=strategies, seeds=seeds, max_items=max_items, zero=zero,
                           zeroing_plot=zeroing_plot, zeroing_summary=zeroing_summary, zeroing_files=zeroing_files,
                           cmp_models=cmp_models, cmp_question=cmp_question, run_compare=run_compare,
                           cmp_table=cmp_table, cmp_maps=cmp_maps, cmp_data=cmp_data, cmp_files=cmp_files,
                           attention_view=attention_view, picture_view=picture_view, llm_question=llm_question,
                           trace=trace, llm_word=llm_word, llm_frames=llm_frames, llm_patches=llm_patches,
                           llm_layers=llm_layers, llm_data=llm_data, llm_files=llm_files)


def _api_components() -> SimpleNamespace:
    """API-only inputs and outputs (hidden): the chat history for stateless multi-turn calls, the answer text."""
    with gr.Column(visible=False):
        api_history = gr.JSON([], label="history")
        api_answer = gr.Textbox(label="answer")
        api_details = gr.JSON(label="details")
        api_trigger = gr.Button("ask")
    return SimpleNamespace(api_history=api_history, api_answer=api_answer, api_details=api_details,
                           api_trigger=api_trigger)


def _wire(demo: gr.Blocks, session, i: SimpleNamespace, o: SimpleNamespace, api: SimpleNamespace,
          h: Handlers, config: AppConfig) -> None:
    """Every event: which inputs go to which handler, where its outputs go, and the named endpoints."""
    heavy = dict(concurrency_id="model", concurrency_limit=config.concurrency)
    light = dict(concurrency_id="cpu", concurrency_limit=2)
    sampling_inputs = [i.mode, i.num_frames, i.fps, i.max_frames]
    budget_inputs = [i.groups, i.queries, i.frame_tokens, i.active_fraction, i.strategy]
    generation_inputs = [i.do_sample, i.temperature, i.top_p, i.max_new_tokens, i.seed]
    figure_inputs = [i.fmt, i.dpi]
    checked_by_limits(*sampling_inputs, *budget_inputs, *generation_inputs, *figure_inputs, i.model, o.red_models,
                      o.red_source, o.strategies, o.seeds, o.max_items, o.layer, o.head, o.query, o.group,
                      o.picture_frames, o.cmp_models)
    refusals_as_values(i.video)

    preview_inputs = [i.video, i.model, *sampling_inputs, *budget_inputs]
    preview_outputs = [o.strip, o.token_count]
    # while a slider moves, only the latest value is previewed (always_last)
    gr.on([c.change for c in (i.video, *sampling_inputs, *budget_inputs)], h.preview, preview_inputs, preview_outputs,
          api_name="preview", show_progress="minimal", trigger_mode="always_last",
          validator=validator(h.preview, h.check_preview), **light)
    conversation = [session, o.chatbot, o.timings, o.details]
    i.video.change(h.new_conversation, [session], conversation, api_visibility="private", queue=False)
    o.clear.click(h.new_conversation, [session], conversation, api_visibility="private", queue=False)
    # a new model: load it, reset the budget controls to its own, then preview (never with the old budget)
    model_outputs = [i.resampler, i.model_status, i.groups, i.queries, i.frame_tokens, o.attention_view,
                     o.picture_view]
    i.model.change(h.on_model, [i.model], model_outputs, api_visibility="private", **light).then(
        h.preview, preview_inputs, preview_outputs, api_visibility="private", show_progress="minimal", **light)
    demo.load(h.on_model, [i.model], model_outputs, api_visibility="private", **light)
    i.local_folder.submit(h.use_local_folder, [i.local_folder], [i.model], api_visibility="private", queue=False)
    i.resampler.input(h.on_resampler, [i.resampler, i.model], [i.model, i.resampler], api_visibility="private",
                      **light)
    settings = [*sampling_inputs, *budget_inputs, *generation_inputs]
    gr.on([o.send.click, o.question.submit], h.chat, [session, i.video, o.question, o.chatbot, i.model, *settings],
          [session, o.chatbot, o.question, o.timings, o.details], api_visibility="private", show_progress="minimal",
          **heavy)  # the chat shows its own refusals in the conversation
    api.api_trigger.click(h.ask, [session, i.video, o.question, i.model, *settings, api.api_history],
                          [session, api.api_answer, api.api_details], api_name="ask",
                          validator=validator(h.ask, h.check_ask), **heavy)
    o.attend.click(h.attention, [session, i.video, i.model, *sampling_inputs, o.layer, o.head, o.query, o.group,
                                 o.log_scale, *figure_inputs],
                   [session, o.heatmap, o.overlays, o.temporal, o.stats_plot, o.stats, o.attention_files],
                   api_name="attention", validator=validator(h.attention, h.check_attention), **heavy)
    o.show_picture.click(h.show_connector_picture, [session, i.video, i.model, *sampling_inputs, o.picture_frames,
                                                    *figure_inputs],
                         [session, o.picture, o.stats, o.attention_files], api_name="picture",
                         validator=validator(h.show_connector_picture, h.check_picture), **heavy)
    llm_inputs = [session, i.video, o.llm_question, o.llm_word, i.model, *sampling_inputs, *figure_inputs]
    llm_outputs = [session, o.llm_word, o.llm_frames, o.llm_patches, o.llm_layers, o.llm_data, o.llm_files]
    # a new trace starts from the whole answer; picking a word redraws from the session's trace
    o.trace.click(lambda: -1, None, o.llm_word, api_visibility="private", queue=False).then(
        h.llm_attention, llm_inputs, llm_outputs, api_name="llm_attention",
        validator=validator(h.llm_attention, h.check_llm_attention), **heavy)
    o.llm_word.input(h.llm_attention, llm_inputs, llm_outputs, api_visibility="private", **heavy)
    o.zero.click(h.redundancy, [session, i.video, o.red_question, o.red_models, o.red_source, o.fractions,
                                o.strategies, o.seeds, o.max_items, *sampling_inputs, *figure_inputs],
                 [session, o.zeroing_plot, o.zeroing_summary, o.zeroing_files], api_name="redundancy",
                 validator=validator(h.redundancy, h.check_redundancy), **heavy)
    o.run_compare.click(h.compare, [session, i.video, o.cmp_question, o.cmp_models, *sampling_inputs,
                                    *generation_inputs, *figure_inputs],
                        [session, o.cmp_table, o.cmp_maps, o.cmp_data, o.cmp_files], api_name="compare",
                        validator=validator(h.compare, h.check_compare), **heavy)
