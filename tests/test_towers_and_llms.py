"""Other vision towers (CLIP, DINOv2), feature strategies, and other LLM families (Phi, Gemma)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from vidlmm.checkpoint import load_model
from vidlmm.pipeline import GenerationSettings, VideoLMM
from vidlmm.preprocess import ImageProcessor
from vidlmm.tiny import write_tiny_checkpoint


@pytest.mark.parametrize("tower,llm,strategy,tokens", [
    ("clip", "qwen2", "patch", 16),        # CLIP: class token dropped, 16 patches left
    ("clip", "qwen2", "cls_patch", 17),
    ("dinov2", "qwen2", "patch", 16),
    ("siglip", "qwen2", "cls_patch", 16),  # SigLIP has no class token: keeps the whole 4x4 grid
    ("siglip", "phi", "patch", 15),
    ("siglip", "gemma", "patch", 15),
])
def test_build_save_load_and_answer(tmp_path, small_video, tower, llm, strategy, tokens):
    folder = write_tiny_checkpoint(tmp_path / f"{tower}-{llm}", "groupresampler", num_queries=16, group=4,
                                   tower=tower, llm=llm, select_strategy=strategy, initializer_range=0.3)
    model = load_model(folder)
    assert model.vision_tower.tokens_per_frame == tokens
    features = model.encode_frames(torch.randn(3, 3, 56, 56))
    assert features.shape == (3, tokens, 32)
    layout = model.token_layout(3)
    if strategy == "cls_patch" and tower != "siglip":
        assert layout.row[0].item() == -1  # the class token has no cell
    assert (layout.row >= 0).sum().item() == 3 * min(tokens, 16)
    answer = VideoLMM(model).ask(small_video, "What moves?", generation=GenerationSettings(max_new_tokens=4))
    assert answer.num_visual_tokens == 16 and 1 <= len(answer.token_ids) <= 4


def test_phi_keeps_an_untied_lm_head(tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "phi", "naiveresampler", num_queries=8, llm="phi")
    from vidlmm.checkpoint import read_state_dict

    assert "language_model.lm_head.weight" in read_state_dict(folder)
    model = load_model(folder)
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() != lm.get_input_embeddings().weight.data_ptr()


def _pil_processor(kind, size):
    if kind == "clip":
        from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as P

        return P(size={"shortest_edge": size}, crop_size={"height": size, "width": size}, resample=3)
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil as P

    return P(size={"shortest_edge": round(size * 256 / 224)}, crop_size={"height": size, "width": size}, resample=3,
             image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_convert_rgb=True)


@pytest.mark.parametrize("kind", ["clip", "dinov2"])
@pytest.mark.parametrize("shape", [(90, 120), (121, 70)])
def test_clip_and_dinov2_preprocessing_follow_their_processors(kind, shape):
    frames = np.random.default_rng(0).integers(0, 256, size=(2, *shape, 3), dtype=np.uint8)
    ours = ImageProcessor.for_tower(kind, 56)(frames)
    try:
        processor = _pil_processor(kind, 56)
    except ImportError as err:
        pytest.skip(f"transformers has no PIL processor here: {err}")
    theirs = torch.as_tensor(np.asarray(processor(list(frames), return_tensors="np")["pixel_values"]))
    assert ours.shape == theirs.shape == (2, 3, 56, 56)
    assert (ours - theirs).abs().max().item() < 1e-5


@pytest.mark.parametrize("tower", ["siglip", "clip", "dinov2"])
@pytest.mark.parametrize("feature_layer", [-2, -1, -3, 1, 0])
def test_tower_stops_at_its_feature_layer_with_the_same_features(tower, feature_layer):
    """The tower's early exit gives exactly `hidden_states[feature_layer]` and runs no layer after it."""
    from vidlmm.tiny import tiny_vision_config
    from vidlmm.vision import VisionTower

    torch.manual_seed(0)
    config = tiny_vision_config(tower)
    vt = VisionTower(config, tower_type=tower, feature_layer=feature_layer, select_strategy="cls_patch").eval()
    pixels = torch.randn(3, 3, 56, 56)
    with torch.no_grad():
        full = vt._vision_tower(pixel_values=pixels, output_hidden_states=True).hidden_states
        layers = vt._encoder_layers()
        ran = []
        hooks = [layer.register_forward_hook(lambda m, a, o, k=k: ran.append(k)) for k, layer in enumerate(layers)]
        ours = vt(pixels)
        for h in hooks:
            h.remove()
    assert len(layers) >= 2
    torch.testing.assert_close(ours, full[feature_layer], rtol=0, atol=0)
    index = feature_layer % (len(layers) + 1)
    if index:  # only the layers up to the feature layer ran
        assert ran == list(range(index))


@pytest.mark.parametrize("tower", ["siglip", "clip", "dinov2"])
def test_tower_runs_long_clips_in_token_bounded_chunks_with_the_same_features(tower):
    """Frames go through the tower about CHUNK_TOKENS tokens at a time (bounded activations); a frame's features
    do not depend on the chunk it went through."""
    from vidlmm.tiny import tiny_vision_config
    from vidlmm.vision import CHUNK_TOKENS, VisionTower

    torch.manual_seed(0)
    vt = VisionTower(tiny_vision_config(tower), tower_type=tower).eval()
    per_chunk = vt.chunk_frames()
    assert per_chunk == CHUNK_TOKENS // vt.sequence_length and per_chunk * vt.sequence_length <= CHUNK_TOKENS
    assert vt.sequence_length == vt.tokens_per_frame + 1  # "patch" drops one token of the sequence
    frames = per_chunk + 3
    pixels = torch.randn(frames, 3, 56, 56)
    passes = []
    hook = vt._encoder_layers()[0].register_forward_hook(lambda m, a, o: passes.append(a[0].shape[0]))
    with torch.no_grad():
        chunked = vt(pixels)
        one_pass = vt(pixels, chunk_frames=frames)
        singles = vt(pixels, chunk_frames=1)
    hook.remove()
    assert passes[:2] == [per_chunk, 3] and passes[2] == frames and len(passes) == 3 + frames
    torch.testing.assert_close(chunked, one_pass, rtol=0, atol=1e-5)
    torch.testing.assert_close(singles, one_pass, rtol=0, atol=1e-5)


def test_so400m_runs_five_frames_per_tower_pass():
    """SigLIP-so400m at 384 px: 729 tokens a frame, 5 frames (3645 tokens) per pass (built on the meta device)."""
    from accelerate import init_empty_weights

    from vidlmm.vision import VisionTower

    config = dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, num_hidden_layers=27,
                  num_attention_heads=16, image_size=384, patch_size=14)
    with init_empty_weights():
        vt = VisionTower(config, tower_type="siglip")
    assert (vt.sequence_length, vt.tokens_per_frame, vt.chunk_frames()) == (729, 728, 5)
