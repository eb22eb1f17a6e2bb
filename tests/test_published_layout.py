"""A checkpoint in the published layout written by the test itself, never by vidlmm.

Every other checkpoint in the suite is written by `vidlmm.checkpoint.save_model`, so a mistake made the same way
in saving and loading (a key renamed, the tower's `vision_model.` level, the tied lm_head, a config field read
wrongly) cannot show there. Here the files are built directly from the spec's key names and shapes
(shared/spec/reference-tinyllava-video.md §1.5, §3 and §11): hand-made tensors from a seeded generator, stored in
bfloat16 like the hub files, three safetensors shards with their index, config.json written as a dict, the tied
lm_head absent, and a tokenizer folder in the hub's file layout trained with the `tokenizers` library.

Then vidlmm's `load_model` must put every stored tensor into the module it names, value for value, and its
answers must equal those of the reference path in tests/reference_impl.py on its own minimal loader (plain
safetensors reads into transformers' Qwen2ForCausalLM and SiglipVisionModel), for one video, for a batch, and in
fps mode with frame counts that cut the groups unevenly.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from tests.reference_impl import ref_fps_num_frames, ref_generate, ref_load_published
from tests.videos import make_moving_square_frames, write_video
from vidlmm.checkpoint import load_model
from vidlmm.pipeline import GenerationSettings, VideoLMM
from vidlmm.video import FrameSampling

EOS = "<|endoftext|>"
D, DV = 32, 16                  # LLM width (also the connector's), SigLIP width
IMAGE, PATCH = 42, 14           # a 3 x 3 patch grid: 9 tokens a frame, 8 after the reference drops token 0
TOKENS_PER_FRAME = (IMAGE // PATCH) ** 2 - 1
LLM_LAYERS, TOWER_LAYERS, RESAMPLER_LAYERS = 2, 3, 2
NUM_QUERIES, GROUP = 24, 3      # 8 shared latents per group
INNER = 8 * 64                  # the reference Perceiver's fixed 8 heads x 64
QUESTION = "What colour is the square, and where does it go?"

CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "USER: What colour is the square, and where does it go? ASSISTANT: The square is white and it moves right.",
    "USER: Is there anything moving? ASSISTANT: Yes, a square slides from the left to the right.",
    "The background is dark blue. The square is white. It goes to the right side of the frame.",
    "Where does the ball go? It rolls across the table and stops at the edge.",
]


def write_hub_tokenizer(folder: Path) -> int:
    """A byte-level BPE trained on CORPUS with the `tokenizers` library, saved as the hub folders are (vocab.json,
    merges.txt, tokenizer_config.json naming Qwen2Tokenizer, special_tokens_map.json, added_tokens.json) with
    <|endoftext|> after the BPE vocabulary as eos and pad. Returns the vocabulary size including it."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=330, min_frequency=2, special_tokens=[], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer=trainer)
    tok.model.save(str(folder))  # vocab.json + merges.txt
    eos_id = tok.get_vocab_size()
    eos_entry = {"content": EOS, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                 "special": True}
    files = {
        "tokenizer_config.json": {"added_tokens_decoder": {str(eos_id): eos_entry}, "bos_token": None,
                                  "clean_up_tokenization_spaces": False, "eos_token": EOS, "errors": "replace",
                                  "model_max_length": 3072, "pad_token": EOS, "padding_side": "right",
                                  "split_special_tokens": False, "tokenizer_class": "Qwen2Tokenizer",
                                  "tokenizer_use_fast": False, "unk_token": None},
        "special_tokens_map.json": {"eos_token": EOS, "pad_token": EOS},
        "added_tokens.json": {EOS: eos_id},
    }
    for name, data in files.items():
        (folder / name).write_text(json.dumps(data, indent=2))
    return eos_id + 1


