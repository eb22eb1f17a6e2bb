"""The per-frame compressors of the related work (vidlmm.compressors): LLaVA-Mini compression and pre-fusion,
Dynamic-VLM pooling, ToMe merging and top-k pruning. Shapes per budget, hand-computed values, their pictures,
and a round trip of each through the published checkpoint layout. Models are random: structure only."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from vidlmm.analysis import attention_maps, connector_picture, connector_variants, token_budget, token_redundancy
from vidlmm.checkpoint import load_model, read_state_dict, save_model
from vidlmm.compressors import (CompressorOutput, frame_token_count, merge_to, patch_grid, pooling_edges,
                                sincos_2d)
from vidlmm.config import TinyLlavaConfig
from vidlmm.connectors import CONNECTORS, create_connector
from vidlmm.conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from vidlmm.errors import VidlmmError
from vidlmm.pipeline import GenerationSettings, VideoLMM
from vidlmm.tiny import tiny_text_config, write_tiny_checkpoint
from vidlmm.video import FrameSampling

DV, D = 32, 64
FOUR = FrameSampling.uniform(4)
TYPES = {  # connector_type -> (num_queries, connector_options) of the tiny checkpoints
    "llava_mini": (4, {"prefusion_layers": 2}),
    "pool": (64, {"token_budget": 16}),
    "tome": (64, {"frame_tokens": 5}),
    "topk": (64, {"token_budget": 24, "max_frame_tokens": 4}),
}


def make(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    if name == "llava_mini":
        kwargs.setdefault("text_config", tiny_text_config(100, hidden_size=D))
    return create_connector(name, vision_hidden_size=DV, hidden_size=D, **kwargs).eval()


def test_registered_by_name():
    assert {"llava_mini", "pool", "tome", "topk"} <= set(CONNECTORS)


# ---- budgets and shapes -----------------------------------------------------------------------------------------

def test_budget_rule():
    # Dynamic-VLM's sample config (576 patches, 3200 tokens) and the paper's best 12K setting (120 frames)
    assert frame_token_count(16, 576, token_budget=3200, square=True) == 196
    assert frame_token_count(4, 576, token_budget=3200, square=True) == 576
    assert frame_token_count(120, 576, token_budget=12000, square=True) == 100
    assert frame_token_count(16, 576, token_budget=3200, max_frame_tokens=100) == 100
    assert frame_token_count(1000, 576, token_budget=512) == 1  # never zero
    assert frame_token_count(16, 15, frame_tokens=7) == 7
    assert frame_token_count(1, 15, frame_tokens=99, square=True) == 9  # clamped to P, then floored to a square
    assert patch_grid(728) == (27, 1) and patch_grid(729) == (27, 0) and patch_grid(577) == (24, -1)


@pytest.mark.parametrize("frames,budget,per_frame", [(1, 512, 9), (4, 32, 4), (4, 20, 4), (16, 32, 1), (3, 27, 9)])
def test_pool_shapes_follow_the_budget(frames, budget, per_frame):
    module = make("pool", token_budget=budget)
    out = module(torch.randn(2, frames, 15, DV))
    assert out.tokens.shape == (2, frames * per_frame, D)
    assert module.num_output_tokens(frames, 15) == frames * per_frame
    assert out.query_groups.tolist() == [t for t in range(frames) for _ in range(per_frame)]
    assert out.group_spans == [(t * 15, (t + 1) * 15) for t in range(frames)] and out.attentions is None


@pytest.mark.parametrize("name", ["tome", "topk"])
@pytest.mark.parametrize("frames,options,per_frame", [(1, {}, 15), (4, {"token_budget": 32}, 8),
                                                      (5, {"token_budget": 32}, 6), (16, {"token_budget": 8}, 1),
                                                      (3, {"frame_tokens": 3}, 3),
                                                      (2, {"token_budget": 512, "max_frame_tokens": 5}, 5)])
def test_merge_and_prune_shapes_follow_the_budget(name, frames, options, per_frame):
    module = make(name, **options)
    out = module(torch.randn(2, frames, 15, DV))
    assert out.tokens.shape == (2, frames * per_frame, D)
    assert module.num_output_tokens(frames, 15) == frames * per_frame


def training_counts(module, x, steps: int) -> set[int]:
    """Tokens per frame over `steps` training forward passes of a 4-frame clip (seeded draws)."""
    torch.manual_seed(0)
    module.train()
    return {module(x).tokens.shape[1] // x.shape[1] for _ in range(steps)}


@pytest.mark.parametrize("name", ["pool", "tome", "topk"])
def test_training_draws_dynamic_vlm_random_token_counts(name):
    """min_frame_tokens: in training k ~ U[min, max] per batch (capped by the budget); at inference the rule."""
    module = make(name, token_budget=64, min_frame_tokens=2, max_frame_tokens=12)
    x = torch.randn(1, 4, 15, DV)
    counts = training_counts(module, x, 40)
    allowed = {k for k in range(2, 13)} if name != "pool" else {1, 4, 9}
    assert counts <= allowed and len(counts) >= 3  # varies, within [min, max] (squares for pool)
    module.eval()
    assert {module(x).tokens.shape[1] for _ in range(3)} == {4 * (9 if name == "pool" else 12)}
    capped = make(name, token_budget=8, min_frame_tokens=2, max_frame_tokens=12).train()
    assert {capped(x).tokens.shape[1] // 4 for _ in range(10)} == {1 if name == "pool" else 2}  # 8 // 4 frames


@pytest.mark.parametrize("name", ["pool", "tome", "topk"])
def test_training_budget_can_reach_above_the_served_one(name):
    """train_token_budget: the training draws are capped by it, inference keeps token_budget."""
    module = make(name, token_budget=16, train_token_budget=36, min_frame_tokens=4)
    x = torch.randn(1, 4, 15, DV)
    counts = training_counts(module, x, 30)
    assert max(counts) == 9 and min(counts) >= 4  # 36 // 4 frames, where token_budget alone allows 4
    assert module.num_output_tokens(4, 15) == 36  # the most a training step can make (max_length checks)
    module.eval()
    assert module(x).tokens.shape[1] == 16 == module.num_output_tokens(4, 15)


@pytest.mark.parametrize("queries", [1, 4, 9])
@pytest.mark.parametrize("layers", [0, 1])
def test_llava_mini_shapes(queries, layers):
    module = make("llava_mini", num_queries=queries, prefusion_layers=layers)
    out = module(torch.randn(2, 3, 15, DV), output_attentions=True)
    assert out.tokens.shape == (2, 3 * queries, D)
    assert module.num_output_tokens(3, 15) == 3 * queries
    assert out.picture["attention"].shape == (3, queries, 15)
    media = out.attentions[0].media
    assert media.shape == (2, 8, 3 * queries, 3 * 15)
    # each query attends only to its own frame, and its weights sum to 1 there
    assert torch.allclose(media.sum(-1), torch.ones(2, 8, 3 * queries), atol=1e-5)
    assert media[:, :, :queries, 15:].abs().max() == 0
    assert (out.fusion_context is None) == (layers == 0)
    with pytest.raises(ValueError, match="C \\* C"):
        make("llava_mini", num_queries=8, prefusion_layers=0)


# ---- pooling ----------------------------------------------------------------------------------------------------

def test_pooling_equals_hand_computed_block_means():
    module = make("pool", frame_tokens=4)
    x = torch.randn(1, 2, 16, DV)  # a full 4 x 4 grid (CLIP-style `patch` strategy)
    out = module(x)
    grid = x.reshape(2, 4, 4, DV)
    expected = torch.stack([grid[:, r:r + 2, c:c + 2].mean(dim=(1, 2)) for r in (0, 2) for c in (0, 2)], dim=1)
    assert torch.allclose(module.pool(x.reshape(2, 16, DV), 2), expected, atol=1e-6)
    with torch.no_grad():
        assert torch.allclose(out.tokens, module.projector(expected).reshape(1, 8, D), atol=1e-6)
    cell_token = out.picture["cell_token"].reshape(4, 4)
    assert cell_token.tolist() == [[0, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]


def test_pooling_skips_the_dropped_cell_and_overlapping_bins():
    module = make("pool")
    x = torch.randn(1, 15, DV)  # SigLIP's `patch` strategy: cell 0 is missing, token i sits in cell i + 1
    cell = {i + 1: x[0, i] for i in range(15)}
    pooled = module.pool(x, 2)[0]
    assert torch.allclose(pooled[0], torch.stack([cell[1], cell[4], cell[5]]).mean(0), atol=1e-6)
    assert torch.allclose(pooled[3], torch.stack([cell[10], cell[11], cell[14], cell[15]]).mean(0), atol=1e-6)
    # 4 cells to 3 bins: [0, 2), [1, 3), [2, 4) overlap, as adaptive average pooling does
    assert pooling_edges(4, 3) == [(0, 2), (1, 3), (2, 4)]
    pooled = module.pool(x, 3)[0]
    assert torch.allclose(pooled[4], torch.stack([cell[r * 4 + c] for r in (1, 2) for c in (1, 2)]).mean(0),
                          atol=1e-6)
    assert torch.allclose(pooled[0], torch.stack([cell[1], cell[4], cell[5]]).mean(0), atol=1e-6)


# ---- ToMe -------------------------------------------------------------------------------------------------------

def test_tome_with_nothing_to_remove_is_the_identity():
    x = torch.randn(3, 15, DV)
    merged, size, source = merge_to(x, 15)
    assert torch.equal(merged, x) and torch.equal(size, torch.ones(3, 15))
    assert torch.equal(source, torch.arange(15).expand(3, -1))
    module = make("tome", frame_tokens=15)
    frames = torch.randn(1, 2, 15, DV)
    with torch.no_grad():
        assert torch.allclose(module(frames).tokens[0], module.projector(frames[0]).reshape(30, D))


@pytest.mark.parametrize("m", [14, 8, 5, 3, 1])
def test_tome_merging_preserves_the_size_weighted_mean(m):
    torch.manual_seed(m)
    x = torch.randn(4, 15, DV, dtype=torch.float64)
    merged, size, source = merge_to(x, m)
    assert merged.shape == (4, m, DV) and source.shape == (4, 15)
    assert torch.allclose((merged * size[..., None]).sum(1) / size.sum(1, keepdim=True), x.mean(1))
    assert torch.equal(size.sum(1), torch.full((4,), 15.0, dtype=size.dtype))
    for f in range(4):
        for j in range(m):  # the source map partitions the patches; each token is the mean of its patches
            covered = source[f] == j
            assert int(covered.sum()) == int(size[f, j])
            assert torch.allclose(merged[f, j], x[f, covered].mean(0))
        first = [int(torch.nonzero(source[f] == j)[0]) for j in range(m)]
        assert first == sorted(first)  # raster order of each token's first patch


def test_tome_merges_duplicates_first():
    base = torch.randn(8, DV)
    x = torch.cat([base, base[:4]]).unsqueeze(0)  # tokens 8..11 repeat 0..3
    x = x[:, torch.tensor([0, 8, 1, 9, 2, 10, 3, 11, 4, 5, 6, 7])]  # each duplicate right after its original
    merged, size, source = merge_to(x, 8)
    assert size[0].tolist() == [2, 2, 2, 2, 1, 1, 1, 1]
    assert torch.allclose(merged[0], base, atol=1e-6)
    assert source[0, :8].tolist() == [0, 0, 1, 1, 2, 2, 3, 3]


def test_tome_picture_is_a_source_map():
    module = make("tome", frame_tokens=4)
    out = module(torch.randn(1, 3, 15, DV))
    assert out.picture["source"].shape == (3, 15) and out.picture["size"].shape == (3, 4)
    assert set(out.picture["source"].flatten().tolist()) == {0, 1, 2, 3}
    assert out.picture["size"].sum(1).tolist() == [15.0, 15.0, 15.0]


# ---- top-k ------------------------------------------------------------------------------------------------------

def test_pruning_keeps_exactly_k_tokens_in_raster_order():
    module = make("topk", frame_tokens=5)
    x = torch.randn(2, 3, 15, DV)
    with torch.no_grad():
        out = module(x)
        logits = module.scorer(x).squeeze(-1)
    kept = out.picture["kept_indices"]
    assert kept.shape == (3, 5)
    assert torch.all(kept[:, 1:] > kept[:, :-1])  # strictly increasing: raster order, no repeats
    assert out.picture["kept"].sum(1).tolist() == [5, 5, 5]
    for t in range(3):
        assert set(kept[t].tolist()) == set(logits[0, t].topk(5).indices.tolist())
    with torch.no_grad():
        expected = module.projector(x[0].gather(1, kept[..., None].expand(-1, -1, DV)))
    assert torch.allclose(out.tokens[0], expected.reshape(15, D), atol=1e-6)


@pytest.mark.parametrize("p, k", [(15, 5), (17, 3)])  # SigLIP's grid without its first cell; a class token
def test_topk_equals_an_independent_computation(p, k):
    from tests.reference_impl import ref_topk

    module = make("topk", seed=3, frame_tokens=k)
    x = torch.randn(1, 4, p, DV)
    with torch.no_grad():
        out = module(x)
    tokens, kept = ref_topk(module.state_dict(), x[0], k)
    assert out.picture["kept_indices"].tolist() == kept
    assert out.picture["kept"].nonzero().tolist() == [[t, i] for t in range(4) for i in kept[t]]
    assert torch.allclose(out.tokens[0].double(), tokens, atol=1e-5)


def test_gradients_reach_the_topk_scorer_in_training():
    module = make("topk", frame_tokens=4).train()
    x = torch.randn(1, 2, 15, DV)
    out = module(x)
    assert out.tokens.shape == (1, 8, D)
    assert out.picture["kept"].sum(1).tolist() == [4, 4]
    (out.tokens * torch.randn_like(out.tokens)).sum().backward()
    for name, param in module.scorer.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    # the straight-through mask is 1 in the forward pass: the kept features go through unscaled
    with torch.no_grad():
        kept = out.picture["kept_indices"]
        expected = module.projector(x[0].gather(1, kept[..., None].expand(-1, -1, DV)))
    assert torch.allclose(out.tokens[0].detach(), expected.reshape(8, D), atol=1e-5)
    module.eval()
    with torch.no_grad():
        assert torch.equal(module(x).tokens, module(x).tokens)  # deterministic at inference


def test_topk_straight_through_gradient_is_a_softmax_over_each_frames_tokens():
    """d(kept features)/d(logits) comes from a softmax over the tokens of a frame, so each frame's logit gradient
    sums to zero (a softmax over anything else would not)."""
    module = make("topk", frame_tokens=3).train()
    logits = torch.randn(2, 15, 1, requires_grad=True)

    class Fixed(torch.nn.Module):  # the scorer's output, as a leaf to read the gradient of
        def forward(self, x):
            return logits

    module.scorer = Fixed()
    kept, _, _ = module.select(torch.randn(2, 15, DV), 3)
    (kept * torch.randn_like(kept)).sum().backward()
    grad = logits.grad[..., 0]
    assert grad.abs().sum() > 0
    assert torch.allclose(grad.sum(-1), torch.zeros(2), atol=1e-5)


def test_llava_mini_queries_start_small():
    query = make("llava_mini", num_queries=4, prefusion_layers=0, seed=1).query
    assert 0.01 < float(query.detach().std()) < 0.04  # N(0, 0.02), as LLaVA-Mini initialises them


# ---- LLaVA-Mini -------------------------------------------------------------------------------------------------

def test_llava_mini_without_prefusion_is_compression_alone():
    module = make("llava_mini", num_queries=4, prefusion_layers=0)
    x = torch.randn(2, 3, 15, DV)
    with torch.no_grad():
        out = module(x)
        compressed, _ = module.compress(x.reshape(6, 15, DV))
        expected = module.projector(compressed).reshape(2, 12, D)
    assert torch.allclose(out.tokens, expected, atol=1e-6)
    assert out.fusion_context is None and len(module.prefusion_layers) == 0
    assert not any("prefusion" in k for k in module.state_dict())
    text = torch.randn(5, D)
    assert torch.equal(module.fuse_text(torch.zeros(3, 19, D), text), text)
    # the same compression weights under pre-fusion: its input is exactly the compressed, projected tokens
    fused = make("llava_mini", num_queries=4, prefusion_layers=2)
    fused.load_state_dict(module.state_dict(), strict=False)
    with torch.no_grad():
        context = fused(x).fusion_context
    assert context.shape == (2, 3, 15 + 4, D)
    assert torch.allclose(context[:, :, 15:].reshape(2, 12, D), expected, atol=1e-6)


@pytest.mark.parametrize("queries, p", [(4, 15), (1, 15), (9, 37)])  # 37 = 6 x 6 patches + a class token
def test_llava_mini_equals_an_independent_computation(queries, p):
    from tests.reference_impl import ref_llava_mini

    module = make("llava_mini", seed=4, num_queries=queries, prefusion_layers=0, compressor_heads=4)
    with torch.no_grad():  # layer norms that are not the identity, and not equal to each other
        for norm in (module.ln_q, module.ln_kv):
            norm.weight.normal_(1.0, 0.3)
            norm.bias.normal_(0.0, 0.3)
    x = torch.randn(2, 3, p, DV)
    with torch.no_grad():
        out = module(x, output_attentions=True)
    for b in range(2):
        tokens, attention = ref_llava_mini(module.state_dict(), x[b], queries, heads=4)
        assert torch.allclose(out.tokens[b].double(), tokens, atol=1e-5)
        if b == 0:  # the picture is the first video's
            assert torch.allclose(out.picture["attention"].double(), attention, atol=1e-6)


def test_llava_mini_visual_tokens_do_not_see_the_text_and_text_is_fused():
    module = make("llava_mini", num_queries=4, prefusion_layers=2)
    x = torch.randn(1, 3, 15, DV)
    text = torch.randn(6, D)
    valid = torch.tensor([True, True, True, False, True, False])
    with torch.no_grad():
        out = module(x)
        context = out.fusion_context[0]
        seq = torch.cat([context, text.expand(3, -1, -1)], dim=1)
        mask = torch.cat([torch.ones(3, 19, dtype=torch.bool), valid.expand(3, -1)], dim=1)
        hidden = module.prefuse(seq, mask)
        fused = module.fuse_text(context, text, valid)
    assert torch.allclose(hidden[:, 15:19].reshape(12, D), out.tokens[0], atol=1e-5)  # causal: text comes later
    assert torch.allclose(fused[valid], hidden[:, 19:][:, valid].mean(0), atol=1e-5)  # averaged over frames
    assert torch.equal(fused[~valid], text[~valid])  # hidden tokens keep their raw embeddings
    assert not torch.allclose(fused[valid], text[valid])


def test_llava_mini_key_position_encoding_is_spatial_even_with_one_query():
    module = make("llava_mini", num_queries=1, prefusion_layers=0)
    pe_q, pe_k = module.position_encodings(15)
    assert pe_q.shape == (1, DV) and pe_k.shape == (15, DV)
    assert torch.unique(pe_k, dim=0).shape[0] == 15  # interpolating a 1 x 1 table would give one vector
    centre = sincos_2d(torch.tensor([1.5]), torch.tensor([1.5]), DV)  # the query sits at the grid's centre
    assert torch.allclose(pe_q, centre)


# ---- through the model and the checkpoint layout -----------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("compressors")
    return {name: write_tiny_checkpoint(root / name, name, seed=i, num_queries=q, connector_options=options,
                                        initializer_range=0.4)
            for i, (name, (q, options)) in enumerate(TYPES.items())}


@pytest.mark.parametrize("name", list(TYPES))
def test_round_trip_in_the_published_layout_and_ask(name, checkpoints, small_video, tmp_path):
    model = load_model(checkpoints[name], dtype="fp32", device="cpu")
    assert model.connector.registry_name == name
    config = json.loads((checkpoints[name] / "config.json").read_text())
    assert config["connector_type"] == name and all(config[k] == v for k, v in TYPES[name][1].items())
    state = read_state_dict(checkpoints[name])
    assert any(k.startswith("connector._connector.projector.") for k in state)
    again = load_model(save_model(model, tmp_path / "copy"), dtype="fp32", device="cpu")
    for key, value in model.state_dict().items():
        assert torch.equal(value, again.state_dict()[key]), key
    lmm = VideoLMM(again, sampling=FOUR, cache_bytes=0)
    answer = lmm.ask(small_video, "What moves?", generation=GenerationSettings(max_new_tokens=8))
    before = VideoLMM(model, sampling=FOUR, cache_bytes=0).ask(small_video, "What moves?",
                                                                generation=GenerationSettings(max_new_tokens=8))
    assert answer.token_ids and answer.token_ids == before.token_ids  # the copy answers like the original
    assert answer.text == again.tokenizer.decode(answer.token_ids, skip_special_tokens=True).strip()
    assert answer.num_visual_tokens == again.num_visual_tokens(4)
    expected = {"llava_mini": 4 * 4, "pool": 4 * 4, "tome": 4 * 5, "topk": 4 * 4}[name]
    assert answer.num_visual_tokens == expected


def test_model_fuses_the_prompt_through_build_inputs(checkpoints):
    model = load_model(checkpoints["llava_mini"], dtype="fp32", device="cpu")
    features = torch.randn(3, 15, DV)
    out = model.connect(features)
    assert isinstance(out, CompressorOutput) and out.fusion_context.shape == (1, 3, 19, D)
    ids = [5, 6, IMAGE_TOKEN_INDEX, 7, 8, 9]
    plain, _, _ = model.build_inputs([ids], [out.tokens[0]])
    fused, _, _ = model.build_inputs([ids], [out])
    assert plain.shape == fused.shape == (1, 5 + 12, D)
    assert torch.equal(plain[0, 2:14], fused[0, 2:14])  # the visual tokens themselves
    assert not torch.allclose(plain[0, :2], fused[0, :2]) and not torch.allclose(plain[0, 14:], fused[0, 14:])
    # in training the answer tokens (labels) keep their raw embeddings
    labels = [IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8, 9]
    train, _, lab = model.build_inputs([ids], [out], [labels], padding_side="right")
    assert torch.equal(train[0, 15:], plain[0, 15:]) and not torch.allclose(train[0, 14], plain[0, 14])
    assert lab[0, 2:14].eq(IGNORE_INDEX).all() and lab[0, 15:].tolist() == [8, 9]


@pytest.mark.parametrize("name", list(TYPES))
def test_connector_trains_through_the_llm_loss(name, checkpoints):
    model = load_model(checkpoints[name], dtype="fp32", device="cpu")
    model.connector.train().requires_grad_(True)
    features = torch.randn(1, 4, 15, DV)
    out = model.connector(features)  # what train/trainer.py calls
    ids = [5, IMAGE_TOKEN_INDEX, 7, 8, 9]
    embeds, mask, labels = model.build_inputs([ids], [out], [[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 8, 9]],
                                              padding_side="right")
    model(embeds, mask, labels=labels).loss.backward()
    grads = {n: p.grad for n, p in model.connector.named_parameters()}
    assert grads and all(g is not None for g in grads.values())
    assert model.connector.projector[0].weight.grad.abs().sum() > 0


# ---- analysis ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(TYPES))
def test_connector_picture(name, checkpoints, small_video):
    lmm = VideoLMM(load_model(checkpoints[name], dtype="fp32", device="cpu"), sampling=FOUR)
    pic = connector_picture(lmm, small_video)
    k = pic["output_tokens_per_frame"]
    assert pic["connector_type"] == name and pic["grid"] == (4, 4) and pic["num_frames"] == 4
    assert pic["tokens_per_frame"] == 15 and pic["frames"].shape[0] == 4 and pic["tokens"].shape == (4 * k, D)
    if name == "llava_mini":
        assert pic["kind"] == "query_attention" and pic["attention"].shape == (4, 4, 4, 4)
        assert np.isnan(pic["attention"][:, :, 0, 0]).all()  # SigLIP's dropped first patch
        assert np.allclose(np.nansum(pic["attention"], axis=(2, 3)), 1.0, atol=1e-5)
        maps = attention_maps(lmm, small_video)
        assert maps.media.shape == (1, 8, 16, 60) and maps.spatial(query=0).shape == (4, 4, 4)
    else:
        with pytest.raises(VidlmmError, match="no attention"):
            attention_maps(lmm, small_video)
    if name == "pool":
        assert pic["kind"] == "pooling_grid" and pic["pool_size"] == 2 and k == 4
        assert pic["cell_token"][0].tolist() == [[-1, 0, 1, 1], [0, 0, 1, 1], [2, 2, 3, 3], [2, 2, 3, 3]]
        assert pic["row_edges"].tolist() == [[0, 2], [2, 4]]
    if name == "tome":
        assert pic["kind"] == "source_map" and pic["source"].shape == (4, 4, 4) and pic["size"].shape == (4, 5)
        assert pic["source"][:, 0, 0].tolist() == [-1] * 4 and pic["size"].sum(1).tolist() == [15] * 4
    if name == "topk":
        assert pic["kind"] == "kept_mask" and pic["kept"].shape == (4, 4, 4) and k == 4
        assert pic["kept"].sum(axis=(1, 2)).tolist() == [4] * 4 and pic["kept_indices"].shape == (4, 4)
    summary = token_redundancy(pic["tokens"], name)["summary"]
    assert summary["tokens"] == 4 * k and 1.0 <= summary["effective_tokens"] <= 4 * k + 1e-6


def test_picture_of_a_resampler_says_so(small_video, tmp_path):
    folder = write_tiny_checkpoint(tmp_path / "image", "resampler", num_queries=4)
    lmm = VideoLMM(load_model(folder, dtype="fp32", device="cpu"), sampling=FOUR)
    with pytest.raises(VidlmmError, match="no picture"):
        connector_picture(lmm, small_video)


def test_attention_of_a_compressor_without_attention_says_where_to_look(checkpoints, small_video):
    lmm = VideoLMM(load_model(checkpoints["pool"], dtype="fp32", device="cpu"), sampling=FOUR)
    with pytest.raises(VidlmmError, match="^The 'pool' connector has no attention to show; connector_picture"):
        attention_maps(lmm, small_video)


def test_token_budget_and_variants_include_the_compressors(checkpoints):
    configs = {name: TinyLlavaConfig.from_json_file(folder / "config.json") for name, folder in checkpoints.items()}
    budget = token_budget(configs, frames=(1, 4, 16))
    assert budget.series("pool", "visual_tokens")[1].tolist() == [9, 16, 16]  # 16 // T tokens, floored to squares
    assert budget.series("tome", "visual_tokens")[1].tolist() == [5, 20, 80]
    assert budget.series("topk", "visual_tokens")[1].tolist() == [4, 16, 16]
    assert budget.series("llava_mini", "visual_tokens")[1].tolist() == [4, 16, 64]
    settings = {r["name"]: r["setting"] for r in budget.rows}
    assert settings["llava_mini"] == "llava_mini, 4 queries per frame, 2 pre-fusion layers"
    assert settings["pool"] == "pool, budget 16 tokens"
    default = configs["llava_mini"]
    default = TinyLlavaConfig.from_dict({**default.to_dict(), "prefusion_layers": None})
    assert token_budget({"m": default}, frames=(1,)).rows[0]["setting"].endswith(", 4 pre-fusion layers")
    base = configs["pool"]
    assert list(connector_variants(base)) == ["naive", "group", "image-level", "mlp"]
    variants = connector_variants(base, related=True)
    assert list(variants)[4:] == ["llava-mini", "pool", "tome", "topk"]
    assert all(isinstance(v, TinyLlavaConfig) and v.connector_type == n for n, v in variants.items()
               if n in ("pool", "tome", "topk"))
    rows = {r["name"]: r["visual_tokens"] for r in token_budget(variants, frames=(16,)).rows}
    assert rows["llava-mini"] == 16 * 4 and rows["pool"] == 16 * 4 and rows["tome"] == rows["topk"] == 16 * 4
