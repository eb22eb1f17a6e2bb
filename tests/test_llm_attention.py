"""Where the language model looks (`vidlmm.analysis.llm_attention`, issue 22), on tiny models: the hooked, reduced
attention equals the full attention tensors transformers returns; every row sums to 1 over the prompt's parts; the
relevance carried through each connector equals a brute-force computation; the image-level resampler's frame
relevance is the LLM's attention on each frame's query block; a group's frames are reached only through its
queries; each compressor's sources rebuild its output tokens from the input patches."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidlmm.analysis.llm_attention import PARTS, llm_attention
from vidlmm.checkpoint import load_model
from vidlmm.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vidlmm.pipeline import GenerationSettings, VideoLMM
from vidlmm.video import FrameSampling

FOUR = FrameSampling.uniform(4)
QUESTION = "What moves?"


def lmm_for(path) -> VideoLMM:
    return VideoLMM(load_model(path, dtype="fp32", device="cpu"), sampling=FOUR, cache_bytes=0)


def full_attentions(lmm, video, result):
    """Every layer's whole [H, S, S] attention for prompt + answer, from transformers' own eager output."""
    model = lmm.model
    prepared = lmm.prepare(video)[0]
    out = lmm.visual_tokens(prepared)
    prompt = lmm.prompt_ids(QUESTION)
    labels = [IGNORE_INDEX] * len(prompt) + result.token_ids
    embeds, mask, _ = model.build_inputs([prompt + result.token_ids], [out], [labels])
    lm = model.language_model
    before = lm.config._attn_implementation
    lm.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            att = model(embeds, mask, output_attentions=True).attentions
    finally:
        lm.set_attn_implementation(before)
    return [a[0].numpy() for a in att], prompt.index(IMAGE_TOKEN_INDEX), len(prompt) - 1 + out.tokens.shape[1]


def rollout(out) -> np.ndarray:
    """The resampler's sources by loops over queries, from the raw per-head attention."""
    groups = out.query_groups.numpy()
    r = None
    for layer in out.attentions:
        media = layer.media[0].mean(0).numpy().astype(np.float64)
        lat = layer.latents[0].mean(0).numpy().astype(np.float64)
        new = np.zeros_like(media)
        for q in range(media.shape[0]):
            new[q] = media[q]
            if r is not None:
                new[q] += r[q]
                mates = [m for m in range(len(groups)) if groups[m] == groups[q]]
                for j, m in enumerate(mates[:lat.shape[1]]):
                    new[q] += lat[q, j] * r[m]
            new[q] /= new[q].sum()
        r = new
    return r


@pytest.mark.parametrize("name", ["group", "naive", "image"])
def test_reduced_attention_equals_the_full_tensors_and_relevance_the_brute_force(name, tiny_checkpoints,
                                                                                 small_video):
    lmm = lmm_for(tiny_checkpoints[name])
    result = llm_attention(lmm, small_video, QUESTION, max_new_tokens=5)
    assert result.teacher_forced_reproduces_answer and result.token_ids
    att, slot, prompt_len = full_attentions(lmm, small_video, result)
    a, q = len(result.token_ids), result.sources.shape[0]
    assert result.visual.shape == (a, len(att), att[0].shape[0], q)
    for layer, full in enumerate(att):
        rows = full[:, prompt_len - 1:prompt_len - 1 + a]  # [H, A, S]
        np.testing.assert_allclose(result.visual[:, layer], rows[..., slot:slot + q].transpose(1, 0, 2), atol=1e-6)
        np.testing.assert_allclose(result.shares[:, layer, :, PARTS.index("answer")],
                                   rows[..., prompt_len:].sum(-1).T, atol=1e-6)
        text = rows[..., :slot].sum(-1) + rows[..., slot + q:prompt_len].sum(-1)  # system, instruction, question
        np.testing.assert_allclose(result.shares[:, layer, :, PARTS.index("text")], text.T, atol=1e-6)
    np.testing.assert_allclose(result.shares.sum(-1), 1.0, atol=1e-5)  # a row over text + visual + answer
    out = lmm.visual_tokens(lmm.prepare(small_video)[0], output_attentions=True)
    np.testing.assert_allclose(result.sources, rollout(out), atol=1e-5)
    # the whole answer's relevance by hand: attention mass on each visual token, over every layer and head
    mass = sum(full[:, prompt_len - 1:prompt_len - 1 + a, slot:slot + q].sum((0, 1)) for full in att)
    per_input = (mass / mass.sum()) @ rollout(out)
    frames = per_input.reshape(4, -1).sum(1)
    np.testing.assert_allclose(result.frame_relevance(), frames, atol=1e-5)
    assert result.frame_relevance().sum() == pytest.approx(1.0) and result.frame_relevance(token=0).sum() == \
        pytest.approx(1.0)
    assert np.nansum(result.patch_relevance()) == pytest.approx(1.0)


