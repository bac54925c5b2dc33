"""Each page of the app, run headless with Streamlit's AppTest on a tiny model; checks what it shows."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

TIMEOUT = 60


def _script(url: str) -> None:
    from workbench.app.main import render_page

    render_page(url)


@pytest.fixture
def app_env(app_home, monkeypatch):
    monkeypatch.setenv("WORKBENCH_HOME", str(app_home))
    monkeypatch.setenv("WORKBENCH_APP_MODEL", "tiny-lm")
    return app_home


def run_page(url: str) -> AppTest:
    at = AppTest.from_function(_script, args=(url,), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def figures(at: AppTest) -> list[dict]:
    """Return the plotly figures on the page as JSON specs."""
    return [json.loads(el.proto.spec) for el in at.get("plotly_chart")]


def arr(value):
    """Return a plotly data array as nested lists (plotly ships numeric arrays base64-encoded)."""
    import base64

    import numpy as np

    if isinstance(value, dict) and "bdata" in value:
        a = np.frombuffer(base64.b64decode(value["bdata"]), dtype=value["dtype"])
        if "shape" in value:
            shape = value["shape"]
            a = a.reshape([int(x) for x in shape.split(",")] if isinstance(shape, str) else shape)
        return a.tolist()
    return value


def titles(at: AppTest) -> list[str]:
    out = []
    for fig in figures(at):
        title = fig.get("layout", {}).get("title", {})
        out.append(title.get("text", "") if isinstance(title, dict) else str(title))
    return out


def markdown(at: AppTest) -> str:
    return "\n".join(m.value for m in at.markdown)


# ---------------------------------------------------------------------------------------------- shell


def test_sidebar_lists_the_model_and_shows_its_card(app_env):
    at = run_page("tokenizer")
    assert at.sidebar.selectbox(key="wb_model").value == "tiny-lm"
    assert "tiny-lm" in at.sidebar.selectbox(key="wb_model").options
    assert at.sidebar.selectbox(key="wb_device").value == "cpu"
    assert any("2 layers" in c.value for c in at.sidebar.caption)


def test_missing_default_model_says_what_to_run(app_env, monkeypatch):
    monkeypatch.delenv("WORKBENCH_APP_MODEL")
    pytest.importorskip("workbench.zoo")
    at = run_page("attention")
    shown = " ".join(w.value for w in at.warning) + " ".join(c.value for c in at.code)
    assert "workbench fetch smollm2-135m" in shown
    assert not figures(at)


def test_model_paths_cannot_escape_the_model_directory(app_env):
    from workbench.app import choices
    from workbench.errors import InputError

    assert choices.resolve_local("tiny-lm") == (app_env / "models" / "tiny-lm").resolve()
    for bad in ("../", "../../etc", "/etc", "tiny-lm/../../x", "~/x"):
        with pytest.raises(InputError):
            choices.resolve_local(bad)
    at = AppTest.from_function(_script, args=("tokenizer",), default_timeout=TIMEOUT)
    at.query_params["model"] = "../../etc"
    at.run()
    assert not at.exception
    assert any("outside the model directory" in e.value or "relative" in e.value for e in at.error)
    assert not figures(at)


def test_long_prompts_are_cut_with_a_message(app_env):
    from workbench.app.choices import MAX_PROMPT_TOKENS

    at = run_page("tokenizer")
    at.text_input(key="tok_prompt").set_value("one two three " * 40).run()
    assert not at.exception
    assert any("only the first" in w.value for w in at.warning)
    n_shown = [m for m in at.metric if m.label == "tokens"][0].value
    assert int(n_shown) == min(MAX_PROMPT_TOKENS, 64)  # the tiny model's context is 64


def test_model_key_names_device_and_dtype():
    from workbench.app.choices import ModelKey

    key = ModelKey("tiny-lm", "cpu", "bfloat16")
    assert str(key) == "tiny-lm|cpu|bfloat16"
    assert ModelKey.parse(str(key)) == key


# ---------------------------------------------------------------------------------------------- pages


def test_tokenizer_page(app_env):
    at = run_page("tokenizer")
    at.text_input(key="tok_prompt").set_value("The cat sat").run()
    from workbench import HookedGPT

    model = HookedGPT.load(app_env / "models" / "tiny-lm")
    ids = model.tokenizer.encode("The cat sat")
    assert int([m for m in at.metric if m.label == "tokens"][0].value) == len(ids)
    html = " ".join(h.proto.body for h in at.get("markdown"))
    assert all(f">{i}<" in html for i in ids)
    assert arr(json.loads(at.get("plotly_chart")[0].proto.spec)["data"][0]["y"]) == ids


def test_embeddings_page(app_env):
    at = run_page("embeddings")
    assert len(figures(at)) == 2  # neighbours, projection
    assert "Nearest tokens" in titles(at)
    at.radio(key="emb_method").set_value("tsne").run()
    assert not at.exception
    assert any("TSNE" in t for t in titles(at))
    scatter = [f for f in figures(at) if "TSNE" in str(f["layout"]["title"])][0]
    assert len(arr(scatter["data"][0]["x"])) >= 3


def test_positional_page(app_env):
    at = run_page("positions")
    t = titles(at)
    assert any("Learned W_pos" in x for x in t) and any("Sinusoidal" in x for x in t)
    at.slider(key="pos_n").set_value(16).run()
    heat = [f for f in figures(at) if "Learned W_pos" in str(f["layout"]["title"])][0]
    assert len(arr(heat["data"][0]["z"])) == 16


def test_sampling_page(app_env):
    at = run_page("sampling")
    fig = figures(at)[0]
    raw = arr(fig["data"][0]["y"])
    assert raw[0] >= raw[-1]
    at.slider(key="samp_t").set_value(0.0).run()  # greedy: all mass on the top token
    fig = figures(at)[0]
    assert arr(fig["data"][1]["y"])[0] == pytest.approx(1.0)
    at.slider(key="samp_new").set_value(5)
    at.button(key="samp_go").click().run()
    assert not at.exception
    assert "**" in markdown(at)


def test_architecture_page(app_env):
    at = run_page("architecture")
    t = titles(at)
    assert any("Architecture of tiny-lm" in x for x in t)
    params = [f for f in figures(at) if "Parameters" in str(f["layout"]["title"])][0]
    assert {d["name"] for d in params["data"]} == {"tiny-lm", "GPT-2 small", "GPT-3 175B"}
    at.multiselect(key="arch_compare").set_value([]).run()
    params = [f for f in figures(at) if "Parameters" in str(f["layout"]["title"])][0]
    assert {d["name"] for d in params["data"]} == {"tiny-lm"}


def test_attention_page(app_env):
    at = run_page("attention")
    t = titles(at)
    assert "Layer 0, head 0" in t
    one = figures(at)[0]
    z = arr(one["data"][0]["z"])
    assert all(abs(sum(row) - 1) < 1e-4 for row in z)  # each query's attention sums to 1
    assert all(z[i][j] == 0 for i in range(len(z)) for j in range(i + 1, len(z)))  # causal
    at.slider(key="attn_layer").set_value(1)
    at.slider(key="attn_head").set_value(3).run()
    assert "Layer 1, head 3" in titles(at)
    assert any("All heads" in x for x in titles(at))
