"""Induction heads page: per-head scores and the loss on repeated random tokens; for models trained
here with snapshots (attn-only-2l), the training dynamics across them (the phase change)."""

from __future__ import annotations

import streamlit as st

from workbench import plots
from workbench.analysis.induction import repeat_losses
from workbench.app import cached, choices, compute, figures, ui
from workbench.app.sidebar import Selection


def induction_page(sel: Selection) -> None:
    st.title("Induction heads")
    model = cached.model(sel.key)
    cfg = model.cfg
    st.caption("Random tokens shown twice: `[BOS] r₁ … r_L r₁ … r_L`. An induction head attends from a repeated "
               "token to the token after its first copy and copies it, so the loss falls on the second copy.")
    longest = max(2, min(64, (cfg.n_ctx - 1) // 2))
    c1, c2 = st.columns(2)
    seq_len = c1.slider("Sequence length L (random tokens per copy)", 2, longest, min(20, longest), key="ind_len")
    batch = c2.slider("Sequences", 1, 32, 8, key="ind_batch")
    with ui.guard(), st.spinner("Scoring every head…"):
        scores, seq = cached.induction(sel.key, seq_len, batch)
    losses = repeat_losses(scores.loss, seq)
    m1, m2, m3 = st.columns(3)
    m1.metric("loss, first copy", f"{losses.first:.3f}")
    m2.metric("loss, second copy", f"{losses.second:.3f}", delta=f"{losses.second - losses.first:+.3f}",
              delta_color="inverse")
    best = plots.top_heads_table(scores.induction, n=1)[0]
    m3.metric("best induction head", f"L{best['layer']}H{best['head']}", f"score {best['score']:.2f}",
              delta_color="off", delta_arrow="off")
    if (note := figures.weak_head_note(best)) is not None:
        st.warning(note)
    ui.plot(ui.categorical(plots.head_scores_figure({"induction": scores.induction,
                                                     "previous token": scores.previous_token,
                                                     "duplicate token": scores.duplicate_token},
                                                    title="Head scores on repeated random tokens")), key="ind_scores")
    ui.plot(plots.loss_by_position_figure(scores.loss, split=seq.start + seq.seq_len,
                                          title="Loss by position (mean over sequences)"), key="ind_loss")
    with st.expander("Top heads"):
        st.dataframe(plots.top_heads_table(scores.induction, n=10), hide_index=True)
    _dynamics(sel, seq_len)


def _dynamics(sel: Selection, seq_len: int) -> None:
    st.subheader("Training dynamics")
    model_dir = choices.model_dir(sel.name)
    snaps = compute.snapshots(model_dir)
    with ui.guard():  # a training log damaged before its last line says which line, no traceback
        metrics = compute.training_metrics(model_dir)
    if not snaps and metrics.empty:
        st.info(f"{sel.name} has no training snapshots beside its checkpoint. The built-in `attn-only-2l` ships "
                "with them; `workbench train attn-only-2l` reproduces the run, snapshots included.")
        return
    if snaps:
        st.caption(f"{len(snaps)} snapshots, steps {snaps[0].step} to {snaps[-1].step}: every head re-scored on "
                   f"the same repeated random tokens (L = {seq_len}).")
        points = ui.each_snapshot(
            snaps, lambda snap: cached.snapshot_point(str(snap.path), sel.device, sel.dtype, seq_len), "scoring")
        ui.plot(figures.dynamics_figure([p.step for p in points], [p.max_induction for p in points],
                                        [p.max_previous_token for p in points], [p.loss_first for p in points],
                                        [p.loss_repeat for p in points]), key="ind_dynamics")
        jump = max(range(1, len(points)), key=lambda i: points[i].loss_first - points[i].loss_repeat
                   - (points[i - 1].loss_first - points[i - 1].loss_repeat), default=None)
        if jump is not None:
            st.caption(f"The largest jump in (first-copy loss − repeat loss) comes between steps "
                       f"{points[jump - 1].step} and {points[jump].step}: the phase change.")
    wanted = [c for c in ("loss_repeat", "loss_first", "max_induction", "max_prev_token_l0", "val_loss", "loss")
              if c in metrics.columns]
    if not metrics.empty and "step" in metrics.columns and wanted:
        ui.plot(figures.metrics_figure(metrics, wanted), key="ind_metrics")
