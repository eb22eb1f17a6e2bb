"""Decode videos in a child process with a time limit, so a decoder that hangs or crashes (a segfault in a
native library) on one file costs that sample, not the run.

One persistent worker per process that reads data (each DataLoader worker gets its own). A request sends a
path; the worker answers with the pixel tensor, or with the `VideoReadError` the decode raised. A worker
that does not answer within the time limit is killed; one that dies is noticed at once; either way the
sample fails with `DecodeFailed` and the next request starts a fresh worker.

The worker is a plain `python -m train.decode_worker` subprocess rather than a multiprocessing child:
DataLoader workers are daemonic and multiprocessing forbids daemonic processes to have children. Pixels
come back as a file in a private folder on tmpfs, read with one copy (a pickle through the socket copies
them several times), the rest through a `multiprocessing` connection.

    python -m train.decode_worker --measure DIR [--size 64] [--frames 16]

prints the per-clip cost of decoding every video in DIR in this process and through the worker.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from multiprocessing import Pipe
from multiprocessing.connection import Connection
from pathlib import Path

import torch

from vidlmm.errors import VideoReadError

STARTUP_LIMIT_S = 120.0  # importing torch on a loaded machine; a worker that cannot start is not a sample's fault


class DecodeFailed(Exception):
    """The worker timed out or died on one file; `str()` is one sentence."""


class DecodeWorker:
    """`worker(path)` runs `fn(path, *args)` in the child within `time_limit_s` seconds and returns its tensor.

    `fn` must be a module-level function and `args` picklable. Raises `VideoReadError` as `fn` raised it,
    `DecodeFailed` on a timeout or a crash, and `RuntimeError` (with the child's traceback) on any other
    exception, which is a bug rather than a bad file.
    """

    def __init__(self, fn, *args, time_limit_s: float = 60.0):
        if time_limit_s <= 0:
            raise ValueError(f"the decode time limit must be positive, got {time_limit_s}")
        self.fn, self.args, self.time_limit_s = fn, args, float(time_limit_s)
        self._proc = self._conn = self._dir = None
        self._owner = os.getpid()

    def __getstate__(self):  # a copy sent to another process starts its own worker
        return {**self.__dict__, "_proc": None, "_conn": None, "_dir": None}

    def __call__(self, path) -> torch.Tensor:
        if self._owner != os.getpid():  # forked (DataLoader worker): the parent's child is not ours to use
            self._proc = self._conn = self._dir = None
            self._owner = os.getpid()
        if self._proc is None or self._proc.poll() is not None:  # not started, or died while idle
            self._stop()
            self._start()
        self._conn.send(os.fspath(path))
        if not self._conn.poll(self.time_limit_s):
            self._stop()
            raise DecodeFailed(f"the decoder did not finish within {self.time_limit_s:g} s (worker restarted)")
        try:
            reply = self._conn.recv()
        except (EOFError, OSError):
            reason = self._exit_reason()
            self._stop()
            raise DecodeFailed(f"the decoder crashed ({reason}; worker restarted)") from None
        if reply[0] == "ok":
            _, file, shape, dtype = reply
            # read into ordinary memory (one copy): a file-mapped tensor could not be passed on by a DataLoader
            # worker, whose queue shares tensors by file descriptor
            pixels = torch.empty(shape, dtype=getattr(torch, dtype))
            try:
                with open(file, "rb") as f:
                    f.readinto(pixels.view(-1).view(torch.uint8).numpy())
                return pixels
            finally:
                os.unlink(file)
        if reply[0] == "unreadable":
            raise VideoReadError(*reply[1:])
        raise RuntimeError(f"the decode worker failed on {path}:\n{reply[1]}")

    def close(self) -> None:
        if self._owner == os.getpid():
            self._stop()

    def _start(self) -> None:
        self._dir = tempfile.mkdtemp(prefix="vidlmm-decode-", dir=_memory_folder())
        ours, theirs = Pipe()
        self._proc = subprocess.Popen([sys.executable, "-m", "train.decode_worker", "--serve", str(theirs.fileno())],
                                      pass_fds=[theirs.fileno()],
                                      env={**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
                                           "OMP_NUM_THREADS": "1"})  # the same modules; one thread, as a decode needs
        theirs.close()  # else the child's death would not reach us as end-of-file
        self._conn = ours
        ours.send((self.fn, self.args, self._dir))
        if not ours.poll(STARTUP_LIMIT_S):
            self._stop()
            raise RuntimeError(f"the decode worker did not start within {STARTUP_LIMIT_S:g} s")
        try:
            ours.recv()
        except EOFError:
            reason = self._exit_reason()
            self._stop()
            raise RuntimeError(f"the decode worker could not start ({reason}); see its messages above") from None

    def _exit_reason(self) -> str:
        try:
            code = self._proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            return "it closed its connection"
        if code < 0:
            return f"killed by {signal.Signals(-code).name}"
        return f"exit status {code}"

    def _stop(self) -> None:
        if self._proc is not None:
            self._proc.kill()
            self._proc.wait()
        if self._conn is not None:
            self._conn.close()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
        self._proc = self._conn = self._dir = None


def _memory_folder() -> str | None:
    """/dev/shm when it has room for big clips (containers often give it 64 MiB), else the temporary folder."""
    try:
        st = os.statvfs("/dev/shm")
    except OSError:
        return None
    return "/dev/shm" if st.f_bavail * st.f_frsize >= 1 << 30 else None


# ---- the child ---------------------------------------------------------------------------------------------
def _die_with_parent() -> None:
    """A worker stuck in a decoder must not outlive a killed run (Linux; elsewhere it ends at its next read)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _faults() -> dict[str, str]:
    """Fault injection for the tests: VIDLMM_DECODE_FAULT="hang:a.mp4,crash:b.mp4" (file names)."""
    spec = os.environ.get("VIDLMM_DECODE_FAULT", "")
    return {name: kind for kind, _, name in (item.partition(":") for item in spec.split(",") if item)}


def serve(fd: int) -> None:
    _die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it stops us
    conn = Connection(fd)
    fn, args, folder = conn.recv()
    conn.send("ready")
    faults, count = _faults(), 0
    while True:
        try:
            path = conn.recv()
        except EOFError:
            return
        fault = faults.get(os.path.basename(path))
        if fault == "hang":
            time.sleep(10**6)
        if fault == "crash":
            os.kill(os.getpid(), signal.SIGSEGV)
        try:
            pixels = fn(path, *args).contiguous()
        except VideoReadError as err:
            conn.send(("unreadable", err.kind, str(err), err.path))
            continue
        except Exception:  # noqa: BLE001 - reported to the parent, which stops the run
            conn.send(("error", traceback.format_exc()))
            continue
        count += 1
        file = os.path.join(folder, f"{count}.raw")
        pixels.numpy().tofile(file)
        conn.send(("ok", file, tuple(pixels.shape), str(pixels.dtype).removeprefix("torch.")))


# ---- measurement -------------------------------------------------------------------------------------------
def measure(folder: Path, size: int, frames: int, repeats: int = 5) -> dict:
    """Milliseconds per clip to decode every video in `folder` in this process and through the worker (passes
    alternate; the best of `repeats` each, the worker already started), and the worker's start in seconds."""
    from vidlmm.preprocess import ImageProcessor
    from vidlmm.video import FrameSampling

    from .data import _decode_pixels

    videos = sorted(p for p in folder.iterdir() if p.suffix in (".mp4", ".mkv", ".webm", ".avi"))
    if not videos:
        raise SystemExit(f"error: no videos in {folder}")
    args = (FrameSampling.uniform(frames), ImageProcessor.for_tower("siglip", size))
    worker = DecodeWorker(_decode_pixels, *args, time_limit_s=60)
    started = time.perf_counter()
    worker(videos[0])
    startup = time.perf_counter() - started
    best = {"inline": float("inf"), "isolated": float("inf")}
    try:
        for _ in range(repeats):
            for mode, decode in (("inline", lambda v: _decode_pixels(v, *args)), ("isolated", worker)):
                t = time.perf_counter()
                for v in videos:
                    decode(v)
                best[mode] = min(best[mode], (time.perf_counter() - t) / len(videos) * 1000)
    finally:
        worker.close()
    return {"clips": len(videos), "inline_ms": best["inline"], "isolated_ms": best["isolated"],
            "overhead_ms": best["isolated"] - best["inline"], "overhead": best["isolated"] / best["inline"] - 1,
            "startup_s": startup}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m train.decode_worker")
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--measure", type=Path, help="a folder of videos (e.g. a synthetic world's videos/)")
    parser.add_argument("--size", type=int, default=64, help="the tower's input side in pixels")
    parser.add_argument("--frames", type=int, default=16, help="frames sampled uniformly per clip")
    args = parser.parse_args(argv)
    if args.serve is not None:
        serve(args.serve)
        return 0
    if args.measure is None:
        parser.error("give --measure DIR")
    r = measure(args.measure, args.size, args.frames)
    print(f"{r['clips']} clips, {args.frames} frames at {args.size} px: in process {r['inline_ms']:.2f} ms/clip, "
          f"isolated {r['isolated_ms']:.2f} ms/clip, overhead {r['overhead_ms']:.2f} ms/clip "
          f"({100 * r['overhead']:.1f} %); worker start {r['startup_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
