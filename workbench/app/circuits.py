"""Circuit tracing page: a prompt's attribution graph through the model's transcoders (Ameisen et al. 2025).

Prompt in, graph out: the pruned graph drawn by layer (rows) and position (columns), edges above a
slider's share of the largest weight, logit nodes on top. Choosing a node opens its card (a feature's
top contexts on the model's corpus with the token highlighted, the logits its decoder row promotes,
its strongest inputs and outputs in the graph); a feature can be steered from its card (its
activation scaled in the real model) and the next-token distribution compared with what the graph
predicts. Nodes can be grouped into labelled supernodes, kept per graph in ``st.session_state``.
Graphs, contexts and interventions are cached (``workbench.app.cached``), so the sliders rerun nothing.
"""

from __future__ import annotations

import html

import pandas as pd
import streamlit as st
import torch

from workbench import graph_plots, paths
from workbench.app import cached, ui
from workbench.app.sidebar import Selection

#: features kept by default (by influence): a kjv-small prompt has ~1,000 active ones, ~15 backward passes;
#: 256 takes ~5, which keeps the page interactive on two cores
DEFAULT_BUDGET = 256


def shipped_set(model_name: str) -> str | None:
    """The name of the transcoder set shipped for a model (``data/transcoders/<name>``), if there is one."""
    return model_name if (paths.DATA_DIR / "transcoders" / model_name).is_dir() else None


def _transcoders(sel: Selection) -> str | None:
    shipped = shipped_set(sel.name)
    spec = st.text_input("Transcoder set", value=shipped or "", key="circuit_transcoders",
                         help="a directory written by `workbench train-transcoders`, or a shipped set's name")
    if not spec.strip():
        st.info(f"No transcoder set is shipped for {sel.name}. Train one with `workbench train-transcoders "
                f"{sel.name} --out DIR` and give DIR above (kjv-small ships with one).")
        return None
    return spec.strip()


def circuits_page(sel: Selection) -> None:
    st.title("Circuit tracing")
    st.caption("Every MLP is replaced by its transcoder, attention patterns and norm scales are frozen at this "
               "prompt's values, and an error node per layer and position holds what the transcoder misses, so the "
               "replacement reproduces the model exactly. Edges are direct effects through those frozen linear "
               "paths; pruning keeps the nodes and edges carrying most of the influence on the top logits.")
    model = cached.model(sel.key)
    if model.cfg.attn_only:
        st.info(f"{sel.name} is attention-only: there are no MLPs to replace with transcoders. Pick kjv-small.")
        return
    spec = _transcoders(sel)
    if spec is None:
        return
    text, _ = ui.prompt(sel.key, model, "circuit_prompt")
    c1, c2, c3 = st.columns(3)
    node_threshold = c1.slider("Node threshold", 0.1, 1.0, 0.8, 0.01, key="circuit_node_threshold",
                               help="keep the nodes holding this share of the influence on the logits")
    edge_threshold = c2.slider("Edge threshold", 0.1, 1.0, 0.98, 0.01, key="circuit_edge_threshold")
    max_features = c3.number_input("Feature budget (0: all)", 0, 100_000, DEFAULT_BUDGET, key="circuit_budget",
                                   help="keep this many features, the most influential on the logits: fewer "
                                        "backward passes, so the graph comes sooner")
    from workbench.analysis import graph as G

    with ui.guard():
        with st.spinner("Tracing the graph…"):
            graph, seconds = cached.attribution_graph(sel.key, spec, text, int(max_features))
        pruned = G.prune(graph, node_threshold, edge_threshold)
    full, kept = G.graph_scores(graph), G.graph_scores(graph, pruned)
    n_kept = int(pruned.node_mask.sum())
    m = st.columns(5)
    m[0].metric("Active features", graph.n_features)
    m[1].metric("Nodes kept", f"{n_kept} / {graph.n_nodes}")
    m[2].metric("Replacement score", f"{kept.replacement:.3f}", f"{kept.replacement - full.replacement:+.3f} pruning")
    m[3].metric("Completeness", f"{kept.completeness:.3f}", f"{kept.completeness - full.completeness:+.3f} pruning")
    m[4].metric("Built in", f"{seconds:.2f} s")
    st.caption("Top logits: " + ", ".join(f"{graph.logit_label(i)!r} {float(p):.3f}"
                                          for i, p in enumerate(graph.logit_probs)))

    groups = _supernodes(graph)
    labels = {n: label for label, nodes in groups for n in nodes}
    shown = [int(n) for n in pruned.node_mask.nonzero().flatten() if graph.node_kind(int(n)) in ("feature", "error")]
    shown.sort(key=lambda n: -float(pruned.influence[n]))
    choices = shown + [graph.logit_node(i) for i in range(graph.n_logits)]
    node = st.selectbox("Node", choices, format_func=lambda n: _describe(graph, pruned, n, labels), key="circuit_node")
    share = st.slider("Draw edges above this share of the largest weight", 0.0, 1.0, 0.05, 0.01, key="circuit_edges")
    ui.plot(graph_plots.graph_figure(graph, pruned, share, labels={n: f"[{lab}] {graph.node_label(n)}"
                                                                     for n, lab in labels.items()},
                                     selected=node, title=f"attribution graph of {text!r}"), key="circuit_graph")
    if node is not None:
        _card(sel, spec, text, model, graph, pruned, int(node))
    _supernode_editor(graph, pruned, shown, groups)


