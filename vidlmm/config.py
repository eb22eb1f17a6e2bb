"""The TinyLLaVA checkpoint config (`config.json` with `model_type: "tinyllava"`), a transformers config class.

`TinyLlavaConfig` is registered with `AutoConfig` when `vidlmm` is imported (see `vidlmm.hf`). Unknown keys of a
published config.json are kept as attributes (`extra` lists them) and written back unchanged, so a published config
round-trips. Nothing here touches the network: the LLM and tower configs come from the saved `text_config` /
`vision_config` dicts, never from `llm_model_name_or_path` or `vision_model_name_or_path`.
"""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

# What the reference's config class fills in when a key is absent.
DEFAULTS = {
    "connector_type": "groupresampler",
    "num_queries": 512,
    "group": None,
    "num_resampler_layers": 3,
    "vision_feature_layer": -2,
    "vision_feature_select_strategy": "patch",
    "image_aspect_ratio": "square",
    "image_token_index": -200,
    "ignore_index": -100,
    "tokenizer_model_max_length": 3072,
    "tokenizer_padding_side": "right",
    "tokenizer_use_fast": False,
}
ARCHITECTURE = "TinyLlavaForConditionalGeneration"  # what the published config.json names


@strict(accept_kwargs=True)
class TinyLlavaConfig(PreTrainedConfig):
    """Fields the model needs; every other key of config.json is kept (`extra`) and saved back as it was.

    hidden_size: LLM width D. vision_hidden_size: tower width Dv (read from vision_config when absent).
    num_queries: visual tokens (per frame for the image-level `resampler`). group: groups of the group resampler.
    video_sampling: our addition, the frame sampling the checkpoint was trained with (e.g. {"mode": "uniform",
    "num_frames": 16}). Hyper-parameters of the per-frame compressors (`token_budget`, `prefusion_layers`, ...;
    see `vidlmm.compressors`) stay in `extra` and reach the connector through its `config_keys`.
    """

    model_type = "tinyllava"

    text_config: dict | None = None
    vision_config: dict | None = None
    hidden_size: int | None = None
    vision_hidden_size: int | None = None
    connector_type: str = DEFAULTS["connector_type"]
    num_queries: int = DEFAULTS["num_queries"]
    group: int | None = DEFAULTS["group"]
    num_resampler_layers: int = DEFAULTS["num_resampler_layers"]
    vision_feature_layer: int = DEFAULTS["vision_feature_layer"]
    vision_feature_select_strategy: str = DEFAULTS["vision_feature_select_strategy"]
    image_aspect_ratio: str = DEFAULTS["image_aspect_ratio"]
    image_token_index: int = DEFAULTS["image_token_index"]
    ignore_index: int = DEFAULTS["ignore_index"]
    llm_model_name_or_path: str | None = ""
    vision_model_name_or_path: str | None = ""
    tokenizer_name_or_path: str | None = ""
    tokenizer_model_max_length: int = DEFAULTS["tokenizer_model_max_length"]
    tokenizer_padding_side: str = DEFAULTS["tokenizer_padding_side"]
    tokenizer_use_fast: bool = DEFAULTS["tokenizer_use_fast"]
    pad_token: str | None = None
    pad_token_id: int | None = None
    conv_version: str = "qwen2_base"
    video_sampling: dict | None = None

    def __post_init__(self, **kwargs):
        self._extra_keys = [k for k in kwargs if k not in _NOT_EXTRA]
        super().__post_init__(**kwargs)
        if self.text_config is None or self.vision_config is None or self.hidden_size is None:
            missing = [k for k in ("text_config", "vision_config", "hidden_size") if getattr(self, k) is None]
            raise ValueError(f"config.json lacks {', '.join(missing)}.")
        if self.vision_hidden_size is None:
            self.vision_hidden_size = self.vision_config["hidden_size"]

    @classmethod
    def from_dict(cls, config_dict: dict, **kwargs):
        if config_dict.get("model_type", "tinyllava") != "tinyllava":
            raise ValueError(f"config.json has model_type '{config_dict.get('model_type')}', expected 'tinyllava'.")
        return super().from_dict(dict(config_dict), **kwargs)

    @classmethod
    def compose(cls, text_config: dict, vision_config: dict, *, connector_type: str = "groupresampler",
                group: int | None = None, **fields) -> "TinyLlavaConfig":
        """A config for a new model from its LLM and tower config dicts: widths are read from them, pad defaults
        to eos, and `group` is kept only for the group resampler. Other keys (a compressor's `token_budget`, ...)
        are kept like a published config's unknown keys."""
        fields.setdefault("pad_token_id", text_config.get("pad_token_id", text_config.get("eos_token_id")))
        return cls(text_config=dict(text_config), vision_config=dict(vision_config),
                   hidden_size=text_config["hidden_size"], vision_hidden_size=vision_config["hidden_size"],
                   connector_type=connector_type, group=group if connector_type == "groupresampler" else None,
                   **fields.pop("extra", {}), **fields)

    @classmethod
    def from_json_file(cls, path: str | Path) -> "TinyLlavaConfig":
        with open(path, encoding="utf-8") as f:
            return cls.from_dict(json.load(f))

    @property
    def extra(self) -> dict:
        """The keys of config.json that are not fields (the reference's training settings, compressor settings)."""
        shadowed = self.__dict__.get("_shadowed", {})  # keys a property of this class reads otherwise
        return {k: shadowed[k] if k in shadowed else getattr(self, k) for k in self._extra_keys if hasattr(self, k)}

    def replace(self, **changes) -> "TinyLlavaConfig":
        """A copy with some keys changed (None drops an extra key)."""
        data = {**self.to_dict(), **changes}
        return type(self).from_dict({k: v for k, v in data.items() if v is not None or k in _FIELDS})

    def to_dict(self) -> dict:
        """config.json as the reference writes it: the fields and the kept keys, nothing of transformers' own
        defaults (`output_hidden_states`, `id2label`, ...), so a published file round-trips."""
        # the published name, whatever class saved it (transformers' save_pretrained writes the class's own name)
        out = {"architectures": [ARCHITECTURE], "model_type": self.model_type}
        out.update(self.extra)
        out.update({name: getattr(self, name) for name in _FIELDS})
        if out.get("video_sampling") is None:
            out.pop("video_sampling")
        return out

    def to_diff_dict(self) -> dict:  # what save_pretrained writes
        return {**self.to_dict(), "transformers_version": self.transformers_version}

    def save(self, folder: str | Path) -> None:
        with open(Path(folder) / "config.json", "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=2, sort_keys=True)

    @property
    def llm_type(self) -> str:
        """transformers model_type of the LLM (from text_config, else from the LLM's name like the reference)."""
        model_type = self.text_config.get("model_type")
        if model_type:
            return model_type
        name = (self.llm_model_name_or_path or "").lower()
        for key in ("qwen2", "phi", "gemma"):
            if key in name:
                return key
        raise ValueError("Cannot tell the language model type: text_config has no model_type.")

    def generation_defaults(self) -> dict:
        """generation_config.json as the published checkpoints have it."""
        eos = self.eos_token_id
        return {"bos_token_id": self.text_config.get("bos_token_id", eos), "eos_token_id": eos, "use_cache": True}

    @property
    def eos_token_id(self) -> int | None:
        """The LLM's end of sequence (text_config's, as the reference generates; the first of a list)."""
        eos = self.text_config.get("eos_token_id")
        return eos[0] if isinstance(eos, list) else eos

    @eos_token_id.setter
    def eos_token_id(self, value):  # a top-level key in config.json: kept and saved back, not used
        self.__dict__.setdefault("_shadowed", {})["eos_token_id"] = value


_FIELDS = [name for name in TinyLlavaConfig.__dataclass_fields__
           if name not in PreTrainedConfig.__dataclass_fields__]
# keys transformers' own machinery passes or reads (not a checkpoint's extra settings)
_NOT_EXTRA = {"model_type", "transformers_version", "_name_or_path", "name_or_path", "attn_implementation",
              "_attn_implementation", "torch_dtype", "dtype", "architectures"}
