"""Every ``st.cache_*`` wrapper of the app, in one place.

Each wrapper takes plain strings (and small numbers): the *model key* ``"name|device|dtype"``
(:class:`workbench.app.choices.ModelKey`) and the prompt text, so a cache entry names the model,
the device and the dtype it was computed with. Model runs are cached on (model key, prompt); the
cheap slicing a widget does (which layer, which head) happens outside, on the cached result, so
moving a slider never reruns the model. Heavy tensors live in ``cache_resource`` (kept as they are,
not pickled); small tables in ``cache_data``.

One model object serves every browser session. A cached result must not depend on who computed
it, so every model run below goes through :func:`_quiet`: it runs in an empty
:class:`contextvars.Context`, where no run-local hook (``workbench.hooks``) of the calling run can
fire, whatever that run has attached. Nothing here mutates the model after loading it (no
``.eval()/.train()``, no moves, no ``reset_hooks()``).
"""

from __future__ import annotations

import contextvars
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple, TypeVar

import streamlit as st
import torch
from torch import Tensor

from workbench import snapshots
from workbench.analysis import eap as E
from workbench.analysis import graph as G
from workbench.analysis import logit_lens
from workbench.analysis.attribution import direct_logit_attribution
from workbench.analysis.graph import load_transcoders
from workbench.analysis.induction import default_spec, repeated_random_tokens, score_heads
from workbench.analysis.logit_lens import TunedLens, decode_residuals, next_token_targets
from workbench.analysis.patching import LogitDiff
from workbench.analysis.superposition import ToyConfig, ToyTrainConfig, toy_geometry, train_toy_model
from workbench.analysis.tasks import Task, load_task
from workbench.app import choices, compute
from workbench.app import jobs as jobs_mod
from workbench.app.choices import ModelKey
from workbench.model import HookedGPT
from workbench.names import act_name
from workbench.sae import features as sae_features
from workbench.sae.features import FeatureStats, FeatureStatsConfig
from workbench.sae.io import load_sae
from workbench.snapshots import embedding_frames, list_snapshots, load_snapshot, step_of
from workbench.store import open_store
from workbench.teaching import attention_from_scratch, decode_with_cache, model_pattern, train_bpe_steps
from workbench.zoo import load_model

T = TypeVar("T")


def _quiet(fn: Callable[[], T]) -> T:
    """Return ``fn()`` run in an empty context: no run-local hook of the caller fires in its forward passes
    (so what it returns can be cached and shown to any session). Streamlit calls stay outside ``fn``."""
    return contextvars.Context().run(fn)


# --------------------------------------------------------------------------------------- models


@st.cache_resource(max_entries=2, show_spinner=False)
def model(key: str):
    """Return the loaded HookedGPT for a model key (two models stay loaded at most)."""
    spec = ModelKey.parse(key)
    source = choices.model_source(spec.name)
    m = load_model(source, progress=False)
    return m.to(device=spec.device, dtype=spec.torch_dtype).eval()


class Encoded(NamedTuple):
    """A prompt as the model sees it."""

    #: token ids, at most the cap
    ids: list[int]
    #: each token as text
    str_tokens: list[str]
    #: how many tokens the full prompt had before the cap (a lower bound when ``exact`` is False)
    n_full: int
    #: False when the text was cut before tokenizing (a long prompt): ``n_full`` is then "more than"
    exact: bool = True


@st.cache_data(max_entries=256, show_spinner=False)
def encode(key: str, text: str, max_tokens: int = choices.MAX_PROMPT_TOKENS) -> Encoded:
    """Return a prompt's token ids and strings, cut to ``min(max_tokens, n_ctx)`` tokens. Only a prefix
    of a long text is tokenized (:func:`compute.encode_capped`), never the whole of it."""
    m = model(key)
    cap = min(max_tokens, m.cfg.n_ctx)
    got = compute.encode_capped(m, text, cap)
    return Encoded(got.ids, got.str_tokens, got.n_full, got.exact)


def _tokens(key: str, text: str) -> Tensor:
    m = model(key)
    return torch.tensor([encode(key, text).ids], device=m.embed.W_E.device)


# ------------------------------------------------------------------------------------ one prompt


