"""Load test: `python app.py` started as a Hugging Face Space starts it, and N concurrent `gradio_client` sessions
sending a mix of normal and hostile requests for a bounded time.

    python benchmarks/bench_load.py [--sessions 8] [--seconds 120] [--json OUT] [--md OUT]

The server: `python app.py` with SPACE_ID set (it listens on all interfaces, custom and hub models off), on the
embedded default models, with its logs captured. Each session loops over a shuffled mix:
- normal: ask, preview, attention, a small zeroing curve, compare (the embedded example videos);
- decode bombs: a one-frame 3840x2160 clip at 128 frames (served: memory follows the model) and a one-frame
  7680x4320 clip (refused: over the pixel limit);
- oversized requests: a 200,000-character question, 5000 fractions, 50 models, 10^6 new tokens, 10^4 frames, a
  1000-turn history, a 6 MiB upload over a 5 MiB limit;
- bad files: text renamed .mp4, a truncated mp4, an empty file, audio only;
- cancelled jobs: a long answer or zeroing curve cancelled after 0.2-1 s.
Every outcome is classified: served (an answer), refused (one clean sentence), cancelled, failed (anything else:
an unexpected error, a traceback shown to the client, a timeout). It prints requests served / refused / failed,
p50 / p95 latency, the server's peak RSS (VmHWM from /proc) and how long each cancelled job took to free the model
slot (from the server's log), and checks the goals: no crash, no traceback to a client, server RSS under 2 GiB,
every cancelled job's slot freed within 1 s.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from common import ROOT, Report, free_port

EXAMPLES = os.path.join(ROOT, "assets", "examples")
QUESTION = "What happens in the video?"
GOAL_RSS_MB = 2048
GOAL_FREE_S = 1.0


# ---- inputs ------------------------------------------------------------------------------------------------------
def make_files(tmp: str) -> dict[str, str]:
    """The hostile files, written once (a few KB each, but the 6 MiB upload)."""
    from bench_decode import make_one_frame_clip

    sys.path.insert(0, ROOT)
    from tests.videos import write_audio_only

    files = {"4k": make_one_frame_clip(os.path.join(tmp, "one_frame_4k.mp4"), 3840, 2160),
             "8k": make_one_frame_clip(os.path.join(tmp, "one_frame_8k.mp4"), 7680, 4320)}
    files["text"] = os.path.join(tmp, "notes.mp4")
    with open(files["text"], "w") as fh:
        fh.write("This is a text file, not a video.\n" * 40)
    example = os.path.join(EXAMPLES, "world_eval_00000.mp4")
    with open(example, "rb") as fh:
        data = fh.read()
    files["truncated"] = os.path.join(tmp, "cut.mp4")
    with open(files["truncated"], "wb") as fh:
        fh.write(data[: len(data) // 3])
    files["empty"] = os.path.join(tmp, "empty.mp4")
    open(files["empty"], "wb").close()
    files["big"] = os.path.join(tmp, "big.mp4")
    with open(files["big"], "wb") as fh:
        fh.write(os.urandom(6 * 1024 * 1024))
    try:
        files["audio"] = write_audio_only(os.path.join(tmp, "audio.m4a"))
    except RuntimeError:  # this PyAV build cannot encode audio: one hostile file fewer
        pass
    return files


def requests(files: dict[str, str]) -> list[tuple[str, str, dict, str]]:
    """(name, endpoint, arguments, expected: served | refused | cancelled). Video arguments are paths."""
    videos = [os.path.join(EXAMPLES, f) for f in sorted(os.listdir(EXAMPLES)) if f.endswith(".mp4")]
    v = videos[0]
    out = [
        ("ask", "/ask", dict(video=v, question=QUESTION, max_new_tokens=32), "served"),
        ("ask other video", "/ask", dict(video=videos[-1], question="What moves?", max_new_tokens=32), "served"),
        ("preview", "/preview", dict(video=v, num_frames=16), "served"),
        ("attention", "/attention", dict(video=v, num_frames=16), "served"),
        ("zeroing", "/redundancy", dict(video=v, question=QUESTION, fractions="1, 0.5", seeds=1, models=["group"]),
         "served"),
        ("compare", "/compare", dict(video=v, question=QUESTION, models=["group", "naive"], max_new_tokens=16),
         "served"),
        ("4K frame at 128 frames", "/ask", dict(video=files["4k"], question=QUESTION, num_frames=128,
                                                max_new_tokens=16), "served"),
        ("8K frame", "/ask", dict(video=files["8k"], question=QUESTION, num_frames=128), "refused"),
        ("200,000-character question", "/ask", dict(video=v, question="why " * 50_000), "refused"),
        ("5000 fractions", "/redundancy", dict(video=v, question=QUESTION,
                                               fractions=",".join(f"{(k + 1) / 5001:.6f}" for k in range(5000))),
         "refused"),
        ("50 models", "/redundancy", dict(video=v, question=QUESTION, models=["group"] * 25 + ["naive"] * 25),
         "served"),  # duplicates collapse to two models: served, not a 50-model job
        ("51 distinct model names", "/compare", dict(video=v, question=QUESTION,
                                                     models=[f"m{k}" for k in range(51)]), "refused"),
        ("10^6 new tokens", "/ask", dict(video=v, question=QUESTION, max_new_tokens=10**6), "refused"),
        ("10^4 frames", "/ask", dict(video=v, question=QUESTION, num_frames=10**4), "refused"),
        ("1000-turn history", "/ask", dict(video=v, question=QUESTION, history=[["q", "a"]] * 1000), "refused"),
        ("custom model folder", "/ask", dict(video=v, question=QUESTION, model="/etc"), "refused"),
        ("6 MiB upload (limit 5)", "/ask", dict(video=files["big"], question=QUESTION), "refused"),
        ("text file", "/ask", dict(video=files["text"], question=QUESTION), "refused"),
        ("truncated mp4", "/preview", dict(video=files["truncated"]), "refused"),
        ("empty file", "/ask", dict(video=files["empty"], question=QUESTION), "refused"),
        ("cancelled answer", "/ask", dict(video=v, question=QUESTION, max_new_tokens=512, num_frames=64),
         "cancelled"),
        ("cancelled zeroing", "/redundancy", dict(video=v, question=QUESTION, models=["group", "naive", "image"],
                                                  fractions="1, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1",
                                                  strategies=["random", "even", "groups", "contiguous"], seeds=5),
         "cancelled"),
    ]
    if "audio" in files:
        out.append(("audio only", "/ask", dict(video=files["audio"], question=QUESTION), "refused"))
    return out


# ---- one session ---------------------------------------------------------------------------------------------------
TRACEBACK = re.compile(r"Traceback|File \"/|^\s+at ", re.M)


def classify(err: BaseException) -> tuple[str, str]:
    """(refused | failed, message) for an exception a client got."""
    from gradio_client.exceptions import AppError, ValidationError

    message = str(err)
    if isinstance(err, ValidationError):
        lines = message.splitlines()
        message = lines[-1].split(": ", 1)[-1] if len(lines) > 1 else message
        return ("failed" if TRACEBACK.search(message) else "refused"), message
    if isinstance(err, AppError):
        bad = TRACEBACK.search(message) or message.startswith("Something went wrong") or "\n" in message.strip()
        return ("failed" if bad else "refused"), message
    # the upload itself refused by Gradio (over max_file_size) is a refusal; anything else is a failure
    if "413" in message or "exceeds the maximum" in message.lower() or "too large" in message.lower():
        return "refused", message.splitlines()[0]
    return "failed", f"{type(err).__name__}: {message.splitlines()[0] if message else ''}"


def wait_until_running(job, timeout: float) -> None:
    """Until the job reports progress past waiting for the model slot (it holds the model), or it ends."""
    start = time.monotonic()
    while time.monotonic() - start < timeout and not job.done():
        progress = job.status().progress_data or []
        if any(p.desc and not p.desc.startswith("waiting for the model") for p in progress):
            return
        time.sleep(0.05)


def session(url: str, plan: list, deadline: float, seed: int, results: list, lock: threading.Lock) -> None:
    from gradio_client import Client, handle_file

    rng = random.Random(seed)
    client = Client(url, verbose=False)
    while time.monotonic() < deadline:
        name, endpoint, kwargs, expected = rng.choice(plan)
        args = {k: (handle_file(v) if k == "video" else v) for k, v in kwargs.items()}
        start = time.perf_counter()
        outcome, detail = "served", ""
        try:
            job = client.submit(api_name=endpoint, **args)
            if expected == "cancelled":
                if rng.random() < 0.5:  # half are cancelled while they run on the model, half whenever
                    wait_until_running(job, 60)
                time.sleep(rng.uniform(0.2, 1.0))
                if job.done():
                    job.result(timeout=5)  # finished first: served
                else:
                    job.cancel()
                    outcome = "cancelled"
            else:
                job.result(timeout=300)
        except Exception as err:  # noqa: BLE001 - every outcome is recorded
            outcome, detail = classify(err)
        with lock:
            results.append({"name": name, "endpoint": endpoint, "expected": expected, "outcome": outcome,
                            "seconds": time.perf_counter() - start, "detail": detail[:300]})


# ---- the server ----------------------------------------------------------------------------------------------------
def start_server(port: int, log_path: str) -> subprocess.Popen:
    env = dict(os.environ, SPACE_ID="vidlmm/load-test", GRADIO_SERVER_PORT=str(port), HF_HUB_OFFLINE="1",
               TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False", VIDLMM_MAX_UPLOAD_MB="5",
               PYTHONUNBUFFERED="1")
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
    start = time.monotonic()
    while time.monotonic() - start < 180:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}; see {log_path}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/gradio_api/info", timeout=2):
                return proc
        except OSError:
            time.sleep(0.25)
    proc.kill()
    raise RuntimeError("the server did not answer within 180 s")


def proc_kib(pid: int, key: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))
    except (OSError, StopIteration, ValueError):
        return None


def server_traceback_tails(log: str, keep: int = 6) -> list[list[str]]:
    """The last lines of each traceback in the server's log (its innermost frames and the error), to name a failure."""
    tails = []
    for block in log.split("Traceback (most recent call last):")[1:]:
        lines = [line for line in block.splitlines() if line.strip()]
        end = next((i for i, line in enumerate(lines) if not line.startswith((" ", "\t"))), len(lines) - 1)
        tails.append(lines[max(0, end - keep + 1):end + 1])
    return tails


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=8, help="concurrent gradio_client sessions (default 8)")
    parser.add_argument("--seconds", type=float, default=120, help="how long the sessions send requests")
    parser.add_argument("--json", metavar="OUT")
    parser.add_argument("--md", metavar="OUT")
    args = parser.parse_args(argv)
    report = Report()  # its first line names the machine
    with tempfile.TemporaryDirectory(prefix="bench_load_") as tmp:
        files = make_files(tmp)
        plan = requests(files)
        port = free_port()
        log_path = os.path.join(tmp, "server.log")
        started = time.monotonic()
        server = start_server(port, log_path)
        report(f"server: python app.py as a Space starts it (SPACE_ID set), embedded default, ready in "
               f"{time.monotonic() - started:.1f} s; {args.sessions} sessions for {args.seconds:g} s, "
               f"{len(plan)} kinds of request")
        peak = {"rss": 0}
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                peak["rss"] = max(peak["rss"], proc_kib(server.pid, "VmRSS") or 0)
                time.sleep(0.1)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        results, lock = [], threading.Lock()
        deadline = time.monotonic() + args.seconds
        threads = [threading.Thread(target=session, args=(f"http://127.0.0.1:{port}/", plan, deadline, k, results,
                                                          lock)) for k in range(args.sessions)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        time.sleep(2)  # the last cancelled jobs wind down and log
        alive = server.poll() is None
        hwm = proc_kib(server.pid, "VmHWM") if alive else None
        stop.set()
        server.terminate()
        try:
            server.wait(30)
        except subprocess.TimeoutExpired:
            server.kill()
        with open(log_path) as fh:
            log = fh.read()
    freed = [float(x) for x in re.findall(r"cancelled request freed the model slot ([0-9.]+) s", log)]
    left_waiting = log.count("cancelled request left before it got the model slot")
    server_tracebacks = log.count("Traceback")
    by = {k: [r for r in results if r["outcome"] == k] for k in ("served", "refused", "cancelled", "failed")}
    shown_tracebacks = [r for r in results if TRACEBACK.search(r["detail"])]
    unexpected = [r for r in results if r["outcome"] != r["expected"] and r["outcome"] != "served"]
    peak_mb = max(peak["rss"], hwm or 0) / 1024
    report("")
    report("| outcome | requests | p50 latency (s) | p95 latency (s) |")
    report("|---|---:|---:|---:|")
    for k, rows in by.items():
        secs = [r["seconds"] for r in rows]
        report(f"| {k} | {len(rows)} | {percentile(secs, 0.5):.2f} | {percentile(secs, 0.95):.2f} |")
    report("")
    report("| request | sent | served | refused | cancelled | failed | p50 (s) | what a refused client read |")
    report("|---|---:|---:|---:|---:|---:|---:|---|")
    for name, endpoint, _, expected in plan:
        rows = [r for r in results if r["name"] == name]
        if rows:
            counts = [sum(r["outcome"] == k for r in rows) for k in ("served", "refused", "cancelled", "failed")]
            said = next((r["detail"] for r in rows if r["outcome"] == "refused"), "")
            report(f"| {name} ({endpoint}, expect {expected}) | {len(rows)} | " + " | ".join(map(str, counts))
                   + f" | {percentile([r['seconds'] for r in rows], 0.5):.2f} | {said[:110].replace('|', '/')} |")
    report("")
    report(f"server peak RSS: {peak_mb:.0f} MiB (goal < {GOAL_RSS_MB})")
    report(f"cancelled jobs: {len(by['cancelled'])}; left while waiting for the model slot: {left_waiting}; "
           f"held it: {len(freed)}, freed it after "
           + (f"max {max(freed):.3f} s, median {statistics.median(freed):.3f} s" if freed else "-")
           + f" (goal < {GOAL_FREE_S:g} s)")
    report(f"tracebacks shown to a client: {len(shown_tracebacks)}; in the server log: {server_tracebacks}")
    for block in server_traceback_tails(log)[:5]:
        report("  server: " + "\n          ".join(block))
    for r in by["failed"][:10] + [r for r in unexpected if r["outcome"] != "failed"][:10]:
        report(f"  {r['outcome']}: {r['name']} ({r['endpoint']}, expected {r['expected']}): {r['detail']}")
    goals = {"server alive": alive, "no traceback shown": not shown_tracebacks, "no failed request": not by["failed"],
             f"peak RSS < {GOAL_RSS_MB} MiB": peak_mb < GOAL_RSS_MB,
             f"cancelled slots freed < {GOAL_FREE_S:g} s": all(f < GOAL_FREE_S for f in freed)}
    report("goals: " + ", ".join(f"{k}: {'met' if v else 'NOT met'}" for k, v in goals.items()))
    report.save(args.md, args.json, {"sessions": args.sessions, "seconds": args.seconds, "results": results,
                                      "peak_rss_mb": peak_mb, "cancel_freed_s": freed, "goals": goals,
                                      "server_tracebacks": server_tracebacks})
    return 0 if all(goals.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
