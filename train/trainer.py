"""One training stage on accelerate: the same loop on 1 CPU, 2 gloo processes or 8 GPUs with ZeRO-3 / FSDP.

Reads top to bottom: build the model -> freeze per the recipe -> data in a seeded order -> AdamW + cosine ->
accumulate to the global batch -> log -> checkpoint atomically -> resume where a killed run stopped -> save the
model (stage 1: the reference's split layout; stage 2: the published layout the loader reads).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from vidlmm.checkpoint import build_from_parts, load_model, save_model, save_split_layout

from vidlmm.video import FrameSampling

from .data import VideoConversationDataset, VisualTokenCount, collate, load_annotations, shared_feature_cache
from .recipe import PARTS, Recipe

log = logging.getLogger(__name__)


class TrainingStep(nn.Module):
    """Wraps the model so one forward = the whole step (vision -> connector -> LLM loss); the distributed wrapper
    then sees every trainable parameter used inside its own forward."""

    def __init__(self, model, feature_cache=None):
        super().__init__()
        self.model = model
        self.feature_cache = feature_cache  # only when the tower is frozen

    def forward(self, pixel_values: list, input_ids: list, labels: list, features: list | None = None,
                cache_keys: list | None = None):
        m = self.model
        visual = []
        for i, pixels in enumerate(pixel_values):
            feats = features[i] if features else None
            if feats is None:
                with torch.set_grad_enabled(m.vision_tower.training and torch.is_grad_enabled()):
                    feats = m.vision_tower(pixels.to(m.device))
                if self.feature_cache is not None and cache_keys and cache_keys[i]:
                    self.feature_cache.put(cache_keys[i], feats.cpu())
            # the whole output (batch 1): a fusing connector (LLaVA-Mini) also rewrites the prompt's embeddings
            visual.append(m.connector(feats.unsqueeze(0).to(device=m.device, dtype=m.dtype)))
        embeds, mask, lab = m.build_inputs(input_ids, visual, labels, padding_side="right")
        return m(embeds, mask, labels=lab).loss


def build_model(recipe: Recipe):
    """Stage 2 starts from a TinyLLaVA checkpoint (`init`); stage 1 composes pretrained LLM + tower parts."""
    if recipe.init:
        model = load_model(recipe.init, dtype="fp32", device="cpu")
    else:
        model = build_from_parts(recipe.llm, recipe.vision_tower, connector_type=recipe.connector_type,
                                 num_queries=recipe.num_queries, group=recipe.group,
                                 num_resampler_layers=recipe.num_resampler_layers, seed=recipe.seed,
                                 video_sampling=recipe.sampling, connector_options=recipe.connector_options)
    model.config.video_sampling = dict(recipe.sampling)
    return model


def apply_tuning(model, recipe: Recipe) -> dict[str, int]:
    """Freeze / unfreeze each part as the recipe says; returns trainable parameters per part."""
    for part in PARTS:
        trainable = recipe.tune[part] == "full"
        module = getattr(model, part)
        module.requires_grad_(trainable)
        module.train(trainable)
    if recipe.gradient_checkpointing and recipe.tune["language_model"] == "full":
        model.language_model.gradient_checkpointing_enable()
    return trainable_parameters(model)


def trainable_parameters(model) -> dict[str, int]:
    return {part: sum(p.numel() for p in dict.fromkeys(getattr(model, part).parameters()) if p.requires_grad)
            for part in PARTS}


def optimizer_groups(model, weight_decay: float) -> list[dict]:
    """AdamW groups as the reference: no decay for biases and LayerNorm weights."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.dim() < 2 or "norm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def epoch_order(num_samples: int, seed: int, epoch: int) -> list[int]:
    """The data order of one epoch: a permutation fixed by (seed, epoch), so a resumed run sees the same order."""
    gen = torch.Generator().manual_seed(seed * 1000 + epoch)
    return torch.randperm(num_samples, generator=gen).tolist()


