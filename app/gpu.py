"""ZeroGPU support that costs nothing elsewhere: `gpu(seconds)` is `spaces.GPU(duration=seconds)` when the `spaces`
package is installed (Hugging Face Spaces) and a no-op decorator otherwise.

Functions decorated with it do all CUDA work and return CPU objects only (text, numpy arrays, dicts, CPU tensors).
"""

from __future__ import annotations

import importlib.util
import os

# On ZeroGPU decorated calls run in another process: only picklable arguments cross, so no progress callbacks.
ON_ZERO_GPU = bool(os.environ.get("SPACES_ZERO_GPU"))


def _spaces():
    if importlib.util.find_spec("spaces") is None:
        return None
    try:
        import spaces
    except Exception:  # noqa: BLE001 - a broken optional package must not stop the app
        return None
    return spaces


def gpu(duration: int = 60):
    spaces = _spaces()
    if spaces is None:
        return lambda fn: fn
    return spaces.GPU(duration=duration)


def across(callback):
    """A callback as it may be handed to a decorated function: itself, or a no-op on ZeroGPU."""
    if ON_ZERO_GPU or callback is None:
        return lambda *args, **kwargs: None
    return callback


def peak_memory() -> dict[str, float]:
    """Peak memory so far: the process's resident set (MiB) and, on CUDA, allocated GPU memory since the last
    reset_peak_memory() (MiB)."""
    import resource
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = {"peak_rss_mb": round(rss / (1024**2 if sys.platform == "darwin" else 1024), 1)}
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 1024**2, 1)
    return out


def reset_peak_memory() -> None:
    import torch

    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.reset_peak_memory_stats()