def _describe(graph, pruned, node: int, labels: dict[int, str]) -> str:
    tag = f"[{labels[node]}] " if node in labels else ""
    return f"{tag}{graph.node_label(node)}  (influence {float(pruned.influence[node]):.3f})"


def _edges_table(graph, values: torch.Tensor, k: int = 8) -> pd.DataFrame:
    order = values.abs().argsort(descending=True)[:k]
    return pd.DataFrame({"node": [graph.node_label(int(i)) for i in order if float(values[i]) != 0],
                         "weight": [float(values[i]) for i in order if float(values[i]) != 0]})


def _card(sel, spec, text, model, graph, pruned, node: int) -> None:
    from workbench.analysis import graph as G

    kind = graph.node_kind(node)
    st.subheader(graph.node_label(node))
    inputs, outputs = graph.adjacency[node], graph.adjacency[:, node]
    if kind == "feature":
        layer, pos, index = graph.features[node].tolist()
        st.caption(f"Feature {index} of layer {layer}'s transcoder at position {pos} "
                   f"({graph.str_tokens[pos]!r}), activation {float(graph.activations[node]):.3f}.")
        ctx_col, logit_col = st.columns(2)
        with ctx_col:
            st.markdown("**Top contexts** (the token where it fires most, highlighted)")
            with st.spinner("Reading the corpus…"):
                windows, top = cached.transcoder_contexts(sel.key, spec, layer)
            rows = []
            for v, w, p in zip(top.values[index].tolist(), top.window[index].tolist(), top.pos[index].tolist()):
                if v <= 0:
                    continue
                toks = model.to_str_tokens(windows[w, max(0, p - 10): p + 3]) if model.tokenizer else []
                at = min(p, 10)
                snippet = "".join(html.escape(t) if i != at else f"<mark>{html.escape(t)}</mark>"
                                  for i, t in enumerate(toks))
                rows.append(f"`{v:.2f}` {snippet}")
            st.markdown("<br>".join(rows) if rows else "_silent on the corpus sample_", unsafe_allow_html=True)
        with logit_col:
            ids, values = G.promoted_logits(model, cached.transcoder_set(spec)[layer], index)
            st.markdown("**Promoted logits** (decoder row through the unembedding)")
            st.dataframe(pd.DataFrame({"token": model.to_str_tokens(ids) if model.tokenizer else ids.tolist(),
                                       "logit": values.tolist()}), hide_index=True, key="circuit_promoted")
    elif kind == "error":
        layer, pos = divmod(node - graph.n_features, graph.n_pos)
        norm = float(graph.error_norms[layer, pos])
        st.caption(f"What layer {layer}'s transcoder misses at position {pos}: norm {norm:.3f}.")
    else:
        i = node - graph.logit_node(0)
        st.caption(f"Logit {graph.logit_label(i)!r}: probability {float(graph.logit_probs[i]):.3f}.")
    a, b = st.columns(2)
    a.markdown("**Strongest inputs**")
    a.dataframe(_edges_table(graph, inputs), hide_index=True, key="circuit_inputs")
    b.markdown("**Strongest outputs**")
    b.dataframe(_edges_table(graph, outputs), hide_index=True, key="circuit_outputs")
    if kind == "feature":
        _steer(sel, spec, text, model, graph, node)


