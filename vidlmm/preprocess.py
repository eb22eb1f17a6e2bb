"""Frames (uint8 RGB) -> normalised pixel tensors, exactly as each vision tower's image processor does it.

The reference runs the SigLIP processor's PIL path: a bicubic squash to the tower's square size (no crop,
no padding), then x / 255, then (x - 0.5) / 0.5. Resizing with OpenCV or torch instead changes pixels enough
to change answers, so the resize here is PIL's. Everything is built from the checkpoint's vision config;
nothing is downloaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image

if TYPE_CHECKING:
    from .video import VideoClip

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class ImageProcessor:
    """size: output side in pixels. mode "squash" resizes straight to size x size (SigLIP);
    "shortest_edge_crop" resizes the shortest edge to `resize_to` keeping aspect, then centre-crops (CLIP, DINOv2).
    """

    size: int
    mode: str = "squash"
    resize_to: int | None = None
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @classmethod
    def for_tower(cls, tower_type: str, image_size: int) -> "ImageProcessor":
        """The processor a tower family uses, from its registry name and its config's image size."""
        if tower_type == "siglip":
            return cls(size=image_size)
        if tower_type == "clip":
            return cls(size=image_size, mode="shortest_edge_crop", resize_to=image_size, mean=CLIP_MEAN, std=CLIP_STD)
        if tower_type == "dinov2":  # DINOv2 resizes to 256 for a 224 crop
            return cls(size=image_size, mode="shortest_edge_crop", resize_to=round(image_size * 256 / 224),
                       mean=IMAGENET_MEAN, std=IMAGENET_STD)
        raise ValueError(f"No image processor for vision tower type '{tower_type}'.")

    def resize(self, frame: np.ndarray) -> Image.Image:
        image = Image.fromarray(frame)
        if self.mode == "squash":
            return image.resize((self.size, self.size), Image.BICUBIC)
        w, h = image.size
        # the shortest edge becomes resize_to; the other is truncated, as transformers computes it
        if w <= h:
            new_w, new_h = self.resize_to, int(self.resize_to * h / w)
        else:
            new_w, new_h = int(self.resize_to * w / h), self.resize_to
        image = image.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - self.size) // 2, (new_h - self.size) // 2
        return image.crop((left, top, left + self.size, top + self.size))

    def resize_frame(self, frame: np.ndarray) -> np.ndarray:
        """One [H, W, 3] uint8 frame -> the tower's input view [size, size, 3] uint8 (a `read_video` transform)."""
        return np.asarray(self.resize(frame))

    def __call__(self, frames: np.ndarray) -> torch.Tensor:
        """frames: [T, H, W, 3] uint8 RGB -> pixel_values [T, 3, size, size] float32."""
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise ValueError(f"Expected uint8 frames [T, H, W, 3], got {frames.dtype} {tuple(frames.shape)}.")
        return self.normalize(np.stack([self.resize_frame(f) for f in frames]))

    def pixel_values(self, clip: "VideoClip") -> torch.Tensor:
        """A clip read with `transform=self.resize_frame` -> pixel_values [T, 3, size, size] in sampling order
        (each distinct frame normalised once)."""
        return self.normalize(clip.frames)[torch.from_numpy(clip.frame_map)]

    def normalize(self, resized: np.ndarray) -> torch.Tensor:
        """[T, size, size, 3] uint8, already resized -> pixel_values [T, 3, size, size] float32."""
        # same arithmetic as transformers' rescale (float64 multiply, cast) and normalize (float32)
        x = (resized.astype(np.float64) * (1 / 255)).astype(np.float32)
        mean = np.asarray(self.mean, dtype=np.float32)
        std = np.asarray(self.std, dtype=np.float32)
        x = (x - mean) / std
        return torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def read_pixels(path, sampling, processor: ImageProcessor, **limits) -> tuple["VideoClip", torch.Tensor]:
    """Read a video for the model: (clip whose frames are the tower's input views [U, S, S, 3], pixel_values
    [T, 3, S, S] in sampling order). Each frame is resized as it is decoded, so memory follows the tower's
    input, not the source; the values are the same as `processor(frames)` on full-size frames. `limits` go to
    `read_video` (max_pixels, time_limit, max_duration, backend)."""
    from .video import read_video

    clip = read_video(path, sampling, transform=processor.resize_frame, **limits)
    return clip, processor.pixel_values(clip)
