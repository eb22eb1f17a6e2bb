"""Vision towers (SigLIP by default, CLIP, DINOv2) through transformers, built from a config dict.

`VisionTower` keeps the transformers model as `_vision_tower`, so its state-dict keys read
`vision_tower._vision_tower.*` like the published checkpoints (which add one more `vision_model.` level for
SigLIP and CLIP; `checkpoint.py` maps that level).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .preprocess import ImageProcessor

# Tokens (frames x sequence length) per forward pass of the tower: bounds its activation memory whatever the tower.
# SigLIP-so400m (729 tokens a frame) runs 5 frames at a time, a 64-token toy tower 64. On CPU in bf16, 64 so400m
# frames in one pass peaked 1232 MiB above the weights, in 5-frame chunks 113 MiB, and ran 1.2x faster
# (`python benchmarks/bench_fullsize.py --tower-chunks --frames 16 64`).
CHUNK_TOKENS = 4096


def chunk_frames_for(sequence_length: int, chunk_tokens: int = CHUNK_TOKENS) -> int:
    """Frames per tower pass for frames of `sequence_length` tokens: as many as fit in `chunk_tokens`, at least
    one."""
    return max(1, int(chunk_tokens) // int(sequence_length))


@dataclass(frozen=True)
class TowerSpec:
    """How one family of towers is built and read.

    config_type: transformers `model_type` of its config. has_cls: whether token 0 is a class token (not a
    patch). published_level: the extra key level published checkpoints have under `_vision_tower.`.
    """

    name: str
    config_type: str
    model_class: str
    has_cls: bool
    published_level: str
    # parameters the features never use (they sit after layer -2); a checkpoint may omit them
    unused_prefixes: tuple[str, ...] = ()


TOWERS = {
    "siglip": TowerSpec("siglip", "siglip_vision_model", "SiglipVisionModel", has_cls=False,
                        published_level="vision_model.", unused_prefixes=("head.", "post_layernorm.")),
    "clip": TowerSpec("clip", "clip_vision_model", "CLIPVisionModel", has_cls=True, published_level="vision_model.",
                      unused_prefixes=("post_layernorm.",)),
    "dinov2": TowerSpec("dinov2", "dinov2", "Dinov2Model", has_cls=True, published_level="",
                        unused_prefixes=("layernorm.",)),
}


def tower_type_for(vision_config: dict, model_name_or_path: str = "") -> str:
    """Registry name from a vision config's model_type, else from the tower's hub name (as the reference does)."""
    model_type = str(vision_config.get("model_type", "")).lower()
    for name, spec in TOWERS.items():
        if model_type == spec.config_type or model_type == name:
            return name
    hint = f"{model_type} {model_name_or_path}".lower()
    for name in ("siglip", "clip", "dinov2"):
        if name in hint:
            return name
    raise ValueError(f"Unknown vision tower (model_type '{model_type}', name '{model_name_or_path}').")


def build_transformers_config(kind: str, config: dict):
    """A transformers config object for a tower or LLM from a plain dict (no download)."""
    from transformers import AutoConfig

    config = dict(config)
    model_type = config.pop("model_type")
    for key in ("architectures", "transformers_version", "_name_or_path", "model_name_or_path"):
        config.pop(key, None)
    return AutoConfig.for_model(model_type, **config)


class VisionTower(nn.Module):
    """pixel_values [T, 3, S, S] -> features [T, P, Dv] from hidden layer `feature_layer`.

    select_strategy "patch" drops token 0 (for SigLIP that is a real patch, dropped as in the reference;
    for CLIP/DINOv2 it is the class token); "cls_patch" keeps every token.
    """

    def __init__(self, vision_config: dict, *, tower_type: str, feature_layer: int = -2,
                 select_strategy: str = "patch", model: nn.Module | None = None):
        super().__init__()
        import transformers

        if select_strategy not in ("patch", "cls_patch"):
            raise ValueError(f"Unknown vision_feature_select_strategy '{select_strategy}' (patch or cls_patch).")
        self.spec = TOWERS[tower_type]
        cfg = dict(vision_config)
        cfg["model_type"] = self.spec.config_type
        self.config = build_transformers_config("vision", cfg)
        self._vision_tower = model if model is not None else getattr(transformers, self.spec.model_class)(self.config)
        self.feature_layer = feature_layer
        self.select_strategy = select_strategy
        self.image_processor = ImageProcessor.for_tower(tower_type, self.config.image_size)
        # the encoder's layer list, found once by name (a module attribute would register it a second time)
        self._layers_path = next((name for name, module in self._vision_tower.named_modules()
                                  if isinstance(module, nn.ModuleList)
                                  and name.endswith(("encoder.layers", "encoder.layer"))), None)

    @classmethod
    def around(cls, vision_model: nn.Module, *, tower_type: str = "siglip", feature_layer: int = -2,
               select_strategy: str = "patch") -> "VisionTower":
        """The tower's feature read-out over a transformers vision model that already exists (stage 0's tower
        while it trains), sharing its weights."""
        return cls(vision_model.config.to_dict(), tower_type=tower_type, feature_layer=feature_layer,
                   select_strategy=select_strategy, model=vision_model)

    @property
    def grid(self) -> tuple[int, int]:
        side = self.config.image_size // self.config.patch_size
        return side, side

    @property
    def tokens_per_frame(self) -> int:
        return self.sequence_length - (1 if self.select_strategy == "patch" else 0)

    @property
    def first_cell(self) -> int:
        """Grid cell of a frame's first kept token (-1: it is a class token, not a cell)."""
        extra = int(self.spec.has_cls) + (getattr(self.config, "num_register_tokens", 0) or 0)
        dropped = 1 if self.select_strategy == "patch" else 0
        return dropped - extra

    @property
    def hidden_size(self) -> int:
        return self.config.hidden_size

    def _encoder_layers(self) -> nn.ModuleList | None:
        return self._vision_tower.get_submodule(self._layers_path) if self._layers_path is not None else None

    def _hidden(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Hidden state `feature_layer` (the `hidden_states[feature_layer]` of the transformers model), computed
        without running the layers after it and without keeping every layer's output: the forward pass stops
        at the layer that produces it. (-2 on so400m skips 1 of 27 layers, the post-norm and the pooling head,
        and holds one hidden state instead of 28.)"""
        layers = self._encoder_layers()
        index = self.feature_layer % (len(layers) + 1) if layers is not None else 0
        if index == 0:  # the embeddings' output, or an encoder we do not know: the plain way
            out = self._vision_tower(pixel_values=pixel_values, output_hidden_states=True)
            return out.hidden_states[self.feature_layer]

        def stop(module, args, output):
            raise _FeatureReady(output[0] if isinstance(output, (tuple, list)) else output)

        handle = layers[index - 1].register_forward_hook(stop)
        try:
            self._vision_tower(pixel_values=pixel_values)
        except _FeatureReady as ready:
            return ready.hidden
        finally:
            handle.remove()
        raise RuntimeError("the vision tower never ran the layer its features come from")

    @property
    def sequence_length(self) -> int:
        """Tokens the tower's encoder runs per frame (every patch, class and register tokens)."""
        rows, cols = self.grid
        return rows * cols + int(self.spec.has_cls) + (getattr(self.config, "num_register_tokens", 0) or 0)

    def chunk_frames(self, chunk_tokens: int = CHUNK_TOKENS) -> int:
        """Frames per forward pass of this tower (`chunk_frames_for` its sequence length)."""
        return chunk_frames_for(self.sequence_length, chunk_tokens)

    def forward(self, pixel_values: torch.Tensor, chunk_frames: int | None = None) -> torch.Tensor:
        """Frames go through in chunks of `chunk_frames` (default: `chunk_frames()`, about CHUNK_TOKENS tokens):
        bounded activation memory for long clips and big towers. Frames are independent: a frame's features
        do not depend on its chunk beyond float rounding."""
        param = next(self._vision_tower.parameters())
        features = []
        for chunk in pixel_values.split(chunk_frames or self.chunk_frames()):
            hidden = self._hidden(chunk.to(device=param.device, dtype=param.dtype))
            features.append(hidden[:, 1:] if self.select_strategy == "patch" else hidden)
        return torch.cat(features)


class _FeatureReady(Exception):
    """Carries the feature layer's output out of the tower's forward pass (see VisionTower._hidden)."""

    def __init__(self, hidden: torch.Tensor):
        super().__init__("feature layer reached")
        self.hidden = hidden
