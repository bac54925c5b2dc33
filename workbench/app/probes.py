"""Probes & steering page: probe accuracy by layer, examples projected on a probe direction, and generation side
by side with and without a steering vector (multiplier on a slider).

Probe runs are kept in ``st.session_state`` keyed on (model key, dataset, hook kind), so moving the layer slider
only re-projects the kept activations; the model runs again only for a new dataset or model."""

from __future__ import annotations

import streamlit as st
import torch

from workbench import generate, probe_plots
from workbench.analysis import probes as P
from workbench.analysis.probe_data import read_positions
from workbench.analysis.steering import contrast_vector
from workbench.app import cached, figures, ui
from workbench.app.sidebar import Selection
from workbench.commands.probe import dataset

DATASETS = {"sentiment": "sentiment verdicts (128, quick)", "capitals": "capitals of countries, true/false (640)",
            "arithmetic": "sums, true/false (150)", "comparisons": "number comparisons, true/false (150)",
            "truth": "all three true/false families (940)"}
KINDS = ("resid_post", "resid_pre", "attn_out", "mlp_out")


def _probe_run(sel: Selection, model, name: str, kind: str):
    """Return (dataset, LayerProbes, activations [layer batch d_model]) for a dataset, computed once per session."""
    memo = st.session_state.setdefault("probe_runs", {})
    key = (sel.key, name, kind)
    if key not in memo:
        ds = dataset(name)
        hooks = P.probe_hooks(model, kind)
        bar = st.progress(0.0, text="Reading activations…")
        reads = read_positions(model, ds)
        acts = P.collect_activations(model, reads, hooks)
        bar.progress(0.05, text="Training probes…")
        res = P.train_probes(acts, ds.labels, hooks, reads.types, P.ProbeConfig(),
                             progress=lambda done, total: bar.progress(
                                 0.05 + 0.95 * done / total, text=f"Training probes: layer {done} of {total}"))
        bar.empty()
        memo.clear()  # one run per session: activations of a large model are big
        memo[key] = (ds, res, acts)
    return memo[key]


def _contrast(sel: Selection, model, name: str, layer: int):
    memo = st.session_state.setdefault("steer_vectors", {})
    key = (sel.key, name, layer)
    if key not in memo:
        memo[key] = contrast_vector(model, dataset(name), layer)
    return memo[key]


def probes_page(sel: Selection) -> None:
    st.title("Probes & steering")
    model = cached.model(sel.key)
    if model.tokenizer is None:
        st.info("Probes read labelled texts; this model has no tokenizer. "
                "Pick a model with one (kjv-small, smollm2-135m).")
        return
    st.caption("A linear probe per layer reads a label from the residual stream at each text's last token: logistic "
               "regression (cross-validated) and the class mean difference, scored on a held-out quarter. The "
               "control task gives each token type a random label (Hewitt & Liang); selectivity is task minus control.")
    probes_tab, steer_tab = st.tabs(["Probes", "Steering"])
    with probes_tab:
        _probes(sel, model)
    with steer_tab:
        _steering(sel, model)


def _probes(sel: Selection, model) -> None:
    c1, c2 = st.columns(2)
    name = c1.selectbox("Dataset", list(DATASETS), format_func=DATASETS.get, key="probe_dataset")
    kind = c2.selectbox("Hook", KINDS, key="probe_kind")
    run_key = (sel.key, name, kind)
    if run_key not in st.session_state.get("probe_runs", {}) and not st.button("Train probes", key="probe_go"):
        st.caption("Reads every layer once, then trains two probes and a control per layer.")
        return
    with ui.guard():
        ds, res, acts = _probe_run(sel, model, name, kind)
    b = res.best
    m1, m2, m3 = st.columns(3)
    m1.metric("best layer", f"{b}")
    m2.metric("held-out accuracy", f"{float(res.accuracy[b]):.3f}")
    m3.metric("selectivity", f"{float(res.selectivity[b]):+.3f}")
    ui.plot(probe_plots.probe_accuracy_figure(res, f"Probe accuracy by layer: {ds.name}"), key="probe_acc")
    layer = st.slider("Layer to project on", 0, len(res.hooks) - 1, b, key="probe_layer")
    method = st.radio("Direction", ["logistic", "mean_diff"], horizontal=True, key="probe_method",
                      format_func=lambda m: "logistic probe" if m == "logistic" else "mean difference")
    direction = res.direction(layer, method)
    proj = acts[layer] @ direction.vector
    ui.plot(probe_plots.projection_figure(proj, ds.labels, ds.label_names,
                                          f"Examples projected on the layer-{layer} {method} direction"),
            key="probe_proj")
    st.dataframe(res.frame().drop(columns=["hook"]), hide_index=True)


def _steering(sel: Selection, model) -> None:
    n_layers = model.cfg.n_layers
    c1, c2 = st.columns(2)
    name = c1.selectbox("Contrast set (label 1 minus label 0)", list(DATASETS), format_func=DATASETS.get,
                        key="steer_set")
    layer = c2.slider("Layer (residual stream after the block)", 0, n_layers - 1, round(0.4 * n_layers),
                      key="steer_layer")
    text = st.text_input("Prompt", "I went to the new restaurant in town yesterday, and", key="steer_text")
    c3, c4 = st.columns(2)
    mult = c3.slider("Multiplier", -4.0, 8.0, 1.0, 0.25, key="steer_mult")
    n_new = c4.slider("New tokens", 1, 48, 24, key="steer_n")
    with ui.guard(), st.spinner("Building the contrast vector…"):
        vec = _contrast(sel, model, name, int(layer))
    st.caption(f"Adds multiplier × (mean of label-1 texts − mean of label-0 texts) at `{vec.hook}` on every position, "
               f"prompt and each new token. Vector norm {vec.meta['norm']:.2f}; the residual there has mean norm "
               f"{vec.meta['resid_norm']:.1f}.")
    if not st.button("Generate with and without steering", key="steer_gen"):
        return
    with ui.guard():
        ids = cached.encode(sel.key, text).ids
    cols = st.columns(2)
    for col, hooks, title in ((cols[0], [], "without steering"), (cols[1], vec.hooks(mult), f"multiplier {mult:g}")):
        with col, ui.guard():
            st.markdown(f"**{title}**")
            out = st.empty()
            pieces: list[str] = []
            events = generate.stream_generate(model, torch.tensor(ids), int(n_new), stop_tokens=[], fwd_hooks=hooks)
            for event in events:
                pieces.append(event.text)
                out.markdown(figures.generated_text_html(text, "".join(pieces)), unsafe_allow_html=True)
            st.session_state[f"steer_text_{'on' if hooks else 'off'}"] = "".join(pieces)
