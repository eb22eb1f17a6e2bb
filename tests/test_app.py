"""The Gradio app as its users and scripts see it: every named endpoint through gradio_client against a launched
app (tiny checkpoints, in-process, one server for the module), concurrent clients, bad uploads, limits, and
`python app.py` itself in a subprocess.

Contract under test: each feature is a named endpoint (preview, ask, attention, picture, redundancy, compare); a
user error comes back as one readable sentence and the app keeps answering; a client's cache and chat are its own.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.ports import free_port
from tests.videos import make_moving_square_frames, write_gif, write_video

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "What is moving in the video?"
MAX_DURATION_S = 5.0
MAX_PIXELS = 10_000  # above every test clip (96x72 at most), below a 128x96 "decode bomb"
MAX_NEW_TOKENS = 2048  # room for an answer long enough to cancel in the middle
FAST = dict(max_new_tokens=6)  # the tiny models answer nonsense; a few tokens show everything


@pytest.fixture(scope="module")
def models_dir(tiny_checkpoints, tmp_path_factory):
    """An embedded-models folder like assets/models: group, naive and image-level checkpoints, a Dynamic-VLM
    pooling one (16 tokens per video: 4 per frame at 4 frames) and a LLaVA-Mini one (4 queries per frame, one
    pre-fusion layer)."""
    from vidlmm.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("models")
    for name in ("group", "naive", "image"):
        (root / name).symlink_to(tiny_checkpoints[name], target_is_directory=True)
    write_tiny_checkpoint(root / "pool", "pool", seed=6, connector_options={"token_budget": 16})
    write_tiny_checkpoint(root / "llava_mini", "llava_mini", seed=7, num_queries=4, initializer_range=0.4,
                          connector_options={"prefusion_layers": 1})
    return root


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Four different short clips (sizes, lengths, containers), all under the duration limit."""
    root = tmp_path_factory.mktemp("app-videos")
    return {
        "a": write_video(root / "a.mp4", make_moving_square_frames(30, 72, 96, seed=0), fps=10),
        "b": write_video(root / "b.avi", make_moving_square_frames(24, 64, 64, seed=1), fps=8, fourcc="MJPG"),
        "c": write_video(root / "c.webm", make_moving_square_frames(40, 48, 80, seed=2), fps=10, fourcc="VP80"),
        "d": write_gif(root / "d.gif", make_moving_square_frames(12, 40, 40, seed=3), fps=6),
    }


@pytest.fixture(scope="module")
def heldout(videos, tmp_path_factory):
    """A two-question multiple-choice set (MVBench style) standing in for the embedded held-out set."""
    path = tmp_path_factory.mktemp("heldout") / "eval_mc.json"
    items = [{"video": videos["a"], "question": "What moves?", "options": ["A. a square", "B. a circle"],
              "answer": "A"},
             {"video": videos["b"], "question": "Which way?", "options": ["A. left", "B. right"], "answer": "B"}]
    path.write_text(json.dumps(items))
    return path


@pytest.fixture(scope="module")
def server(models_dir, tiny_checkpoints, heldout):
    from app import build_app, launch
    from app.config import AppConfig

    config = AppConfig(model=str(tiny_checkpoints["group"]), models_dir=str(models_dir), host="127.0.0.1",
                       port=free_port(), max_duration_s=MAX_DURATION_S, max_upload_mb=1, preload=False,
                       cache_mb=64, eval_set=str(heldout), max_video_pixels=MAX_PIXELS,
                       max_new_tokens=MAX_NEW_TOKENS)
    demo, service = build_app(config)
    launch(demo, config, prevent_thread_lock=True, quiet=True)
    try:
        yield f"http://127.0.0.1:{config.port}/", service
    finally:
        demo.close()


@pytest.fixture(scope="module")
def client(server):
    return Client(server[0], verbose=False)


def _assert_one_sentence(message: str):
    assert message and "\n" not in message and "Traceback" not in message, message


def refusal(call) -> str:
    """Run `call`, which must be refused, and return the refusal's one sentence: a validator's ValidationError
    (before the request is queued: '1 parameter(s) failed validation:\n- name: sentence') or the callback's
    AppError."""
    from gradio_client.exceptions import AppError, ValidationError

    with pytest.raises((AppError, ValidationError)) as info:
        call()
    message = str(info.value)
    if isinstance(info.value, ValidationError):
        header, *lines = message.splitlines()
        assert header == "1 parameter(s) failed validation:" and len(lines) == 1, message
        message = lines[0].split(": ", 1)[1]
    _assert_one_sentence(message)
    return message


# ---- endpoints ---------------------------------------------------------------------------------------------------
def test_every_feature_is_a_named_endpoint(client):
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/preview", "/ask", "/attention", "/picture", "/llm_attention", "/redundancy", "/compare"} <= names, names


def test_preview_shows_sampled_frames_and_token_count(client, videos):
    frames, summary = client.predict(video=handle_file(videos["a"]), num_frames=8, api_name="/preview")
    assert len(frames) == 8 and all(Path(f["image"]).is_file() for f in frames)
    assert frames[-1]["caption"].endswith("2.90 s")  # 3 s at 10 fps: the last frame is #29 at 2.9 s
    assert "**64 visual tokens**" in summary  # tiny group checkpoint: 4 groups x 16 queries
    _, summary = client.predict(video=handle_file(videos["a"]), num_frames=8, groups=2, queries=4,
                                active_fraction=0.5, api_name="/preview")
    assert "**8 visual tokens**" in summary and "**4 active**" in summary and "untrained" in summary


