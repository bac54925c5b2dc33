"""What the browser tests share: Debian's chromium, the app served by `streamlit run app.py` on a free
localhost port, and where screenshots go (import with ``from browser_app import ...``)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
REPO = Path(__file__).resolve().parent.parent

#: a browser test module's marks: the `browser` marker, and a skip when chromium is missing
BROWSER_MARKS = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason=f"Debian's chromium is not installed ({CHROMIUM}); `make browser` installs it"),
]

#: Playwright cannot download its own browser here: Debian's chromium, as root, without a sandbox
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serve_app(home: Path, log_dir: Path, model: str = "tiny-lm") -> Iterator[str]:
    """Run the app with ``home`` as its workbench home and ``model`` selected; yield its URL once it answers."""
    port = free_port()
    env = dict(os.environ, WORKBENCH_HOME=str(home), WORKBENCH_APP_MODEL=model)
    log = (log_dir / "streamlit.log").open("w")
    proc = subprocess.Popen(
        # no --server.address / --server.headless: the checkout's .streamlit/config.toml must supply them
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.port", str(port),
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://localhost:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"{url}/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                log.flush()
                raise RuntimeError(f"streamlit did not come up: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def screenshot_dirs() -> list[Path]:
    """Where screenshots go: ``$WORKBENCH_SCREENSHOTS`` when it is set, else nowhere (a full-page screenshot
    costs the browser about 0.3 s of CPU per page, and nobody reads a test's temporary directory)."""
    extra = os.environ.get("WORKBENCH_SCREENSHOTS")
    if not extra:
        return []
    Path(extra).mkdir(parents=True, exist_ok=True)
    return [Path(extra)]
