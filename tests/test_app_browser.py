"""The app in a real browser: start `streamlit run app.py`, visit every page in headless Debian
chromium (driven by Playwright), change one control on each, and check that the page shows its
figure and no exception or error. Screenshots go to the test's temporary directory, and also to
``$WORKBENCH_SCREENSHOTS`` when that is set."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

CHROMIUM = os.environ.get("WORKBENCH_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
REPO = Path(__file__).resolve().parent.parent

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(),
                       reason=f"Debian's chromium is not installed ({CHROMIUM}); `make browser` installs it"),
]

#: how long one page may take to show its figure after a load or an interaction (seconds; generous because
#: CI machines are shared: a page takes 2-3 s on an idle one)
PAGE_TIMEOUT_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _quick_sae(home: Path) -> None:
    """Train a tiny SAE for tiny-lm into the home's runs directory (the SAE page needs one to browse)."""
    from unittest import mock

    from workbench import HookedGPT
    from workbench.app import compute

    with mock.patch.dict(os.environ, {"WORKBENCH_HOME": str(home)}):
        model = HookedGPT.load(home / "models" / "tiny-lm")
        compute.train_quick_sae(model, "tiny-lm", layer=0, n_tokens=2048, d_sae=64, k=4, steps=30)


@pytest.fixture(scope="module")
def app_url(app_home, tmp_path_factory):
    """Start the app on a free localhost port with the tiny model selected; yield its URL."""
    import shutil

    # a private copy of the shared home: the SAE trained here must not show up in other tests' pages
    home = tmp_path_factory.mktemp("browser_home") / "home"
    shutil.copytree(app_home, home)
    _quick_sae(home)
    port = _free_port()
    env = dict(os.environ, WORKBENCH_HOME=str(home), WORKBENCH_APP_MODEL="tiny-lm")
    log = (tmp_path_factory.mktemp("app_log") / "streamlit.log").open("w")
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


@pytest.fixture(scope="module")
def browser_page(tmp_path_factory):
    sync_api = pytest.importorskip("playwright.sync_api")
    profile = tmp_path_factory.mktemp("chromium_profile")
    with sync_api.sync_playwright() as p:
        # Playwright cannot download its own browser here: drive Debian's chromium, as root, without a sandbox
        context = p.chromium.launch_persistent_context(
            str(profile), executable_path=CHROMIUM, headless=True,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"],
            viewport={"width": 1400, "height": 1000},
        )
        page = context.pages[0] if context.pages else context.new_page()
        page.set_default_timeout(PAGE_TIMEOUT_S * 1000)
        yield page
        context.close()


def _settle(page) -> None:
    """Wait until Streamlit has finished the current run (no running indicator, no spinner, twice in a row)."""
    busy = page.locator('[data-testid="stStatusWidget"], [data-testid="stSpinner"]')
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    quiet = 0
    page.wait_for_timeout(250)
    while quiet < 2 and time.monotonic() < deadline:
        quiet = quiet + 1 if busy.count() == 0 else 0
        page.wait_for_timeout(150)


def _drawn(page) -> None:
    """Wait until every plotly chart on the page has drawn its SVG (a rerun redraws them)."""
    pending = page.locator('[data-testid="stPlotlyChart"]:not(:has(.main-svg))')
    deadline = time.monotonic() + PAGE_TIMEOUT_S
    while pending.count() and time.monotonic() < deadline:
        page.wait_for_timeout(100)
    page.wait_for_timeout(300)  # let the last draw's transitions finish before the screenshot


def _slider(label: str, key: str = "ArrowRight"):
    def act(page):
        thumb = page.locator(f'[data-testid="stSlider"]:has-text("{label}") input[type="range"]').first
        thumb.focus()
        thumb.press(key)
    return act


def _radio(option: str):
    def act(page):
        page.locator('[data-testid="stRadio"] label').filter(has_text=option).first.click()
    return act


def _button(name: str):
    def act(page):
        page.get_by_role("button", name=name).first.click()
    return act


