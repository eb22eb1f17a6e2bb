"""TinyLLaVA-Video as a transformers model: after `import vidlmm`, AutoModelForCausalLM / AutoProcessor load the
published layout offline and generate the reference's ids; save_pretrained writes the published key names back."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open

import vidlmm  # noqa: F401 - registers the auto classes
from tests.reference_impl import ref_answer_ids
from vidlmm.checkpoint import load_model

QUESTION = "What colour is the square, and where does it go?"


def auto_load(folder):
    from transformers import AutoModelForCausalLM, AutoProcessor

    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    return model, AutoProcessor.from_pretrained(folder)


@pytest.mark.parametrize("name", ["group", "naive", "legacy"])
def test_auto_classes_load_the_published_layout_and_generate_the_reference_ids(tiny_checkpoints, small_video,
                                                                                no_network, name):
    from vidlmm.hf import TinyLlavaProcessor
    from vidlmm.model import TinyLlavaVideo

    folder = tiny_checkpoints[name]
    model, processor = auto_load(folder)
    assert type(model) is TinyLlavaVideo and type(processor) is TinyLlavaProcessor
    ours = load_model(folder)  # the library's own reader of the same files: every weight the same
    a, b = model.state_dict(), ours.state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    lm = model.language_model
    assert lm.lm_head.weight.data_ptr() == lm.get_input_embeddings().weight.data_ptr()  # tied, not loaded twice

    inputs = processor(text=QUESTION, videos=small_video, num_frames=16, return_tensors="pt")
    assert inputs["pixel_values_videos"].shape == (1, 16, 3, 56, 56)
    assert (inputs["input_ids"] == -200).sum() == 1
    out = model.generate(**inputs, max_new_tokens=24)
    model.tokenizer = processor.tokenizer  # the independent reference path reads the model's modules and tokenizer
    expected, _ = ref_answer_ids(model, small_video, QUESTION, num_frames=16, max_new_tokens=24)
    assert out[0].tolist() == expected and len(set(expected)) > 3
    assert processor.batch_decode(out)[0] == processor.tokenizer.decode(expected)


def test_save_pretrained_writes_the_published_names_and_round_trips(tiny_checkpoints, small_video, tmp_path,
                                                                     no_network):
    model, processor = auto_load(tiny_checkpoints["group"])
    inputs = processor(text=QUESTION, videos=small_video, num_frames=16)
    before = model.generate(**inputs, max_new_tokens=16)
    model.save_pretrained(tmp_path / "copy")
    with safe_open(str(tmp_path / "copy" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "connector._connector.latents" in keys and not any(k.startswith("connector.l") for k in keys)
    assert "vision_tower._vision_tower.vision_model.embeddings.patch_embedding.weight" in keys
    assert "language_model.lm_head.weight" not in keys  # tied: written once, as the published files do
    config = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert config["model_type"] == "tinyllava" and config["architectures"] == ["TinyLlavaForConditionalGeneration"]
    assert config["connector_type"] == "groupresampler" and config["group"] == 4
    published = json.loads((tiny_checkpoints["group"] / "generation_config.json").read_text())
    assert json.loads((tmp_path / "copy" / "generation_config.json").read_text()) == published
    again = load_model(tmp_path / "copy", tokenizer=False)  # the library's reader takes transformers' files too
    from transformers import AutoModelForCausalLM

    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "copy").eval()
    assert torch.equal(reloaded.generate(**inputs, max_new_tokens=16), before)
    a, b = again.state_dict(), reloaded.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_processor_batches_questions_and_takes_frames(tiny_checkpoints, small_video, no_network):
    from vidlmm.video import FrameSampling, read_video

    model, processor = auto_load(tiny_checkpoints["naive"])
    frames = read_video(small_video, FrameSampling.uniform(16)).sampled_frames()
    one = processor(text=QUESTION, videos=frames)  # already sampled frames: the checkpoint's own sampling not used
    assert torch.equal(one["pixel_values_videos"],
                       processor(text=QUESTION, videos=small_video, num_frames=16)["pixel_values_videos"])
    batch = processor(text=[QUESTION, "Is it red?"], videos=[small_video, small_video], num_frames=16)
    assert batch["input_ids"].shape[0] == 2 and batch["attention_mask"][1, 0] == 0  # left-padded
    both = model.generate(**batch, max_new_tokens=8)
    alone = model.generate(**processor(text="Is it red?", videos=small_video, num_frames=16), max_new_tokens=8)
    assert model.trim_at_eos(both[1].tolist()) == model.trim_at_eos(alone[0].tolist())
    with pytest.raises(ValueError, match="one video per question"):
        processor(text=[QUESTION, QUESTION], videos=small_video)
    with pytest.raises(ValueError, match="uint8"):
        processor(text=QUESTION, videos=np.zeros((2, 8, 8, 3), np.float32))


def test_forward_on_the_processor_batch_gives_the_training_loss(tiny_checkpoints, small_video):
    """model(**inputs, labels=...) splices like generate: the loss equals the one from the spliced embeddings."""
    model, processor = auto_load(tiny_checkpoints["group"])
    inputs = processor(text=QUESTION, videos=small_video, num_frames=16)
    labels = inputs["input_ids"].clone()
    labels[labels < 0] = -100
    loss = model(**inputs, labels=labels).loss
    embeds, mask, spliced_labels = model.splice(inputs["input_ids"], inputs["pixel_values_videos"],
                                                inputs["attention_mask"], labels)
    assert torch.isfinite(loss) and torch.allclose(loss, model(embeds, mask, spliced_labels).loss)


def test_import_vidlmm_stays_cheap_and_registers_when_transformers_arrives():
    code = ("import sys, vidlmm; heavy = {'torch', 'transformers'} & set(sys.modules)\n"
            "from transformers import AutoConfig, AutoModelForCausalLM\n"
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
            "print(sorted(heavy), CONFIG_MAPPING['tinyllava'].__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["[]", "TinyLlavaConfig"]


@pytest.mark.parametrize("first", ["from transformers import SiglipModel", "import transformers.modeling_utils"])
def test_registration_waits_when_transformers_imports_its_auto_classes_itself(first):
    # transformers' modeling_utils imports the auto classes while it is half imported; registering then failed
    # (PreTrainedModel not there yet) and was lost with a warning
    code = (f"import vidlmm\n{first}\n"
            "from transformers.models.auto.configuration_auto import CONFIG_MAPPING\n"
            "from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING as M\n"
            "from vidlmm.config import TinyLlavaConfig\n"
            "print(CONFIG_MAPPING['tinyllava'].__name__, M[TinyLlavaConfig].__name__)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["TinyLlavaConfig", "TinyLlavaVideo"]
    assert "could not register" not in out.stderr


def test_config_keeps_unknown_keys_and_a_top_level_eos_it_does_not_use(tiny_checkpoints):
    """A published config.json round-trips through the transformers config class: unknown keys (the reference's
    training settings) come back unchanged, nothing of transformers' own defaults is added, and a top-level
    eos_token_id is kept but the LLM's (text_config) stays the one generation stops at."""
    from transformers import AutoConfig

    from vidlmm.config import TinyLlavaConfig

    data = json.loads((tiny_checkpoints["naive"] / "config.json").read_text())
    data.update({"tune_type_llm": "full", "cache_dir": None, "eos_token_id": 7})
    config = TinyLlavaConfig.from_dict(data)
    assert config.to_dict() == data
    assert config.eos_token_id == data["text_config"]["eos_token_id"] != 7
    assert {"tune_type_llm": "full", "cache_dir": None, "eos_token_id": 7}.items() <= config.extra.items()
    assert not set(config.extra) & {"output_hidden_states", "return_dict", "id2label", "dtype"}
    assert type(AutoConfig.from_pretrained(tiny_checkpoints["naive"])) is TinyLlavaConfig
    with pytest.raises(ValueError, match="model_type 'llava'"):
        TinyLlavaConfig.from_dict({**data, "model_type": "llava"})


