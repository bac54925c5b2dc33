"""SAE features page: pick an SAE or a transcoder (or train a quick SAE), browse its features, list the features
active on a prompt, and steer generation along a feature's direction.

A transcoder (a layer of a shipped or home transcoder set, or one in the runs directory) reads the MLP's input and
writes its output: its features are read at ``blocks.L.mlp.hook_in``, their logit effects and steering are taken
where they write (``blocks.L.hook_mlp_out``). Without an activation store its features are read on the fly from the
model's own corpus."""

from __future__ import annotations

import pandas as pd
import streamlit as st
import torch

from workbench import generate, paths
from workbench.app import cached, compute, figures, share, ui
from workbench.app.sidebar import Selection


def sae_page(sel: Selection) -> None:
    st.title("SAE features")
    model = cached.model(sel.key)
    _train_form(sel, model)
    saes = compute.find_saes(sel.name, model.cfg.d_model)
    if not saes:
        st.info(f"No SAE for {sel.name} in {paths.runs_dir()} yet. Train a quick one above, or from the shell: "
                f"`workbench cache {sel.name} --hooks blocks.L.hook_resid_post --tokens 200000` then "
                "`workbench train-sae --store DIR`.")
        return
    by_path = {str(s.path): s for s in saes}
    if st.session_state.get("sae_new") in by_path:  # a run just finished: show it
        st.session_state["sae_pick"] = st.session_state.pop("sae_new")
    if st.session_state.get("sae_pick") not in by_path:
        st.session_state["sae_pick"] = str(saes[0].path)
    picked = st.sidebar.selectbox("SAE", list(by_path), key="sae_pick", format_func=lambda p: by_path[p].label,
                                  help="SAEs under the runs directory made for this model, and the layers of its "
                                       "transcoder sets (shipped, or trained under the workbench home)")
    info = by_path[picked]
    with ui.guard():
        sae = cached.sae(sel.key, picked)
    if info.is_transcoder:
        st.caption(f"{info.label}; a transcoder: reads `{info.hook}` (what the MLP reads) and writes "
                   f"`{info.steer_hook}` (what the MLP writes).")
    else:
        st.caption(f"{info.label}; reads `{info.hook}`.")
    browser, prompt_view, steering = st.tabs(["Feature browser", "Prompt view", "Steering"])
    with browser:
        feature = _browser(sel, model, info, sae)
    with prompt_view:
        _prompt_view(sel, model, info, feature)
    with steering:
        _steering(sel, model, info, sae, feature)


