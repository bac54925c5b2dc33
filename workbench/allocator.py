"""Keep freed memory in the process, so repeated large forward passes stop page-faulting.

Caching every hook of SmolLM2 on 4 x 256 tokens makes about 1.8 GB of fresh tensors per call,
and the logits alone are 200 MB. glibc's malloc serves blocks that large with ``mmap`` and
gives them back to the kernel on ``free``; smaller ones come from the heap, whose top is also
given back once it is big enough. So every call maps its memory anew and the kernel zeroes it
page by page. :func:`retain_freed_memory` raises both thresholds so freed blocks stay in the process
and the next call reuses them. ``python -m benchmarks.bench_generate --parts prefill`` prints the
times and page faults per call with it, and with ``WORKBENCH_KEEP_FREED_MEMORY=0`` without it.
jemalloc and tcmalloc keep freed memory this way by default.

The ``workbench`` command, the app and the benchmarks call it at start. It is a setting of the
whole process, so the library never applies it on import; call it in your own scripts if you run
many large passes. The cost is memory: up to ``trim_threshold`` bytes of freed heap stay with the
process instead of going back to the system. ``WORKBENCH_KEEP_FREED_MEMORY=0`` turns it off.
Outside glibc (macOS, Windows, musl) it does nothing. :func:`release_freed_memory` hands what is kept
back (``malloc_trim``) where a step's peak matters more than its page faults (attribution graphs).
:func:`limit_arenas` keeps many threads from each holding freed memory of their own, and
:class:`GrowthTrimmer` hands freed memory back only once the resident set has grown by a margin, where
many threads free often and a trim at every step would cost more than it saves (the transcoder trainer).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
import threading

# mallopt parameters, from glibc's <malloc.h>
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_M_ARENA_MAX = -8

#: blocks below this size come from the heap, not a fresh mmap (glibc's default is 128 KiB, adapting up to 32 MiB)
MMAP_THRESHOLD = 1 << 30
#: the heap keeps up to this many free bytes at its top before trimming (mallopt takes a C int)
TRIM_THRESHOLD = (1 << 31) - 1


def _libc() -> ctypes.CDLL | None:
    """glibc, or None off Linux or where it cannot be loaded."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _mallopt():
    """glibc's ``mallopt(param, value)``, or None off Linux (musl and others have no mallopt)."""
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is not None:
        mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    return mallopt


def release_freed_memory() -> bool:
    """Return whether glibc's ``malloc_trim(0)`` gave free heap memory back to the system.

    The counterpart of :func:`retain_freed_memory` for a step whose *peak* matters more than its
    page faults: freed blocks inside the heap (not only at its top) are returned to the kernel, so
    the resident set shrinks to what is in use. An attribution graph calls it after its large
    temporary forward pass, before allocating its adjacency matrix (a SmolLM2 graph: ~120 MB).
    False off glibc (macOS, Windows, musl), where there is nothing to do."""
    libc = _libc()
    trim = getattr(libc, "malloc_trim", None)
    if trim is None:
        return False
    trim.argtypes, trim.restype = (ctypes.c_size_t,), ctypes.c_int
    return bool(trim(0))


def retain_freed_memory(mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD) -> bool:
    """Return whether glibc's malloc now keeps freed memory (False off glibc, or when turned off).

    ``WORKBENCH_KEEP_FREED_MEMORY=0`` in the environment makes this a no-op returning False."""
    for value, name in ((mmap_threshold, "mmap_threshold"), (trim_threshold, "trim_threshold")):
        if not 0 < value <= TRIM_THRESHOLD:
            raise ValueError(f"{name}={value} must be a positive C int (at most {TRIM_THRESHOLD})")
    if os.environ.get("WORKBENCH_KEEP_FREED_MEMORY", "1").strip().lower() in ("0", "false", "no", "off"):
        return False
    mallopt = _mallopt()
    if mallopt is None:
        return False
    # mallopt returns 1 on success; setting either threshold also stops glibc from adapting them on its own
    return bool(mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold))


def limit_arenas(n: int = 1) -> bool:
    """Return whether glibc now makes at most ``n`` malloc arenas (False off glibc).

    glibc gives threads their own arenas (up to 8 per core), and memory freed inside one arena's heap
    serves only the threads of that arena. A trainer running one thread per layer then holds each
    thread's freed temporaries apart: :func:`workbench.pipelines.train_transcoders` calls this before it
    starts its threads. Arenas made before the call stay. ``n`` must be at least 1."""
    if n < 1:
        raise ValueError(f"n={n} must be at least 1")
    mallopt = _mallopt()
    return mallopt is not None and bool(mallopt(_M_ARENA_MAX, n))


def resident_bytes() -> int | None:
    """The process's resident set in bytes (``/proc/self/statm``), None where there is no procfs."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class GrowthTrimmer:
    """Call :func:`release_freed_memory` only when the resident set has grown ``margin`` bytes since the
    last trim; callable from any thread, one trim at a time.

    The transcoder trainer's threads free a step's temporaries every second or so, in one shared arena,
    between long-lived batches: the holes pile up (a 16-layer SmolLM2 run rose from 2.5 to 4.8 GB
    between two trims of the producer). ``malloc_trim`` walks the whole heap (38-135 ms a call there), and the
    pages it frees fault in again at the next step, so a trim after every thread's step costs more than
    one when the holes add up. A check of the resident set costs microseconds.
    ``python -m benchmarks.trainer_memory`` measures the trainer's peak, live tensors and trims."""

    def __init__(self, margin: int = 1 << 30):
        if margin < 0:
            raise ValueError(f"margin={margin} must be at least 0")
        self.margin = margin
        self.trims = 0
        self._lock = threading.Lock()
        self._base = resident_bytes()

    def __call__(self) -> bool:
        """Return whether this call trimmed."""
        if self._base is None:
            return False
        now = resident_bytes()
        if now is None or now < self._base + self.margin or not self._lock.acquire(blocking=False):
            return False  # not grown enough, or another thread is trimming now
        try:
            release_freed_memory()
            self.trims += 1
            self._base = resident_bytes() or now
            return True
        finally:
            self._lock.release()