@st.cache_resource(max_entries=16, show_spinner=False)
def attention_patterns(key: str, text: str) -> Tensor:
    """Return every head's attention pattern on the prompt, ``[layer head query key]`` (CPU, float32)."""
    m = model(key)
    names = [act_name("pattern", layer) for layer in range(m.cfg.n_layers)]
    tokens = _tokens(key, text)

    def run() -> Tensor:
        with torch.inference_mode():
            _, cache = m.run_with_cache(tokens, names_filter=names, device="cpu", dtype=torch.float32)
        return torch.stack([cache[n][0] for n in names])
    return _quiet(run)


@st.cache_resource(max_entries=16, show_spinner=False)
def next_token_logits(key: str, text: str) -> Tensor:
    """Return the logits for the token after the prompt, ``[d_vocab]`` (CPU, float32)."""
    m = model(key)
    tokens = _tokens(key, text)

    def run() -> Tensor:
        with torch.inference_mode():
            return m(tokens)[0, -1].float().cpu()
    return _quiet(run)


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
    m = model(key)
    seq = repeated_random_tokens(default_spec(m, seq_len=seq_len, batch=batch), m.cfg.d_vocab)

    def run():
        with torch.inference_mode():
            return score_heads(m, seq.tokens.to(m.W_E.device))
    return _quiet(run), seq


@st.cache_data(max_entries=256, show_spinner=False)
def snapshot_point(snapshot_dir: str, device: str, dtype: str, seq_len: int) -> compute.DynamicsPoint:
    """Return the induction measurements of one training snapshot (a checkpoint directory)."""
    m = HookedGPT.load(Path(snapshot_dir)).to(device=device, dtype=choices.DTYPES[dtype]).eval()  # a private copy
    step = int(Path(snapshot_dir).name.removeprefix("step_"))

    def run() -> compute.DynamicsPoint:
        with torch.inference_mode():
            return compute.snapshot_point(step, m, seq_len)
    return _quiet(run)


# ------------------------------------------------------------------------------------ logit lens


@st.cache_resource(max_entries=16, show_spinner=False)
def lens_residuals(key: str, text: str) -> Tensor:
    """Return resid_pre of every block and the final residual on the prompt, ``[layer 1 pos d_model]``."""

    m, tokens = model(key), _tokens(key, text)

    def run() -> Tensor:
        with torch.inference_mode():
            return logit_lens.lens_residuals(m, tokens)
    return _quiet(run)


@st.cache_resource(max_entries=4, show_spinner=False)
def tuned_lens(key: str, lens_dir: str):
    """Return the tuned lens saved in ``lens_dir``, on the model's device and dtype."""
    return TunedLens.load(lens_dir, model(key)).eval()


@st.cache_resource(max_entries=16, show_spinner=False)
def lens(key: str, text: str, lens_dir: str = "", target: int = -1):
    """Return the logit lens (tuned lens when ``lens_dir`` is given) on the prompt: the top 10 tokens,
    and the rank of the next token (or of token id ``target`` at every position)."""
    m = model(key)
    tokens = _tokens(key, text)
    resid = lens_residuals(key, text)
    translator = tuned_lens(key, lens_dir) if lens_dir else None

    def run():
        with torch.inference_mode():
            r = translator(resid) if translator is not None else resid
            targets = next_token_targets(tokens) if target < 0 else torch.full_like(tokens, target)
            return decode_residuals(m, r, targets.to(r.device), k=10)
    return _quiet(run)


# ------------------------------------------------------------------------------ attribution, patching


@st.cache_resource(max_entries=16, show_spinner=False)
def attribution(key: str, text: str, answer: int, wrong: int = -1, granularity: str = "layer"):
    """Return the direct logit attribution of the answer's logit (minus the wrong token's) at the last position."""
    m, tokens = model(key), _tokens(key, text)

    def run():
        with torch.inference_mode():
            return direct_logit_attribution(m, tokens, answer, None if wrong < 0 else wrong, granularity=granularity)
    return _quiet(run)


class PatchRequest(NamedTuple):
    """One clean -> corrupted patching sweep, named by plain values."""

    key: str
    clean: str
    corrupt: str
    answer: int
    wrong: int
    kind: str


def patching_job(request: PatchRequest) -> jobs_mod.Job:
    """Return the background job computing a patching sweep (started now, or the one already running or done)."""
    m = model(request.key)
    a, b = _tokens(request.key, request.clean), _tokens(request.key, request.corrupt)

    def work(report: jobs_mod.Report):
        return compute.patching_sweep(m, a, b, request.answer, None if request.wrong < 0 else request.wrong,
                                      request.kind, report)
    return jobs().start(("patching", *request), f"patching sweep ({request.kind})", work)


