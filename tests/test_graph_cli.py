"""`workbench graph`: the numbers it prints and writes are the library's; bad inputs are one-line errors."""

from __future__ import annotations

import json

import pytest
import torch

from workbench.analysis import graph as G
from workbench.cli import main
from workbench.sae.io import save_sae
from workbench.sae.model import SAE, SAEConfig
from workbench.zoo import load_model

PROMPT = "And God said, Let there be"


def _save_set(out, model_name: str, layers=range(4), d: int = 128):
    for layer in layers:
        tc = SAE(SAEConfig(d_in=d, d_sae=64, architecture="topk", k=4, apply_b_dec_to_input=False, d_out=d), seed=layer)
        save_sae(tc, out / f"layer_{layer}" / "transcoder", metadata={"model_name": model_name})
    return out


@pytest.fixture(scope="module")
def kjv_set(tmp_path_factory):
    return _save_set(tmp_path_factory.mktemp("kjv_tc"), "kjv-small")


def test_graph_command_writes_the_librarys_graph(kjv_set, tmp_path, capsys):
    out, export, numbers = tmp_path / "g.safetensors", tmp_path / "g.json", tmp_path / "n.json"
    rc = main(["graph", "kjv-small", PROMPT, "--transcoders", str(kjv_set), "--out", str(out), "--export", str(export),
               "--json", str(numbers), "--report", str(tmp_path / "report"), "--top", "3"])
    assert rc == 0
    text = capsys.readouterr().out
    model = load_model("kjv-small")
    graph = G.attribute(model, G.load_transcoders(kjv_set), PROMPT)
    pruned = G.prune(graph)
    scores = G.graph_scores(graph)
    assert f"{graph.n_features} active features" in text
    assert f"replacement score {scores.replacement:.3f}" in text and "strongest paths to" in text
    saved = G.AttributionGraph.load(out, model_name="kjv-small")
    torch.testing.assert_close(saved.adjacency, graph.adjacency, atol=1e-5, rtol=0)
    data = json.loads(numbers.read_text())
    assert data["n_nodes_pruned"] == int(pruned.node_mask.sum()) and len(data["paths"]) == 3
    assert data["paths"][0]["strength"] == pytest.approx(G.top_paths(graph, pruned, k=1)[0].strength, rel=1e-4)
    ct = json.loads(export.read_text())
    assert len(ct["links"]) == int(pruned.edge_mask.sum())
    models = pytest.importorskip("circuit_tracer.frontend.graph_models")
    models.Model(**ct)  # circuit-tracer's own schema
    assert (tmp_path / "report" / "report.html").stat().st_size > 1000


def test_graph_command_bad_inputs(kjv_set, tmp_path, capsys):
    def error(*argv) -> str:
        assert main(["graph", "kjv-small", *argv]) == 1
        return capsys.readouterr().err

    for flag, bad in (("--edge-threshold", "1.5"), ("--node-threshold", "0"), ("--node-threshold", "nan")):
        msg = error(PROMPT, "--transcoders", str(kjv_set), flag, bad)
        assert flag in msg and "(0, 1]" in msg or "finite" in msg, msg
    assert "no such directory and no shipped set" in error(PROMPT, "--transcoders", str(tmp_path / "nowhere"))
    assert "not one" in error(PROMPT, "--transcoders", str(kjv_set), "--target", " the Lord")
    assert "prompt is empty" in error("", "--transcoders", str(kjv_set))
    assert "exceed the model's context" in error("And " * 200, "--transcoders", str(kjv_set))
    partial = _save_set(tmp_path / "partial", "kjv-small", layers=(0, 1, 3))
    assert "no transcoder for layer(s) [2]" in error(PROMPT, "--transcoders", str(partial))
    other = _save_set(tmp_path / "other", "smollm2-135m")
    assert "trained on 'smollm2-135m', not 'kjv-small'" in error(PROMPT, "--transcoders", str(other))
    narrow = _save_set(tmp_path / "narrow", "", d=32)
    assert "was it trained for another model" in error(PROMPT, "--transcoders", str(narrow))
    assert not list(tmp_path.glob("*.safetensors"))  # nothing half-written
