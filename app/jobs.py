"""Work that stops when its client leaves, and the one slot in which model work runs.

Gradio closes an event's generator when its client cancels the job or disconnects (on the next `yield`). So each
model endpoint is a generator over `relay(...)`: the work runs in its own thread and reports progress through a
`report(fraction, text)` callback, while the generator yields a heartbeat every fraction of a second. When the
generator is closed, the work's next `report` (between frames, zeroing points, models; and every generated token,
through `cancelled`) raises `Cancelled`, and its `finally` blocks free the model slot.

The slot (`ModelSlot`) is where every model is loaded and run: at most `concurrency` jobs hold it at once, so a
job that is still winding down after its client left never runs beside the next one, and a checkpoint is never
loaded beside a running job.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import threading
import time
from typing import Callable, Iterator

from vidlmm.errors import VidlmmError

log = logging.getLogger("vidlmm.app")
HEARTBEAT = object()  # yielded while the work runs: the moment Gradio may close the generator
BEAT_S = 0.2


class Cancelled(VidlmmError):
    """The request was cancelled or its client disconnected."""

    def __init__(self):
        super().__init__("The request was cancelled.")


class Job:
    """One request's cancellation flag and progress callback (handed to the work as `report`)."""

    def __init__(self, progress: Callable[[float, str], None] | None = None):
        self._cancelled = threading.Event()
        self._progress = progress
        self.cancelled_at: float | None = None  # time.monotonic() of the cancel

    def cancel(self) -> None:
        if not self._cancelled.is_set():
            self.cancelled_at = time.monotonic()
            self._cancelled.set()

    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def report(self, fraction: float = 0.0, text: str = "") -> None:
        """Progress, and the place where cancelled work stops."""
        if self._cancelled.is_set():
            raise Cancelled()
        if self._progress is not None:
            self._progress(fraction, text)


def relay(work: Callable[[Job], object], progress: Callable[[float, str], None] | None = None,
          beat_s: float = BEAT_S) -> Iterator[object]:
    """Run `work(job)` in a thread. Yields each item it yields (when it returns a generator) or its return value,
    and HEARTBEAT while it is busy; its exception is raised here. Closing this generator cancels the work.
    Progress is forwarded from this generator's thread (Gradio's progress belongs to the request's thread)."""
    events: queue.Queue = queue.Queue()
    job = Job(lambda fraction, text: events.put(("progress", (fraction, text))))

    def run():
        try:
            result = work(job)
            if hasattr(result, "__next__"):
                with contextlib.closing(result):  # cancelled: its finally blocks run here, in this thread
                    for item in result:
                        job.report()  # between items: stop here once cancelled
                        events.put(("item", item))
            else:
                events.put(("item", result))
            events.put(("done", None))
        except BaseException as err:  # noqa: BLE001 - handed to the request's thread
            events.put(("error", err))

    threading.Thread(target=run, name="vidlmm-job", daemon=True).start()
    try:
        while True:
            try:
                kind, value = events.get(timeout=beat_s)
            except queue.Empty:
                yield HEARTBEAT
                continue
            if kind == "progress":
                if progress is not None:
                    progress(*value)
                yield HEARTBEAT
            elif kind == "item":
                yield value
            elif kind == "error":
                raise value
            else:
                return
    finally:
        job.cancel()


class ModelSlot:
    """At most `size` jobs load or run models at once. `hold(job)` waits for a free place, giving up when the job
    is cancelled; it is re-entrant within one thread (a job that loads the model it is about to run)."""

    def __init__(self, size: int = 1):
        self.size = max(1, int(size))
        self._places = threading.BoundedSemaphore(self.size)
        self._local = threading.local()
        self._holders = 0
        self._count = threading.Lock()

    def holders(self) -> int:
        """Jobs holding the slot now (for tests, load tests and status)."""
        with self._count:
            return self._holders

    def held(self) -> bool:
        return getattr(self._local, "depth", 0) > 0

    @contextlib.contextmanager
    def hold(self, job: Job | None = None, wait_text: str = "waiting for the model"):
        if self.held():
            self._local.depth += 1
            try:
                yield
            finally:
                self._local.depth -= 1
            return
        while not self._places.acquire(timeout=0.1):
            if job is not None and job.cancelled():
                log.info("cancelled request left before it got the model slot")
            if job is not None:
                job.report(0.0, wait_text)
        self._local.depth = 1
        with self._count:
            self._holders += 1
        try:
            yield
        finally:
            self._local.depth = 0
            with self._count:
                self._holders -= 1
            self._places.release()
            if job is not None and job.cancelled_at is not None:  # the load test reads this line
                log.info("cancelled request freed the model slot %.3f s after its client left",
                         time.monotonic() - job.cancelled_at)
