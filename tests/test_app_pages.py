"""Each page of the app, run headless with Streamlit's AppTest on a tiny model; checks what it shows."""

from __future__ import annotations

import base64
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench import HookedGPT, paths
from workbench.analysis import eap as E
from workbench.analysis import tasks as T
from workbench.analysis.induction import default_spec, repeat_losses, repeated_random_tokens, score_heads
from workbench.analysis.logit_lens import TunedLens
from workbench.errors import InputError
from workbench.generate import StreamEvent
from workbench.store import open_store
from workbench.zoo import load_model

pytest.importorskip("streamlit")
# the app's modules import streamlit
from streamlit.proto.Metric_pb2 import Metric  # noqa: E402
from streamlit.testing.v1 import AppTest  # noqa: E402

from workbench.app import cached, choices, compute  # noqa: E402
from workbench.app.choices import MAX_PROMPT_TOKENS, ModelKey  # noqa: E402
from workbench.app.figures import show_token  # noqa: E402

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


def run_until(at: AppTest, done, timeout: float = TIMEOUT) -> None:
    """Rerun the page until ``done()`` (a background job has finished and its result is drawn)."""
    deadline = time.monotonic() + timeout
    while not done() and not at.exception and time.monotonic() < deadline:
        time.sleep(0.3)
        at.run()


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
    at = run_page("tokenizer")
    at.text_input(key="tok_prompt").set_value("one two three " * 40).run()
    assert not at.exception
    assert any("only the first" in w.value for w in at.warning)
    n_shown = [m for m in at.metric if m.label == "tokens"][0].value
    assert int(n_shown) == min(MAX_PROMPT_TOKENS, 64)  # the tiny model's context is 64


def test_model_key_names_device_and_dtype():
    key = ModelKey("tiny-lm", "cpu", "bfloat16")
    assert str(key) == "tiny-lm|cpu|bfloat16"
    assert ModelKey.parse(str(key)) == key


# ---------------------------------------------------------------------------------------------- pages


def test_tokenizer_page(app_env):
    at = run_page("tokenizer")
    at.text_input(key="tok_prompt").set_value("The cat sat").run()
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
    assert '<b>' in markdown(at)  # the prompt in bold, the continuation as plain text (not markdown)


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
    scores = fig_titled(at, "Head-type scores on this prompt")
    assert len(scores["data"]) == 4  # previous token, duplicate token, induction, first token


@pytest.fixture
def model_passes(monkeypatch):
    """Count forward passes of any HookedGPT (every pass embeds its tokens exactly once)."""
    calls = {"n": 0}
    embed = HookedGPT.embed_tokens

    def counting(self, *args, **kwargs):
        calls["n"] += 1
        return embed(self, *args, **kwargs)

    monkeypatch.setattr(HookedGPT, "embed_tokens", counting)
    return calls


def metric(at: AppTest, label: str) -> str:
    return [m for m in at.metric if m.label == label][0].value


def fig_titled(at: AppTest, part: str) -> dict:
    found = [f for f, t in zip(figures(at), titles(at)) if part in t]
    assert found, f"no figure titled *{part}* among {titles(at)}"
    return found[0]


def test_switching_layer_or_head_does_not_rerun_the_model(app_env, model_passes):
    at = run_page("attention")
    at.text_input(key="attn_prompt").set_value("The cat sat on the mat and the cat sat").run()
    before = model_passes["n"]
    at.slider(key="attn_layer").set_value(1).run()
    at.slider(key="attn_head").set_value(2).run()
    assert not at.exception
    assert "Layer 1, head 2" in titles(at)
    assert model_passes["n"] == before


def test_induction_page(app_env):
    at = AppTest.from_function(_script, args=("induction",), default_timeout=TIMEOUT)
    at.session_state["ind_len"] = 10
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    model = HookedGPT.load(app_env / "models" / "tiny-lm")
    seq = repeated_random_tokens(default_spec(model, seq_len=10, batch=8), model.cfg.d_vocab)
    want = score_heads(model, seq.tokens)
    heat = fig_titled(at, "Head scores")
    np.testing.assert_allclose(arr(heat["data"][0]["z"]), want.induction.numpy(), atol=1e-5)
    assert float(metric(at, "loss, first copy")) == pytest.approx(repeat_losses(want.loss, seq).first, abs=1e-3)
    loss = fig_titled(at, "Loss by position")
    assert len(arr(loss["data"][0]["y"])) == 2 * 10  # BOS + 2L tokens: 2L predictions
    assert any("no training snapshots" in i.value for i in at.info)


