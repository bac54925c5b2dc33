"""Attribution and patching page: direct logit attribution by layer and head, and clean -> corrupted
activation patching heatmaps."""

from __future__ import annotations

import streamlit as st
import torch

from workbench import plots
from workbench.analysis.attribution import head_attribution_grid
from workbench.app import cached, compute, figures, ui
from workbench.app.sidebar import Selection

#: the indirect-object task (Wang et al. 2022): the corrupted prompt swaps who gives
TEXT_DEFAULTS = ("When Mary and John went to the store, John gave a drink to",
                 "When Mary and John went to the store, Mary gave a drink to", " Mary", " John")
#: for models without a tokenizer: a repeated sequence whose next token is 17 by induction; the
#: corrupted prompt changes what followed the first 12 to 3
ID_DEFAULTS = ("0 17 42 5 33 21 9 50 12 17 42 5 33 21 9 50 12", "0 3 42 5 33 21 9 50 12 17 42 5 33 21 9 50 12", "17", "3")

#: patching sweeps up to this many patched runs start by themselves; bigger ones wait for the button
AUTO_PATCH_RUNS = 400

PATCH_KINDS = {"resid_pre": "residual stream (per position)", "attn_out": "attention output (per position)",
               "mlp_out": "MLP output (per position)", "z": "each head's output"}


def attribution_page(sel: Selection) -> None:
    st.title("Attribution and patching")
    model = cached.model(sel.key)
    cfg = model.cfg
    clean_default, corrupt_default, answer_default, wrong_default = (
        TEXT_DEFAULTS if model.tokenizer is not None else ID_DEFAULTS)
    text, enc = ui.prompt(sel.key, model, "attr_prompt", label="Clean prompt", default=clean_default)
    c1, c2 = st.columns(2)
    answer_text = c1.text_input("Answer token", answer_default, key="attr_answer")
    wrong_text = c2.text_input("Wrong token (empty: the answer's logit alone)", wrong_default, key="attr_wrong")
    with ui.guard():
        answer = compute.answer_id(model, answer_text)
        wrong = compute.answer_id(model, wrong_text) if wrong_text else -1
    what = "logit difference" if wrong >= 0 else "logit"

    st.subheader("Direct logit attribution")
    st.caption(f"What each component writes straight into the {what} at the last position, through the final "
               "norm's scale on this prompt and the unembedding. The parts plus a constant sum to the model's own "
               f"{what}.")
    granularity = st.radio("Granularity", ["Layers", "Heads"], horizontal=True, key="attr_granularity")
    with ui.guard(), st.spinner("Attributing…"):
        result = cached.attribution(sel.key, text, answer, wrong, "head" if granularity == "Heads" else "layer")
    m1, m2, m3 = st.columns(3)
    m1.metric(f"model's {what}", f"{float(result.logit[0]):.3f}")
    m2.metric("sum of the parts", f"{float(result.attrs[:, 0].sum()):.3f}")
    m3.metric("constant (final norm bias, b_U)", f"{float(result.constant[0]):.3f}")
    if granularity == "Heads":
        grid = head_attribution_grid(result, cfg.n_layers, cfg.n_heads)
        ui.plot(ui.categorical(plots.head_heatmap(grid, title=f"Direct attribution of each head to the {what}",
                                                  colorbar=what, diverging=True)), key="attr_heads")
        ui.plot(plots.attribution_bars(result, top=20, title="The 20 largest components"), key="attr_bars")
    else:
        ui.plot(plots.attribution_bars(result, title=f"Direct attribution to the {what} by layer"), key="attr_bars")

    st.subheader("Activation patching")
    st.caption("Run the corrupted prompt, put one activation from the clean run in its place, and measure how much "
               f"of the clean {what} comes back (1 = all of it, 0 = none).")
    corrupt_text = st.text_input("Corrupted prompt (same number of tokens)", corrupt_default, key="attr_corrupt")
    kinds = [k for k in PATCH_KINDS if not (k == "mlp_out" and cfg.attn_only)]
    kind = st.selectbox("Patch", kinds, key="attr_patch", format_func=PATCH_KINDS.get)
    with ui.guard():
        corrupt_enc = cached.encode(sel.key, corrupt_text)
        if len(corrupt_enc.ids) != len(enc.ids):
            st.warning(f"The corrupted prompt has {len(corrupt_enc.ids)} tokens, the clean one {len(enc.ids)}; "
                       "patching pairs positions one to one, so make them the same length.")
            return
        request = (sel.key, text, corrupt_text, answer, wrong, kind)
        runs = cfg.n_layers * (cfg.n_heads if kind == "z" else len(enc.ids))
        # a few hundred patched runs of a 30-layer model take a minute on a CPU: start those on request
        if runs > AUTO_PATCH_RUNS and st.session_state.get("attr_patch_request") != request:
            st.caption(f"This sweep is {runs} patched runs of a {cfg.n_layers}-layer model (each from its layer on, "
                       "batched by layer); on a CPU that can take a minute.")
            if not st.button("Run patching", key="attr_patch_go"):
                return
            st.session_state["attr_patch_request"] = request
        patched = _patch(sel, request)
    p1, p2 = st.columns(2)
    p1.metric(f"clean {what}", f"{patched.clean:.3f}")
    p2.metric(f"corrupted {what}", f"{patched.corrupt:.3f}")
    if abs(patched.clean - patched.corrupt) < 1e-6:
        st.warning(f"The clean and corrupted runs give the same {what}, so nothing can be restored; change the "
                   "corrupted prompt or the answer tokens.")
        return
    ui.plot(ui.categorical(plots.patching_heatmap(patched, [figures.show_token(s) for s in enc.str_tokens])),
            key="attr_patching")


def _patch(sel: Selection, request: tuple):
    """Return the patching result, computed layer group by layer group with a progress bar for the residual stream."""
    from workbench.analysis.patching import PatchResult

    key, clean, corrupt, answer, wrong, kind = request
    n_layers = cached.model(key).cfg.n_layers
    if kind != "resid_pre":
        with st.spinner(f"Patching every layer's {PATCH_KINDS[kind]}…"):
            return cached.patching(key, clean, corrupt, answer, wrong, kind)
    groups = [tuple(range(lo, min(lo + 5, n_layers))) for lo in range(0, n_layers, 5)]
    bar = st.progress(0.0, text="Patching the residual stream…") if len(groups) > 1 else None
    parts = []
    for i, layers in enumerate(groups):
        parts.append(cached.patching(key, clean, corrupt, answer, wrong, kind, layers))
        if bar is not None:
            bar.progress((i + 1) / len(groups), text=f"Patched layers up to {layers[-1]}")
    if bar is not None:
        bar.empty()
    return PatchResult(kind, torch.cat([p.scores for p in parts]), parts[0].clean, parts[0].corrupt)
