"""Does a trained model read the video? Two checks, for when accuracy sits at chance.

    python -m train.diagnose gap  --model M --annotations qa.json --video-root DIR [--limit 48]
    python -m train.diagnose open --model M --data eval_mc.json [--video-root DIR] [--limit 200]

`gap`: the mean answer loss of training-format samples with their own video, with another sample's video and with
all-zero tower features. A model that uses the video has a clearly lower loss with its own; equal losses mean the
LLM answers from the text alone. It also prints how much of the connector's output changes from video to video
(the across-video spread of the tokens relative to their norm).
`open`: the multiple-choice questions asked open-ended (no options); an answer counts as right when it contains
the correct option's text. This separates "cannot read the video" from "cannot map an answer to a letter".
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Iterable


def video_gap(model, samples: list[dict], video_root: Path, template: str, shift: int = 7) -> dict:
    """Mean answer loss with the right video, a wrong one (the sample `shift` places on) and zero features."""
    import torch

    from vidlmm.conversation import make_training_example
    from vidlmm.pipeline import default_sampling
    from vidlmm.video import read_video

    sampling = default_sampling(model)
    with torch.no_grad():
        feats = [model.encode_frames(model.image_processor(read_video(video_root / s["video"], sampling).frames))
                 for s in samples]

        def mean_loss(features_of) -> float:
            total = 0.0
            for i, sample in enumerate(samples):
                out = model.connect(features_of(i))
                ex = make_training_example(template, sample["conversations"], model.tokenizer, max_length=3072,
                                           num_visual_tokens=out.tokens.shape[1])
                embeds, mask, labels = model.build_inputs([ex.input_ids], [out], [ex.labels], padding_side="right")
                total += model(embeds, mask, labels=labels).loss.item()
            return total / len(samples)

        tokens = torch.stack([model.connect(f).tokens[0] for f in feats])  # [N, Q, D]
        norm = tokens.norm(dim=-1).mean().item()
        return {"samples": len(samples), "right_video": mean_loss(lambda i: feats[i]),
                "wrong_video": mean_loss(lambda i: feats[(i + shift) % len(feats)]),
                "zero_features": mean_loss(lambda i: torch.zeros_like(feats[i])),
                "token_norm": norm, "video_dependent_share": tokens.std(0).norm(dim=-1).mean().item() / norm}


def mc_as_conversations(items: list[dict]) -> list[dict]:
    """MC items as one-turn samples answered with the correct option's text (so `gap` runs on held-out clips)."""
    return [{"video": it["video"], "conversations": [
        {"from": "human", "value": f"<image>\n{it['question']}"},
        {"from": "gpt", "value": _gold(it) + "."}]} for it in items]


def _gold(item: dict) -> str:
    return next(o.split(". ", 1)[1] for o in item["options"] if o.startswith(item["answer"] + ". "))


def open_ended(lmm, items: list[dict], video_root: Path) -> dict:
    """Accuracy per question type when the MC questions are asked without their options."""
    from vidlmm.pipeline import GenerationSettings

    right, total = Counter(), Counter()
    for item in items:
        gold = _gold(item)
        reply = lmm.ask(str(video_root / item["video"]), item["question"],
                        generation=GenerationSettings(max_new_tokens=16)).text
        kind = item.get("type", item.get("category", "all"))
        right[kind] += gold.lower().rstrip(".") in reply.lower()
        total[kind] += 1
    return {"accuracy": sum(right.values()) / max(1, sum(total.values())),
            "per_type": {k: f"{right[k]}/{total[k]}" for k in sorted(total)}}


def main(argv: Iterable[str] | None = None) -> int:
    from vidlmm.cli import run_user_command

    parser = argparse.ArgumentParser(prog="python -m train.diagnose", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    gap = sub.add_parser("gap", help="answer loss with the right video, a wrong one and none")
    gap.add_argument("--annotations", required=True,
                     help="annotations (reference format), or an MC JSON (answered with the correct option's text)")
    gap.add_argument("--template", default=None, help="default: the model's conv_version")
    opened = sub.add_parser("open", help="the MC questions asked open-ended")
    opened.add_argument("--data", required=True, help="multiple-choice JSON (options 'A. text')")
    for p in (gap, opened):
        p.add_argument("--model", required=True)
        p.add_argument("--video-root", help="default: the JSON's folder")
        p.add_argument("--limit", type=int, default=48 if p is gap else 200)
    args = parser.parse_args(list(argv) if argv is not None else None)

    def command() -> int:
        from vidlmm.checkpoint import load_model
        from vidlmm.pipeline import VideoLMM

        data = Path(args.annotations if args.command == "gap" else args.data)
        items = json.loads(data.read_text())[: args.limit]
        root = Path(args.video_root) if args.video_root else data.parent
        model = load_model(args.model, dtype="fp32", device="cpu").eval()
        if args.command == "gap":
            items = mc_as_conversations(items) if items and "options" in items[0] else items
            result = video_gap(model, items, root, args.template or model.config.conv_version)
        else:
            result = open_ended(VideoLMM(model), items, root)
        print(json.dumps(result, indent=1))
        return 0

    return run_user_command(command)


if __name__ == "__main__":
    sys.exit(main())