def test_induction_page_shows_training_dynamics_across_snapshots(app_env, monkeypatch):
    src = app_env / "models" / "tiny-lm"
    run = app_env / "models" / "tiny-snapshots"
    if not run.exists():
        shutil.copytree(src, run)
        for step, seed in ((0, 1), (50, 2), (100, 3)):
            m = HookedGPT.load(src)
            m.init_weights(seed)
            m.save(run / "snapshots" / f"step_{step:06d}")
        # ends in half a record, as a job killed mid-write leaves it: the page reads the complete ones
        records = [{"step": s, "loss": 5 - s / 50, "loss_repeat": 4 - s / 40} for s in (25, 50, 75, 100)]
        (run / "metrics.jsonl").write_text("\n".join(map(json.dumps, records)) + '\n{"step": 125, "lo')
    monkeypatch.setenv("WORKBENCH_APP_MODEL", "tiny-snapshots")
    at = AppTest.from_function(_script, args=("induction",), default_timeout=TIMEOUT)
    at.session_state["ind_len"] = 6
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    dyn = fig_titled(at, "Training dynamics")
    steps = [d for d in dyn["data"] if d["name"] == "loss, repeat"][0]["x"]
    assert arr(steps) == [0, 50, 100]
    n_layers = 2
    assert sum(d["name"].startswith("induction, layer") for d in dyn["data"]) == n_layers
    log = fig_titled(at, "Training log")
    assert {d["name"] for d in log["data"]} == {"loss_repeat", "loss"}
    loss = [d for d in log["data"] if d["name"] == "loss"][0]
    assert arr(loss["x"]) == [25, 50, 75, 100] and arr(loss["y"]) == pytest.approx([4.5, 4, 3.5, 3])


def test_induction_page_on_attn_only_2l(app_env, monkeypatch):
    if "attn-only-2l" not in choices.zoo_names():
        pytest.skip("the built-in attn-only-2l has not landed in data/models yet")
    monkeypatch.setenv("WORKBENCH_APP_MODEL", "attn-only-2l")
    at = AppTest.from_function(_script, args=("induction",), default_timeout=TIMEOUT)
    at.session_state["ind_len"] = 12
    at.session_state["ind_batch"] = 4
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    best = metric(at, "best induction head")
    assert best.startswith("L1"), best  # the induction head sits in the second layer
    assert float(metric(at, "loss, second copy")) < 0.5 * float(metric(at, "loss, first copy"))
    if any(True for _ in (choices.model_dir("attn-only-2l") / "snapshots").glob("step_*")):
        dyn = fig_titled(at, "Training dynamics")
        first = arr([d for d in dyn["data"] if d["name"] == "loss, first copy"][0]["y"])
        repeat = arr([d for d in dyn["data"] if d["name"] == "loss, repeat"][0]["y"])
        assert repeat[0] > 0.8 * first[0] and repeat[-1] < 0.5 * first[-1]  # the repeat becomes predictable
        assert any("phase change" in c.value for c in at.caption)


