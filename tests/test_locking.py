"""One writer per output directory: a second writer fails at once; a dead holder never blocks."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from workbench.errors import WorkbenchError
from workbench.locking import LOCK_FILE, OutputLockedError, holder_pid, lock_name, output_lock

ROOT = Path(__file__).resolve().parents[1]

# A writer in another process: takes the lock, says so, then waits for a line on stdin (or is killed).
_HOLDER = textwrap.dedent(
    """
    import sys
    from workbench.locking import output_lock
    with output_lock(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.readline()
    """
)


def _start_holder(directory: Path) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLDER, str(directory)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_process_is_refused_at_once_naming_the_holder(tmp_path):
    out = tmp_path / "out"
    holder = _start_holder(out)
    try:
        assert holder_pid(out) == holder.pid
        t0 = time.perf_counter()
        with pytest.raises(OutputLockedError, match=rf"another process is writing .*out \(pid {holder.pid}\); "
                                                     "wait for it or choose another --out"):
            with output_lock(out):
                pytest.fail("the lock was taken twice")
        assert time.perf_counter() - t0 < 1.0  # fails at once, does not wait
    finally:
        holder.communicate("\n", timeout=30)
    assert holder.returncode == 0
    assert not (out / LOCK_FILE).exists() and holder_pid(out) is None  # released and removed
    with output_lock(out) as path:  # free again
        assert path == out / LOCK_FILE and int(path.read_text()) == os.getpid()


def test_a_lock_file_left_by_a_killed_process_does_not_block(tmp_path):
    holder = _start_holder(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert int((tmp_path / LOCK_FILE).read_text()) == holder.pid  # the stale file is still there ...
    assert holder_pid(tmp_path) is None  # ... but nobody holds it
    with output_lock(tmp_path):
        assert int((tmp_path / LOCK_FILE).read_text()) == os.getpid()


def test_another_thread_is_refused_and_the_same_thread_may_reenter(tmp_path):
    errors = []

    def other():
        try:
            with output_lock(tmp_path):
                pass
        except OutputLockedError as exc:
            errors.append(str(exc))

    with output_lock(tmp_path):
        with output_lock(tmp_path):  # re-entrant within one thread
            pass
        assert (tmp_path / LOCK_FILE).exists()  # the inner release did not drop the outer hold
        thread = threading.Thread(target=other)
        thread.start()
        thread.join()
    assert len(errors) == 1 and f"another job of this process (pid {os.getpid()})" in errors[0]
    assert isinstance(OutputLockedError("x"), WorkbenchError)
    assert not (tmp_path / LOCK_FILE).exists()


def test_ranks_lock_their_own_files_and_a_file_is_not_a_directory(tmp_path):
    assert lock_name(0) == LOCK_FILE and lock_name(3) == ".lock.r3"
    with output_lock(tmp_path, lock_name(0)), output_lock(tmp_path, lock_name(1)):
        pass
    (tmp_path / "f").write_text("")
    with pytest.raises(WorkbenchError, match="choose another --out"):
        with output_lock(tmp_path / "f"):
            pass
