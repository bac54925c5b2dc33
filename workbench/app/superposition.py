"""Superposition page: a toy model (Elhage et al. 2022) trained live from the sliders, its geometry plotted."""

from __future__ import annotations

import time

import streamlit as st

from workbench.app import cached, compute, figures, share, ui
from workbench.app.sidebar import Selection


def superposition_page(sel: Selection) -> None:  # noqa: ARG001 - the toy model needs no language model
    st.title("Superposition")
    st.caption("n sparse features x (each present with probability 1 − sparsity, uniform in [0, 1]) squeezed through "
               "m < n hidden dimensions and read back with ReLU(WᵀW x + b). Feature i's loss weighs importance "
               "decayᶦ. Dense features: the model keeps the m most important ones. Sparse features: it packs more "
               "than m, at angles that interfere little (antipodal pairs, pentagons).")
    c1, c2 = st.columns(2)
    n_features = c1.slider("Features", 2, 20, 5, key="sup_features", bind=share.URL)
    d_hidden = c2.slider("Hidden dimensions", 1, 10, 2, key="sup_dims", bind=share.URL)
    c3, c4, c5 = st.columns(3)
    sparsity = c3.slider("Sparsity", 0.0, 0.99, 0.9, 0.01, key="sup_sparsity", bind=share.URL)
    decay = c4.slider("Importance decay", 0.5, 1.0, 0.9, 0.01, key="sup_decay", bind=share.URL)
    steps = c5.slider("Training steps", 200, 5000, 1000, 100, key="sup_steps", bind=share.URL)
    start = time.perf_counter()
    with ui.guard(), st.spinner(f"Training the toy model ({steps} steps)…"):
        toy, geo = cached.toy_model(n_features, d_hidden, round(sparsity, 4), round(decay, 4), steps)
    took = time.perf_counter() - start
    m1, m2, m3 = st.columns(3)
    m1.metric("features represented (norm > 0.5)", f"{int(geo.n_represented[0])} of {n_features}")
    m2.metric("dimensions per feature", f"{float(geo.dimensions_per_feature[0]):.2f}")
    m3.metric("hidden dimensions", d_hidden)
    importance = compute.importance_profile(n_features, decay).tolist()
    share.plot(figures.toy_geometry_figure(toy.W[0], importance), key="sup_geometry")
    share.plot(figures.toy_norms_figure(geo.norms[0].tolist(), geo.fractional_dimensionality[0].tolist()),
               key="sup_norms")
    if d_hidden == 2:
        share.plot(figures.matrix_heatmap(toy.W[0].T @ toy.W[0], "WᵀW: each feature's overlap with every other",
                                       "feature", "feature"), key="sup_gram")
    st.caption(f"Trained in {took:.1f} s (0 when these settings were trained before). Fractional dimensionality "
               "D_i = ‖W_i‖² / Σⱼ (Ŵ_i·W_j)²: 1 for a dimension of its own, ½ for an antipodal pair, ⅖ for a "
               "pentagon.")
