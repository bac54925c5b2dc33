"""The teaching and training-dynamics pages in a real browser: `streamlit run app.py`, headless Debian
chromium (Playwright), each page visited by its URL, one control used, a plotly figure and no exception
or error afterwards. The dynamics page, and the embeddings and attention pages' "Across training" sections,
run on attn-only-2l (its snapshots ship in data/models) and their step slider is moved across the phase
change. Screenshots go to ``$WORKBENCH_SCREENSHOTS`` when that is set."""

from __future__ import annotations

import time

import pytest
from browser_app import BROWSER_MARKS, CHROMIUM, CHROMIUM_ARGS, screenshot_dirs, serve_app

TIMEOUT_S = 90

pytestmark = BROWSER_MARKS


@pytest.fixture(scope="module")
def teaching_url(app_home, tmp_path_factory):
    """Start the app (tiny-lm selected) on a free localhost port; yield its URL."""
    with serve_app(app_home, tmp_path_factory.mktemp("teaching_app_log")) as url:
        yield url


@pytest.fixture(scope="module")
def page():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1400})
        pg.set_default_timeout(TIMEOUT_S * 1000)
        yield pg
        browser.close()


def _settle(pg) -> None:
    """Wait until the current run is over (no running indicator, spinner or progress bar, three times in a row)."""
    busy = pg.locator('[data-testid="stStatusWidget"], [data-testid="stSpinner"], [data-testid="stProgress"]')
    deadline, quiet = time.monotonic() + TIMEOUT_S, 0
    pg.wait_for_timeout(300)
    while quiet < 3 and time.monotonic() < deadline:
        quiet = quiet + 1 if busy.count() == 0 else 0
        pg.wait_for_timeout(200)
    pending = pg.locator('[data-testid="stPlotlyChart"]:not(:has(.main-svg))')
    while pending.count() and time.monotonic() < deadline:
        pg.wait_for_timeout(100)
    pg.wait_for_timeout(300)


def _slider(label: str, key: str = "ArrowRight", times: int = 1):
    def act(pg):
        thumb = pg.locator(f'[data-testid="stSlider"]:has-text("{label}") input[type="range"]').first
        thumb.focus()
        for _ in range(times):
            thumb.press(key)
    return act


def _text(label: str, value: str):
    def act(pg):
        box = pg.locator(f'[data-testid="stTextInput"]:has-text("{label}") input').first
        box.fill(value)
        box.press("Enter")
    return act


#: path (with query) -> (heading, interaction, text the page must show afterwards)
PAGES = {
    "bpe": ("BPE step by step", _slider("After merge", "ArrowLeft", 5), "Same segmentation as the"),
    "attention-scratch": ("Attention from scratch", _slider("Head"), "reproduces the model's attention pattern"),
    "orthogonal": ("Nearly orthogonal directions", _slider("Random vectors", "ArrowLeft"), "pairs per dimension"),
    "kv-cache": ("KV cache", _slider("Decoding step", "ArrowRight", 3), "Step 3: the model is fed"),
    "architecture-live": ("Architecture, live", _text("Prompt", "The cat sat on the mat"), "parameters in block 0"),
    # from step 2500, twenty snapshots back is step 500: just after the phase change
    "dynamics?model=attn-only-2l": ("Training dynamics", _slider("Training step", "ArrowLeft", 20),
                                    "Layer 1, head 0 at step 500"),
    # the same slider where each view lives: the embeddings and attention pages' "Across training" sections
    "embeddings?model=attn-only-2l": ("Embeddings", _slider("Training step", "ArrowLeft", 20),
                                      "Token embeddings at step 500"),
    "attention?model=attn-only-2l": ("Attention patterns", _slider("Training step", "ArrowLeft", 20),
                                     "Induction score of every head at step 500"),
}


def test_teaching_pages_in_a_browser(teaching_url, page):
    from workbench.app import choices

    shots = screenshot_dirs()
    problems = []
    for path, (heading, interact, expected) in PAGES.items():
        toy = choices.model_dir("attn-only-2l")
        if "attn-only-2l" in path and (toy is None or not (toy / "snapshots").is_dir()):
            continue  # the built-in model and its snapshots have not landed in data/models
        page.goto(f"{teaching_url}/{path}")
        page.get_by_role("heading", name=heading).first.wait_for()
        _settle(page)
        page.locator('[data-testid="stPlotlyChart"] .main-svg').first.wait_for()
        try:
            interact(page)
        except Exception as exc:  # noqa: BLE001 - collect every page's problem, then fail once
            problems.append(f"{path}: could not use its control ({type(exc).__name__}: {str(exc)[:200]})")
        _settle(page)
        try:  # on a loaded machine the rerun may still be drawing after _settle's quiet spell: wait for the text
            page.get_by_text(expected).first.wait_for(timeout=TIMEOUT_S * 1000)
        except Exception:  # noqa: BLE001 - reported below with the page's name
            pass
        name = path.split("?")[0]
        for d in shots:
            page.screenshot(path=str(d / f"teaching-{name}.png"), full_page=True)
        if not page.get_by_text(expected).count():
            problems.append(f"{path}: does not show {expected!r} after using its control")
        if not page.locator('[data-testid="stPlotlyChart"] .main-svg').count():
            problems.append(f"{path}: no plotly figure after using its control")
        for what, selector in (("exception", '[data-testid="stException"]'),
                               ("error", '[data-testid="stAlertContentError"]')):
            found = page.locator(selector)
            if found.count():
                problems.append(f"{path}: {what}: {found.first.inner_text()[:500]}")
    assert not problems, "\n".join(problems)
