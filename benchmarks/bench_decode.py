"""Reference-style full decode vs. vidlmm's sampled decode: time and peak memory.

    python benchmarks/bench_decode.py [--video PATH] [--json OUT] [--frames 16]

Without ``--video`` it writes a 30 s 854x480 30 fps mp4v clip (scrolling random texture plus a moving
square, so it does not compress to nothing) into a temporary folder.

(a) reference: what pytorchvideo's decord wrapper does for TinyLLaVA-Video: decode EVERY frame with
    decord (``get_batch(range(len(vr)))``), convert to float32 ``[T, H, W, 3]``, then take the 16 uniform
    indices ``linspace(0, T-1, 16, dtype=int)``. (We open by path; the wrapper first reads the whole file
    into memory, so its real peak is higher by the file size.)
(b) ours: ``vidlmm.video.read_video(path, FrameSampling.uniform(16))``.

Each approach runs in a fresh spawned child process. After its imports the kernel's peak-RSS mark is reset
(Linux ``/proc/self/clear_refs``); the increment is the peak during the approach minus the resident size
right after imports, and the peak is that peak in absolute terms (elsewhere: ``ru_maxrss`` is used). Both must give identical
indices and identical uint8 frames (the float frames cast back); the script prints that check.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_clip(path: str, seconds: int = 30, fps: int = 30, width: int = 854, height: int = 480) -> str:
    """Write an mp4v clip with a scrolling random texture and a moving bright square (RGB content)."""
    import cv2

    rng = np.random.default_rng(0)
    texture = rng.integers(0, 256, size=(height, width * 2, 3), dtype=np.uint8)
    texture = cv2.GaussianBlur(texture, (0, 0), 2.0)  # some structure, still costly to encode
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (width, height))
    if not writer.isOpened():
        raise RuntimeError("OpenCV cannot write mp4v here")
    side = height // 5
    for t in range(seconds * fps):
        shift = (3 * t) % width
        frame = np.ascontiguousarray(texture[:, shift:shift + width])
        x0 = (7 * t) % (width - side)
        frame[height // 3:height // 3 + side, x0:x0 + side] = (255, 255, 0)
        writer.write(frame)  # BGR; colours do not matter here
    writer.release()
    return path


def _maxrss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _proc_status_mb(key: str) -> float | None:
    try:
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(key + ":")) / 1024
    except (OSError, StopIteration, ValueError):
        return None


def _child(approach: str, path: str, num_frames: int, out_npy: str, queue) -> None:
    sys.path.insert(0, ROOT)
    import decord  # noqa: F401 - imported before the baseline so both children pay the same imports

    from common import reset_peak_rss
    from vidlmm.video import FrameSampling, read_video

    reset = reset_peak_rss()  # the imports' transient peak is not counted
    base = _proc_status_mb("VmRSS") if reset else None
    base = base if base is not None else _maxrss_mb()
    start = time.perf_counter()
    if approach == "reference":
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=0)
        total, fps = len(vr), vr.get_avg_fps()
        video = vr.get_batch(list(range(total))).asnumpy().astype(np.float32)  # every frame, float32 THWC
        idx = np.linspace(0, total - 1, num_frames, dtype=int)
        frames = video[idx]
        del video
        backend = "decord (all frames)"
    else:
        clip = read_video(path, FrameSampling.uniform(num_frames))
        idx, frames, total, fps, backend = clip.indices, clip.frames, clip.total_frames, clip.fps, clip.backend
    elapsed = time.perf_counter() - start
    hwm = _proc_status_mb("VmHWM") if reset else None
    peak = hwm if hwm is not None else _maxrss_mb()
    np.save(out_npy, frames.astype(np.uint8) if frames.dtype != np.uint8 else frames)
    queue.put(dict(approach=approach, seconds=elapsed, peak_rss_mb=peak, baseline_rss_mb=base,
                   increment_mb=peak - base, indices=[int(i) for i in idx], total_frames=int(total),
                   fps=float(fps), backend=backend))


def run_child(approach: str, path: str, num_frames: int, workdir: str) -> tuple[dict, np.ndarray]:
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    out_npy = os.path.join(workdir, f"{approach}.npy")
    proc = ctx.Process(target=_child, args=(approach, path, num_frames, out_npy, queue))
    proc.start()
    result = queue.get(timeout=900)
    proc.join()
    return result, np.load(out_npy)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video", help="use this video instead of generating the 30 s 480p clip")
    ap.add_argument("--json", help="write the results to this JSON file")
    ap.add_argument("--frames", type=int, default=16, help="uniform frames to sample (default 16)")
    args = ap.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        path = args.video
        if path is None:
            start = time.perf_counter()
            path = make_clip(os.path.join(tmp, "clip_480p_30s.mp4"))
            print(f"wrote {os.path.basename(path)} ({os.path.getsize(path) / 2**20:.1f} MiB) "
                  f"in {time.perf_counter() - start:.1f} s")
        ours, ours_frames = run_child("ours", path, args.frames, tmp)
        ref, ref_frames = run_child("reference", path, args.frames, tmp)

    same_idx = ours["indices"] == ref["indices"]
    same_frames = ours_frames.shape == ref_frames.shape and np.array_equal(ours_frames, ref_frames)
    h, w = ours_frames.shape[1:3]
    print(f"\nvideo: {ref['total_frames']} frames, {w}x{h}, {ref['fps']:.2f} fps; sampling uniform {args.frames}\n")
    print("| approach | backend | time (s) | peak RSS (MiB) | increment over imports (MiB) |")
    print("|---|---|---:|---:|---:|")
    for r, name in ((ref, "reference: decode all, float32, subsample"), (ours, "ours: read_video (sampled frames)")):
        print(f"| {name} | {r['backend']} | {r['seconds']:.2f} | {r['peak_rss_mb']:.0f} | {r['increment_mb']:.0f} |")
    mem_factor = ref["increment_mb"] / max(ours["increment_mb"], 1.0)
    speedup = ref["seconds"] / max(ours["seconds"], 1e-9)
    print(f"\nmemory reduction (increment): {mem_factor:.1f}x  (goal >= 10x: {'met' if mem_factor >= 10 else 'NOT met'})")
    print(f"memory reduction (absolute peak): {ref['peak_rss_mb'] / ours['peak_rss_mb']:.1f}x")
    print(f"speedup: {speedup:.1f}x")
    print(f"identical indices: {same_idx} {ours['indices']}")
    print(f"identical uint8 frames: {same_frames}")

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(dict(video=os.path.basename(path), width=w, height=h, reference=ref, ours=ours,
                           memory_reduction=mem_factor, speedup=speedup, identical_indices=same_idx,
                           identical_frames=same_frames), fh, indent=2)
    return 0 if same_idx and same_frames else 1


if __name__ == "__main__":
    sys.exit(main())