def test_logit_lens_page(app_env, model_passes):
    at = run_page("logit-lens")
    text = "The cat sat on the mat"
    at.text_input(key="lens_prompt").set_value(text).run()
    model = HookedGPT.load(app_env / "models" / "tiny-lm")
    ids = model.tokenizer.encode(text)
    grid = fig_titled(at, "Logit lens")
    z = arr(grid["data"][0]["z"])
    assert len(z) == model.cfg.n_layers + 1 and len(z[0]) == len(ids)
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0]
    probs = logits.softmax(-1)
    # the last row is the model's own output: each cell's value is the next token's probability
    want = [float(probs[p, ids[p + 1]]) for p in range(len(ids) - 1)]
    assert z[-1][:-1] == pytest.approx(want, abs=1e-4)
    top_text = grid["data"][0]["text"][-1]
    assert top_text == [show_token(model.tokenizer.decode([int(i)])) for i in logits.argmax(-1)]
    before = model_passes["n"]
    at.slider(key="lens_pos").set_value(1).run()
    at.slider(key="lens_k").set_value(3).run()
    assert model_passes["n"] == before  # position and k only slice the cached run
    rank = fig_titled(at, "across layers")
    assert len(arr(rank["data"][0]["y"])) == model.cfg.n_layers + 1
    assert list(at.dataframe[-1].value.columns) == ["layer", "#1", "#2", "#3"]
    at.text_input(key="lens_target").set_value(" Mary").run()
    assert not at.exception and not at.error, [e.value for e in at.error]
    assert "Mary" in str(fig_titled(at, "across layers")["layout"]["title"])
    at.text_input(key="lens_target").set_value(" Mary and John").run()
    assert any("not one" in e.value for e in at.error)  # an answer must be one token


def test_logit_lens_page_offers_a_saved_tuned_lens(app_env):
    model = HookedGPT.load(app_env / "models" / "tiny-lm")
    lens_dir = paths.runs_dir() / "lens-tiny-lm"
    TunedLens.for_model(model).save(lens_dir)  # the identity: the tuned lens must equal the logit lens
    at = run_page("logit-lens")
    logit_z = arr(fig_titled(at, "Logit lens")["data"][0]["z"])
    options = at.radio(key="lens_kind").options
    assert len(options) == 2 and "tuned lens" in options[1]
    at.radio(key="lens_kind").set_value(str(lens_dir)).run()
    assert not at.exception, [e.value for e in at.exception]
    np.testing.assert_allclose(arr(fig_titled(at, "Tuned lens")["data"][0]["z"]), logit_z, atol=1e-5)


def test_attribution_page(app_env):
    at = run_page("attribution")
    total = float(metric(at, "model's logit difference"))
    parts = float(metric(at, "sum of the parts")) + float(metric(at, "constant (final norm bias, b_U)"))
    assert parts == pytest.approx(total, abs=2e-3)
    bars = fig_titled(at, "by layer")
    assert arr(bars["data"][0]["x"]) == ["embed", "pos_embed", "0_attn_out", "0_mlp_out", "1_attn_out", "1_mlp_out"]
    # the prompts differ in one token: patching the clean residual there into block 0 restores everything
    patch = fig_titled(at, "patching the clean residual stream")
    z = arr(patch["data"][0]["z"])
    x = arr(patch["data"][0]["x"])
    differ = [i for i, label in enumerate(x) if "John" in label and i > 10]
    assert len(differ) == 1
    assert z[0][differ[0]] == pytest.approx(1.0, abs=1e-4)
    assert all(abs(v) < 1e-4 for i, v in enumerate(z[0]) if i != differ[0])
    at.radio(key="attr_granularity").set_value("Heads").run()
    heads = fig_titled(at, "each head")
    assert len(arr(heads["data"][0]["z"])) == 2 and len(arr(heads["data"][0]["z"])[0]) == 4
    at.selectbox(key="attr_patch").set_value("z").run()
    assert not at.exception
    assert len(arr(fig_titled(at, "head output")["data"][0]["z"])[0]) == 4
    at.text_input(key="attr_corrupt").set_value("Mary gave").run()
    assert any("same length" in w.value for w in at.warning)



