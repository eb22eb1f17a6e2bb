"""Load and save TinyLLaVA-Video checkpoints in the published layout, without the reference code.

Published layout (a folder or a hub id):
    config.json (model_type "tinyllava"), model.safetensors or model-0000k-of-0000n.safetensors + index,
    tokenizer files, generation_config.json. Keys: `language_model.*`, `vision_tower._vision_tower.vision_model.*`
    (SigLIP/CLIP; one level more than transformers 5's module), `connector._connector.*`. A tied `lm_head` is
    usually absent and is re-tied.
Stage-1 split layout (the reference's pretrain output): config.json + tokenizer at the root and
    `language_model/`, `vision_tower/`, `connector/` sub-folders, each with a `pytorch_model.bin`.

Loading is strict: any missing or unexpected key is an error naming them, except the tied `lm_head` and the
tower weights the features never use (SigLIP's `head.*` and `post_layernorm.*`).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from .config import TinyLlavaConfig
from .errors import CheckpointError
from .model import TinyLlavaVideo, choose_attn_implementation
from .vision import TOWERS, tower_type_for

log = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}
TOWER_PREFIX = "vision_tower._vision_tower."
WEIGHT_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.bin", "*/*.json", "*/*.bin"]


# ---- locating files ------------------------------------------------------------------------------------
def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local folder as is; otherwise a hub id fetched with huggingface_hub (cache only when offline)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise CheckpointError(f"'{path.name}' has no config.json: not a TinyLLaVA checkpoint folder.")
        return path
    name = str(path_or_id)
    if path.exists() or name.count("/") != 1 or name.startswith((".", "/", "~")):
        raise CheckpointError(f"Model '{name}' is neither a checkpoint folder nor a hub id like 'org/name'.")
    return _download(name)


def _download(repo_id: str) -> Path:
    """A hub snapshot (weights, configs, tokenizer files); only the local cache when HF_HUB_OFFLINE is set."""
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        return Path(snapshot_download(repo_id, allow_patterns=WEIGHT_PATTERNS, local_files_only=offline))
    except Exception as err:  # network, auth or not-in-cache: one sentence for the user
        where = "in the local Hugging Face cache (offline mode)" if offline else "on the Hugging Face Hub"
        raise CheckpointError(f"Model '{repo_id}' could not be found {where}: {type(err).__name__}.") from None


def read_state_dict(folder: Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a checkpoint folder under their published names (either layout)."""
    from safetensors.torch import load_file

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for shard in shards:
            if not (folder / shard).is_file():
                raise CheckpointError(f"Checkpoint '{folder.name}' lists shard '{shard}' but the file is missing.")
            state.update(load_file(folder / shard, device=str(device)))
        return state
    if (folder / "model.safetensors").is_file():
        return load_file(folder / "model.safetensors", device=str(device))
    if all((folder / sub / "pytorch_model.bin").is_file() for sub in ("language_model", "vision_tower")):
        return read_split_layout(folder, device)
    raise CheckpointError(f"No weights in '{folder.name}': expected model.safetensors, an index of shards, "
                          "or language_model/ + vision_tower/ + connector/ sub-folders.")


# the reference's stage-1 sub-folders and the published-key prefix each one's keys sit under
SPLIT_PREFIXES = {"language_model": "language_model.", "vision_tower": TOWER_PREFIX, "connector": "connector."}


def read_split_layout(folder: Path, device="cpu") -> dict[str, torch.Tensor]:
    """The reference's stage-1 output: three sub-folders with pytorch_model.bin (read with weights_only)."""
    state = {}
    for sub, prefix in SPLIT_PREFIXES.items():
        file = folder / sub / "pytorch_model.bin"
        if not file.is_file():
            continue
        part = torch.load(file, map_location=device, weights_only=True)
        state.update({prefix + key: value for key, value in part.items()})
    return state


# ---- key mapping ---------------------------------------------------------------------------------------
def published_to_module_keys(state: dict, tower_type: str) -> dict:
    """Drop the tower's extra published level (`vision_model.`) that transformers 5 modules do not have."""
    level = TOWER_PREFIX + TOWERS[tower_type].published_level
    return {(TOWER_PREFIX + k[len(level):] if k.startswith(level) else k): v for k, v in state.items()}


def module_to_published_keys(state: dict, tower_type: str) -> dict:
    level = TOWER_PREFIX + TOWERS[tower_type].published_level
    return {(level + k[len(TOWER_PREFIX):] if k.startswith(TOWER_PREFIX) else k): v for k, v in state.items()}


