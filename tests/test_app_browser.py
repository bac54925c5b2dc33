"""The app in a real browser: start `streamlit run app.py`, visit every page in headless Debian
chromium (driven by Playwright), change one control on each, and check that the page shows its
figure and no exception or error. Screenshots of every page go to ``$WORKBENCH_SCREENSHOTS`` when that
is set."""

from __future__ import annotations

import os
import shutil
import socket
import time
import urllib.request
from pathlib import Path

import pytest
from browser_app import BROWSER_MARKS, CHROMIUM, CHROMIUM_ARGS, screenshot_dirs, serve_app

pytestmark = BROWSER_MARKS

#: how long one page may take to show its figure after a load or an interaction (seconds; generous because
#: CI machines are shared: a page takes 2-3 s on an idle one)
PAGE_TIMEOUT_S = 60


def _quick_sae(home: Path, name: str = "tiny-lm", layer: int = 0) -> None:
    """Train a tiny SAE for model ``name`` into the home's runs directory (the SAE page needs one to browse)."""
    from unittest import mock

    from workbench import load_model
    from workbench.app import choices, compute

    with mock.patch.dict(os.environ, {"WORKBENCH_HOME": str(home)}):
        model = load_model(choices.model_source(name))
        compute.train_quick_sae(model, name, layer=layer, n_tokens=2048, d_sae=64, k=4, steps=30)


@pytest.fixture(scope="module")
def browser_home(app_home, tmp_path_factory):
    """A private copy of the shared home (the SAE trained here must not show up in other tests' pages),
    with a quick SAE for tiny-lm."""
    home = tmp_path_factory.mktemp("browser_home") / "home"
    shutil.copytree(app_home, home)
    _quick_sae(home)
    return home


@pytest.fixture(scope="module")
def app_url(browser_home, tmp_path_factory):
    """Start the app on a free localhost port with the tiny model selected; yield its URL."""
    with serve_app(browser_home, tmp_path_factory.mktemp("app_log")) as url:
        yield url


@pytest.fixture(scope="module")
def playwright():
    """The module's one Playwright driver: a second sync_playwright() while the first is open fails ("Sync
    API inside the asyncio loop"), so every browser fixture below launches from this one."""
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser_page(playwright, tmp_path_factory):
    profile = tmp_path_factory.mktemp("chromium_profile")
    # Playwright cannot download its own browser here: drive Debian's chromium, as root, without a sandbox
    context = playwright.chromium.launch_persistent_context(
        str(profile), executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
        viewport={"width": 1400, "height": 1000},
    )
    page = context.pages[0] if context.pages else context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_S * 1000)
    yield page
    context.close()


def _settle(page) -> None:
    """Wait until Streamlit has finished the current run (no running indicator, no spinner, twice in a row)."""
    busy = page.locator('[data-testid="stStatusWidget"], [data-testid="stSpinner"], '
                        '[data-testid="stApp"][data-test-script-state="running"]')
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
    if os.environ.get("WORKBENCH_SCREENSHOTS"):
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


def test_every_page_in_a_browser(app_url, browser_page):
    page = browser_page
    start = time.monotonic()
    page.goto(app_url)
    _settle(page)
    problems = []
    shots = screenshot_dirs()
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
    print(f"screenshots in {', '.join(map(str, shots)) or 'none ($WORKBENCH_SCREENSHOTS unset)'}; "
          f"{len(PAGES)} pages in {time.monotonic() - start:.1f}s")
    assert not problems, "\n".join(problems)


# --------------------------------------------------------------------- two sessions at once (issue 12, item 1)


@pytest.fixture(scope="module")
def browser(playwright):
    """One headless chromium; each test opens its own contexts (a context is a session: its own cookies, its
    own websocket to the app)."""
    b = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
    yield b
    b.close()


def _session(browser, url: str):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_S * 1000)
    page.goto(url)
    _settle(page)
    return context, page


_CHART_DATA = """() => {
  const gd = document.querySelector('[data-testid="stPlotlyChart"] .js-plotly-plot');
  if (!gd || !gd.data || !gd.data.length) return null;
  return {ids: Array.from(gd.data[0].customdata || []), p: Array.from(gd.data[0].y || [])};
}"""


