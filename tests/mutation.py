"""Mutation testing of the library's core modules with mutmut (slow: minutes to an hour per module; not in CI).

    .venv/bin/python tests/mutation.py                          # every core module with its own tests
    .venv/bin/python tests/mutation.py evaluate compressors     # some of them

Each module runs in its own scratch copy of the working tree (tracked and untracked files, not ignored ones) under
`runs/mutation/<module>`, so the checkout is never mutated. mutmut runs only the tests that cover the mutated
function, each mutant in a process forked from a fork server (torch is not fork-safe after it started threads).
The table printed at the end gives killed / survived / timeout / no tests per module; the survivors are listed
in `runs/mutation/<module>/survivors.txt` (`mutmut show NAME` in that folder prints one as a diff).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# module -> the test files that exercise it
CORE = {
    "video": ["tests/test_video.py"],
    "connectors": ["tests/test_connectors.py"],
    "compressors": ["tests/test_compressors.py"],
    "checkpoint": ["tests/test_checkpoint.py", "tests/test_published_layout.py"],
    "evaluate": ["tests/test_evaluate.py"],
    "analysis": ["tests/test_analysis.py"],
}


def scratch_copy(dest: Path) -> None:
    """The working tree as git sees it (tracked + untracked, ignored files left out) copied to `dest`."""
    files = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                           capture_output=True, check=True).stdout.decode().split("\0")
    for name in filter(None, files):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)


def configure(folder: Path, module: str) -> None:
    existing = [t for t in CORE[module] if (folder / t).is_file()]
    copied = sorted({p.split("/")[0] for p in ("assets/", "app/", "train/", "visualizations/", "benchmarks/")
                     if (folder / p).exists()} | {"app.py"})
    block = (f'\n[tool.mutmut]\nsource_paths = ["vidlmm"]\nonly_mutate = ["vidlmm/{module}.py"]\n'
             f"pytest_add_cli_args_test_selection = {json.dumps(existing)}\n"
             f"also_copy = {json.dumps(copied)}\nprocess_isolation = \"forkserver\"\n")
    with open(folder / "pyproject.toml", "a") as f:
        f.write(block)


def mutmut(folder: Path, *args: str, log=None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False",
           "MPLBACKEND": "Agg", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=folder, env=env, text=True,
                          stdout=log or subprocess.PIPE, stderr=subprocess.STDOUT)


def run_module(module: str, work: Path, jobs: int) -> dict:
    folder = work / module
    shutil.rmtree(folder, ignore_errors=True)  # a full run: mutmut's rerun of named mutants keeps stale coverage
    folder.mkdir(parents=True)
    scratch_copy(folder)
    configure(folder, module)
    with open(folder / "mutmut.log", "a") as log:
        mutmut(folder, "run", "--max-children", str(jobs), log=log)
    mutmut(folder, "export-cicd-stats")
    stats = json.loads((folder / "mutants" / "mutmut-cicd-stats.json").read_text())
    listing = mutmut(folder, "results").stdout
    survivors = [line.split(":")[0].strip() for line in listing.splitlines() if line.strip().endswith(": survived")]
    (folder / "survivors.txt").write_text("".join(f"{name}\n" for name in survivors))
    return stats


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python tests/mutation.py", description=__doc__.split("\n")[0])
    parser.add_argument("modules", nargs="*", metavar="MODULE", help=f"any of {', '.join(CORE)} (default: all)")
    parser.add_argument("--jobs", type=int, default=2, help="mutants tested at once")
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "mutation")
    args = parser.parse_args(argv)
    unknown = set(args.modules) - set(CORE)
    if unknown:
        parser.error(f"unknown module(s) {', '.join(sorted(unknown))}; pick from {', '.join(CORE)}")
    rows = []
    for module in args.modules or list(CORE):
        stats = run_module(module, args.work, args.jobs)
        rows.append((module, stats))
        print(f"{module}: {json.dumps(stats)}", flush=True)
    print("\n| module | mutants | killed | survived | timeout | no tests |\n|---|---:|---:|---:|---:|---:|")
    for module, s in rows:
        print(f"| {module} | {s['total']} | {s['killed']} | {s['survived']} | {s['timeout']} | {s['no_tests']} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
