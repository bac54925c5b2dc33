"""Widgets and layout helpers shared by the pages: the prompt box (with its length cap) and error display."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import streamlit as st

from workbench.app import cached, choices
from workbench.errors import WorkbenchError

DEFAULT_TEXT = "When Mary and John went to the store, John gave a drink to"
#: for models without a tokenizer (the attention-only toys): BOS, then a random sequence twice
DEFAULT_IDS = "0 17 42 5 33 21 9 50 12 17 42 5 33 21 9 50 12"


def default_prompt(model) -> str:
    return DEFAULT_TEXT if model.tokenizer is not None else DEFAULT_IDS


@contextmanager
def guard() -> Iterator[None]:
    """Show a WorkbenchError as a plain message (no traceback) and stop the page there."""
    try:
        yield
    except WorkbenchError as exc:
        st.error(str(exc))
        st.stop()


def prompt(key: str, model, widget_key: str, label: str = "Prompt", default: str | None = None) -> tuple[str, cached.Encoded]:
    """Return the prompt text and its tokens; a prompt over the cap is cut, with a message."""
    hint = None if model.tokenizer is not None else f"token ids 0..{model.cfg.d_vocab - 1}, separated by spaces"
    text = st.text_input(label, value=default if default is not None else default_prompt(model), key=widget_key, help=hint)
    with guard():
        enc = cached.encode(key, text)
    cap = min(choices.MAX_PROMPT_TOKENS, model.cfg.n_ctx)
    if enc.n_full > len(enc.ids):
        st.warning(f"The prompt has {enc.n_full} tokens; only the first {cap} are used (the app's limit is "
                   f"{choices.MAX_PROMPT_TOKENS} tokens, the model's context {model.cfg.n_ctx}).")
    return text, enc


def categorical(fig):
    """Return ``fig`` with both axes categorical: label lists like ``["0", "1", "final"]`` stay rows, not numbers."""
    return fig.update_xaxes(type="category").update_yaxes(type="category")


def plot(fig, key: str | None = None) -> None:
    """Place a plotly figure at full width."""
    st.plotly_chart(fig, width="stretch", key=key)
