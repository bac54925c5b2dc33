"""Attention page: one head's pattern, the grid of all heads (click one to open it), head-type scores."""

from __future__ import annotations

import streamlit as st
import torch

from workbench import plots
from workbench.app import cached, figures, share, ui
from workbench.app.dynamics import across_training
from workbench.app.sidebar import Selection

SCORES = ["previous token", "duplicate token", "induction", "first token"]
#: the grid shows this many layers at a time (SmolLM2's 30 layers at once make tiles too small to read)
GRID_LAYERS = 8


def _open_clicked_head(n_layers: int, n_heads: int) -> None:
    """Point the layer and head sliders at the head last clicked (or box-selected) in the grid.

    The grid is drawn below the sliders, so its selection from the previous run is read here, before
    they are; a selection is applied once, so moving a slider afterwards is not undone.
    """
    state = st.session_state.get("attn_grid")
    points = [p for p in ((state or {}).get("selection") or {}).get("points", []) if p.get("customdata")]
    if not points:
        return
    layer, head = (int(v) for v in points[0]["customdata"][:2])
    if st.session_state.get("attn_grid_opened") == (layer, head) or not (0 <= layer < n_layers and 0 <= head < n_heads):
        return
    st.session_state["attn_grid_opened"] = (layer, head)
    if n_layers > 1:
        st.session_state["attn_layer"] = layer
    if n_heads > 1:
        st.session_state["attn_head"] = head


def attention_page(sel: Selection) -> None:
    st.title("Attention patterns")
    model = cached.model(sel.key)
    cfg = model.cfg
    text, enc = ui.prompt(sel.key, model, "attn_prompt")
    # one forward pass per (model, prompt); choosing a layer or head below only slices its result
    with st.spinner("Running the model…"):
        patterns = cached.attention_patterns(sel.key, text)
    _open_clicked_head(cfg.n_layers, cfg.n_heads)
    c1, c2 = st.columns(2)
    layer = c1.slider("Layer", 0, cfg.n_layers - 1, key="attn_layer", bind=share.URL) if cfg.n_layers > 1 else 0
    head = c2.slider("Head", 0, cfg.n_heads - 1, key="attn_head", bind=share.URL) if cfg.n_heads > 1 else 0
    tokens = figures.token_texts(model.tokenizer, enc.ids, enc.str_tokens)  # bytes, not "�", for split characters
    share.plot(figures.attention_heatmap(patterns[layer, head], tokens, f"Layer {layer}, head {head}"),
               key="attn_one")
    tab_grid, tab_scores = st.tabs(["All heads", "Head-type scores"])
    with tab_grid:
        shown = range(cfg.n_layers)
        if cfg.n_layers > GRID_LAYERS:
            lo, hi = st.slider("Layers in the grid", 0, cfg.n_layers - 1, (0, GRID_LAYERS - 1), key="attn_grid_layers",
                               help=f"{GRID_LAYERS} layers at a time keep each head's tile large enough to read")
            shown = range(lo, hi + 1)
        st.caption("Click a head's red marker (or drag a box around it) to open it above. Hover names the head, "
                   "the query and the key.")
        share.plot(figures.attention_grid(patterns, tokens, shown), key="attn_grid", on_select="rerun")
    with tab_scores:
        scores = cached.head_scores(sel.key, text)
        st.caption("Mean attention of each head to: the previous token; earlier copies of the current token; the "
                   "token after an earlier copy (induction); the first token. Scores need a prompt with repeats "
                   "for the duplicate and induction columns.")
        grids = {c: torch.tensor(scores.pivot(index="layer", columns="head", values=c).values) for c in SCORES}
        share.plot(ui.categorical(plots.head_scores_figure(grids, title="Head-type scores on this prompt")),
                   key="attn_scores")
        st.dataframe(scores.sort_values("induction", ascending=False).head(12).style.format(precision=3),
                     hide_index=True)

    across_training(sel, "attention")  # a slider over the training snapshots, where the model has them
