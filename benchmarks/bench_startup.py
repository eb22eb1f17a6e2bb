"""App start-up: seconds from `python app.py --port P` until the port answers HTTP 200 (median of several runs).

    python benchmarks/bench_startup.py [--runs 3] [--model DIR | --tiny] [--timeout 120] [--json OUT] [--md OUT]

Each run starts a fresh ``python app.py --port P`` (HF_HUB_OFFLINE=1, GRADIO_ANALYTICS_ENABLED=False) on a free
port, polls ``http://127.0.0.1:P/`` every 0.1 s until it answers 200, and notes when the app logs that its
background preload of the default model finished (``model 'default' loaded``; waited for up to ``--model-wait``
seconds after the port answers). Then the app is stopped (SIGINT, then SIGKILL). Model: ``--model``, else the first
of assets/models/group and runs/big/models/group that exists (the embedded default), else the app's own default;
``--tiny`` writes a tiny checkpoint and passes it. Goal: ready to serve in at most 15 s on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

from common import DEFAULT_MODELS, ROOT, Report, free_port, machine, write_tiny_model

GOAL_S = 15.0


def answers_200(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def one_run(model: str | None, timeout: float, model_wait: float, log_path: str) -> dict:
    port = free_port()
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "app.py", "--port", str(port)] + (["--model", model] if model else [])
    loaded: dict = {}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def read_output():
        with open(log_path, "a") as log:
            for line in proc.stdout:
                log.write(line)
                if "model 'default' loaded" in line and "at" not in loaded:
                    loaded["at"] = time.perf_counter() - start

    reader = threading.Thread(target=read_output, daemon=True)
    reader.start()
    url = f"http://127.0.0.1:{port}/"
    ready = None
    try:
        while time.perf_counter() - start < timeout:
            if proc.poll() is not None:
                break
            if answers_200(url):
                ready = time.perf_counter() - start
                break
            time.sleep(0.1)
        if ready is not None:
            deadline = time.perf_counter() + model_wait
            while "at" not in loaded and time.perf_counter() < deadline and proc.poll() is None:
                time.sleep(0.1)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        reader.join(timeout=5)
    return {"port": port, "ready_s": ready, "model_loaded_s": loaded.get("at"), "exit_code": proc.returncode}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--model", help="checkpoint folder passed as --model (default: the embedded model)")
    parser.add_argument("--tiny", action="store_true", help="start the app on a tiny random checkpoint")
    parser.add_argument("--timeout", type=float, default=120.0, help="give up on a run after this many seconds")
    parser.add_argument("--model-wait", type=float, default=30.0,
                        help="after the port answers, wait this long for the preload to finish")
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--md", metavar="OUT")
    args = parser.parse_args(argv)

    report = Report()
    with tempfile.TemporaryDirectory(prefix="bench_startup_") as tmp:
        model, why = args.model, "given with --model"
        if args.tiny:
            model, why = write_tiny_model(tmp), "tiny random checkpoint (--tiny)"
        elif not model:
            found = [rel for rel in DEFAULT_MODELS if os.path.isfile(os.path.join(ROOT, rel, "config.json"))]
            model, why = (found[0], f"embedded model {found[0]}") if found else \
                (None, "the app's own default (no embedded model built)")
        report(f"python app.py --port P{' --model ' + os.path.basename(model.rstrip('/')) if model else ''} "
               f"({why}); {os.cpu_count()} CPUs; {args.runs} runs")
        log_path = os.path.join(tmp, "app.log")
        runs = []
        for i in range(args.runs):
            r = one_run(model, args.timeout, args.model_wait, log_path)
            runs.append(r)
            print(f"  run {i + 1}: ready {r['ready_s'] or float('nan'):.2f} s, "
                  f"model loaded {r['model_loaded_s'] or float('nan'):.2f} s", flush=True)
        if any(r["ready_s"] is None for r in runs):
            with open(log_path) as fh:
                print("app output (last lines):\n" + "".join(fh.readlines()[-20:]), file=sys.stderr)

    def cell(v):
        return f"{v:.2f}" if v is not None else "-"

    report()
    report.table(["run", "port answers HTTP 200 (s)", "default model loaded (s)"],
                 [[i + 1, cell(r["ready_s"]), cell(r["model_loaded_s"])] for i, r in enumerate(runs)])
    ready = [r["ready_s"] for r in runs if r["ready_s"] is not None]
    loaded = [r["model_loaded_s"] for r in runs if r["model_loaded_s"] is not None]
    median = statistics.median(ready) if len(ready) == len(runs) else None
    report()
    if median is None:
        report(f"the app did not answer in {args.timeout:g} s in {len(runs) - len(ready)} of {len(runs)} runs")
    else:
        verdict = "met" if median <= GOAL_S else "NOT met"
        report(f"median time to serve: {median:.2f} s (goal <= {GOAL_S:g} s: {verdict})")
    if loaded:
        report(f"median time until the default model is loaded (background preload): {statistics.median(loaded):.2f} s")
    report.save(args.md, args.json, {"model": model, "model_choice": why, "runs": runs, "median_ready_s": median,
                                     "median_model_loaded_s": statistics.median(loaded) if loaded else None,
                                     "goal_s": GOAL_S, "goal_met": median is not None and median <= GOAL_S,
                                     "machine": machine()})
    return 0 if median is not None else 1


if __name__ == "__main__":
    sys.exit(main())
