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


# ------------------------------------------------------------------------------------ induction


@st.cache_resource(max_entries=8, show_spinner=False)
def induction(key: str, seq_len: int, batch: int = 8):
    """Return ``(HeadScores, RepeatedTokens)``: every head scored on twice-shown random tokens, and the losses."""
    from workbench.analysis.induction import default_spec, repeated_random_tokens, score_heads

    m = model(key)
    seq = repeated_random_tokens(default_spec(m, seq_len=seq_len, batch=batch), m.cfg.d_vocab)
    with torch.inference_mode():
        scores = score_heads(m, seq.tokens.to(m.W_E.device))
    return scores, seq


@st.cache_data(max_entries=256, show_spinner=False)
def snapshot_point(snapshot_dir: str, device: str, dtype: str, seq_len: int) -> compute.DynamicsPoint:
    """Return the induction measurements of one training snapshot (a checkpoint directory)."""
    from pathlib import Path

    from workbench.model import HookedGPT

    m = HookedGPT.load(Path(snapshot_dir)).to(device=device, dtype=choices.DTYPES[dtype]).eval()
    step = int(Path(snapshot_dir).name.removeprefix("step_"))
    with torch.inference_mode():
        return compute.snapshot_point(step, m, seq_len)


# ------------------------------------------------------------------------------------ logit lens


@st.cache_resource(max_entries=16, show_spinner=False)
def lens_residuals(key: str, text: str) -> Tensor:
    """Return resid_pre of every block and the final residual on the prompt, ``[layer 1 pos d_model]``."""
    from workbench.analysis.logit_lens import lens_residuals as residuals

    with torch.inference_mode():
        return residuals(model(key), _tokens(key, text))


@st.cache_resource(max_entries=4, show_spinner=False)
def tuned_lens(key: str, lens_dir: str):
    """Return the tuned lens saved in ``lens_dir``, on the model's device and dtype."""
    from workbench.analysis.logit_lens import TunedLens

    return TunedLens.load(lens_dir, model(key)).eval()


@st.cache_resource(max_entries=16, show_spinner=False)
def lens(key: str, text: str, lens_dir: str = "", target: int = -1):
    """Return the logit lens (tuned lens when ``lens_dir`` is given) on the prompt: the top 10 tokens,
    and the rank of the next token (or of token id ``target`` at every position)."""
    from workbench.analysis.logit_lens import decode_residuals, next_token_targets

    m = model(key)
    tokens = _tokens(key, text)
    resid = lens_residuals(key, text)
    with torch.inference_mode():
        if lens_dir:
            resid = tuned_lens(key, lens_dir)(resid)
        targets = next_token_targets(tokens) if target < 0 else torch.full_like(tokens, target)
        return decode_residuals(m, resid, targets.to(resid.device), k=10)


# ------------------------------------------------------------------------------ attribution, patching


@st.cache_resource(max_entries=16, show_spinner=False)
def attribution(key: str, text: str, answer: int, wrong: int = -1, granularity: str = "layer"):
    """Return the direct logit attribution of the answer's logit (minus the wrong token's) at the last position."""
    from workbench.analysis.attribution import direct_logit_attribution

    with torch.inference_mode():
        return direct_logit_attribution(model(key), _tokens(key, text), answer, None if wrong < 0 else wrong,
                                        granularity=granularity)


@st.cache_resource(max_entries=64, show_spinner=False)
def patching(key: str, clean: str, corrupt: str, answer: int, wrong: int, kind: str, layers: tuple[int, ...] = ()):
    """Return the clean -> corrupted patching sweep of one kind (``resid_pre``, ``attn_out``, ``mlp_out``, ``z``);
    for ``resid_pre``, only the rows of ``layers`` when given (so a page can show progress layer by layer)."""
    from workbench.analysis import patching as P

    m = model(key)
    a, b = _tokens(key, clean), _tokens(key, corrupt)
    metric = P.LogitDiff(answer, None if wrong < 0 else wrong)
    with torch.inference_mode():
        if kind == "resid_pre":
            return P.patch_residual(m, a, b, metric, layers=list(layers) or None)
        if kind == "z":
            return P.patch_heads(m, a, b, metric)
        return P.patch_outputs(m, a, b, metric, kind=kind)


