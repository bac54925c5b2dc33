"""Attribution and patching page: direct logit attribution by layer and head, clean -> corrupted
activation patching heatmaps (a sweep runs as a background job: progress, time left, cancel) or
their attribution-patching estimate, and a circuit view (EAP-IG edges, the circuit's faithfulness)."""

from __future__ import annotations

import streamlit as st
import torch

from workbench import plots
from workbench.analysis import attribution_patching as AP
from workbench.analysis.attribution import head_attribution_grid
from workbench.analysis.eap import Graph
from workbench.analysis.patching import LogitDiff
from workbench.app import cached, choices, compute, figures, ui
from workbench.app.sidebar import Selection

#: patching sweeps up to this many patched runs ...
AUTO_PATCH_RUNS = 400
#: ... and this many estimated FLOPs (a few seconds on a laptop CPU) start by themselves; bigger ones wait
#: for the button (SmolLM2's sweeps are ~1e12: minutes on a CPU)
AUTO_PATCH_FLOPS = 2e10

PATCH_KINDS = {"resid_pre": "residual stream (per position)", "attn_out": "attention output (per position)",
               "mlp_out": "MLP output (per position)", "z": "each head's output"}


def attribution_page(sel: Selection) -> None:
    st.title("Attribution and patching")
    model = cached.model(sel.key)
    cfg = model.cfg
    defaults = choices.prompt_defaults(model)  # checked to tokenize as needed on this model
    clean_default, corrupt_default, answer_default, wrong_default = (
        defaults.clean, defaults.corrupt, defaults.answer, defaults.wrong)
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
    _patching_section(sel, model, text, enc, corrupt_text, answer, wrong, what)
    _circuit_view(sel, model, text, enc, corrupt_text, answer, wrong, what)


def _patching_section(sel: Selection, model, text: str, enc, corrupt_text: str, answer: int, wrong: int,
                      what: str) -> None:
    """Exact patching (a background job) or AtP's estimate of the chosen sweep."""
    cfg = model.cfg
    kinds = [k for k in PATCH_KINDS if not (k == "mlp_out" and cfg.attn_only)]
    kind = st.selectbox("Patch", kinds, key="attr_patch", format_func=PATCH_KINDS.get)
    method = st.radio("Method", ["Exact patching", "Attribution patching (AtP)"], horizontal=True, key="attr_method",
                      help="AtP estimates every patch at once from two forward passes and one backward pass "
                           "(first order: Nanda 2023); exact patching runs each patch.")
    with ui.guard():
        corrupt_enc = cached.encode(sel.key, corrupt_text)
        if len(corrupt_enc.ids) != len(enc.ids):
            st.warning(f"The corrupted prompt has {len(corrupt_enc.ids)} tokens, the clean one {len(enc.ids)}; "
                       "patching pairs positions one to one, so make them the same length.")
            return
    if method != "Exact patching":
        _atp_view(model, enc, corrupt_enc, answer, wrong, kind, what)
        return
    with ui.guard():
        request = cached.PatchRequest(sel.key, text, corrupt_text, answer, wrong, kind)
    runs, flops = compute.patch_cost(model, len(enc.ids), kind)
    job = cached.jobs().get(("patching", *request))
    cancelled = job is not None and job.cancelled
    asked = st.session_state.get("attr_patch_request") == request and not cancelled
    # nothing that takes more than a few seconds starts without a click (a cancelled sweep waits for one too)
    if (runs > AUTO_PATCH_RUNS or flops > AUTO_PATCH_FLOPS or cancelled) and not asked:
        st.caption(f"This sweep is {runs} patched runs of a {cfg.n_layers}-layer model (each from its layer on, "
                   "batched by layer); on a CPU that can take minutes. It runs in the background, with progress "
                   "and a cancel button; the rest of the page stays usable.")
        if cancelled:
            st.info(f"The last {job.title} was cancelled after {job.elapsed:.0f} s.")
        if not st.button("Run patching", key="attr_patch_go"):
            return
        st.session_state["attr_patch_request"] = request
    job = cached.patching_job(request)  # starts it, or joins the one running (or finished) for these inputs
    patched = ui.job_status(job, "attr_patch")
    if patched is None:
        return
    _draw_sweep(patched, enc, what, "attr_patching")


def _atp_view(model, enc, corrupt_enc, answer: int, wrong: int, kind: str, what: str) -> None:
    """Attribution patching's estimate of the same sweep: one backward pass, seconds even on SmolLM2."""
    device = model.embed.W_E.device
    clean, corrupt = (torch.tensor([ids], device=device) for ids in (enc.ids, corrupt_enc.ids))
    metric = LogitDiff(answer, wrong if wrong >= 0 else None)
    with ui.guard(), st.spinner("Attribution patching…"):
        # run without this session's run-local hooks, as every cached run is (cached._quiet)
        result = cached._quiet(lambda: AP.attribution_patch(model, clean, corrupt, metric))
    patched = AP.as_patch_result(result, kind)
    st.caption("AtP's first-order estimate of each patch, (clean - corrupted activation) . gradient on the corrupted "
               "run, drawn like the exact sweep; where attention saturates it can miss (switch to exact patching "
               "to check a component).")
    _draw_sweep(patched, enc, what, "attr_atp")