def test_concurrent_previews_of_one_video_all_read_whole_thumbnails(server, videos):
    """Sessions previewing the same video at once get the same pictures; Gradio wrote a returned image array in place
    under its content hash, and a second writer truncated the file while it was being sent (a client read 0 of 194
    bytes in the load test). The preview hands Gradio files written whole (app/thumbnails.py)."""
    def preview(k):
        client = Client(server[0], verbose=False)
        return [client.predict(video=handle_file(videos["a"]), num_frames=24, api_name="/preview")[0]
                for _ in range(3)]

    with ThreadPoolExecutor(6) as pool:
        runs = [f for batch in pool.map(preview, range(6)) for f in batch]
    assert len(runs) == 18 and all(len(frames) == 24 for frames in runs)
    first = [Path(f["image"]).read_bytes() for f in runs[0]]
    assert all([Path(f["image"]).read_bytes() for f in frames] == first for frames in runs)


def test_thumbnail_store_writes_each_picture_once_and_keeps_the_newest(tmp_path):
    import numpy as np
    from PIL import Image

    from app.thumbnails import ThumbnailStore

    store = ThumbnailStore(tmp_path, keep=8)
    pictures = [np.full((6, 8, 3), k * 20, np.uint8) for k in range(12)]
    first = store.paths([(pictures[0], "a"), (pictures[0], "b"), (pictures[1], "c")])
    assert first[0][0] == first[1][0] != first[2][0] and [c for _, c in first] == ["a", "b", "c"]
    assert (np.asarray(Image.open(first[2][0])) == pictures[1]).all()  # WebP of a flat picture is lossless enough
    for k in range(2, 12):
        time.sleep(0.01)  # distinct modification times
        store.paths([(pictures[k], str(k))])
    kept = sorted(p.name for p in tmp_path.iterdir())
    assert len(kept) == 8 - 2 and not any(name.endswith(".part") for name in kept)  # pruned to 3/4 of keep
    assert Path(store.path(pictures[11])).name in kept and Path(first[0][0]).name not in kept


def test_ask_streams_and_a_follow_up_reuses_the_cached_features(server, videos):
    client = Client(server[0], verbose=False)  # own session: a fresh cache
    job = client.submit(video=handle_file(videos["a"]), question=QUESTION, api_name="/ask", **FAST)
    answer, details = job.result()
    assert details["answer"] == answer and details["visual_tokens"] == 64 and details["frames"] == 16
    assert details["cached_video"] is False and details["timings_s"]["vision"] > 0
    assert {"decode", "vision", "connector", "prefill", "generation", "tokens_per_s"} <= set(details["timings_s"])
    assert details["memory"]["peak_rss_mb"] > 0
    streamed = [out[0] for out in job.outputs()]
    assert streamed and streamed[-1] == answer  # intermediate outputs, then the final answer
    follow, details2 = client.predict(video=handle_file(videos["a"]), question="And then?",
                                      history=[[QUESTION, answer]], api_name="/ask", **FAST)
    assert details2["cached_video"] is True and details2["timings_s"]["vision"] == 0
    assert details2["turn"] == 2


def test_ask_with_budget_and_resampler_choice(client, videos):
    _, details = client.predict(video=handle_file(videos["b"]), question=QUESTION, model="naive", num_frames=4,
                                active_fraction=0.25, strategy="contiguous", api_name="/ask", **FAST)
    assert details["connector"] == "naiveresampler" and details["frames"] == 4
    assert details["visual_tokens"] == 32 and details["active_tokens"] == 8
    _, details = client.predict(video=handle_file(videos["b"]), question=QUESTION, model="image", mode="fps",
                                fps=2.0, max_frames=5, api_name="/ask", **FAST)
    assert details["connector"] == "resampler" and details["frames"] == 5 and details["visual_tokens"] == 5 * 4


def test_attention_endpoint_returns_figures_and_data(client, videos):
    heatmap, overlays, temporal, stats_png, data, files = client.predict(
        video=handle_file(videos["a"]), num_frames=4, query=3, fmt="svg", dpi=80, api_name="/attention")
    for path in (heatmap, overlays, temporal, stats_png):
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    suffixes = sorted(Path(f).suffix for f in files)
    assert suffixes.count(".svg") == 4 and ".json" in suffixes and ".csv" in suffixes, suffixes
    assert data["queries"] == 64 and data["frames"] == 4 and data["connector"] == "groupresampler"
    assert 0 < data["summary"]["entropy_normalized_mean"] <= 1
    saved = json.loads(next(Path(f) for f in files if f.endswith("-attention.json")).read_text())
    assert saved["attention"]["num_frames"] == 4


def test_llm_attention_endpoint_traces_each_word_and_redraws_a_picked_one_from_the_session(server, videos):
    """The answer's words come back to pick from; picking one redraws from the session's trace (no second model
    run: the server's model slot is not taken again); a word the answer does not have is one sentence."""
    from gradio_client.exceptions import AppError

    client = Client(server[0], verbose=False)
    call = dict(video=handle_file(videos["a"]), question=QUESTION, num_frames=4, api_name="/llm_attention")
    words, frames, patches, layers, data, files = client.predict(token=-1, **call)
    for path in (frames, patches, layers):
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["tokens"] and data["frames"] == 4 and data["token"] is None
    for token in data["tokens"]:
        assert sum(token["frame_relevance"]) == pytest.approx(1.0) and len(token["visual_share"]) == 2
    assert any(f.endswith("-llm-attention.json") for f in files)
    slot, holds = server[1].slot, []
    original = slot.hold
    slot.hold = lambda *args, **kwargs: holds.append(1) or original(*args, **kwargs)
    try:
        _, _, patches_0, _, picked, _ = client.predict(token=0, **call)
    finally:
        slot.hold = original
    assert picked["token"] == 0 and picked["answer"] == data["answer"] and patches_0 != patches
    assert not holds  # redrawn from the trace kept in the session, the model never taken
    with pytest.raises(AppError, match=f"The answer has {len(data['tokens'])} tokens"):
        client.predict(token=len(data["tokens"]), **call)


