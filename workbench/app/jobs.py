"""Background jobs of the app: long work (patching sweeps, SAE training) runs in a thread of its own,
reports its progress, can be cancelled, and is shared by the sessions that ask for the same thing.
Pure: no streamlit here (the registry is kept by :func:`workbench.app.cached.jobs`, drawn by
:func:`workbench.app.ui.job_status`).

A job's thread starts in an empty :class:`contextvars.Context`, so no run-local hook of the session
that started it (``workbench.hooks``) can reach its forward passes, and the hooks the job attaches
(a progress counter, say) reach no one else's.
"""

from __future__ import annotations

import contextvars
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from workbench.errors import WorkbenchError


class Cancelled(WorkbenchError):
    """Raised inside a job (by :meth:`Job.report`) once someone asked it to stop."""


#: what a job's function receives: ``report(fraction_done, stage)``; it raises :class:`Cancelled` when asked to stop
Report = Callable[[float, str], None]


class Job:
    """One piece of background work: its progress, its result or error, and a cancel flag."""

    def __init__(self, key: Hashable, title: str, fn: Callable[[Report], Any]):
        self.key = key
        self.title = title
        self._fn = fn
        self.fraction = 0.0
        self.stage = "waiting to start"
        self.result: Any = None
        self.error: BaseException | None = None
        self.started = time.monotonic()
        self.finished_at: float | None = None
        self._progress_since: tuple[float, float] | None = None  # (time, fraction) when progress began
        self._cancel = threading.Event()
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"workbench-job {title}", daemon=True)

    def start(self) -> Job:
        self._thread.start()
        return self

    def _run(self) -> None:
        # a fresh context: no hooks of the starting thread, none of ours leak out
        contextvars.Context().run(self._body)

    def _body(self) -> None:
        try:
            self.report(0.0, "starting")
            self.result = self._fn(self.report)
            self.fraction, self.stage = 1.0, "done"
        except BaseException as exc:  # noqa: BLE001 - kept and shown by the page, never lost in the thread
            self.error = exc
        finally:
            self.finished_at = time.monotonic()
            self._done.set()

    def report(self, fraction: float, stage: str) -> None:
        """Record progress (``fraction`` of the work done, what is being done).

        Raise :class:`Cancelled` if asked to stop."""
        if self._cancel.is_set():
            raise Cancelled(f"{self.title}: cancelled")
        fraction = min(1.0, max(0.0, float(fraction)))
        if self._progress_since is None and fraction > 0:
            self._progress_since = (time.monotonic(), fraction)
        self.fraction, self.stage = fraction, stage

    def cancel(self) -> None:
        """Ask the job to stop at its next progress report."""
        self._cancel.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait up to ``timeout`` seconds for the job to end; return whether it has."""
        return self._done.wait(timeout)

    @property
    def done(self) -> bool:
        return self._done.is_set()

    @property
    def cancelled(self) -> bool:
        return isinstance(self.error, Cancelled)

    @property
    def elapsed(self) -> float:
        return (self.finished_at or time.monotonic()) - self.started

    def eta(self) -> float | None:
        """Seconds left at the pace since progress began (None until there is a pace to go by)."""
        if self._progress_since is None:
            return None
        t0, f0 = self._progress_since
        rate = (self.fraction - f0) / max(time.monotonic() - t0, 1e-9)
        return (1.0 - self.fraction) / rate if rate > 0 else None


class Jobs:
    """The app's jobs by key: asking twice for the same work joins the running (or finished) job."""

    def __init__(self, keep_finished: int = 32):
        self._jobs: OrderedDict[Hashable, Job] = OrderedDict()
        self._lock = threading.Lock()
        self._keep = keep_finished
        self._path_locks: dict[str, threading.Lock] = {}

    def get(self, key: Hashable) -> Job | None:
        with self._lock:
            return self._jobs.get(key)

    def start(self, key: Hashable, title: str, fn: Callable[[Report], Any]) -> Job:
        """Return the job for ``key``: the one running or finished, else a new one started with ``fn``.
        A job that failed or was cancelled is replaced by a new one."""
        with self._lock:
            job = self._jobs.get(key)
            if job is not None and not (job.done and job.error is not None):
                self._jobs.move_to_end(key)
                return job
            job = Job(key, title, fn)
            self._jobs[key] = job
            self._forget_old()
            return job.start()

    def forget(self, key: Hashable) -> None:
        with self._lock:
            self._jobs.pop(key, None)

    def _forget_old(self) -> None:
        finished = [k for k, j in self._jobs.items() if j.done]
        for k in finished[: max(0, len(finished) - self._keep)]:
            del self._jobs[k]

    def path_lock(self, path: str | Path) -> threading.Lock:
        """Return the one lock of this process for an output directory (a store, a run): jobs writing
        the same directory take it in turn instead of interleaving their files."""
        name = str(Path(path).resolve())
        with self._lock:
            return self._path_locks.setdefault(name, threading.Lock())

    @contextmanager
    def writing(self, *dirs: str | Path, report: Report | None = None) -> Iterator[None]:
        """Hold the locks of ``dirs`` (taken in sorted order, so two jobs never wait on each other in a
        circle); while another job holds one, say so through ``report`` (which also lets a cancel through)."""
        names = sorted({str(Path(d).resolve()) for d in dirs})
        with ExitStack() as stack:
            for name in names:
                lock = self.path_lock(name)
                while not lock.acquire(timeout=0.25):
                    if report is not None:
                        report(0.0, f"waiting: another job is writing {name}")
                stack.callback(lock.release)
            yield
