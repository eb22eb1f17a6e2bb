"""Load and save TinyLLaVA-Video checkpoints in the published layout, without the reference code.

Published layout (a folder or a hub id):
    config.json (model_type "tinyllava"), model.safetensors or model-0000k-of-0000n.safetensors + index,
    tokenizer files, generation_config.json. Keys: `language_model.*`, `vision_tower._vision_tower.vision_model.*`
    (SigLIP/CLIP; one level more than transformers 5's module), `connector._connector.*` (the reference's wrapper;
    our model's `connector.*`). Both are renamed at load and back at save. A tied `lm_head` is usually absent and
    is re-tied.
Stage-1 split layout (the reference's pretrain output): config.json + tokenizer at the root and
    `language_model/`, `vision_tower/`, `connector/` sub-folders, each with a `pytorch_model.bin`.

Loading is strict: any missing or unexpected key is an error naming them, except the tied `lm_head` and the
tower weights the features never use (SigLIP's `head.*` and `post_layernorm.*`), checked on the files' headers
before transformers' `from_pretrained` reads the weights (quantized on load: bitsandbytes' `BitsAndBytesConfig`, or
torch's dynamic int8 through the quantizer `vidlmm.quantize` registers). Before any weight is read, the
weights' bytes are estimated from config.json and checked against the device's free memory (`vidlmm.memory`),
and the precision is chosen (`vidlmm.precision`). Weight files must stay inside the checkpoint folder; a damaged
or truncated one is a one-sentence CheckpointError. Hub ids download safetensors only, pinned to a revision.
"""

from __future__ import annotations

import json
import logging
import os
import re
from contextlib import contextmanager
from pathlib import Path

import torch

from .config import TinyLlavaConfig
from .errors import CheckpointError
from .model import CONNECTOR_RENAMES, TinyLlavaVideo, choose_attn_implementation
from .vision import TOWERS

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
TOWER_PREFIX = "vision_tower._vision_tower."
# hub downloads: configs, tokenizer files and safetensors only (never pickles: a .bin can run code when loaded)
HUB_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model"]
PINS_ENV = "VIDLMM_HUB_PINS"
PINS_FILE = "vidlmm-hub-pins.json"
COMMIT = re.compile(r"[0-9a-f]{40}")


# ---- locating files ------------------------------------------------------------------------------------
def display_name(path_or_id: str | os.PathLike) -> str:
    """What messages call a model: a hub id as written, a folder by its base name (never a full server path)."""
    name = str(path_or_id)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")) and not Path(name).expanduser().exists():
        return name
    return Path(name.rstrip("/")).name or name


