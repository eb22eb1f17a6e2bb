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
from dataclasses import dataclass, field, replace
from pathlib import Path

from vidlmm.connectors import CONNECTORS, connector_class, resolve_connector_name
from vidlmm.errors import CheckpointError

# Published TinyLLaVA-Video checkpoints (need internet once, then the Hugging Face cache).
HUB_MODELS = {
    "Zhang199/TinyLLaVA-Video-Qwen2.5-3B-Group-16-512": "groupresampler",
    "Zhang199/TinyLLaVA-Video-Qwen2.5-3B-Group-1fps-512": "groupresampler",
    "Zhang199/TinyLLaVA-Video-Qwen2.5-3B-Naive-16-512": "naiveresampler",
    "Zhang199/TinyLLaVA-Video-Phi2-Naive-16-512": "naiveresampler",
}


def resampler_switch() -> dict:
    """The resampler switch: short name -> connector class, for every registered resampler and compressor (in
    registration order; a connector registered later, e.g. by a plugin, is offered too)."""
    return {cls.switch_name(): cls for cls in CONNECTORS.values() if cls.family != "projector"}


def switch_name_of(connector: str | None) -> str | None:
    """The switch's short name for a connector registry name (None when the switch does not offer it)."""
    return next((k for k, cls in resampler_switch().items() if cls.registry_name == connector), None)


def has_picture(connector: str | None) -> bool:
    """Whether a connector draws its own picture (the per-frame compressors) rather than attention maps."""
    try:
        return connector is not None and connector_class(connector).picture_kind is not None
    except ValueError:  # not a registered connector
        return False


def connector_of(folder: Path) -> str | None:
    """The connector registry name a checkpoint folder's config.json names, without loading anything."""
    try:
        kind = json.loads((folder / "config.json").read_text())["connector_type"].lower()
    except (OSError, ValueError, KeyError, AttributeError):
        return None
    try:
        return resolve_connector_name(kind)
    except ValueError:  # unknown here: loading it will say so
        return kind


@dataclass(frozen=True)
class ModelChoice:
    value: str          # what the dropdown / API passes
    label: str          # what the user reads
    source: str         # folder or hub id given to load_model
    connector: str | None
    kind: str           # "default", "embedded", "hub" or "custom"


def discover_models(models_dir: str | Path, default_source: str, default_trained: bool,
                    hub: bool = True) -> list[ModelChoice]:
    """The startup default first, then every checkpoint folder under models_dir, then (when `hub`) the published
    hub ids."""
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
    for hub_id, connector in HUB_MODELS.items() if hub else ():
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
    cls = resampler_switch().get(resampler)
    wanted = cls.registry_name if cls is not None else resampler
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
    weight_bytes: int = 0
    precision: dict = field(default_factory=dict)  # vidlmm.precision.Precision.to_json(): what it runs in, and why


class ModelPool:
    """Loaded models whose weights together stay within `max_bytes` (least recently used dropped first to make
    room). Each checkpoint's weight bytes are estimated from its config.json before anything is read, and one that
    cannot fit the budget or the device's free memory is refused with one sentence. Callers load inside the app's
    model slot (`app.jobs.ModelSlot`), so no load runs beside a job (two loads never overlap in any case).
    """

    def __init__(self, choices: list[ModelChoice], *, max_bytes: int, dtype="auto", device="auto",
                 quantization=None, allow_custom: bool = True, default_trained: bool = True):
        self.choices = choices
        self.max_bytes = int(max_bytes)
        self.load_kwargs = dict(dtype=dtype, device=device, quantization=quantization)
        self.allow_custom = allow_custom
        self.default_trained = default_trained
        self._loaded: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()  # guards the dict: light endpoints read it while a job loads
        self._loading = threading.Lock()

    def resolve(self, name: str | None) -> ModelChoice:
        """A user's model string -> the choice to load. Unknown names are a one-sentence CheckpointError."""
        name = (name or "default").strip() if isinstance(name, str) or name is None else str(name)
        for c in self.choices:
            if name in (c.value, c.label, c.source):
                return c
        if not self.allow_custom:
            known = ", ".join(c.value for c in self.choices)
            raise CheckpointError(f"Unknown model '{name[:80]}'; this app offers: {known}.")
        path = Path(name).expanduser()
        connector = connector_of(path) if path.is_dir() else None
        return ModelChoice(name, name, str(path) if path.is_dir() else name, connector, "custom")

    def loaded(self, name: str | None) -> LoadedModel | None:
        """The model for a name when it is loaded already (named as asked), else None; never loads."""
        choice = self.resolve(name)
        with self._lock:
            found = self._loaded.get(choice.source)
            if found is not None:
                self._loaded.move_to_end(choice.source)
        return None if found is None else replace(found, name=choice.value)

    def get(self, name: str | None) -> LoadedModel:
        """The loaded model for a name (two names of one checkpoint share it), loading it when needed: call
        inside the model slot. Loads never overlap (building a model on the meta device patches torch for the
        whole process while it runs)."""
        choice = self.resolve(name)
        with self._loading:
            found = self.loaded(name)
            if found is not None:
                return found
            loaded = self._load(choice)
            with self._lock:
                self._loaded[choice.source] = loaded
        return replace(loaded, name=choice.value)

    def _load(self, choice: ModelChoice) -> LoadedModel:
        import gc

        from vidlmm.checkpoint import check_checkpoint_fits, display_name, load_model
        from vidlmm.memory import gigabytes, needed_bytes
        from vidlmm.pipeline import VideoLMM

        # config.json only; refuses what cannot fit the device even once every loaded model is dropped. The
        # precision is chosen among those whose weights fit this pool too (needed_bytes is monotonic)
        device_free, budget = self._free_bytes() + self.loaded_bytes, needed_bytes(self.max_bytes)
        try:
            plan = check_checkpoint_fits(choice.source, free=min(device_free, budget), **self.load_kwargs)
        except CheckpointError:
            if device_free <= budget:
                raise
            plan = check_checkpoint_fits(choice.source, free=device_free, **self.load_kwargs)  # refused below
        need = int(plan.weight_bytes or 0)
        if need > self.max_bytes:
            raise CheckpointError(f"Model '{display_name(choice.source)}' needs {gigabytes(need)} for its weights in "
                                  f"{plan.name}, over this app's model memory of {gigabytes(self.max_bytes)} "
                                  "(--model-memory-mb).")
        with self._lock:  # make room: in-flight users keep their reference until they finish
            while self._loaded and sum(m.weight_bytes for m in self._loaded.values()) + need > self.max_bytes:
                self._loaded.popitem(last=False)
        gc.collect()  # the evicted weights are freed before the new ones are read
        model = load_model(choice.source, precision=plan, **self.load_kwargs)
        trained = self.default_trained if choice.kind == "default" else True
        precision = model.precision.to_json() if getattr(model, "precision", None) is not None else {}
        return LoadedModel(choice.value, choice.source, VideoLMM(model, cache_bytes=0),
                           model.connector.registry_name, trained,
                           weight_bytes=int(precision.get("weight_bytes") or need), precision=precision)

    def _free_bytes(self) -> int:
        from vidlmm.checkpoint import pick_device
        from vidlmm.memory import free_memory_bytes

        return free_memory_bytes(pick_device(self.load_kwargs["device"]))

    def loaded_names(self) -> list[str]:
        with self._lock:
            return [m.name for m in self._loaded.values()]

    @property
    def loaded_bytes(self) -> int:
        with self._lock:
            return sum(m.weight_bytes for m in self._loaded.values())