def test_picture_endpoint_shows_what_a_compressor_does_to_each_frame(client, videos):
    from gradio_client.exceptions import AppError

    picture, data, files = client.predict(video=handle_file(videos["a"]), model="pool", num_frames=4, frames=2,
                                          fmt="svg", dpi=80, api_name="/picture")
    assert Path(picture).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert data["connector"] == "pool" and data["kind"] == "pooling_grid" and data["frames"] == 4
    assert data["tokens_per_frame_out"] == 4 and data["visual_tokens"] == 16  # budget 16 over 4 frames: 2 x 2 bins
    assert data["summary"]["tokens"] == 16
    assert sorted(Path(f).suffix for f in files) == [".json", ".svg"]
    saved = json.loads(next(Path(f) for f in files if f.endswith(".json")).read_text())
    assert saved["pool_size"] == 2 and saved["row_edges"] == [[0, 2], [2, 4]] and "frames" not in saved
    with pytest.raises(AppError) as info:  # a resampler keeps its attention heatmaps
        client.predict(video=handle_file(videos["a"]), model="group", num_frames=4, api_name="/picture")
    _assert_one_sentence(str(info.value))
    assert "'groupresampler' connector has no picture of its own" in str(info.value)


def test_tokens_per_frame_sets_a_compressors_budget(client, videos):
    from gradio_client.exceptions import AppError

    tokens = {}
    for frame_tokens in (0, 1, 9):
        _, details = client.predict(video=handle_file(videos["a"]), question=QUESTION, model="pool", num_frames=4,
                                    frame_tokens=frame_tokens, api_name="/ask", **FAST)
        assert details["connector"] == "pool" and details["budget"]["frame_tokens"] == (frame_tokens or None)
        tokens[frame_tokens] = details["visual_tokens"]
    assert tokens == {0: 16, 1: 4, 9: 36}  # the checkpoint's 4 per frame, then 1 and 9 (3 x 3 bins) per frame
    _, summary = client.predict(video=handle_file(videos["a"]), model="pool", num_frames=4, frame_tokens=5,
                                api_name="/preview")
    assert "**16 visual tokens**" in summary and "untrained" in summary  # 5 floored to a square: 4 per frame
    with pytest.raises(AppError, match="has no tokens per frame to set"):
        client.predict(video=handle_file(videos["a"]), question=QUESTION, frame_tokens=4, api_name="/ask", **FAST)


def test_llava_mini_answers_with_its_prompt_fused(client, videos, models_dir):
    """The app hands LLaVA-Mini's whole connector output to the LLM, so pre-fusion rewrites the prompt and the
    answer is the pipeline's own, token for token."""
    from vidlmm.checkpoint import load_model
    from vidlmm.pipeline import GenerationSettings, VideoLMM
    from vidlmm.video import FrameSampling

    lmm = VideoLMM(load_model(models_dir / "llava_mini"), sampling=FrameSampling.uniform(4), cache_bytes=0)
    generation = GenerationSettings(max_new_tokens=FAST["max_new_tokens"])
    expected = lmm.ask(videos["a"], QUESTION, generation=generation)
    prepared, _ = lmm.prepare(videos["a"])
    unfused = lmm.ask(prepared, QUESTION, generation=generation, visual=lmm.visual_tokens(prepared).tokens[0])
    assert unfused.token_ids != expected.token_ids  # without pre-fusion this model answers otherwise
    _, details = client.predict(video=handle_file(videos["a"]), question=QUESTION, model="llava_mini",
                                num_frames=4, api_name="/ask", **FAST)
    assert details["connector"] == "llava_mini" and details["visual_tokens"] == 16  # 4 frames x 4 queries
    assert details["token_ids"] == expected.token_ids


def test_zeroing_a_compressor_counts_whole_frames_in_preview_and_answer(client, videos):
    """A compressor's groups are its frames: the preview's active count is the one the answer gets."""
    setting = dict(video=handle_file(videos["a"]), model="pool", num_frames=4, active_fraction=0.6,
                   strategy="groups")
    _, summary = client.predict(api_name="/preview", **setting)
    _, details = client.predict(question=QUESTION, api_name="/ask", **setting, **FAST)
    assert details["visual_tokens"] == 16 and details["active_tokens"] == 8  # 2 of 4 frames, 4 tokens each
    assert "**16 visual tokens**" in summary and "**8 active**" in summary


def test_redundancy_curves_for_compressors(client, videos):
    plot, summary, files = client.predict(video=handle_file(videos["a"]), question=QUESTION,
                                          models=["pool", "llava_mini"], fractions="1, 0.6",
                                          strategies=["random", "groups"], seeds=1, num_frames=4,
                                          api_name="/redundancy")
    assert Path(plot).read_bytes()[:4] == b"\x89PNG"
    assert [(m["model"], m["connector"], m["tokens"]) for m in summary["models"]] == \
        [("pool", "pool", 16), ("llava_mini", "llava_mini", 16)]
    for curve in summary["models"]:
        kept = [round(p["active"] * 16) for p in curve["points"] if p["fraction"] == 0.6]
        assert kept == [10, 8], curve  # random: 10 of the 16 tokens; groups: whole frames, 2 of the 4
    saved = json.loads(next(Path(f) for f in files if f.endswith(".json")).read_text())
    # the 100 % point scores exactly the model's own answer, LLaVA-Mini's fused prompt included
    assert [r["reference"]["teacher_forced_reproduces_answer"] for r in saved["results"]] == [True, True]


