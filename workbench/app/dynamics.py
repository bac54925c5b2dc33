"""Training dynamics page: one slider over a model's training snapshots drives the embeddings, the
attention patterns and head scores, the logit lens, and the loss curve with the learning-rate schedule. Models
trained here ship their snapshots (attn-only-2l: 26, its induction phase change near step 500)."""

from __future__ import annotations

import streamlit as st
import torch

from workbench import snapshots as S
from workbench import teaching_plots as P
from workbench.app import cached, choices, compute, ui
from workbench.app.sidebar import Selection

#: at most this many tokens in the embedding scatter (vocabularies of the toy models fit whole)
MAX_EMBEDDING_POINTS = 128


def dynamics_page(sel: Selection) -> None:
    st.title("Training dynamics")
    model = cached.model(sel.key)
    cfg = model.cfg
    model_dir = choices.model_dir(sel.name)
    snaps = S.list_snapshots(model_dir)
    with ui.guard():  # a damaged training log says which line, no traceback
        log = S.training_log(model_dir)
    train_cfg = S.recipe_train_config(sel.name)
    if not snaps:
        st.info(f"{sel.name} has no training snapshots beside its checkpoint. The built-in `attn-only-2l` ships with "
                "26 of them; `workbench train attn-only-2l` reproduces the run, snapshots included.")
        if not log.empty and "step" in log.columns:
            ui.plot(P.loss_and_lr(log, _schedule(train_cfg, log), None), key="dyn_loss")
        return
    steps = [s.step for s in snaps]
    st.caption(f"{len(snaps)} snapshots of {sel.name}, steps {steps[0]} to {steps[-1]}. Move the slider to see the "
               "model as it was at that step.")
    c1, c2 = st.columns([3, 1])
    step = c1.select_slider("Training step", options=steps, value=steps[-1], key="dyn_step")
    seq_len = c2.slider("Repeated sequence length L", 4, max(4, (cfg.n_ctx - 1) // 2), min(20, (cfg.n_ctx - 1) // 2),
                        key="dyn_len")
    i = steps.index(step)
    heads = _measure(sel, snaps, seq_len)
    best = [float(h.induction.max()) for h in heads]
    now, before = heads[i], heads[i - 1] if i else None
    m1, m2, m3 = st.columns(3)
    m1.metric("best induction score", f"{best[i]:.2f}", None if before is None else f"{best[i] - best[i - 1]:+.2f}")
    m2.metric("loss on the repeat", f"{now.loss_repeat:.3f}",
              None if before is None else f"{now.loss_repeat - before.loss_repeat:+.3f}", delta_color="inverse")
    m3.metric("loss on the first copy", f"{now.loss_first:.3f}")
    _phase_caption(steps, best)
    tab_attn, tab_emb, tab_lens, tab_loss = st.tabs(["Attention and head scores", "Embeddings", "Logit lens",
                                                     "Loss and learning rate"])
    with tab_attn:
        _attention(model, heads, steps, i, seq_len, best)
    with tab_emb:
        _embeddings(sel, model, model_dir, steps, i)
    with tab_lens:
        _lens(cfg, heads, steps, i)
    with tab_loss:
        if log.empty or "step" not in log.columns:
            st.info("No training log (metrics.jsonl) beside the checkpoint.")
        else:
            ui.plot(P.loss_and_lr(log, _schedule(train_cfg, log), step), key="dyn_loss")
            if train_cfg is not None:
                st.caption(f"Schedule as trained: linear warmup over {train_cfg.warmup_steps} steps to "
                           f"{train_cfg.lr:g}, then cosine down to {train_cfg.lr * train_cfg.min_lr_ratio:g} at step "
                           f"{train_cfg.steps} (the recipe's TrainConfig; the grey dots are the logged values).")


def _measure(sel: Selection, snaps: list[S.Snapshot], seq_len: int) -> list[S.SnapshotHeads]:
    """Return every snapshot's head scores on repeated random tokens (cached per snapshot), with a progress bar."""
    return ui.each_snapshot(
        snaps, lambda snap: cached.snapshot_heads(str(snap.path), sel.device, sel.dtype, seq_len), "measuring")


def _phase_caption(steps: list[int], best: list[float]) -> None:
    phase = S.phase_change(steps, best)
    if phase is not None:
        lo, hi = phase
        st.caption(f"The best induction score rises most between steps {lo} and {hi} "
                   f"({best[steps.index(lo)]:.2f} → {best[steps.index(hi)]:.2f}): the phase change, when an induction "
                   "head forms and the repeated half becomes predictable.")


#: the repeated-sequence length the other pages' snapshot sections measure heads on (the dynamics page has a slider)
SECTION_SEQ_LEN = 20


def across_training(sel: Selection, part: str) -> None:
    """Draw a page's "Across training" section when the model has training snapshots: a slider over the steps and
    the page's own view at that step (``part``: ``embeddings``, ``attention`` or ``lens``); nothing otherwise.

    The embeddings, attention and logit-lens pages call this, so the snapshots show where each view lives; the
    training-dynamics page shows all of them (and the loss with the learning-rate schedule) on one slider."""
    model_dir = choices.model_dir(sel.name)
    snaps = S.list_snapshots(model_dir)
    if not snaps:
        return
    model = cached.model(sel.key)
    steps = [s.step for s in snaps]
    st.subheader("Across training")
    st.caption(f"{sel.name} ships {len(snaps)} training snapshots (steps {steps[0]} to {steps[-1]}): move the slider "
               "to see this view as the model was at that step. All of them at once: the Training dynamics page.")
    prefix = f"{part}_snap"
    step = st.select_slider("Training step", options=steps, value=steps[-1], key=f"{prefix}_step")
    i = steps.index(step)
    if part == "embeddings":
        _embeddings(sel, model, model_dir, steps, i, prefix)
        return
    seq_len = min(SECTION_SEQ_LEN, max(4, (model.cfg.n_ctx - 1) // 2))
    heads = _measure(sel, snaps, seq_len)
    best = [float(h.induction.max()) for h in heads]
    _phase_caption(steps, best)
    if part == "attention":
        st.metric("best induction score", f"{best[i]:.2f}", None if i == 0 else f"{best[i] - best[i - 1]:+.2f}")
        _attention(model, heads, steps, i, seq_len, best, prefix)
    elif part == "lens":
        _lens(model.cfg, heads, steps, i, prefix)
    else:
        raise ValueError(f"unknown part {part!r}")


def _schedule(train_cfg, log):
    if train_cfg is None:
        return None
    # a few hundred points, plus the peak (the step after the warmup) and the last step exactly
    xs = sorted(set(range(1, train_cfg.steps + 1, max(1, train_cfg.steps // 400)))
                | {train_cfg.warmup_steps + 1, train_cfg.steps})
    return xs, S.lr_schedule(train_cfg, xs)


def _attention(model, heads: list[S.SnapshotHeads], steps: list[int], i: int, seq_len: int, best: list[float],
               prefix: str = "dyn") -> None:
    cfg = model.cfg
    step = steps[i]
    c1, c2 = st.columns(2)
    layer = c1.slider("Layer", 0, cfg.n_layers - 1, cfg.n_layers - 1, key=f"{prefix}_layer") if cfg.n_layers > 1 else 0
    now = heads[i]
    default_head = int(now.induction[layer].argmax())  # the strongest induction head at this step
    head = c2.slider("Head", 0, cfg.n_heads - 1, default_head, key=f"{prefix}_head") if cfg.n_heads > 1 else 0
    seq = S.repeated_sequence(model, seq_len)
    labels = P.token_axis([str(t) for t in seq.tokens[0].tolist()])
    left, right = st.columns([3, 2])
    with left:
        ui.plot(P.matrix(now.pattern[layer, head],
                         f"Layer {layer}, head {head} at step {step} on repeated random tokens",
                         labels, labels, "key", "query", colorscale="Blues", zmid=None, height=460),
                key=f"{prefix}_pattern")
    with right:
        grid = P.matrix(now.induction, f"Induction score of every head at step {step}",
                        [f"L{x}" for x in range(cfg.n_layers)], [f"H{h}" for h in range(cfg.n_heads)], "head", "layer",
                        colorscale="Viridis", zmid=None, height=260, text=True)
        grid.data[0].update(zmin=0, zmax=1)
        ui.plot(grid, key=f"{prefix}_grid")
        prev = P.matrix(now.previous_token, f"Previous-token score at step {step}",
                        [f"L{x}" for x in range(cfg.n_layers)], [f"H{h}" for h in range(cfg.n_heads)], "head", "layer",
                        colorscale="Viridis", zmid=None, height=200, text=True)
        prev.data[0].update(zmin=0, zmax=1)
        ui.plot(prev, key=f"{prefix}_prev")
    st.caption(f"An induction head, at a token of the second copy, attends to the token after that token's first "
               f"copy: a stripe L - 1 = {seq_len - 1} positions below the diagonal. It appears only after the phase "
               "change, built on a previous-token head in an earlier layer.")
    series = {f"best induction, layer {x}": [float(h.induction[x].max()) for h in heads] for x in range(cfg.n_layers)}
    series |= {f"best previous-token, layer {x}": [float(h.previous_token[x].max()) for h in heads]
               for x in range(cfg.n_layers)}
    ui.plot(P.scores_over_steps(steps, series, step, "Head scores across training"), key=f"{prefix}_scores")
    ui.plot(P.scores_over_steps(steps, {"loss, first copy": [h.loss_first for h in heads],
                                        "loss, repeat": [h.loss_repeat for h in heads]}, step,
                                "Loss on repeated random tokens across training", "loss (nats)"),
            key=f"{prefix}_rep_loss")


def _lens(cfg, heads: list[S.SnapshotHeads], steps: list[int], i: int, prefix: str = "dyn") -> None:
    points = ["embeddings"] + [f"after block {x}" for x in range(cfg.n_layers)]
    series = {f"decoded {name}": [h.lens_repeat[x] for h in heads] for x, name in enumerate(points)}
    ui.plot(P.scores_over_steps(steps, series, steps[i], "Logit lens on the repeated copy across training",
                                "loss on the repeat (nats)"), key=f"{prefix}_lens")
    now = heads[i].lens_repeat
    st.caption(f"At step {steps[i]}, the repeated copy's loss read off the residual stream with the final norm and "
               "W_U: " + ", ".join(f"{name} {v:.2f}" for name, v in zip(points, now)) + ". The last equals the "
               "model's loss. Once the induction head forms, only the stream after the last block knows the repeat.")


def _snapshot_path(model_dir, step: int):
    return next(s.path for s in S.list_snapshots(model_dir) if s.step == step)


def _embedding_ids(model) -> tuple[list[int], list[str]]:
    if model.tokenizer is None or model.cfg.d_vocab <= MAX_EMBEDDING_POINTS:
        n = min(model.cfg.d_vocab, MAX_EMBEDDING_POINTS)
        return list(range(n)), [compute.token_label(model, t) for t in range(n)]
    words = ("the a and of to in is was he she it they king queen man woman one two three four five day night "
             "god lord father son light dark water fire").split()
    ids, labels = compute.word_token_ids(model, [" " + w for w in words])
    return ids, labels


def _embeddings(sel: Selection, model, model_dir, steps: list[int], i: int, prefix: str = "dyn") -> None:
    ids, labels = _embedding_ids(model)
    method = st.radio("Projection", ["pca", "tsne"], horizontal=True, key=f"{prefix}_proj",
                      format_func=lambda m: {"pca": "PCA, one frame for every step", "tsne": "t-SNE of this step"}[m])
    if method == "tsne":
        with st.spinner("t-SNE…"):
            df = cached.snapshot_tsne(str(_snapshot_path(model_dir, steps[i])), sel.device, sel.dtype, tuple(ids))
        xy = torch.tensor(df[["x", "y"]].values)
        ui.plot(P.embedding_scatter(xy, [P.visible(s) for s in labels], steps[i],
                                    (*P.padded_range(xy[:, 0]), *P.padded_range(xy[:, 1])),
                                    title=f"Token embeddings at step {steps[i]} (t-SNE of this step alone)",
                                    axes=("t-SNE 1", "t-SNE 2")), key=f"{prefix}_embed")
        st.caption("t-SNE keeps neighbours together but its axes mean nothing and change from step to step: compare "
                   "clusters, not positions. PCA in the final frame shows the motion.")
        return
    with st.spinner("Projecting every snapshot's embeddings…"):
        frames = cached.snapshot_embeddings(str(model_dir), sel.device, sel.dtype, tuple(ids))
    coords = frames.coords
    bounds = (*P.padded_range(coords[..., 0]), *P.padded_range(coords[..., 1]))
    ui.plot(P.embedding_scatter(coords[i], [P.visible(s) for s in labels], steps[i], bounds), key=f"{prefix}_embed")
    spread = [float(c.norm(dim=-1).mean()) for c in coords]
    st.caption(f"{len(ids)} tokens. The axes are the final model's first two principal components "
               f"({frames.explained:.0%} of its variance), the same for every step, so points move as training moves "
               "them. At initialisation they are random, near the centre of the final frame.")
    ui.plot(P.scores_over_steps(steps, {"mean distance from the centre (PC 1–2)": spread}, steps[i],
                                "How far the tokens have spread in the final frame", "distance"),
            key=f"{prefix}_spread")
