"""Connectors against the plain reference implementation in tests/reference_impl.py, plus their attention maps."""

from __future__ import annotations

import pytest
import torch

from tests.reference_impl import ref_group, ref_image_level, ref_naive, ref_position_encoding
from vidlmm.connectors import (
    CONNECTORS, GroupResampler, NaiveResampler, TokenLayout, create_connector, group_sizes, resolve_connector_name,
    sinusoidal_position_encoding,
)

DV, D = 24, 64


def make(name, seed=0, **kwargs):
    torch.manual_seed(seed)
    module = create_connector(name, vision_hidden_size=DV, hidden_size=D, **kwargs).eval()
    with torch.no_grad():  # LayerNorms away from 1/0 so they matter in the comparison
        for n, p in module.named_parameters():
            if "norm" in n:
                p.add_(0.1 * torch.randn_like(p))
    return module


def state(module):
    return {k: v.float() for k, v in module.state_dict().items()}


@pytest.mark.parametrize("frames,tokens,group", [(16, 15, 16), (5, 15, 4), (1, 15, 4), (7, 9, 3), (40, 6, 16)])
def test_group_resampler_matches_reference(frames, tokens, group):
    module = make("groupresampler", num_queries=4 * group, group=group)
    x = torch.randn(2, frames, tokens, DV)
    with torch.no_grad():
        ours = module(x).tokens
        ref = ref_group(state(module), x.reshape(2, frames * tokens, DV), group)
    assert ours.shape == (2, 4 * group, D)
    assert (ours - ref).abs().max().item() < 1e-5


@pytest.mark.parametrize("name", ["naiveresampler", "resamplerwithpe"])
def test_naive_resampler_matches_reference(name):
    module = make(name, num_queries=32)
    assert isinstance(module, NaiveResampler)
    x = torch.randn(2, 6, 15, DV)
    with torch.no_grad():
        ours = module(x).tokens
        ref = ref_naive(state(module), x.reshape(2, 90, DV))
    assert (ours - ref).abs().max().item() < 1e-5


def test_image_level_resampler_matches_reference():
    module = make("resampler", num_queries=4)
    x = torch.randn(1, 6, 15, DV)
    with torch.no_grad():
        ours = module(x).tokens
        ref = ref_image_level(state(module), x.reshape(1, 90, DV), 15)
    assert ours.shape == (1, 6 * 4, D)
    assert (ours - ref).abs().max().item() < 1e-5
    with torch.no_grad():
        out = module(x, output_attentions=True)
    assert len(out.attentions) == 3 and out.attentions[0].media.shape == (1, 8, 24, 90)
    assert torch.equal(out.tokens, ours)


def test_registry_names_and_legacy_alias():
    assert {"naiveresampler", "groupresampler", "resampler", "mlp2x_gelu"} <= set(CONNECTORS)
    assert resolve_connector_name("ResamplerWithPE") == "naiveresampler"
    with pytest.raises(ValueError, match="Unknown connector type 'qformer'"):
        resolve_connector_name("qformer")


def test_reference_key_names():
    keys = set(make("groupresampler", num_queries=8, group=2).state_dict())
    assert {"latents", "linear.weight", "linear.bias", "layers.0.0.norm_media.weight", "layers.0.0.to_q.weight",
            "layers.0.0.to_kv.weight", "layers.0.0.to_out.weight", "layers.2.1.0.weight", "layers.2.1.1.weight",
            "layers.2.1.3.weight", "norm.weight", "norm.bias"} <= keys
    assert make("groupresampler", num_queries=512, group=16).latents.shape == (32, D)
    assert set(make("mlp2x_gelu").state_dict()) == {"0.weight", "0.bias", "2.weight", "2.bias"}


def test_position_encoding_is_rounded_through_fp16():
    pe = sinusoidal_position_encoding(300, D)
    assert torch.equal(pe, ref_position_encoding(300, D, torch.float32))
    assert torch.equal(pe, pe.half().float())  # exactly representable in fp16
    exact = torch.sin(torch.tensor(299.0) * torch.exp(torch.tensor(2.0) * -(torch.log(torch.tensor(1e4)) / D)))
    assert pe[0, 299, 2].item() != exact.item()  # the rounding really happened