def _train_form(sel: Selection, model) -> None:
    cfg = model.cfg
    with st.expander("Train a quick SAE", expanded=False):
        st.caption(f"Caches the residual stream after one block on a small corpus "
                   f"({_corpus_name(sel.name, model)}), trains a TopK SAE on it, and saves it in SAELens' layout "
                   "under the runs directory. It runs in the background: a minute or two for the small built-in "
                   "models on a CPU, several minutes for SmolLM2.")
        c1, c2, c3 = st.columns(3)
        layer = c1.number_input("Layer", 0, cfg.n_layers - 1, cfg.n_layers // 2, key="sae_layer")
        # 1024: on SmolLM2 (16,384 tokens, k=16, 300 steps) 0.1% of them stay dead (benchmarks/bench_quick_sae.py)
        d_sae = c2.number_input("Latents", 16, 16384, min(1024, 8 * cfg.d_model), key="sae_dsae")
        k = c3.number_input("k (active latents per token)", 1, 256, 16, key="sae_k")
        c4, c5 = st.columns(2)
        n_tokens = c4.number_input("Tokens to cache", 1024, 200_000, 16_384, 1024, key="sae_tokens")
        steps = c5.number_input("Training steps", 10, 5000, 300, 10, key="sae_steps")
        if st.button("Train SAE", key="sae_train"):  # a background job: progress, time left, cancel
            st.session_state["sae_job"] = cached.quick_sae_job(sel.key, sel.name, int(layer), int(n_tokens),
                                                               int(d_sae), int(k), int(steps)).key
    _quick_sae_status()


def _corpus_name(name: str, model) -> str:
    if model.tokenizer is None:
        return "repeated random tokens: this model has no tokenizer"
    corpus = compute.quick_sae_corpus(name)
    return {"pydocs": "Python's documentation", "kjv": "the King James Bible, this model's training text"}.get(
        corpus, corpus)


def _quick_sae_status() -> None:
    """Show this session's quick-SAE job: its progress while it runs; once done, pick the new SAE."""
    job = cached.jobs().get(st.session_state.get("sae_job"))
    run = ui.job_status(job, "sae_job") if job is not None else None
    if run is None:
        return
    if st.session_state.get("sae_job_seen") != job.key:  # a run just finished: show it
        st.session_state["sae_job_seen"] = job.key
        st.session_state["sae_new"] = str(run.sae_dir)
    st.success(f"Saved to {run.sae_dir}: MSE {run.metrics.get('mse', float('nan')):.4g}, "
               f"L0 {run.metrics.get('l0', float('nan')):.1f}")


def _browser(sel: Selection, model, info: compute.SAEInfo, sae) -> int:
    d_sae = sae.cfg.d_sae
    if info.store is not None:
        with ui.guard(), st.spinner("Computing feature statistics (one pass over the store, saved for next time)…"):
            stats = cached.feature_stats(sel.key, str(info.path), str(info.store), info.hook)
        table = _latent_table(model, info, stats)
        read_on = f"the {stats.n_rows:,} tokens of the store"
    elif info.is_transcoder:  # no store (a shipped set has none): read the model's own corpus on the fly
        corpus = _corpus_name(sel.name, model)
        with ui.guard(), st.spinner(f"Reading {compute.LIVE_TOKENS:,} tokens of {corpus} through the transcoder…"):
            stats = cached.live_features(sel.key, str(info.path), info.hook)
        labels = compute.live_latent_labels(model, stats)
        table = figures.latent_table(stats.density, stats.max_act, labels.fires_on,
                                     [" ".join(figures.show_token(t) for t in row) for row in labels.raises])
        read_on = f"the {stats.n_rows:,} tokens of {corpus} read for it"
    else:
        st.warning("The activation store this SAE was trained on is not on this machine (its metadata names "
                   "none, or it was deleted), so there are no activation statistics to browse. The prompt view "
                   "and steering still work.")
        return int(st.number_input("Feature", 0, d_sae - 1, 0, key="sae_feature", bind=share.URL))
    live = int((stats.density > 0).sum())
    if st.session_state.get("sae_feature", 0) >= d_sae:  # another SAE was picked: start over
        del st.session_state["sae_feature"]
    if "sae_feature" not in st.session_state:  # open on a live latent that fires on a word, not on whitespace
        st.session_state["sae_feature"] = figures.opening_latent(table)
    _latent_finder(table)
    feature = st.slider("Feature", 0, d_sae - 1, key="sae_feature", bind=share.URL)
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("density", f"{float(stats.density[feature]):.3%}")
    m2.metric("mean activation (when firing)", f"{float(stats.mean_active[feature]):.3g}")
    m3.metric("max activation", f"{float(stats.max_act[feature]):.3g}")
    # a plain figure, not a change: no delta arrow
    m4.metric("live latents", f"{live} of {d_sae}", f"{stats.dead_fraction:.0%} dead", delta_color="off",
              delta_arrow="off")
    card_figs = [figures.density_histogram(torch.log10(stats.density).tolist(), feature)]
    c1, c2 = st.columns(2)
    with c1:
        share.plot(card_figs[0], key="sae_density")
    with c2:
        if stats.density[feature] > 0:
            card_figs.append(figures.activation_histogram(stats.hist_edges.tolist(),
                                                          stats.hist_counts[feature].tolist(), feature))
            share.plot(card_figs[-1], key="sae_hist")
        else:
            st.info(f"Latent {feature} never fired on {read_on} (a dead latent).")
    st.markdown("**Top activating contexts** (orange: the latent's activation on each token)")
    if info.store is not None:
        rows = tuple(int(r) for r in stats.top_rows[feature][:8] if r >= 0)
        contexts_html = _contexts(sel, model, info, feature, rows)
        quantiles = stats.quantile_rows(feature, 5)
        if quantiles:
            with st.expander("Samples across the activation range (quantiles)"):
                _contexts(sel, model, info, feature, tuple(r for _, r, _ in quantiles))
    else:
        with ui.guard():
            contexts = cached.live_contexts(sel.key, str(info.path), info.hook, feature)
        contexts_html = _show_contexts(model, contexts)
    if stats.logit_top_ids is not None:
        if info.is_transcoder:
            st.caption(f"Logit effects of what the latent writes: its decoder row at `{info.steer_hook}` through the "
                       "final norm's gain and the unembedding (`W_dec @ W_U`).")
        top = [compute.token_label(model, int(i)) for i in stats.logit_top_ids[feature]]
        bottom = [compute.token_label(model, int(i)) for i in stats.logit_bottom_ids[feature]]
        card_figs.append(figures.logit_effects_figure(top, stats.logit_top_values[feature].tolist(), bottom,
                                                      stats.logit_bottom_values[feature].tolist(), feature))
        share.plot(card_figs[-1], key="sae_logits")
    facts = {"SAE": info.label, "hook": info.hook, "model": sel.name, "latent": str(feature),
             "density": f"{float(stats.density[feature]):.3%}",
             "mean activation (when firing)": f"{float(stats.mean_active[feature]):.3g}",
             "max activation": f"{float(stats.max_act[feature]):.3g}",
             "live latents in this SAE": f"{live} of {d_sae}",
             "store tokens" if info.store is not None else "corpus tokens read": f"{stats.n_rows:,}"}
    if info.is_transcoder:
        facts["writes to"] = info.steer_hook
    title = f"{sel.name} · {info.hook} · latent {feature}"
    st.download_button("Download this latent's card (standalone HTML, works offline)",
                       lambda: figures.feature_card_html(title, facts, card_figs, contexts_html),
                       file_name=f"latent-{feature}.html", mime="text/html", key="sae_card",
                       on_click="ignore", icon=":material/download:")
    if stats.neighbour_ids is not None:
        st.markdown("**Nearest latents by decoder cosine**")
        ids = stats.neighbour_ids[feature].tolist()
        st.dataframe(pd.DataFrame({"latent": ids, "cosine": stats.neighbour_cos[feature].tolist(),
                                   "density": [float(stats.density[i]) for i in ids]}), hide_index=True)
    return feature


def _latent_table(model, info: compute.SAEInfo, stats):
    """Return :func:`figures.latent_table` of an SAE: the token each latent fires on most (read from the
    store's windows) and the three tokens it raises most."""
    store = cached.store(str(info.store))
    rows = stats.top_rows[:, 0].clamp_min(0)
    tokens = store.windows()[store.window_index()[rows], store.positions()[rows]].tolist()
    fires_on = [compute.token_label(model, t) if r >= 0 else "" for t, r in zip(tokens, stats.top_rows[:, 0].tolist())]
    if stats.logit_top_ids is not None:
        raises = [" ".join(figures.show_token(compute.token_label(model, int(i))) for i in row[:3])
                  for row in stats.logit_top_ids.tolist()]
    else:
        raises = [""] * len(fires_on)
    return figures.latent_table(stats.density, stats.max_act, fires_on, raises)


def _latent_finder(table) -> None:
    """Search and sort the latents; a row picked in the list opens that latent (set before the slider is drawn)."""
    with st.expander("Find a latent", expanded=False):
        c1, c2, c3 = st.columns([3, 1, 1])
        query = c1.text_input("Search", key="sae_search",
                              placeholder="a token it fires on or raises, or a latent number")
        hide_dead = c2.checkbox("Hide dead latents", True, key="sae_hide_dead")
        order = c3.selectbox("Order", list(figures.LATENT_ORDERS), key="sae_order",
                             format_func=figures.LATENT_ORDERS.get)
        shown = figures.find_latents(table, query, hide_dead, order).head(500)
        first = " (the first 500)" if len(shown) == 500 else ""
        st.caption(f"{figures.count_noun(len(shown), 'latent')} listed{first}; pick a row to open it.")
        event = st.dataframe(shown.style.format({"density": "{:.3%}", "max act": "{:.3g}"}), hide_index=True,
                             height=240, on_select="rerun", selection_mode="single-row", key="sae_table")
    picked = [int(shown.latent.iloc[i]) for i in event.selection.rows if i < len(shown)]
    if picked and st.session_state.get("sae_table_opened") != picked[0]:  # apply a pick once, then the slider rules
        st.session_state["sae_table_opened"] = picked[0]
        st.session_state["sae_feature"] = picked[0]


def _contexts(sel: Selection, model, info: compute.SAEInfo, feature: int, rows: tuple[int, ...]) -> str:
    """Show the contexts of store ``rows`` with the latent's activations highlighted; return their HTML."""
    if not rows:
        return _show_contexts(model, [])
    with ui.guard():
        contexts = cached.feature_contexts(sel.key, str(info.path), str(info.store), info.hook, feature, rows)
    return _show_contexts(model, contexts)


def _show_contexts(model, contexts: list) -> str:
    """Show contexts (:class:`workbench.sae.features.FeatureContext`) with the latent's activations highlighted;
    return their HTML."""
    if not contexts:
        st.caption("No examples: the latent never fired.")
        return "<p>No examples: the latent never fired.</p>"
    vmax = max([c.value for c in contexts] + [1e-9])
    lines = []
    for c in contexts:
        pieces = model.tokenizer.str_tokens(c.tokens) if model.tokenizer is not None else [f" {t}" for t in c.tokens]
        lines.append(f'<div style="margin:3px 0"><b>{c.value:.2f}</b> &nbsp;'
                     f"{figures.highlighted_tokens_html(pieces, c.acts, vmax)}</div>")
    st.markdown("".join(lines), unsafe_allow_html=True)
    return "".join(lines)


def _prompt_view(sel: Selection, model, info: compute.SAEInfo, feature: int) -> None:
    text, enc = ui.prompt(sel.key, model, "sae_prompt")
    with ui.guard(), st.spinner("Encoding the prompt…"):
        latents = cached.prompt_latents(sel.key, str(info.path), info.hook, text)
    tokens = figures.token_texts(model.tokenizer, enc.ids, enc.str_tokens)
    active = compute.active_features(latents, [figures.show_token(s) for s in tokens])
    st.markdown(f"**Latent {feature} on this prompt**")
    st.markdown(figures.highlighted_tokens_html(tokens, latents[:, feature].tolist()), unsafe_allow_html=True)
    share.plot(figures.token_ids_figure(tokens, active.table["active"].tolist(), "latents active",
                                        "Active latents per token"), key="sae_active")
    st.dataframe(active.table, hide_index=True)


def _steering(sel: Selection, model, info: compute.SAEInfo, sae, feature: int) -> None:
    default = "The" if model.tokenizer is not None else "0 17 42 5"
    text, enc = ui.prompt(sel.key, model, "steer_prompt", default=default)
    point = info.steer_hook  # where the latent writes: a transcoder's is the MLP's output, not the input it reads
    with ui.guard(), st.spinner("Running the model…"):
        norm = cached.activation_norm(sel.key, point, text)
    what = " (what the transcoder writes: the MLP's output)" if info.is_transcoder else ""
    st.caption(f"Generate greedily while adding strength × latent {feature}'s decoder direction (unit norm) to "
               f"`{point}`{what} at every position. For scale: that activation's mean norm on this prompt is "
               f"{norm:.1f}.")
    c1, c2 = st.columns(2)
    strength = c1.slider("Steering strength", -100.0, 100.0, 20.0, 1.0, key="steer_strength")
    n_new = c2.slider("New tokens", 1, 48, 20, key="steer_new")
    if not st.button("Generate with and without steering", key="steer_go"):
        return
    direction = sae.W_dec[feature].detach()
    hook = compute.steering_hook(direction, strength)
    cols = st.columns(2)
    for col, hooks, title in ((cols[0], [], "without steering"), (cols[1], [(point, hook)], f"strength {strength:g}")):
        with col, ui.guard():
            st.markdown(f"**{title}**")
            out = st.empty()
            pieces: list[str] = []
            with st.spinner(f"Generating {figures.count_noun(int(n_new), 'token')} {title}…"):
                for event in generate.stream_generate(model, torch.tensor(enc.ids), int(n_new), temperature=0.0,
                                             stop_tokens=[], fwd_hooks=hooks):
                    pieces.append(event.text if model.tokenizer is not None else f" {event.token}")
                    out.markdown(figures.generated_text_html("".join(enc.str_tokens), "".join(pieces)),
                                 unsafe_allow_html=True)
            st.session_state[f"steer_out_{'on' if hooks else 'off'}"] = "".join(pieces)
