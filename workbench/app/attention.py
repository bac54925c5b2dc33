"""Attention page: one head's pattern, the grid of all heads, head-type scores."""

from __future__ import annotations

import streamlit as st
import torch

from workbench import plots
from workbench.app import cached, figures, ui
from workbench.app.sidebar import Selection

SCORES = ["previous token", "duplicate token", "induction", "first token"]


def attention_page(sel: Selection) -> None:
    st.title("Attention patterns")
    model = cached.model(sel.key)
    cfg = model.cfg
    text, enc = ui.prompt(sel.key, model, "attn_prompt")
    # one forward pass per (model, prompt); choosing a layer or head below only slices its result
    with st.spinner("Running the model…"):
        patterns = cached.attention_patterns(sel.key, text)
    c1, c2 = st.columns(2)
    layer = c1.slider("Layer", 0, cfg.n_layers - 1, 0, key="attn_layer") if cfg.n_layers > 1 else 0
    head = c2.slider("Head", 0, cfg.n_heads - 1, 0, key="attn_head") if cfg.n_heads > 1 else 0
    ui.plot(figures.attention_heatmap(patterns[layer, head], enc.str_tokens, f"Layer {layer}, head {head}"),
            key="attn_one")
    tab_grid, tab_scores = st.tabs(["All heads", "Head-type scores"])
    with tab_grid:
        if cfg.n_layers > 32:
            st.caption("Showing the first 32 layers.")
        ui.plot(figures.attention_grid(patterns), key="attn_grid")
    with tab_scores:
        scores = cached.head_scores(sel.key, text)
        st.caption("Mean attention of each head to: the previous token; earlier copies of the current token; the "
                   "token after an earlier copy (induction); the first token. Scores need a prompt with repeats "
                   "for the duplicate and induction columns.")
        grids = {c: torch.tensor(scores.pivot(index="layer", columns="head", values=c).values) for c in SCORES}
        ui.plot(ui.categorical(plots.head_scores_figure(grids, title="Head-type scores on this prompt")),
                key="attn_scores")
        st.dataframe(scores.sort_values("induction", ascending=False).head(12).style.format(precision=3),
                     hide_index=True)