def test_group_split_rule():
    assert group_sizes(11648, 16) == [728] * 16
    assert group_sizes(3640, 16) == [228] * 8 + [227] * 8
    assert group_sizes(728, 16) == [46] * 8 + [45] * 8


def test_group_attention_stays_in_its_group_and_rows_sum_to_one():
    frames, tokens, group, q = 5, 15, 4, 3
    module = make("groupresampler", num_queries=q * group, group=group)
    out = module(torch.randn(1, frames, tokens, DV), output_attentions=True)
    assert len(out.attentions) == 3
    sizes = group_sizes(frames * tokens, group)
    for layer in out.attentions:
        assert layer.media.shape == (1, 8, q * group, frames * tokens)
        assert layer.latents.shape == (1, 8, q * group, q)
        total = layer.media.sum(-1) + layer.latents.sum(-1)
        assert (total - 1).abs().max().item() < 1e-6
        for g, (start, end) in enumerate(out.group_spans):
            rows = layer.media[..., g * q:(g + 1) * q, :]
            assert end - start == sizes[g]
            assert torch.count_nonzero(rows[..., :start]) == 0 and torch.count_nonzero(rows[..., end:]) == 0
            assert (rows[..., start:end] > 0).all()
    assert out.query_groups.tolist() == [g for g in range(group) for _ in range(q)]


def test_naive_attention_spreads_over_every_frame():
    module = make("naiveresampler", num_queries=8)
    out = module(torch.randn(1, 6, 15, DV), output_attentions=True)
    last = out.attentions[-1]
    per_frame = last.media.reshape(1, 8, 8, 6, 15).sum(-1)  # [B, H, Q, T]
    assert (per_frame > 0).all()
    assert ((last.media.sum(-1) + last.latents.sum(-1)) - 1).abs().max().item() < 1e-6


def test_attention_does_not_change_outputs():
    module = make("groupresampler", num_queries=12, group=4)
    x = torch.randn(1, 5, 15, DV)
    with torch.no_grad():
        assert torch.equal(module(x).tokens, module(x, output_attentions=True).tokens)


def test_token_layout_for_siglip_patch_strategy():
    # 16 frames, a 4x4 grid whose first patch is dropped (15 tokens per frame), 16 groups: one frame per group
    layout = TokenLayout(16, 15, (4, 4), first_cell=1)
    assert (layout.frame[:15] == 0).all() and layout.frame[15].item() == 1
    assert (layout.row[0].item(), layout.col[0].item()) == (0, 1)
    assert (layout.row[14].item(), layout.col[14].item()) == (3, 3)
    assert (layout.row[15].item(), layout.col[15].item()) == (0, 1)
    spans = GroupResampler(vision_hidden_size=DV, hidden_size=D, num_queries=16, group=16)(
        torch.randn(1, 16, 15, DV)).group_spans
    for g, (start, end) in enumerate(spans):
        assert set(layout.frame[start:end].tolist()) == {g}
    grid = layout.to_grid(torch.arange(16 * 15, dtype=torch.float32))
    assert torch.isnan(grid[:, 0, 0]).all()  # the dropped patch is put back as an empty cell
    assert grid[3, 2, 1].item() == 3 * 15 + (2 * 4 + 1) - 1
    assert grid[3, 0, 1].item() == 3 * 15 and int(torch.isnan(grid).sum()) == 16  # row 0 holds tokens too
    maps = layout.to_grid(torch.stack([torch.arange(16 * 15.0), -torch.arange(16 * 15.0)]))  # leading dims kept
    assert maps.shape == (2, 16, 4, 4) and torch.equal(maps[0].nan_to_num(-1), grid.nan_to_num(-1))
    assert maps[1, 3, 2, 1].item() == -grid[3, 2, 1]


def test_output_groups_are_integer_ids_before_and_after_a_pass():
    x = torch.randn(1, 3, 15, DV)
    for name, kwargs in [("naiveresampler", {"num_queries": 8}), ("groupresampler", {"num_queries": 8, "group": 4}),
                         ("resampler", {"num_queries": 2}), ("mlp2x_gelu", {})]:
        module = make(name, **kwargs)
        groups = module(x).query_groups
        assert groups.dtype == torch.long, name  # they index spans and numpy arrays
        assert torch.equal(groups, module.output_groups(3, 15)), name


