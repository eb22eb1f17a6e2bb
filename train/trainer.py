"""One training stage on accelerate: the same loop on 1 CPU, 2 gloo processes or 8 GPUs with ZeRO-3 / FSDP.

Reads top to bottom: build the model -> freeze per the recipe -> data in a seeded order -> AdamW + cosine ->
accumulate to the global batch -> log -> checkpoint atomically -> resume where a killed run stopped -> save the
model (stage 1: the reference's split layout; stage 2: the published layout the loader reads).

Bad data never desyncs or stops a run: an unreadable sample is a zero-weight placeholder (see
`VideoConversationDataset`), so every process runs the same forward, backward and collectives; each optimizer
step's gradient is the mean over the samples actually read on all processes and micro-steps (one all-reduce of
the count per step); skipped samples are recorded in the checkpoint and stay dropped for the rest of the run.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vidlmm.checkpoint import build_from_parts, load_model, save_model, save_split_layout
from vidlmm.conversation import IGNORE_INDEX
from vidlmm.video import FrameSampling

from .data import VideoConversationDataset, VisualTokenCount, collate, load_annotations, shared_feature_cache
from .plan import lora_linears, lora_targets
from .recipe import LORA_DEFAULTS, PARTS, Recipe, check_tune

log = logging.getLogger(__name__)


class TrainingStep(nn.Module):
    """Wraps the model so one forward = the whole step (vision -> connector -> LLM loss per sample [B]); the
    distributed wrapper then sees every trainable parameter used inside its own forward."""

    def __init__(self, model, feature_cache=None, symbol_weight: float = 0.0, option_weight: float = 0.0,
                 patch_symbol_weight: float = 0.0):
        super().__init__()
        self.model = model
        self.feature_cache = feature_cache  # only when the tower is frozen
        self.symbol_weight, self.option_weight = symbol_weight, option_weight
        self.patch_symbol_weight = patch_symbol_weight

    def forward(self, pixel_values: list, input_ids: list, labels: list, features: list | None = None,
                cache_keys: list | None = None, symbols: list | None = None, allowed: list | None = None,
                answer_weights: torch.Tensor | None = None, patch_symbols: list | None = None):
        m = self.model
        visual, features_used = [], []
        for i, pixels in enumerate(pixel_values):
            feats = features[i] if features else None
            if feats is None:
                with torch.set_grad_enabled(m.vision_tower.training and torch.is_grad_enabled()):
                    feats = m.vision_tower(pixels.to(m.device))
                if self.feature_cache is not None and cache_keys and cache_keys[i]:
                    self.feature_cache.put(cache_keys[i], feats.cpu())
            # the whole output (batch 1): a fusing connector (LLaVA-Mini) also rewrites the prompt's embeddings
            visual.append(m.connect(feats))
            features_used.append(feats)
        embeds, mask, lab = m.build_inputs(input_ids, visual, labels, padding_side="right")
        logits = m(embeds, mask).logits
        loss = per_sample_loss(logits, lab)
        if answer_weights is not None:  # 0: a sample trained by its option loss alone
            loss = loss * answer_weights.to(loss.device)
        if self.option_weight:
            loss = loss + self.option_weight * option_loss(logits, lab, allowed or [None] * len(visual))
        if self.symbol_weight:
            loss = loss + self.symbol_weight * self.symbol_distance(visual, symbols or [None] * len(visual))
        if self.patch_symbol_weight:
            loss = loss + self.patch_symbol_weight * self.patch_symbol_distance(
                features_used, patch_symbols or [None] * len(visual))
        return loss

    def symbol_distance(self, visual: list, symbols: list) -> torch.Tensor:
        """[B]: each sample's `alignment_loss` against the LM's embeddings of its clip's symbols (0 without)."""
        from .stage0.symbols import alignment_loss

        def loss(out_i, ids, table):
            tokens = out_i.tokens[0]
            if tokens.shape[0] != len(ids):
                raise ValueError(f"symbol_weight needs one visual token per symbol ({len(ids)}); this connector "
                                 f"gives {tokens.shape[0]}.")
            return alignment_loss(tokens, table, ids)

        return self._per_sample(visual, symbols, loss)

    def patch_symbol_distance(self, features: list, patch_symbols: list) -> torch.Tensor:
        """[B]: each sample's `patch_alignment_loss`, every patch of its clip (``features`` [T, P, Dv]) as the
        connector would pass it on alone (`patch_tokens`) against the clip's ``patch_symbols`` (per frame, over
        the tower's whole patch grid), 0 without."""
        from .stage0.symbols import patch_alignment_loss, patch_symbols_of_tokens

        def loss(feats, ids, table):
            per_patch = patch_symbols_of_tokens(ids, self.model.token_layout(feats.shape[0]))
            tokens = self.model.connector.patch_tokens(feats.to(self.model.device))
            return patch_alignment_loss(tokens.reshape(len(per_patch), -1), table, per_patch)

        return self._per_sample(features, patch_symbols, loss)

    def _per_sample(self, inputs: list, targets: list, loss) -> torch.Tensor:
        """[B]: ``loss(input, target, symbol table)`` per sample against the LM's symbol rows, 0 without target."""
        from .stage0.symbols import symbol_rows

        table = symbol_rows(self.model).detach()
        return torch.stack([table.new_zeros(()) if ids is None else loss(x, ids, table)
                            for x, ids in zip(inputs, targets)])


