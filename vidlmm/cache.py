"""A byte-bounded LRU cache keyed by content, owned by whoever creates it (a session, a benchmark run)."""

from __future__ import annotations

import functools
import hashlib
import os
import threading
from collections import OrderedDict

import torch


def file_digest(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes: the same video uploaded twice under two names hits the same entry.

    Remembered per (path, size, mtime) so a follow-up question does not re-read a long video to hash it.
    """
    st = os.stat(path)
    return _digest(os.path.realpath(path), st.st_size, st.st_mtime_ns)


def source_digest(path: str | os.PathLike) -> str:
    """`file_digest` of a video file; for a folder of frames, the sha256 of its listing (names, sizes and
    modification times: re-hashing thousands of images per question would cost more than decoding them)."""
    if not os.path.isdir(path):
        return file_digest(path)
    h = hashlib.sha256()
    for entry in sorted(os.scandir(path), key=lambda e: e.name):
        st = entry.stat()
        h.update(f"{entry.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


@functools.lru_cache(maxsize=1024)  # bounded: a few hundred bytes an entry
def _digest(path: str, size: int, mtime_ns: int, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def nbytes(value) -> int:
    """Approximate memory held by a value made of tensors / numpy arrays / dataclasses / containers."""
    if isinstance(value, torch.Tensor):
        return value.numel() * value.element_size()
    if hasattr(value, "nbytes") and isinstance(getattr(value, "nbytes"), int):
        return value.nbytes
    if isinstance(value, dict):
        return sum(nbytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(nbytes(v) for v in value)
    if hasattr(value, "__dataclass_fields__"):
        return sum(nbytes(getattr(value, name)) for name in value.__dataclass_fields__)
    return 0


class ByteLRU:
    """Least-recently-used mapping that evicts until the total size is at most `max_bytes`.

    An item larger than the whole budget is not stored (it would evict everything and still not fit).
    """

    def __init__(self, max_bytes: int):
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[str, tuple[object, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size in self._items.values())

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: str):
        with self._lock:
            if key not in self._items:
                self.misses += 1
                return None
            self._items.move_to_end(key)
            self.hits += 1
            return self._items[key][0]

    def put(self, key: str, value) -> None:
        size = nbytes(value)
        with self._lock:
            self._items.pop(key, None)
            if size > self.max_bytes:
                return
            self._items[key] = (value, size)
            while self.total_bytes > self.max_bytes:
                self._items.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._items.clear()
