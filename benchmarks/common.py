"""What the end-to-end benchmarks share: which model, which video, child-process RSS, and the printed report.

Model choice (``--model``, else the first that exists): ``assets/models/group`` (the embedded model),
``runs/big/models/group`` (a fresh build of it), else a tiny random checkpoint written to a temporary folder.
``--tiny`` forces the tiny checkpoint (for smoke tests). Video: ``--video PATH``, else a generated clip of
``--seconds`` x ``--size`` at ``--fps`` (default 30 s, 854x480, 30 fps: ``bench_decode.make_clip``).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_MODELS = ("assets/models/group", "runs/big/models/group")
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from tests.ports import free_port  # noqa: E402,F401  (re-exported: a benchmark's server or accelerate's rendezvous)


def add_model_video_args(parser, *, seconds: float = 30, size: str = "854x480", fps: int = 30) -> None:
    parser.add_argument("--model", help=f"checkpoint folder (default: the first of {', '.join(DEFAULT_MODELS)} "
                                        "that exists, else a tiny random checkpoint)")
    parser.add_argument("--tiny", action="store_true", help="use a tiny random checkpoint (smoke tests)")
    parser.add_argument("--video", help="use this video instead of generating one")
    parser.add_argument("--seconds", type=float, default=seconds, help=f"generated clip length (default {seconds:g})")
    parser.add_argument("--size", default=size, help=f"generated clip WxH (default {size})")
    parser.add_argument("--fps", type=int, default=fps, help=f"generated clip frame rate (default {fps})")
    parser.add_argument("--frames", type=int, default=16, help="uniform frames sampled (default 16)")
    parser.add_argument("--json", metavar="OUT", help="write the results as JSON")
    parser.add_argument("--md", metavar="OUT", help="write the printed report as markdown")


def write_tiny_model(folder: str) -> str:
    """A tiny random group-resampler checkpoint whose greedy answers vary (a real token sequence to compare)."""
    from vidlmm.tiny import write_tiny_checkpoint

    return str(write_tiny_checkpoint(os.path.join(folder, "tiny-group"), "groupresampler", seed=1, num_queries=64,
                                     group=4, initializer_range=0.4))


def resolve_model(args, tmp: str) -> tuple[str, str]:
    """(checkpoint folder, how it was chosen)."""
    if args.model and not args.tiny:
        return args.model, "given with --model"
    if not args.tiny:
        for rel in DEFAULT_MODELS:
            if os.path.isfile(os.path.join(ROOT, rel, "config.json")):
                return os.path.join(ROOT, rel), f"embedded model {rel}"
    why = "--tiny" if args.tiny else f"none of {', '.join(DEFAULT_MODELS)} exists"
    return write_tiny_model(tmp), f"tiny random checkpoint in a temporary folder ({why})"


def resolve_inputs(args, tmp: str, report) -> tuple[str, str, dict]:
    """(checkpoint folder, video path, {"model_choice", "video"}: how each was chosen), both reported."""
    model, model_why = resolve_model(args, tmp)
    video, video_why = resolve_video(args, tmp)
    report(f"model: {os.path.basename(model.rstrip('/'))} ({model_why})")
    report(f"video: {video_why}")
    return model, video, {"model_choice": model_why, "video": video_why}


def resolve_video(args, tmp: str) -> tuple[str, str]:
    """(video path, description); generates the clip when no --video is given."""
    if args.video:
        return args.video, f"given: {os.path.basename(args.video)}"
    from bench_decode import make_clip

    width, height = (int(v) for v in args.size.lower().split("x"))
    seconds = max(1, int(round(args.seconds)))
    path = os.path.join(tmp, f"clip_{width}x{height}_{seconds}s.mp4")
    start = time.perf_counter()
    make_clip(path, seconds=seconds, fps=args.fps, width=width, height=height)
    return path, (f"generated {seconds} s {width}x{height} {args.fps} fps mp4v clip "
                  f"({os.path.getsize(path) / 2**20:.1f} MiB, written in {time.perf_counter() - start:.1f} s)")


def run_measured(cmd: list[str], **popen_kwargs) -> tuple[int, float, float]:
    """Run a child process to the end: (exit code, wall seconds, its own peak RSS in MiB).

    os.wait4 gives the rusage of exactly this child (RUSAGE_CHILDREN would be the max over every child so far)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, **popen_kwargs)
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here; tell Popen so it does not wait again
    return proc.returncode, time.perf_counter() - start, usage.ru_maxrss / 1024  # Linux: KiB


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (VmHWM, Linux `/proc/self/clear_refs`) so a later peak counts only
    what came after; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def self_rss_mb() -> dict:
    """Current and peak resident size of this process (MiB), from /proc (ru_maxrss elsewhere)."""
    out = {"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(("VmRSS:", "VmHWM:")):
                    out["rss_mb" if line.startswith("VmRSS") else "hwm_mb"] = int(line.split()[1]) / 1024
    except OSError:
        pass
    return out


class Report:
    """Print lines as they come and keep them, to be written as markdown at the end. The first line names the
    machine (`machine_line`), so every CPU figure a benchmark reports carries the CPU it was measured on."""

    def __init__(self, header: bool = True):
        self.lines: list[str] = []
        if header:
            self(machine_line())

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)

    def table(self, header: list[str], rows: list[list], align: str | None = None) -> None:
        align = align or ("---" + "|---:" * (len(header) - 1))
        self("| " + " | ".join(header) + " |")
        self("|" + align + "|")
        for row in rows:
            self("| " + " | ".join(str(c) for c in row) + " |")

    def save(self, md: str | None, json_path: str | None, data: dict) -> None:
        for path in (md, json_path):
            if path:
                os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if md:
            with open(md, "w") as fh:
                fh.write("\n".join(self.lines) + "\n")
        if json_path:
            with open(json_path, "w") as fh:
                json.dump(data, fh, indent=2)
            print(f"wrote {json_path}")


def machine() -> dict:
    """The machine a benchmark ran on; `cpu` names the CPU and what decides its fp32 / bf16 / int8 speed."""
    import platform

    import torch

    from vidlmm.precision import detect_cpu

    cpu = detect_cpu()
    return {"cpu": cpu.describe(), "cpu_flags": sorted(cpu.flags), "torch_cpu_capability": cpu.torch_level,
            "cpu_count": os.cpu_count(), "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}


def machine_line() -> str:
    """One line: the CPU (model, threads, instruction sets), CPUs, torch, OMP_NUM_THREADS."""
    m = machine()
    return (f"machine: {m['cpu']}; {m['cpu_count']} CPUs; torch {m['torch']}; "
            f"OMP_NUM_THREADS={m['omp_num_threads'] or 'unset'}")
