"""vidlmm.analysis on tiny checkpoints: attention maps, the token map, redundancy statistics, query zeroing and
the token budget. Models are random, so only structure is checked, never answer quality."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from tests.videos import make_moving_square_frames, write_video
from vidlmm.analysis import (STRATEGIES, AttentionMaps, ZeroingResult, attention_maps, connector_variants,
                             query_group_spans, redundancy_stats, token_budget, zero_mask, zero_tokens,
                             zeroing_curve, zeroing_mc_curve)
from vidlmm.checkpoint import load_model
from vidlmm.connectors import create_connector, group_sizes
from vidlmm.errors import VidlmmError
from vidlmm.evaluate import MCItem
from vidlmm.pipeline import VideoLMM
from vidlmm.video import FrameSampling

SIXTEEN = FrameSampling.uniform(16)


def lmm_for(path, cache_bytes=64 * 1024**2, **connector):
    """A VideoLMM over a fresh copy of a tiny checkpoint; `connector` kwargs swap in a new group resampler."""
    model = load_model(path, dtype="fp32", device="cpu")
    if connector:
        torch.manual_seed(0)
        model.connector = create_connector(
            "groupresampler", vision_hidden_size=model.config.vision_hidden_size,
            hidden_size=model.config.hidden_size, **connector).eval()
    return VideoLMM(model, sampling=SIXTEEN, cache_bytes=cache_bytes)


@pytest.fixture(scope="module")
def lmms(tiny_checkpoints):
    return {name: lmm_for(tiny_checkpoints[name]) for name in ("group", "naive", "image")}


@pytest.fixture(scope="module")
def maps(lmms, small_video):
    return {name: attention_maps(lmm, small_video) for name, lmm in lmms.items()}


def count_tower_calls(model) -> list:
    calls = []
    forward = model.vision_tower.forward

    def counted(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    model.vision_tower.forward = counted
    return calls


# ---- attention ------------------------------------------------------------------------------------------------

def test_shapes_and_metadata(maps):
    m = maps["group"]
    assert m.media.dtype == np.float32 and m.media.shape == (3, 8, 64, 16 * 15)
    assert m.latents.shape == (3, 8, 64, 16)  # 64 queries in 4 groups of 16 latents
    assert m.frames.shape[0] == 16 and len(m.frame_indices) == len(m.timestamps) == 16
    assert m.grid == (4, 4) and m.tokens.shape == (64, 64)
    assert m.connector_type == "groupresampler" and m.group_spans == [(0, 60), (60, 120), (120, 180), (180, 240)]
    assert m.layer().shape == (64, 240) and m.layer(0, head=3).shape == (64, 240)
    assert np.array_equal(m.layer(0, head=0), m.media[0, 0])  # head 0 is a head
    assert m.spatial().shape == (16, 4, 4) and m.temporal_profile().shape == (4, 16)
    # the tower's square view of each frame, drawn at the source's 96x72 shape (SigLIP squashes the whole frame)
    assert m.frames.shape[1:] == (56, 56, 3) and m.frame_aspect == pytest.approx(96 / 72)


def test_group_query_attends_only_to_its_own_group(maps):
    m = maps["group"]
    for q, g in enumerate(m.query_groups):
        start, end = m.group_spans[g]
        outside = np.concatenate([m.media[:, :, q, :start], m.media[:, :, q, end:]], axis=-1)
        assert np.all(outside == 0.0), f"query {q} leaks out of group {g}"
        assert np.all(m.media[:, :, q, start:end] > 0)
    profile = m.temporal_profile()
    frames_of_group = [sorted({t // 15 for t in range(s, e)}) for s, e in m.group_spans]
    for g, frames in enumerate(frames_of_group):
        assert np.all(profile[g, frames] > 0)
        assert np.all(np.delete(profile[g], frames) == 0.0)


def test_naive_queries_spread_over_every_frame(maps):
    m = maps["naive"]
    assert m.group_spans == [(0, 240)] and set(m.query_groups.tolist()) == {0}
    for layer in range(m.num_layers):
        per_frame = m.layer(layer).reshape(m.num_queries, 16, 15).sum(-1)
        assert np.all(per_frame > 0), "a naive query ignores a frame entirely"
    assert m.temporal_profile().shape == (1, 16)


@pytest.mark.parametrize("name", ["group", "naive", "image"])
def test_attention_rows_sum_to_one(maps, name):
    m = maps[name]
    total = m.media.astype(np.float64).sum(-1) + m.latents.astype(np.float64).sum(-1)
    assert np.abs(total - 1.0).max() < 1e-6
    for layer in range(m.num_layers):
        assert np.abs(m.layer(layer).sum(-1) + m.latent_share(layer) - 1.0).max() < 1e-6


def test_image_level_groups_are_frames(maps):
    m = maps["image"]
    assert m.group_spans == [(15 * t, 15 * t + 15) for t in range(16)]
    profile = m.temporal_profile()
    assert profile.shape == (16, 16)
    assert np.all(profile[~np.eye(16, dtype=bool)] == 0.0) and np.all(np.diag(profile) > 0)


def test_token_map_sixteen_frames_sixteen_groups(tiny_checkpoints, small_video):
    m = attention_maps(lmm_for(tiny_checkpoints["group"], num_queries=32, group=16), small_video)
    assert m.group_spans == [(15 * g, 15 * g + 15) for g in range(16)]  # one group per frame
    layout = m.layout
    assert layout.frame.tolist() == [t for t in range(16) for _ in range(15)]
    # SigLIP with the `patch` strategy drops cell 0: a frame's tokens are cells 1..15 of the 4 x 4 grid
    assert (layout.row[0].item(), layout.col[0].item()) == (0, 1)
    assert (layout.row[3].item(), layout.col[3].item()) == (1, 0)
    assert (layout.row[14].item(), layout.col[14].item()) == (3, 3)
    for g in range(16):
        grid = m.spatial(group=g)
        assert np.all(np.isnan(grid[:, 0, 0]))  # the dropped cell, put back as NaN
        cells = grid.reshape(16, 16)[:, 1:]
        assert np.all(cells[g] > 0) and np.all(np.delete(cells, g, axis=0) == 0.0)
    assert np.all(m.temporal_profile()[~np.eye(16, dtype=bool)] == 0.0)


@pytest.mark.parametrize("groups", [3, 7])
def test_token_map_when_groups_split_frames(tiny_checkpoints, small_video, groups):
    m = attention_maps(lmm_for(tiny_checkpoints["group"], num_queries=2 * groups, group=groups), small_video)
    sizes = group_sizes(240, groups)
    starts = np.cumsum([0] + sizes)
    assert m.group_spans == [(int(a), int(b)) for a, b in zip(starts[:-1], starts[1:])]
    for g, (start, end) in enumerate(m.group_spans):
        inside = torch.zeros(240)
        inside[start:end] = 1.0
        expected = m.layout.to_grid(inside).numpy()  # where this group's tokens sit: frame, row, col
        got = m.spatial(group=g)
        assert np.array_equal(np.isnan(got), np.isnan(expected))
        assert np.all(got[expected == 1] > 0) and np.all(got[expected == 0] == 0.0)
    if groups == 7:  # 35, 35, 34, ...: group 1 = tokens 35..69 = frame 2 from cell 6, frame 3, frame 4 up to cell 10
        got = m.spatial(group=1).reshape(16, 16)
        assert np.all(got[2, 1:6] == 0) and np.all(got[2, 6:] > 0)
        assert np.all(got[3, 1:] > 0)
        assert np.all(got[4, 1:11] > 0) and np.all(got[4, 11:] == 0)
        assert np.all(got[[0, 1, 5], 1:] == 0)


@pytest.mark.filterwarnings("ignore:Mean of empty slice")
def test_spatial_selection_and_errors(maps):
    m = maps["group"]
    q0 = m.spatial(query=0)
    assert np.nansum(q0) == pytest.approx(float(m.layer()[0].sum()), rel=1e-5)
    assert np.allclose(m.spatial(), np.nanmean(np.stack([m.spatial(query=q) for q in range(64)]), 0),
                       equal_nan=True, atol=1e-7)
    for bad in (dict(layer=3), dict(head=8), dict(query=64), dict(group=9), dict(query=0, group=0)):
        with pytest.raises(VidlmmError):
            m.spatial(**bad)


def test_connector_without_attention_says_so(tiny_checkpoints, small_video):
    lmm = lmm_for(tiny_checkpoints["naive"])
    lmm.model.connector = create_connector("mlp2x_gelu", vision_hidden_size=32, hidden_size=64)
    with pytest.raises(VidlmmError, match="no attention"):
        attention_maps(lmm, small_video)


def test_attention_json_is_strict_json(maps):
    data = maps["group"].to_json()
    text = json.dumps(data, allow_nan=False)  # NaN cells became null
    assert data["num_queries"] == 64 and len(data["layers"]) == 3
    assert data["layers"][-1]["spatial_mean"][0][0][0] is None
    assert "null" in text
    rows = maps["group"].rows()
    assert len(rows) == 4 * 16 and set(rows[0]) == {"group", "frame", "frame_index", "timestamp_s", "attention_mass"}


# ---- redundancy statistics ------------------------------------------------------------------------------------

def test_redundancy_stats(maps):
    s = redundancy_stats(maps["group"])
    q = 64
    assert s["overlap"].shape == (q, q) and s["cosine"].shape == (q, q)
    assert np.allclose(np.diag(s["overlap"]), 1.0, atol=1e-5) and np.allclose(np.diag(s["cosine"]), 1.0, atol=1e-5)
    across = s["query_groups"][:, None] != s["query_groups"][None, :]
    assert np.all(s["overlap"][across] == 0.0)  # different groups see disjoint tokens
    assert s["summary"]["overlap_across_groups_mean"] == 0.0
    assert np.all((s["entropy_normalized"] >= 0) & (s["entropy_normalized"] <= 1 + 1e-6))
    assert 1.0 <= s["summary"]["effective_tokens"] <= q
    assert len(s["rows"]) == q and s["layer"] == 2
    naive = redundancy_stats(maps["naive"], layer=0)
    assert naive["layer"] == 0 and np.isnan(naive["summary"]["overlap_across_groups_mean"])
    assert naive["summary"]["overlap_mean"] > 0


def hand_made_maps(tokens) -> AttentionMaps:
    """Attention written by hand: one layer, two heads, two groups of unequal size (visual tokens 0-3 and 4-9), two
    queries each, and one latent column.

    q0: in both heads 0.2 on the latent and 0.2 on each of tokens 0-3 (uniform over its group, after the latent)
    q1: the same distribution as q0
    q2: 1/6 on each of tokens 4-9 (uniform over its group), nothing on the latent
    q3: head 0 all on token 4, head 1 all on token 5: the head mean is 1/2 on tokens 4 and 5
    """
    from vidlmm.analysis import AttentionMaps
    from vidlmm.connectors import TokenLayout

    media = np.zeros((1, 2, 4, 10))
    latents = np.zeros((1, 2, 4, 1))
    media[0, :, 0, 0:4] = media[0, :, 1, 0:4] = 0.2
    latents[0, :, 0:2, 0] = 0.2
    media[0, :, 2, 4:10] = 1 / 6
    media[0, 0, 3, 4] = media[0, 1, 3, 5] = 1.0
    return AttentionMaps(media=media, latents=latents, layout=TokenLayout(2, 5, (2, 3), 1),
                         query_groups=np.array([0, 0, 1, 1]), group_spans=[(0, 4), (4, 10)],
                         frames=np.zeros((2, 6, 6, 3), np.uint8), frame_indices=[0, 1], timestamps=[0.0, 0.5],
                         grid=(2, 3), tokens=np.asarray(tokens, np.float64), connector_type="groupresampler")


def test_redundancy_stats_equal_hand_computed_values():
    s = redundancy_stats(hand_made_maps(np.eye(4)))
    # entropy (nats) of each query's visual attention, renormalised to sum 1 (q0 and q1 drop their latent share)
    log = np.log
    assert s["entropy"] == pytest.approx([log(4), log(4), log(6), log(2)], abs=1e-6)
    # normalised by the log of the tokens the query's own group holds: 4 for q0 and q1, 6 for q2 and q3, so
    # uniform attention within a group is 1 whatever the group's size
    assert s["entropy_normalized"] == pytest.approx([1, 1, 1, log(2) / log(6)], abs=1e-6)
    # Bhattacharyya overlap: identical 1, disjoint 0, q2 and q3 share tokens 4 and 5: 2 * sqrt(1/6 * 1/2)
    expected = np.eye(4)
    expected[0, 1] = expected[1, 0] = 1.0
    expected[2, 3] = expected[3, 2] = 2 * np.sqrt(1 / 6 * 1 / 2)
    assert s["overlap"] == pytest.approx(expected, abs=1e-6)
    assert s["latent_share"] == pytest.approx([0.2, 0.2, 0.0, 0.0], abs=1e-6)
    summary = s["summary"]
    assert summary["overlap_within_group_mean"] == pytest.approx((1 + 1 + 2 * expected[2, 3]) / 4, abs=1e-6)
    assert summary["overlap_across_groups_mean"] == 0.0
    assert summary["entropy_mean"] == pytest.approx((2 * log(4) + log(6) + log(2)) / 4, abs=1e-6)
    assert summary["latent_share_mean"] == pytest.approx(0.1, abs=1e-6)
    assert [(r["query"], r["group"]) for r in s["rows"]] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert s["rows"][2]["overlap_mean"] == pytest.approx(expected[2, 3] / 3, abs=1e-6)  # mean over the 3 others


@pytest.mark.parametrize("tokens, cosine_mean, effective", [
    # orthogonal tokens of different lengths: cosine = I, eigenvalues 1, 1, 1, 1: (sum)^2 / sum of squares = Q
    (np.diag([1.0, 2.0, 3.0, 4.0]), 0.0, 4.0),
    # parallel tokens (any positive lengths): cosine all 1, eigenvalues 4, 0, 0, 0: 16 / 16 = 1
    (np.outer([1.0, 2.0, 0.5, 3.0], [1.0, -2.0, 0.5, 0.0]), 1.0, 1.0),
    # two orthogonal pairs of parallel tokens: eigenvalues 2, 2, 0, 0: 16 / 8 = 2; 4 of the 12 ordered pairs: cosine 1
    (np.array([[1.0, 0, 0], [3.0, 0, 0], [0, 2.0, 0], [0, 5.0, 0]]), 4 / 12, 2.0),
    # three parallel tokens and one orthogonal to them: eigenvalues 3, 1, 0, 0: 16 / 10 (not sum / max = 4 / 3)
    (np.array([[1.0, 0], [2.0, 0], [5.0, 0], [0, 1.0]]), 6 / 12, 1.6),
])
def test_effective_tokens_and_cosine_equal_hand_computed_values(tokens, cosine_mean, effective):
    from vidlmm.analysis import token_redundancy

    s = redundancy_stats(hand_made_maps(tokens))["summary"]
    t = token_redundancy(tokens)["summary"]
    for summary in (s, t):
        assert summary["effective_tokens"] == pytest.approx(effective, abs=1e-6)
        assert summary["cosine_mean"] == pytest.approx(cosine_mean, abs=1e-6)


# ---- zeroing masks --------------------------------------------------------------------------------------------

def test_zero_mask_strategies():
    spans = query_group_spans(np.repeat(np.arange(4), 16))
    assert spans == [(0, 16), (16, 32), (32, 48), (48, 64)]
    for strategy in STRATEGIES:
        assert zero_mask(64, 1.0, strategy, group_spans=spans).all()
        assert not zero_mask(64, 0.0, strategy, group_spans=spans).any()
        for fraction in (0.75, 0.5, 0.25):
            assert zero_mask(64, fraction, strategy, group_spans=spans).sum() == 64 * fraction
    assert zero_mask(64, 0.25, "contiguous").tolist() == [True] * 16 + [False] * 48
    groups = zero_mask(64, 0.5, "groups", seed=3, group_spans=spans)
    per_group = groups.reshape(4, 16)
    assert sorted(per_group.sum(1).tolist()) == [0, 0, 16, 16]  # whole groups kept or zeroed
    even = zero_mask(64, 0.25, "even", group_spans=spans).reshape(4, 16)
    assert even.sum(1).tolist() == [4, 4, 4, 4] and np.flatnonzero(even[0]).tolist() == [2, 6, 10, 14]
    a, b = zero_mask(64, 0.5, "random", seed=0), zero_mask(64, 0.5, "random", seed=1)
    assert not np.array_equal(a, b) and np.array_equal(a, zero_mask(64, 0.5, "random", seed=0))
    # no groups (or the naive resampler's single one): 16 equal chunks stand in for them
    for no_groups in (None, [(0, 32)]):
        chunks = zero_mask(32, 0.5, "groups", seed=0, group_spans=no_groups).reshape(16, 2).sum(1)
        assert sorted(chunks.tolist()) == [0] * 8 + [2] * 8
    assert zero_mask(64, 0.0625, "even").sum() == 16  # at least one token in each of the 16 chunks
    assert zero_mask(10, 0.01, "random").sum() == 1  # a positive fraction keeps at least one token
    with pytest.raises(VidlmmError):
        zero_mask(64, 0.5, "middle")
    with pytest.raises(VidlmmError):
        zero_mask(64, 1.5, "random")


def test_zero_tokens_keeps_positions():
    tokens = torch.randn(8, 4)
    mask = np.array([1, 0, 1, 0, 1, 1, 0, 0], dtype=bool)
    out = zero_tokens(tokens, mask)
    assert out.shape == tokens.shape
    assert torch.equal(out[mask], tokens[mask]) and torch.all(out[~mask] == 0)
    assert torch.equal(zero_tokens(tokens, np.ones(8, bool)), tokens)


# ---- zeroing curves -------------------------------------------------------------------------------------------

def test_full_zeroing_reproduces_the_model_exactly(lmms, small_video):
    lmm = lmms["group"]
    prepared, _ = lmm.prepare(small_video)
    tokens = lmm.visual_tokens(prepared).tokens[0]
    kept = zero_tokens(tokens, np.ones(tokens.shape[0], bool))
    assert torch.equal(kept, tokens)
    question = "What moves in the video?"
    from vidlmm.pipeline import GenerationSettings

    settings = GenerationSettings(max_new_tokens=12)
    plain = lmm.ask(small_video, question, generation=settings)
    zeroed = lmm.ask(small_video, question, generation=settings, visual=kept)
    assert zeroed.token_ids == plain.token_ids and zeroed.text == plain.text
    result = zeroing_curve(lmm, small_video, question, fractions=(1.0, 0.5), seeds=(0, 1), max_new_tokens=12,
                           regenerate=True)
    assert result.reference["answer_token_ids"] == plain.token_ids
    assert result.reference["teacher_forced_reproduces_answer"]
    # the full model's log-likelihood of its answer, computed here on its own: one teacher-forced pass, log-softmax
    # over the vocabulary at each answer position
    ids, a = lmm.prompt_ids(question) + plain.token_ids, len(plain.token_ids)
    embeds, mask, _ = lmm.model.build_inputs([ids], [lmm.visual_tokens(prepared)])
    with torch.no_grad():
        logits = lmm.model(embeds, mask).logits[0, -a - 1:-1].float()
    expected = torch.log_softmax(logits, dim=-1)[torch.arange(a), torch.tensor(plain.token_ids)].sum().item()
    assert [p["log_likelihood"] for p in result.points if p["fraction"] == 1.0][0] == pytest.approx(expected, abs=1e-3)
    for p in result.points:
        if p["fraction"] == 1.0:
            assert p["delta_log_likelihood"] == 0.0 and p["relative_likelihood"] == 1.0
            assert p["answer_changed"] == 0.0 and p["answer"] == plain.text
        # the teacher-forced greedy check agrees with really generating the zeroed model's answer
        assert (p["first_divergence"] >= 0) == bool(p["answer_changed"])


def test_full_curve_encodes_the_video_once(tiny_checkpoints, small_video):
    lmm = lmm_for(tiny_checkpoints["naive"], cache_bytes=0)  # no cache: reuse must come from the curve itself
    calls = count_tower_calls(lmm.model)
    seen = []
    result = zeroing_curve(lmm, small_video, "Describe the video.", max_new_tokens=6, name="naive",
                           progress=lambda done, total, msg: seen.append((done, total)))
    assert len(calls) == 1
    assert len(result.points) == 6 * 4 * 3 and result.kind == "likelihood" and result.model == "naive"
    assert seen[-1][0] == seen[-1][1] == result.reference["masks_evaluated"] < 6 * 4 * 3
    halves = [p["kept_tokens"] for p in result.points if p["fraction"] == 0.5]
    assert halves == [16] * 12  # every strategy keeps half of the 32 queries, "groups" in 16 chunks of 2
    summary = result.summary()
    assert len(summary) == 24 and all(r["seeds"] == 3 for r in summary)
    for r in summary:
        if r["strategy"] in ("contiguous", "even") or r["fraction"] == 1.0:
            assert r["relative_likelihood_std"] == 0.0  # deterministic masks
        assert 0 < r["relative_likelihood_mean"] and 0 <= r["answer_changed_mean"] <= 1
    full = [r for r in summary if r["fraction"] == 1.0]
    assert all(r["relative_likelihood_mean"] == 1.0 and r["answer_changed_mean"] == 0.0 for r in full)
    data = json.loads(json.dumps(result.to_json(), allow_nan=False))
    again = ZeroingResult.from_json(data)
    assert [r["relative_likelihood_mean"] for r in again.summary()] == \
        pytest.approx([r["relative_likelihood_mean"] for r in summary])
    assert {"model", "strategy", "fraction", "seed", "relative_likelihood"} <= set(result.rows()[0])


@pytest.fixture(scope="module")
def two_videos(tmp_path_factory):
    root = tmp_path_factory.mktemp("mc")
    a = write_video(root / "a.mp4", make_moving_square_frames(20, 48, 64, seed=1), fps=10)
    b = write_video(root / "b.mp4", make_moving_square_frames(20, 48, 64, seed=2), fps=10)
    return root, a, b


def test_mc_curve_encodes_each_video_once(tiny_checkpoints, two_videos):
    root, a, b = two_videos
    opts = ["left", "right", "up"]
    items = [MCItem("0", a, "Where does the square go?", opts, list("ABC"), "B"),
             MCItem("1", b, "Where does the square go?", opts, list("ABC"), "A"),
             MCItem("2", a, "What colour is the square?", ["white", "red"], list("AB"), "A")]
    lmm = lmm_for(tiny_checkpoints["group"], cache_bytes=0)
    calls = count_tower_calls(lmm.model)
    result = zeroing_mc_curve(lmm, items, fractions=(1.0, 0.5, 0.25), strategies=("random", "groups"), seeds=(0, 1),
                              max_new_tokens=4)
    assert len(calls) == 2  # one per video, however many levels, seeds and questions
    assert result.kind == "mc" and result.reference["n"] == 3 and result.reference["videos"] == 2
    assert len(result.points) == 2 * 3 * 2
    for p in result.points:
        assert p["n"] == 3 and 0 <= p["accuracy"] <= 1
        if p["fraction"] == 1.0:
            assert p["agreement"] == 1.0 and p["accuracy"] == result.reference["accuracy"]
    json.dumps(result.to_json(), allow_nan=False)


def test_mc_curve_resumes_from_its_records_and_shards_merge_to_the_one_process_curve(tiny_checkpoints, two_videos,
                                                                                        tmp_path):
    """The curve is a function of its per-question records: a run stopped after one question resumes from them
    (reading only the videos with questions left) to the uninterrupted curve, two shards merge to it, and a records
    file of another plan is refused."""
    from vidlmm.analysis import zeroing_mc_records, zeroing_mc_result

    root, a, b = two_videos
    opts = ["left", "right", "up"]
    items = [MCItem("0", a, "Where does the square go?", opts, list("ABC"), "B"),
             MCItem("1", b, "Where does the square go?", opts, list("ABC"), "A"),
             MCItem("2", a, "What colour is the square?", ["white", "red"], list("AB"), "A")]
    plan = dict(fractions=(1.0, 0.5, 0.25), strategies=("random", "groups"), seeds=(0, 1), max_new_tokens=3)
    lmm = lmm_for(tiny_checkpoints["group"], cache_bytes=0)
    straight = zeroing_mc_curve(lmm, items, **plan).to_json()

    def stop_after_one(done, total, message):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        zeroing_mc_curve(lmm, items, records=tmp_path / "z.jsonl", progress=stop_after_one, **plan)
    assert sum('"record"' in line for line in (tmp_path / "z.jsonl").read_text().splitlines()) == 1
    calls = count_tower_calls(lmm.model)
    assert zeroing_mc_curve(lmm, items, records=tmp_path / "z.jsonl", **plan).to_json() == straight
    assert len(calls) == 2  # video a again (question 2 was left), then b
    assert zeroing_mc_curve(lmm, items, records=tmp_path / "z.jsonl", **plan).to_json() == straight
    assert len(calls) == 2  # everything kept: nothing read

    curve = {k: v for k, v in plan.items() if k != "max_new_tokens"}
    parts = [zeroing_mc_records(lmm, items, shard=(rank, 2), max_new_tokens=3, **curve) for rank in (0, 1)]
    assert sorted(r.video for r in parts[0][0]) == [a, a] and [r.video for r in parts[1][0]] == [b]
    order = {item.id: k for k, item in enumerate(items)}
    merged = sorted(parts[0][0] + parts[1][0], key=lambda r: order[r.id])
    result = zeroing_mc_result(merged, [], style="mvbench", model=straight["model"],
                               connector_type=straight["connector_type"], **curve)
    assert result.to_json() == straight
    with pytest.raises(VidlmmError, match="other settings .*zeroing"):
        zeroing_mc_curve(lmm, items, records=tmp_path / "z.jsonl", **{**plan, "seeds": (0,)})


def test_mc_curve_reads_a_json_file(tiny_checkpoints, two_videos):
    root, a, b = two_videos
    data = [{"video": "a.mp4", "question": "Where?", "options": ["A. left", "B. right"], "answer": "B"}]
    (root / "items.json").write_text(json.dumps(data))
    lmm = lmm_for(tiny_checkpoints["naive"])
    result = zeroing_mc_curve(lmm, str(root / "items.json"), video_root=str(root), fractions=(1.0, 0.5),
                              strategies=("contiguous",), seeds=(0,), max_new_tokens=2)
    assert [p["fraction"] for p in result.points] == [1.0, 0.5]
    with pytest.raises(VidlmmError):
        zeroing_mc_curve(lmm, [], fractions=(1.0,))
    with pytest.raises(VidlmmError):
        zeroing_curve(lmm, a, "q", strategies=("middle",))


# ---- token budget ---------------------------------------------------------------------------------------------

def test_token_budget_matches_the_models(lmms, tiny_checkpoints):
    frames = (1, 2, 4, 16, 64)
    models = {"group": tiny_checkpoints["group"], "naive": lmms["naive"], "image": lmms["image"].model,
              "image config": lmms["image"].model.config}
    budget = token_budget(models, frames=frames, text_tokens=32)
    assert budget.names == list(models)
    for name, model in [("group", lmms["group"].model), ("naive", lmms["naive"].model),
                        ("image", lmms["image"].model)]:
        got_frames, tokens = budget.series(name, "visual_tokens")
        assert got_frames.tolist() == list(frames)
        assert tokens.tolist() == [model.num_visual_tokens(f) for f in frames]
    assert budget.series("image", "visual_tokens")[1].tolist() == [4 * f for f in frames]
    assert np.array_equal(budget.series("image", "visual_tokens")[1], budget.series("image config", "visual_tokens")[1])
    _, flops = budget.series("image", "prefill_gflops")
    assert np.all(np.diff(flops) > 0)
    row = budget.rows[0]
    assert row["sequence_length"] == row["visual_tokens"] + 32 and row["fits_context"] and row["text_tokens"] == 32
    text = lmms["group"].model.config.text_config  # bf16 keys and values of every layer, by hand
    kv_width = text["num_key_value_heads"] * (text["hidden_size"] // text["num_attention_heads"])
    assert row["kv_cache_mib"] == pytest.approx(2 * text["num_hidden_layers"] * row["sequence_length"] * kv_width * 2
                                                / 2**20)
    # prefill: 2 x non-embedding parameters x tokens + causal attention + the LM head, parameters by hand
    h, layers, inter = text["hidden_size"], text["num_hidden_layers"], text["intermediate_size"]
    per_layer = 2 * h * h + 2 * h * kv_width + 3 * h * inter  # q, o; k, v; gate, up, down
    n = row["sequence_length"]
    flops = 2 * per_layer * layers * n + 2 * layers * n**2 * h + 2 * h * text["vocab_size"]
    assert row["prefill_gflops"] == pytest.approx(flops / 1e9)
    variants = token_budget(connector_variants(lmms["group"].model.config), frames=(16,))
    assert [r["visual_tokens"] for r in variants.rows] == [64, 64, 64, 16 * 15]
    json.dumps(budget.to_json(), allow_nan=False)
    with pytest.raises(VidlmmError):
        token_budget({}, frames=(1,))
    with pytest.raises(VidlmmError):
        token_budget({"x": 3.5})


def test_generated_ids_are_cut_after_the_first_end_of_sequence_id(lmms):
    """One owner of EOS trimming (batched answers and zeroing): the config's eos may be one id or a list."""
    from types import SimpleNamespace

    from vidlmm.model import TinyLlavaVideo

    model = lmms["group"].model
    eos = model.config.eos_token_id
    assert model.trim_at_eos([5, eos, eos, eos]) == [5, eos] and model.trim_at_eos([5, 6]) == [5, 6]
    several = SimpleNamespace(config=SimpleNamespace(eos_token_id=[7, 9]))
    assert TinyLlavaVideo.trim_at_eos(several, [1, 9, 7, 2]) == [1, 9]