def _steer(sel, spec, text, model, graph, node: int) -> None:
    """Scale the feature in the real model; compare the logit nodes with what the graph's direct effects predict."""
    from workbench.analysis import graph as G

    layer, pos, index = graph.features[node].tolist()
    st.markdown("**Steer this feature** (its activation times the multiplier, in the real model)")
    mult = st.slider("Multiplier", -5.0, 10.0, 0.0, 0.5, key="circuit_steer")
    edit = (layer, pos, index, float(mult), True)
    with ui.guard():
        before = cached.feature_edit_logits(sel.key, spec, text, ())
        after = cached.feature_edit_logits(sel.key, spec, text, (edit,))
    predicted = G.predicted_logit_change(graph, [G.FeatureEdit(*edit)])
    demean = lambda x: x - x.mean()  # noqa: E731
    real = (demean(after) - demean(before))[graph.logit_tokens]
    p0, p1 = before.softmax(-1), after.softmax(-1)
    st.dataframe(pd.DataFrame({
        "token": [graph.logit_label(i) for i in range(graph.n_logits)],
        "p before": p0[graph.logit_tokens].tolist(), "p after": p1[graph.logit_tokens].tolist(),
        "logit change (real)": real.tolist(), "graph's direct effect": predicted.tolist()}),
        hide_index=True, key="circuit_steer_table")
    top = p1.topk(5)
    names = model.to_str_tokens(top.indices) if model.tokenizer else [str(int(i)) for i in top.indices]
    st.caption("Next token after steering: " + ", ".join(f"{t!r} {float(p):.3f}" for t, p in zip(names, top.values)))


# ---------------------------------------------------------------------------------------------- supernodes


def _graph_id(graph) -> tuple:
    return (graph.model_name, tuple(graph.tokens.tolist()), graph.n_features)


def _supernodes(graph) -> list[tuple[str, list[int]]]:
    return st.session_state.setdefault("circuit_supernodes", {}).get(_graph_id(graph), [])


def _supernode_editor(graph, pruned, shown: list[int], groups: list[tuple[str, list[int]]]) -> None:
    st.subheader("Supernodes")
    st.caption("Group nodes that play one role (say, every 'Paris'-related feature) under a label; the graph "
               "shows the label on each member.")
    with st.form("circuit_supernode_form", clear_on_submit=True):
        members = st.multiselect("Nodes", shown, format_func=graph.node_label, key="circuit_members")
        label = st.text_input("Label", key="circuit_label")
        if st.form_submit_button("Add supernode"):
            if members and label.strip():
                memo = st.session_state.setdefault("circuit_supernodes", {})
                memo[_graph_id(graph)] = [*groups, (label.strip(), [int(n) for n in members])]
                st.rerun()
            else:
                st.warning("Choose at least one node and give the group a label.")
    if groups:
        st.dataframe(pd.DataFrame({
            "supernode": [lab for lab, _ in groups],
            "nodes": [", ".join(graph.node_label(n) for n in nodes) for _, nodes in groups],
            "influence": [float(pruned.influence[nodes].sum()) for _, nodes in groups]}),
            hide_index=True, key="circuit_groups")
        if st.button("Clear supernodes", key="circuit_clear"):
            st.session_state["circuit_supernodes"].pop(_graph_id(graph), None)
            st.rerun()