# ---- checkpoints -----------------------------------------------------------------------------------------
def latest_checkpoint(output_dir: Path) -> Path | None:
    folders = [p for p in (output_dir / "checkpoints").glob("step-*") if (p / "train_state.json").is_file()]
    return max(folders, key=lambda p: int(p.name.split("-")[1]), default=None)


def save_checkpoint(accelerator, output_dir: Path, state: dict, keep: int = 2) -> None:
    """Write to a temporary folder, then rename: a run killed mid-save leaves the previous checkpoint intact."""
    root = output_dir / "checkpoints"
    final = root / f"step-{state['step']:07d}"
    tmp = root / f".tmp-step-{state['step']:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if accelerator.is_main_process:
        (tmp / "train_state.json").write_text(json.dumps(state))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        old = sorted(p for p in root.glob("step-*") if p != final)
        for folder in old[: max(0, len(old) - (keep - 1))]:
            shutil.rmtree(folder, ignore_errors=True)
    accelerator.wait_for_everyone()


# ---- the loop --------------------------------------------------------------------------------------------
def run(recipe: Recipe, *, max_steps: int | None = None, progress: bool = True) -> Path:
    """Train one stage; returns the folder of the saved model. Resumes from `output_dir/checkpoints` if present.

    max_steps stops early (for tests and smoke runs); the schedule still spans the whole stage.
    """
    from accelerate import Accelerator, PartialState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    output_dir = Path(recipe.output_dir)
    if (output_dir / "model" / "trainer_state.json").is_file():
        print(f"{recipe.name}: already trained, {output_dir / 'model'}")  # a finished stage is not redone
        return output_dir / "model"
    precision = recipe.mixed_precision if recipe.mixed_precision in ("bf16", "fp16") else "no"
    # the recipe's global batch holds whatever the number of processes: accumulation is derived from it
    recipe.num_processes = PartialState(cpu=not torch.cuda.is_available()).num_processes
    accum = recipe.gradient_accumulation_steps
    # the scheduler is stepped by hand once per optimizer step (accelerate would step it once per process)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=accum, log_with="tensorboard",
                              project_dir=str(output_dir), cpu=not torch.cuda.is_available(),
                              step_scheduler_with_optimizer=False)
    set_seed(recipe.seed)

    model = build_model(recipe)
    trainable = apply_tuning(model, recipe)
    samples, problems = load_annotations(recipe.annotations, recipe.video_roots)
    if not samples:
        raise ValueError("No usable training samples (check annotations and video_roots).")
    sampling = FrameSampling.from_dict(recipe.sampling)
    cache = None
    if recipe.feature_cache_mb and recipe.tune["vision_tower"] == "frozen" and recipe.dataloader_workers == 0:
        cache = shared_feature_cache(recipe.feature_cache_mb << 20)
        cache.bind(model.vision_tower, sampling)
    dataset = VideoConversationDataset(samples, tokenizer=model.tokenizer, image_processor=model.image_processor,
                                       template=recipe.template, sampling=sampling,
                                       visual_tokens_for=VisualTokenCount.of(model, sampling.max_frames_taken()),
                                       max_length=recipe.max_length,
                                       feature_cache=cache)
    total_steps = recipe.optimizer_steps(len(samples))
    optimizer = torch.optim.AdamW(optimizer_groups(model, recipe.weight_decay), lr=recipe.learning_rate)
    schedule = get_cosine_schedule_with_warmup if recipe.lr_scheduler == "cosine" else \
        get_linear_schedule_with_warmup
    scheduler = schedule(optimizer, recipe.warmup_steps(len(samples)), total_steps)
    step_module = TrainingStep(model, cache)
    step_module, optimizer, scheduler = accelerator.prepare(step_module, optimizer, scheduler)

    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "samples": 0, "skipped_videos": 0}
    last = latest_checkpoint(output_dir)
    if last is not None:
        accelerator.load_state(str(last))
        state = json.loads((last / "train_state.json").read_text())
        accelerator.print(f"resuming from {last.name} (step {state['step']} of {total_steps})")
    if accelerator.is_main_process:
        accelerator.init_trackers("train", config={k: v for k, v in recipe.to_dict().items()
                                                   if isinstance(v, (int, float, str, bool))})
        accelerator.print(f"{recipe.name}: {len(samples)} samples, {total_steps} steps, accumulation {accum}, "
                          f"trainable {trainable}" + (f", data problems {dict(problems)}" if problems else ""))

    stop_at = min(total_steps, max_steps) if max_steps else total_steps
    bar = tqdm(total=stop_at, initial=state["step"], disable=not (progress and accelerator.is_main_process),
               desc=recipe.name, dynamic_ncols=True)
    epochs = math.ceil(recipe.epochs)
    window_start, window_samples, window_tokens, losses = time.perf_counter(), 0, 0, []
    while state["step"] < stop_at and state["epoch"] < epochs:
        order = epoch_order(len(dataset), recipe.seed, state["epoch"])
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order),
                                             batch_size=recipe.per_device_batch_size, shuffle=False,
                                             collate_fn=collate, num_workers=recipe.dataloader_workers)
        loader = accelerator.prepare_data_loader(loader, device_placement=False)
        loader = accelerator.skip_first_batches(loader, state["batches_in_epoch"])
        for batch in loader:
            state["batches_in_epoch"] += 1
            state["skipped_videos"] += batch["skipped"]
            if not batch["input_ids"]:
                continue
            with accelerator.accumulate(step_module):
                loss = step_module(batch["pixel_values"], batch["input_ids"], batch["labels"], batch["features"],
                                   batch["cache_keys"])
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    accelerator.clip_grad_norm_(step_module.parameters(), 1.0)
                optimizer.step()
                if accelerator.sync_gradients:
                    scheduler.step()
                optimizer.zero_grad()
            losses.append(loss.detach().float().item())
            n = len(batch["input_ids"]) * accelerator.num_processes
            window_samples += n
            window_tokens += batch["visual_tokens"] * accelerator.num_processes
            state["samples"] += n
            if not accelerator.sync_gradients:
                continue
            state["step"] += 1
            bar.update(1)
            if state["step"] % recipe.log_every_steps == 0 or state["step"] == stop_at:
                elapsed = max(time.perf_counter() - window_start, 1e-9)
                logs = {"loss": sum(losses) / len(losses), "lr": scheduler.get_last_lr()[0],
                        "samples_per_s": window_samples / elapsed, "visual_tokens_per_s": window_tokens / elapsed}
                accelerator.log(logs, step=state["step"])
                bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{logs['lr']:.2e}",
                                sps=f"{logs['samples_per_s']:.1f}")
                window_start, window_samples, window_tokens, losses = time.perf_counter(), 0, 0, []
            if state["step"] % recipe.save_every_steps == 0 and state["step"] < total_steps:
                save_checkpoint(accelerator, output_dir, state)
            if os.environ.get("VIDLMM_TRAIN_DIE_AFTER_STEP") == str(state["step"]):
                os.kill(os.getpid(), 9)  # fault injection for the kill-and-resume test: a real SIGKILL
            if state["step"] >= stop_at:
                break
        else:
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
    bar.close()
    out = _save_model(accelerator, step_module, recipe, state, finished=state["step"] >= total_steps)
    accelerator.end_training()  # last: it also tears down the process group
    return out


def _save_model(accelerator, step_module, recipe: Recipe, state: dict, finished: bool) -> Path:
    model = accelerator.unwrap_model(step_module).model
    out = Path(recipe.output_dir) / ("model" if finished else f"model-step-{state['step']}")
    if accelerator.is_main_process:
        model.eval()
        if recipe.stage == "pretrain":
            save_split_layout(model, out)  # the reference's stage-1 output, read back by stage 2
        else:
            save_model(model, out)
        (out / "trainer_state.json").write_text(json.dumps({**state, "recipe": recipe.to_dict()}, indent=2))
    accelerator.wait_for_everyone()
    return out