def _errors(page) -> list[str]:
    out = []
    for what, selector in (("exception", '[data-testid="stException"]'),
                           ("error", '[data-testid="stAlertContentError"]')):
        found = page.locator(selector)
        if found.count():
            out.append(f"{what}: {found.first.inner_text()[:500]}")
    return out


def _quiet_distribution(home: Path, model: str, prompt: str, k: int = 20) -> tuple[list[int], list[float]]:
    """The sampling page's top-k next-token distribution, computed in-process with the library alone."""
    from unittest import mock

    import torch

    from workbench import load_model
    from workbench.app import choices

    with mock.patch.dict(os.environ, {"WORKBENCH_HOME": str(home)}):
        m = _QUIET.get(model) or _QUIET.setdefault(model, load_model(choices.model_source(model)))
    ids = m.tokenizer.encode(prompt)
    with torch.inference_mode():
        probs = m(torch.tensor([ids]))[0, -1].float().softmax(-1)
    top = probs.topk(k)
    return top.indices.tolist(), top.values.tolist()


_QUIET: dict = {}

#: how many rounds the two-session test runs (the acceptance asks for 20 passes in a row)
ROUNDS = int(os.environ.get("WORKBENCH_TWO_SESSION_ROUNDS", "20"))
#: the most reads session B makes during one of A's runs
READS_PER_ROUND = 12

_RUNNING = '[data-testid="stApp"][data-test-script-state="running"]'


@pytest.fixture(params=["tiny-lm", pytest.param("smollm2-135m", marks=[pytest.mark.slow, pytest.mark.smollm2])])
def two_session_model(request, browser_home):
    if request.param == "smollm2-135m":
        request.getfixturevalue("smollm2_home")
    return request.param


def test_two_sessions_at_once_see_only_their_own_hooks(app_url, browser_home, browser, two_session_model):
    """Session A steers generation along an SAE latent at strength 100 (a hook on the shared model's residual
    stream), 20 times; while each of A's runs goes on, session B reads the Sampling page's next-token
    distribution for one new prompt after another. Every one of B's distributions must equal a quiet
    in-process run of the same prompt (each prompt is new, so nothing computed while A's hook was attached
    can reach B through a cache either).

    On tiny-lm a decode step takes about a millisecond against ~30 ms of streaming the text to the browser,
    so A's hook is attached a few percent of the time and this run alone rarely catches a leak; on SmolLM2
    (slow) a step's forward pass is most of it: with the hooks of before (module-level), B's reads go wrong
    in the first rounds."""
    model = two_session_model
    ctx_a, a = _session(browser, f"{app_url}/sae?model={model}")
    ctx_b, b = _session(browser, f"{app_url}/sampling?model={model}")
    try:
        a.get_by_role("tab", name="Steering").click()
        _slider("Steering strength", "End")(a)  # the maximum: 100
        _settle(a)
        new_tokens = a.locator('[data-testid="stSlider"]:has-text("New tokens") input[type="range"]').first
        new_tokens.focus()
        new_tokens.press("End" if model == "tiny-lm" else "Home")  # 48 tokens on tiny-lm; SmolLM2: 1, then ...
        _settle(a)
        for _ in range(0 if model == "tiny-lm" else 7):  # ... 8 (a few seconds a round on a busy CPU)
            new_tokens.press("ArrowRight")
            _settle(a)
        assert "100" in a.locator('[data-testid="stSlider"]:has-text("Steering strength")').first.inner_text()
        generate = a.get_by_role("button", name="Generate with and without steering")
        box = b.locator('[data-testid="stTextInput"]:has-text("Prompt") input').first
        before = b.evaluate(_CHART_DATA)
        mismatches, reads, t_start = [], 0, time.monotonic()
        for i in range(ROUNDS):
            generate.click()  # A: a generation without, then with, the steering hook starts on the server
            a.wait_for_timeout(200)
            for j in range(READS_PER_ROUND):  # B: one new prompt after another while A's run goes on
                a_running = a.locator(_RUNNING).count() > 0
                prompt = f"The cat sat on the mat {i}.{j} times, and John gave a drink to"
                box.fill(prompt)
                box.press("Enter")
                deadline = time.monotonic() + PAGE_TIMEOUT_S
                shown = before
                while shown == before and time.monotonic() < deadline:
                    b.wait_for_timeout(30)
                    shown = b.evaluate(_CHART_DATA)
                _settle(b)
                shown = b.evaluate(_CHART_DATA)
                reads += 1
                ids, probs = _quiet_distribution(browser_home, model, prompt)
                if shown is None or shown["ids"] != ids or max(abs(x - y) for x, y in zip(shown["p"], probs)) > 1e-5:
                    mismatches.append((i, prompt, shown, ids, probs))
                before = shown
                if not a_running:
                    break
            _settle(a)
            problems = _errors(a) + _errors(b)
            assert not problems, f"round {i}: {problems}"
        assert a.locator("text=strength 100").count(), "session A never showed its steered generation"
        print(f"{model}: {ROUNDS} rounds of A, {reads} reads by B in {time.monotonic() - t_start:.1f}s; "
              f"mismatches: {len(mismatches)}")
        assert not mismatches, f"{len(mismatches)} of {reads} reads differ from a quiet run; first: {mismatches[0]}"
    finally:
        ctx_a.close()
        ctx_b.close()