def test_the_sessions_collapsed_trace_draws_the_same_numbers(tiny_checkpoints, small_video):
    result = llm_attention(lmm_for(tiny_checkpoints["naive"]), small_video, QUESTION, max_new_tokens=4)
    small = result.collapse_heads()
    assert small.visual.shape[2] == 1 and small.to_json()["llm_heads"] == result.shares.shape[2]
    np.testing.assert_allclose(small.visual_share(), result.visual_share(), atol=1e-6)
    for token in (None, 0):
        np.testing.assert_allclose(small.frame_relevance(token=token), result.frame_relevance(token=token), atol=1e-6)
    assert result.tokens and not any(t.strip() == "<|endoftext|>" for t in result.tokens)  # EOS is not a word


def test_image_level_frame_relevance_is_the_attention_on_each_frames_queries(tiny_checkpoints, small_video):
    result = llm_attention(lmm_for(tiny_checkpoints["image"]), small_video, QUESTION, max_new_tokens=4)
    per_frame_queries = result.sources.shape[0] // 4
    for token in range(len(result.token_ids)):
        mass = result.visual[token].sum((0, 1)).reshape(4, per_frame_queries).sum(1)
        np.testing.assert_allclose(result.frame_relevance(token=token), mass / mass.sum(), atol=1e-6)


def test_a_group_reaches_only_its_own_frames(tiny_checkpoints, small_video):
    lmm = lmm_for(tiny_checkpoints["group"])
    out = lmm.visual_tokens(lmm.prepare(small_video)[0], output_attentions=True)
    layout = lmm.model.token_layout(4)
    sources = lmm.model.connector.token_sources(out, layout).numpy()
    frame_of = layout.frame.numpy()
    for g, (start, end) in enumerate(out.group_spans):
        queries = (out.query_groups == g).numpy()
        outside = np.ones(sources.shape[1], dtype=bool)
        outside[start:end] = False
        assert sources[np.ix_(queries, outside)].max() == 0.0  # exactly: nothing from other groups' frames
        assert set(frame_of[start:end]) == set(frame_of[sources[queries].sum(0) > 0])


@pytest.mark.parametrize("name", ["pool", "tome", "topk", "mlp2x_gelu"])
def test_compressor_sources_rebuild_the_output_from_the_patches(name, tmp_path, small_video):
    """Pooling bins, ToMe's merges and top-k's picks are exact: the projector of sources @ patches is the output."""
    from vidlmm.tiny import write_tiny_checkpoint

    lmm = lmm_for(write_tiny_checkpoint(tmp_path / name, name, seed=7))
    prepared = lmm.prepare(small_video)[0]
    out = lmm.visual_tokens(prepared, output_attentions=True)
    connector = lmm.model.connector
    sources = connector.token_sources(out, lmm.model.token_layout(4))
    np.testing.assert_allclose(sources.sum(-1).numpy(), 1.0, atol=1e-6)
    patches = prepared.features.reshape(-1, prepared.features.shape[-1]).float()  # [T * P, Dv], frame-major
    projector = connector.projector if name != "mlp2x_gelu" else (lambda x: connector(x[None, None])["tokens"][0])
    rebuilt = projector(sources @ patches)
    np.testing.assert_allclose(rebuilt.detach().numpy(), out.tokens[0].detach().numpy(), atol=1e-4)