# ------------------------------------------------------------------------------------------ SAEs


@st.cache_resource(max_entries=4, show_spinner=False)
def sae(key: str, sae_dir: str):
    """Return the SAE saved in ``sae_dir`` on the model's device (float32)."""
    from workbench.sae.io import load_sae

    return load_sae(sae_dir, device=model(key).W_E.device)


@st.cache_resource(max_entries=4, show_spinner=False)
def store(store_dir: str):
    """Return the activation store at ``store_dir``, opened for reading."""
    from workbench.store import open_store

    return open_store(store_dir)


STATS_DIR = "feature_stats"


@st.cache_resource(max_entries=4, show_spinner=False)
def feature_stats(key: str, sae_dir: str, store_dir: str, hook: str):
    """Return the SAE's per-latent dashboard statistics over its store (saved beside the SAE once computed)."""
    from pathlib import Path

    from workbench.sae.features import FeatureStats, FeatureStatsConfig
    from workbench.sae.features import feature_stats as compute_stats

    saved = Path(sae_dir) / STATS_DIR
    if (saved / "feature_stats.json").is_file():
        return FeatureStats.load(saved)
    with torch.inference_mode():
        stats = compute_stats(sae(key, sae_dir), store(store_dir), hook, FeatureStatsConfig(batch_size=1024),
                              model=model(key))
    stats.save(saved)
    return stats


@st.cache_data(max_entries=64, show_spinner=False)
def feature_contexts(key: str, sae_dir: str, store_dir: str, hook: str, feature: int, rows: tuple[int, ...]):
    """Return the per-token activations of one latent around the given store rows."""
    from workbench.sae.features import feature_contexts as contexts

    with torch.inference_mode():
        return contexts(sae(key, sae_dir), store(store_dir), hook, feature, list(rows))


@st.cache_data(max_entries=16, show_spinner=False)
def activation_norm(key: str, hook: str, text: str) -> float:
    """Return the mean norm of the activation at ``hook`` over the prompt's tokens (the scale for steering)."""
    m = model(key)
    with torch.inference_mode():
        _, cache = m.run_with_cache(_tokens(key, text), names_filter=[hook])
        return float(cache[hook][0].float().norm(dim=-1).mean())


@st.cache_resource(max_entries=16, show_spinner=False)
def prompt_latents(key: str, sae_dir: str, hook: str, text: str) -> Tensor:
    """Return the SAE's latents on every token of the prompt, ``[pos d_sae]`` (CPU, float32)."""
    m, s = model(key), sae(key, sae_dir)
    with torch.inference_mode():
        _, cache = m.run_with_cache(_tokens(key, text), names_filter=[hook])
        return s.encode(cache[hook][0].to(s.W_enc)).float().cpu()


# ------------------------------------------------------------------------------------ superposition


@st.cache_resource(max_entries=32, show_spinner=False)
def toy_model(n_features: int, d_hidden: int, sparsity: float, decay: float, steps: int, seed: int = 0):
    """Return a toy model of superposition trained on CPU, and its geometry."""
    from workbench.analysis.superposition import ToyConfig, ToyTrainConfig, toy_geometry, train_toy_model

    threads = torch.get_num_threads()
    # a few-parameter model: thread hand-offs cost more than the arithmetic (1 thread is ~4x faster here)
    torch.set_num_threads(1)
    try:
        toy = train_toy_model(ToyConfig(n_features=n_features, d_hidden=d_hidden), 1.0 - sparsity,
                              compute.importance_profile(n_features, decay),
                              ToyTrainConfig(steps=steps, batch_size=512, lr=1e-2, seed=seed))
    finally:
        torch.set_num_threads(threads)
    return toy, toy_geometry(toy)
