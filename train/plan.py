"""The dry run: what a recipe will do (steps, accumulation, tokens, trainable parameters per part), no training."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .recipe import PARTS, Recipe


def _meta_model(recipe: Recipe):
    """The model's structure on the meta device: from `init`'s config, or from the recipe's backbone shapes."""
    from vidlmm.config import TinyLlavaConfig
    from vidlmm.model import TinyLlavaVideo

    connector = dict(connector_type=recipe.connector_type, num_queries=recipe.num_queries, group=recipe.group,
                     num_resampler_layers=recipe.num_resampler_layers)
    if recipe.init and (Path(recipe.init) / "config.json").is_file():
        saved = TinyLlavaConfig.from_json_file(Path(recipe.init) / "config.json")
        config = TinyLlavaConfig.compose(saved.text_config, saved.vision_config, **connector)
    elif recipe.llm_shape and recipe.vision_shape:
        config = TinyLlavaConfig.compose(recipe.llm_shape, recipe.vision_shape, **connector)
    else:
        from transformers import AutoConfig

        text = AutoConfig.from_pretrained(recipe.llm).to_dict()
        vision = AutoConfig.from_pretrained(recipe.vision_tower)
        config = TinyLlavaConfig.compose(text, getattr(vision, "vision_config", vision).to_dict(), **connector)
    with torch.device("meta"):
        return TinyLlavaVideo(config)


def lora_targets(recipe: Recipe, part: str) -> list[str] | None:
    """The names (or name endings) of the linears LoRA adapts in `part`; None: every linear."""
    return recipe.lora["target_modules"] if part == "language_model" else recipe.lora["connector_target_modules"]


def lora_linears(module, targets: list[str] | None) -> dict:
    """{name: nn.Linear} of `module` that LoRA adapts: a name equal to or ending in `.target` (PEFT's matching),
    or every linear for targets None."""
    return {name: m for name, m in module.named_modules() if isinstance(m, torch.nn.Linear) and
            (targets is None or any(name == t or name.endswith("." + t) for t in targets))}


def count_samples(recipe: Recipe) -> tuple[int, str]:
    files = [Path(f) for f in recipe.annotations]
    if files and all(f.is_file() for f in files):
        return sum(len(json.loads(f.read_text())) for f in files), "annotation files"
    if recipe.expected_num_samples:
        return recipe.expected_num_samples, "expected_num_samples (data not on this machine)"
    raise ValueError("The annotation files are not here and the recipe gives no expected_num_samples.")


def make_plan(recipe: Recipe) -> dict:
    model = _meta_model(recipe)
    per_part = {}
    for part in PARTS:
        module = getattr(model, part)
        params = sum(p.numel() for p in dict.fromkeys(module.parameters()))
        trainable = params if recipe.tune[part] == "full" else 0
        if recipe.tune[part] == "lora":  # A [r, in] and B [out, r] per targeted linear
            trainable = sum(int(recipe.lora["r"]) * (m.in_features + m.out_features)
                            for m in lora_linears(module, lora_targets(recipe, part)).values())
        per_part[part] = {"parameters": params, "trainable": trainable}
    samples, source = count_samples(recipe)
    steps = recipe.optimizer_steps(samples)
    frames = recipe.sampling.get("num_frames", 16) if recipe.sampling.get("mode") == "uniform" else 16
    visual = model.connector.num_output_tokens(frames, model.vision_tower.tokens_per_frame)
    return {
        "name": recipe.name, "stage": recipe.stage, "template": recipe.template, "samples": samples,
        "samples_from": source, "epochs": recipe.epochs, "global_batch_size": recipe.global_batch_size,
        "per_device_batch_size": recipe.per_device_batch_size, "num_processes": recipe.num_processes,
        "gradient_accumulation_steps": recipe.gradient_accumulation_steps, "optimizer_steps": steps,
        "warmup_steps": recipe.warmup_steps(samples), "learning_rate": recipe.learning_rate,
        "lr_scheduler": recipe.lr_scheduler, "warmup_ratio": recipe.warmup_ratio,
        "weight_decay": recipe.weight_decay, "mixed_precision": recipe.mixed_precision,
        "gradient_checkpointing": recipe.gradient_checkpointing, "sampling": recipe.sampling,
        "connector_type": recipe.connector_type, "num_queries": recipe.num_queries, "group": recipe.group,
        "visual_tokens_per_sample": visual, "max_length": recipe.max_length,
        "visual_tokens_total": visual * samples * recipe.epochs,
        "parts": per_part, "trainable_parameters": sum(p["trainable"] for p in per_part.values()),
    }


def format_plan(plan: dict) -> str:
    lines = [f"plan for {plan['name']} ({plan['stage']}, template {plan['template']})"]
    for key in ("samples", "samples_from", "epochs", "global_batch_size", "per_device_batch_size", "num_processes",
                "gradient_accumulation_steps", "optimizer_steps", "warmup_steps", "learning_rate", "lr_scheduler",
                "warmup_ratio", "weight_decay", "mixed_precision", "gradient_checkpointing", "sampling",
                "connector_type", "num_queries", "group", "visual_tokens_per_sample", "visual_tokens_total",
                "max_length"):
        lines.append(f"  {key:<28} {plan[key]}")
    lines.append("  parameters (trainable / total):")
    for part, p in plan["parts"].items():
        lines.append(f"    {part:<26} {p['trainable']:>15,} / {p['parameters']:,}")
    lines.append(f"  {'trainable_parameters':<28} {plan['trainable_parameters']:,}")
    return "\n".join(lines)
