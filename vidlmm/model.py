"""The composed video LMM: vision tower -> connector -> visual tokens spliced into a causal LM.

`TinyLlavaVideo` is a transformers `PreTrainedModel` (registered with the auto classes by `vidlmm.hf`). Module
names (`language_model`, `vision_tower._vision_tower`, `connector`) are the published checkpoints' key prefixes,
but for two levels: the published files keep the connector one level down, as `connector._connector.*` (renamed
at load and back at save: `CONNECTOR_RENAMES`, read by transformers' key conversion and by `checkpoint.py`), and
SigLIP / CLIP towers one level up, as `vision_model.*` (transformers' own conversion of its vision models).
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os

import torch
from torch import nn
from transformers import PreTrainedModel

from .config import TinyLlavaConfig
from .connectors import ConnectorOutput, TokenLayout, connector_kwargs_from_config, create_connector
from .conversation import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from .vision import TOWERS, VisionTower, build_transformers_config, tower_type_for

log = logging.getLogger(__name__)
# (published prefix, module prefix): the reference's `Connector` wrapper keeps the connector one level down
CONNECTOR_RENAMES = (("connector._connector.", "connector."),)


def choose_attn_implementation(device: torch.device | str, need_weights: bool = False) -> str:
    """flash-attention 2 when installed on CUDA, else sdpa; eager only when attention weights are wanted."""
    if need_weights:
        return "eager"
    if torch.device(device).type == "cuda" and importlib.util.find_spec("flash_attn") is not None:
        return "flash_attention_2"
    return "sdpa"


class TinyLlavaVideo(PreTrainedModel):
    """A TinyLLaVA-Video model. `tokenizer` is attached by the loader (it is not a module)."""

    config_class = TinyLlavaConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    _supports_sdpa = True
    _supports_flash_attn = True
    _supports_attention_backend = True
    # the towers' weights the features never use (SigLIP's pooling head, the post-norms) may be absent
    _keys_to_ignore_on_load_missing = [r"^vision_tower\._vision_tower\.(" + "|".join(sorted(
        {p.rstrip(".") for spec in TOWERS.values() for p in spec.unused_prefixes})) + r")\."]

    def __init__(self, config: TinyLlavaConfig, attn_implementation: str | None = None):
        super().__init__(config)
        from transformers import AutoModelForCausalLM

        attn_implementation = attn_implementation or config._attn_implementation or "sdpa"
        text_config = dict(config.text_config, model_type=config.llm_type)
        # the dtype being built in (from_pretrained's `dtype`), not the one text_config was saved with
        self.language_model = AutoModelForCausalLM.from_config(
            build_transformers_config("text", text_config), attn_implementation=attn_implementation,
            dtype=torch.get_default_dtype())
        self.tower_type = tower_type_for(config.vision_config, config.vision_model_name_or_path)
        self.vision_tower = VisionTower(config.vision_config, tower_type=self.tower_type,
                                        feature_layer=config.vision_feature_layer,
                                        select_strategy=config.vision_feature_select_strategy)
        self.connector = create_connector(config.connector_type, **connector_kwargs_from_config(config))
        self.tokenizer = None
        self.post_init()
        # the key conversions save_pretrained reverts, whichever way the model was made (transformers keeps them
        # only for models it loaded, and drops the tower's `vision_model.` level for the others)
        from transformers.conversion_mapping import get_model_conversion_mapping

        self._weight_conversions = get_model_conversion_mapping(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, quantization_config=None, **kwargs):
        """transformers' `from_pretrained`, and two things it does not know: the reference's stage-1 split layout
        (sub-folders of pytorch_model.bin, read with weights_only and loaded like merged files), and a bitsandbytes
        `quantization_config` that names no modules to skip quantizes the LLM only, like `load_model(quantization=
        ...)`: the tower and the connector (whose attention this project shows) and the tied `lm_head` stay in full
        precision."""
        if getattr(quantization_config, "llm_int8_skip_modules", "absent") is None:
            quantization_config.llm_int8_skip_modules = ["vision_tower", "connector", "lm_head"]
        kwargs["quantization_config"] = quantization_config
        wants_info = kwargs.pop("output_loading_info", False)
        folder = pretrained_model_name_or_path
        if folder is not None and os.path.isdir(folder):
            from .checkpoint import is_split_layout, read_split_layout

            if is_split_layout(folder):
                kwargs["config"] = kwargs.get("config") or TinyLlavaConfig.from_json_file(
                    os.path.join(folder, "config.json"))
                kwargs["state_dict"] = read_split_layout(folder)
                pretrained_model_name_or_path = None
        model, info = super().from_pretrained(pretrained_model_name_or_path, *args, output_loading_info=True,
                                              **kwargs)
        # strict, as `load_model`: a weight left at its initial value would answer nonsense without an error
        problems = {kind: sorted(info.get(kind) or []) for kind in ("missing_keys", "unexpected_keys",
                                                                     "mismatched_keys")}
        if any(problems.values()):
            from .errors import CheckpointError

            parts = [f"{len(keys)} {kind.replace('_', ' ')} ({', '.join(map(str, keys[:4]))}"
                     f"{', ...' if len(keys) > 4 else ''})" for kind, keys in problems.items() if keys]
            raise CheckpointError("Checkpoint does not match the model: " + "; ".join(parts) + ".")
        return (model, info) if wants_info else model

    def save_pretrained(self, save_directory, *args, **kwargs):
        """transformers' `save_pretrained` (the published key names, see __init__), plus the published files'
        generation_config.json (transformers writes one only for its own generation classes)."""
        super().save_pretrained(save_directory, *args, **kwargs)
        path = os.path.join(save_directory, "generation_config.json")
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.config.generation_defaults(), f, indent=2)

    def _init_weights(self, module):
        """Rotary embeddings only: transformers builds the model without initialising it and recomputes the LLM's
        non-persistent `inv_freq`, but not that of the LLaVA-Mini compressor's own decoder layers (left as garbage,
        the loaded copy answered differently). Every other weight is loaded, or initialised by its part (the LM and
        the tower as transformers models, the connector in its constructor and `init_connector_weights`)."""
        if "RotaryEmbedding" in type(module).__name__ and hasattr(module, "original_inv_freq"):
            super()._init_weights(module)

    # ---- shapes and maps -------------------------------------------------------------------------------
    @property
    def image_processor(self):
        return self.vision_tower.image_processor

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.connector.parameters()).dtype

    def num_visual_tokens(self, num_frames: int) -> int:
        return self.connector.num_output_tokens(num_frames, self.vision_tower.tokens_per_frame)

    def token_layout(self, num_frames: int) -> TokenLayout:
        """Map from flat visual-token index to (frame, patch row, patch col) for a clip of `num_frames`."""
        return TokenLayout(num_frames, self.vision_tower.tokens_per_frame, self.vision_tower.grid,
                           self.vision_tower.first_cell)

    # ---- vision ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def encode_frames(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values [T, 3, S, S] -> vision features [T, P, Dv] (all frames batched, chunked for memory)."""
        return self.vision_tower(pixel_values)

    def connect(self, features: torch.Tensor, output_attentions: bool = False, budget=None) -> ConnectorOutput:
        """features [T, P, Dv] or [B, T, P, Dv] -> ConnectorOutput with tokens [B, Q, D]: the one way from vision
        features to visual tokens (the pipeline, the app, analysis and training all come here).

        budget: a `vidlmm.budget.TokenBudget` to serve the connector at other groups / queries / tokens per frame
        (a module sharing the connector's weights; the connector itself is unchanged) and to zero a share of the
        output tokens (one video; `ConnectorOutput.active` marks the kept ones). Raises ValueError with one
        sentence for a setting the connector cannot take."""
        if features.dim() == 3:
            features = features.unsqueeze(0)
        features = features.to(device=self.device, dtype=self.dtype)
        connector = self.connector
        if budget is not None:
            connector = budget.connector(connector, int(features.shape[1] * features.shape[2]))
        out = connector(features, output_attentions=output_attentions)
        keep = None if budget is None else budget.active_mask(out.query_groups.cpu().numpy())
        if keep is not None:
            from .analysis import zeroed_output

            out = zeroed_output(out, keep)
        return out

    # ---- splicing --------------------------------------------------------------------------------------
    def embed_with_visual_tokens(self, input_ids: list[int], visual_tokens: torch.Tensor | ConnectorOutput | None,
                                 labels: list[int] | None = None):
        """Insert visual_tokens [Q, D] at the single IMAGE_TOKEN_INDEX position of `input_ids`.

        visual_tokens may also be the connector's whole output for one video (batch 1): a connector that fuses
        vision into the text (LLaVA-Mini's pre-fusion, its `fusion_context`) then rewrites the prompt's text
        embeddings; answer tokens (labels other than IGNORE_INDEX) keep their raw embeddings, as in LLaVA-Mini.
        Returns (embeds [L, D], labels [L] or None); visual positions get IGNORE_INDEX labels. The sequence is
        cut to tokenizer_model_max_length, counting the visual tokens, as the reference does.
        """
        context = None
        if isinstance(visual_tokens, ConnectorOutput):
            if visual_tokens.tokens.shape[0] != 1:
                raise ValueError("Pass one video's connector output (batch 1) per sequence.")
            context = getattr(visual_tokens, "fusion_context", None)
            context = context[0] if context is not None else None
            visual_tokens = visual_tokens.tokens[0]
        embed = self.language_model.get_input_embeddings()
        ids = torch.as_tensor(input_ids, dtype=torch.long)
        lab = torch.as_tensor(labels, dtype=torch.long) if labels is not None else None
        slots = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
        if visual_tokens is not None and len(slots) != 1:
            raise ValueError(f"The prompt must contain exactly one video placeholder, found {len(slots)}.")
        if visual_tokens is None and slots:
            raise ValueError("The prompt has a video placeholder but no video was given.")
        device = embed.weight.device
        if not slots:
            embeds = embed(ids.to(device))
        else:
            s = slots[0]
            before, after = embed(ids[:s].to(device)), embed(ids[s + 1:].to(device))
            if context is not None:
                # the prompt is fused; answer tokens (training labels) keep their raw embeddings
                prompt = torch.ones(len(ids) - 1, dtype=torch.bool) if lab is None else \
                    torch.cat([lab[:s], lab[s + 1:]]) == IGNORE_INDEX
                fused = self.connector.fuse_text(context, torch.cat([before, after]), prompt.to(device))
                before, after = fused[:s], fused[s:]
            pieces = [before, visual_tokens.to(device=device, dtype=embed.weight.dtype), after]
            embeds = torch.cat(pieces)
            if lab is not None:
                ignore = torch.full((visual_tokens.shape[0],), IGNORE_INDEX, dtype=torch.long)
                lab = torch.cat([lab[:s], ignore, lab[s + 1:]])
        limit = self.config.tokenizer_model_max_length
        if embeds.shape[0] > limit:
            log.warning("Sequence of %d tokens (visual included) cut to %d.", embeds.shape[0], limit)
            embeds, lab = embeds[:limit], (lab[:limit] if lab is not None else None)
        return embeds, lab

    def build_inputs(self, batch_ids: list[list[int]], batch_visual: list[torch.Tensor | ConnectorOutput | None],
                     batch_labels: list[list[int]] | None = None, padding_side: str = "left"):
        """Pad spliced sequences into a batch: (inputs_embeds [B, L, D], attention_mask [B, L], labels or None).

        Padding uses zero embeddings (label IGNORE_INDEX). Left padding for generation, right for training.
        batch_visual items: tokens [Q, D], or a connector output of batch 1 (see `embed_with_visual_tokens`).
        """
        rows = [self.embed_with_visual_tokens(ids, vis, batch_labels[i] if batch_labels else None)
                for i, (ids, vis) in enumerate(zip(batch_ids, batch_visual))]
        longest = max(e.shape[0] for e, _ in rows)
        d = rows[0][0].shape[1]
        embeds = rows[0][0].new_zeros(len(rows), longest, d)
        mask = torch.zeros(len(rows), longest, dtype=torch.long, device=embeds.device)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long) if batch_labels else None
        for i, (e, lab) in enumerate(rows):
            n = e.shape[0]
            sl = slice(longest - n, longest) if padding_side == "left" else slice(0, n)
            embeds[i, sl], mask[i, sl] = e, 1
            if labels is not None:
                labels[i, sl] = lab
        return embeds, mask, (labels.to(embeds.device) if labels is not None else None)

    # ---- language model --------------------------------------------------------------------------------
    def splice(self, input_ids: torch.Tensor, pixel_values_videos: torch.Tensor | None, attention_mask=None,
               labels=None, padding_side: str = "right"):
        """The processor's batch (ids with one video placeholder per row, padding marked by the mask,
        pixel_values_videos [B, T, 3, S, S]) -> (inputs_embeds, attention_mask, labels) for the LLM, re-padded
        on `padding_side`."""
        mask = attention_mask if attention_mask is not None else torch.ones_like(input_ids)
        rows = [ids[m.bool()].tolist() for ids, m in zip(input_ids.cpu(), mask.cpu())]
        rows_labels = None if labels is None else [lab[m.bool()].tolist() for lab, m in zip(labels.cpu(), mask.cpu())]
        visual = [None] * len(rows)
        if pixel_values_videos is not None:
            visual = [self.connect(self.encode_frames(pixels)) for pixels in pixel_values_videos]
        return self.build_inputs(rows, visual, rows_labels, padding_side=padding_side)

    def forward(self, inputs_embeds=None, attention_mask=None, labels=None, *, input_ids=None,
                pixel_values_videos=None, **kwargs):
        """Training / scoring pass on spliced embeddings (see `build_inputs`), or on the processor's batch
        (`input_ids` + `pixel_values_videos`). Returns the LLM's output."""
        if inputs_embeds is None:
            inputs_embeds, attention_mask, labels = self.splice(input_ids, pixel_values_videos, attention_mask,
                                                                labels)
        position_ids = None
        if attention_mask is not None:  # right- or left-padded rows count positions from their first token
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        return self.language_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                   position_ids=position_ids, labels=labels, **kwargs)

    @torch.no_grad()
    def generate(self, inputs_embeds=None, attention_mask=None, *, input_ids=None, pixel_values_videos=None,
                 max_new_tokens: int = 512, do_sample: bool = False, temperature: float = 1.0, top_p: float = 1.0,
                 streamer=None, **kwargs) -> torch.Tensor:
        """Generate from spliced embeddings, or from the processor's batch (`input_ids` + `pixel_values_videos`);
        returns only the new token ids [B, K] (EOS included if hit). The LLM's own `generate` does the work, so
        transformers' streamers, stopping criteria and logits processors pass through `kwargs`."""
        if inputs_embeds is None:
            inputs_embeds, attention_mask, _ = self.splice(input_ids, pixel_values_videos, attention_mask,
                                                           padding_side="left")
        eos = self.config.eos_token_id
        pad = self.config.pad_token_id if self.config.pad_token_id is not None else eos
        gen = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, eos_token_id=eos, pad_token_id=pad,
                   use_cache=True, streamer=streamer)
        if do_sample:
            gen.update(temperature=temperature, top_p=top_p)
        else:  # keep the LLM's own generation_config from switching greedy decoding into sampling
            gen.update(temperature=None, top_p=None, top_k=None)
        gen.update(kwargs)
        return self.language_model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, **gen)

    def trim_at_eos(self, ids: list[int]) -> list[int]:
        """Generated ids up to and including the first end-of-sequence id (the config's eos may be one id or a
        list); what a batched `generate` pads a finished row with is dropped."""
        eos = self.config.eos_token_id
        ends = set(eos if isinstance(eos, (list, tuple)) else [eos])
        cut = next((i for i, t in enumerate(ids) if t in ends), None)
        return list(ids) if cut is None else list(ids[: cut + 1])

    def parameter_counts(self) -> dict[str, int]:
        """Parameters per part: vision_tower, connector, language_model (tied weights counted once)."""
        return {name: sum(p.numel() for p in dict.fromkeys(getattr(self, name).parameters()))
                for name in ("vision_tower", "connector", "language_model")}


def init_connector_weights(model: TinyLlavaVideo, seed: int = 0, initializer_range: float | None = None) -> None:
    """The reference's initialisation of a new connector: Linear ~ N(0, initializer_range) with zero bias,
    latents ~ N(0, 1), LayerNorms at weight 1 / bias 0. initializer_range defaults to the LLM's (0.02 for Qwen2.5)."""
    std = initializer_range if initializer_range is not None else model.config.text_config.get("initializer_range",
                                                                                              0.02)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.connector.modules():
            if isinstance(module, nn.Linear):
                module.weight.copy_(torch.randn(module.weight.shape, generator=gen) * std)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()
        for name, param in model.connector.named_parameters():
            if name.endswith("latents"):
                param.copy_(torch.randn(param.shape, generator=gen))


# the model is complete: register it with transformers' auto classes (see vidlmm/__init__.py)
from .hf import register  # noqa: E402

register()