def per_sample_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """logits [B, L, V], labels [B, L] -> [B]: each sample's mean next-token loss over its supervised tokens
    (0 for a sample with none), so a step can weight and count samples rather than tokens."""
    targets = labels[:, 1:]
    tokens = F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                             reduction="none")
    return tokens.sum(1) / (targets != IGNORE_INDEX).sum(1).clamp(min=1)


def option_loss(logits: torch.Tensor, labels: torch.Tensor, allowed: list) -> torch.Tensor:
    """[B]: each multiple-choice sample's mean over its answer tokens of -log P(a token that keeps the reply on
    some option), `allowed` holding those tokens per supervised label in order (`train.data.option_continuations`;
    None: 0). Where the options part, the LM is asked to keep its probability on them, whichever it believes;
    the usual loss then says which one."""
    out = []
    for row, (sets, lab) in enumerate(zip(allowed, labels)):
        if not sets:
            out.append(logits.new_zeros((), dtype=torch.float32))
            continue
        # the logits at position p predict the label at p + 1; splicing the video in adds no supervised label
        where = (lab[1:] != IGNORE_INDEX).nonzero().flatten()[:len(sets)]
        logp = F.log_softmax(logits[row, where].float(), dim=-1)
        out.append(torch.stack([-torch.logsumexp(logp[j, tokens], dim=0)
                                for j, tokens in enumerate(sets[:len(where)])]).mean())
    return torch.stack(out)


def quantized_base(recipe: Recipe) -> str | None:
    """"4bit" / "8bit" when the recipe trains LoRA adapters over a quantized language model (QLoRA), else None."""
    return recipe.lora.get("quantize_base") if recipe.tune["language_model"] == "lora" else None


def build_model(recipe: Recipe, quantize: bool = True):
    """Stage 2 starts from a TinyLLaVA checkpoint (`init`); stage 1 composes pretrained LLM + tower parts. The
    language model is quantized (bitsandbytes, on CPU too) for QLoRA unless `quantize` is False."""
    if recipe.init:
        model = load_model(recipe.init, dtype="fp32", device="cpu")
    else:
        model = build_from_parts(recipe.llm, recipe.vision_tower, connector_type=recipe.connector_type,
                                 num_queries=recipe.num_queries, group=recipe.group,
                                 num_resampler_layers=recipe.num_resampler_layers, seed=recipe.seed,
                                 video_sampling=recipe.sampling, connector_options=recipe.connector_options)
    model.config.video_sampling = dict(recipe.sampling)
    if quantize and quantized_base(recipe):
        from vidlmm.quantize import quantize_language_model

        quantize_language_model(model, quantized_base(recipe), model.device)
    return model


