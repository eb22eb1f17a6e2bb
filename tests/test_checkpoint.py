"""Loading and saving the published checkpoint layout (tiny checkpoints written by the tests themselves)."""

from __future__ import annotations

import json
import shutil
import socket

import pytest
import torch
from safetensors.torch import load_file, save_file

from vidlmm.checkpoint import load_model, read_state_dict, save_model
from vidlmm.connectors import GroupResampler, ImageResampler, NaiveResampler
from vidlmm.errors import CheckpointError


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test."""

    def refuse(*args, **kwargs):
        raise AssertionError("network access attempted")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


def published_keys(folder):
    return set(read_state_dict(folder))


@pytest.mark.parametrize("name,cls", [("group", GroupResampler), ("naive", NaiveResampler),
                                      ("legacy", NaiveResampler), ("image", ImageResampler)])
def test_loads_published_layout_strictly_and_offline(tiny_checkpoints, no_network, name, cls):
    folder = tiny_checkpoints[name]
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "tinyllava"
    assert config["tokenizer_name_or_path"] == "Qwen/Qwen2.5-3B"  # never resolved: the folder's files are used
    model = load_model(folder)
    assert isinstance(model.connector._connector, cls)
    saved = published_keys(folder)
    # every saved tensor went into the model under the right name, with the same values
    module_state = model.state_dict()
    for key in saved:
        module_key = key.replace("vision_tower._vision_tower.vision_model.", "vision_tower._vision_tower.")
        assert module_key in module_state, key
    assert model.tokenizer is not None and model.tokenizer.eos_token == "<|endoftext|>"


def test_published_key_names(tiny_checkpoints):
    folder = tiny_checkpoints["group"]
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    keys = set(index["weight_map"])
    assert len(set(index["weight_map"].values())) > 1  # really sharded
    assert "language_model.model.embed_tokens.weight" in keys
    assert "language_model.lm_head.weight" not in keys  # tied: left out, re-tied on load
    assert "vision_tower._vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
    assert "vision_tower._vision_tower.vision_model.head.probe" in keys
    assert {"connector._connector.latents", "connector._connector.layers.0.0.to_kv.weight"} <= keys
    model = load_model(folder)
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()


def test_save_load_round_trip(tiny_checkpoints, tmp_path):
    model = load_model(tiny_checkpoints["naive"])
    out = save_model(model, tmp_path / "copy")
    again = load_model(out)
    a, b = model.state_dict(), again.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert (out / "vocab.json").is_file() or (out / "tokenizer.json").is_file()


def test_split_layout_matches_published(tiny_checkpoints, tmp_path):
    split = load_model(tiny_checkpoints["split"])
    assert not (tiny_checkpoints["split"] / "model.safetensors").exists()
    published = load_model(save_model(split, tmp_path / "pub"))
    a, b = split.state_dict(), published.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def _copy(folder, tmp_path):
    dst = tmp_path / folder.name
    shutil.copytree(folder, dst)
    return dst


def _edit_single_file(folder, edit):
    state = read_state_dict(folder)
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    edit(state)
    save_file(state, folder / "model.safetensors")


def test_unexpected_key_is_an_error_naming_it(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints["naive"], tmp_path)
    _edit_single_file(folder, lambda s: s.__setitem__("connector._connector.extra_proj.weight", torch.zeros(2, 2)))
    with pytest.raises(CheckpointError, match="1 unexpected key.*connector._connector.extra_proj.weight"):
        load_model(folder)


def test_missing_key_is_an_error_naming_it(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints["naive"], tmp_path)
    _edit_single_file(folder, lambda s: s.pop("connector._connector.norm.weight"))
    with pytest.raises(CheckpointError, match="missing key.*connector._connector.norm.weight"):
        load_model(folder)


def test_unused_tower_keys_may_be_absent(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints["naive"], tmp_path)
    level = "vision_tower._vision_tower.vision_model."
    _edit_single_file(folder, lambda s: [s.pop(k) for k in list(s) if k.startswith((level + "head.",
                                                                                     level + "post_layernorm."))])
    model = load_model(folder)
    reference = load_model(tiny_checkpoints["naive"])
    pixels = torch.randn(2, 3, 56, 56)
    assert torch.equal(model.encode_frames(pixels), reference.encode_frames(pixels))


def test_wrong_shape_is_an_error(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints["naive"], tmp_path)
    _edit_single_file(folder, lambda s: s.__setitem__("connector._connector.latents", torch.zeros(3, 64)))
    with pytest.raises((CheckpointError, RuntimeError), match="latents"):
        load_model(folder)


def test_missing_shard_is_an_error(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints["group"], tmp_path)
    sorted(folder.glob("model-*.safetensors"))[0].unlink()
    with pytest.raises(CheckpointError, match="missing"):
        load_model(folder)


def test_not_a_checkpoint_and_unknown_hub_id(tmp_path, no_network):
    with pytest.raises(CheckpointError, match="no config.json"):
        load_model(tmp_path)
    with pytest.raises(CheckpointError, match="neither a checkpoint folder nor a hub id"):
        load_model(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="offline"):
        load_model("Zhang199/TinyLLaVA-Video-Qwen2.5-3B-Group-16-512")


def test_bf16_checkpoint_and_dtype_option(tiny_checkpoints, tmp_path):
    model = load_model(tiny_checkpoints["group"])
    folder = save_model(model, tmp_path / "bf16", dtype=torch.bfloat16)
    stored = load_file(folder / "model.safetensors")
    assert stored["connector._connector.latents"].dtype == torch.bfloat16
    assert load_model(folder).dtype == torch.float32  # fp32 on CPU by default: the reference's numerics
    assert load_model(folder, dtype="bf16").dtype == torch.bfloat16
    with pytest.raises(CheckpointError, match="Unknown dtype"):
        load_model(folder, dtype="int3")


def test_parameter_counts_per_part(tiny_checkpoints):
    counts = load_model(tiny_checkpoints["group"]).parameter_counts()
    assert set(counts) == {"vision_tower", "connector", "language_model"}
    d, dv, inner = 64, 32, 512
    per_layer = 2 * (2 * d) + d * inner + d * 2 * inner + inner * d + 2 * d + d * 4 * d + 4 * d * d
    assert counts["connector"] == 16 * d + (dv * d + d) + 3 * per_layer + 2 * d


def test_full_size_connector_parameter_counts_match_the_paper():
    # spec §1.5: Qwen2.5-3B (D=2048) naive 116,697,088 and group 115,714,048 parameters
    from vidlmm.connectors import create_connector

    with torch.device("meta"):
        naive = create_connector("naiveresampler", vision_hidden_size=1152, hidden_size=2048, num_queries=512)
        group = create_connector("groupresampler", vision_hidden_size=1152, hidden_size=2048, num_queries=512,
                                 group=16)
    assert sum(p.numel() for p in naive.parameters()) == 116_697_088
    assert sum(p.numel() for p in group.parameters()) == 115_714_048