def _draw_sweep(patched, enc, what: str, key: str) -> None:
    """The clean and corrupted metric, then the sweep's heatmap (exact patching and AtP draw alike)."""
    p1, p2 = st.columns(2)
    p1.metric(f"clean {what}", f"{patched.clean:.3f}")
    p2.metric(f"corrupted {what}", f"{patched.corrupt:.3f}")
    if abs(patched.clean - patched.corrupt) < 1e-6:
        st.warning(f"The clean and corrupted runs give the same {what}, so nothing can be restored; change the "
                   "corrupted prompt or the answer tokens.")
        return
    ui.plot(ui.categorical(plots.patching_heatmap(patched, [figures.show_token(s) for s in enc.str_tokens])),
            key=key)


#: circuit tasks offered (the page's own pair works on any model; the generated sets need a tokenizer)
CIRCUIT_TASKS = {"pair": "the prompt pair above", "ioi": "IOI (generated)", "greater-than": "greater-than (generated)"}


def _circuit_view(sel: Selection, model, text: str, enc, corrupt_text: str, answer: int, wrong: int,
                  what: str) -> None:
    """EAP-IG over every edge (embeddings, heads' q/k/v inputs, MLPs, logits), the top-n circuit drawn by
    layer, and its faithfulness: the clean run with every edge outside the circuit patched to its corrupted value."""
    st.subheader("Circuit (EAP-IG)")
    st.caption("Edge attribution with integrated gradients (Hanna et al. 2024) scores every edge between the "
               "embeddings, each head's query/key/value input, the MLPs and the logits; the circuit keeps the edges "
               "with the largest absolute scores. Faithfulness = (circuit - corrupted) / (clean - corrupted), the "
               "circuit's run having every other edge patched to its corrupted value.")
    graph = Graph.from_model(model)
    tasks = [t for t in CIRCUIT_TASKS if t == "pair" or model.tokenizer is not None]
    c1, c2, c3, c4 = st.columns(4)
    task = c1.selectbox("Prompts", tasks, key="attr_circuit_task", format_func=CIRCUIT_TASKS.get)
    prompts = c2.number_input("Pairs (generated tasks)", 1, 100, 8, key="attr_circuit_prompts",
                              disabled=task == "pair")
    steps = c3.number_input("IG steps m", 1, 50, 5, key="attr_circuit_steps")
    n_edges = c4.number_input(f"Edges (of {graph.n_edges})", 1, graph.n_edges, min(100, graph.n_edges),
                              key="attr_circuit_edges")
    if task == "pair":
        with ui.guard():
            corrupt_enc = cached.encode(sel.key, corrupt_text)
        if len(corrupt_enc.ids) != len(enc.ids):
            st.info("The circuit of the prompt pair needs a corrupted prompt of the same length (see above).")
            return
        request = cached.CircuitRequest(sel.key, "pair", 1, int(steps), text, corrupt_text, answer, wrong)
        metric_name = what
    else:
        request = cached.CircuitRequest(sel.key, task, int(prompts), int(steps))
        metric_name = "logit difference" if task == "ioi" else "probability difference"
    # EAP-IG is (steps + 2) forward and (steps) backward passes over the pairs: seconds on a small model,
    # tens of seconds on SmolLM2's CPU run, so it waits for a click
    asked = st.session_state.get("attr_circuit_request") == request
    if not asked and not st.button("Find the circuit", key="attr_circuit_go"):
        return
    st.session_state["attr_circuit_request"] = request
    with ui.guard(), st.spinner("EAP-IG over every edge…"):
        found = cached.circuit(request, int(n_edges))
    faith = found.faithfulness
    m1, m2, m3, m4 = st.columns(4)
    m1.metric(f"{metric_name}: clean", f"{faith.clean:.3f}")
    m2.metric(f"{metric_name}: corrupted", f"{faith.corrupt:.3f}")
    m3.metric(f"{metric_name}: circuit", f"{faith.circuit:.3f}")
    if abs(faith.clean - faith.corrupt) < 1e-6:
        m4.metric("faithfulness", "undefined")
        st.warning(f"The clean and corrupted runs give the same {metric_name}; change the corrupted prompt or the "
                   "answer tokens.")
    else:
        m4.metric("faithfulness", f"{faith.faithfulness:.3f}")
    st.caption(f"{faith.n_edges} of {graph.n_edges} edges ({100 * faith.n_edges / graph.n_edges:.2f}%).")
    ui.plot(plots.circuit_diagram(graph, found.keep, found.result.scores, max_edges=300,
                                  title=f"Circuit of the top {faith.n_edges} edges (width: |EAP-IG score|; "
                                        "blue: corrupting the edge raises the metric, red: lowers it)"),
            key="attr_circuit")
    rows = [{"edge": name, "EAP-IG score": score} for name, score in found.edges()[:50]]
    st.dataframe(rows, hide_index=True, width="stretch")
