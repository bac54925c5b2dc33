"""Logit lens / tuned lens page: what each layer's residual stream would predict, position by position."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import streamlit as st

from workbench import paths, plots
from workbench.app import cached, compute, figures, share, ui
from workbench.app.dynamics import across_training
from workbench.app.sidebar import Selection

VALUES = {"target_prob": "probability of the target token", "top_prob": "probability of the top token",
          "entropy": "entropy (nats)", "kl_to_final": "KL(final output ‖ layer)"}
#: layer-row strides offered for deep models (every row of SmolLM2's 31 at once is a tall grid)
STRIDES = [1, 2, 3, 5]
#: the logit and tuned lens grids go side by side for prompts up to this many tokens
SIDE_BY_SIDE_TOKENS = 10


def _where(path: str) -> str:
    """Return a lens directory relative to the runs directory (where the app looks for them)."""
    try:
        return Path(path).relative_to(paths.runs_dir()).as_posix()
    except ValueError:
        return path


def tuned_lens_job(key: str, name: str):
    """Return the background job training the app's tuned lens for a model (started now, or the one already
    running or done: every session asking for it shares one run)."""
    m = cached.model(key)
    registry = cached.jobs()

    def work(report):
        return compute.train_app_tuned_lens(m, name, lambda stage, done: report(done, stage),
                                            writing=lambda *dirs: registry.writing(*dirs, report=report))
    return registry.start(("tuned-lens", key), "tuned lens", work)


def _tuned_lens_status(where) -> None:
    """Show this session's tuned-lens job: progress, time left and a cancel button while it runs; once it is done,
    open the new lens (the radio above lists it on the next run)."""
    job = cached.jobs().get(st.session_state.get("lens_job"))
    if job is None:
        return
    with where:
        out = ui.job_status(job, "lens_job")
    if out is not None and st.session_state.get("lens_job_seen") != job.key:
        st.session_state["lens_job_seen"] = job.key
        st.session_state["lens_open"] = str(out)  # the radio is drawn already: it takes this on the rerun
        st.rerun()


def lens_page(sel: Selection) -> None:
    st.title("Logit lens")
    model = cached.model(sel.key)
    n_layers = model.cfg.n_layers
    st.caption("Row l decodes the residual stream entering block l through the final norm and the unembedding "
               "(the last row, final, is the model's output). Each cell shows the top token; its colour the value "
               "chosen; hover for the top tokens and the target's probability.")
    text, enc = ui.prompt(sel.key, model, "lens_prompt")
    lenses = compute.tuned_lenses(model.cfg)
    n = len(enc.ids)
    options = [""] + [str(p) for p in lenses]
    if st.session_state.get("lens_open") in options:  # a tuned lens this session just trained
        st.session_state["lens_kind"] = st.session_state.pop("lens_open")
    c1, c2 = st.columns(2)
    lens_dir = c1.radio("Lens", options, key="lens_kind", horizontal=True,
                        format_func=lambda p: "logit lens" if not p else f"tuned lens ({_where(p)})")
    if not lenses:
        c1.caption("No tuned lens for this model in the runs directory. The button trains a small one in the "
                   f"background ({compute.APP_LENS_STEPS} steps on {compute.APP_LENS_WINDOWS} windows of the model's "
                   "own corpus, with progress and the time left); `workbench tuned-lens train MODEL --out "
                   "$WORKBENCH_HOME/runs/lens-MODEL` trains a bigger one. "
                   "This page then shows it beside the logit lens.")
        if c1.button("Train a tuned lens", key="lens_train"):
            st.session_state["lens_job"] = tuned_lens_job(sel.key, sel.name).key
    _tuned_lens_status(c1)
    value = c2.selectbox("Colour", list(VALUES), key="lens_value", format_func=VALUES.get)
    c3, c4 = st.columns(2)
    target_text = c3.text_input("Target token (empty: the actual next token at each position)", "", key="lens_target",
                                bind=share.URL)
    layers = range(n_layers)
    if n_layers > 1:
        lo, hi = c4.slider("Layers shown (the final row always)", 0, n_layers - 1, (0, n_layers - 1),
                           key="lens_layers")
        stride = (c4.select_slider("Every n-th layer", STRIDES, 1, key="lens_stride", bind=share.URL)
                  if n_layers > 8 else 1)
        layers = range(lo, hi + 1, stride)
    with ui.guard():
        target = compute.answer_id(model, target_text) if target_text else -1
    with ui.guard(), st.spinner("Running the lens…"):
        # one model run per prompt (cached); the lens, the target and everything below only re-decode or slice it
        result = cached.lens(sel.key, text, lens_dir, target)
        logit = cached.lens(sel.key, text, "", target) if lens_dir else result
    decode = (lambda ids: figures.show_token(model.tokenizer.decode(ids))) if model.tokenizer is not None else (
        lambda ids: str(ids[0]))
    shown = [figures.show_token(s) for s in figures.token_texts(model.tokenizer, enc.ids, enc.str_tokens)]

    def grid(res, name: str):
        return plots.lens_grid(res, shown, value=value, tokenizer_decode=decode, layers=layers,
                               title=f"{name} lens: top token per layer and position")

    if lens_dir:
        # beside each other while a cell's token still fits in half the page; one above the other after that
        beside = st.toggle("Side by side", len(enc.ids) <= SIDE_BY_SIDE_TOKENS, key="lens_beside",
                           help=f"Off: the logit lens above the tuned lens, each at full width (the default for "
                                f"prompts over {SIDE_BY_SIDE_TOKENS} tokens)")
        left, right = st.columns(2) if beside else (st.container(), st.container())
        with left:
            share.plot(grid(logit, "Logit"), key="lens_grid_logit")
        with right:
            share.plot(grid(result, "Tuned"), key="lens_grid")
        share.plot(figures.lens_kl_on_prompt(logit, result), key="lens_kl")
    else:
        share.plot(grid(result, "Logit"), key="lens_grid")
    c5, c6 = st.columns(2)
    pos = c5.slider("Position", 0, n - 1, n - 1, key="lens_pos", bind=share.URL) if n > 1 else 0
    k = c6.slider("Top tokens shown", 1, 10, 5, key="lens_k", bind=share.URL)
    pos_label = f"position {pos} ({shown[pos]!r})"
    if target >= 0:
        target_token = compute.token_label(model, target)
    elif pos + 1 < n:
        target_token = enc.str_tokens[pos + 1]
    else:
        target_token = None
    which = "tuned lens" if lens_dir else "logit lens"
    if target_token is None:
        st.info("The last position has no next token to rank; pick an earlier position or type a target token.")
    else:
        ranks = result.target_rank[:, 0, pos].tolist()
        probs = result.target_prob[:, 0, pos].tolist()
        st.caption(f"With the {which}, the target is first the top prediction at layer "
                   f"{next((result.labels[i] for i, r in enumerate(ranks) if r == 0), 'none (not even final)')}; "
                   "the plot's last point, final, is the model's output.")
        share.plot(figures.rank_across_layers(result.labels, ranks, probs, target_token, pos_label), key="lens_rank")
    ids = result.top_tokens[:, 0, pos, :k].tolist()
    ps = result.top_probs[:, 0, pos, :k].tolist()
    table = pd.DataFrame({"layer": result.labels} | {
        f"#{j + 1}": [f"{decode([row[j]])}  {p[j]:.2f}" for row, p in zip(ids, ps)] for j in range(k)})
    st.markdown(f"**Top {k} next tokens at {pos_label}** ({which})")
    st.dataframe(table, hide_index=True)

    across_training(sel, "lens")  # a slider over the training snapshots, where the model has them