def test_attribution_page_circuit_view(app_env, monkeypatch):
    """The circuit view on kjv-small's generated IOI set: EAP-IG after the click, the faithfulness and metrics
    equal to the library's, one drawn line per kept edge, and the edge count follows the widget."""
    monkeypatch.setenv("WORKBENCH_APP_MODEL", "kjv-small")
    at = run_page("attribution")
    assert not [t for t in titles(at) if t.startswith("Circuit")]  # nothing runs before the click
    at.selectbox(key="attr_circuit_task").set_value("ioi").run()
    at.number_input(key="attr_circuit_prompts").set_value(4)
    at.number_input(key="attr_circuit_steps").set_value(2)
    at.number_input(key="attr_circuit_edges").set_value(30).run()
    at.button(key="attr_circuit_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    model = load_model("kjv-small").eval().requires_grad_(False)
    task = T.ioi_task(model, n=4)
    with torch.no_grad():
        want = E.find_circuit(model, task.clean, task.corrupt, task.metric, 30, E.EAPConfig(steps=2)).faithfulness
    assert float(metric(at, "faithfulness")) == pytest.approx(want.faithfulness, abs=2e-3)
    assert float(metric(at, "logit difference: clean")) == pytest.approx(want.clean, abs=2e-3)
    assert float(metric(at, "logit difference: corrupted")) == pytest.approx(want.corrupt, abs=2e-3)
    assert float(metric(at, "logit difference: circuit")) == pytest.approx(want.circuit, abs=2e-3)
    fig = fig_titled(at, "Circuit of the top 30 edges")
    assert sum(1 for trace in fig["data"] if trace.get("mode") == "lines") == 30
    # fewer edges: the cached scores are reused, the circuit and its faithfulness follow
    at.number_input(key="attr_circuit_edges").set_value(5).run()
    assert not at.exception, [e.value for e in at.exception]
    assert sum(1 for trace in fig_titled(at, "Circuit of the top 5 edges")["data"] if trace.get("mode") == "lines") == 5
    # the page's own prompt pair works too (on any model): a new search waits for its click
    at.selectbox(key="attr_circuit_task").set_value("pair").run()
    assert not [t for t in titles(at) if t.startswith("Circuit")]
    at.button(key="attr_circuit_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert fig_titled(at, "Circuit of the top 5 edges")


def test_sae_page_trains_browses_lists_and_steers(app_env):
    at = run_page("sae")
    assert any("No SAE for tiny-lm" in i.value for i in at.info)
    for key, value in (("sae_tokens", 2048), ("sae_steps", 40), ("sae_dsae", 64), ("sae_k", 4), ("sae_layer", 1)):
        at.number_input(key=key).set_value(value)
    at.button(key="sae_train").click().run()
    run_until(at, lambda: any("Saved to" in s.value for s in at.success))  # a background job now (issue 12)
    assert not at.exception, [e.value for e in at.exception]
    assert any("Saved to" in s.value for s in at.success)
    assert "sae-app-tiny-lm-L1-64x4" in at.sidebar.selectbox(key="sae_pick").value
    live = metric(at, "live latents")
    assert live.endswith("of 64")
    for part in ("Feature density", "Activations of latent", "Logit effects", "Active latents per token"):
        fig_titled(at, part)
    html = " ".join(m.proto.body for m in at.get("markdown"))
    assert "rgba(255,120,0" in html  # highlighted top-activating contexts
    table = at.dataframe[-1].value
    assert list(table.columns) == ["pos", "token", "active", "strongest latents"]
    assert (table["active"] == 4).all()  # a TopK SAE with k=4: exactly 4 latents on every token
    at.slider(key="sae_feature").set_value(5).run()
    assert not at.exception
    assert "latent 5" in str(fig_titled(at, "Logit effects")["layout"]["title"])
    at.slider(key="steer_strength").set_value(100.0)
    at.slider(key="steer_new").set_value(6)
    at.button(key="steer_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.session_state["steer_out_on"] != at.session_state["steer_out_off"]


def test_superposition_page(app_env):
    at = AppTest.from_function(_script, args=("superposition",), default_timeout=TIMEOUT)
    at.session_state["sup_steps"] = 300
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    geometry = fig_titled(at, "Feature directions")
    assert len(geometry["data"]) == 5  # one arrow per feature in the 2-D hidden space
    norms = fig_titled(at, "Feature norms")
    assert len(arr(norms["data"][0]["y"])) == 5
    assert metric(at, "features represented (norm > 0.5)").endswith("of 5")
    at.slider(key="sup_features").set_value(6)
    at.slider(key="sup_dims").set_value(3).run()
    assert not at.exception
    assert len(arr(fig_titled(at, "Feature norms")["data"][0]["y"])) == 6
    fig_titled(at, "WᵀW")  # more than two dimensions: the overlaps as a heatmap


def test_app_binds_to_localhost_by_default():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    config = tomllib.loads((Path(__file__).resolve().parent.parent / ".streamlit" / "config.toml").read_text())
    assert config["server"]["address"] == "localhost"
    assert config["server"]["headless"] is True


@pytest.mark.smollm2
def test_logit_lens_page_on_smollm2(smollm2, monkeypatch):
    monkeypatch.setenv("WORKBENCH_APP_MODEL", "smollm2-135m")
    at = run_page("logit-lens")
    at.text_input(key="lens_prompt").set_value("The capital of France is").run()
    assert not at.exception, [e.value for e in at.exception]
    grid = fig_titled(at, "Logit lens")
    assert len(arr(grid["data"][0]["z"])) == smollm2.cfg.n_layers + 1
    assert grid["data"][0]["text"][-1][-1] == "·Paris"  # the model's own answer, in the final row
    assert grid["data"][0]["text"][0][-1] != "·Paris"  # the embedding alone does not know it


def test_big_patching_sweeps_wait_for_the_button(app_env, monkeypatch):
    monkeypatch.setattr("workbench.app.attribution.AUTO_PATCH_RUNS", 1)
    at = run_page("attribution")
    assert not [t for t in titles(at) if "patching" in t]
    assert any("patched runs" in c.value for c in at.caption)
    at.button(key="attr_patch_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    fig_titled(at, "patching the clean residual stream")
    at.radio(key="attr_granularity").set_value("Heads").run()  # same request: the sweep stays shown
    fig_titled(at, "patching the clean residual stream")


# ------------------------------------------------------------ readable figures and sharing (issue 12, 3-6, 9)


def _axis(fig: dict, name: str) -> dict:
    return fig["layout"].get(name, {})


def test_sampling_page_bars_are_tokens_in_probability_order(app_env):
    at = run_page("sampling")
    fig = fig_titled(at, "Next-token distribution")
    labels, raw = list(fig["data"][0]["x"]), arr(fig["data"][0]["y"])
    assert _axis(fig, "xaxis")["type"] == "category" and list(_axis(fig, "xaxis")["categoryarray"]) == labels
    assert len(set(labels)) == len(labels) and labels[0].startswith("#1 ")
    assert raw == sorted(raw, reverse=True)
    at.slider(key="samp_t").set_value(0.0).run()  # greedy: one token left, no entropy below zero
    caption = " ".join(c.value for c in at.caption)
    assert "1 token can be sampled; entropy 0.00 nats" in caption, caption
    # the chart offers its data (PNG is plotly's own camera button, its mode bar always shown)
    assert [b.proto.label for b in at.get("download_button")][:2] == ["CSV", "JSON"]
    assert json.loads(at.get("plotly_chart")[0].proto.config)["displayModeBar"] is True


def test_every_figure_offers_png_csv_and_json(app_env):
    """Pages drawing through ui.plot (induction: head scores and loss by position) export like share.plot's."""
    at = run_page("induction")
    charts = at.get("plotly_chart")
    labels = [b.proto.label for b in at.get("download_button")]
    assert len(charts) >= 2 and labels.count("CSV") == labels.count("JSON") == len(charts), (len(charts), labels)
    assert all(json.loads(c.proto.config)["displayModeBar"] is True for c in charts)


def test_generated_text_is_plain_text_not_markdown(app_env, monkeypatch):
    def fake_stream(*args, **kwargs):
        for piece in ("**not", " bold**", " _x_"):
            yield StreamEvent(0, piece, None)

    monkeypatch.setattr("workbench.generate.stream_generate", fake_stream)
    at = run_page("sampling")
    at.button(key="samp_go").click().run()
    assert not at.exception, [e.value for e in at.exception]
    body = " ".join(m.proto.body for m in at.get("markdown"))
    assert "&#42;&#42;not bold&#42;&#42; &#95;x&#95;" in body and at.session_state["samp_last"] == "**not bold** _x_"


def test_tokenizer_page_shows_the_bytes_of_a_split_character(app_env):
    at = run_page("tokenizer")
    at.text_input(key="tok_prompt").set_value("日本 🙂").run()
    html = " ".join(h.proto.body for h in at.get("markdown"))
    assert "\ufffd" not in html and "\\x" in html  # the tiny BPE splits these characters into bytes
    ids = fig_titled(at, "Token ids")
    assert _axis(ids, "xaxis")["type"] == "category"


def test_embedding_projection_uses_whole_words_with_their_space(app_env):
    at = run_page("embeddings")
    scatter = fig_titled(at, "Token embeddings")
    assert all(t.startswith("·") for t in scatter["data"][0]["text"])  # ' king', not 'king'
    neighbours = fig_titled(at, "Nearest tokens")
    assert _axis(neighbours, "yaxis")["type"] == "category" and list(neighbours["data"][0]["y"])[0].startswith("#1 ")
    at.checkbox(key="emb_space").uncheck().run()
    assert not at.exception
    assert not all(t.startswith("·") for t in fig_titled(at, "Token embeddings")["data"][0]["text"])


def _click_script() -> None:
    import streamlit as st

    from workbench.app.attention import _open_clicked_head

    st.session_state["attn_grid"] = {"selection": {"points": [{"curve_number": 1, "customdata": [1, 3]}]}}
    _open_clicked_head(2, 4)
    st.session_state["attn_layer"] = 0  # the user moves the slider afterwards: the same click is not re-applied
    _open_clicked_head(2, 4)


def test_attention_grid_opens_the_clicked_head_once():
    at = AppTest.from_function(_click_script, default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert (at.session_state["attn_layer"], at.session_state["attn_head"]) == (0, 3)
    assert at.session_state["attn_grid_opened"] == (1, 3)


def test_attention_page_labels_every_token_and_names_head_query_key(app_env):
    at = run_page("attention")
    at.text_input(key="attn_prompt").set_value("The cat sat on the mat and the cat sat on the mat").run()
    one = fig_titled(at, "Layer 0, head 0")
    labels = list(one["data"][0]["y"])
    assert list(_axis(one, "yaxis")["tickvals"]) == labels and len(set(labels)) == len(labels)  # every query
    assert one["data"][0]["hovertemplate"].startswith("Layer 0, head 0<br>query")
    grid = fig_titled(at, "All heads")
    assert "%{y}<br>%{x}" in grid["data"][0]["hovertemplate"] and grid["data"][0]["y"][0].startswith("L0 query 0:")
    assert len(grid["data"][1]["customdata"]) == 2 * 4  # one click target per head


def test_logit_lens_page_rank_chart_keeps_final_and_tuned_lens_sits_beside(app_env):
    at = run_page("logit-lens")
    at.slider(key="lens_pos").set_value(2).run()
    rank = fig_titled(at, "across layers")
    assert _axis(rank, "xaxis")["type"] == "category" and list(rank["data"][0]["x"])[-1] == "final"
    grid = fig_titled(at, "Logit lens")
    assert _axis(grid, "yaxis")["type"] == "category" and set(grid["data"][1]["textfont"]["color"]) <= {"#000000",
                                                                                                         "#ffffff"}
    at.slider(key="lens_layers").set_value((1, 1)).run()
    assert list(fig_titled(at, "Logit lens")["data"][0]["y"]) == ["1", "final"]
    model = HookedGPT.load(app_env / "models" / "tiny-lm")
    lens_dir = paths.runs_dir() / "lens-tiny-lm"
    TunedLens.for_model(model).save(lens_dir)
    at = run_page("logit-lens")
    at.radio(key="lens_kind").set_value(str(lens_dir)).run()
    assert not at.exception, [e.value for e in at.exception]
    fig_titled(at, "Logit lens") and fig_titled(at, "Tuned lens")
    kl = fig_titled(at, "KL(final output")
    assert [d["name"] for d in kl["data"]] == ["logit lens", "tuned lens"]


def test_sae_page_latent_card_and_no_delta_arrow(app_home, tmp_path, monkeypatch):
    home = tmp_path / "home"  # a private home: the SAE trained here must not show up in other tests' pages
    shutil.copytree(app_home, home, ignore=shutil.ignore_patterns("runs", "stores"))
    monkeypatch.setenv("WORKBENCH_HOME", str(home))
    monkeypatch.setenv("WORKBENCH_APP_MODEL", "tiny-lm")
    model = HookedGPT.load(home / "models" / "tiny-lm")
    # every window's first position (the attention sink, whose residual dwarfs the rest) stays out, BOS or not
    plain = HookedGPT.load(home / "models" / "tiny-lm")
    plain.tokenizer = dataclasses.replace(plain.tokenizer, add_bos=False)  # windows without BOS, as SmolLM2's
    run = compute.train_quick_sae(plain, "tiny-lm", layer=0, n_tokens=2048, d_sae=16, k=2, steps=2)
    assert open_store(run.store_dir).n_rows == (2048 // 64) * 63 and "-from1-" in run.store_dir.name
    compute.train_quick_sae(model, "tiny-lm", layer=0, n_tokens=2048, d_sae=64, k=4, steps=20)
    at = run_page("sae")
    live = [m for m in at.metric if m.label == "live latents"][0]
    assert "dead" in live.proto.delta and live.proto.direction == Metric.MetricDirection.NONE  # no arrow on a share
    assert any(b.proto.label.startswith("Download this latent's card") for b in at.get("download_button"))
    effects = fig_titled(at, "Logit effects")
    assert _axis(effects, "yaxis")["type"] == _axis(effects, "yaxis2")["type"] == "category"


def test_page_controls_live_in_the_url(app_env):
    at = AppTest.from_function(_script, args=("attention",), default_timeout=TIMEOUT)
    at.query_params["attn_layer"] = "1"
    at.query_params["attn_head"] = "3"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert "Layer 1, head 3" in titles(at)  # a link opens that head
    # a stale or edited link is ignored, not an error
    at = AppTest.from_function(_script, args=("sampling",), default_timeout=TIMEOUT)
    at.query_params["samp_t"] = "0.5"
    at.query_params["samp_k"] = "999"  # out of range
    at.query_params["samp_p"] = "not a number"
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert at.slider(key="samp_t").value == 0.5 and at.slider(key="samp_k").value == 0
    assert at.slider(key="samp_p").value == 1.0


def test_quick_sae_caches_the_models_own_corpus():
    assert compute.quick_sae_corpus("kjv-small") == "kjv"  # trained on the KJV: its SAE reads KJV text
    assert compute.quick_sae_corpus("smollm2-135m") == compute.quick_sae_corpus("tiny-lm") == "pydocs"


def test_logit_lens_page_trains_a_tuned_lens_in_the_background(app_home, tmp_path, monkeypatch):
    """No tuned lens yet: a button starts one as a background job; once it is done the page opens it beside the
    logit lens (a private home, so the shared one's lens tests are unaffected)."""
    shutil.copytree(app_home / "models" / "tiny-lm", tmp_path / "models" / "tiny-lm")
    monkeypatch.setenv("WORKBENCH_HOME", str(tmp_path))
    monkeypatch.setenv("WORKBENCH_APP_MODEL", "tiny-lm")
    monkeypatch.setattr(compute, "APP_LENS_STEPS", 4)
    monkeypatch.setattr(compute, "APP_LENS_WINDOWS", 6)
    at = run_page("logit-lens")
    assert at.radio(key="lens_kind").options == ["logit lens"]
    at.button(key="lens_train").click().run()
    assert not at.exception, [e.value for e in at.exception]
    job = cached.jobs().get(at.session_state["lens_job"])
    assert job is not None and job.wait(120) and job.error is None, job.error
    for _ in range(3):  # the run that sees the finished job reruns once to open the new lens
        at.run()
        if len(at.radio(key="lens_kind").options) == 2:
            break
    assert not at.exception, [e.value for e in at.exception]
    assert at.radio(key="lens_kind").value == str(tmp_path / "runs" / "lens-app-tiny-lm")
    fig_titled(at, "Tuned lens") and fig_titled(at, "KL(final output")
