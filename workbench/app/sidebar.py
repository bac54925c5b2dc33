"""The sidebar every page shares: model (zoo names and folders in the model directory), device, dtype,
the SAE where a page uses one, and the model's card."""

from __future__ import annotations

import time
from dataclasses import dataclass

import streamlit as st

from workbench import paths
from workbench.app import cached, choices
from workbench.app.choices import ModelKey
from workbench.errors import WorkbenchError

OTHER = "other folder…"


@dataclass(frozen=True)
class Selection:
    """What the sidebar chose."""

    #: the model key ``"name|device|dtype"`` every cached loader takes
    key: str
    name: str
    device: str
    dtype: str
    #: load time of the model in seconds on this run (0 when it came from the cache)
    load_s: float


#: session-state keys that belong to the sidebar and survive a change of model; every other key is a page's
#: widget, reset when the model changes (a prompt typed for one tokenizer means nothing to another)
KEEP_PREFIX = "wb_"


def _initial_model(names: list[str]) -> str:
    wanted = choices.default_model(st.query_params.get("model"))
    return wanted


def _reset_pages_on_model_change(name: str) -> None:
    """Forget the pages' widget values when the model differs from the last run's, so each page opens on
    this model's defaults instead of carrying the last model's prompt and answer tokens."""
    last = st.session_state.get("wb_last_model")
    if last is not None and last != name:
        for k in list(st.session_state.keys()):
            if not str(k).startswith(KEEP_PREFIX):
                del st.session_state[k]
    st.session_state["wb_last_model"] = name


def render() -> Selection | None:
    """Draw the sidebar; return the selection with the model loaded, or None (after saying why) when it cannot load."""
    sb = st.sidebar
    sb.header("Model")
    names = choices.model_names()
    if "wb_model" not in st.session_state:
        start = _initial_model(names)
        if start not in names:
            st.session_state["wb_other"] = start
            start = OTHER
        st.session_state["wb_model"] = start
    options = names + [OTHER]
    if st.session_state["wb_model"] not in options:
        st.session_state["wb_model"] = options[0]
    picked = sb.selectbox("Model", options, key="wb_model",
                          help="Zoo models, built-in models and checkpoints in the model directory")
    if picked == OTHER:
        picked = sb.text_input(f"Folder under {paths.models_dir()}", key="wb_other",
                               help="A native checkpoint, HF model directory or .gguf inside the model directory")
    device_options = choices.devices()
    device = sb.selectbox("Device", device_options, key="wb_device")
    dtype = sb.selectbox("Weights dtype", choices.dtypes_for(device), key="wb_dtype")
    if not picked:
        st.info("Choose a model in the sidebar.")
        return None
    try:
        source = choices.model_source(picked)
    except WorkbenchError as exc:
        st.error(str(exc))
        return None
    _reset_pages_on_model_change(picked)
    missing = choices.missing_message(picked) if isinstance(source, str) else None
    if missing:
        st.warning(missing)
        st.code(f"workbench fetch {picked}", language="bash")
        sb.warning(f"{picked} is not fetched yet")
        return None
    key = str(ModelKey(picked, device, dtype))
    start = time.perf_counter()
    try:
        with st.spinner(f"Loading {picked} on {device} ({dtype})…"):
            model = cached.model(key)
    except WorkbenchError as exc:
        st.error(f"Could not load {picked}: {exc}")
        return None
    load_s = time.perf_counter() - start
    cfg = model.cfg
    sb.caption(f"{cfg.n_layers} layers · d_model {cfg.d_model} · {cfg.n_heads} heads · vocab {cfg.d_vocab} · "
               f"context {cfg.n_ctx}" + ("" if model.tokenizer is not None else " · no tokenizer (type token ids)"))
    with sb.expander("Model card"):
        st.markdown(choices.model_card(picked))
    return Selection(key, picked, device, dtype, load_s)
