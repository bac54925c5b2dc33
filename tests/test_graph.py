"""Attribution graphs: the replacement is exact, rows sum to their targets, edges are direct effects."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from helpers import LLAMA_TINY, tiny_cfg
from safetensors import safe_open

from workbench import HookedGPT
from workbench.analysis import graph as G
from workbench.errors import CheckpointError, ConfigError, InputError
from workbench.sae.model import SAE, SAEConfig
from workbench.zoo import load_model

FAMILIES = {"gpt2": {}, "llama": LLAMA_TINY}


def _setup(family: str, architecture: str = "relu", skip: bool = True, n_layers: int = 3, seed: int = 0):
    torch.manual_seed(seed)
    model = HookedGPT(tiny_cfg(n_layers=n_layers, **FAMILIES[family])).eval()
    tcs = []
    for layer in range(n_layers):
        tc = SAE(SAEConfig(d_in=32, d_sae=48, architecture=architecture, k=6, apply_b_dec_to_input=False, d_out=32,
                           skip=skip), seed=seed + layer)
        with torch.no_grad():
            tc.b_enc.fill_(-0.12)  # a sparse but not empty set of active features
            tc.W_dec.mul_(0.1)  # outputs of an MLP's size: untrained, but not cancelling large errors in fp32
            tc.b_dec.normal_(0, 0.02)
            if skip:
                tc.W_skip.normal_(0, 0.02)
        tcs.append(tc.eval())
    tokens = torch.randint(0, 50, (1, 7))
    return model, tcs, tokens


@pytest.fixture(scope="module", params=list(FAMILIES))
def built(request):
    model, tcs, tokens = _setup(request.param)
    return model, tcs, tokens, G.attribute(model, tcs, tokens, batch_size=16)


def test_replacement_model_reproduces_the_logits(built):
    model, tcs, tokens, _ = built
    rec = G._record(model, tokens)
    with torch.no_grad():
        acts = [tc.encode(x) for tc, x in zip(tcs, rec.mlp_in)]
        errors = [y - tc(x).x_hat for tc, x, y in zip(tcs, rec.mlp_in, rec.mlp_out)]
    rep = G._Replacement(model, tcs, tokens, rec, acts, errors, batch=2)
    torch.testing.assert_close(rep.logits[0].detach(), rec.logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(G.intervene_replacement(model, tcs, tokens, []), rec.logits, atol=1e-4, rtol=0)


def test_every_row_sums_to_its_target(built):
    model, tcs, tokens, graph = built
    assert graph.n_features > 20
    rows = torch.cat([torch.arange(graph.n_features), torch.arange(graph.logit_node(0), graph.n_nodes)])
    torch.testing.assert_close(graph.adjacency[rows].sum(-1) + graph.constant[rows], graph.target[rows],
                               atol=1e-4, rtol=0)
    # the feature targets are the transcoders' real pre-activations on the prompt
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("mlp.hook_in"))
    for node in range(graph.n_features):
        layer, pos, index = graph.features[node].tolist()
        pre = tcs[layer].pre_acts(cache[f"blocks.{layer}.mlp.hook_in"][0])[pos, index]
        torch.testing.assert_close(graph.target[node], pre.detach(), atol=1e-4, rtol=0)
        assert graph.activations[node] > 0
    logits = model(tokens)[0, -1]
    centred = (logits - logits.mean())[graph.logit_tokens].detach()
    torch.testing.assert_close(graph.target[graph.logit_node(0):], centred, atol=1e-4, rtol=0)
    # sources only feed later layers: no edge from a feature to one in the same or an earlier layer
    f_layers = graph.features[:, 0]
    same_or_later = f_layers[:, None] <= f_layers[None, :]
    assert (graph.adjacency[: graph.n_features, : graph.n_features][same_or_later] == 0).all()


def test_zeroing_a_source_moves_each_target_by_its_edge(built):
    """In the frozen linear replacement, removing one source changes every target by exactly that edge."""
    model, tcs, tokens, graph = built
    rec = G._record(model, tokens)
    with torch.no_grad():
        acts = [tc.encode(x) for tc, x in zip(tcs, rec.mlp_in)]
        errors = [y - tc(x).x_hat for tc, x, y in zip(tcs, rec.mlp_in, rec.mlp_out)]
    targets = [("feature", tuple(f.tolist())) for f in graph.features] + [("logit", int(t)) for t in graph.logit_tokens]
    rows = torch.cat([torch.arange(graph.n_features), torch.arange(graph.logit_node(0), graph.n_nodes)])

    def values(a, e, zero_token=None):
        rep = G._Replacement(model, tcs, tokens, rec, a, e, batch=1)
        if zero_token is not None:  # a fresh replacement whose embedding leaf has one position zeroed
            with torch.no_grad():
                rep = _ReplacementWithoutToken(model, tcs, tokens, rec, a, e, zero_token)
        with torch.no_grad():
            return G._target_values(rep, targets, tcs).float()  # every target in one vectorised read

    full = values(acts, errors)
    g = torch.Generator().manual_seed(0)
    # a sample of 100 sources: every error and token node, the rest features
    sources = [graph.error_node(layer, pos) for layer in range(graph.n_layers) for pos in range(graph.n_pos)]
    sources += [graph.token_node(p) for p in range(graph.n_pos)]
    sources += torch.randperm(graph.n_features, generator=g)[: 100 - len(sources)].tolist()
    assert len(sources) == 100
    for node in sources:
        a, e, tok = [x.clone() for x in acts], [x.clone() for x in errors], None
        kind = graph.node_kind(node)
        if kind == "feature":
            layer, pos, index = graph.features[node].tolist()
            a[layer][pos, index] = 0
        elif kind == "error":
            layer, pos = divmod(node - graph.n_features, graph.n_pos)
            e[layer][pos] = 0
        else:
            tok = node - graph.token_node(0)
        change = full - values(a, e, tok)
        torch.testing.assert_close(change, graph.adjacency[rows, node], atol=1e-3, rtol=0, msg=graph.node_label(node))


class _ReplacementWithoutToken(G._Replacement):
    def __init__(self, model, tcs, tokens, rec, acts, errors, pos):
        self._zero_pos = pos
        super().__init__(model, tcs, tokens, rec, acts, errors, batch=1)

    def sources(self):  # pragma: no cover - not used for gradients here
        return super().sources()

    def __setattr__(self, name, value):
        if name == "embed" and getattr(self, "_zero_pos", None) is not None:
            value = value.detach().clone()
            value[:, self._zero_pos] = 0
        super().__setattr__(name, value)


def test_compact_row_blocks_assemble_to_the_full_rows():
    """Feature rows are computed as blocks holding only earlier layers' feature columns; assembled, they
    equal the full rows one backward pass writes, with far fewer floats held while the passes run."""
    model, tcs, tokens = _setup("llama", n_layers=4, seed=2)
    rec = G._record(model, tokens)
    with torch.no_grad():
        acts = [tc.encode(x) for tc, x in zip(tcs, rec.mlp_in)]
        errors = [y - tc(x).x_hat for tc, x, y in zip(tcs, rec.mlp_in, rec.mlp_out)]
    active = G._active(acts)
    rep = G._Replacement(model, tcs, tokens, rec, acts, errors, batch=8)
    n_f, n_src = active.shape[0], active.shape[0] + 5 * tokens.shape[1]
    full = torch.zeros(n_f, n_src)
    G._rows(rep, [("feature", tuple(f)) for f in active.tolist()], tcs, full)
    blocks, passes = G._feature_row_blocks(rep, active, tcs)
    assert passes == -(-n_f // 8) and len(blocks) == passes
    assert sum(b.numel() for _, _, b in blocks) < 0.75 * full.numel()
    logit_rows = torch.randn(2, n_src)
    A = G._assemble(blocks, logit_rows, n_f, n_src + 2)
    assert blocks == []  # each block handed over as it was copied
    torch.testing.assert_close(A[:n_f, :n_src], full, atol=0, rtol=0)
    assert (A[:, n_src:] == 0).all() and (A[n_f:n_src] == 0).all()
    torch.testing.assert_close(A[n_src:, :n_src], logit_rows, atol=0, rtol=0)


def test_feature_budget_keeps_the_most_influential_and_rows_still_sum():
    model, tcs, tokens = _setup("gpt2", seed=1)
    full = G.attribute(model, tcs, tokens, batch_size=16)
    small = G.attribute(model, tcs, tokens, batch_size=16, max_feature_nodes=15)
    assert small.n_features == 15 < full.n_features
    rows = torch.cat([torch.arange(15), torch.arange(small.logit_node(0), small.n_nodes)])
    incoming = small.adjacency[rows].sum(-1) + small.constant[rows]
    torch.testing.assert_close(incoming, small.target[rows], atol=1e-4, rtol=0)
    # the logit rows' error and token columns do not depend on which features were kept
    torch.testing.assert_close(small.adjacency[small.logit_node(0):, 15:small.logit_node(0)],
                               full.adjacency[full.logit_node(0):, full.n_features:full.logit_node(0)])
    # every kept row is the full graph's row: the kept features' and the other nodes' columns as they are,
    # the dropped features' sum moved into the constant (rows are assembled from compact per-layer chunks)
    at = {tuple(f): i for i, f in enumerate(full.features.tolist())}
    idx = torch.tensor([at[tuple(f)] for f in small.features.tolist()])
    full_rows = torch.cat([idx, torch.arange(full.logit_node(0), full.n_nodes)])
    dropped = torch.ones(full.n_features, dtype=torch.bool)
    dropped[idx] = False
    torch.testing.assert_close(small.adjacency[rows][:, :15], full.adjacency[full_rows][:, idx], atol=1e-6, rtol=0)
    torch.testing.assert_close(small.adjacency[rows][:, 15:], full.adjacency[full_rows][:, full.n_features:],
                               atol=1e-6, rtol=0)
    sent_by_dropped = full.adjacency[full_rows][:, : full.n_features][:, dropped].sum(-1)
    torch.testing.assert_close(small.constant[rows], full.constant[full_rows] + sent_by_dropped, atol=1e-5, rtol=0)


def test_budget_influence_through_chunks_solves_the_series():
    """The budget's ranking: each feature's influence on the logits through the rows visited so far, read
    chunk by chunk from compact rows, equals ``direct (I - M)^-1`` with M the visited rows' shares."""
    model, tcs, tokens = _setup("llama", seed=3)
    graph = G.attribute(model, tcs, tokens, batch_size=16)
    n_f = graph.n_features
    torch.manual_seed(0)
    visited = torch.randperm(n_f)[: n_f // 2].sort().values
    layer_start = torch.searchsorted(graph.features[:, 0].contiguous(), torch.arange(graph.n_layers + 1))
    n_src = graph.logit_node(0)
    chunks = []
    for part in visited.split(5):  # batches of 5, cut per layer as the budget stores them
        layers = graph.features[part, 0]
        for layer in layers.unique().tolist():
            sel = part[layers == layer]
            w = int(layer_start[layer])
            rows = torch.cat([graph.adjacency[sel, :w], graph.adjacency[sel, n_f:n_src]], dim=1)
            assert (graph.adjacency[sel, w:n_f] == 0).all()  # a feature hears no feature of its own layer or later
            chunks.append(G._RowChunk(sel, layer, w, rows, rows.abs().sum(-1)))
    weights = graph.logit_probs / graph.logit_probs.sum()
    direct = weights @ G._row_shares(graph.adjacency[n_src:, :n_src])[:, :n_f]
    M = torch.zeros(n_f, n_f)
    M[visited] = G._row_shares(graph.adjacency[:n_src])[visited, :n_f]
    expected = torch.linalg.solve(torch.eye(n_f) - M.T, direct)  # x = direct + x M
    torch.testing.assert_close(G._feature_influence(chunks, direct), expected, atol=1e-5, rtol=1e-4)


def test_interventions_in_the_real_model_and_the_replacement():
    model, tcs, tokens = _setup("llama", seed=2)
    graph = G.attribute(model, tcs, tokens, batch_size=32)
    base = model(tokens)[0].detach()
    assert torch.equal(G.intervene(model, tcs, tokens, []), base)
    # the last layer's features reach the logits only directly: both interventions equal the graph's edge
    last = (graph.features[:, 0] == graph.n_layers - 1) & (graph.features[:, 1] == graph.n_pos - 1)
    node = int(last.nonzero()[0, 0])
    layer, pos, index = graph.features[node].tolist()
    edit = [G.FeatureEdit(layer, pos, index, 0.0)]
    edge = graph.adjacency[graph.logit_node(0):, node]

    def drop(logits):
        demeaned, base_d = logits[-1] - logits[-1].mean(), base[-1] - base[-1].mean()
        return (base_d - demeaned)[graph.logit_tokens]

    for propagate in (True, False):  # frozen norms and patterns: exactly the edge
        torch.testing.assert_close(drop(G.intervene_replacement(model, tcs, tokens, edit, propagate=propagate)), edge,
                                   atol=1e-4, rtol=0)
    # the real model also rescales by the final norm: close to the edge, not equal
    real = drop(G.intervene(model, tcs, tokens, edit))
    assert torch.nn.functional.cosine_similarity(real, edge, dim=0) > 0.8
    assert not torch.allclose(real, torch.zeros_like(real))


def test_graph_file_round_trips_and_refuses_damage(built, tmp_path):
    *_, graph = built
    path = graph.save(tmp_path / "g.safetensors")
    back = G.AttributionGraph.load(path, model_name="tiny")
    assert torch.equal(back.adjacency, graph.adjacency) and back.settings == graph.settings
    assert back.str_tokens == graph.str_tokens and back.n_layers == graph.n_layers
    with pytest.raises(CheckpointError, match="built on model 'tiny'"):
        G.AttributionGraph.load(path, model_name="kjv-small")
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        G.AttributionGraph.load(tmp_path / "cut.safetensors")


def test_bad_inputs_are_clear_errors():
    model, tcs, tokens = _setup("gpt2")
    with pytest.raises(InputError, match="3 layers but 2 transcoders"):
        G.attribute(model, tcs[:2], tokens)
    with pytest.raises(InputError, match=r"no transcoder for layer\(s\) \[1\]"):
        G.attribute(model, {0: tcs[0], 2: tcs[2]}, tokens)
    with pytest.raises(InputError, match=r"layer\(s\) \[3\].*another model"):
        G.attribute(model, {**dict(enumerate(tcs)), 3: tcs[0]}, tokens)
    tcs[1].metadata = {"model_name": "smollm2-135m"}
    try:
        with pytest.raises(InputError, match="trained on 'smollm2-135m', not 'tiny'"):
            G.attribute(model, tcs, tokens)
    finally:
        tcs[1].metadata = {}
    with pytest.raises(InputError, match="exceed the model's context"):
        G.attribute(model, tcs, torch.zeros(1, model.cfg.n_ctx + 1, dtype=torch.long))
    with pytest.raises(InputError, match="one prompt, got a batch of 2"):
        G.attribute(model, tcs, tokens.expand(2, -1))
    for bad in (0, -0.1, 1.01, float("nan")):
        with pytest.raises(InputError, match="must lie in"):
            G.attribute(model, tcs, tokens, desired_logit_prob=bad)
    with pytest.raises(InputError, match=r"desired_logit_prob=1.5"):
        G.attribute(model, tcs, tokens, desired_logit_prob=1.5)
    other = SAE(SAEConfig(d_in=16, d_sae=8, architecture="relu", d_out=16, apply_b_dec_to_input=False))
    with pytest.raises(InputError, match="another model"):
        G.attribute(model, [other] * 3, tokens)
    with pytest.raises(ConfigError, match="attention-only"):
        G.attribute(HookedGPT(tiny_cfg(attn_only=True)), tcs, tokens)
    with pytest.raises(InputError, match="index must lie"):
        G.intervene(model, tcs, tokens, [G.FeatureEdit(0, 0, 999, 1.0)])


# -- pruning, scores and export, against circuit-tracer's own code (installed by `make setup`, no deps) --


class _AsCircuitTracer:
    """The attributes circuit-tracer's prune_graph / compute_graph_scores read from its Graph."""

    def __init__(self, graph: G.AttributionGraph):
        self.input_tokens = graph.tokens
        self.logit_targets = list(graph.logit_tokens)
        self.selected_features = torch.arange(graph.n_features)
        self.adjacency_matrix = graph.adjacency
        self.logit_probabilities = graph.logit_probs
        self.cfg = SimpleNamespace(n_layers=graph.n_layers)


def test_pruning_and_scores_equal_circuit_tracers(built):
    ct = pytest.importorskip("circuit_tracer.graph")
    *_, graph = built
    ours = G.prune(graph, 0.8, 0.98)
    theirs = ct.prune_graph(_AsCircuitTracer(graph), 0.8, 0.98)
    assert torch.equal(ours.node_mask, theirs.node_mask)
    assert torch.equal(ours.edge_mask, theirs.edge_mask)
    torch.testing.assert_close(ours.cumulative, theirs.cumulative_scores)
    scores = G.graph_scores(graph)
    replacement, completeness = ct.compute_graph_scores(_AsCircuitTracer(graph))
    assert scores.replacement == pytest.approx(replacement, abs=1e-5)
    assert scores.completeness == pytest.approx(completeness, abs=1e-5)


def test_pruned_scores_count_what_pruning_removes(built):
    *_, graph = built
    full = G.graph_scores(graph)
    everything = G.prune(graph, 1.0, 1.0)
    assert G.graph_scores(graph, everything).completeness == pytest.approx(full.completeness, abs=1e-5)
    pruned = G.prune(graph, 0.5, 0.8)
    assert pruned.node_mask.sum() < graph.n_nodes
    assert G.graph_scores(graph, pruned).completeness < full.completeness
    assert 0 <= G.graph_scores(graph, pruned).replacement <= 1
    with pytest.raises(InputError, match="node_threshold=0"):
        G.prune(graph, 0, 0.9)
    for bad in (0.0, 1.5, -1.0, float("nan")):
        with pytest.raises(InputError, match="edge_threshold"):
            G.prune(graph, 0.8, bad)


def test_circuit_tracer_json_validates_against_its_schema(built):
    models = pytest.importorskip("circuit_tracer.frontend.graph_models")
    *_, graph = built
    pruned = G.prune(graph)
    data = G.to_circuit_tracer_json(graph, pruned)
    model = models.Model(**data)  # pydantic: raises on any schema violation
    ids = {n.node_id for n in model.nodes}
    assert len(ids) == len(model.nodes)
    assert {link["source"] for link in data["links"]} <= ids and {link["target"] for link in data["links"]} <= ids
    assert sum(n.feature_type == "logit" for n in model.nodes) == graph.n_logits
    assert sum(n.feature_type == "embedding" for n in model.nodes) == graph.n_pos
    weights = {(link["source"], link["target"]): link["weight"] for link in data["links"]}
    node_id = {n: d["node_id"] for n, d in enumerate(_node_ids(graph))}
    for t, s in pruned.edge_mask.nonzero().tolist():
        if node_id[s] in ids and node_id[t] in ids:
            assert weights[(node_id[s], node_id[t])] == pytest.approx(float(graph.adjacency[t, s]))


def _node_ids(graph):
    """Every node's circuit-tracer id, in node order (the export of an unpruned graph keeps them all)."""
    everything = G.Pruned(torch.ones(graph.n_nodes, dtype=torch.bool), torch.ones(graph.n_nodes, graph.n_nodes,
                          dtype=torch.bool), torch.zeros(graph.n_nodes), torch.zeros(graph.n_nodes))
    data = G.to_circuit_tracer_json(graph, everything)
    assert len(data["nodes"]) == graph.n_nodes
    return data["nodes"]


def test_the_graph_predicts_set_scale_and_zero_edits():
    """An edit's effect in the frozen replacement with other features held is what the graph's edges predict."""
    model, tcs, tokens = _setup("gpt2", seed=3)
    graph = G.attribute(model, tcs, tokens, batch_size=32)
    base = G.intervene_replacement(model, tcs, tokens, [], propagate=False)[-1]
    base = base - base.mean()
    g = torch.Generator().manual_seed(1)
    picks = torch.randperm(graph.n_features, generator=g)[:6].tolist()
    feats = [graph.features[n].tolist() for n in picks]
    for edits in ([G.FeatureEdit(*feats[0], 0.0)], [G.FeatureEdit(*f, 2.5, scale=True) for f in feats[:3]],
                  [G.FeatureEdit(*f, 0.7) for f in feats[3:]]):
        got = G.intervene_replacement(model, tcs, tokens, edits, propagate=False)[-1]
        change = (got - got.mean() - base)[graph.logit_tokens]
        torch.testing.assert_close(change, G.predicted_logit_change(graph, edits), atol=1e-4, rtol=0)
    # scale by 0 is zeroing; the real model moves too
    zero, scaled = [G.FeatureEdit(*feats[0], 0.0)], [G.FeatureEdit(*feats[0], 0.0, scale=True)]
    torch.testing.assert_close(G.intervene(model, tcs, tokens, zero), G.intervene(model, tcs, tokens, scaled))
    at_0_0 = set(graph.features[(graph.features[:, 0] == 0) & (graph.features[:, 1] == 0), 2].tolist())
    silent = min(set(range(tcs[0].cfg.d_sae)) - at_0_0)
    with pytest.raises(InputError, match="not an active node"):
        G.predicted_logit_change(graph, [G.FeatureEdit(0, 0, silent, 0.0)])


@pytest.fixture(scope="module")
def kjv():
    model = load_model("kjv-small")
    tcs = []
    for layer in range(model.cfg.n_layers):
        tc = SAE(SAEConfig(d_in=128, d_sae=64, architecture="topk", k=4, apply_b_dec_to_input=False, d_out=128),
                 seed=layer)
        tc.metadata = {"model_name": "kjv-small"}
        tcs.append(tc.eval())
    return model, tcs


def test_text_prompts_and_targets(kjv):
    model, tcs = kjv
    with pytest.raises(InputError, match="prompt is empty"):
        G.attribute(model, tcs, "  ")
    with pytest.raises(InputError, match="exceed the model's context"):
        G.attribute(model, tcs, "And " * 200)
    with pytest.raises(InputError, match=r"target ' the Lord' is 2 tokens .*not one"):
        G.attribute(model, tcs, "And God said", target=" the Lord")
    graph = G.attribute(model, tcs, "And God said", target=" Jerusalem", max_n_logits=2)
    want = G.target_token(model, " Jerusalem")
    assert want in graph.logit_tokens.tolist() and graph.settings["target"] == want
    assert graph.str_tokens == model.to_str_tokens("And God said")
    probs = model(model.to_tokens("And God said"))[0, -1].softmax(-1)
    torch.testing.assert_close(graph.logit_probs, probs[graph.logit_tokens].detach(), atol=1e-5, rtol=0)


def test_batched_real_ablations_equal_single_interventions():
    model, tcs, tokens = _setup("llama", seed=4)
    graph = G.attribute(model, tcs, tokens, batch_size=32)
    nodes = list(range(0, graph.n_features, max(1, graph.n_features // 7)))[:7]
    got = G.ablation_effects(model, tcs, graph, nodes, batch_size=3)  # batches mixing layers
    with torch.no_grad():
        base = model(tokens)[0, -1]
    tok = int(graph.logit_tokens[0])
    for node, effect in zip(nodes, got.tolist()):
        layer, pos, index = graph.features[node].tolist()
        x = G.intervene(model, tcs, tokens, [G.FeatureEdit(layer, pos, index, 0.0)])[-1]
        assert effect == pytest.approx(float((x[tok] - x.mean()) - (base[tok] - base.mean())), abs=1e-5)
    assert got.abs().max() > 1e-4
    with pytest.raises(InputError, match="feature nodes only"):
        G.ablation_effects(model, tcs, graph, [graph.token_node(0)])


def test_top_paths_follow_kept_edges_to_the_logit(built):
    *_, graph = built
    pruned = G.prune(graph)
    paths = G.top_paths(graph, pruned, k=5)
    assert 0 < len(paths) <= 5
    assert [abs(p.strength) for p in paths] == sorted((abs(p.strength) for p in paths), reverse=True)
    share = graph.adjacency / graph.adjacency.abs().sum(-1, keepdim=True)
    for p in paths:
        assert p.nodes[-1] == graph.logit_node(0) and graph.node_kind(p.nodes[0]) in ("token", "error")
        edges = list(zip(p.nodes[:-1], p.nodes[1:]))
        assert all(bool(pruned.edge_mask[t, s]) for s, t in edges)
        assert p.strength == pytest.approx(float(torch.stack([share[t, s] for s, t in edges]).prod()), rel=1e-5)


def test_pruned_subgraph_keeps_rows_summing_and_round_trips(built, tmp_path):
    *_, graph = built
    pruned = G.prune(graph, 0.5, 0.9)
    small = G.subgraph(graph, pruned)
    assert small.n_features == int(pruned.node_mask[: graph.n_features].sum()) < graph.n_features
    assert small.n_nodes == small.adjacency.shape[0] and small.n_logits == graph.n_logits
    rows = torch.cat([torch.arange(small.n_features), torch.arange(small.logit_node(0), small.n_nodes)])
    incoming = small.adjacency[rows].sum(-1) + small.constant[rows]
    torch.testing.assert_close(incoming, small.target[rows], atol=1e-4, rtol=0)
    # a kept edge keeps its weight; the logit rows' error columns are the kept ones of the full graph
    kept = pruned.node_mask[: graph.n_features].nonzero().flatten()
    for i, node in enumerate(kept.tolist()[:10]):
        torch.testing.assert_close(small.adjacency[small.logit_node(0):, i],
                                   (graph.adjacency * pruned.edge_mask)[graph.logit_node(0):, node])
    back = G.AttributionGraph.load(small.save(tmp_path / "small.safetensors"))
    assert torch.equal(back.features, small.features) and back.settings["pruned_from_nodes"] == graph.n_nodes


def test_a_pruned_kjv_small_graph_file_stays_small(tmp_path):
    """Issue 16: pruned graphs stay small (a 10-token SmolLM2 graph under 5 MB; here kjv-small's shipped set):
    the pruned graph's file holds its kept edges, not a dense [n n] matrix of zeros, and loads back equal."""
    model = load_model("kjv-small")
    graph = G.attribute(model, G.load_transcoders("kjv-small"), "And God said, Let there be light: and")
    pruned = G.prune(graph)  # the defaults, 0.8 / 0.98
    small = G.subgraph(graph, pruned)
    path = small.save(tmp_path / "pruned.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert "adjacency" not in keys and "adjacency_values" in keys  # its nonzero entries, COO or bitmap
    nnz = int((small.adjacency != 0).sum())
    edges = min(12 * nnz, small.n_nodes ** 2 / 8 + 4 * nnz)
    assert path.stat().st_size < edges + 4 * 8 * small.n_nodes + 64 * 1024  # edges + per-node vectors + header
    # smaller than the pruned graph's dense matrix alone, a hundredth of the full graph's, far under 5 MB
    assert path.stat().st_size < small.n_nodes ** 2 * 4 / 2 and path.stat().st_size < graph.n_nodes ** 2 * 4 / 100
    assert path.stat().st_size < 512 * 1024
    back = G.AttributionGraph.load(path, model_name="kjv-small")
    assert torch.equal(back.adjacency, small.adjacency) and torch.equal(back.constant, small.constant)
    export = tmp_path / "pruned.json"
    export.write_text(json.dumps(G.to_circuit_tracer_json(graph, pruned)))
    assert export.stat().st_size < 1024 * 1024
    # a truncated sparse file is refused like a dense one
    (tmp_path / "cut.safetensors").write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        G.AttributionGraph.load(tmp_path / "cut.safetensors")


@pytest.mark.parametrize("keep,form", [(0.005, "adjacency_index"), (0.2, "adjacency_bits"), (1.0, "adjacency")])
def test_the_adjacency_is_stored_in_its_smallest_exact_form(built, tmp_path, keep, form):
    """Dense, int32 (row, column) pairs, or a bitmap with row-major values: whichever is smallest for the
    matrix's density, each read back exactly; a bitmap that disagrees with its values is refused."""
    *_, graph = built
    torch.manual_seed(0)
    A = torch.randn(graph.n_nodes, graph.n_nodes) * (torch.rand(graph.n_nodes, graph.n_nodes) < keep)
    g = G.AttributionGraph(**{**graph.__dict__, "adjacency": A})
    path = g.save(tmp_path / "g.safetensors")
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
    assert form in keys and not ({"adjacency", "adjacency_index", "adjacency_bits"} - {form}) & keys
    assert torch.equal(G.AttributionGraph.load(path).adjacency, A)
    if form == "adjacency_bits":
        from safetensors.torch import load_file, save_file
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
        tensors = load_file(str(path))
        tensors["adjacency_values"] = tensors["adjacency_values"][:-1]  # one value short of the bitmap
        save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
        with pytest.raises(CheckpointError, match="incomplete graph file.*marks"):
            G.AttributionGraph.load(tmp_path / "bad.safetensors")


def test_a_graph_built_in_one_thread_leaves_another_threads_gradients_alone():
    """The app shares one model between sessions, and building a graph freezes its weights for the
    replacement's backward passes. Another session's gradient work on the same model at the same time
    (attribution patching, a backward pass through the model's own weights) must give what it gives on a
    quiet model, and the weights must come back trainable when both are done."""
    import threading

    from workbench.analysis.attribution_patching import attribution_patch

    model, tcs, tokens = _setup("llama")
    model.requires_grad_(True)
    clean, corrupt = tokens, torch.randint(0, 50, tokens.shape)

    def metric(logits):
        return logits[:, 3] - logits[:, 4]

    def atp():
        return attribution_patch(model, clean, corrupt, metric).z

    def weight_grad():
        model.zero_grad(set_to_none=True)
        model(tokens)[0, -1, 3].backward()
        return model.embed.W_E.grad.clone()

    quiet_atp, quiet_grad = atp(), weight_grad()
    stop, errors, seen = threading.Event(), [], []

    def build_graphs():
        try:
            while not stop.is_set():
                G.attribute(model, tcs, tokens, batch_size=4)
        except Exception as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    builder = threading.Thread(target=build_graphs)
    builder.start()
    try:
        for _ in range(15):
            seen.append((atp(), weight_grad()))
    finally:
        stop.set()
        builder.join(120)
    assert not errors, errors
    for got_atp, got_grad in seen:
        torch.testing.assert_close(got_atp, quiet_atp)
        torch.testing.assert_close(got_grad, quiet_grad)
    assert all(p.requires_grad for p in model.parameters())
