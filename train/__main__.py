"""python -m train plan|run RECIPE [key=value ...]   (and `python -m train.world` for the synthetic world)."""

from __future__ import annotations

import argparse
import json
import sys

from .recipe import load_recipe


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train")
    sub = parser.add_subparsers(dest="command", required=True)
    plan = sub.add_parser("plan", help="dry run: print the plan of a recipe without training")
    plan.add_argument("recipe")
    plan.add_argument("overrides", nargs="*", help="key=value (dotted keys for nested fields)")
    plan.add_argument("--json", action="store_true")
    run = sub.add_parser("run", help="train one stage (use under `accelerate launch` for several processes)")
    run.add_argument("recipe")
    run.add_argument("overrides", nargs="*")
    run.add_argument("--max-steps", type=int)
    run.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:
        recipe = load_recipe(args.recipe, args.overrides)
    except (OSError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.command == "plan":
        from .plan import format_plan, make_plan

        result = make_plan(recipe)
        print(json.dumps(result) if args.json else format_plan(result))
        return 0
    from .trainer import run as run_stage

    out = run_stage(recipe, max_steps=args.max_steps, progress=not args.no_progress)
    print(f"saved {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
