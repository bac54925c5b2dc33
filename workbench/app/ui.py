"""Widgets and layout helpers shared by the pages: the prompt box (with its length cap), error display,
and the progress panel of a background job."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import streamlit as st

from workbench.app import cached, choices, share
from workbench.app.jobs import Job
from workbench.errors import WorkbenchError

DEFAULT_TEXT = choices.IOI.text
#: for models without a tokenizer (the attention-only toys): BOS, then a random sequence twice
DEFAULT_IDS = choices.IDS.text

#: how long a page waits for a job it just asked for before drawing a progress panel instead (seconds):
#: a quick job shows its result in the same run
JOB_WAIT_S = 2.0


def default_prompt(model) -> str:
    """Return the prompt pages open with on ``model`` (chosen per model: it tokenizes there)."""
    return choices.prompt_defaults(model).text


@contextmanager
def guard() -> Iterator[None]:
    """Show a WorkbenchError as a plain message (no traceback) and stop the page there."""
    try:
        yield
    except WorkbenchError as exc:
        st.error(str(exc))
        st.stop()


def prompt(
    key: str, model, widget_key: str, label: str = "Prompt", default: str | None = None
) -> tuple[str, cached.Encoded]:
    """Return the prompt text and its tokens; a prompt over the cap is cut, with a message."""
    hint = None if model.tokenizer is not None else f"token ids 0..{model.cfg.d_vocab - 1}, separated by spaces"
    value = default if default is not None else default_prompt(model)
    text = st.text_input(label, value=value, key=widget_key, help=hint)
    with guard():
        enc = cached.encode(key, text)
    cap = min(choices.MAX_PROMPT_TOKENS, model.cfg.n_ctx)
    if enc.n_full > len(enc.ids):
        st.warning(f"The prompt has {'' if enc.exact else 'more than '}{enc.n_full} tokens; only the first {cap} are "
                   f"used (the app's limit is {choices.MAX_PROMPT_TOKENS} tokens, "
                   f"the model's context {model.cfg.n_ctx}).")
    return text, enc


def each_snapshot(snaps: list, measure, verb: str) -> list:
    """Return ``measure(snap)`` for each snapshot in order, under a progress bar ("Scoring snapshots…")."""
    bar = st.progress(0.0, text=f"{verb.capitalize()} snapshots…")
    out = []
    with guard():
        for i, snap in enumerate(snaps):
            out.append(measure(snap))
            bar.progress((i + 1) / len(snaps), text=f"{verb.capitalize()} snapshots: step {snap.step} done")
    bar.empty()
    return out


def categorical(fig):
    """Return ``fig`` with both axes categorical: label lists like ``["0", "1", "final"]`` stay rows, not numbers."""
    return fig.update_xaxes(type="category").update_yaxes(type="category")


def plot(fig, key: str | None = None) -> None:
    """Place a plotly figure at full width, with its mode bar (PNG) and, when it has a ``key``, CSV and JSON
    downloads of its data (:func:`workbench.app.share.plot`): every figure of the app can be exported."""
    if key is None:
        st.plotly_chart(fig, width="stretch", config=share.MODE_BAR)
        return
    share.plot(fig, key)


def _eta_text(job: Job) -> str:
    eta = job.eta()
    if eta is None:
        left = "estimating time left"
    else:
        left = f"about {eta:.0f} s left" if eta < 90 else f"about {eta / 60:.1f} min left"
    return f"{job.title}: {job.stage} · {job.fraction:.0%} · {job.elapsed:.0f} s so far, {left}"


def job_status(job: Job, key: str) -> Any | None:
    """Return the job's result once it has finished. Until then draw its progress, the time left and a cancel
    button (refreshed every second without blocking the page) and return None. A job that failed shows its
    error (a WorkbenchError as a plain message, anything else raised here) and a cancelled one says so; both
    return None."""
    job.wait(JOB_WAIT_S)
    if job.done:
        if job.cancelled:
            st.info(f"{job.title} was cancelled after {job.elapsed:.0f} s.")
            return None
        if job.error is not None:
            if isinstance(job.error, WorkbenchError):
                st.error(str(job.error))
                return None
            raise job.error
        return job.result

    @st.fragment(run_every=1.0)
    def panel() -> None:
        if job.done:
            st.rerun()  # the whole page: draw the result
        st.progress(job.fraction, text=_eta_text(job))
        if st.button("Cancel", key=f"{key}_cancel"):
            job.cancel()
            job.wait(5.0)
            st.rerun()

    panel()
    return None