def check_keys(model: TinyLlavaVideo, state: dict) -> list[str]:
    """Raise CheckpointError on unexpected keys or missing keys; return the missing keys that are allowed."""
    expected = set(model.state_dict().keys())
    got = set(state)
    unexpected = sorted(got - expected)
    missing = sorted(expected - got)
    tied = model.language_model.config.tie_word_embeddings
    unused = tuple(TOWER_PREFIX + p for p in model.vision_tower.spec.unused_prefixes)
    allowed = [k for k in missing if k.startswith(unused) or (tied and k.startswith("language_model.lm_head."))]
    missing = [k for k in missing if k not in allowed]
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s) ({_few(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s) ({_few(unexpected)})")
        raise CheckpointError("Checkpoint does not match the model: " + "; ".join(parts) + ".")
    return allowed


def _few(keys: list[str], n: int = 4) -> str:
    return ", ".join(keys[:n]) + (", ..." if len(keys) > n else "")


# ---- loading -------------------------------------------------------------------------------------------
def pick_device(device: str | None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if str(device).startswith("cuda") and not torch.cuda.is_available():
        raise CheckpointError("CUDA was asked for but no GPU is available.")
    return torch.device(device)


def pick_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """"auto": fp32 on CPU (the reference's numerics), bf16 on GPU."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise CheckpointError(f"Unknown dtype '{dtype}' (use fp32, bf16 or fp16).")
    return DTYPES[dtype]


def load_model(path_or_id: str | os.PathLike, *, dtype: str | torch.dtype | None = "auto", device: str | None = "auto",
               quantization: str | None = None, attn_implementation: str | None = None,
               tokenizer: bool = True) -> TinyLlavaVideo:
    """Load a TinyLLaVA-Video checkpoint (either layout) into a ready-to-use model in eval mode.

    quantization: None, "8bit" or "4bit" (bitsandbytes, language model only; tower and connector unquantized).
    The tokenizer is read from the checkpoint folder itself, never from `tokenizer_name_or_path`.
    """
    from accelerate import init_empty_weights

    folder = resolve_checkpoint(path_or_id)
    try:
        config = TinyLlavaConfig.from_json_file(folder / "config.json")
    except (ValueError, KeyError, json.JSONDecodeError) as err:
        raise CheckpointError(f"Bad config.json in '{folder.name}': {err}") from None
    device = pick_device(device)
    dtype = pick_dtype(dtype, device)
    attn = attn_implementation or choose_attn_implementation(device)
    try:
        tower_type = tower_type_for(config.vision_config, config.vision_model_name_or_path)
        with init_empty_weights(include_buffers=False):  # no random init of billions of weights we overwrite
            model = TinyLlavaVideo(config, attn_implementation=attn)
    except ValueError as err:
        raise CheckpointError(f"Cannot build the model of '{folder.name}': {err}") from None
    load_device = device if quantization is None else torch.device("cpu")
    state = published_to_module_keys(read_state_dict(folder, load_device), tower_type)
    allowed_missing = check_keys(model, state)
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=False, assign=True)
    _materialize(model, allowed_missing, dtype, load_device)
    model.language_model.tie_weights()
    if quantization:
        from .quantize import quantize_language_model

        quantize_language_model(model, quantization, device)
    model.to(device)
    model.eval().requires_grad_(False)
    if tokenizer:
        from .tokenizer import load_tokenizer

        model.tokenizer = load_tokenizer(folder, model_max_length=config.tokenizer_model_max_length,
                                         padding_side=config.tokenizer_padding_side)
    model.source = str(path_or_id)
    return model


def _materialize(model: TinyLlavaVideo, keys: list[str], dtype, device) -> None:
    """Give the allowed-missing parameters real storage: lm_head is re-tied later; unused tower weights are zeros."""
    for key in keys:
        if key.startswith("language_model.lm_head."):
            continue
        module_name, _, param_name = key.rpartition(".")
        module = model.get_submodule(module_name)
        old = getattr(module, param_name)
        module._parameters[param_name] = torch.nn.Parameter(torch.zeros(old.shape, dtype=dtype, device=device),
                                                            requires_grad=False)
    for name, param in model.named_parameters():
        if param.is_meta and not name.startswith("language_model.lm_head."):
            raise CheckpointError(f"Parameter '{name}' was not loaded.")


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
    eos = model.config.eos_token_id
    generation = {"bos_token_id": model.config.text_config.get("bos_token_id", eos), "eos_token_id": eos,
                  "use_cache": True}
    (folder / "generation_config.json").write_text(json.dumps(generation, indent=2))
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
    return path if path.is_dir() else _download(str(path_or_id))


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
