"""Loading and saving the published checkpoint layout (tiny checkpoints written by the tests themselves)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vidlmm.checkpoint import load_model, read_state_dict, save_model
from vidlmm.connectors import GroupResampler, ImageResampler, NaiveResampler
from vidlmm.errors import CheckpointError


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
    assert isinstance(model.connector, cls)
    saved = published_keys(folder)
    # every saved tensor went into the model under the right name, with the same values
    module_state = model.state_dict()
    for key in saved:
        module_key = key.replace("vision_tower._vision_tower.vision_model.", "vision_tower._vision_tower.").replace(
            "connector._connector.", "connector.")
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
    shards = sorted(set(index["weight_map"].values()))  # the published naming: 1-based, zero-padded
    assert shards == [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    tensors = read_state_dict(folder)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
    generation = json.loads((folder / "generation_config.json").read_text())
    config = json.loads((folder / "config.json").read_text())
    assert generation["eos_token_id"] == config["text_config"]["eos_token_id"]
    assert generation["bos_token_id"] == config["text_config"].get("bos_token_id", generation["eos_token_id"])
    model = load_model(folder)
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()


def test_save_load_round_trip(tiny_checkpoints, tmp_path):
    model = load_model(tiny_checkpoints["naive"])
    out = save_model(model, tmp_path / "new" / "copy")  # parents are made
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
    with pytest.raises(CheckpointError, match=r"'connector._connector.latents' is \[3, 64\] in the file"):
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


# ------------------------------------------------------------------ weight files stay inside the folder
def _point_first_shard_at(folder, new_name):
    """Rewrite the index so the first shard's keys are read from `new_name`; returns the old shard's path."""
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    index["weight_map"] = {k: (new_name if v == first else v) for k, v in index["weight_map"].items()}
    index_path.write_text(json.dumps(index))
    return folder / first


def _assert_one_sentence_without_paths(err, *paths):
    message = str(err)
    assert "\n" not in message and message.endswith(".")
    for path in paths:
        assert str(path) not in message, message


def test_shard_named_with_dotdot_is_refused(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints["group"], tmp_path)
    shard = _point_first_shard_at(folder, "../stolen.safetensors")
    shutil.copy(shard, tmp_path / "stolen.safetensors")  # it exists: only the name is wrong
    with pytest.raises(CheckpointError, match="names weight file 'stolen.safetensors' outside its folder") as info:
        load_model(folder)
    _assert_one_sentence_without_paths(info.value, tmp_path)


def test_shard_named_by_absolute_path_is_refused(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints["group"], tmp_path)
    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(_point_first_shard_at(folder, str(outside)), outside)
    with pytest.raises(CheckpointError, match="outside its folder") as info:
        load_model(folder)
    _assert_one_sentence_without_paths(info.value, tmp_path)


def test_shard_symlinked_outside_is_refused(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints["group"], tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[0]
    outside = tmp_path / "outside.safetensors"
    shard.rename(outside)
    shard.symlink_to(outside)
    with pytest.raises(CheckpointError, match=f"'{shard.name}' linking outside its folder") as info:
        load_model(folder)
    _assert_one_sentence_without_paths(info.value, tmp_path)


def test_hub_cache_layout_with_links_into_blobs_loads(tiny_checkpoints, tmp_path):
    """huggingface_hub stores snapshots/<commit>/<file> as links to ../../blobs/<hash>: inside the repo's cache."""
    repo = tmp_path / "models--org--tiny"
    snapshot = repo / "snapshots" / ("a" * 40)
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for i, file in enumerate(sorted(tiny_checkpoints["group"].iterdir())):
        blob = repo / "blobs" / f"blob{i}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    model = load_model(snapshot, tokenizer=False)
    reference = load_model(tiny_checkpoints["group"], tokenizer=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


# ------------------------------------------------------------------ damaged weight files
@pytest.mark.parametrize("damage", ["truncated", "garbage_header", "empty"])
def test_damaged_safetensors_is_one_sentence(tiny_checkpoints, tmp_path, damage):
    folder = _copy(tiny_checkpoints["naive"], tmp_path)
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes({"truncated": data[: len(data) // 2], "garbage_header": b"\x40" + b"\x00" * 7 + b"{nope",
                         "empty": b""}[damage])
    with pytest.raises(CheckpointError, match="Weights file 'model.safetensors' of 'naive' is damaged or truncated") \
            as info:
        load_model(folder)
    _assert_one_sentence_without_paths(info.value, tmp_path)


def test_damaged_shard_and_split_layout_are_one_sentence(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints["group"], tmp_path)
    shard = sorted(folder.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match=f"'{shard.name}' of 'group' is damaged or truncated"):
        load_model(folder)
    split = _copy(tiny_checkpoints["split"], tmp_path)
    weights = split / "vision_tower" / "pytorch_model.bin"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="'vision_tower/pytorch_model.bin' of 'split' is damaged") as info:
        load_model(split)
    _assert_one_sentence_without_paths(info.value, tmp_path)


def test_damaged_index_is_one_sentence(tiny_checkpoints, tmp_path):
    folder = _copy(tiny_checkpoints["group"], tmp_path)
    (folder / "model.safetensors.index.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="shard index of 'group'.*is damaged"):
        load_model(folder)


def test_messages_name_folders_by_base_name(tmp_path):
    with pytest.raises(CheckpointError) as info:
        load_model(tmp_path / "deep" / "nope")
    assert "'nope'" in str(info.value) and str(tmp_path) not in str(info.value)


# ------------------------------------------------------------------ hub downloads: safetensors only, pinned
COMMIT_A, COMMIT_B = "a" * 40, "b" * 40


@pytest.fixture
def fake_hub(tiny_checkpoints, tmp_path, monkeypatch):
    """snapshot_download replaced: records its calls, serves the tiny group checkpoint as snapshots/<commit>;
    'main' currently points at COMMIT_A. Pins go to a file under tmp_path ($VIDLMM_HUB_PINS)."""
    import huggingface_hub

    calls = []
    state = {"main": COMMIT_A}

    def snapshot_download(repo_id, *, revision=None, allow_patterns=None, local_files_only=False, **kwargs):
        calls.append({"repo_id": repo_id, "revision": revision, "allow_patterns": list(allow_patterns or []),
                      "local_files_only": local_files_only})
        commit = revision or state["main"]
        snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / commit
        if not snapshot.exists():
            shutil.copytree(tiny_checkpoints["group"], snapshot)
        return str(snapshot)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    monkeypatch.setenv("VIDLMM_HUB_PINS", str(tmp_path / "pins.json"))
    return calls, state, tmp_path / "pins.json"


def test_hub_download_is_safetensors_only_and_pins_on_first_use(fake_hub, monkeypatch):
    calls, state, pins = fake_hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    model = load_model("org/tiny", tokenizer=False)
    # first use resolves main for config.json alone (checked before any weight is fetched)...
    assert calls[0]["revision"] is None and calls[0]["repo_id"] == "org/tiny"
    assert calls[0]["allow_patterns"] == ["config.json"]
    assert json.loads(pins.read_text()) == {"org/tiny": COMMIT_A}  # ...records the commit it got...
    assert calls[1]["revision"] == COMMIT_A  # ...and fetches the weights of that same commit
    patterns = calls[1]["allow_patterns"]
    assert "*.safetensors" in patterns and not any(p.endswith(".bin") for p in patterns)
    assert model.precision.name == "fp32"
    state["main"] = COMMIT_B  # someone pushes to the hub: a pinned load does not follow
    load_model("org/tiny", tokenizer=False)
    assert [c["revision"] for c in calls[2:]] == [COMMIT_A, COMMIT_A]
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # offline too
    load_model("org/tiny", tokenizer=False)
    assert [(c["revision"], c["local_files_only"]) for c in calls[4:]] == [(COMMIT_A, True)] * 2
    assert not any(p.endswith(".bin") for c in calls for p in c["allow_patterns"])


def test_a_hub_model_that_cannot_fit_is_refused_before_its_weights_are_fetched(fake_hub, monkeypatch):
    calls, _, _ = fake_hub
    monkeypatch.setattr("vidlmm.memory.free_memory_bytes", lambda device="cpu": 1000)
    with pytest.raises(CheckpointError, match="Model .org/tiny. needs .* free on this machine"):
        load_model("org/tiny", tokenizer=False)
    assert [c["allow_patterns"] for c in calls] == [["config.json"]]  # no weight file was asked for


def test_hub_download_with_an_explicit_revision(fake_hub):
    calls, _, pins = fake_hub
    load_model("org/tiny", revision=COMMIT_B, tokenizer=False)
    assert [c["revision"] for c in calls] == [COMMIT_B, COMMIT_B]
    assert not pins.exists()  # an explicit revision is the caller's pin: nothing recorded


def test_damaged_pin_file_is_refused_not_ignored(fake_hub):
    _, _, pins = fake_hub
    pins.write_text("{broken")
    with pytest.raises(CheckpointError, match="pin file 'pins.json' is damaged"):
        load_model("org/tiny", tokenizer=False)
