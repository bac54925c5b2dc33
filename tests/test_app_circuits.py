"""The Circuit tracing page, headless (AppTest) on tiny-lm with a tiny transcoder set: checks the values it shows."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402
from test_app_pages import arr, figures  # noqa: E402

from workbench.analysis import graph as G  # noqa: E402
from workbench.sae.io import save_sae  # noqa: E402
from workbench.sae.model import SAE, SAEConfig  # noqa: E402

TIMEOUT = 120


def _script(url: str) -> None:
    from workbench.app.main import render_page

    render_page(url)


@pytest.fixture(scope="module")
def transcoder_dir(tmp_path_factory):
    """Two random transcoders for tiny-lm (d_model 32), saved as `train_transcoders` lays them out."""
    out = tmp_path_factory.mktemp("tc")
    for layer in range(2):
        tc = SAE(SAEConfig(d_in=32, d_sae=48, architecture="relu", apply_b_dec_to_input=False, d_out=32), seed=layer)
        with torch.no_grad():
            tc.b_enc.fill_(-0.12)
            tc.W_dec.mul_(0.1)
        save_sae(tc, out / f"layer_{layer}" / "transcoder", metadata={"model_name": "tiny-lm"})
    return out


@pytest.fixture
def page(app_home, monkeypatch, transcoder_dir):
    monkeypatch.setenv("WORKBENCH_HOME", str(app_home))
    monkeypatch.setenv("WORKBENCH_APP_MODEL", "tiny-lm")
    at = AppTest.from_function(_script, args=("circuits",), default_timeout=TIMEOUT)
    at.run()
    assert not at.exception, [e.value for e in at.exception]
    assert any("No transcoder set is shipped" in i.value for i in at.info)  # tiny-lm ships none
    at.text_input(key="circuit_transcoders").set_value(str(transcoder_dir)).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def frame(at: AppTest, column: str, nth: int = 0):
    """The ``nth`` table on the page with this column (AppTest finds dataframes by position, not key)."""
    return [d.value for d in at.dataframe if column in d.value.columns][nth]


def _reference(transcoder_dir, text, budget: int = 0):
    import os

    from workbench import HookedGPT

    model = HookedGPT.load(os.path.join(os.environ["WORKBENCH_HOME"], "models", "tiny-lm")).eval()
    tcs = G.load_transcoders(transcoder_dir)
    return model, tcs, G.attribute(model, tcs, text, max_feature_nodes=budget or None)


def test_graph_metrics_figure_and_card_match_the_library(page, transcoder_dir):
    at = page
    text = at.text_input(key="circuit_prompt").value
    model, tcs, graph = _reference(transcoder_dir, text, at.number_input(key="circuit_budget").value)
    pruned = G.prune(graph, 0.8, 0.98)
    scores = G.graph_scores(graph, pruned)
    metrics = {m.label: m.value for m in at.metric}
    assert metrics["Active features"] == str(graph.n_features)
    assert metrics["Nodes kept"] == f"{int(pruned.node_mask.sum())} / {graph.n_nodes}"
    assert metrics["Replacement score"] == f"{scores.replacement:.3f}"
    assert metrics["Completeness"] == f"{scores.completeness:.3f}"
    # the drawn nodes are the pruned graph's, logits on the top row
    fig = figures(at)[0]
    nodes = next(t for t in fig["data"] if t.get("name") == "nodes")
    assert sorted(arr(nodes["customdata"])) == pruned.node_mask.nonzero().flatten().tolist()
    ys = dict(zip(arr(nodes["customdata"]), arr(nodes["y"])))
    assert all(ys[graph.logit_node(i)] == graph.n_layers + 1 for i in range(graph.n_logits))
    # the node chooser opens on the most influential kept feature or error node
    chosen = at.selectbox(key="circuit_node").value
    kept = [n for n in pruned.node_mask.nonzero().flatten().tolist() if graph.node_kind(n) in ("feature", "error")]
    assert chosen == max(kept, key=lambda n: float(pruned.influence[n]))
    # a feature's card: its inputs are its row of the graph, its promoted logits W_dec @ W_U
    feature = max(range(graph.n_features), key=lambda n: float(pruned.influence[n]))
    at.selectbox(key="circuit_node").set_value(feature).run()
    assert not at.exception, [e.value for e in at.exception]
    inputs = frame(at, "weight")
    row = graph.adjacency[feature]
    assert inputs["weight"].iloc[0] == pytest.approx(float(row[row.abs().argmax()]), abs=1e-6)
    layer, pos, index = graph.features[feature].tolist()
    promoted = frame(at, "logit")
    want = (tcs[layer].W_dec[index] @ model.W_U).detach()
    assert promoted["logit"].iloc[0] == pytest.approx(float(want.max()), abs=1e-5)
    assert "<mark>" in "\n".join(m.value for m in at.markdown)  # a top context with its token highlighted
    assert graph.n_features > 5
    at.number_input(key="circuit_budget").set_value(5).run()  # the budget keeps the 5 most influential features
    assert {m.label: m.value for m in at.metric}["Active features"] == "5"


def test_steering_from_the_card_changes_the_output_as_the_model_does(page, transcoder_dir):
    at = page
    text = at.text_input(key="circuit_prompt").value
    model, tcs, graph = _reference(transcoder_dir, text, at.number_input(key="circuit_budget").value)
    influence = G.prune(graph).influence
    feature = max(range(graph.n_features), key=lambda n: float(influence[n]))
    at.selectbox(key="circuit_node").set_value(feature).run()
    at.slider(key="circuit_steer").set_value(4.0).run()
    assert not at.exception, [e.value for e in at.exception]
    table = frame(at, "p before")
    layer, pos, index = graph.features[feature].tolist()
    edit = [G.FeatureEdit(layer, pos, index, 4.0, scale=True)]
    tokens = model.to_tokens(text)
    before, after = model(tokens)[0, -1].detach(), G.intervene(model, tcs, tokens, edit)[-1]
    torch.testing.assert_close(torch.tensor(table["p before"].tolist()), before.softmax(-1)[graph.logit_tokens],
                               atol=1e-5, rtol=0)
    torch.testing.assert_close(torch.tensor(table["p after"].tolist()), after.softmax(-1)[graph.logit_tokens],
                               atol=1e-5, rtol=0)
    assert not torch.allclose(after, before)
    torch.testing.assert_close(torch.tensor(table["graph's direct effect"].tolist()),
                               G.predicted_logit_change(graph, edit), atol=1e-5, rtol=0)


def test_supernodes_label_their_members(page, transcoder_dir):
    at = page
    _, _, graph = _reference(transcoder_dir, at.text_input(key="circuit_prompt").value,
                             at.number_input(key="circuit_budget").value)
    pruned = G.prune(graph)
    kept = [n for n in pruned.node_mask.nonzero().flatten().tolist() if graph.node_kind(n) in ("feature", "error")]
    picked = sorted(kept, key=lambda n: -float(pruned.influence[n]))[:2]
    assert len(picked) == 2
    at.multiselect(key="circuit_members").set_value(picked)
    at.text_input(key="circuit_label").set_value("say-something")
    next(b for b in at.button if b.label == "Add supernode").click().run()
    assert not at.exception, [e.value for e in at.exception]
    groups = frame(at, "supernode")
    assert list(groups["supernode"]) == ["say-something"]
    nodes = next(t for t in figures(at)[0]["data"] if t.get("name") == "nodes")
    labelled = [t for t in nodes["text"] if t.startswith("[say-something]")]
    assert sorted(labelled) == sorted(f"[say-something] {graph.node_label(n)}" for n in picked)
    assert groups["influence"].iloc[0] == pytest.approx(float(pruned.influence[picked].sum()), abs=1e-6)
