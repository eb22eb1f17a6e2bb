"""The two-stage TinyLLaVA-Video recipe as configuration, and the plan it implies.

A recipe is a YAML file under `train/configs/` (the paper's A100 stages, and the toy stages that train the
embedded models), overridable from the command line with `key=value` pairs (dotted keys for nested fields):

    python -m train plan train/configs/a100_stage1.yaml num_processes=4
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import yaml

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
PARTS = ("language_model", "vision_tower", "connector")
# LoRA on every linear of a Qwen2 decoder layer (the LLM's attention and MLP), PEFT's usual rank and scale;
# quantize_base: "4bit" (QLoRA: NF4 base weights) or "8bit" (LLM.int8) for the frozen base under the adapters;
# connector_target_modules: for `connector: lora`, names (or name endings) of its linears, null for all of them
LORA_DEFAULTS = {"r": 8, "alpha": 16, "dropout": 0.05,
                 "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
                 "quantize_base": None, "connector_target_modules": None}


@dataclass
class Recipe:
    """One training stage. `tune` says, per part, `full` (trained) or `frozen`; the language model may also be
    `lora` (PEFT adapters on `lora.target_modules`, the base frozen; merged into the saved model, the adapter
    saved beside it in `model/adapter`; `lora.quantize_base: 4bit` is QLoRA, the frozen base in NF4), and so may
    a trained connector (`init`), on its linears (`model/connector_adapter`).

    global_batch_size = per_device_batch_size x num_processes x gradient accumulation; the accumulation is
    derived, so the global batch holds whatever the number of processes.
    """

    name: str = "stage"
    stage: str = "pretrain"                    # pretrain (stage 1) | finetune (stage 2)
    template: str = "pretrain"                 # pretrain | qwen2_base
    tune: dict = field(default_factory=lambda: {"language_model": "frozen", "vision_tower": "frozen",
                                                "connector": "full"})
    lora: dict = field(default_factory=lambda: dict(LORA_DEFAULTS))
    learning_rate: float = 1e-4
    global_batch_size: int = 128
    per_device_batch_size: int = 8
    num_processes: int = 1
    epochs: float = 1.0
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    mixed_precision: str = "bf16"              # bf16 | fp16 | no
    gradient_checkpointing: bool = True
    max_length: int = 3072                     # counts the visual tokens
    sampling: dict = field(default_factory=lambda: {"mode": "fps", "max_frames": 0})  # 0: uncapped, as the reference
    connector_type: str = "groupresampler"
    num_queries: int = 512
    group: int | None = 16
    num_resampler_layers: int = 3
    # extra connector keys kept in config.json (e.g. token_budget for pool / tome / topk, prefusion_layers)
    connector_options: dict = field(default_factory=dict)
    # where the model comes from: `init` is a TinyLLaVA checkpoint (stage 2 starts from stage 1's output);
    # otherwise `llm` and `vision_tower` name pretrained folders or hub ids
    init: str | None = None
    llm: str | None = None
    vision_tower: str | None = None
    annotations: list = field(default_factory=list)
    video_roots: list = field(default_factory=list)
    expected_num_samples: int | None = None    # for planning when the data is not on this machine
    output_dir: str = "runs/stage"
    save_every_steps: int = 500
    log_every_steps: int = 1
    seed: int = 0
    dataloader_workers: int = 0
    # seconds a video may take to decode in its own child process, so a decoder that hangs or crashes costs
    # that sample, not the run (0: decode in the training process, unprotected)
    decode_time_limit_s: float = 60.0
    # frozen tower: keep its features per clip in memory (MiB; 0 = off) so a clip is decoded and encoded once
    feature_cache_mb: int = 0
    # > 0: each sample's loss adds this times `train.stage0.symbols.alignment_loss`, how well its visual tokens
    # name its clip's symbolic video among the LM's symbol embeddings (annotations with "symbols"; an LM with them)
    symbol_weight: float = 0.0
    # > 0: each multiple-choice sample's loss adds this times `train.trainer.option_loss`, how much of the LM's
    # probability at each answer token goes to tokens that continue one of the options (annotations with "options");
    # tried on the embedded group model: its unparsable replies 90 -> 94, and 77 with questions asked of other clips'
    # videos (build_embedded --mc-other-video), far from the goal (docs/embedded-models.md)
    option_weight: float = 0.0
    # > 0: each sample's loss adds this times `train.stage0.symbols.patch_alignment_loss`, how well each visual token
    # of a connector that passes the tower's patches on (pool, ToMe, top-k) names the symbols of the objects on the
    # patches it came from (annotations with "patch_symbols"; an LM with symbol embeddings)
    patch_symbol_weight: float = 0.0
    # shapes of the named backbones, for planning without downloading them
    llm_shape: dict | None = None
    vision_shape: dict | None = None

    @property
    def gradient_accumulation_steps(self) -> int:
        per_step = self.per_device_batch_size * self.num_processes
        if self.global_batch_size % per_step:
            raise ValueError(f"global batch {self.global_batch_size} is not a multiple of per-device batch "
                             f"{self.per_device_batch_size} x {self.num_processes} processes.")
        return self.global_batch_size // per_step

    def optimizer_steps(self, num_samples: int) -> int:
        return max(1, math.ceil(num_samples * self.epochs / self.global_batch_size))

    def warmup_steps(self, num_samples: int) -> int:
        return math.ceil(self.optimizer_steps(num_samples) * self.warmup_ratio)

    def to_dict(self) -> dict:
        return asdict(self)


_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _coerce(value: str):
    """YAML, except that numbers like 1e-4 are numbers (YAML 1.1 reads `1e-4` without a dot as a string)."""
    if _NUMBER.match(value.strip()):
        number = float(value)
        return int(number) if number.is_integer() and not re.search(r"[.eE]", value) else number
    return yaml.safe_load(value)


def check_tune(tune: dict) -> None:
    if set(tune) != set(PARTS) or not set(tune.values()) <= {"full", "frozen", "lora"}:
        raise ValueError(f"tune must give full|frozen for each of {', '.join(PARTS)} (lora: the language model "
                         "or the connector).")
    if tune["vision_tower"] == "lora":
        raise ValueError("tune: lora is for the language model and the connector (the recipe keeps the vision "
                         "tower as pretrained, as the paper does).")


def load_recipe(path: str | Path, overrides: list[str] | tuple = ()) -> Recipe:
    """Read a YAML recipe and apply `key=value` overrides (values parsed as YAML: 1e-4, true, [a, b])."""
    path = Path(path)
    if not path.exists() and (CONFIG_DIR / path).exists():
        path = CONFIG_DIR / path
    data = yaml.safe_load(path.read_text()) or {}
    known = {f.name for f in fields(Recipe)}
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"Override '{item}' is not key=value.")
        key, value = item.split("=", 1)
        target, *rest = key.split(".")
        if target not in known:
            raise ValueError(f"Unknown recipe field '{target}'.")
        if rest:
            data.setdefault(target, {})
            node = data[target]
            for part in rest[:-1]:
                node = node.setdefault(part, {})
            node[rest[-1]] = _coerce(value)
        else:
            data[target] = _coerce(value)
    unknown = set(data) - known
    if unknown:
        raise ValueError(f"Unknown recipe field(s) in {path.name}: {', '.join(sorted(unknown))}.")
    # the same for the YAML files
    for name in ("learning_rate", "warmup_ratio", "weight_decay", "epochs", "decode_time_limit_s", "symbol_weight",
                 "option_weight", "patch_symbol_weight"):
        if isinstance(data.get(name), str) and _NUMBER.match(data[name].strip()):
            data[name] = float(data[name])
    recipe = Recipe(**data)
    check_tune(recipe.tune)
    recipe.lora = {**LORA_DEFAULTS, **(recipe.lora or {})}
    if set(recipe.lora) != set(LORA_DEFAULTS):
        unknown = ", ".join(sorted(set(recipe.lora) - set(LORA_DEFAULTS)))
        raise ValueError(f"lora takes {', '.join(LORA_DEFAULTS)}, not {unknown}.")
    if recipe.lora["quantize_base"] not in (None, "4bit", "8bit"):
        raise ValueError("lora.quantize_base is 4bit (QLoRA), 8bit or null (the base in the training precision).")
    if recipe.tune["connector"] == "lora" and not recipe.init:
        raise ValueError("tune connector: lora adapts a trained connector (init: a checkpoint); a new connector "
                         "trains in full.")
    if not recipe.decode_time_limit_s >= 0:
        raise ValueError("decode_time_limit_s must be a number of seconds (0 turns the isolated decoder off).")
    recipe.gradient_accumulation_steps  # validates the batch arithmetic
    return recipe
