"""Side-by-side benchmarks (``python -m benchmarks``).

They run with the allocator setting the ``workbench`` command and the app use
(:func:`workbench.allocator.retain_freed_memory`), for every contender in the process alike;
``WORKBENCH_KEEP_FREED_MEMORY=0`` measures glibc's defaults instead.
"""

import statistics
import time

from workbench.allocator import retain_freed_memory

#: whether freed memory stays in this process (printed by benchmarks whose figures depend on it)
KEEPS_FREED_MEMORY = retain_freed_memory()


def interleaved_medians(fns: dict, repeats: int, warmup: int = 1) -> dict[str, float]:
    """Return the median seconds of each function, timed in rotation."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {k: statistics.median(v) for k, v in times.items()}
