"""Reference-style full decode vs. vidlmm's sampled decode: time and peak memory.

    python benchmarks/bench_decode.py [--video PATH] [--json OUT] [--frames 16] [--bomb-frames 128]

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

(c) the decode bomb: a clip of ONE 3840x2160 frame (a few KB) read at ``--bomb-frames`` uniform frames (128),
    as the model reads it (``vidlmm.preprocess.read_pixels``: each frame resized to the tower's 384x384 input
    as it is decoded, each distinct frame kept once), against the same read of a one-frame 96x96 clip, and
    against the old path (full-size frames, the repeats materialised) as the baseline. Goal: the 4K read's
    peak RSS within 300 MiB of the 96x96 read's. Then ``python -m vidlmm ask`` on the 4K clip at that many
    frames, its whole process's peak RSS (goal: under 1.5 GiB).
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
    if approach in ("model", "full size, repeats copied"):
        from vidlmm.preprocess import ImageProcessor, read_pixels

        if approach == "model":
            clip, pixels = read_pixels(path, FrameSampling.uniform(num_frames), ImageProcessor.for_tower("siglip", 384))
            frames = clip.frames
        else:  # what read_video did before: every sampled position decoded at full size
            clip = read_video(path, FrameSampling.uniform(num_frames), max_pixels=None)
            frames = clip.sampled_frames()
        idx, total, fps, backend = clip.indices, clip.total_frames, clip.fps, clip.backend
    elif approach == "reference":
        vr = decord.VideoReader(path, ctx=decord.cpu(0), num_threads=0)
        total, fps = len(vr), vr.get_avg_fps()
        video = vr.get_batch(list(range(total))).asnumpy().astype(np.float32)  # every frame, float32 THWC
        idx = np.linspace(0, total - 1, num_frames, dtype=int)
        frames = video[idx]
        del video
        backend = "decord (all frames)"
    else:
        clip = read_video(path, FrameSampling.uniform(num_frames))
        idx, frames, total, fps, backend = clip.indices, clip.sampled_frames(), clip.total_frames, clip.fps, clip.backend
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


def make_one_frame_clip(path: str, width: int, height: int) -> str:
    """One frame of noise-free content (compresses to a few KB): H.264 with PyAV, else OpenCV's mp4v."""
    sys.path.insert(0, ROOT)
    from tests.videos import make_moving_square_frames, write_video

    frame = make_moving_square_frames(1, height, width)[0]
    try:
        import av

        with av.open(path, "w") as out:
            stream = out.add_stream("libx264", rate=25)
            stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
            for packet in [*stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")), *stream.encode(None)]:
                out.mux(packet)
        return path
    except Exception:  # noqa: BLE001 - no H.264 encoder in this PyAV build
        return write_video(path, frame[None], 25, "mp4v")


def ask_peak_rss(path: str, num_frames: int) -> tuple[float, int, str]:
    """(peak RSS MiB of a whole `python -m vidlmm ask` process on the video, its exit status, its last line)."""
    import subprocess

    cmd = [sys.executable, "-m", "vidlmm", "ask", "--video", path, "--question", "What happens in the video?",
           "--num-frames", str(num_frames), "--max-new-tokens", "8", "--json"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = proc.communicate(timeout=600)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)  # the largest child so far: run this first
    lines = (out.strip() or err.strip()).splitlines()
    return usage.ru_maxrss / 1024, proc.returncode, lines[-1][:160] if lines else ""


def bomb(tmp: str, num_frames: int) -> dict:
    big = make_one_frame_clip(os.path.join(tmp, "one_frame_3840x2160.mp4"), 3840, 2160)
    small = make_one_frame_clip(os.path.join(tmp, "one_frame_96x96.mp4"), 96, 96)
    ask_rss, ask_status, ask_line = ask_peak_rss(big, num_frames)
    runs = {"4k": run_child("model", big, num_frames, tmp)[0], "96": run_child("model", small, num_frames, tmp)[0],
            "4k_old": run_child("full size, repeats copied", big, num_frames, tmp)[0]}
    gap = runs["4k"]["peak_rss_mb"] - runs["96"]["peak_rss_mb"]
    print(f"\ndecode bomb: one frame of 3840x2160 ({os.path.getsize(big) / 1024:.1f} KiB file) read at {num_frames} "
          f"uniform frames\n")
    print("| read | peak RSS (MiB) | increment over imports (MiB) | time (s) |")
    print("|---|---:|---:|---:|")
    for key, label in (("96", "96x96 clip, as the model reads it"), ("4k", "3840x2160 clip, as the model reads it"),
                       ("4k_old", "3840x2160 clip, full size with repeats copied (the old path)")):
        r = runs[key]
        print(f"| {label} | {r['peak_rss_mb']:.0f} | {r['increment_mb']:.0f} | {r['seconds']:.2f} |")
    print(f"\n4K read minus 96x96 read: {gap:.0f} MiB of peak RSS (goal <= 300: {'met' if gap <= 300 else 'NOT met'}); "
          f"the old path's increment is {runs['4k_old']['increment_mb'] / max(runs['4k']['increment_mb'], 1):.0f}x "
          "the new one's")
    print(f"python -m vidlmm ask on the 4K clip at {num_frames} frames: peak RSS {ask_rss:.0f} MiB, exit {ask_status} "
          f"(goal < 1536: {'met' if ask_rss < 1536 and ask_status == 0 else 'NOT met'})")
    return {"runs": runs, "gap_mb": gap, "ask_peak_rss_mb": ask_rss, "ask_status": ask_status,
            "ask_output": ask_line, "file_kib": os.path.getsize(big) / 1024}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--video", help="use this video instead of generating the 30 s 480p clip")
    ap.add_argument("--json", help="write the results to this JSON file")
    ap.add_argument("--frames", type=int, default=16, help="uniform frames to sample (default 16)")
    ap.add_argument("--bomb-frames", type=int, default=128, help="frames for the one-frame 4K clip (default 128)")
    args = ap.parse_args(argv)
    from common import machine_line

    print(machine_line())

    with tempfile.TemporaryDirectory(prefix="bench_decode_") as tmp:
        path = args.video
        if path is None:
            start = time.perf_counter()
            path = make_clip(os.path.join(tmp, "clip_480p_30s.mp4"))
            print(f"wrote {os.path.basename(path)} ({os.path.getsize(path) / 2**20:.1f} MiB) "
                  f"in {time.perf_counter() - start:.1f} s")
        bombed = bomb(tmp, args.bomb_frames)
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
                           identical_frames=same_frames, bomb=bombed), fh, indent=2)
    bomb_ok = bombed["gap_mb"] <= 300 and bombed["ask_status"] == 0 and bombed["ask_peak_rss_mb"] < 1536
    return 0 if same_idx and same_frames and bomb_ok else 1


if __name__ == "__main__":
    sys.exit(main())
