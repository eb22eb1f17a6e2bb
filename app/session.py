"""Per-session state: one browser tab's (or one API client's) chat, cache entries and files.

Vision features live in one app-wide byte-bounded LRU, but every key carries the session's id, so a session only
ever finds its own entries; the byte bound holds for all sessions together.
"""

from __future__ import annotations

import shutil
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path


class SessionCache:
    """The get/put view of the shared LRU that VideoLMM.prepare uses, restricted to one session's keys.

    Features are stored on the CPU (GPU work returns CPU objects, as ZeroGPU requires); the connector moves
    them back to the model's device."""

    def __init__(self, shared, owner: str):
        self.shared, self.owner = shared, owner

    def get(self, key: str):
        return self.shared.get(f"{self.owner}|{key}")

    def put(self, key: str, value) -> None:
        features = getattr(value, "features", None)
        if features is not None and features.device.type != "cpu":
            value.features = features.cpu()
        self.shared.put(f"{self.owner}|{key}", value)


@dataclass
class Session:
    """history: (question, answer) pairs of the current conversation; conversation: what it is about (video digest,
    model, sampling, budget), so a new video starts a new conversation. trace: the last LLM-attention trace, so
    picking another word of its answer redraws without running the model."""

    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    history: list[tuple[str, str]] = field(default_factory=list)
    conversation: str | None = None
    trace: tuple | None = None  # (what was traced, model name, LLMAttention): the last LLM-attention trace
    _files: Path | None = None

    def files_dir(self, root: Path) -> Path:
        if self._files is None or not self._files.is_dir():
            root.mkdir(parents=True, exist_ok=True)
            self._files = Path(tempfile.mkdtemp(prefix=f"{self.id[:8]}-", dir=root))
        return self._files

    def close(self) -> None:
        """Gradio calls this when the tab closes or the session expires."""
        if self._files is not None:
            shutil.rmtree(self._files, ignore_errors=True)
        self.history.clear()
        self.trace = None


def ensure_session(session: Session | None) -> Session:
    return session if isinstance(session, Session) else Session()


def close_session(session) -> None:
    if isinstance(session, Session):
        session.close()
