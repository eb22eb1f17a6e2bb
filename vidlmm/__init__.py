"""vidlmm: the TinyLLaVA-Video model stack, compatible with the published checkpoints.

    from vidlmm import load_model, VideoLMM
    lmm = VideoLMM(load_model("Zhang199/TinyLLaVA-Video-Qwen2.5-3B-Group-16-512"))
    print(lmm.ask("clip.mp4", "What happens in the video?").text)

Heavy modules (torch, transformers, decoders) load on first use, so `import vidlmm` is cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "checkpoint", "save_model": "checkpoint", "TinyLlavaVideo": "model",
    "TinyLlavaConfig": "config", "VideoLMM": "pipeline", "GenerationSettings": "pipeline", "Answer": "pipeline",
    "FrameSampling": "video", "read_video": "video", "sample_frame_indices": "video", "VideoClip": "video",
    "create_connector": "connectors", "CONNECTORS": "connectors", "VidlmmError": "errors",
    "VideoReadError": "errors", "CheckpointError": "errors",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'vidlmm' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
