"""workbench.allocator: freed memory stays in the process, so a second large allocation does not page-fault."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from workbench.allocator import retain_freed_memory

# A fresh interpreter (pytest's own may already have the setting: in-process CLI tests apply it).
# Round 1 maps 256 MB and touches it; round 2 does the same after free(). Minor faults of round 2:
# about 65,000 (one per 4 KiB page) when glibc gave the block back, about 0 when it kept it.
PROBE = r"""
import ctypes, json, resource, sys
from workbench.allocator import retain_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
N = 256 << 20

def second_round_faults():
    for round in (1, 2):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        p = libc.malloc(N)
        ctypes.memset(p, 1, N)
        libc.free(p)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

default = second_round_faults()
kept = retain_freed_memory()
print(json.dumps({"default": default, "kept": kept, "after": second_round_faults()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_a_freed_block_is_reused_without_page_faults():
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, check=True, timeout=60)
    r = json.loads(out.stdout)
    pages = (256 << 20) // 4096
    assert r["default"] > pages // 2, r  # glibc's default: the block went back to the kernel
    assert r["kept"] is True
    assert r["after"] < pages // 100, r  # kept: the second block reuses the first one's pages


def test_turned_off_by_environment(monkeypatch):
    monkeypatch.setenv("WORKBENCH_KEEP_FREED_MEMORY", "0")
    assert retain_freed_memory() is False


@pytest.mark.parametrize("kwargs", [dict(mmap_threshold=0), dict(trim_threshold=1 << 31)])
def test_thresholds_must_fit_a_c_int(kwargs):
    with pytest.raises(ValueError, match="positive C int"):
        retain_freed_memory(**kwargs)


RELEASE_PROBE = r"""
import ctypes, json
from workbench.allocator import release_freed_memory, retain_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
resident = lambda: int(open("/proc/self/statm").read().split()[1]) * 4096 >> 20  # MiB
N = 256 << 20
kept = retain_freed_memory()
p = libc.malloc(N)
ctypes.memset(p, 1, N)
libc.free(p)
before = resident()
print(json.dumps({"kept": kept, "released": release_freed_memory(), "before": before, "after": resident()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_release_gives_the_kept_memory_back():
    out = subprocess.run([sys.executable, "-c", RELEASE_PROBE], capture_output=True, text=True, check=True, timeout=60)
    r = json.loads(out.stdout)
    assert r["kept"] is True and r["released"] is True, r
    assert r["before"] - r["after"] > 200, r  # the freed 256 MB block left the resident set


# Eight threads stay alive (as a transcoder trainer's one thread per layer does); one at a time, each
# allocates, touches and frees 36 MB. With an arena per thread every arena keeps its 36 MB (about 288 MB
# grown); with one arena each thread reuses what the one before freed (about 36 MB).
ARENA_PROBE = r"""
import ctypes, json, sys, threading
from workbench.allocator import limit_arenas, resident_bytes as rss, retain_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
retain_freed_memory()
limited = limit_arenas(1) if sys.argv[1] == "1" else None
N, BLOCKS, THREADS = 12 << 20, 3, 8

turns = [threading.Event() for _ in range(THREADS + 1)]
done = threading.Barrier(THREADS + 1)

def work(i):
    turns[i].wait()
    blocks = [libc.malloc(N) for _ in range(BLOCKS)]
    for p in blocks:
        ctypes.memset(p, 1, N)
    for p in blocks:
        libc.free(p)
    turns[i + 1].set()
    done.wait()  # alive until every thread has had its turn, as a trainer's threads are

threads = [threading.Thread(target=work, args=(i,)) for i in range(THREADS)]
for t in threads:
    t.start()
before = rss()
turns[0].set()
turns[THREADS].wait()
grown = rss() - before
done.wait()
print(json.dumps({"limited": limited, "grown_mb": grown / 2**20}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_one_arena_lets_threads_reuse_each_others_freed_memory():
    grown = {}
    for limit in ("0", "1"):
        out = subprocess.run([sys.executable, "-c", ARENA_PROBE, limit], capture_output=True, text=True, check=True,
                             timeout=60)
        r = json.loads(out.stdout)
        grown[limit] = r["grown_mb"]
        assert r["limited"] is (True if limit == "1" else None), r
    assert grown["0"] > 200 and grown["1"] < 100, grown


def test_limit_arenas_refuses_zero():
    from workbench.allocator import limit_arenas

    with pytest.raises(ValueError, match="at least 1"):
        limit_arenas(0)


GROWTH_PROBE = r"""
import ctypes, json
from workbench.allocator import GrowthTrimmer, resident_bytes, retain_freed_memory
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
retain_freed_memory()
MiB = 1 << 20
trim = GrowthTrimmer(margin=128 * MiB)

def kept_block(n):  # touched and freed: it stays resident in the heap until a trim
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(p)

start = resident_bytes()
kept_block(64 * MiB)
small = {"trimmed": trim(), "grown": (resident_bytes() - start) // MiB}
kept_block(256 * MiB)
grown = (resident_bytes() - start) // MiB
big = {"trimmed": trim(), "grown": grown, "after": (resident_bytes() - start) // MiB}
print(json.dumps({"small": small, "big": big, "trims": trim.trims, "again": trim()}))
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_growth_trimmer_trims_only_past_its_margin():
    """Under the margin a call leaves the kept memory alone (no heap walk); past it, one call gives it
    back and the next starts from the new, smaller resident set."""
    out = subprocess.run([sys.executable, "-c", GROWTH_PROBE], capture_output=True, text=True, check=True, timeout=60)
    r = json.loads(out.stdout)
    assert r["small"]["trimmed"] is False and r["small"]["grown"] >= 60, r  # 64 MiB kept, under the 128 MiB margin
    assert r["big"]["trimmed"] is True and r["big"]["grown"] >= 250, r
    assert r["big"]["after"] < 32, r  # both blocks went back
    assert r["trims"] == 1 and r["again"] is False, r


def test_growth_trimmer_refuses_a_negative_margin():
    from workbench.allocator import GrowthTrimmer
    with pytest.raises(ValueError, match="margin"):
        GrowthTrimmer(margin=-1)