@pytest.mark.parametrize("mode", ["8bit", "4bit"])
def test_bitsandbytes_config_on_cpu_is_the_library_quantization(tiny_checkpoints, small_video, mode):
    """`BitsAndBytesConfig` through from_pretrained quantizes the LLM only (the tower, the connector and the tied
    lm_head stay full precision) and gives the very logits of `load_model(quantization=...)`, whose error
    against full precision tests/test_quantize.py measures (NF4 with double quantization, as ours)."""
    from tests.test_quantize import _bitsandbytes_problem
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    if problem := _bitsandbytes_problem():
        pytest.skip(problem)
    folder = tiny_checkpoints["group"]
    config = BitsAndBytesConfig(load_in_8bit=True) if mode == "8bit" else BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32,
        bnb_4bit_use_double_quant=True)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=config)
    ours = load_model(folder, quantization=mode)
    quantized = {name for name, m in model.named_modules() if type(m).__name__ in ("Linear8bitLt", "Linear4bit")}
    assert quantized == {name for name, m in ours.named_modules() if type(m).__name__ in ("Linear8bitLt",
                                                                                         "Linear4bit")}
    assert quantized and all(name.startswith("language_model.model.layers.") for name in quantized)
    _, processor = auto_load(folder)
    inputs = processor(text=QUESTION, videos=small_video, num_frames=16)
    with torch.no_grad():
        logits = [m(*m.splice(inputs["input_ids"], inputs["pixel_values_videos"], inputs["attention_mask"])[:2])
                  .logits for m in (model, ours)]
    assert torch.equal(logits[0], logits[1])