def published_shapes(vocab: int) -> dict[str, tuple[int, ...]]:
    """Every key the published files hold for this geometry, with its shape (spec §1.5 and §3)."""
    shapes: dict[str, tuple[int, ...]] = {}
    kv = 2 * (D // 4)  # Qwen2: 4 query heads, 2 key/value heads
    lm = "language_model.model."
    shapes[lm + "embed_tokens.weight"] = (vocab, D)
    for i in range(LLM_LAYERS):
        p = f"{lm}layers.{i}."
        for proj, rows in (("q_proj", D), ("k_proj", kv), ("v_proj", kv)):
            shapes |= {p + f"self_attn.{proj}.weight": (rows, D), p + f"self_attn.{proj}.bias": (rows,)}
        shapes |= {p + "self_attn.o_proj.weight": (D, D), p + "mlp.gate_proj.weight": (2 * D, D),
                   p + "mlp.up_proj.weight": (2 * D, D), p + "mlp.down_proj.weight": (D, 2 * D),
                   p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,)}
    shapes[lm + "norm.weight"] = (D,)

    v = "vision_tower._vision_tower.vision_model."
    shapes |= {v + "embeddings.patch_embedding.weight": (DV, 3, PATCH, PATCH),
               v + "embeddings.patch_embedding.bias": (DV,),
               v + "embeddings.position_embedding.weight": ((IMAGE // PATCH) ** 2, DV)}
    for i in range(TOWER_LAYERS):
        p = f"{v}encoder.layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            shapes |= {p + f"self_attn.{proj}.weight": (DV, DV), p + f"self_attn.{proj}.bias": (DV,)}
        for norm in ("layer_norm1", "layer_norm2"):
            shapes |= {p + f"{norm}.weight": (DV,), p + f"{norm}.bias": (DV,)}
        shapes |= {p + "mlp.fc1.weight": (2 * DV, DV), p + "mlp.fc1.bias": (2 * DV,),
                   p + "mlp.fc2.weight": (DV, 2 * DV), p + "mlp.fc2.bias": (DV,)}
    # after layer -2, unused by the features, but in the published files
    h = v + "head."
    shapes |= {v + "post_layernorm.weight": (DV,), v + "post_layernorm.bias": (DV,),
               h + "probe": (1, 1, DV), h + "attention.in_proj_weight": (3 * DV, DV),
               h + "attention.in_proj_bias": (3 * DV,), h + "attention.out_proj.weight": (DV, DV),
               h + "attention.out_proj.bias": (DV,), h + "layernorm.weight": (DV,), h + "layernorm.bias": (DV,),
               h + "mlp.fc1.weight": (2 * DV, DV), h + "mlp.fc1.bias": (2 * DV,),
               h + "mlp.fc2.weight": (DV, 2 * DV), h + "mlp.fc2.bias": (DV,)}

    c = "connector._connector."
    shapes |= {c + "latents": (NUM_QUERIES // GROUP, D), c + "linear.weight": (D, DV), c + "linear.bias": (D,)}
    for i in range(RESAMPLER_LAYERS):
        p = f"{c}layers.{i}."
        for norm in ("0.norm_media", "0.norm_latents", "1.0"):  # 1.0 is the feed-forward's LayerNorm
            shapes |= {p + f"{norm}.weight": (D,), p + f"{norm}.bias": (D,)}
        shapes |= {p + "0.to_q.weight": (INNER, D), p + "0.to_kv.weight": (2 * INNER, D),
                   p + "0.to_out.weight": (D, INNER), p + "1.1.weight": (4 * D, D), p + "1.3.weight": (D, 4 * D)}
    shapes |= {c + "norm.weight": (D,), c + "norm.bias": (D,)}
    return shapes


def hand_made_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Norm weights near 1, biases small but non-zero, latents N(0, 1), matrices N(0, 0.3^2): every tensor
    different, so a swapped, dropped or zeroed one changes values (0.3 also keeps the random LLM's greedy output
    varied)."""
    noise = torch.randn(shape, generator=gen)
    name = key.rsplit(".", 1)[-1]
    is_norm = any(part in key for part in ("norm", "layer_norm", "layernorm")) or key.endswith(".1.0.weight") \
        or key.endswith(".1.0.bias")
    if is_norm and name == "weight":
        return 1 + 0.1 * noise
    if name in ("bias", "in_proj_bias"):
        return 0.1 * noise
    if name == "latents":
        return noise
    return 0.3 * noise


def write_published_checkpoint(folder: Path, seed: int = 0, shards: int = 3) -> dict[str, torch.Tensor]:
    """Write the folder; return {file key: tensor exactly as stored} for the value checks."""
    folder.mkdir(parents=True, exist_ok=True)
    vocab = write_hub_tokenizer(folder)
    eos_id = vocab - 1
    gen = torch.Generator().manual_seed(seed)
    tensors = {key: hand_made_tensor(key, shape, gen).to(torch.bfloat16).contiguous()
               for key, shape in sorted(published_shapes(vocab).items())}
    assert "language_model.lm_head.weight" not in tensors  # tied: the published files leave it out
    keys = list(tensors)
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = {k: tensors[k] for k in keys[i::shards]}  # interleaved: every shard holds every part's keys
        save_file(part, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = {
        "architectures": ["TinyLlavaForConditionalGeneration"], "model_type": "tinyllava", "cache_dir": None,
        "connector_type": "groupresampler", "num_queries": NUM_QUERIES, "group": GROUP,
        "num_resampler_layers": RESAMPLER_LAYERS, "resampler_hidden_size": 768,
        "hidden_size": D, "vision_hidden_size": DV, "vision_feature_layer": -2,
        "vision_feature_select_strategy": "patch", "image_aspect_ratio": "square", "ignore_index": -100,
        "image_token_index": -200, "llm_model_name_or_path": "Qwen/Qwen2.5-3B",
        "tokenizer_name_or_path": "Qwen/Qwen2.5-3B", "vision_model_name_or_path": "google/siglip-so400m-patch14-384",
        "tokenizer_model_max_length": 3072, "tokenizer_padding_side": "right", "tokenizer_use_fast": False,
        "pad_token": EOS, "pad_token_id": eos_id, "torch_dtype": "bfloat16", "use_cache": True,
        "text_config": {
            "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab, "hidden_size": D,
            "intermediate_size": 2 * D, "num_hidden_layers": LLM_LAYERS, "num_attention_heads": 4,
            "num_key_value_heads": 2, "hidden_act": "silu", "max_position_embeddings": 4096, "rms_norm_eps": 1e-6,
            "rope_theta": 1000000.0, "tie_word_embeddings": True, "bos_token_id": eos_id, "eos_token_id": eos_id,
            "use_sliding_window": False, "attention_dropout": 0.0, "initializer_range": 0.02,
            "torch_dtype": "bfloat16", "use_cache": True},
        "vision_config": {
            "model_type": "siglip_vision_model", "model_name_or_path": "google/siglip-so400m-patch14-384",
            "hidden_size": DV, "intermediate_size": 2 * DV, "num_hidden_layers": TOWER_LAYERS,
            "num_attention_heads": 2, "num_channels": 3, "image_size": IMAGE, "patch_size": PATCH,
            "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "attention_dropout": 0.0},
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": eos_id, "eos_token_id": eos_id,
                                                               "use_cache": False}))
    return tensors


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    folder = tmp_path_factory.mktemp("published") / "tinyllava-video-hand-written"
    return folder, write_published_checkpoint(folder, seed=11)


@pytest.fixture(scope="module")
def reference(published):
    return ref_load_published(published[0])


@pytest.fixture(scope="module")
def lmm(published):
    return VideoLMM(load_model(published[0]))


# ------------------------------------------------------------------ the files, as the spec describes them
def test_hand_written_files_have_the_published_shape(published):
    """Guards the helper itself: sharded with an index, tied lm_head absent, bf16, a folder of hub tokenizer files."""
    folder, tensors = published
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 3 and set(index["weight_map"]) == set(tensors)
    assert not (folder / "model.safetensors").exists()
    assert all(t.dtype == torch.bfloat16 for t in tensors.values())
    assert {"vocab.json", "merges.txt", "tokenizer_config.json"} <= {p.name for p in folder.iterdir()}
    assert not (folder / "tokenizer.json").exists()
    assert sum(t.numel() * 2 for t in tensors.values()) < 1_000_000  # tiny: the suite stays fast


# ------------------------------------------------------------------ vidlmm's loader, value by value
def _file_key(module_key: str) -> str:
    """The published key of a vidlmm module key: the tower's modules lack the files' `vision_model.` level and
    the connector the reference's `_connector.` wrapper level."""
    tower, connector = "vision_tower._vision_tower.", "connector."
    if module_key.startswith(tower):
        return tower + "vision_model." + module_key[len(tower):]
    if module_key.startswith(connector):
        return "connector._connector." + module_key[len(connector):]
    return module_key


def test_every_loaded_tensor_equals_its_file_tensor(published):
    """Each stored tensor lands in the module its key names with the same values (bf16 widened to fp32 exactly),
    nothing is left unloaded or loaded twice, and lm_head is the embedding matrix itself (tied, not a copy)."""
    folder, tensors = published
    model = load_model(folder)
    state = model.state_dict()
    by_file_key = {_file_key(k): v for k, v in state.items()}
    assert len(by_file_key) == len(state)
    assert set(by_file_key) - set(tensors) == {"language_model.lm_head.weight"}
    assert set(tensors) - set(by_file_key) == set()
    for key, stored in tensors.items():
        loaded = by_file_key[key]
        assert loaded.dtype == torch.float32, key  # fp32 on CPU: the reference's numerics
        assert loaded.shape == stored.shape, key
        assert torch.equal(loaded, stored.float()), key
    lm = model.language_model
    embed = tensors["language_model.model.embed_tokens.weight"].float()
    assert torch.equal(lm.lm_head.weight, embed)
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()
    # the config fields the geometry comes from were read, not defaulted
    connector = model.connector
    assert len(connector.layers) == RESAMPLER_LAYERS and connector.group == GROUP
    assert model.num_visual_tokens(16) == NUM_QUERIES
    assert model.vision_tower.tokens_per_frame == TOKENS_PER_FRAME
    assert model.tokenizer.eos_token == EOS and model.tokenizer.convert_tokens_to_ids(EOS) == len(embed) - 1


def test_reference_loader_reads_the_same_files(published, reference):
    """The reference's own loader is a second reader of the same files: it must see the same values (else the
    parity below would compare two different models)."""
    _, tensors = published
    assert torch.equal(reference.llm.lm_head.weight, tensors["language_model.model.embed_tokens.weight"].float())
    key = "vision_tower._vision_tower.vision_model.encoder.layers.1.mlp.fc1.weight"
    assert torch.equal(reference.tower.encoder.layers[1].mlp.fc1.weight, tensors[key].float())
    assert torch.equal(reference.connector["layers.1.0.to_kv.weight"],
                       tensors["connector._connector.layers.1.0.to_kv.weight"].float())


# ------------------------------------------------------------------ end to end against the reference
def _frames_cut_groups_unevenly(num_frames: int) -> bool:
    return (num_frames * TOKENS_PER_FRAME) % GROUP != 0


def test_greedy_answer_equals_the_reference_on_its_own_loader(lmm, reference, small_video):
    """The same visual tokens and greedy ids as the reference path reading the files with its own loader."""
    expected, ref_visual = ref_generate(reference, small_video, QUESTION, num_frames=8, max_new_tokens=16)
    prepared, _ = lmm.prepare(small_video, FrameSampling.uniform(8))
    ours = lmm.visual_tokens(prepared).tokens
    assert ours.shape == ref_visual.shape == (1, NUM_QUERIES, D)
    assert (ours - ref_visual).abs().max().item() < 1e-5
    answer = lmm.ask(small_video, QUESTION, generation=GenerationSettings(max_new_tokens=16),
                     sampling=FrameSampling.uniform(8))
    assert answer.token_ids == expected
    assert len(set(expected)) > 3  # a real sequence, not one repeated token


def test_batch_of_two_equals_the_reference_one_by_one(lmm, reference, small_video, tmp_path):
    """Batch size 2 end to end (left padding, questions of different lengths, different videos) against the
    reference's batch-1 answers for each pair."""
    other = write_video(tmp_path / "other.mp4", make_moving_square_frames(12, 64, 64, seed=3), fps=4)
    videos, questions = [small_video, other], [QUESTION, "Is there anything moving?"]
    sampling = FrameSampling.uniform(5)  # 5 x 8 tokens in 3 groups: 14, 13, 13
    assert _frames_cut_groups_unevenly(5)
    batch = lmm.ask_batch(videos, questions, generation=GenerationSettings(max_new_tokens=12), sampling=sampling)
    expected = [ref_generate(reference, v, q, num_frames=5, max_new_tokens=12)[0] for v, q in zip(videos, questions)]
    assert [a.token_ids for a in batch] == expected
    assert expected[0] != expected[1]  # two different answers: rows were not mixed up unnoticed


@pytest.mark.parametrize("frames,fps,cap,expected_n", [(75, 10, 64, 7), (95, 10, 5, 5), (23, 4, 64, 5)])
def test_fps_mode_odd_frame_counts_equal_the_reference(lmm, reference, tmp_path, frames, fps, cap, expected_n):
    """fps mode ("1 fps": floor(seconds) frames, capped) with odd frame counts, whose tokens the groups cut
    apart unevenly: the reference's own frame count, its visual tokens and its answer."""
    video = write_video(tmp_path / "clip.mp4", make_moving_square_frames(frames, 32, 32, seed=frames), fps=fps)
    n = ref_fps_num_frames(video, cap)
    assert n == expected_n and n % 2 == 1 and _frames_cut_groups_unevenly(n)
    expected, ref_visual = ref_generate(reference, video, QUESTION, num_frames=n, max_new_tokens=10)
    prepared, _ = lmm.prepare(video, FrameSampling.fps(cap))
    assert prepared.num_frames == n
    assert (lmm.visual_tokens(prepared).tokens - ref_visual).abs().max().item() < 1e-5
    answer = lmm.ask(video, QUESTION, generation=GenerationSettings(max_new_tokens=10),
                     sampling=FrameSampling.fps(cap))
    assert answer.frame_indices == np.linspace(0, frames - 1, n, dtype=int).tolist()
    assert answer.num_visual_tokens == NUM_QUERIES
    assert answer.token_ids == expected