def test_redundancy_endpoint_overlays_connectors(client, videos):
    plot, summary, files = client.predict(video=handle_file(videos["a"]), question=QUESTION,
                                          models=["group", "naive"], fractions="1, 0.5", strategies=["random"],
                                          seeds=1, num_frames=4, api_name="/redundancy")
    assert Path(plot).read_bytes()[:4] == b"\x89PNG"
    assert [m["model"] for m in summary["models"]] == ["group", "naive"]
    full = summary["models"][0]["points"][0]
    assert full["fraction"] == 1.0 and full["relative_likelihood_mean"] == pytest.approx(1.0)
    assert sorted(Path(f).suffix for f in files) == [".csv", ".json", ".png"]


def test_redundancy_on_the_held_out_set(client):
    _, summary, _ = client.predict(video=None, source="heldout", models=["group"], fractions="1, 0.25",
                                   strategies=["groups"], seeds=1, num_frames=4, max_items=2,
                                   api_name="/redundancy")
    curve = summary["models"][0]
    assert curve["kind"] == "mc" and [p["fraction"] for p in curve["points"]] == [1.0, 0.25]
    assert curve["points"][0]["relative_accuracy_mean"] in (1.0, None)  # None: the full model got none right


def test_compare_endpoint_runs_three_connectors(client, videos):
    table, maps, data, files = client.predict(video=handle_file(videos["a"]), question=QUESTION,
                                              models=["group", "naive", "image"], num_frames=4,
                                              api_name="/compare", **FAST)
    rows = data["rows"]
    assert [r["connector"] for r in rows] == ["groupresampler", "naiveresampler", "resampler"]
    assert [r["visual_tokens"] for r in rows] == [64, 32, 16]  # image-level: 4 frames x 4 queries
    assert all("prefill_s" in r and "tokens_per_s" in r for r in rows)
    assert len(maps) == 3 + 1 and len(table.strip().splitlines()) == 2 + 3 + 1 + 3  # numbers, blank, answers
    assert maps[-1]["caption"].startswith("where each language model looks")  # the three side by side
    assert all(0 < r["llm_visual_share"] < 1 for r in rows)
    assert any(f.endswith(".csv") for f in files)


def test_compare_shows_a_compressors_picture_beside_a_resamplers_attention(client, videos):
    _, shown, data, files = client.predict(video=handle_file(videos["a"]), question=QUESTION,
                                           models=["group", "pool", "llava_mini"], num_frames=4,
                                           api_name="/compare", **FAST)
    assert [(r["connector"], r["visual_tokens"]) for r in data["rows"]] == \
        [("groupresampler", 64), ("pool", 16), ("llava_mini", 16)]
    assert [m["caption"] for m in shown][:3] == ["group (groupresampler)", "pool (pool)", "llava_mini (llava_mini)"]
    assert all(Path(m["image"]).read_bytes()[:4] == b"\x89PNG" for m in shown)
    figures = sorted(Path(f).name for f in files if f.endswith(".png"))
    assert figures == ["compare-1-group-heatmap.png", "compare-2-pool-picture.png",
                       "compare-3-llava_mini-picture.png", "compare-a-llm-visual-share.png"], figures


# ---- several users at once -----------------------------------------------------------------------------------
def test_four_clients_at_once_each_get_their_own_answer(server, videos, tiny_checkpoints):
    from vidlmm.checkpoint import load_model
    from vidlmm.pipeline import GenerationSettings, VideoLMM
    from vidlmm.video import FrameSampling

    lmm = VideoLMM(load_model(tiny_checkpoints["group"]), sampling=FrameSampling.uniform(16), cache_bytes=0)
    expected = {k: lmm.ask(v, QUESTION, generation=GenerationSettings(max_new_tokens=6)).to_json()
                for k, v in videos.items()}

    def user(name):
        c = Client(server[0], verbose=False)
        return name, c.predict(video=handle_file(videos[name]), question=QUESTION, api_name="/ask", **FAST)

    with ThreadPoolExecutor(4) as pool:
        results = dict(pool.map(user, list(videos)))
    for name, (answer, details) in results.items():
        assert answer == expected[name]["answer"], name
        assert details["frame_indices"] == expected[name]["frame_indices"], name
        assert details["cached_video"] is False, name  # nobody sees another session's cache