class CircuitRequest(NamedTuple):
    """One EAP-IG circuit search, named by plain values: a generated task (``ioi``, ``greater-than``) of
    ``prompts`` pairs, or (``task="pair"``) one clean/corrupted prompt pair with its answer and wrong token."""

    key: str
    task: str
    prompts: int
    steps: int
    clean: str = ""
    corrupt: str = ""
    answer: int = -1
    wrong: int = -1


@st.cache_resource(max_entries=8, show_spinner=False)
def edge_scores(request: CircuitRequest) -> tuple[Task, E.EAPResult]:
    """Return the task's prompt pairs and every edge's EAP-IG score."""
    m = model(request.key)
    if request.task == "pair":
        metric = LogitDiff(request.answer, None if request.wrong < 0 else request.wrong)
        task = Task("pair", _tokens(request.key, request.clean), _tokens(request.key, request.corrupt), metric,
                      [request.clean], [request.corrupt])
    else:
        task = load_task(m, request.task, n=request.prompts)
    config = E.EAPConfig(method="eap-ig", steps=request.steps)
    return task, _quiet(lambda: E.edge_attribution(m, task.clean, task.corrupt, task.metric, config))


@st.cache_resource(max_entries=32, show_spinner=False)
def circuit(request: CircuitRequest, n_edges: int) -> E.Circuit:
    """Return the top-``n_edges`` circuit of :func:`edge_scores` and its faithfulness (one patched run)."""
    m = model(request.key)
    task, result = edge_scores(request)
    keep = E.top_n_circuit(result, n_edges)
    (faith,) = _quiet(lambda: E.faithfulness(m, task.clean, task.corrupt, task.metric, [keep]))
    return E.Circuit(result, keep, faith)


# ------------------------------------------------------------------------------------------ SAEs


@st.cache_resource(max_entries=4, show_spinner=False)
def sae(key: str, sae_dir: str):
    """Return the SAE saved in ``sae_dir`` on the model's device (float32)."""
    return load_sae(sae_dir, device=model(key).W_E.device)


@st.cache_resource(max_entries=4, show_spinner=False)
def store(store_dir: str):
    """Return the activation store at ``store_dir``, opened for reading."""
    return open_store(store_dir)


STATS_DIR = "feature_stats"


@st.cache_resource(max_entries=4, show_spinner=False)
def feature_stats(key: str, sae_dir: str, store_dir: str, hook: str):
    """Return the SAE's per-latent dashboard statistics over its store (saved beside the SAE once computed)."""
    saved = Path(sae_dir) / STATS_DIR
    if (saved / "feature_stats.json").is_file():
        return FeatureStats.load(saved)
    s, st_, m = sae(key, sae_dir), store(store_dir), model(key)

    def run():
        with torch.inference_mode():
            return sae_features.feature_stats(s, st_, hook, FeatureStatsConfig(batch_size=1024), model=m)
    stats = _quiet(run)
    stats.save(saved)
    return stats


@st.cache_data(max_entries=64, show_spinner=False)
def feature_contexts(key: str, sae_dir: str, store_dir: str, hook: str, feature: int, rows: tuple[int, ...]):
    """Return the per-token activations of one latent around the given store rows."""

    with torch.inference_mode():
        return sae_features.feature_contexts(sae(key, sae_dir), store(store_dir), hook, feature, list(rows))


@st.cache_data(max_entries=16, show_spinner=False)
def activation_norm(key: str, hook: str, text: str) -> float:
    """Return the mean norm of the activation at ``hook`` over the prompt's tokens (the scale for steering)."""
    m, tokens = model(key), _tokens(key, text)

    def run() -> float:
        with torch.inference_mode():
            _, cache = m.run_with_cache(tokens, names_filter=[hook])
            return float(cache[hook][0].float().norm(dim=-1).mean())
    return _quiet(run)


@st.cache_resource(max_entries=4, show_spinner=False)
def live_features(key: str, sae_dir: str, hook: str) -> compute.LiveFeatures:
    """Return a transcoder's latents read on the fly (no activation store) on :data:`compute.LIVE_TOKENS` tokens of
    the model's own corpus (as the quick SAE reads it): density, histograms, top activations, logit effects."""
    m, s = model(key), sae(key, sae_dir)
    corpus = compute.quick_sae_corpus(ModelKey.parse(key).name)
    windows = compute.sae_windows(m, compute.LIVE_TOKENS, compute.LIVE_CTX, corpus)
    return _quiet(lambda: compute.live_features(m, s, hook, windows))