# ------------------------------------------------------------- every page on every built-in model (issue 12)


BUILTINS = ["attn-only-1l", "attn-only-2l", "kjv-small"]

#: pages that draw their figure only after a click: url -> the button to press (a short run on these models)
FIRST_CLICK = {"probes": "Train probes"}
#: (url, model) pairs whose page has nothing to draw for that model and says so (an info box, checked)
NOTHING_TO_DRAW = {("probes", "attn-only-1l"): "no tokenizer", ("probes", "attn-only-2l"): "no tokenizer",
                   ("dynamics", "smollm2-135m"): "no training snapshots"}
#: how long a FIRST_CLICK page may take to draw after its click (SmolLM2's probes: ~130 s under a load of 40)
FIRST_CLICK_TIMEOUT_S = 300
#: pages that draw only with artefacts a model may lack: url -> what their info box names when it is missing
#: (the circuit tracing page needs a transcoder set; its own tests draw a graph)
NEEDS_ARTEFACT = {"circuits": "transcoder"}

#: every axis of every drawn chart that shows strings (tokens, layer names) must be categorical: plotly would
#: otherwise read number-like tokens ('3', '1990') as numbers and draw hairline bars or reorder them
_NON_CATEGORICAL_AXES = """() => {
  const bad = [];
  let checked = 0;
  document.querySelectorAll('[data-testid="stPlotlyChart"] .js-plotly-plot').forEach((gd, c) => {
    if (!gd._fullLayout || !gd._fullData) return;
    const title = (gd._fullLayout.title && gd._fullLayout.title.text) || `chart ${c}`;
    gd._fullData.forEach((tr, i) => {
      for (const ax of ['x', 'y']) {
        const ref = tr[ax + 'axis'];
        const vals = (gd.data[i] || {})[ax];
        if (!ref || !Array.isArray(vals) || !vals.some(v => typeof v === 'string')) continue;
        const name = ref.replace(ax, ax + 'axis');
        const type = (gd._fullLayout[name] || {}).type;
        checked += 1;
        if (type !== 'category' && type !== 'multicategory')
          bad.push(`${title}: ${name} is ${type} for ${JSON.stringify(vals.slice(0, 4))}`);
      }
    });
  });
  return {bad, checked};
}"""