def apply_tuning(model, recipe: Recipe) -> dict[str, int]:
    """Freeze / unfreeze each part as the recipe says (`lora`: PEFT adapters on the language model, its own
    weights frozen); returns trainable parameters per part."""
    check_tune(recipe.tune)
    for part in PARTS:
        trainable = recipe.tune[part] == "full"
        module = getattr(model, part)
        module.requires_grad_(trainable)
        module.train(trainable)
    if recipe.tune["language_model"] == "lora":
        from peft import get_peft_model, prepare_model_for_kbit_training

        config = lora_config(recipe, list(recipe.lora["target_modules"]), task_type="CAUSAL_LM")
        if quantized_base(recipe):
            model.language_model = prepare_model_for_kbit_training(
                model.language_model, use_gradient_checkpointing=recipe.gradient_checkpointing)
        model.language_model = get_peft_model(model.language_model, config)  # only the adapters train
        model.language_model.train()
    if recipe.tune["connector"] == "lora":
        from peft import inject_adapter_in_model

        # adapters injected in place: the connector keeps its class (its budget, attention and output API)
        targets = sorted(lora_linears(model.connector, lora_targets(recipe, "connector")))
        inject_adapter_in_model(lora_config(recipe, targets), model.connector)
    if recipe.gradient_checkpointing and recipe.tune["language_model"] == "full":
        model.language_model.gradient_checkpointing_enable()
    return trainable_parameters(model)


def lora_config(recipe: Recipe, targets: list[str], **extra):
    from peft import LoraConfig

    lora = {**LORA_DEFAULTS, **recipe.lora}
    return LoraConfig(r=int(lora["r"]), lora_alpha=float(lora["alpha"]), lora_dropout=float(lora["dropout"]),
                      target_modules=targets, **extra)


def merge_connector_adapter(connector, adapter_dir: Path | None = None):
    """Fold LoRA adapters injected into the connector into its linears (in place), after saving them to
    `adapter_dir` (adapter_config.json + adapter_model.safetensors; `inject_adapter_in_model` with that config and
    `set_peft_model_state_dict` put them back on the base); nothing when it has none."""
    from peft import get_peft_model_state_dict
    from peft.tuners.lora import LoraLayer
    from safetensors.torch import save_file

    adapted = {name: m for name, m in connector.named_modules() if isinstance(m, LoraLayer)}
    if not adapted:
        return connector
    if adapter_dir is not None:
        adapter_dir.mkdir(parents=True, exist_ok=True)
        connector.peft_config["default"].save_pretrained(adapter_dir)
        save_file({k: v.contiguous() for k, v in get_peft_model_state_dict(connector).items()},
                  adapter_dir / "adapter_model.safetensors")
    for name, layer in adapted.items():
        layer.merge()
        parent, _, child = name.rpartition(".")
        setattr(connector.get_submodule(parent), child, layer.get_base_layer())
    del connector.peft_config
    return connector


def merge_adapter(model, adapter_dir: Path | None = None, full_base=None):
    """Fold a LoRA-wrapped language model back into plain weights (in place), after saving its adapter to
    `adapter_dir` (PEFT's layout: adapter_config.json + adapter_model.safetensors); nothing without LoRA.

    full_base: for a quantized base (QLoRA), a function building the model with the base in full precision; the
    saved adapter is merged into that (merged into 4-bit weights, it would be rounded to their grid) and the
    trained connector / tower weights are copied over; that model is returned."""
    from peft import PeftModel

    if not isinstance(model.language_model, PeftModel):
        return model
    if adapter_dir is not None:
        model.language_model.save_pretrained(adapter_dir)
    if full_base is None:
        model.language_model = model.language_model.merge_and_unload()
        return model
    full = full_base()
    for part in ("connector", "vision_tower"):
        getattr(full, part).load_state_dict(getattr(model, part).state_dict())
    full.language_model = PeftModel.from_pretrained(full.language_model, adapter_dir).merge_and_unload()
    return full.eval()


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
def _step_of(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(folder: Path) -> None:
    """Flush every file and folder under `folder` (folders too: a new file's name lives in its folder)."""
    for path in sorted(folder.rglob("*"), key=lambda p: len(p.parts), reverse=True):
        _fsync(path)
    _fsync(folder)


def checkpoint_damage(folder: Path) -> str | None:
    """Why a checkpoint cannot be resumed from (a few words), or None when it is whole: train_state.json parses
    and every file it lists is there at the size it was written."""
    try:
        saved = json.loads((folder / "train_state.json").read_text())
    except FileNotFoundError:
        return "train_state.json is missing"
    except (OSError, ValueError):
        return "train_state.json is damaged"
    for name, size in saved.get("checkpoint_files", {}).items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} of its {size} bytes"
    return None