def test_from_pretrained_options_reach_the_parts(tiny_checkpoints, small_video):
    """dtype and attn_implementation reach the LLM built inside the model; device_map="auto" places it (all on
    the CPU here) and it answers as loaded plainly; a transformers streamer streams."""
    import threading

    from transformers import AutoModelForCausalLM, TextIteratorStreamer

    folder = tiny_checkpoints["group"]
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16, attn_implementation="eager")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.language_model.config._attn_implementation == "eager"
    model, processor = auto_load(folder)
    inputs = processor(text=QUESTION, videos=small_video, num_frames=16)
    whole = processor.batch_decode(model.generate(**inputs, max_new_tokens=12))[0]
    streamer = TextIteratorStreamer(processor.tokenizer)
    worker = threading.Thread(target=model.generate, kwargs=dict(**inputs, max_new_tokens=12, streamer=streamer))
    worker.start()
    pieces = list(streamer)
    worker.join()
    assert "".join(pieces) == whole and len([p for p in pieces if p]) > 1
    placed = AutoModelForCausalLM.from_pretrained(folder, device_map="auto")
    assert {p.device.type for p in placed.parameters()} == {"cpu"}
    assert processor.batch_decode(placed.generate(**inputs, max_new_tokens=12))[0] == whole


def test_save_pretrained_of_a_model_transformers_did_not_load_writes_the_published_names(tiny_checkpoints,
                                                                                        tmp_path):
    """transformers keeps the key conversions only for models it loaded; ours keep theirs from construction, so a
    model from load_model (or training) saves the very key names of the published files."""
    from vidlmm.checkpoint import read_state_dict

    folder = tiny_checkpoints["group"]
    load_model(folder).save_pretrained(tmp_path / "copy", max_shard_size=300_000)
    written, published = read_state_dict(tmp_path / "copy"), read_state_dict(folder)
    assert set(written) == set(published) and all(torch.equal(written[k], published[k]) for k in published)


def test_from_pretrained_reads_the_stage1_split_layout_and_refuses_missing_weights(tiny_checkpoints, tmp_path,
                                                                                   no_network):
    """The reference's stage-1 output (sub-folders of pytorch_model.bin) loads like the merged files; a file
    without the connector's weights is an error naming them, not a model with random connector weights."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForCausalLM

    from vidlmm.errors import CheckpointError

    split = tiny_checkpoints["split"]
    model = AutoModelForCausalLM.from_pretrained(split)
    a, b = model.state_dict(), load_model(split).state_dict()
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)

    broken = tmp_path / "no-connector"
    shutil.copytree(tiny_checkpoints["naive"], broken)
    weights = load_file(broken / "model.safetensors")
    save_file({k: v for k, v in weights.items() if not k.startswith("connector.")}, broken / "model.safetensors",
              metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing keys .*connector.latents"):
        AutoModelForCausalLM.from_pretrained(broken)
