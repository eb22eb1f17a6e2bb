"""TinyLLaVA-Video as a transformers model: the auto-class registration and the processor.

After ``import vidlmm`` (registration happens when transformers is imported, see ``vidlmm/__init__.py``)::

    from transformers import AutoModelForCausalLM, AutoProcessor
    model = AutoModelForCausalLM.from_pretrained("path/to/TinyLLaVA-Video-Qwen2.5-3B-Group-16-512")
    processor = AutoProcessor.from_pretrained("path/to/TinyLLaVA-Video-Qwen2.5-3B-Group-16-512")
    inputs = processor(text="What happens in the video?", videos="clip.mp4", num_frames=16, return_tensors="pt")
    print(processor.batch_decode(model.generate(**inputs, max_new_tokens=64), skip_special_tokens=True)[0])

`from_pretrained` reads the published layout (sharded safetensors, the tied `lm_head`, the tower's `vision_model.`
level, the connector's `_connector.` level) through transformers' own loading and key conversion; `save_pretrained`
writes the same names back. The processor reads the tokenizer from the checkpoint folder (never the hub id the
config names), samples frames like the reference and builds the reference's prompt from the checkpoint's template.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import torch

_registered = False
_lock = threading.RLock()


def register() -> None:
    """Register the config, model and processor with transformers' auto classes (once per process; called by
    the last line of `vidlmm.model`)."""
    global _registered
    with _lock:
        if _registered:
            return
        from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor
        from transformers.conversion_mapping import register_checkpoint_conversion_mapping
        from transformers.core_model_loading import WeightRenaming

        from .config import TinyLlavaConfig
        from .model import CONNECTOR_RENAMES, TinyLlavaVideo

        AutoConfig.register(TinyLlavaConfig.model_type, TinyLlavaConfig, exist_ok=True)
        AutoModelForCausalLM.register(TinyLlavaConfig, TinyLlavaVideo, exist_ok=True)
        AutoModelForImageTextToText.register(TinyLlavaConfig, TinyLlavaVideo, exist_ok=True)
        AutoProcessor.register(TinyLlavaConfig, TinyLlavaProcessor, exist_ok=True)
        register_checkpoint_conversion_mapping(
            TinyLlavaVideo.__name__, [WeightRenaming("^" + old.replace(".", r"\."), new)
                                      for old, new in CONNECTOR_RENAMES], overwrite=True)
        from .quantize import _register_int8_quantizer

        _register_int8_quantizer()  # quantization_config=vidlmm.quantize.torch_int8_config(): torch's dynamic int8
        _registered = True


class TinyLlavaProcessor:
    """Question + video -> the inputs of `TinyLlavaVideo.generate` / `forward`: ``input_ids`` (the reference's
    prompt with one video placeholder id), ``attention_mask`` and ``pixel_values_videos`` [B, T, 3, S, S]."""

    def __init__(self, tokenizer, image_processor, *, template: str = "qwen2_base", video_sampling: dict | None = None,
                 image_token_index: int = -200):
        self.tokenizer, self.image_processor = tokenizer, image_processor
        self.template, self.video_sampling, self.image_token_index = template, video_sampling, image_token_index

    @classmethod
    def from_pretrained(cls, folder, **kwargs) -> "TinyLlavaProcessor":
        """From a local checkpoint folder (or a hub id already in the local cache); no network call when local."""
        from .checkpoint import config_folder
        from .config import TinyLlavaConfig
        from .preprocess import ImageProcessor
        from .tokenizer import load_tokenizer
        from .vision import tower_type_for

        folder = Path(folder) if Path(folder).is_dir() else config_folder(os.fspath(folder))
        config = TinyLlavaConfig.from_json_file(folder / "config.json")
        tower = tower_type_for(config.vision_config, config.vision_model_name_or_path)
        tokenizer = load_tokenizer(folder, model_max_length=config.tokenizer_model_max_length,
                                   padding_side=config.tokenizer_padding_side)
        return cls(tokenizer, ImageProcessor.for_tower(tower, config.vision_config["image_size"]),
                   template=config.conv_version or "qwen2_base", video_sampling=config.video_sampling,
                   image_token_index=config.image_token_index)

    def sampling(self, num_frames: int | None = None, fps: float | None = None, max_frames: int = 64):
        """``num_frames`` uniform frames, or ``fps`` frames a second up to ``max_frames``, else the checkpoint's own
        sampling (uniform 16 when its config does not say)."""
        from .video import FrameSampling

        if num_frames is not None and fps is not None:
            raise ValueError("Give num_frames or fps, not both.")
        if num_frames is not None:
            return FrameSampling.uniform(int(num_frames))
        if fps is not None:
            return FrameSampling.at_rate(float(fps), int(max_frames))
        return FrameSampling.from_dict(self.video_sampling)

    def pixels(self, video, sampling) -> torch.Tensor:
        """One video (a path, or already sampled frames [T, H, W, 3] uint8) -> pixel_values [T, 3, S, S]."""
        from .preprocess import read_pixels

        if isinstance(video, (str, os.PathLike)):
            return read_pixels(os.fspath(video), sampling, self.image_processor)[1]
        frames = np.asarray(video)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"videos: a path or frames [T, H, W, 3] uint8, got {frames.dtype} {frames.shape}")
        return self.image_processor(frames)

    def __call__(self, text=None, videos=None, *, num_frames: int | None = None, fps: float | None = None,
                 max_frames: int = 64, history=(), return_tensors: str = "pt"):
        """``text``: a question or a list of them; ``videos``: one per question (paths or frame arrays); history:
        earlier (question, answer) turns of a single conversation. Batches are left-padded for generation."""
        from transformers import BatchFeature

        from .conversation import build_prompt, tokenizer_image_token

        if return_tensors != "pt":
            raise ValueError("return_tensors must be 'pt'.")
        texts = [text] if isinstance(text, str) else list(text or [])
        clips = [videos] if isinstance(videos, (str, os.PathLike, np.ndarray)) else list(videos or [])
        if not texts or len(clips) != len(texts):
            raise ValueError(f"Give one video per question ({len(texts)} questions, {len(clips)} videos).")
        ids = [tokenizer_image_token(build_prompt(self.template, [*history, (q, None)]), self.tokenizer,
                                     image_token_index=self.image_token_index) for q in texts]
        longest = max(map(len, ids))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        sampling = self.sampling(num_frames, fps, max_frames)
        pixels = [self.pixels(v, sampling) for v in clips]
        if len({p.shape for p in pixels}) > 1:
            raise ValueError("Videos of one batch must give the same number of frames (use num_frames).")
        data = {"input_ids": torch.tensor([[pad] * (longest - len(r)) + r for r in ids]),
                "attention_mask": torch.tensor([[0] * (longest - len(r)) + [1] * len(r) for r in ids]),
                "pixel_values_videos": torch.stack(pixels)}
        return BatchFeature(data)

    def batch_decode(self, ids, **kwargs) -> list[str]:
        return self.tokenizer.batch_decode(ids, **kwargs)

    def decode(self, ids, **kwargs) -> str:
        return self.tokenizer.decode(ids, **kwargs)
