"""A connector added the way a researcher adds one: a class and its registration, in this file only.

Loading, asking, attention maps, the token budget, zeroing curves, the app's resampler switch, preview and compare
must all work on it with no other file of the project knowing its name: everything they need, the connector says
about itself (`ConnectorModule`). Registered for this module only, so other test files never see it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from vidlmm.connectors import (
    CONNECTORS, BudgetControls, ConnectorModule, ConnectorOutput, LayerAttention, register_connector,
)

NAME = "framequerypool"
LABEL = "frame query pooling (test)"
QUERIES = 2  # per frame


class FrameQueryPool(ConnectorModule):
    """Each frame is read by `num_queries` learned queries, one single-head softmax attention over its patches
    (keys through `key`, values the features themselves), then projected to the LLM: T * num_queries tokens."""

    label = LABEL
    short_name = "fqpool"

    def __init__(self, *, vision_hidden_size: int, hidden_size: int, num_queries: int = QUERIES, **_):
        super().__init__()
        self.num_queries = int(num_queries)
        self.latents = nn.Parameter(torch.randn(self.num_queries, vision_hidden_size))
        self.key = nn.Linear(vision_hidden_size, vision_hidden_size)
        self.proj = nn.Linear(vision_hidden_size, hidden_size)

    def num_output_tokens(self, num_frames: int, tokens_per_frame: int) -> int:
        return num_frames * self.num_queries

    def budget_controls(self) -> BudgetControls:
        return BudgetControls(queries=self.num_queries, queries_unit="per frame")

    def _budget_settings(self, *, groups, queries, frame_tokens, num_visual):
        if not 1 <= queries <= self.latents.shape[0]:
            raise ValueError(f"Queries must be between 1 and {self.latents.shape[0]} for this model.")
        kwargs = dict(vision_hidden_size=self.key.in_features, hidden_size=self.proj.out_features, num_queries=queries)
        return kwargs, {"latents": nn.Parameter(self.latents[:queries].detach(), requires_grad=False)}

    def forward(self, x, output_attentions: bool = False) -> ConnectorOutput:
        b, t, p, d = x.shape
        q = self.num_queries
        frames = x.reshape(b * t, p, d)
        weights = (self.latents @ self.key(frames).transpose(1, 2) / d**0.5).softmax(-1)  # [B*T, Q, P]
        tokens = self.proj(weights @ frames).reshape(b, t * q, -1)
        layers = None
        if output_attentions:
            w = weights.reshape(b, t, q, p)
            media = w.new_zeros(b, 1, t * q, t * p)
            for f in range(t):
                media[:, 0, f * q:(f + 1) * q, f * p:(f + 1) * p] = w[:, f]
            layers = [LayerAttention(media=media, latents=w.new_zeros(b, 1, t * q, 0))]
        return ConnectorOutput(tokens, self.output_groups(t, p), [(f * p, (f + 1) * p) for f in range(t)], layers)


@pytest.fixture(scope="module")
def registered():
    register_connector(NAME)(FrameQueryPool)
    try:
        yield FrameQueryPool
    finally:
        del CONNECTORS[NAME]


@pytest.fixture(scope="module")
def models(registered, tiny_checkpoints, tmp_path_factory):
    """An embedded-models folder holding a checkpoint of the new connector beside a group resampler."""
    from vidlmm.tiny import write_tiny_checkpoint

    root = tmp_path_factory.mktemp("new-connector-models")
    write_tiny_checkpoint(root / "fqpool", NAME, seed=3, num_queries=QUERIES, initializer_range=0.2)
    (root / "group").symlink_to(tiny_checkpoints["group"], target_is_directory=True)
    return root


@pytest.fixture(scope="module")
def lmm(models):
    from vidlmm.checkpoint import load_model
    from vidlmm.pipeline import VideoLMM
    from vidlmm.video import FrameSampling

    return VideoLMM(load_model(models / "fqpool"), sampling=FrameSampling(num_frames=4))


def test_checkpoint_round_trip_and_ask(lmm, models, small_video, tmp_path):
    from vidlmm.checkpoint import load_model, read_state_dict, save_model
    from vidlmm.pipeline import GenerationSettings

    model = lmm.model
    assert isinstance(model.connector, FrameQueryPool)
    assert json.loads((models / "fqpool" / "config.json").read_text())["connector_type"] == NAME
    stored = read_state_dict(models / "fqpool")
    assert {"connector._connector.latents", "connector._connector.key.weight", "connector._connector.proj.weight"} \
        <= set(stored)  # the published layout's connector prefix
    assert torch.equal(stored["connector._connector.latents"], model.connector.latents)
    again = load_model(save_model(model, tmp_path / "copy"))
    assert all(torch.equal(v, again.state_dict()[k]) for k, v in model.state_dict().items())
    answer = lmm.ask(small_video, "What moves?", generation=GenerationSettings(max_new_tokens=4))
    assert answer.num_visual_tokens == 4 * QUERIES == model.num_visual_tokens(4)
    assert answer.token_ids and len(answer.token_ids) <= 4


def test_attention_maps_and_token_budget(lmm, models, small_video):
    from vidlmm.analysis import attention_maps, connector_setting, redundancy_stats, token_budget
    from vidlmm.budget import TokenBudget, token_counts

    maps = attention_maps(lmm, small_video)
    assert maps.connector_type == NAME and maps.media.shape[-2:] == (4 * QUERIES, 4 * maps.layout.tokens_per_frame)
    p = maps.layout.tokens_per_frame
    for query in range(4 * QUERIES):  # each query's attention sums to 1 over its own frame, 0 elsewhere
        frame = query // QUERIES
        row = maps.media[0, 0, query]
        assert row[frame * p:(frame + 1) * p].sum() == pytest.approx(1.0, abs=1e-5)
        assert np.count_nonzero(np.delete(row, np.s_[frame * p:(frame + 1) * p])) == 0
    assert redundancy_stats(maps)["summary"]["groups"] == 4
    model = lmm.model
    assert token_counts(model.connector, TokenBudget(queries=1, active_fraction=0.5, strategy="groups"), 4, p) == (4, 2)
    features = torch.randn(4, p, model.config.vision_hidden_size)
    out = model.connect(features, budget=TokenBudget(queries=1))
    assert out.tokens.shape[1] == 4 and out.query_groups.tolist() == [0, 1, 2, 3]
    assert torch.equal(out.tokens, model.connector.at_budget(queries=1)(features[None]).tokens)
    assert model.connector.latents.shape[0] == QUERIES  # the loaded connector is unchanged
    with pytest.raises(ValueError, match="no groups to set"):
        model.connect(features, budget=TokenBudget(groups=2))
    rows = token_budget({"new": models / "fqpool"}, frames=(1, 8))
    assert [r["visual_tokens"] for r in rows.rows] == [QUERIES, 8 * QUERIES]
    assert connector_setting(model.config) == f"{NAME}, {QUERIES} queries"


def test_zeroing_curve(lmm, small_video):
    from vidlmm.analysis import zeroing_curve

    result = zeroing_curve(lmm, small_video, "What moves?", fractions=(1.0, 0.5), strategies=("groups",),
                           seeds=(0,), max_new_tokens=4)
    assert result.connector_type == NAME
    full = [pt for pt in result.points if pt["fraction"] == 1.0]
    assert full and all(pt["delta_log_likelihood"] == 0 for pt in full)
    assert any(pt["fraction"] == 0.5 for pt in result.points)


def test_the_app_offers_it(models, small_video):
    from app.config import AppConfig
    from app.models import resampler_switch
    from app.service import Service
    from app.session import Session
    from app.ui import build_ui
    from vidlmm.budget import TokenBudget
    from vidlmm.video import FrameSampling

    assert resampler_switch()["fqpool"] is FrameQueryPool
    config = AppConfig(model=str(models / "fqpool"), models_dir=str(models), hub_models=False, preload=False,
                       host="127.0.0.1")
    service = Service(config)
    assert {c.value: c.connector for c in service.choices}["fqpool"] == NAME
    demo = build_ui(service, config)
    radios = [b for b in demo.blocks.values() if type(b).__name__ == "Radio"]
    assert any((LABEL, "fqpool") in [tuple(c) for c in r.choices] for r in radios)  # the switch lists it
    sampling = FrameSampling(num_frames=4)
    preview = service.preview(small_video, "fqpool", sampling, TokenBudget(queries=1))
    assert (preview.visual_tokens, preview.active_tokens) == (4, 4) and preview.details["untrained_setting"]
    assert service.budget_info("fqpool")["queries"] == QUERIES
    session = Session()
    figures = service.attention(session, small_video, model="fqpool", sampling=sampling)
    assert figures.data["connector"] == NAME
    compared = service.compare(session, small_video, "What moves?", models=["fqpool", "group"], sampling=sampling)
    assert [row["connector"] for row in compared.data["rows"]] == [NAME, "groupresampler"]
    assert compared.data["rows"][0]["visual_tokens"] == 4 * QUERIES
