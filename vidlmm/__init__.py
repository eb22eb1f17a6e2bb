"""vidlmm: the TinyLLaVA-Video model stack, compatible with the published checkpoints.

    from vidlmm import load_model, VideoLMM
    lmm = VideoLMM(load_model("Zhang199/TinyLLaVA-Video-Qwen2.5-3B-Group-16-512"))
    print(lmm.ask("clip.mp4", "What happens in the video?").text)

Heavy modules (torch, transformers, decoders) load on first use, so `import vidlmm` is cheap. The model is also a
transformers model: `import vidlmm` registers it with `AutoConfig`, `AutoModelForCausalLM`,
`AutoModelForImageTextToText` and `AutoProcessor` (`vidlmm.hf`), at once when transformers is already imported,
else as soon as it is.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import logging
import sys

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "checkpoint", "save_model": "checkpoint", "TinyLlavaVideo": "model",
    "TinyLlavaConfig": "config", "VideoLMM": "pipeline", "GenerationSettings": "pipeline", "Answer": "pipeline",
    "FrameSampling": "video", "read_video": "video", "sample_frame_indices": "video", "VideoClip": "video",
    "create_connector": "connectors", "CONNECTORS": "connectors", "VidlmmError": "errors",
    "VideoReadError": "errors", "CheckpointError": "errors", "TinyLlavaProcessor": "hf",
}


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module 'vidlmm' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)


def _import_model() -> None:
    """Import `vidlmm.model`, whose last line registers the classes (`vidlmm.hf.register`); nothing when it is
    being imported right now (its last line will)."""
    module = sys.modules.get(f"{__name__}.model")
    if module is not None and getattr(module.__spec__, "_initializing", False):
        return
    try:
        importlib.import_module(".model", __name__)
    except Exception:  # noqa: BLE001 - a failed registration must not break the user's transformers import
        logging.getLogger(__name__).warning("vidlmm could not register with transformers' auto classes",
                                            exc_info=True)


def _transformers_ready() -> bool:
    """False while transformers' `modeling_utils` is half imported (it imports the auto classes itself, and
    `vidlmm.model` cannot import `PreTrainedModel` from it until it is done)."""
    module = sys.modules.get("transformers.modeling_utils")
    return module is None or not getattr(module.__spec__, "_initializing", False)


class _RegisterOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: when transformers' auto classes are first imported, it lets the real finder load them
    and then registers vidlmm's classes, so `import vidlmm` does not pay for importing transformers and torch.
    When it is transformers' own `modeling_utils` that imports the auto classes (e.g. `from transformers import
    SiglipModel` first), registering waits until `modeling_utils` is done."""

    targets = ("transformers.models.auto", "transformers.modeling_utils")

    def find_spec(self, name, path=None, target=None):
        if name not in self.targets:
            return None
        sys.meta_path.remove(self)  # the real finders find it
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is not None and spec.loader is not None:
            exec_module = spec.loader.exec_module

            def exec_and_register(module):
                exec_module(module)
                # modeling_utils itself counts as done here (its import flag is cleared only after this returns)
                ready = name == "transformers.modeling_utils" or _transformers_ready()
                if "transformers.models.auto" in sys.modules and ready and self in sys.meta_path:
                    sys.meta_path.remove(self)
                    _import_model()

            spec.loader.exec_module = exec_and_register
        return spec


if "transformers.models.auto" in sys.modules and _transformers_ready():
    _import_model()
elif not any(type(finder).__name__ == "_RegisterOnImport" for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterOnImport())