def test_unknown_connector_type_names_the_known_ones():
    with pytest.raises(ValueError, match=r"Unknown connector type 'Perceiver' \(known: .*groupresampler.*"
                                         r"resamplerwithpe"):
        resolve_connector_name("Perceiver")


def test_token_layout_when_groups_split_frames():
    layout = TokenLayout(5, 15, (4, 4), first_cell=1)
    spans = [(s, e) for s, e in zip([0, 19, 38, 57], [19, 38, 57, 75])]
    assert [e - s for s, e in spans] == group_sizes(75, 4)
    # group 1 covers the last 11 tokens of frame 1 and the first 8 of frame 2
    frames = layout.frame[spans[1][0]:spans[1][1]].tolist()
    assert frames == [1] * 11 + [2] * 8
    assert (layout.row[19].item(), layout.col[19].item()) == (1, 1)  # token 4 of frame 1 -> cell 5


def test_token_layout_with_class_token_kept():
    layout = TokenLayout(2, 17, (4, 4), first_cell=-1)  # CLIP with cls_patch: token 0 is the class token
    assert layout.row[0].item() == -1 and layout.row[1].item() == 0 and layout.col[16].item() == 3


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_runs_close_to_fp32(dtype):
    module = make("groupresampler", num_queries=8, group=2)
    x = torch.randn(1, 4, 15, DV)
    with torch.no_grad():
        ref = module(x).tokens
        low = module.to(dtype)(x.to(dtype)).tokens
    assert low.dtype == dtype and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max().item() < 0.15


def test_mlp_connector_keeps_every_token():
    module = make("mlp2x_gelu")
    out = module(torch.randn(1, 3, 15, DV))
    assert out.tokens.shape == (1, 45, D) and out.attentions is None
    assert out.query_groups.tolist()[:16] == [0] * 15 + [1]


def _count_resample_calls(module, monkeypatch) -> list[int]:
    """Record the number of chunks each `resample` call gets (one call per slice on the CPU path)."""
    calls, original = [], module.resample

    def counting(chunks, *args, **kwargs):
        calls.append(chunks.shape[0])
        return original(chunks, *args, **kwargs)

    monkeypatch.setattr(module, "resample", counting)
    return calls


@pytest.mark.parametrize("chunks_per_slice", [1, 2, 4])
def test_group_resampler_in_several_cpu_slices_matches_reference(monkeypatch, chunks_per_slice):
    """The CPU path that feeds the B x G chunks through the Perceiver a few at a time (`_resample_in_slices`; the
    full-size model on CPU takes it) with unequal groups (63 tokens in 5 groups: 13, 13, 13, 12, 12, so masks
    are sliced too), batch 3 and slices that cross from one sample's groups into the next one's."""
    batch, frames, tokens, group = 3, 7, 9, 5
    module = make("groupresampler", num_queries=4 * group, group=group)
    longest = max(group_sizes(frames * tokens, group))
    assert len(set(group_sizes(frames * tokens, group))) == 2
    inner = module.layers[0][0].to_kv.out_features
    module.cpu_slice_bytes = chunks_per_slice * longest * inner * 4  # fp32 key/value activations of k chunks
    calls = _count_resample_calls(module, monkeypatch)
    x = torch.randn(batch, frames, tokens, DV)
    with torch.no_grad():
        ours = module(x).tokens
        ref = ref_group(state(module), x.reshape(batch, frames * tokens, DV), group)
    assert sum(calls) == batch * group and max(calls) <= chunks_per_slice
    assert len(calls) == -(-batch * group // chunks_per_slice) > 1  # really several slices
    assert ours.shape == (batch, 4 * group, D)
    assert (ours - ref).abs().max().item() < 1e-5


def test_image_level_resampler_in_several_cpu_slices_matches_reference(monkeypatch):
    """The same slicing with equal chunks (one per frame, no mask), batch 2, against the per-frame reference."""
    module = make("resampler", num_queries=4)
    module.cpu_slice_bytes = 3 * 15 * module.layers[0][0].to_kv.out_features * 4  # 3 frames a slice
    calls = _count_resample_calls(module, monkeypatch)
    x = torch.randn(2, 5, 15, DV)
    with torch.no_grad():
        ours = module(x).tokens
        ref = ref_image_level(state(module), x.reshape(2, 75, DV), 15)
    assert calls == [3, 3, 3, 1]
    assert (ours - ref).abs().max().item() < 1e-5