def test_llava_minis_sources_are_its_compression_attention(tmp_path, small_video):
    from vidlmm.tiny import write_tiny_checkpoint

    lmm = lmm_for(write_tiny_checkpoint(tmp_path / "mini", "llava_mini", seed=8, num_queries=4))
    result = llm_attention(lmm, small_video, QUESTION, max_new_tokens=3)
    out = lmm.visual_tokens(lmm.prepare(small_video)[0], output_attentions=True)
    np.testing.assert_allclose(result.sources, out.attentions[0].media[0].mean(0).numpy(), atol=1e-6)
    assert result.teacher_forced_reproduces_answer


def test_the_command_writes_the_json_the_figures_and_the_tables(tiny_checkpoints, small_video, tmp_path):
    import json

    from visualizations.__main__ import main

    out = tmp_path / "out"
    assert main(["llm-attention", "--model", str(tiny_checkpoints["group"]), "--model", str(tiny_checkpoints["image"]),
                 "--video", small_video, "--question", QUESTION, "--num-frames", "4", "--max-new-tokens", "3",
                 "--token", "0", "--out", str(out)]) == 0
    data = json.loads((out / "group_llm_attention.json").read_text())
    assert data["tokens"] and data["teacher_forced_reproduces_answer"]
    for token in data["tokens"]:
        assert len(token["visual_share"]) == data["llm_layers"] and len(token["frame_relevance"]) == 4
        assert sum(token["frame_relevance"]) == pytest.approx(1.0) and sum(token["parts"].values()) == \
            pytest.approx(1.0)
    patches = np.load(out / "group_llm_attention_patches.npz")
    assert patches["tokens"].shape[:2] == (len(data["tokens"]), 4) and np.nansum(patches["answer"]) == \
        pytest.approx(1.0, abs=1e-5)
    for name in ("llm_visual_share.png", "group_llm_frame_relevance.png", "group_llm_patches.png",
                 "group_llm_patches_token0.png", "image_llm_patches.png", "group_llm_attention.csv",
                 "group_llm_frame_relevance.csv"):
        assert (out / name).stat().st_size > 0, name
    assert main(["llm-attention", "--model", str(tiny_checkpoints["group"]), "--video", small_video,
                 "--max-new-tokens", "2", "--token", "9", "--out", str(out)]) == 2  # no such token: one sentence


# ---- knockout guided by the LLM's attention -------------------------------------------------------------------
def test_attention_strategies_zero_the_most_or_least_attended_tokens_first():
    from vidlmm.analysis import zero_mask
    from vidlmm.errors import VidlmmError

    scores = np.array([0.1, 0.4, 0.05, 0.3, 0.15])
    assert zero_mask(5, 0.4, "most_attended", scores=scores).tolist() == [True, False, True, False, False]
    assert zero_mask(5, 0.4, "least_attended", scores=scores).tolist() == [False, True, False, True, False]
    assert zero_mask(5, 1.0, "most_attended", scores=scores).all()
    with pytest.raises(VidlmmError, match="needs the language model's attention"):
        zero_mask(5, 0.5, "most_attended")