def resume_point(output_dir: Path, warn: bool = True) -> tuple[Path, dict] | None:
    """The newest whole checkpoint and its training state; a damaged newer one is passed over with a one-line
    warning (it is deleted by the next save, which also keeps the previous one whole)."""
    damaged = []
    for folder in sorted((output_dir / "checkpoints").glob("step-*"), key=_step_of, reverse=True):
        why = checkpoint_damage(folder)
        if why is None:
            if warn and damaged:
                log.warning("checkpoint %s is damaged (%s); resuming from %s instead", *damaged[0], folder.name)
            state = json.loads((folder / "train_state.json").read_text())
            state.pop("checkpoint_files", None)
            return folder, state
        damaged.append((folder.name, why))
    if warn and damaged:
        log.warning("checkpoint %s is damaged (%s) and no earlier one is whole; starting over", *damaged[0])
    return None


def save_checkpoint(accelerator, output_dir: Path, state: dict, keep: int = 2) -> None:
    """Write to a temporary folder, fsync it, rename, fsync the parent: a run killed (or a machine that loses
    power) mid-save leaves the previous checkpoint whole. train_state.json lists every file with its size, so
    a damaged checkpoint is recognised at resume and the one before it (`keep` >= 2) is used instead."""
    root = output_dir / "checkpoints"
    final = root / f"step-{state['step']:07d}"
    tmp = root / f".tmp-step-{state['step']:07d}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    accelerator.wait_for_everyone()  # every process's random states are written
    if accelerator.is_main_process:
        files = {str(p.relative_to(tmp)): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
        (tmp / "train_state.json").write_text(json.dumps({**state, "checkpoint_files": files}))
        fsync_tree(tmp)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        _fsync(root)
        # a newer step is left from a run that resumed before it (it was damaged): never the one to resume from
        others = [p for p in root.glob("step-*") if p != final]
        older = sorted((p for p in others if _step_of(p) < state["step"]), key=_step_of)
        newer = [p for p in others if _step_of(p) > state["step"]]
        for folder in newer + older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(folder, ignore_errors=True)
    accelerator.wait_for_everyone()


class StepTally:
    """What the micro-steps of one optimizer step read on this process, summed over all processes by `reduce`
    (one all-reduce, every process, every step; the skip records are gathered only when there are any)."""

    def __init__(self):
        self.read, self.loss, self.visual_tokens, self.skipped = 0.0, 0.0, 0.0, []

    def add(self, losses: torch.Tensor, weights: torch.Tensor, batch: dict, where: dict) -> None:
        self.read += float(weights.sum())
        self.loss += float((losses.detach().float() * weights).sum())
        self.visual_tokens += batch["visual_tokens"]
        self.skipped += [{**skip, **where} for skip in batch["skipped"]]

    def reduce(self, accelerator) -> tuple[int, float, int, list[dict]]:
        """(samples read, their loss sum, visual tokens, skip records) over all processes."""
        from accelerate.utils import gather_object

        local = torch.tensor([self.read, self.loss, self.visual_tokens, len(self.skipped)], dtype=torch.float64,
                             device=accelerator.device)
        read, loss, tokens, skips = accelerator.reduce(local, reduction="sum").tolist()
        skipped = gather_object(self.skipped) if skips else []
        return int(read), loss, int(tokens), skipped


def optimizer_step(accelerator, module, optimizer, scheduler, rescale: float) -> None:
    """Rescale the accumulated gradients (to the mean over the samples actually read), clip, step. rescale 0:
    nothing was read, so the weights and AdamW's moments stay as they were; the schedule advances either way."""
    from accelerate.utils import DistributedType

    if rescale:
        # DeepSpeed owns its gradients: there a skipped sample counts as a zero loss in the full batch
        if accelerator.distributed_type != DistributedType.DEEPSPEED:
            for param in module.parameters():
                if param.grad is not None:
                    param.grad.mul_(rescale)
        accelerator.clip_grad_norm_(module.parameters(), 1.0)
        optimizer.step()
    scheduler.step()
    optimizer.zero_grad()


# ---- the engine -------------------------------------------------------------------------------------------
def make_accelerator(recipe: Recipe, output_dir: Path):
    """The run's Accelerator on whatever `accelerate launch` asked for: one process, data parallel, DeepSpeed
    ZeRO or FSDP2, on GPUs or on CPU processes with gloo. Sets `recipe.num_processes` (the accumulation that keeps
    the global batch is derived from it).

    On CPU, accelerate's own `cpu` flag turns DeepSpeed off, and it enables FSDP on accelerators only; so here
    DeepSpeed starts on its CPU accelerator (gloo) and, for FSDP, the CPU state accelerate set up (gloo, ranks)
    is switched to its FSDP path, which then shards with torch's `fully_shard` exactly as on GPUs."""
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    def wants(engine):
        return os.environ.get(f"ACCELERATE_USE_{engine}", "false").lower() == "true"

    cpu = not torch.cuda.is_available()
    options = {}
    if cpu and wants("DEEPSPEED"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        options["backend"] = "gloo"  # else accelerate finds no backend and every process thinks it is alone
    precision = recipe.mixed_precision if recipe.mixed_precision in ("bf16", "fp16") else "no"
    cpu_flag = cpu and not wants("DEEPSPEED")
    recipe.num_processes = PartialState(cpu=cpu_flag, **options).num_processes
    # the scheduler is stepped by hand once per optimizer step (accelerate would step it once per process)
    accelerator = Accelerator(mixed_precision=precision, gradient_accumulation_steps=recipe.gradient_accumulation_steps,
                              log_with="tensorboard", project_dir=str(output_dir), cpu=cpu_flag,
                              step_scheduler_with_optimizer=False)
    if accelerator.distributed_type == DistributedType.MULTI_CPU and wants("FSDP"):
        # as accelerate does on GPUs: both shared states say FSDP (AcceleratorState re-reads PartialState's)
        PartialState._shared_state["distributed_type"] = accelerator.state.distributed_type = DistributedType.FSDP
        accelerator.state.fsdp_plugin = FullyShardedDataParallelPlugin()  # from the launcher's FSDP_* variables
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        # the model is prepared before the data loader: DeepSpeed is told the micro-batch here
        accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = \
            recipe.per_device_batch_size
    return accelerator


@contextlib.contextmanager
def built_whole(accelerator):
    """Models built inside are whole on each process (ZeRO-3 partitions them at `prepare`): accelerate registers
    its ZeRO-3 config with transformers even when `zero3_init_flag` is false, and transformers then builds every
    model partitioned (DeepSpeed's zero.Init), which the checkpoint loader cannot fill."""
    from accelerate.utils import DistributedType

    plugin = accelerator.state.deepspeed_plugin if accelerator.distributed_type == DistributedType.DEEPSPEED else None
    if plugin is None or plugin.zero3_init_flag:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def sharded(accelerator) -> bool:
    """Whether each process holds only shards of the parameters (ZeRO-3 or FSDP), so the whole model exists
    only when gathered."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP)


# ---- the loop --------------------------------------------------------------------------------------------
def run(recipe: Recipe, *, max_steps: int | None = None, progress: bool = True) -> Path:
    """Train one stage; returns the folder of the saved model. Resumes from `output_dir/checkpoints` if present.

    max_steps stops early (for tests and smoke runs); the schedule still spans the whole stage.
    """
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm
    from transformers import get_cosine_schedule_with_warmup, get_linear_schedule_with_warmup

    output_dir = Path(recipe.output_dir)
    if (output_dir / "model" / "trainer_state.json").is_file():
        print(f"{recipe.name}: already trained, {output_dir / 'model'}")  # a finished stage is not redone
        return output_dir / "model"
    accelerator = make_accelerator(recipe, output_dir)
    if quantized_base(recipe) and sharded(accelerator):
        raise ValueError("A quantized base (QLoRA) trains on one process or data parallel, not under ZeRO-3 / FSDP.")
    accum = recipe.gradient_accumulation_steps
    set_seed(recipe.seed)

    with built_whole(accelerator):
        model = build_model(recipe)
        trainable = apply_tuning(model, recipe)
    dataset, problems, cache = _dataset(model, recipe)
    total_steps = recipe.optimizer_steps(len(dataset))
    optimizer = torch.optim.AdamW(optimizer_groups(model, recipe.weight_decay), lr=recipe.learning_rate)
    schedule = get_cosine_schedule_with_warmup if recipe.lr_scheduler == "cosine" else \
        get_linear_schedule_with_warmup
    scheduler = schedule(optimizer, recipe.warmup_steps(len(dataset)), total_steps)
    step_module = TrainingStep(model, cache, recipe.symbol_weight, recipe.option_weight, recipe.patch_symbol_weight)
    step_module, optimizer, scheduler = accelerator.prepare(step_module, optimizer, scheduler)

    # skipped: {"index", "id", "video", "why", "epoch", "batch", "step"} per sample dropped so far
    state = {"step": 0, "epoch": 0, "batches_in_epoch": 0, "samples": 0, "skipped": []}
    resumed = resume_point(output_dir, warn=accelerator.is_main_process)
    if resumed is not None:
        last, state = resumed
        accelerator.load_state(str(last))
        state.setdefault("skipped", [])
        accelerator.print(f"resuming from {last.name} (step {state['step']} of {total_steps}, "
                          f"{len(state['skipped'])} samples skipped so far)")
    dataset.excluded.update(skip["index"] for skip in state["skipped"])
    if accelerator.is_main_process:
        accelerator.init_trackers("train", config={k: v for k, v in recipe.to_dict().items()
                                                   if isinstance(v, (int, float, str, bool))})
        accelerator.print(f"{recipe.name}: {len(dataset)} samples, {total_steps} steps, accumulation {accum}, "
                          f"trainable {trainable}" + (f", data problems {dict(problems)}" if problems else ""))

    stop_at = min(total_steps, max_steps) if max_steps else total_steps
    bar = tqdm(total=stop_at, initial=state["step"], disable=not (progress and accelerator.is_main_process),
               desc=recipe.name, dynamic_ncols=True)
    epochs = math.ceil(recipe.epochs)
    window, tally = _LogWindow(), StepTally()
    while state["step"] < stop_at and state["epoch"] < epochs:
        order = epoch_order(len(dataset), recipe.seed, state["epoch"])
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, order),
                                             batch_size=recipe.per_device_batch_size, shuffle=False,
                                             collate_fn=collate, num_workers=recipe.dataloader_workers)
        loader = accelerator.prepare_data_loader(loader, device_placement=False)
        loader = accelerator.skip_first_batches(loader, state["batches_in_epoch"])
        for batch in loader:
            where = {"epoch": state["epoch"], "batch": state["batches_in_epoch"], "step": state["step"] + 1}
            state["batches_in_epoch"] += 1
            with accelerator.accumulate(step_module):
                losses = step_module(batch["pixel_values"], batch["input_ids"], batch["labels"], batch["features"],
                                     batch["cache_keys"], batch["symbols"], batch["allowed"],
                                     batch["answer_weights"], batch["patch_symbols"])
                weights = batch["weights"].to(losses.device)
                # a sum over the nominal global batch; rescaled below once the step's read count is known
                accelerator.backward((losses * weights).sum() / recipe.per_device_batch_size)
                tally.add(losses, weights, batch, where)
                if accelerator.sync_gradients:
                    read, loss_sum, tokens, skipped = tally.reduce(accelerator)
                    tally = StepTally()
                    optimizer_step(accelerator, step_module, optimizer, scheduler, recipe.global_batch_size / read
                                   if read else 0.0)
            if not accelerator.sync_gradients:
                continue
            for skip in skipped:
                if skip["index"] not in dataset.excluded:
                    dataset.excluded.add(skip["index"])
                    state["skipped"].append(skip)
            state["samples"] += read
            window.add(read, loss_sum, tokens)
            state["step"] += 1
            bar.update(1)
            if state["step"] % recipe.log_every_steps == 0 or state["step"] == stop_at:
                logs = {**window.close(), "lr": scheduler.get_last_lr()[0], "skipped_samples": len(state["skipped"])}
                accelerator.log(logs, step=state["step"])
                bar.set_postfix(loss=f"{logs['loss']:.3f}", lr=f"{logs['lr']:.2e}",
                                sps=f"{logs['samples_per_s']:.1f}")
            if state["step"] % recipe.save_every_steps == 0 and state["step"] < total_steps:
                save_checkpoint(accelerator, output_dir, state)
            if os.environ.get("VIDLMM_TRAIN_DIE_AFTER_STEP") == str(state["step"]):
                os.kill(os.getpid(), 9)  # fault injection for the kill-and-resume test: a real SIGKILL
            if state["step"] >= stop_at:
                break
        else:
            state["epoch"] += 1
            state["batches_in_epoch"] = 0
    dataset.close()
    bar.close()
    out = _save_model(accelerator, step_module, recipe, state, finished=state["step"] >= total_steps)
    accelerator.end_training()  # last: it also tears down the process group
    return out


def _dataset(model, recipe: Recipe):
    """The stage's training set: ``(dataset, data problems by kind, the shared feature cache or None)``. The
    cache holds the frozen tower's features across epochs (in the main process only: workers cannot share it)."""
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
                                       max_length=recipe.max_length, feature_cache=cache,
                                       decode_time_limit_s=recipe.decode_time_limit_s,
                                       options=recipe.option_weight > 0)
    return dataset, problems, cache


class _LogWindow:
    """The samples, loss and visual tokens since the last log line, for its mean loss and rates."""

    def __init__(self):
        self.start, self.read, self.loss, self.tokens = time.perf_counter(), 0, 0.0, 0

    def add(self, read: int, loss_sum: float, tokens: int):
        self.read, self.loss, self.tokens = self.read + read, self.loss + loss_sum, self.tokens + tokens

    def close(self) -> dict:
        """The window's log values; the next window starts now."""
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        logs = {"loss": self.loss / max(self.read, 1), "samples_per_s": self.read / elapsed,
                "visual_tokens_per_s": self.tokens / elapsed}
        self.__init__()
        return logs


def trained_model(accelerator, step_module, recipe: Recipe):
    """The trained model with whole weights on the main process (None on the others). Under ZeRO-3 or FSDP the
    weights are gathered (every process takes part) and loaded into the model as the recipe builds it."""
    if not sharded(accelerator):
        return accelerator.unwrap_model(step_module).model
    weights = accelerator.get_state_dict(step_module)
    if not accelerator.is_main_process:
        return None
    with built_whole(accelerator):
        model = build_model(recipe)
        apply_tuning(model, recipe)
    TrainingStep(model).load_state_dict(weights)
    return model


def _save_model(accelerator, step_module, recipe: Recipe, state: dict, finished: bool) -> Path:
    model = trained_model(accelerator, step_module, recipe)
    out = Path(recipe.output_dir) / ("model" if finished else f"model-step-{state['step']}")
    if accelerator.is_main_process:
        model.eval()
        # the end of the run: the model is saved with its adapters merged (the connector's first: a QLoRA merge
        # copies the plain connector into the full-precision base)
        merge_connector_adapter(model.connector, out / "connector_adapter")
        model = merge_adapter(model, out / "adapter",
                              full_base=(lambda: build_model(recipe, quantize=False)) if quantized_base(recipe) else None)
        if recipe.stage == "pretrain":
            save_split_layout(model, out)  # the reference's stage-1 output, read back by stage 2
        else:
            save_model(model, out)
        fsync_tree(out)  # trainer_state.json marks the stage done: the model is on disk before it
        (out / "trainer_state.json").write_text(json.dumps({**state, "recipe": recipe.to_dict()}, indent=2))
        fsync_tree(out)
    accelerator.wait_for_everyone()
    return out