def resolve_checkpoint(path_or_id: str | os.PathLike, *, revision: str | None = None) -> Path:
    """A local folder as is; otherwise a hub id fetched with huggingface_hub (cache only when offline), pinned to
    a revision (see `download`)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"'{path.name}' has no config.json: not a TinyLLaVA checkpoint folder.")
        return path
    name = str(path_or_id)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"Model '{display_name(name)}' is neither a checkpoint folder nor a hub id like "
                              "'org/name'.")
    return download(name, revision=revision)


def pins_path() -> Path:
    """The JSON file of pinned hub revisions: $VIDLMM_HUB_PINS, else vidlmm-hub-pins.json in the Hugging Face cache."""
    if os.environ.get(PINS_ENV):
        return Path(os.environ[PINS_ENV]).expanduser()
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / PINS_FILE


def read_pins() -> dict[str, str]:
    """{hub id: commit hash} pinned so far ({} before the first pin)."""
    path = pins_path()
    if not path.is_file():
        return {}
    try:
        pins = json.loads(path.read_text())
    except (OSError, ValueError):
        pins = None
    if not isinstance(pins, dict) or not all(isinstance(v, str) and COMMIT.fullmatch(v) for v in pins.values()):
        # never fall back to unpinned: that would load whatever the hub serves today
        raise CheckpointError(f"The hub revision pin file '{path.name}' is damaged; fix it or delete it to pin again.")
    return pins


def _record_pin(repo_id: str, commit: str) -> None:
    path = pins_path()
    try:
        pins = read_pins()
        pins[repo_id] = commit
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(pins, indent=2, sort_keys=True))
        os.replace(tmp, path)  # atomic: a reader sees the old pins or the new ones, never half a file
    except OSError as err:  # a read-only cache: this load is still at `commit`, the next one pins again
        log.warning("could not record the pinned revision of %s (%s)", repo_id, err.strerror or type(err).__name__)


def config_folder(path_or_id: str | os.PathLike, *, revision: str | None = None) -> Path:
    """The folder holding a checkpoint's config.json: a local folder as is; for a hub id, a snapshot of its
    config.json alone (pinned like `download`), so its size can be checked before gigabytes of weights are fetched."""
    path = Path(path_or_id).expanduser()
    name = str(path_or_id)
    if path.is_dir() or path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        return resolve_checkpoint(path_or_id)  # a folder, or its one-sentence error
    return download(name, revision=revision, patterns=["config.json"])


def download(repo_id: str, *, revision: str | None = None, patterns: list[str] | None = None) -> Path:
    """A hub snapshot (configs, tokenizer files, safetensors weights; never .bin pickles), from the local cache
    only when HF_HUB_OFFLINE is set.

    Pinned: with `revision` (a branch, tag or commit) that revision is fetched. Without one, the first load of a
    hub id resolves it once (the hub's main branch online, the cached one offline), records the commit hash in
    `pins_path()` (the Hugging Face cache, or $VIDLMM_HUB_PINS), and every later load of that id uses that commit,
    online or offline, so a change pushed to the hub is never picked up silently. Delete its entry to re-pin."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    pinned = revision or read_pins().get(repo_id)
    try:
        folder = Path(snapshot_download(repo_id, revision=pinned, allow_patterns=patterns or HUB_PATTERNS,
                                        local_files_only=offline))
    except Exception as err:  # network, auth or not-in-cache: one sentence for the user
        where = "in the local Hugging Face cache (offline mode)" if offline else "on the Hugging Face Hub"
        at = f" at revision {pinned}" if pinned else ""
        raise CheckpointError(f"Model '{repo_id}'{at} could not be found {where}: {type(err).__name__}.") from None
    if pinned is None and COMMIT.fullmatch(folder.name):  # snapshots/<commit hash>
        _record_pin(repo_id, folder.name)
    return folder


# ---- reading weights -----------------------------------------------------------------------------------
def _why(err: BaseException) -> str:
    """A short reason from a reader's exception, without the file paths an OSError carries."""
    if isinstance(err, OSError):
        return err.strerror or type(err).__name__
    text = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return text[:160]


def weight_file(folder: Path, name: str) -> Path:
    """`folder / name` for a weight file the checkpoint names, refused (one sentence) unless it stays inside the
    folder: no absolute path, no '..', no symlink resolving elsewhere (a hub snapshot's links into its own repo's
    blobs/ are inside)."""
    rel = Path(name)
    shown = rel.name or name
    if not name or rel.is_absolute() or ".." in rel.parts or rel.drive:
        raise CheckpointError(f"Checkpoint '{folder.name}' names weight file '{shown}' outside its folder.")
    path = folder / rel
    real = path.resolve()
    roots = [folder.resolve()]
    if folder.parent.name == "snapshots":  # huggingface_hub cache: snapshots/<commit>/x -> ../../blobs/<hash>
        roots.append(folder.parent.parent.resolve() / "blobs")
    if not any(real == root or root in real.parents for root in roots):
        raise CheckpointError(f"Checkpoint '{folder.name}' has weight file '{shown}' linking outside its folder.")
    return path


class CheckpointWeights:
    """The tensors of a checkpoint folder (either layout) under their published names.

    Opening reads and checks only the headers: a shard named outside the folder, a missing shard, or a damaged
    or truncated file is a one-sentence CheckpointError before any tensor is read. safetensors tensors are then
    read one at a time with `read` (so a load holds one tensor beyond the model); the stage-1 split layout's
    pickles (torch.load, weights_only) are read whole. Use as a context manager, or call `close()`."""

    def __init__(self, folder: str | os.PathLike, device: str | torch.device = "cpu"):
        self.folder = Path(folder)
        self.device = str(device)
        self._handles: dict[str, object] = {}  # key -> open safe_open handle
        self._tensors: dict[str, torch.Tensor] = {}  # split layout, read whole
        self._shapes: dict[str, tuple[int, ...]] = {}
        index = self.folder / "model.safetensors.index.json"
        if index.is_file():
            for shard in self._shard_names(index):
                path = weight_file(self.folder, shard)
                if not path.is_file():
                    raise CheckpointError(f"Checkpoint '{self.folder.name}' lists shard '{Path(shard).name}' but "
                                          "the file is missing.")
                self._open_safetensors(path)
        elif (self.folder / "model.safetensors").is_file():
            self._open_safetensors(weight_file(self.folder, "model.safetensors"))
        elif is_split_layout(self.folder):
            self._tensors = self._read_split_layout()
            self._shapes = {k: tuple(v.shape) for k, v in self._tensors.items()}
        else:
            raise CheckpointError(f"No weights in '{self.folder.name}': expected model.safetensors, an index of "
                                  "shards, or language_model/ + vision_tower/ + connector/ sub-folders.")

    def _shard_names(self, index: Path) -> list[str]:
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            names = sorted(set(weight_map.values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            raise CheckpointError(f"The shard index of '{self.folder.name}' (model.safetensors.index.json) is "
                                  "damaged.") from None
        if not all(isinstance(n, str) for n in names):
            raise CheckpointError(f"The shard index of '{self.folder.name}' names a shard that is not a file name.")
        return names

    def _open_safetensors(self, path: Path) -> None:
        from safetensors import safe_open

        try:
            handle = safe_open(str(path), framework="pt", device=self.device)
            shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
        except Exception as err:  # SafetensorError (bad header, truncated), OSError, a directory named like one
            raise CheckpointError(f"Weights file '{path.name}' of '{self.folder.name}' is damaged or truncated "
                                  f"({_why(err)}).") from None
        for key in shapes:
            self._handles[key] = (handle, path.name)
        self._shapes.update(shapes)

    def _read_split_layout(self) -> dict[str, torch.Tensor]:
        state = {}
        for sub, prefix in SPLIT_PREFIXES.items():
            if not (self.folder / sub / "pytorch_model.bin").is_file():
                continue
            file = weight_file(self.folder, f"{sub}/pytorch_model.bin")
            try:
                part = torch.load(file, map_location=self.device, weights_only=True)
            except Exception as err:  # truncated zip, bad pickle, a disallowed global
                raise CheckpointError(f"Weights file '{sub}/pytorch_model.bin' of '{self.folder.name}' is damaged "
                                      f"or truncated ({_why(err)}).") from None
            if not isinstance(part, dict):
                raise CheckpointError(f"Weights file '{sub}/pytorch_model.bin' of '{self.folder.name}' holds no "
                                      "state dict.")
            state.update({prefix + key: value for key, value in part.items()})
        return state

    def keys(self) -> list[str]:
        return list(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def read(self, key: str) -> torch.Tensor:
        """The tensor `key` (published name), read now; the split layout hands its tensor over (not kept)."""
        if key in self._tensors:
            return self._tensors.pop(key)
        handle, file = self._handles[key]
        try:
            return handle.get_tensor(key)
        except Exception as err:  # the file changed or went away after its header was read
            raise CheckpointError(f"Weights file '{file}' of '{self.folder.name}' could not be read "
                                  f"({_why(err)}).") from None

    def close(self) -> None:
        self._handles.clear()  # safe_open handles unmap their file when released
        self._tensors.clear()

    def __enter__(self) -> "CheckpointWeights":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_state_dict(folder: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder under their published names (either layout)."""
    with CheckpointWeights(folder, device) as weights:
        return {key: weights.read(key) for key in weights.keys()}


# the reference's stage-1 sub-folders and the published-key prefix each one's keys sit under
SPLIT_PREFIXES = {"language_model": "language_model.", "vision_tower": TOWER_PREFIX, "connector": "connector."}


def is_split_layout(folder: Path) -> bool:
    """The reference's stage-1 output: no merged weights at the root, sub-folders with pytorch_model.bin."""
    folder = Path(folder)
    return not any((folder / name).is_file() for name in ("model.safetensors", "model.safetensors.index.json")) \
        and all((folder / sub / "pytorch_model.bin").is_file() for sub in ("language_model", "vision_tower"))


def read_split_layout(folder: Path, device="cpu") -> dict[str, torch.Tensor]:
    """The reference's stage-1 output: three sub-folders with pytorch_model.bin (read with weights_only)."""
    with CheckpointWeights(folder, device) as weights:
        return {key: weights.read(key) for key in weights.keys()}


# ---- key mapping ---------------------------------------------------------------------------------------
def _renames(tower_type: str) -> tuple[tuple[str, str], ...]:
    """(published prefix, module prefix) pairs: the tower's extra published level (`vision_model.`) that
    transformers 5 modules do not have, and the reference's `Connector` wrapper around the connector module."""
    return ((TOWER_PREFIX + TOWERS[tower_type].published_level, TOWER_PREFIX),
            *CONNECTOR_RENAMES)


def _rename(key: str, pairs) -> str:
    for old, new in pairs:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def published_to_module_keys(state: dict, tower_type: str) -> dict:
    """Published key names -> the model's (see `_renames`)."""
    return {_rename(k, _renames(tower_type)): v for k, v in state.items()}


def module_to_published_keys(state: dict, tower_type: str) -> dict:
    """The model's key names -> the published ones."""
    return {_rename(k, [(new, old) for old, new in _renames(tower_type)]): v for k, v in state.items()}


def check_keys(model: TinyLlavaVideo, file_keys) -> list[str]:
    """Raise CheckpointError on unexpected or missing keys, named as in the files (published names); return the
    model's keys that may be missing (the tied lm_head, tower weights the features never use)."""
    module_of = module_to_published_keys({k: k for k in model.state_dict()}, model.tower_type)  # published -> ours
    got = set(file_keys)
    unexpected = sorted(got - set(module_of))
    missing = sorted(set(module_of) - got)
    tied = model.language_model.config.tie_word_embeddings
    unused = tuple(TOWER_PREFIX + p for p in model.vision_tower.spec.unused_prefixes)
    allowed = [k for k in missing if module_of[k].startswith(unused)
               or (tied and module_of[k].startswith("language_model.lm_head."))]
    missing = [k for k in missing if k not in allowed]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})")
        raise CheckpointError("Checkpoint does not match the model: " + "; ".join(parts) + ".")
    return [module_of[k] for k in allowed]


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


# ---- loading -------------------------------------------------------------------------------------------
def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError("CUDA was asked for but no GPU is available.")
    return torch.device(device)


def check_shapes(model: TinyLlavaVideo, shapes: dict[str, tuple[int, ...]]) -> None:
    """Raise CheckpointError when a stored tensor's shape (by published name) differs from the one the config
    builds."""
    expected = module_to_published_keys(model.state_dict(), model.tower_type)
    for key, shape in shapes.items():
        if key in expected and tuple(expected[key].shape) != tuple(shape):
            raise CheckpointError(f"Checkpoint does not match the model: '{key}' is {list(shape)} in the file but "
                                  f"the config makes it {list(expected[key].shape)}.")


def load_model(path_or_id: str | os.PathLike, *, dtype: str | torch.dtype | None = "auto", device: str | None = "auto",
               quantization: str | None = None, attn_implementation: str | None = None,
               tokenizer: bool = True, revision: str | None = None, check_memory: bool = True,
               precision=None) -> TinyLlavaVideo:
    """Load a TinyLLaVA-Video checkpoint (either layout) into a ready-to-use model in eval mode.

    dtype: "auto" picks by device and model (`vidlmm.precision.plan_precision`): bf16 on a GPU; fp32 on CPU for a
        small model; for a big one on CPU the fastest of fp32, bf16 and int8 measured on this CPU whose weights fit.
        An explicit "fp32", "bf16", "fp16" (or torch dtype) is used as asked.
    quantization: None, "8bit" / "4bit" (bitsandbytes) or "int8" (torch dynamic, CPU), language model linears only;
        tower and connector unquantized.
    revision: for a hub id, the branch, tag or commit to load; without one the first load pins the commit it
        resolved and later loads reuse it, offline too (see `download`).
    check_memory: estimate the weights' bytes from config.json and refuse (one-sentence CheckpointError naming the
        bytes needed and free) before reading any weights when they cannot fit the device's free memory.
    precision: a `Precision` planned earlier (`check_checkpoint_fits`, e.g. against a memory budget), used
        instead of dtype / quantization.
    The loaded model carries `model.precision` (a `vidlmm.precision.Precision`: dtype, quantization, measured
    GFLOPS, the reason, the weight estimate). The tokenizer is read from the checkpoint folder itself, never from
    `tokenizer_name_or_path`.
    """
    from .memory import parameter_breakdown
    from .precision import check_precision_fits, plan_precision

    folder = config_folder(path_or_id, revision=revision)  # a hub id: its config.json only, until it is checked
    try:
        config = TinyLlavaConfig.from_json_file(folder / "config.json")
    except (ValueError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Bad config.json in '{display_name(path_or_id)}': {err}") from None
    device = pick_device(device)
    attn = attn_implementation or choose_attn_implementation(device)
    try:
        model = _build_empty(config, attn)
    except ValueError as err:
        raise CheckpointError(f"Cannot build the model of '{folder.name}': {err}") from None
    params = parameter_breakdown(model)  # the meta model: counting allocates nothing
    if precision is None:
        precision = plan_precision(params, device, dtype=dtype, quantization=quantization)
    if check_memory:
        check_precision_fits(precision, name=display_name(path_or_id), device=device)
    folder = resolve_checkpoint(path_or_id, revision=revision)  # now the weights (a hub id: the pinned commit)
    dtype, quantization = precision.dtype, precision.quantization
    state = None
    if is_split_layout(folder):  # the reference's stage 1: pickles, read once and handed to from_pretrained
        state = read_split_layout(folder)
        check_keys(model, state)
        check_shapes(model, {k: tuple(v.shape) for k, v in state.items()})
    else:  # the headers alone: errors name the files' keys before any tensor is read
        with CheckpointWeights(folder) as weights:
            check_keys(model, weights.keys())
            check_shapes(model, {k: weights.shape(k) for k in weights.keys()})
    kwargs = {"dtype": dtype, "attn_implementation": attn}
    if quantization is not None:
        from .quantize import quantization_config

        kwargs["quantization_config"] = quantization_config(model, quantization, device, dtype)
    if device.type != "cpu":
        kwargs["device_map"] = {"": str(device)}
    with _quiet_loading():
        model = TinyLlavaVideo.from_pretrained(None if state is not None else str(folder), config=config,
                                               state_dict=state, **kwargs)
    del state
    model.eval().requires_grad_(False)
    if tokenizer:
        from .tokenizer import load_tokenizer

        model.tokenizer = load_tokenizer(folder, model_max_length=config.tokenizer_model_max_length,
                                         padding_side=config.tokenizer_padding_side)
    model.source = str(path_or_id)
    model.precision = precision
    return model


@contextmanager
def _quiet_loading():
    """transformers' "Loading weights" progress bar off while `load_model` reads (a library call, not a CLI)."""
    from transformers.utils import logging as hf_logging

    shown = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if shown:
            hf_logging.enable_progress_bar()


def _build_empty(config: TinyLlavaConfig, attn: str) -> TinyLlavaVideo:
    """The model with parameters on the meta device: no random init of billions of weights we overwrite."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        model = TinyLlavaVideo(config, attn_implementation=attn)
    model.language_model.tie_weights()  # counted once by the estimate; re-tied to the loaded embeddings later
    return model


def check_checkpoint_fits(path_or_id: str | os.PathLike, *, dtype="auto", device: str | None = "auto",
                          quantization: str | None = None, revision: str | None = None, free: int | None = None):
    """What `load_model` decides before reading any weight, without loading: the `Precision` it would load in
    (its `weight_bytes` is the estimate). Raises the same one-sentence CheckpointError when it cannot fit.

    free: bytes to assume free (default: measured now), e.g. plus what a caller will release before loading."""
    from .memory import parameter_breakdown
    from .precision import check_precision_fits, plan_precision

    folder = config_folder(path_or_id, revision=revision)
    try:
        config = TinyLlavaConfig.from_json_file(folder / "config.json")
        device = pick_device(device)
        model = _build_empty(config, "sdpa")
    except (ValueError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Bad config.json in '{display_name(path_or_id)}': {err}") from None
    precision = plan_precision(parameter_breakdown(model), device, dtype=dtype, quantization=quantization, free=free)
    check_precision_fits(precision, name=display_name(path_or_id), device=device, free=free)
    return precision


# ---- saving --------------------------------------------------------------------------------------------
def save_model(model: TinyLlavaVideo, folder: str | os.PathLike, *, max_shard_bytes: int = 2 * 1024**3,
               dtype: torch.dtype | None = None) -> Path:
    """Write the published layout: config.json, safetensors shards (+ index when more than one), tokenizer,
    generation_config.json. A tied lm_head is left out, as the published files do."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = module_to_published_keys(model.state_dict(), model.tower_type)
    if model.language_model.config.tie_word_embeddings:
        state = {k: v for k, v in state.items() if not k.startswith("language_model.lm_head.")}
    state = {k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
             for k, v in state.items()}
    shards, current, size = [], {}, 0
    for key in sorted(state):
        nbytes = state[key].numel() * state[key].element_size()
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[key] = state[key]
        size += nbytes
    shards.append(current)
    for old in folder.glob("model*.safetensors*"):
        old.unlink()
    if len(shards) == 1:
        save_file(shards[0], folder / "model.safetensors", metadata={"format": "pt"})
    else:
        weight_map = {}
        for i, shard in enumerate(shards, start=1):
            name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
            save_file(shard, folder / name, metadata={"format": "pt"})
            weight_map.update({k: name for k in shard})
        total = sum(v.numel() * v.element_size() for v in state.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True))
    model.config.save(folder)
    (folder / "generation_config.json").write_text(json.dumps(model.config.generation_defaults(), indent=2))
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder)
    return folder


def save_split_layout(model: TinyLlavaVideo, folder: str | os.PathLike) -> Path:
    """Write the reference's stage-1 layout (three sub-folders of pytorch_model.bin)."""
    folder = Path(folder)
    published = module_to_published_keys(model.state_dict(), model.tower_type)
    for sub, prefix in SPLIT_PREFIXES.items():
        part = {k[len(prefix):]: v.detach().cpu() for k, v in published.items() if k.startswith(prefix)}
        (folder / sub).mkdir(parents=True, exist_ok=True)
        torch.save(part, folder / sub / "pytorch_model.bin")
    model.config.save(folder)
    if model.tokenizer is not None:
        model.tokenizer.save_pretrained(folder)
    return folder


# ---- composing a new model from pretrained parts (training stage 1) --------------------------------------
def _local_folder(path_or_id: str) -> Path:
    path = Path(path_or_id).expanduser()
    return path if path.is_dir() else download(str(path_or_id))


def build_from_parts(llm: str, vision_tower: str, *, connector_type: str = "groupresampler", num_queries: int = 512,
                     group: int | None = 16, num_resampler_layers: int = 3, vision_feature_layer: int = -2,
                     select_strategy: str = "patch", video_sampling: dict | None = None, seed: int = 0,
                     conv_version: str = "qwen2_base", connector_options: dict | None = None) -> TinyLlavaVideo:
    """A new TinyLLaVA-Video model from a pretrained causal LM folder (with its tokenizer) and a vision tower
    folder (a SiglipModel / SiglipVisionModel / CLIP / DINOv2 checkpoint), with a freshly initialised connector.
    This is how stage 1 starts, as in the reference's `load_llm` / `load_vision_tower`."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from .model import init_connector_weights
    from .tokenizer import load_tokenizer

    llm_dir, vision_dir = _local_folder(llm), _local_folder(vision_tower)
    text_config = AutoConfig.from_pretrained(llm_dir).to_dict()
    vision_cfg = AutoConfig.from_pretrained(vision_dir)
    vision_cfg = getattr(vision_cfg, "vision_config", vision_cfg)
    vision_config = vision_cfg.to_dict()
    config = TinyLlavaConfig.compose(
        text_config, vision_config, connector_type=connector_type, group=group, num_queries=num_queries,
        num_resampler_layers=num_resampler_layers, vision_feature_layer=vision_feature_layer,
        vision_feature_select_strategy=select_strategy, llm_model_name_or_path=str(llm),
        vision_model_name_or_path=str(vision_tower), tokenizer_name_or_path=str(llm),
        video_sampling=video_sampling, conv_version=conv_version, **(connector_options or {}))
    model = TinyLlavaVideo(config)
    lm = AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32)
    model.language_model.load_state_dict(lm.state_dict())
    tower = AutoModel.from_pretrained(vision_dir, dtype=torch.float32)
    tower = getattr(tower, "vision_model", tower)  # a full SiglipModel: keep its vision half
    missing, unexpected = model.vision_tower._vision_tower.load_state_dict(tower.state_dict(), strict=False)
    if unexpected or [k for k in missing if not k.startswith(model.vision_tower.spec.unused_prefixes)]:
        raise CheckpointError(f"Vision tower '{vision_tower}' does not fit: missing {_few(missing)}, "
                              f"unexpected {_few(unexpected)}.")
    init_connector_weights(model, seed)
    model.tokenizer = load_tokenizer(llm_dir)
    model.language_model.tie_weights()
    return model