def _visit_every_page(page, app_url: str, model: str, shots: list[Path]) -> tuple[list[str], dict[str, float]]:
    """Open the app on ``model`` (a fresh session: the model's defaults), visit every page of the app's
    navigation (``workbench.app.main.PAGES``) and check that it shows its heading and a drawn figure, that every
    axis showing tokens is categorical, and that there is no exception or error box. Return the problems and
    the seconds each page took to show its figure."""
    from workbench.app.main import PAGES as APP_PAGES

    problems, took, string_axes = [], {}, 0
    page.goto(f"{app_url}/?model={model}")
    _settle(page)
    for spec in APP_PAGES:
        url = spec.url
        heading = PAGES[url][1] if url in PAGES else spec.title
        t0 = time.monotonic()
        if spec is not APP_PAGES[0]:
            page.locator(f'[data-testid="stSidebarNavLink"][href$="/{url}"]').first.click()
        _settle(page)
        try:
            page.get_by_role("heading", name=heading).first.wait_for()
            info = page.locator('[data-testid="stAlertContentInfo"]')
            if (url, model) in NOTHING_TO_DRAW:
                assert NOTHING_TO_DRAW[url, model] in info.first.inner_text(), info.first.inner_text()
            elif url in NEEDS_ARTEFACT and info.filter(has_text=NEEDS_ARTEFACT[url]).count():
                pass  # says what it needs; nothing to draw on this model
            else:
                wait_s = PAGE_TIMEOUT_S
                if url in FIRST_CLICK:
                    _button(FIRST_CLICK[url])(page)
                    _settle(page)
                    wait_s = FIRST_CLICK_TIMEOUT_S
                page.locator('[data-testid="stPlotlyChart"] .js-plotly-plot').first.wait_for(
                    state="visible", timeout=wait_s * 1000)
                _drawn(page)
                axes = page.evaluate(_NON_CATEGORICAL_AXES)
                problems += [f"{model} {url}: {b}" for b in axes["bad"]]
                string_axes += axes["checked"]
        except Exception as exc:  # noqa: BLE001 - collect every page's problem, then fail once
            problems.append(f"{model} {url}: no figure ({type(exc).__name__}: {str(exc)[:120]})")
        took[url] = time.monotonic() - t0
        problems += [f"{model} {url}: {p}" for p in _errors(page)]
        for d in shots:
            page.screenshot(path=str(d / f"{model}-{url}.png"), full_page=True)
    if not string_axes:  # the axis check must have had token axes to look at, or it proves nothing
        problems.append(f"{model}: no chart axis showed strings (tokens); the categorical check saw nothing")
    return problems, took


@pytest.fixture(scope="module")
def builtin_saes(browser_home):
    """A quick SAE for each built-in model (so their SAE pages have features to draw)."""
    for name in BUILTINS:
        _quick_sae(browser_home, name, layer=0)
    return BUILTINS


@pytest.mark.parametrize("model", BUILTINS)
def test_every_page_on_each_builtin_model(model, app_url, builtin_saes, browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_S * 1000)
    try:
        problems, took = _visit_every_page(page, app_url, model, screenshot_dirs())
    finally:
        context.close()
    print(f"{model}: " + ", ".join(f"{u} {s:.1f}s" for u, s in took.items()))
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="module")
def smollm2_home(browser_home):
    """The browser home with SmolLM2's converted checkpoint linked in (from the user's home) and a quick SAE."""
    from workbench import zoo

    reason = None
    if zoo.cache_status(zoo.SMOLLM2.name).state != "ready":
        reason = f"SmolLM2 is not fetched into {zoo.cache_dir(zoo.SMOLLM2.name)}; run `workbench fetch smollm2-135m`"
    if reason:
        pytest.skip(reason)
    link = browser_home / "models" / zoo.SMOLLM2.name
    if not link.exists():
        link.symlink_to(zoo.cache_dir(zoo.SMOLLM2.name), target_is_directory=True)
    _quick_sae(browser_home, zoo.SMOLLM2.name, layer=1)
    return browser_home


@pytest.mark.slow
@pytest.mark.smollm2
def test_every_page_on_smollm2(app_url, smollm2_home, browser):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(PAGE_TIMEOUT_S * 1000)
    try:
        problems, took = _visit_every_page(page, app_url, "smollm2-135m", screenshot_dirs())
    finally:
        context.close()
    print("smollm2-135m: " + ", ".join(f"{u} {s:.1f}s" for u, s in took.items()))
    assert not problems, "\n".join(problems)