def test_knockout_on_a_question_set_follows_each_answer_and_scores_the_margin(tiny_checkpoints, small_video):
    """Per question, the attention strategies rank the tokens by the LLM's attention while it wrote that answer;
    with margin the full point's margin is the plain likelihood scoring's."""
    from vidlmm.analysis import zero_mask, zeroed_output, zeroing_mc_records
    from vidlmm.evaluate import MCItem, build_mc_question, option_loglikelihoods, options_loglikelihoods

    lmm = lmm_for(tiny_checkpoints["group"])
    items = [MCItem("0", small_video, "Where does the square go?", ["left", "right", "up"], list("ABC"), "B"),
             MCItem("1", small_video, "What colour is it?", ["white", "red"], list("AB"), "A")]
    records, missing = zeroing_mc_records(lmm, items, fractions=(1.0, 0.5), strategies=("most_attended",
                                                                                         "least_attended"),
                                          seeds=(0,), max_new_tokens=3, margin=True)
    assert not missing and len(records) == 2
    prepared = lmm.prepare(small_video)[0]
    for item, record in zip(items, records):
        full = {tuple(p[:3]): p for p in record.points}
        ll = option_loglikelihoods(lmm, prepared, item)
        right = item.letters.index(item.answer_letter)
        want = ll[right] - max(v for j, v in enumerate(ll) if j != right)
        assert full[("most_attended", 1.0, 0)][6] == pytest.approx(want, abs=1e-4)
        question = build_mc_question(item, "mvbench")
        answer = lmm.ask(prepared, question, generation=GenerationSettings(max_new_tokens=3))
        scores = llm_attention(lmm, prepared, question, answer_ids=answer.token_ids).token_relevance()
        mask = zero_mask(len(scores), 0.5, "most_attended", scores=scores)
        assert full[("most_attended", 0.5, 0)][5] == mask.sum() and record.tokens == len(scores)
        # the margin at 50 % is the one of exactly this mask: the ranking is the answer's attention
        ll = options_loglikelihoods(lmm, item, [zeroed_output(lmm.visual_tokens(prepared), mask)])[0]
        assert full[("most_attended", 0.5, 0)][6] == pytest.approx(
            ll[right] - max(v for j, v in enumerate(ll) if j != right), abs=1e-4)


def test_knockout_on_one_video_keeps_the_full_answer_at_100_percent(tiny_checkpoints, small_video):
    from vidlmm.analysis import zeroing_curve

    lmm = lmm_for(tiny_checkpoints["naive"])
    curve = zeroing_curve(lmm, small_video, QUESTION, fractions=(1.0, 0.25), strategies=("most_attended",
                                                                                           "least_attended"),
                          seeds=(0,), max_new_tokens=4)
    by = {(p["strategy"], p["fraction"]): p for p in curve.points}
    assert by[("most_attended", 1.0)]["delta_log_likelihood"] == 0.0
    assert by[("most_attended", 0.25)]["kept_tokens"] == by[("least_attended", 0.25)]["kept_tokens"] == 8


def test_the_command_on_a_question_set_gives_the_visual_share_per_layer(tiny_checkpoints, small_video, tmp_path):
    import json
    from pathlib import Path

    from visualizations.__main__ import main

    data = tmp_path / "mc.json"
    data.write_text(json.dumps([
        {"video": Path(small_video).name, "question": "Where?", "options": ["A. left", "B. right"], "answer": "B"},
        {"video": Path(small_video).name, "question": "Which?", "options": ["A. one", "B. two"], "answer": "A"},
        {"video": "gone.mp4", "question": "Which?", "options": ["A. one", "B. two"], "answer": "A"}]))
    out = tmp_path / "set"
    assert main(["llm-attention", "--model", str(tiny_checkpoints["group"]), "--model", str(tiny_checkpoints["naive"]),
                 "--mc", str(data), "--video-root", str(Path(small_video).parent), "--num-frames", "4",
                 "--max-new-tokens", "2", "--out", str(out)]) == 0
    summary = json.loads((out / "llm_visual_share.json").read_text())
    assert set(summary) == {"group", "naive"}
    for entry in summary.values():
        assert entry["n"] == 2 and len(entry["visual_share_mean"]) == 2  # the tiny LLM has 2 layers
        assert all(0 < v < 1 for v in entry["visual_share_mean"]) and sum(entry["parts"].values()) == \
            pytest.approx(1.0)
        assert [m["video"] for m in entry["missing"]] == ["gone.mp4"]
    assert (out / "llm_visual_share.png").stat().st_size > 0 and (out / "llm_visual_share.csv").is_file()