@st.cache_data(max_entries=64, show_spinner=False)
def live_contexts(key: str, sae_dir: str, hook: str, feature: int) -> list:
    """Return one latent's strongest examples in :func:`live_features`, with its activation on the tokens around."""
    m, s, live = model(key), sae(key, sae_dir), live_features(key, sae_dir, hook)
    return _quiet(lambda: compute.live_contexts(m, s, hook, live, feature))


@st.cache_resource(max_entries=16, show_spinner=False)
def prompt_latents(key: str, sae_dir: str, hook: str, text: str) -> Tensor:
    """Return the SAE's latents on every token of the prompt, ``[pos d_sae]`` (CPU, float32)."""
    m, s, tokens = model(key), sae(key, sae_dir), _tokens(key, text)

    def run() -> Tensor:
        with torch.inference_mode():
            _, cache = m.run_with_cache(tokens, names_filter=[hook])
            return s.encode(cache[hook][0].to(s.W_enc)).float().cpu()
    return _quiet(run)


# ------------------------------------------------------------------------------------ superposition


@st.cache_resource(max_entries=32, show_spinner=False)
def toy_model(n_features: int, d_hidden: int, sparsity: float, decay: float, steps: int, seed: int = 0):
    """Return a toy model of superposition trained on CPU, and its geometry."""
    # a few-parameter model: thread hand-offs cost more than the arithmetic (1 thread is ~4x faster here)
    with compute.one_torch_thread():
        toy = train_toy_model(ToyConfig(n_features=n_features, d_hidden=d_hidden), 1.0 - sparsity,
                              compute.importance_profile(n_features, decay),
                              ToyTrainConfig(steps=steps, batch_size=512, lr=1e-2, seed=seed))
    return toy, toy_geometry(toy)


# ------------------------------------------------------------------------------------ background jobs


@st.cache_resource(show_spinner=False)
def jobs() -> jobs_mod.Jobs:
    """Return the process's one registry of background jobs (shared by every session)."""
    return jobs_mod.Jobs()


def quick_sae_job(key: str, name: str, layer: int, n_tokens: int, d_sae: int, k: int, steps: int) -> jobs_mod.Job:
    """Return the background job training a quick SAE (:func:`compute.train_quick_sae`), started now or the one
    already running or done for these settings. Jobs writing the same store or run directory take turns."""
    m = model(key)
    registry = jobs()
    shares = {"caching activations": (0.0, 0.3), "training the SAE": (0.3, 0.7), "done": (0.0, 1.0)}

    def work(report: jobs_mod.Report):
        def progress(stage: str, done: float) -> None:
            lo, width = shares.get(stage, (0.0, 1.0))
            report(lo + width * done, stage)
        return compute.train_quick_sae(m, name, layer, n_tokens, d_sae, k, steps, progress,
                                       writing=lambda *dirs: registry.writing(*dirs, report=report))
    return registry.start(("quick-sae", key, layer, n_tokens, d_sae, k, steps), f"quick SAE on layer {layer}", work)


# ------------------------------------------------------------------- teaching pages, training dynamics


@st.cache_data(max_entries=16, show_spinner=False)
def bpe_trace(text: str, n_merges: int):
    """Return byte-level BPE trained merge by merge on ``text`` (one document a line)."""
    return train_bpe_steps([line for line in text.splitlines() if line.strip()], n_merges)


@st.cache_resource(max_entries=16, show_spinner=False)
def scratch_attention(key: str, text: str, layer: int, head: int):
    """Return ``(ScratchAttention, model pattern)`` of one head on the prompt: by hand, and the model's hook_pattern."""
    m = model(key)
    tokens = _tokens(key, text)[0]
    return _quiet(lambda: (attention_from_scratch(m, tokens, layer, head), model_pattern(m, tokens, layer, head)))


@st.cache_resource(max_entries=8, show_spinner=False)
def cached_decode(key: str, text: str, n_new: int):
    """Return the prompt continued greedily by ``n_new`` tokens with a KV cache, and that cache."""
    m, tokens = model(key), _tokens(key, text)[0]
    return _quiet(lambda: decode_with_cache(m, tokens, n_new))


