"""What the three parts of stage 0 share: the budgets, the learning-rate schedule and optimizer, a small
training loop and the split of the world's training clips."""

from __future__ import annotations

import math
import sys

import numpy as np
import torch

from train import world as W


TEMPLATE = "qwen2_base"
MC_STYLES = ("mvbench", "videomme")
HOLDOUT_EVERY = 20  # every 20th training clip is held out of LM training for the validation loss
# "full" takes about 22 minutes on 2 CPU cores (the LM 16, the tower 6) when the LM's first draw reads its colours
# (each further draw 16 more); "smoke" a few seconds (tests).
BUDGETS = {
    "full": dict(
        vocab_size=1024,  # the world has ~110 distinct words: BPE stops at ~650 ids, one token per word
        # symbolic_per_clip: the LM also reads each training clip's video as symbols (8 draws per clip), rows that
        # stage 1's symbol_weight aligns the connector to (docs/embedded-models.md, "Stage 1 taught the symbols").
        # symbol_init composed + symbolic_extra colour: the symbols' rows are sums of a colour's, a shape's and a
        # cell's part, and every colour question is asked once more per draw, so that the LM finds an object by its
        # shape through the connector's tokens; 4,200 steps in length-sorted batches (docs/embedded-models.md,
        # "Finding an object by its shape"). draws, min_colour_read: the LM is drawn again (up to 4 seeds) until it
        # reads 92 % of colours from exact symbols, as one draw in three does (run.drawn_llm).
        llm=dict(hidden_size=128, layers=4, heads=4, kv_heads=2, intermediate=384, steps=4200, batch_size=32,
                 lr=2e-3, variants=3, init_std=0.1, symbolic_per_clip=8, bucket=True, symbol_init="composed",
                 symbolic_extra=["colour"], draws=4, min_colour_read=0.92),
        vision=dict(image_size=64, patch_size=8, hidden_size=96, layers=4, heads=4, intermediate=256, steps=1000,
                    batch_size=128, lr=1e-3, text_hidden_size=96, text_layers=2),
    ),
    "smoke": dict(
        vocab_size=320,
        threads=1,  # tiny matrices: one thread is as fast, and robust when other jobs share the cores
        llm=dict(hidden_size=32, layers=1, heads=2, kv_heads=1, intermediate=64, steps=30, batch_size=8, lr=5e-3,
                 variants=0, init_std=0.1, symbolic_per_clip=1),
        vision=dict(image_size=32, patch_size=8, hidden_size=32, layers=2, heads=2, intermediate=64, steps=12,
                    batch_size=16, lr=2e-3, text_hidden_size=32, text_layers=1),
    ),
}


# ---------------------------------------------------------------------------------------------- shared bits
def _cosine(step: int, total: int, warmup: int) -> float:
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))  # floor at 10% of the peak


def _optimizer(model: torch.nn.Module, lr: float, weight_decay: float, steps: int, warmup_ratio: float = 0.05):
    from ..trainer import optimizer_groups

    opt = torch.optim.AdamW(optimizer_groups(model, weight_decay), lr=lr, betas=(0.9, 0.98), eps=1e-8)
    warmup = max(1, int(steps * warmup_ratio))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: _cosine(s, steps, warmup))
    return opt, sched


def _fit(model: torch.nn.Module, next_loss, *, steps: int, lr: float, weight_decay: float, desc: str,
         progress: bool) -> list[float]:
    """The shared loop of both stage-0 models: `next_loss()` gives the next batch's loss; returns all losses."""
    opt, sched = _optimizer(model, lr, weight_decay, steps)
    losses = []
    bar = _progress(range(steps), desc, progress)
    for step in bar:
        loss = next_loss()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
        if progress and step % 20 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.3f}")
    return losses


def _progress(iterable, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc=desc, file=sys.stderr, dynamic_ncols=True, mininterval=1.0)


def split_clips(world_dir) -> tuple[list, list, list]:
    """(LM training clips, LM held-out training clips, eval clips)."""
    clips = W.load_clips(world_dir)
    train = clips["train"]
    held = [s for k, s in enumerate(train) if k % HOLDOUT_EVERY == HOLDOUT_EVERY - 1]
    fit = [s for k, s in enumerate(train) if k % HOLDOUT_EVERY != HOLDOUT_EVERY - 1]
    return fit, held, clips["eval"]


def _count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in dict.fromkeys(model.parameters()))
