"""Which models the app offers, and a small pool of loaded ones.

A model is named by a string (the dropdown's value and the API's `model` argument):
``"default"`` (the startup model), an embedded folder name under the models dir (``group``, ``naive``, ``image``,
``llava_mini``, ``pool``, ``tome``, ``topk``), a published hub id, or (when custom models are allowed) any
checkpoint folder or hub id.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from pathlib import Path

from vidlmm.errors import CheckpointError

# Published TinyLLaVA-Video checkpoints (need internet once, then the Hugging Face cache).
HUB_MODELS = {
    "Zhang199/TinyLLaVA-Video-Qwen2.5-3B-Group-16-512": "groupresampler",
    "Zhang199/TinyLLaVA-Video-Qwen2.5-3B-Group-1fps-512": "groupresampler",
    "Zhang199/TinyLLaVA-Video-Qwen2.5-3B-Naive-16-512": "naiveresampler",
    "Zhang199/TinyLLaVA-Video-Phi2-Naive-16-512": "naiveresampler",
}
# The resampler switch: short name -> registry name of the connector (the related-work compressors keep theirs).
RESAMPLERS = {"group": "groupresampler", "naive": "naiveresampler", "image": "resampler",
              "llava_mini": "llava_mini", "pool": "pool", "tome": "tome", "topk": "topk"}
RESAMPLER_LABELS = {"group": "group resampler", "naive": "naive resampler", "image": "image-level resampler",
                    "llava_mini": "LLaVA-Mini", "pool": "Dynamic-VLM pooling",
                    "tome": "ToMe merging (reimplementation)", "topk": "top-k pruning"}
_LEGACY = {"resamplerwithpe": "naiveresampler"}


def connector_of(folder: Path) -> str | None:
    """The connector registry name a checkpoint folder's config.json names, without loading anything."""
    try:
        kind = json.loads((folder / "config.json").read_text())["connector_type"].lower()
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    return _LEGACY.get(kind, kind)


@dataclass(frozen=True)
class ModelChoice:
    value: str          # what the dropdown / API passes
    label: str          # what the user reads
    source: str         # folder or hub id given to load_model
    connector: str | None
    kind: str           # "default", "embedded", "hub" or "custom"


def discover_models(models_dir: str | Path, default_source: str, default_trained: bool) -> list[ModelChoice]:
    """The startup default first, then every checkpoint folder under models_dir, then the published hub ids."""
    default_path = Path(default_source)
    default_connector = connector_of(default_path) if default_path.is_dir() else HUB_MODELS.get(default_source)
    note = "" if default_trained else " (random stand-in: answers are meaningless)"
    choices = [ModelChoice("default", f"default: {default_path.name or default_source}{note}", default_source,
                           default_connector, "default")]
    root = Path(models_dir)
    if root.is_dir():
        for folder in sorted(p for p in root.iterdir() if (p / "config.json").is_file()):
            connector = connector_of(folder)
            choices.append(ModelChoice(folder.name, f"{folder.name} · {connector} (embedded)", str(folder), connector,
                                       "embedded"))
    for hub_id, connector in HUB_MODELS.items():
        choices.append(ModelChoice(hub_id, f"{hub_id} (hub, needs internet once)", hub_id, connector, "hub"))
    return choices


def distinct_models(choices: list[ModelChoice], limit: int = 3) -> list[str]:
    """Up to `limit` local models with different checkpoints, embedded first (the default when it is another one)."""
    picked, sources = [], set()
    for c in sorted(choices, key=lambda c: ["embedded", "default"].index(c.kind) if c.kind in ("embedded", "default")
                    else 9):
        if c.kind in ("embedded", "default") and c.source not in sources and len(picked) < limit:
            picked.append(c.value)
            sources.add(c.source)
    return picked


def matching_model(choices: list[ModelChoice], current: str, resampler: str) -> str:
    """The model to switch to when the user picks a resampler: the current one if it already has that connector,
    else one with it from the same family (embedded or hub; the default counts as embedded), else any; the current
    model when none has it."""
    wanted = RESAMPLERS.get(resampler, resampler)
    now = next((c for c in choices if c.value == current), None)
    if now is not None and now.connector == wanted:
        return current
    family = "hub" if now is not None and now.kind == "hub" else "embedded"
    order = [family, "embedded", "default", "hub", "custom"]
    ranked = sorted((c for c in choices if c.connector == wanted), key=lambda c: order.index(c.kind))
    return ranked[0].value if ranked else current


@dataclass
class LoadedModel:
    name: str
    source: str
    lmm: object  # vidlmm.pipeline.VideoLMM with caching off: sessions bring their own cache views
    connector: str
    trained: bool


class ModelPool:
    """Loaded models, at most `max_loaded` (least recently used dropped first), each loaded once even when many
    requests ask for it at the same time."""

    def __init__(self, choices: list[ModelChoice], *, max_loaded: int = 2, dtype="auto", device="auto",
                 quantization=None, allow_custom: bool = True, default_trained: bool = True):
        self.choices = choices
        self.max_loaded = max(1, int(max_loaded))
        self.load_kwargs = dict(dtype=dtype, device=device, quantization=quantization)
        self.allow_custom = allow_custom
        self.default_trained = default_trained
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    def resolve(self, name: str | None) -> ModelChoice:
        """A user's model string -> the choice to load. Unknown names are a one-sentence CheckpointError."""
        name = (name or "default").strip()
        for c in self.choices:
            if name in (c.value, c.label, c.source):
                return c
        if not self.allow_custom:
            known = ", ".join(c.value for c in self.choices)
            raise CheckpointError(f"Unknown model '{name}'; this app offers: {known}.")
        path = Path(name).expanduser()
        connector = connector_of(path) if path.is_dir() else None
        return ModelChoice(name, name, str(path) if path.is_dir() else name, connector, "custom")

    def get(self, name: str | None) -> LoadedModel:
        """The loaded model for a name (two names of one checkpoint share it), named as asked."""
        choice = self.resolve(name)
        return replace(self._get(choice), name=choice.value)

    def _get(self, choice: ModelChoice) -> LoadedModel:
        key = choice.source
        with self._lock:
            if key in self._loaded:
                self._loaded.move_to_end(key)
                return self._loaded[key]
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:  # the first caller loads; the others wait here and then find it loaded
            with self._lock:
                if key in self._loaded:
                    self._loaded.move_to_end(key)
                    return self._loaded[key]
            loaded = self._load(choice)
            with self._lock:
                self._loaded[key] = loaded
                while len(self._loaded) > self.max_loaded:
                    self._loaded.popitem(last=False)  # in-flight users keep their reference until they finish
                self._loading.pop(key, None)
        return loaded

    def _load(self, choice: ModelChoice) -> LoadedModel:
        from vidlmm.checkpoint import load_model
        from vidlmm.pipeline import VideoLMM

        model = load_model(choice.source, **self.load_kwargs)
        trained = self.default_trained if choice.kind == "default" else True
        return LoadedModel(choice.value, choice.source, VideoLMM(model, cache_bytes=0),
                           model.connector._connector.registry_name, trained)

    def loaded_names(self) -> list[str]:
        with self._lock:
            return [m.name for m in self._loaded.values()]
