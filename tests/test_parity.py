"""End to end against the reference's inference path, written separately in tests/reference_impl.py."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from tests.reference_impl import ref_answer_ids, ref_frames, ref_pixels, ref_prompt_ids
from tests.videos import make_moving_square_frames, write_video
from vidlmm.checkpoint import load_model
from vidlmm.conversation import tokenizer_image_token, build_prompt
from vidlmm.pipeline import GenerationSettings, VideoLMM
from vidlmm.preprocess import ImageProcessor, read_pixels
from vidlmm.video import FrameSampling, read_video

QUESTION = "What colour is the square, and where does it go?"


@pytest.mark.parametrize("name", ["group", "naive", "legacy"])
def test_greedy_ids_identical_to_reference(tiny_checkpoints, small_video, name):
    model = load_model(tiny_checkpoints[name])
    expected, ref_visual = ref_answer_ids(model, small_video, QUESTION, num_frames=16, max_new_tokens=24)
    lmm = VideoLMM(model, sampling=FrameSampling.uniform(16))
    prepared, _ = lmm.prepare(small_video)
    ours = lmm.visual_tokens(prepared).tokens
    assert (ours - ref_visual).abs().max().item() < 1e-5
    answer = lmm.ask(small_video, QUESTION, generation=GenerationSettings(max_new_tokens=24))
    assert answer.token_ids == expected
    assert len(set(expected)) > 3  # a real sequence, not one repeated token


def test_cli_json_gives_the_reference_ids(tiny_checkpoints, small_video):
    model = load_model(tiny_checkpoints["group"])
    expected, _ = ref_answer_ids(model, small_video, QUESTION, num_frames=16, max_new_tokens=12)
    out = subprocess.run([sys.executable, "-m", "vidlmm", "ask", "--model", str(tiny_checkpoints["group"]),
                          "--video", small_video, "--question", QUESTION, "--num-frames", "16",
                          "--max-new-tokens", "12", "--json"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    result = json.loads(out.stdout)
    assert result["token_ids"] == expected
    assert result["frame_indices"] == np.linspace(0, 29, 16, dtype=int).tolist()
    assert result["num_visual_tokens"] == 64
    assert set(result["timings"]) >= {"decode", "vision", "connector", "prefill", "generation"}


def test_prompt_ids_match_reference(tiny_checkpoints):
    tokenizer = load_model(tiny_checkpoints["group"]).tokenizer
    ours = tokenizer_image_token(build_prompt("qwen2_base", [(QUESTION, None)]), tokenizer)
    assert ours == ref_prompt_ids(QUESTION, tokenizer)


def test_preprocessing_equals_transformers_siglip_processor(small_video):
    frames, idx = ref_frames(small_video, 16)
    expected = ref_pixels(frames, 56)
    clip = read_video(small_video, FrameSampling.uniform(16))
    assert clip.indices.tolist() == idx.tolist()
    assert np.array_equal(clip.sampled_frames(), frames.astype(np.uint8))
    processor = ImageProcessor.for_tower("siglip", 56)
    ours = processor(clip.sampled_frames())
    assert ours.shape == expected.shape and torch.equal(ours, expected)
    # the pipeline's path: each frame resized to the tower's input as it is decoded, the same pixels
    _, pixels = read_pixels(small_video, FrameSampling.uniform(16), processor)
    assert torch.equal(pixels, expected)


def test_preprocessing_of_a_wide_frame_squashes(tmp_path):
    frame = np.zeros((1, 40, 160, 3), np.uint8)
    frame[0, :, 80:] = 255  # right half white
    pixels = ImageProcessor.for_tower("siglip", 56)(frame)
    assert pixels.shape == (1, 3, 56, 56)
    assert pixels[0, :, :, :26].max() < -0.9 and pixels[0, :, :, 30:].min() > 0.9  # no crop, no padding


def test_follow_up_question_reuses_vision_features(tiny_checkpoints, small_video, monkeypatch):
    model = load_model(tiny_checkpoints["group"])
    lmm = VideoLMM(model)
    calls = []
    original = model.encode_frames
    monkeypatch.setattr(model, "encode_frames", lambda px: calls.append(1) or original(px))
    first = lmm.ask(small_video, QUESTION, generation=GenerationSettings(max_new_tokens=6))
    second = lmm.ask(small_video, "And then?", history=[(QUESTION, first.text)],
                     generation=GenerationSettings(max_new_tokens=6))
    assert len(calls) == 1 and not first.cached_video and second.cached_video
    assert second.timings["decode"] == 0.0


def test_streaming_yields_pieces_then_the_same_answer(tiny_checkpoints, small_video):
    lmm = VideoLMM(load_model(tiny_checkpoints["naive"]))
    settings = GenerationSettings(max_new_tokens=16)
    items = list(lmm.stream(small_video, QUESTION, generation=settings))
    pieces, final = items[:-1], items[-1]
    assert all(isinstance(p, str) for p in pieces) and len(pieces) >= 1
    assert final.token_ids == lmm.ask(small_video, QUESTION, generation=settings).token_ids
    assert "".join(pieces).strip() == final.text


def test_batched_generation_equals_one_by_one(tiny_checkpoints, small_video, tmp_path):
    other = write_video(tmp_path / "other.mp4", make_moving_square_frames(12, 64, 64, seed=3), fps=4)
    lmm = VideoLMM(load_model(tiny_checkpoints["group"]))
    settings = GenerationSettings(max_new_tokens=10)
    questions = [QUESTION, "Is there anything moving?"]  # different lengths: left padding is exercised
    batch = lmm.ask_batch([small_video, other], questions, generation=settings)
    single = [lmm.ask(v, q, generation=settings) for v, q in zip([small_video, other], questions)]
    for b, s in zip(batch, single):
        assert b.token_ids == s.token_ids


def test_sampling_is_seeded(tiny_checkpoints, small_video):
    lmm = VideoLMM(load_model(tiny_checkpoints["group"]))
    settings = GenerationSettings(max_new_tokens=12, do_sample=True, temperature=1.5, top_p=0.95, seed=7)
    a = lmm.ask(small_video, QUESTION, generation=settings).token_ids
    b = lmm.ask(small_video, QUESTION, generation=settings).token_ids
    greedy = lmm.ask(small_video, QUESTION, generation=GenerationSettings(max_new_tokens=12)).token_ids
    assert a == b and a != greedy


def test_fps_mode_frames_follow_the_reference_formula(tiny_checkpoints, tmp_path):
    video = write_video(tmp_path / "long.mp4", make_moving_square_frames(95, 32, 32), fps=10)  # 9.5 s
    lmm = VideoLMM(load_model(tiny_checkpoints["group"]), sampling=FrameSampling.fps(64))
    answer = lmm.ask(video, QUESTION, generation=GenerationSettings(max_new_tokens=2))
    assert answer.frame_indices == np.linspace(0, 94, 9, dtype=int).tolist()
    assert answer.timestamps == pytest.approx([i / 10 for i in answer.frame_indices])