# ---- bad input -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bad_uploads(videos, tmp_path_factory):
    root = tmp_path_factory.mktemp("bad")
    (root / "notes.mp4").write_text("This is a text file, not a video.\n" * 20)
    data = Path(videos["a"]).read_bytes()
    (root / "cut.mp4").write_bytes(data[: len(data) // 3])
    (root / "zero.mp4").write_bytes(b"")
    return {"text": root / "notes.mp4", "truncated": root / "cut.mp4", "empty": root / "zero.mp4"}


def test_bad_uploads_give_one_readable_sentence_and_the_app_keeps_answering(client, bad_uploads, videos):
    reasons = {"text": "text file", "truncated": "damaged or incomplete", "empty": "empty"}
    for kind, path in bad_uploads.items():
        for endpoint in ("/ask", "/preview"):
            args = dict(question=QUESTION, **FAST) if endpoint == "/ask" else {}
            message = refusal(lambda: client.predict(video=handle_file(str(path)), api_name=endpoint, **args))
            assert f"Cannot read video '{path.name}'" in message and reasons[kind] in message, message
    answer, details = client.predict(video=handle_file(videos["a"]), question=QUESTION, api_name="/ask", **FAST)
    assert details["answer"] == answer


def test_limits_and_bad_settings_are_sentences(client, videos, tmp_path):
    long_clip = write_video(tmp_path / "long.mp4", make_moving_square_frames(60, 32, 32), fps=10)  # 6 s > 5 s
    cases = [
        (dict(video=handle_file(long_clip), question=QUESTION), "longer than the 5 s limit"),
        (dict(video=handle_file(long_clip), question=" "), "Type a question"),
        (dict(video=None, question=QUESTION), "Upload a video"),
        (dict(video=handle_file(videos["a"]), question=QUESTION, model="no/such-model"), "Model 'no/such-model'"),
        (dict(video=handle_file(videos["a"]), question=QUESTION, model="naive", groups=2), "has no groups"),
        (dict(video=handle_file(videos["a"]), question=QUESTION, history=[["one"]]), "history must be a list"),
        (dict(video=handle_file(videos["a"]), question=QUESTION, num_frames=0), "Frames must be between 1 and 128 (got 0)"),
    ]
    for kwargs, expected in cases:
        message = refusal(lambda: client.predict(api_name="/ask", **kwargs, **FAST))
        assert expected in message, (expected, message)
    big = tmp_path / "big.mp4"
    big.write_bytes(os.urandom(1024 * 1024 + 4096))  # over the 1 MiB upload limit of this server
    # gradio_client reads the limit from the server's config and does not send the file
    with pytest.raises(ValueError, match=r"big\.mp4 exceeds the maximum file size of 1048576 bytes"):
        client.predict(video=handle_file(str(big)), question=QUESTION, api_name="/ask", **FAST)
    # a client that sends it anyway is refused by the server, with one sentence naming the limit
    import httpx

    with open(big, "rb") as f:
        sent = httpx.post(client.upload_url, files=[("files", ("big.mp4", f))], timeout=30)
    assert (sent.status_code, sent.text) == (413, "File size exceeded maximum allowed size of 1048576 bytes.")
    small = Path(videos["a"])  # under the limit: the same upload goes through
    with open(small, "rb") as f:
        sent = httpx.post(client.upload_url, files=[("files", (small.name, f))], timeout=30)
    assert sent.status_code == 200 and len(sent.json()) == 1


# ---- every limit, on the server, at once ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bomb(tmp_path_factory):
    """A clip whose frames are over this server's pixel limit (a 4K frame would be, over a real server's)."""
    return write_video(tmp_path_factory.mktemp("bomb") / "bomb.mp4", make_moving_square_frames(2, 96, 128), fps=10)


def limit_cases(videos, bomb):
    a = handle_file(videos["a"])
    over = 2001 * "x"
    return [  # (endpoint, arguments, words of the sentence that names the limit)
        ("/ask", dict(video=a, question=over), "2,001 characters long, over the limit of 2,000"),
        ("/ask", dict(video=a, question=QUESTION, history=[["q", "a"]] * 17), "17 turns, over the limit of 16"),
        ("/ask", dict(video=a, question=QUESTION, history=[["q" * 9000, "a" * 9000]]),
         "18,000 characters long, over the limit of 16,000"),
        ("/ask", dict(video=a, question=QUESTION, max_new_tokens=2049), "Max new tokens must be between 1 and 2048"),
        ("/ask", dict(video=a, question=QUESTION, num_frames=129), "Frames must be between 1 and 128"),
        ("/ask", dict(video=a, question=QUESTION, mode="fps", max_frames=1000), "Max frames must be between 1 and 128"),
        ("/ask", dict(video=a, question=QUESTION, mode="fps", fps=1e9), "Frames per second must be between"),
        ("/ask", dict(video=a, question=QUESTION, seed=-7), "The seed must be between 0 and"),
        ("/ask", dict(video=a, question=QUESTION, queries=10**9), "Queries must be between 0 and"),
        ("/ask", dict(video=a, question=QUESTION, active_fraction=3), "active fraction must be above 0"),
        ("/ask", dict(video=a, question=QUESTION, strategy="bogus"), "Unknown zeroing strategy 'bogus'"),
        ("/ask", dict(video=handle_file(bomb), question=QUESTION), "over the 0.0-megapixel limit"),
        ("/preview", dict(video=handle_file(bomb)), "its frames are 128x96"),
        ("/attention", dict(video=a, num_frames=33), "Frames must be between 1 and 32"),
        ("/attention", dict(video=a, dpi=5000), "DPI must be between 50 and 300"),
        ("/attention", dict(video=a, fmt="bmp"), "Unknown figure format 'bmp'"),
        ("/attention", dict(video=a, layer=10**9), "The layer must be between"),
        ("/picture", dict(video=a, model="pool", frames=17), "Frames shown must be between 1 and 16"),
        ("/redundancy", dict(video=a, question=QUESTION, fractions=", ".join(f"{k / 20:g}" for k in range(1, 14))),
         "13 active fractions asked, over the limit of 12"),
        ("/redundancy", dict(video=a, question=QUESTION, fractions="1, 2"), "Fraction 2 is not in (0, 1]"),
        ("/redundancy", dict(video=a, question=QUESTION, seeds=6), "Seeds must be between 1 and 5"),
        ("/redundancy", dict(video=a, question=QUESTION, strategies=["random", "sideways"]),
         "Unknown zeroing strategy 'sideways'"),
        ("/redundancy", dict(video=a, question=QUESTION, models=["group", "naive", "image", "pool", "llava_mini"]),
         "Pick one to 4 different models to overlay (got 5)"),
        ("/redundancy", dict(video=a, question=QUESTION, source="heldout", max_items=201),
         "Held-out questions must be between 1 and 200"),
        ("/compare", dict(video=a, question=QUESTION, models=["group", "naive", "image", "pool"]),
         "Pick one to 3 different models to compare (got 4)"),
        ("/compare", dict(video=a, question=over, models=["group"]), "over the limit of 2,000"),
    ]


def test_every_limit_is_refused_at_once_with_a_sentence_that_names_it(server, videos, bomb, chatty):
    """Each limit holds on the server, whatever the client sends, and is refused before the request is queued:
    here, while another client's long answer holds the model."""
    client = Client(server[0], verbose=False)
    busy = Client(server[0], verbose=False).submit(video=handle_file(videos["b"]), question=QUESTION, model=chatty,
                                                   max_new_tokens=2000, api_name="/ask")
    assert wait_until(lambda: server[1].slot.holders() == 1, 30) is not None
    try:
        for endpoint, kwargs, words in limit_cases(videos, bomb):
            start = time.perf_counter()
            message = refusal(lambda: client.predict(api_name=endpoint, **kwargs))
            took = time.perf_counter() - start
            assert words in message, (endpoint, words, message)
            assert took < 1.0, (endpoint, words, took)
    finally:
        busy.cancel()


def test_an_answer_that_cannot_fit_the_context_is_refused_before_generating(client, videos, tiny_checkpoints,
                                                                          tmp_path):
    import shutil

    folder = tmp_path / "short-context"  # the group model with a 256-token window (this server allows folders)
    shutil.copytree(tiny_checkpoints["group"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "tokenizer_model_max_length": 256}))
    message = refusal(lambda: client.predict(video=handle_file(videos["a"]), question=QUESTION, model=str(folder),
                                             max_new_tokens=512, api_name="/ask"))
    assert "and 512 new tokens do not fit the model's context of 256 tokens" in message, message
    answer, details = client.predict(video=handle_file(videos["a"]), question=QUESTION, model=str(folder),
                                     max_new_tokens=60, api_name="/ask")  # 174 with the video + 60 fit in 256
    assert details["answer"] == answer and 1 <= len(details["token_ids"]) <= 60


def wait_until(condition, timeout: float, step: float = 0.02) -> float | None:
    """Seconds until condition() held (None if it never did within timeout)."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        if condition():
            return time.perf_counter() - start
        time.sleep(step)
    return None


@pytest.fixture(scope="module")
def chatty(tiny_checkpoints, tmp_path_factory):
    """The tiny group model with an end-of-sequence token it never writes: every answer takes all its new tokens
    (2000 take several seconds), so a job can be cancelled in the middle."""
    import shutil

    folder = tmp_path_factory.mktemp("chatty") / "chatty"
    shutil.copytree(tiny_checkpoints["group"], folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "eos_token_id": config["text_config"]["vocab_size"] - 1}))
    return str(folder)


@pytest.mark.parametrize("endpoint", ["/ask", "/redundancy", "/compare"])
def test_a_cancelled_job_frees_the_model_within_a_second(server, videos, chatty, endpoint):
    """Each of these runs for several seconds when left alone (the answers: 2000 new tokens; the curves: 200 masks
    on three models); cancelled in the middle, the model is free for the next request within a second."""
    url, service = server
    client = Client(url, verbose=False)
    long = {"/ask": dict(question=QUESTION, model=chatty, max_new_tokens=2000),
            "/redundancy": dict(question=QUESTION, fractions="1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1",
                                strategies=["random", "even", "groups", "contiguous"], seeds=5,
                                models=["group", "naive", "image"]),
            "/compare": dict(question=QUESTION, models=[chatty, "naive", "image"], max_new_tokens=2000)}[endpoint]
    job = client.submit(video=handle_file(videos["c"]), api_name=endpoint, **long)
    assert wait_until(lambda: service.slot.holders() == 1, 30) is not None, "the job never started"
    time.sleep(0.5)  # well inside the work
    assert not job.done()
    job.cancel()
    freed = wait_until(lambda: service.slot.holders() == 0, 5)
    assert freed is not None and freed < 1.0, freed
    # the next request gets the model and its answer
    answer, details = client.predict(video=handle_file(videos["a"]), question=QUESTION, api_name="/ask", **FAST)
    assert details["answer"] == answer


def test_a_model_over_the_memory_budget_is_refused_before_it_is_read(tiny_checkpoints, monkeypatch):
    from app.models import ModelPool, discover_models
    from vidlmm.errors import CheckpointError

    def no_loading(*args, **kwargs):
        raise AssertionError("load_model ran")

    monkeypatch.setattr("vidlmm.checkpoint.load_model", no_loading)
    choices = discover_models("no-such-folder", str(tiny_checkpoints["group"]), True, hub=False)
    pool = ModelPool(choices, max_bytes=1000, allow_custom=False)
    with pytest.raises(CheckpointError) as info:
        pool.get("default")
    message = str(info.value)
    _assert_one_sentence(message)
    assert message.startswith("Model 'group' needs ") and "over this app's model memory of" in message, message
    assert pool.loaded_names() == []


def test_the_pool_keeps_the_loaded_weights_within_its_bytes(tiny_checkpoints):
    from app.models import ModelPool, discover_models
    from vidlmm.checkpoint import check_checkpoint_fits

    one = check_checkpoint_fits(tiny_checkpoints["group"]).weight_bytes
    choices = discover_models("no-such-folder", str(tiny_checkpoints["group"]), True, hub=False)
    pool = ModelPool(choices, max_bytes=int(1.5 * one), allow_custom=True)
    pool.get("default")
    pool.get(str(tiny_checkpoints["naive"]))  # a second one does not fit beside the first: the first goes
    assert pool.loaded_names() == [str(tiny_checkpoints["naive"])] and pool.loaded_bytes <= 1.5 * one


def test_the_pool_picks_a_precision_that_fits_its_bytes(tiny_checkpoints, monkeypatch):
    """Treated as a big model with fp32 the fastest, the checkpoint loads in fp32 when the pool has room for it
    and in int8 when only int8's weights fit the pool, though the machine has room for fp32."""
    from app.models import ModelPool, discover_models
    from vidlmm import precision
    from vidlmm.checkpoint import check_checkpoint_fits

    monkeypatch.setattr(precision, "TINY_WEIGHT_BYTES", 0)
    monkeypatch.setattr(precision, "cpu_linear_gflops", lambda: {"fp32": 100.0, "bf16": 10.0, "int8": 20.0})
    fp32 = check_checkpoint_fits(tiny_checkpoints["group"], dtype="fp32").weight_bytes
    int8 = check_checkpoint_fits(tiny_checkpoints["group"], quantization="int8").weight_bytes
    assert int8 < fp32
    choices = discover_models("no-such-folder", str(tiny_checkpoints["group"]), True, hub=False)
    for budget, expected in ((fp32, "fp32"), ((fp32 + int8) // 2, "int8")):
        loaded = ModelPool(choices, max_bytes=budget, allow_custom=False).get("default")
        assert loaded.precision["name"] == expected and loaded.weight_bytes <= budget, (budget, loaded.precision)


def test_custom_and_hub_models_only_on_loopback_unless_asked(monkeypatch):
    from app.config import load_config

    monkeypatch.delenv("SPACE_ID", raising=False)
    for host, expected in (("127.0.0.1", True), ("localhost", True), ("::1", True), ("0.0.0.0", False),
                           ("192.168.1.20", False)):
        config = load_config(["--host", host])
        assert (config.allow_custom_models, config.hub_models) == (expected, expected), host
    config = load_config(["--host", "0.0.0.0", "--allow-custom-models", "--hub-models"])
    assert config.allow_custom_models and config.hub_models
    assert load_config(["--no-allow-custom-models"]).allow_custom_models is False


def test_errors_shown_to_visitors_never_include_server_paths():
    from app.service import one_sentence

    err = OSError(2, "No such file or directory", "/srv/app/cache/7f3a/clip.mp4")
    assert "/srv" not in one_sentence(err) and "clip.mp4" in one_sentence(err)
    assert one_sentence(ValueError("bad shard /home/me/ckpt/model.safetensors here")) == \
        "bad shard model.safetensors here"


# ---- pieces without the server -------------------------------------------------------------------------------
def test_budget_view_leaves_the_shared_connector_untouched(tiny_checkpoints):
    import torch

    from vidlmm.budget import TokenBudget, token_counts
    from vidlmm.checkpoint import load_model

    model = load_model(tiny_checkpoints["group"])
    module = model.connector
    before = (module.group, module.queries_per_group, module.latents.shape[0])
    view = TokenBudget(groups=2, queries=3).connector(module, 16 * 15)
    assert view.num_output_tokens(16, 15) == 6
    assert (module.group, module.queries_per_group, module.latents.shape[0]) == before
    # a real module of the connector's class, sharing its weights (nothing copied)
    assert type(view) is type(module) and view.linear is module.linear and view.layers is module.layers
    assert view.latents.data_ptr() == module.latents.data_ptr() and not module.latents.requires_grad
    features = torch.randn(4, model.vision_tower.tokens_per_frame, model.config.vision_hidden_size)
    out = model.connect(features, budget=TokenBudget(groups=2, queries=3, active_fraction=0.5, strategy="groups"))
    active = out.num_active()
    assert out.tokens.shape[1] == 6 and active == 3
    assert int((out.tokens[0].abs().sum(-1) == 0).sum()) == 3  # one of the two groups zeroed
    assert token_counts(module, TokenBudget(groups=2, queries=3, active_fraction=0.5, strategy="groups"), 4,
                        model.vision_tower.tokens_per_frame) == (6, 3)
    full = model.connect(features, budget=TokenBudget())
    assert torch.equal(full.tokens, model.connect(features).tokens)  # no budget: exactly the model's own output
    with pytest.raises(ValueError, match="Queries must be between 1 and 16"):
        TokenBudget(queries=17).connector(module)


def test_tokens_per_frame_view_leaves_the_shared_compressor_untouched(models_dir):
    from vidlmm.budget import TokenBudget
    from vidlmm.checkpoint import load_model

    module = load_model(models_dir / "pool").connector
    view = TokenBudget(frame_tokens=9).connector(module)
    assert view.num_output_tokens(4, 15) == 36 and module.num_output_tokens(4, 15) == 16
    assert module.frame_tokens is None and module.budget_controls().frame_tokens == "16 // frames"
    assert view.projector is module.projector
    with pytest.raises(ValueError, match="at least 1"):
        TokenBudget(frame_tokens=-1).connector(module)


def test_config_from_command_line_and_environment(monkeypatch):
    from app.config import load_config

    monkeypatch.setenv("VIDLMM_PORT", "9001")
    monkeypatch.setenv("VIDLMM_MAX_DURATION_S", "30")
    monkeypatch.setenv("VIDLMM_SHARE", "0")
    monkeypatch.delenv("SPACE_ID", raising=False)
    config = load_config(["--port", "9002", "--models-dir", "somewhere", "--no-preload"])
    assert (config.port, config.max_duration_s, config.models_dir, config.preload) == (9002, 30.0, "somewhere", False)
    assert config.share is False and config.analytics is False and config.host == "127.0.0.1"
    monkeypatch.setenv("SPACE_ID", "user/space")
    config = load_config([])
    assert config.allow_custom_models is False and config.host == "0.0.0.0" and config.port == 9001


def test_resampler_switch_picks_the_matching_checkpoint(server):
    from app.models import matching_model

    choices = server[1].choices
    assert matching_model(choices, "default", "naive") == "naive"
    assert matching_model(choices, "naive", "image") == "image"
    assert matching_model(choices, "Zhang199/TinyLLaVA-Video-Qwen2.5-3B-Group-16-512", "naive") == \
        "Zhang199/TinyLLaVA-Video-Qwen2.5-3B-Naive-16-512"


def test_resampler_switch_offers_the_related_work_compressors(server):
    from app.models import matching_model, resampler_switch
    from vidlmm.connectors import CONNECTORS

    switch = resampler_switch()
    RESAMPLERS = {k: cls.registry_name for k, cls in switch.items()}
    RESAMPLER_LABELS = {k: cls.label for k, cls in switch.items()}
    assert set(RESAMPLERS.values()) <= set(CONNECTORS) and set(RESAMPLER_LABELS) == set(RESAMPLERS)
    assert {"group", "naive", "image", "llava_mini", "pool", "tome", "topk"} <= set(RESAMPLERS)
    assert [RESAMPLER_LABELS[k] for k in ("llava_mini", "pool", "tome", "topk")] == \
        ["LLaVA-Mini", "Dynamic-VLM pooling", "ToMe merging (reimplementation)", "top-k pruning"]
    choices = server[1].choices
    assert matching_model(choices, "group", "pool") == "pool"
    assert matching_model(choices, "pool", "llava_mini") == "llava_mini"
    assert matching_model(choices, "llava_mini", "group") == "group"
    # no published checkpoint has a compressor: from a hub model, the embedded one
    assert matching_model(choices, "Zhang199/TinyLLaVA-Video-Qwen2.5-3B-Group-16-512", "pool") == "pool"
    assert matching_model(choices, "group", "tome") == "group"  # none installed: stay (the UI says why)


def test_python_app_py_serves(models_dir, tiny_checkpoints, tmp_path):
    """The real entry point: options from the environment, ready to serve, no share link, no analytics."""
    port = free_port()
    env = dict(os.environ, VIDLMM_MODEL=str(tiny_checkpoints["group"]), VIDLMM_MODELS_DIR=str(models_dir),
               VIDLMM_PORT=str(port), PYTHONPATH=str(ROOT))
    env.pop("GRADIO_ANALYTICS_ENABLED", None)  # the app must turn analytics off by itself
    start = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "app.py", "--host", "127.0.0.1"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ready = None
        while time.perf_counter() - start < 120 and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/info", timeout=2) as r:
                    info = json.loads(r.read())
                ready = time.perf_counter() - start
                break
            except OSError:
                time.sleep(0.25)
        assert ready is not None, proc.stdout.read() if proc.poll() is not None else "not ready in 120 s"
        print(f"python app.py ready to serve in {ready:.1f} s")
        assert "/ask" in info["named_endpoints"]
    finally:
        proc.terminate()
        out, _ = proc.communicate(timeout=30)
    assert "gradio.live" not in out and "Traceback" not in out, out


EMBEDDED = Path(__file__).resolve().parent.parent / "assets" / "models"


@pytest.mark.skipif(not (EMBEDDED / "group" / "config.json").is_file(), reason="no embedded models in assets/")
def test_embedded_default_answers_and_explains_through_every_endpoint():
    """The app as `python app.py` starts it: no --model, the embedded models folder, the shipped held-out set."""
    from app import build_app, launch
    from app.config import AppConfig

    example = str(EMBEDDED.parent / "examples" / "world_eval_00000.mp4")
    config = AppConfig(host="127.0.0.1", port=free_port(), preload=False)
    demo, _ = build_app(config)
    launch(demo, config, prevent_thread_lock=True, quiet=True)
    try:
        client = Client(f"http://127.0.0.1:{config.port}/", verbose=False)
        answer, details = client.predict(video=handle_file(example), question="What shape is the red object?",
                                         api_name="/ask", **FAST)
        assert answer.strip() and details["connector"] == "groupresampler" and details["visual_tokens"] == 64
        heatmap, *_, data, files = client.predict(video=handle_file(example), num_frames=16, api_name="/attention")
        assert Path(heatmap).is_file() and data["queries"] == 64 and data["frames"] == 16
        _, summary, _ = client.predict(video=handle_file(example), question="Describe the video.",
                                       models=["group", "naive"], fractions="1, 0.5", strategies=["random"], seeds=1,
                                       num_frames=16, api_name="/redundancy")
        assert [m["model"] for m in summary["models"]] == ["group", "naive"]
        _, maps, data, _ = client.predict(video=handle_file(example), question="What happens first?",
                                          models=["group", "naive", "image"], api_name="/compare", **FAST)
        assert [r["connector"] for r in data["rows"]] == ["groupresampler", "naiveresampler", "resampler"]
        assert [r["visual_tokens"] for r in data["rows"]] == [64, 64, 64]  # image-level: 16 frames x 4
    finally:
        demo.close()
