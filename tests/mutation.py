"""Mutation testing of the library's core modules with mutmut (slow: minutes to an hour per module; not in CI).

    .venv/bin/python tests/mutation.py                          # every core module, every mutant
    .venv/bin/python tests/mutation.py evaluate compressors     # some of them
    .venv/bin/python tests/mutation.py --sample 60              # a seeded sample of 60 mutants per module
    .venv/bin/python tests/mutation.py --sample 60 --tests-from 7f48682   # the same sample against older tests

Each module runs in its own scratch copy of the working tree (tracked and untracked files, not ignored ones) under
`runs/mutation/<module>` (`<module>@<commit>` with `--tests-from`, whose `tests/` folder is that commit's), so the
checkout is never mutated. mutmut runs only the tests that cover the mutated function, each mutant in a process
forked from a fork server (torch is not fork-safe after it started threads). A sample is drawn from the module's
mutants by name with a fixed seed, so two runs over the same source test the same mutants. The table printed at
the end gives killed / survived / timeout / no tests per module; the survivors are listed in
`<folder>/survivors.txt` (`mutmut show NAME` in that folder prints one as a diff).
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import shutil
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# module -> the test files that exercise it
CORE = {
    "video": ["tests/test_video.py"],
    "decoders": ["tests/test_video.py"],
    "connectors": ["tests/test_connectors.py"],
    "compressors": ["tests/test_compressors.py"],
    "checkpoint": ["tests/test_checkpoint.py", "tests/test_published_layout.py"],
    "evaluate": ["tests/test_evaluate.py"],
    "eval_cli": ["tests/test_evaluate.py", "tests/test_benchmark_data.py"],
    "analysis": ["tests/test_analysis.py"],
}
NO_MATCH = "no_mutant_is_named_this"  # `mutmut run` with it generates the mutants and collects coverage, tests none


def scratch_copy(dest: Path, tests_from: str | None) -> None:
    """The working tree as git sees it (tracked + untracked, ignored files left out) copied to `dest`; with
    `tests_from`, `tests/` is replaced by that commit's."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file() and not (tests_from and name.startswith("tests/")):
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    if tests_from:
        archive = subprocess.run(["git", "archive", tests_from, "tests"], cwd=ROOT, capture_output=True,
                                 check=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(dest, filter="data")


def configure(folder: Path, module: str) -> None:
    existing = [t for t in CORE[module] if (folder / t).is_file()]
    copied = sorted({p.split("/")[0] for p in ("assets/", "app/", "train/", "visualizations/", "benchmarks/")
                     if (folder / p).exists()} | {"app.py"})
    block = (f'\n[tool.mutmut]\nsource_paths = ["vidlmm"]\n'
             f'only_mutate = ["vidlmm/{module}.py", "vidlmm/{module}/*.py"]\n'
             f"pytest_add_cli_args_test_selection = {json.dumps(existing)}\n"
             f"also_copy = {json.dumps(copied)}\nprocess_isolation = \"forkserver\"\n")
    with open(folder / "pyproject.toml", "a") as f:
        f.write(block)


def mutmut(folder: Path, *args: str, log=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=folder, env=env, text=True,
                          stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT)


def outcomes(folder: Path, module: str) -> dict[str, int | None]:
    """Every mutant of the module (a file, or a package's files) -> mutmut's exit code for it (None: not tested)."""
    root = folder / "mutants" / "vidlmm"
    codes = {}
    for meta in sorted([*root.glob(f"{module}.py.meta"), *root.glob(f"{module}/*.py.meta")]):
        codes.update(json.loads(meta.read_text())["exit_code_by_key"])
    return codes


def run_module(module: str, work: Path, jobs: int, sample: int, seed: int, tests_from: str | None) -> dict:
    from mutmut.stats import status_by_exit_code  # mutmut is a dev tool: imported only when used

    folder = work / (f"{module}@{tests_from}" if tests_from else module)
    shutil.rmtree(folder, ignore_errors=True)  # a fresh run: mutmut's rerun of named mutants keeps stale coverage
    folder.mkdir(parents=True)
    scratch_copy(folder, tests_from)
    configure(folder, module)
    with open(folder / "mutmut.log", "a") as log:
        if not sample:
            mutmut(folder, "run", "--max-children", str(jobs), log=log)
            chosen = tested = list(outcomes(folder, module))
        else:
            mutmut(folder, "run", NO_MATCH, log=log)  # mutants and coverage only
            names = sorted(outcomes(folder, module))
            chosen = sorted(random.Random(seed).sample(names, min(sample, len(names))))
            covered = json.loads((folder / "mutants" / "mutmut-stats.json").read_text())
            covered = {k for k, tests in covered["tests_by_mangled_function_name"].items() if tests}
            # mutmut refuses a named mutant whose function no test runs; those are counted as "no tests" below
            tested = [n for n in chosen if n.partition("__mutmut_")[0] in covered]
            if tested:
                mutmut(folder, "run", "--max-children", str(jobs), *tested, log=log)
    codes = outcomes(folder, module)
    if sample and any(codes[n] is None for n in tested):
        raise SystemExit(f"{module}: mutmut tested none of the sample; see {folder / 'mutmut.log'}")
    status = {name: status_by_exit_code[codes[name]] for name in chosen}
    if sample:
        status = {n: ("no tests" if s == "not checked" else s) for n, s in status.items()}
    (folder / "survivors.txt").write_text("".join(f"{n}\n" for n, s in status.items() if s == "survived"))
    counts = Counter(status.values())
    return {"mutants": len(codes), "tested": len(chosen), **{k: counts.get(k, 0) for k in
                                                              ("killed", "survived", "timeout", "no tests")},
            "other": sum(v for k, v in counts.items() if k not in ("killed", "survived", "timeout", "no tests"))}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/mutation.py", description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"any of {', '.join(CORE)} (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--sample", type=int, default=0, help="test this many mutants per module (default: all)")
    parser.add_argument("--seed", type=int, default=0, help="the sample's seed")
    parser.add_argument("--tests-from", metavar="COMMIT", help="run the tests/ folder of this commit instead")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "mutation")
    args = parser.parse_args(argv)
    unknown = set(args.modules) - set(CORE)
    if unknown:
        parser.error(f"unknown module(s) {', '.join(sorted(unknown))}; pick from {', '.join(CORE)}")
    rows = []
    for module in args.modules or list(CORE):
        stats = run_module(module, args.work, args.jobs, args.sample, args.seed, args.tests_from)
        rows.append((module, stats))
        print(f"{module}: {json.dumps(stats)}", flush=True)
    print("\n| module | mutants | tested | killed | survived | timeout | no tests | other |\n"
          "|---|---:|---:|---:|---:|---:|---:|---:|")
    for module, s in rows:
        print(f"| {module} | {s['mutants']} | {s['tested']} | {s['killed']} | {s['survived']} | {s['timeout']} "
              f"| {s['no tests']} | {s['other']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