def _text(label: str, value: str):
    def act(page):
        box = page.locator(f'[data-testid="stTextInput"]:has-text("{label}") input').first
        box.fill(value)
        box.press("Enter")
    return act


#: page url -> (interaction, what the page must show after it)
PAGES = {
    "tokenizer": (_text("Text", "The cat sat on the mat"), "Tokenizer"),
    "embeddings": (_radio("t-SNE"), "Embeddings"),
    "positions": (_slider("Positions shown", "ArrowLeft"), "Positional encodings"),
    "sampling": (_slider("Temperature", "ArrowLeft"), "Sampling"),
    "architecture": (_radio("linear"), "Architecture"),
    "attention": (_slider("Head"), "Attention patterns"),
    "induction": (_slider("Sequence length"), "Induction heads"),
    "logit-lens": (_slider("Top tokens shown"), "Logit lens"),
    "attribution": (_radio("Heads"), "Attribution"),
    "sae": (_slider("Feature"), "SAE features"),
    "superposition": (_slider("Sparsity"), "Superposition"),
}


def _outside_address() -> str | None:
    """Return an address of this machine that is not loopback, or None when it has none."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            ip = s.getsockname()[0]
        except OSError:
            return None
    return None if ip.startswith("127.") or ip == "0.0.0.0" else ip


def test_the_app_listens_on_localhost_only(app_url):
    port = int(app_url.rsplit(":", 1)[1])
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/_stcore/health", timeout=5) as r:
        assert r.read().strip() == b"ok"
    ip = _outside_address()
    if ip is None:
        pytest.skip("this machine has no non-loopback address to probe")
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex((ip, port)) != 0, f"the app answers on {ip}:{port}; it must bind to localhost only"


def _screenshot_dirs(tmp_path: Path) -> list[Path]:
    dirs = [tmp_path]
    extra = os.environ.get("WORKBENCH_SCREENSHOTS")
    if extra:
        Path(extra).mkdir(parents=True, exist_ok=True)
        dirs.append(Path(extra))
    return dirs


def test_every_page_in_a_browser(app_url, browser_page, tmp_path):
    page = browser_page
    start = time.monotonic()
    page.goto(app_url)
    _settle(page)
    problems = []
    shots = _screenshot_dirs(tmp_path)
    only = [u for u in os.environ.get("WORKBENCH_BROWSER_PAGES", "").split(",") if u]  # for debugging one page
    for url, (interact, heading) in PAGES.items():
        if only and url not in only:
            continue
        t0 = time.monotonic()
        if url != "tokenizer":  # the first page is the default, already open at the root URL
            page.locator(f'[data-testid="stSidebarNavLink"][href$="/{url}"]').first.click()
        _settle(page)
        page.get_by_role("heading", name=heading).first.wait_for()
        page.locator('[data-testid="stPlotlyChart"]').first.wait_for(state="visible")
        try:
            interact(page)
        except Exception as exc:  # noqa: BLE001 - collect every page's problem, then fail once
            problems.append(f"{url}: could not use its control ({type(exc).__name__}: {str(exc)[:200]})")
        _settle(page)
        chart = page.locator('[data-testid="stPlotlyChart"] .js-plotly-plot').first
        try:
            chart.wait_for(state="visible")
            _drawn(page)
        except Exception:  # noqa: BLE001
            problems.append(f"{url}: no plotly figure after using its control")
        for d in shots:
            page.screenshot(path=str(d / f"{url}.png"), full_page=True)
        for what, selector in (("exception", '[data-testid="stException"]'),
                               ("error", '[data-testid="stAlertContentError"]')):
            found = page.locator(selector)
            if found.count():
                problems.append(f"{url}: {what}: {found.first.inner_text()[:500]}")
        print(f"{url}: {time.monotonic() - t0:.1f}s")
    print(f"screenshots in {', '.join(map(str, shots))}; {len(PAGES)} pages in {time.monotonic() - start:.1f}s")
    assert not problems, "\n".join(problems)