@st.cache_data(max_entries=16, show_spinner=False)
def hook_shapes_on(key: str, text: str) -> dict[str, tuple[int, ...]]:
    """Return every hook's shape on the prompt (one forward pass; nothing is kept but the shapes)."""
    m, tokens = model(key), _tokens(key, text)
    shapes: dict[str, tuple[int, ...]] = {}

    def record(x: Tensor, hook) -> None:
        shapes[hook.name] = tuple(x.shape)

    def run() -> None:
        with torch.inference_mode(), m.hooks([(lambda name: True, record)]):
            m(tokens)

    _quiet(run)
    return shapes


@st.cache_resource(max_entries=64, show_spinner=False)
def snapshot_model(snapshot_dir: str, device: str, dtype: str):
    """Return the model saved in one training snapshot directory, on ``device`` in ``dtype``."""
    return load_snapshot(snapshot_dir, device=device, dtype=choices.DTYPES[dtype])


@st.cache_resource(max_entries=256, show_spinner=False)
def snapshot_heads(snapshot_dir: str, device: str, dtype: str, seq_len: int):
    """Return one snapshot's head scores, patterns and losses on fixed repeated random tokens."""
    m = snapshot_model(snapshot_dir, device, dtype)
    return _quiet(lambda: snapshots.snapshot_heads(m, step_of(snapshot_dir), seq_len))


@st.cache_resource(max_entries=8, show_spinner=False)
def snapshot_embeddings(model_dir: str, device: str, dtype: str, ids: tuple[int, ...]):
    """Return the chosen token embeddings of every snapshot, projected on the final snapshot's principal axes."""
    snaps = list_snapshots(model_dir)
    W_Es = [snapshot_model(str(s.path), device, dtype).embed.W_E.detach().float().cpu() for s in snaps]
    return embedding_frames(W_Es, [s.step for s in snaps], list(ids))


@st.cache_data(max_entries=64, show_spinner=False)
def snapshot_tsne(snapshot_dir: str, device: str, dtype: str, ids: tuple[int, ...]):
    """Return a t-SNE map (DataFrame x, y) of the chosen token embeddings of one snapshot."""
    m = snapshot_model(snapshot_dir, device, dtype)
    return compute.project_2d(m.embed.W_E[list(ids)].detach().float().cpu(), [str(i) for i in ids], "tsne")


# ------------------------------------------------------------------------------------ circuit tracing


@st.cache_resource(max_entries=2, show_spinner=False)
def transcoder_set(spec: str) -> dict:
    """Return a transcoder set (a directory, or a shipped set's name) as ``{layer: transcoder}``."""
    return load_transcoders(spec)


@st.cache_resource(max_entries=16, show_spinner=False)
def attribution_graph(key: str, spec: str, text: str, max_features: int = 0):
    """Return ``(graph, seconds)``: the prompt's attribution graph through the set.

    ``max_features`` 0 keeps every feature."""
    m, tcs, tokens = model(key), transcoder_set(spec), _tokens(key, text)

    def run():
        t0 = time.perf_counter()
        g = G.attribute(m, tcs, tokens, max_feature_nodes=max_features or None)
        return g, time.perf_counter() - t0
    return _quiet(run)


@st.cache_resource(max_entries=8, show_spinner=False)
def transcoder_contexts(key: str, spec: str, layer: int, n_tokens: int = 4096, n_ctx: int = 64):
    """Return ``(windows, TopActivations)``: every feature of one layer's transcoder at its strongest on the
    model's own corpus (as the quick SAE reads it)."""
    m, tcs = model(key), transcoder_set(spec)
    windows = compute.sae_windows(m, n_tokens, n_ctx, compute.quick_sae_corpus(ModelKey.parse(key).name))
    return windows, _quiet(lambda: G.top_activations(m, tcs[layer], layer, windows.to(m.embed.W_E.device)))


@st.cache_resource(max_entries=64, show_spinner=False)
def feature_edit_logits(key: str, spec: str, text: str, edits: tuple[tuple[int, int, int, float, bool], ...]) -> Tensor:
    """Return the real model's last-position logits with features edited (``(layer, pos, index, value, scale)``)."""
    m, tcs, tokens = model(key), transcoder_set(spec), _tokens(key, text)
    return _quiet(lambda: G.intervene(m, tcs, tokens, [G.FeatureEdit(*e) for e in edits])[-1].cpu())
