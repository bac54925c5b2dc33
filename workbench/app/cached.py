"""Every ``st.cache_*`` wrapper of the app, in one place.

Each wrapper takes plain strings (and small numbers): the *model key* ``"name|device|dtype"``
(:class:`workbench.app.choices.ModelKey`) and the prompt text, so a cache entry names the model,
the device and the dtype it was computed with. Model runs are cached on (model key, prompt); the
cheap slicing a widget does (which layer, which head) happens outside, on the cached result, so
moving a slider never reruns the model. Heavy tensors live in ``cache_resource`` (kept as they are,
not pickled); small tables in ``cache_data``.
"""

from __future__ import annotations

from typing import NamedTuple

import streamlit as st
import torch
from torch import Tensor

from workbench.app import choices, compute
from workbench.app.choices import ModelKey


# --------------------------------------------------------------------------------------- models


@st.cache_resource(max_entries=2, show_spinner=False)
def model(key: str):
    """Return the loaded HookedGPT for a model key (two models stay loaded at most)."""
    spec = ModelKey.parse(key)
    source = choices.model_source(spec.name)
    try:
        from workbench.zoo import load_model
    except ImportError:
        from workbench.loading import load_native

        m = load_native(source)
    else:
        m = load_model(source, progress=False)
    return m.to(device=spec.device, dtype=spec.torch_dtype).eval()


class Encoded(NamedTuple):
    """A prompt as the model sees it."""

    #: token ids, at most the cap
    ids: list[int]
    #: each token as text
    str_tokens: list[str]
    #: how many tokens the full prompt had before the cap
    n_full: int


@st.cache_data(max_entries=256, show_spinner=False)
def encode(key: str, text: str, max_tokens: int = choices.MAX_PROMPT_TOKENS) -> Encoded:
    """Return a prompt's token ids and strings, cut to ``min(max_tokens, n_ctx)`` tokens."""
    ids, str_tokens = compute.encode(model(key), text)
    cap = min(max_tokens, model(key).cfg.n_ctx)
    return Encoded(ids[:cap], str_tokens[:cap], len(ids))


def _tokens(key: str, text: str) -> Tensor:
    m = model(key)
    return torch.tensor([encode(key, text).ids], device=m.embed.W_E.device)


# ------------------------------------------------------------------------------------ one prompt


@st.cache_resource(max_entries=16, show_spinner=False)
def attention_patterns(key: str, text: str) -> Tensor:
    """Return every head's attention pattern on the prompt, ``[layer head query key]`` (CPU, float32)."""
    m = model(key)
    names = [f"blocks.{layer}.attn.hook_pattern" for layer in range(m.cfg.n_layers)]
    with torch.inference_mode():
        _, cache = m.run_with_cache(_tokens(key, text), names_filter=names, device="cpu", dtype=torch.float32)
    return torch.stack([cache[n][0] for n in names])


@st.cache_resource(max_entries=16, show_spinner=False)
def next_token_logits(key: str, text: str) -> Tensor:
    """Return the logits for the token after the prompt, ``[d_vocab]`` (CPU, float32)."""
    m = model(key)
    with torch.inference_mode():
        return m(_tokens(key, text))[0, -1].float().cpu()


@st.cache_data(max_entries=16, show_spinner=False)
def head_scores(key: str, text: str):
    """Return a DataFrame of head-type scores (previous token, first token, self, duplicate) on the prompt."""
    return compute.head_type_scores(attention_patterns(key, text), encode(key, text).ids)


# ------------------------------------------------------------------------------------ embeddings


@st.cache_resource(max_entries=2, show_spinner=False)
def unit_embeddings(key: str) -> Tensor:
    """Return the token embeddings scaled to unit length, ``[d_vocab d_model]`` (float32)."""
    return compute.unit_rows(model(key).embed.W_E)


@st.cache_data(max_entries=32, show_spinner=False)
def projection(key: str, words: str, method: str):
    """Return a DataFrame of 2-D coordinates for the first token of each word (``method``: pca or tsne)."""
    m = model(key)
    ids, labels = compute.word_token_ids(m, words.split())
    return compute.project_2d(m.embed.W_E[ids].detach().float().cpu(), labels, method)
