"""Small pure computations behind the pages (no streamlit here).

These are the few pieces no library module covers yet (embedding neighbours and analogies,
head-type scores on one prompt, sampling filters, finding snapshots / tuned lenses / SAEs on disk,
per-token SAE listings, steering hooks); each is a plain function so it can move into the library
unchanged.
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager as ContextManager
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench import paths
from workbench.analysis import patching as P
from workbench.analysis.attribution import token_id
from workbench.analysis.graph import TopActivations, top_activations
from workbench.analysis.induction import (
    RepeatedTokensSpec,
    default_spec,
    masked_attention_score,
    repeat_losses,
    repeated_random_tokens,
    score_heads,
    score_masks,
)
from workbench.analysis.logit_lens import LENS_CONFIG_FILE, TunedLensConfig, train_tuned_lens
from workbench.builtin import RECIPES, snapshot_dirs
from workbench.errors import InputError
from workbench.generate import SamplingConfig, next_token_probs
from workbench.names import act_name, layer_of
from workbench.pipelines import (
    SHIPPED_TRANSCODERS,
    SAERecipe,
    cache_windows,
    token_windows,
    train_sae_on_store,
    transcoders_home,
)
from workbench.sae.features import (
    FeatureContext,
    FeatureStatsConfig,
    decoder_neighbours,
    logit_effects,
    residual_directions,
)
from workbench.sae.io import CFG_FILE, WEIGHTS_FILE
from workbench.sae.model import SAE
from workbench.sae.train import SAETrainConfig
from workbench.store import ReaderConfig, StoreConfig
from workbench.train import METRICS_FILE, read_metrics


def encode(model, text: str) -> tuple[list[int], list[str]]:
    """Return a prompt's ids and token strings; a model without a tokenizer takes ids separated by spaces."""
    if model.tokenizer is not None:
        ids = model.tokenizer.encode(text)
        if not ids:
            raise InputError("the prompt is empty; type at least one word")
        return ids, model.tokenizer.str_tokens(ids)
    try:
        ids = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise InputError(
            f"this model has no tokenizer: type token ids separated by spaces (0 to {model.cfg.d_vocab - 1}), "
            f"not {text[:40]!r}"
        ) from None
    if not ids:
        raise InputError("the prompt is empty; type at least one token id")
    bad = [i for i in ids if not 0 <= i < model.cfg.d_vocab]
    if bad:
        raise InputError(f"token ids {bad[:5]} are outside the vocabulary [0, {model.cfg.d_vocab})")
    return ids, [str(i) for i in ids]


class CappedTokens(NamedTuple):
    """A prompt's first tokens, found without tokenizing all of a long text."""

    ids: list[int]
    str_tokens: list[str]
    #: tokens of the whole text (exact), or of the prefix that was tokenized (a lower bound)
    n_full: int
    #: whether ``n_full`` counts the whole text
    exact: bool


#: a prefix of this many characters per kept token is tokenized first (a token is rarely longer)
CHARS_PER_TOKEN = 16
#: tokens past the cap that must come out of a prefix before the first ``cap`` count as settled (the
#: prefix's cut can only change the tokens next to it)
SETTLE_TOKENS = 8


def encode_capped(model, text: str, cap: int) -> CappedTokens:
    """Return the first ``cap`` tokens of ``text`` tokenizing only as much of it as that takes.

    A prefix of ``cap * CHARS_PER_TOKEN`` characters is tokenized; when it yields more than
    ``cap + SETTLE_TOKENS`` tokens the first ``cap`` cannot depend on what follows, else the prefix
    doubles (up to the whole text). A 10 MB prompt costs a few kB of tokenizing, not 10 MB.
    """
    n = len(text)
    size = max(64, cap * CHARS_PER_TOKEN)
    while True:
        whole = size >= n
        part = text if whole else text[:size]
        if model.tokenizer is None:
            # ids typed as numbers: split off no more pieces than needed
            pieces = part.replace(",", " ").split(None, cap + SETTLE_TOKENS + 1)
            if not whole and len(pieces) <= cap + SETTLE_TOKENS:
                size *= 2
                continue
            ids, str_tokens = encode(model, " ".join(pieces[: cap + SETTLE_TOKENS]))
            exact = whole and len(pieces) <= cap + SETTLE_TOKENS
            return CappedTokens(ids[:cap], str_tokens[:cap], len(ids), exact)
        ids, str_tokens = encode(model, part)
        if whole or len(ids) > cap + SETTLE_TOKENS:
            return CappedTokens(ids[:cap], str_tokens[:cap], len(ids), whole)
        size *= 2


def token_label(model, token_id: int) -> str:
    """Return a token's text (or its id for a model without a tokenizer)."""
    if model.tokenizer is None:
        return str(token_id)
    return model.tokenizer.str_tokens([token_id])[0]


# ------------------------------------------------------------------------------------ attention


def head_type_scores(pattern: Float[Tensor, "layer head q k"], ids: list[int]) -> pd.DataFrame:
    """Return, per head, the previous-token, duplicate-token and induction scores of
    ``workbench.analysis.induction`` on this one prompt (NaN where the prompt has no query for a
    score, e.g. no repeated token), plus the mean attention to the first token (an attention sink)."""
    n_layers, n_heads, n = pattern.shape[:3]
    tokens = torch.tensor([ids])
    columns: dict[str, Tensor] = {}
    for kind, mask in score_masks(tokens).items():
        if mask.any():
            columns[kind.replace("_", " ")] = torch.stack([masked_attention_score(pattern[layer][None], mask)
                                                           for layer in range(n_layers)])
        else:
            columns[kind.replace("_", " ")] = torch.full((n_layers, n_heads), float("nan"))
    columns["first token"] = pattern[:, :, 1:, 0].mean(-1) if n > 1 else torch.full((n_layers, n_heads), float("nan"))
    layer, head = torch.meshgrid(torch.arange(n_layers), torch.arange(n_heads), indexing="ij")
    frame = {"layer": layer.flatten().numpy(), "head": head.flatten().numpy()}
    frame.update({k: v.flatten().float().numpy() for k, v in columns.items()})
    return pd.DataFrame(frame)


# ------------------------------------------------------------------------------------ embeddings


def unit_rows(W: Float[Tensor, "d_vocab d_model"]) -> Float[Tensor, "d_vocab d_model"]:
    """Return the rows of ``W`` scaled to unit length (float32, CPU)."""
    W = W.detach().float().cpu()
    return W / W.norm(dim=-1, keepdim=True).clamp_min(1e-8)


class Neighbours(NamedTuple):
    """Nearest tokens to a direction in embedding space."""

    ids: list[int]
    #: cosine similarity of each to the query direction
    cosine: list[float]


def nearest(unit: Float[Tensor, "d_vocab d_model"], direction: Float[Tensor, " d_model"], k: int,
            exclude: tuple[int, ...] = ()) -> Neighbours:
    """Return the ``k`` tokens whose embeddings point most nearly along ``direction``."""
    sims = unit @ (direction.float().cpu() / direction.float().norm().clamp_min(1e-8))
    if exclude:
        sims[list(exclude)] = -float("inf")
    top = sims.topk(min(k, sims.shape[0]))
    return Neighbours(top.indices.tolist(), top.values.tolist())


def word_token_ids(model, words: list[str]) -> tuple[list[int], list[str]]:
    """Return the first token of each word (and its text); the model's tokenizer decides the pieces."""
    ids, labels = [], []
    for w in words:
        got, pieces = encode_no_bos(model, w)
        if got:
            ids.append(got[0])
            labels.append(pieces[0])
    if not ids:
        raise InputError("no words to look up; type at least one word")
    return ids, labels


def encode_no_bos(model, text: str) -> tuple[list[int], list[str]]:
    """Return a piece of text's ids without a BOS token (ids typed as numbers for tokenizer-less models)."""
    if model.tokenizer is None:
        return encode(model, text)
    ids = model.tokenizer.encode(text, add_bos=False)
    return ids, model.tokenizer.str_tokens(ids)


def analogy(model, unit: Float[Tensor, "d_vocab d_model"], a: str, b: str, c: str,
            k: int = 10) -> tuple[Neighbours, list[str]]:
    """Return the tokens nearest ``E[b] - E[a] + E[c]`` ("a is to b as c is to ?") and the tokens used."""
    ids, labels = word_token_ids(model, [a, b, c])
    if len(ids) != 3:
        raise InputError("an analogy needs three words")
    W = unit
    direction = W[ids[1]] - W[ids[0]] + W[ids[2]]
    return nearest(W, direction, k, exclude=tuple(ids)), labels


def project_2d(vectors: Float[Tensor, "n d_model"], labels: list[str], method: str = "pca") -> pd.DataFrame:
    """Return 2-D coordinates of ``vectors`` by PCA or t-SNE (scikit-learn), with their labels."""
    # imported here: sklearn.manifold takes ~3.7 s to import (python -X importtime), which every page would pay
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE
    from threadpoolctl import threadpool_limits

    X = vectors.detach().float().cpu().numpy()
    if X.shape[0] < 3:
        raise InputError(f"a projection needs at least 3 words, got {X.shape[0]}")
    if method not in ("pca", "tsne"):
        raise InputError(f"projection method {method!r} is not one of ('pca', 'tsne')")
    # a few dozen points: OpenMP thread start-up costs more than the work (t-SNE 1 s -> 0.15 s on one thread)
    with threadpool_limits(1):
        if method == "pca":
            xy = PCA(n_components=2, random_state=0).fit_transform(X)
        else:
            xy = TSNE(n_components=2, perplexity=min(30.0, (X.shape[0] - 1) / 3), init="pca",
                      random_state=0).fit_transform(X)
    return pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "token": labels})


# ------------------------------------------------------------------------------------ sampling


def sampling_probs(logits: Float[Tensor, " d_vocab"], temperature: float, top_k: int | None,
                   top_p: float | None) -> Float[Tensor, " d_vocab"]:
    """Return the next-token distribution after temperature, top-k and top-p (nucleus) filtering, as
    generation samples it (temperature 0: all mass on the argmax)."""
    top_k = top_k if top_k is not None and top_k > 0 else None
    top_p = top_p if top_p is not None and 0 < top_p < 1 else None
    return next_token_probs(logits[None], SamplingConfig(max(temperature, 0.0), top_k, top_p))[0]


# ------------------------------------------------------------------------------------ answers


def answer_id(model, text: str) -> int:
    """Return the id of one answer token: text that is one token, or an id for a model without a tokenizer."""
    if model.tokenizer is None:
        try:
            return token_id(model, int(text.strip()))
        except ValueError:
            raise InputError(f"this model has no tokenizer: give the answer as a token id, not {text!r}") from None
    return token_id(model, text)


# ------------------------------------------------------------------------------ training dynamics


class Snapshot(NamedTuple):
    """One saved training snapshot of a model."""

    step: int
    path: Path


def snapshots(model_dir: Path | None) -> list[Snapshot]:
    """Return the training snapshots saved beside a checkpoint (``snapshots/step_NNNNNN/``), by step."""
    if model_dir is None:
        return []
    return sorted(Snapshot(step, d) for step, d in snapshot_dirs(model_dir).items() if (d / "config.json").is_file())


def training_metrics(model_dir: Path | None) -> pd.DataFrame:
    """Return the ``metrics.jsonl`` a training run wrote beside a checkpoint (empty when there is none).

    Raises :class:`~workbench.errors.DataError` when the log is corrupt before its last line.
    """
    path = None if model_dir is None else model_dir / METRICS_FILE
    if path is None or not path.is_file():
        return pd.DataFrame()
    return pd.DataFrame(read_metrics(path))


class DynamicsPoint(NamedTuple):
    """Induction measurements of one snapshot on repeated random tokens."""

    step: int
    #: best score of any head in each layer
    max_induction: list[float]
    max_previous_token: list[float]
    loss_first: float
    loss_repeat: float


def snapshot_point(step: int, model, seq_len: int, batch: int = 16) -> DynamicsPoint:
    """Return one snapshot's per-layer best induction / previous-token scores and per-copy losses."""
    seq = repeated_random_tokens(default_spec(model, seq_len=seq_len, batch=batch, seed=1), model.cfg.d_vocab)
    scores = score_heads(model, seq.tokens.to(model.W_E.device))
    losses = repeat_losses(scores.loss, seq)
    return DynamicsPoint(step, scores.induction.max(-1).values.tolist(), scores.previous_token.max(-1).values.tolist(),
                         losses.first, losses.second)


# ------------------------------------------------------------------------------ tuned lenses, SAEs


def tuned_lenses(cfg) -> list[Path]:
    """Return the tuned lenses under the runs directory that fit a model's shape (its own name first)."""
    found = []
    for path in sorted(paths.runs_dir().glob(f"**/{LENS_CONFIG_FILE}")):
        try:
            meta = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if (meta.get("n_layers"), meta.get("d_model")) == (cfg.n_layers, cfg.d_model):
            found.append((meta.get("model_name") != cfg.name, path.parent))
    return [p for _, p in sorted(found)]


class SAEInfo(NamedTuple):
    """An SAE or transcoder found on disk for a model."""

    path: Path
    hook: str
    """The hook it reads (a transcoder: the MLP's input, ``blocks.L.mlp.hook_in``)."""
    d_in: int
    d_sae: int
    architecture: str
    model_name: str
    #: the activation store it was trained on (None when unknown or gone)
    store: Path | None
    #: the hook a transcoder's decoder writes to (``hook_name_out`` in its metadata); None for an SAE
    out_hook: str | None = None
    #: the transcoder set it belongs to, as shown ("kjv-small (shipped)"); None outside a set
    set_name: str | None = None

    @property
    def is_transcoder(self) -> bool:
        return self.out_hook is not None

    @property
    def steer_hook(self) -> str:
        """Where steering adds a latent's decoder direction: what the latent writes to. An SAE writes back
        where it reads; a transcoder writes the MLP's output (``blocks.L.hook_mlp_out``), not its input."""
        if self.out_hook is None:
            return self.hook
        layer = layer_of(self.out_hook)
        return act_name("mlp_out", layer) if layer is not None else self.out_hook

    @property
    def label(self) -> str:
        if self.set_name is not None:
            return (f"transcoder · {self.set_name} · layer {layer_of(self.hook)} · {self.architecture} · "
                    f"{self.d_sae} latents")
        try:
            where = self.path.relative_to(paths.runs_dir()).as_posix()
        except ValueError:
            where = str(self.path)
        kind = " · transcoder" if self.is_transcoder else ""
        return f"{where}{kind} · {self.hook} · {self.architecture} · {self.d_sae} latents"


def _sae_info(d: Path, model_name: str, d_model: int, set_name: str | None = None) -> SAEInfo | None:
    """Return the SAEInfo of an SAE directory made for this model with a residual-width input, else None."""
    if not (d / WEIGHTS_FILE).is_file():
        return None
    try:
        cfg = json.loads((d / CFG_FILE).read_text())
    except (OSError, json.JSONDecodeError):
        return None
    meta = cfg.get("metadata") or {}
    if meta.get("model_name") != model_name or cfg.get("d_in") != d_model or not meta.get("hook_name"):
        return None
    store = meta.get("activation_store")
    store_path = Path(store) if store and (Path(store) / "manifest.json").is_file() else None
    out_hook = meta.get("hook_name_out") or cfg.get("hook_name_out")
    return SAEInfo(d, meta["hook_name"], int(cfg["d_in"]), int(cfg["d_sae"]), str(cfg.get("architecture")),
                   model_name, store_path, out_hook or None, set_name if out_hook else None)


def transcoder_sets(model_name: str) -> list[tuple[str, Path]]:
    """Return ``(shown name, directory)`` of the transcoder sets for a model: the shipped one
    (``data/transcoders/MODEL``), then the one trained under the home (:func:`transcoders_home`)."""
    sets = [(f"{model_name} (shipped)", SHIPPED_TRANSCODERS / model_name),
            (f"{model_name} (trained here)", transcoders_home(model_name))]
    return [(name, d) for name, d in sets if d.is_dir()]


def find_saes(model_name: str, d_model: int) -> list[SAEInfo]:
    """Return the SAEs and transcoders made for ``model_name`` (by their metadata) with a residual-width input:
    those under the runs directory newest first, then each layer of the model's transcoder sets
    (:func:`transcoder_sets`). A transcoder is recognised by the ``hook_name_out`` of its metadata."""
    found = []
    for cfg_path in paths.runs_dir().glob(f"**/{CFG_FILE}"):
        info = _sae_info(cfg_path.parent, model_name, d_model)
        if info is not None:
            found.append((cfg_path.stat().st_mtime, info))
    out = [info for _, info in sorted(found, key=lambda t: -t[0])]
    seen = {info.path.resolve() for info in out}
    for set_name, directory in transcoder_sets(model_name):
        layers = sorted(directory.glob("layer_*/transcoder"), key=lambda p: int(p.parent.name.split("_")[1]))
        for d in layers:
            info = _sae_info(d, model_name, d_model, set_name)
            if info is not None and info.is_transcoder and d.resolve() not in seen:
                seen.add(d.resolve())
                out.append(info)
    return out


# ------------------------------------------------------------------------ features read live (no store)


#: a transcoder without an activation store is read on this many tokens of the model's own corpus, in windows of
#: LIVE_CTX (kjv-small: about a second on a CPU)
LIVE_TOKENS, LIVE_CTX = 8192, 64


class LiveFeatures(NamedTuple):
    """Every latent of a transcoder read on token windows of the model's corpus, computed on the fly (no
    activation store). Field names follow :class:`workbench.sae.features.FeatureStats` so one card shows either."""

    windows: Int[Tensor, "n_windows pos"]
    #: each latent's strongest activations and where they are (window, position)
    top: TopActivations
    n_rows: int
    """Tokens read."""
    density: Float[Tensor, " d_sae"]
    mean_active: Float[Tensor, " d_sae"]
    max_act: Float[Tensor, " d_sae"]
    hist_edges: Float[Tensor, " bins_plus_one"]
    hist_counts: Int[Tensor, "d_sae bins"]
    #: logit effects of what each latent writes (``W_dec @ W_U`` at the output side, the final norm's gain folded in);
    #: None when its output hook has no linear path to the logits
    logit_top_ids: Int[Tensor, "d_sae n_logits"] | None
    logit_top_values: Float[Tensor, "d_sae n_logits"] | None
    logit_bottom_ids: Int[Tensor, "d_sae n_logits"] | None
    logit_bottom_values: Float[Tensor, "d_sae n_logits"] | None
    neighbour_ids: Int[Tensor, "d_sae n_neighbours"] | None
    neighbour_cos: Float[Tensor, "d_sae n_neighbours"] | None

    @property
    def dead_fraction(self) -> float:
        return float((self.density == 0).float().mean())


def _check_transcoder(model, sae: SAE, hook: str) -> int:
    """Return the layer of the transcoder reading ``hook``; refuse an SAE or a hook that is not an MLP's input."""
    layer = layer_of(hook)
    if not sae.cfg.is_transcoder or layer is None or hook != f"blocks.{layer}.mlp.hook_in":
        raise InputError(f"features are read live only for transcoders (reading blocks.L.mlp.hook_in), not for "
                         f"{hook!r}; an SAE needs its activation store")
    if not 0 <= layer < model.cfg.n_layers:
        raise InputError(f"{hook!r} names layer {layer}; the model has layers 0..{model.cfg.n_layers - 1}")
    return layer


@torch.no_grad()
def _latents(model, sae: SAE, layer: int, hook: str, tokens: Tensor) -> Float[Tensor, "batch pos d_sae"]:
    """Return the transcoder's latents on every position of ``tokens`` (the model run up to its layer)."""
    _, cache = model.run_with_cache(tokens.to(model.embed.W_E.device), names_filter=[hook], stop_at_layer=layer + 1)
    return sae.encode(cache[hook].to(sae.W_enc)).float().cpu()


@torch.no_grad()
def live_features(model, sae: SAE, hook: str, windows: Int[Tensor, "n_windows pos"], n_top: int = 8,
                  cfg: FeatureStatsConfig | None = None, batch_windows: int = 16) -> LiveFeatures:
    """Return every latent's density, activation histogram (``cfg``'s log-spaced bins; default
    :class:`FeatureStatsConfig`), top activations (:func:`workbench.analysis.graph.top_activations`) and logit
    effects (:func:`workbench.sae.features.residual_directions`, which follows a transcoder to its output hook) on
    ``windows``, read through the model on the fly."""
    layer = _check_transcoder(model, sae, hook)
    cfg = cfg or FeatureStatsConfig()
    windows = model.check_tokens(windows).cpu()
    top = top_activations(model, sae, layer, windows.to(model.embed.W_E.device), k=n_top, batch_size=batch_windows)
    d_sae = sae.cfg.d_sae
    fires = torch.zeros(d_sae, dtype=torch.float64)
    act_sum = torch.zeros(d_sae, dtype=torch.float64)
    max_act = torch.zeros(d_sae)
    edges = torch.logspace(cfg.hist_log10_min, cfg.hist_log10_max, cfg.hist_bins + 1)
    inner_log_edges = torch.linspace(cfg.hist_log10_min, cfg.hist_log10_max, cfg.hist_bins + 1)[1:-1]
    hist = torch.zeros(d_sae * cfg.hist_bins, dtype=torch.long)
    for chunk in windows.split(batch_windows):
        lat = _latents(model, sae, layer, hook, chunk).flatten(0, 1)
        active = lat > 0
        fires += active.sum(0).double()
        act_sum += lat.clamp_min(0).sum(0).double()
        max_act = torch.maximum(max_act, lat.max(0).values)
        nz = active.nonzero()
        bins = torch.bucketize(lat[nz[:, 0], nz[:, 1]].log10(), inner_log_edges)
        hist.index_add_(0, nz[:, 1] * cfg.hist_bins + bins, torch.ones_like(bins))
    logits: tuple = (None, None, None, None)
    directions = residual_directions(model, sae, hook)
    if directions is not None and cfg.n_logits > 0:
        logits = tuple(t.cpu() for t in logit_effects(model, directions.to(model.unembed.W_U.device),
                                                      min(cfg.n_logits, model.cfg.d_vocab)))
    nb_ids, nb_cos = decoder_neighbours(sae, cfg.n_neighbours) if cfg.n_neighbours > 0 and d_sae > 1 else (None, None)
    n = windows.numel()
    return LiveFeatures(windows, top, n, (fires / n).float(), (act_sum / fires.clamp_min(1)).float(),
                        max_act.clamp_min(0), edges, hist.view(d_sae, cfg.hist_bins), *logits,
                        None if nb_ids is None else nb_ids.cpu(), None if nb_cos is None else nb_cos.cpu())


@torch.no_grad()
def live_contexts(model, sae: SAE, hook: str, live: LiveFeatures, feature: int, n: int = 8, before: int = 12,
                  after: int = 4) -> list[FeatureContext]:
    """Return a latent's strongest examples in ``live`` with its activation on the tokens around each (the windows
    holding them run through the model again). ``row`` is the example's index in the flattened windows."""
    layer = _check_transcoder(model, sae, hook)
    if not 0 <= feature < sae.cfg.d_sae:
        raise InputError(f"feature {feature} does not exist; the transcoder has {sae.cfg.d_sae} latents")
    fired = live.top.values[feature] > 0
    wins, poss = live.top.window[feature][fired][:n].tolist(), live.top.pos[feature][fired][:n].tolist()
    if not wins:
        return []
    need = sorted(set(wins))
    acts = _latents(model, sae, layer, hook, live.windows[need])[..., feature]
    n_ctx = live.windows.shape[1]
    out = []
    for w, p in zip(wins, poss):
        lo, hi = max(0, p - before), min(n_ctx, p + after + 1)
        per_token = acts[need.index(w), lo:hi].tolist()
        out.append(FeatureContext(w * n_ctx + p, w, p, per_token[p - lo], live.windows[w, lo:hi].tolist(),
                                  list(range(lo, hi)), per_token, p - lo))
    return out


class LatentLabels(NamedTuple):
    """Text for each latent's row in the latent finder."""

    #: the token of each latent's strongest activation ("" for a latent that never fired)
    fires_on: list[str]
    #: the three tokens each latent raises most (empty when there are no logit effects)
    raises: list[list[str]]


def live_latent_labels(model, live: LiveFeatures) -> LatentLabels:
    """Return the token each latent of ``live`` fires on most and the three tokens it raises most."""
    tokens = live.windows[live.top.window[:, 0], live.top.pos[:, 0]].tolist()
    fired = (live.top.values[:, 0] > 0).tolist()
    fires_on = [token_label(model, t) if f else "" for t, f in zip(tokens, fired)]
    if live.logit_top_ids is None:
        return LatentLabels(fires_on, [[] for _ in fires_on])
    raises = [[token_label(model, int(i)) for i in row[:3]] for row in live.logit_top_ids.tolist()]
    return LatentLabels(fires_on, raises)


def quick_sae_corpus(model_name: str) -> str:
    """Return the corpus a quick SAE caches for a model: the one a built-in model was trained on (``kjv``
    for kjv-small), else Python's docs (``pydocs``)."""
    recipe = RECIPES.get(model_name)
    return recipe.corpus.corpus if recipe is not None and recipe.corpus is not None else "pydocs"


def sae_windows(model, n_tokens: int, n_ctx: int, corpus: str = "pydocs") -> Tensor:
    """Return token windows to cache for a quick SAE: corpus text in the model's tokenizer, or
    repeated random tokens for a model without one."""
    n_ctx = min(n_ctx, model.cfg.n_ctx)
    n_windows = max(2, -(-n_tokens // n_ctx))
    if model.tokenizer is None:
        half = (n_ctx - 1) // 2
        spec = RepeatedTokensSpec(seq_len=half, batch=n_windows, seed=0, low=1, bos_token_id=0)
        return repeated_random_tokens(spec, model.cfg.d_vocab).tokens
    return token_windows(model, corpus, n_ctx, n_windows)


# ------------------------------------------------------------------------------ background work


_THREADS_LOCK = threading.Lock()
_THREADS_USERS = 0
_THREADS_BEFORE = 0


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """Run torch on one intra-op thread inside the block (tiny models: thread hand-offs cost more than the
    work). The setting is process-wide, so concurrent users count in and out and the last one restores it."""
    global _THREADS_USERS, _THREADS_BEFORE
    with _THREADS_LOCK:
        if _THREADS_USERS == 0:
            _THREADS_BEFORE = torch.get_num_threads()
            torch.set_num_threads(1)
        _THREADS_USERS += 1
    try:
        yield
    finally:
        with _THREADS_LOCK:
            _THREADS_USERS -= 1
            if _THREADS_USERS == 0:
                torch.set_num_threads(_THREADS_BEFORE)


def patch_cost(model, n_tokens: int, kind: str) -> tuple[int, float]:
    """Return ``(patched runs, estimated FLOPs)`` of one patching sweep: each patched run goes from its
    layer to the end (half the blocks on average) over ``n_tokens`` tokens, ~2 FLOPs per weight per token."""
    cfg = model.cfg
    runs = cfg.n_layers * (cfg.n_heads if kind == "z" else n_tokens)
    block_params = sum(p.numel() for p in model.blocks.parameters())
    return runs, 2.0 * block_params * n_tokens * runs / 2


def patching_sweep(model, clean: Tensor, corrupt: Tensor, answer: int, wrong: int | None, kind: str,
                   report: Callable[[float, str], None] = lambda done, what: None):
    """Return the clean -> corrupted patching sweep of one kind (``resid_pre``, ``attn_out``, ``mlp_out``, ``z``),
    reporting progress as it goes: an observing hook on the last block's output counts the passes (two
    caching runs, then one batched run per layer), and ``report`` may raise to stop the sweep there."""
    n = model.cfg.n_layers
    total = n + 2
    passes = [0]

    def tick(x: Tensor, hook) -> None:
        passes[0] += 1
        layer = passes[0] - 2
        stage = "caching the clean and corrupted runs" if layer < 1 else f"patched layer {layer - 1} of {n}"
        report(passes[0] / total, stage)

    tick.observe_only = True  # type: ignore[attr-defined]  # reads nothing: the fused kernels stay on
    metric = P.LogitDiff(answer, wrong)
    with torch.inference_mode(), model.hooks([(f"blocks.{n - 1}.hook_resid_post", tick)]):
        if kind == "resid_pre":
            return P.patch_residual(model, clean, corrupt, metric)
        if kind == "z":
            return P.patch_heads(model, clean, corrupt, metric)
        return P.patch_outputs(model, clean, corrupt, metric, kind=kind)


def steering_hook(direction: Float[Tensor, " d_model"], scale: float):
    """Return a hook that adds ``scale * direction`` to an activation at every position."""
    def add(act: Tensor, hook) -> Tensor:
        return act + scale * direction.to(act)
    return add


class ActiveFeatures(NamedTuple):
    """The SAE latents active on each token of a prompt."""

    #: ``[pos d_sae]`` latent activations
    latents: Float[Tensor, "pos d_sae"]
    #: one row per token: position, token, and its strongest latents as "id (activation)"
    table: pd.DataFrame


def active_features(latents: Float[Tensor, "pos d_sae"], str_tokens: list[str], top: int = 8) -> ActiveFeatures:
    """Return, per token, the ``top`` latents that fire most strongly on it."""
    rows = []
    for p, s in enumerate(str_tokens):
        row = latents[p]
        n_active = int((row > 0).sum())
        best = row.topk(min(top, row.shape[0]))
        listed = [f"{int(i)} ({float(v):.2f})" for v, i in zip(best.values, best.indices) if v > 0]
        rows.append({"pos": p, "token": s, "active": n_active, "strongest latents": ", ".join(listed)})
    return ActiveFeatures(latents, pd.DataFrame(rows))


class QuickSAE(NamedTuple):
    """Where a quick SAE run put its pieces."""

    sae_dir: Path
    store_dir: Path
    #: the trainer's last metrics line (mse, l0, ...)
    metrics: dict


def train_quick_sae(model, model_name: str, layer: int, n_tokens: int, d_sae: int, k: int, steps: int,
                    on_progress: Callable[[str, float], None] = lambda what, done: None,
                    writing: Callable[..., ContextManager] | None = None, dead_tokens: int | None = None) -> QuickSAE:
    """Cache ``n_tokens`` of ``blocks.{layer}.hook_resid_post`` into a store, train a TopK SAE on it and
    save it in SAELens' layout under the runs directory; ``on_progress(stage, fraction)`` reports as it goes
    (and may raise to stop the run; the store stays resumable). ``writing(store_dir, run_dir)``, when
    given, is held around everything that writes those directories (the app passes its per-directory
    locks, so two jobs on one store take turns instead of breaking it). ``dead_tokens``: how long a latent may go
    without firing before AuxK trains it back (default :func:`quick_dead_tokens`)."""
    if not 0 <= layer < model.cfg.n_layers:
        raise InputError(f"layer {layer} is outside [0, {model.cfg.n_layers})")
    hook = act_name("resid_post", layer)
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name).strip("-") or "model"
    n_ctx = min(64, model.cfg.n_ctx)
    corpus = quick_sae_corpus(model_name)
    windows = sae_windows(model, n_tokens, n_ctx, corpus)
    # every window's first position stays out of the SAE, BOS or not: models park attention there and its residual
    # dwarfs the rest (SmolLM2 layer 15: mean norm 23,665 against 181), so it would dominate the MSE and leave most
    # latents dead (88.6% of 4096 with it, see benchmarks/bench_quick_sae.py)
    first = 1
    batch_windows = 8
    tag = "" if corpus == "pydocs" or model.tokenizer is None else f"-{corpus}"  # pydocs stores keep their names
    if model.tokenizer is not None and not model.tokenizer.add_bos:
        tag += "-from1"  # such stores used to keep position 0: a new name, not a mismatched old store
    store_dir = paths.stores_dir() / f"app-{safe}{tag}-{hook}-{windows.shape[0]}x{windows.shape[1]}"
    n_batches = -(-windows.shape[0] // batch_windows)
    rows_per_batch = batch_windows * (windows.shape[1] - first)
    shard_batches = max(1, n_batches // 10)  # about ten shards: ten progress updates

    def shard_done(index: int) -> None:
        on_progress("caching activations", min(1.0, (index + 1) * shard_batches / n_batches))

    cfg = StoreConfig(hooks=(hook,), batch_windows=batch_windows, shard_tokens=shard_batches * rows_per_batch,
                      first_position=first)
    run_dir = paths.runs_dir() / f"sae-app-{safe}-L{layer}-{d_sae}x{k}"
    with writing(store_dir, run_dir) if writing is not None else nullcontext():
        on_progress("caching activations", 0.0)
        store = cache_windows(model, windows, store_dir, cfg, model_name=model_name, on_shard=shard_done).store
        batch_size = min(QUICK_BATCH, store.n_rows)
        train_cfg = SAETrainConfig(total_steps=steps, lr=1e-3, checkpoint_every=0, log_every=10, progress=False,
                                   dead_tokens=quick_dead_tokens(store.n_rows) if dead_tokens is None else dead_tokens)
        run = train_sae_on_store(
            store, hook, SAERecipe(architecture="topk", d_sae=d_sae, k=min(k, d_sae)), train_cfg, run_dir,
            reader=ReaderConfig(batch_size=batch_size, block_rows=min(1024, batch_size), seed=0),
            dataset=corpus if model.tokenizer is not None else "repeated random tokens",
            device=model.W_E.device, resume=False,
            on_step=lambda step: on_progress("training the SAE", min(1.0, step / steps)),
        )
    on_progress("done", 1.0)
    return QuickSAE(run.sae_dir, store_dir, run.train.last_metrics)


#: a quick SAE's training batch (rows of the store)
QUICK_BATCH = 512


def quick_dead_tokens(n_rows: int) -> int:
    """Return how many tokens a quick SAE's latent may go without firing before it counts as dead: a quarter of the
    store (at least 4 batches). The trainer's default (10M tokens, Gao et al.'s scale) is never reached by a few
    hundred steps on a small store, so AuxK would never revive a latent; on SmolLM2 that left most latents dead
    (see ``python -m benchmarks.bench_quick_sae``)."""
    return max(4 * QUICK_BATCH, n_rows // 4)


# ------------------------------------------------------------------------------ tuned lens


#: the app's tuned lens: windows of 64 tokens, steps, and the vocabulary its training KL keeps for big vocabularies
#: (the CLI's `tuned-lens train` defaults are 256 windows and 300 steps, the exact KL)
APP_LENS_WINDOWS, APP_LENS_STEPS, APP_LENS_VOCAB = 128, 150, 4096


def train_app_tuned_lens(model, model_name: str, on_progress: Callable[[str, float], None] = lambda what, done: None,
                         writing: Callable[..., ContextManager] | None = None, steps: int | None = None) -> Path:
    """Train a tuned lens on the model's own corpus (as the quick SAE reads it) and save it under the runs
    directory as ``lens-app-MODEL``, where the logit-lens page finds it; return its directory.
    ``on_progress(stage, fraction)`` reports each step (and may raise to stop the run)."""

    steps = steps or APP_LENS_STEPS
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "-", model_name).strip("-") or "model"
    out = paths.runs_dir() / f"lens-app-{safe}"
    n_ctx = min(64, model.cfg.n_ctx)
    on_progress("reading the corpus", 0.0)
    windows = sae_windows(model, APP_LENS_WINDOWS * n_ctx, n_ctx, quick_sae_corpus(model_name))
    cfg = TunedLensConfig(steps=steps, eval_every=max(1, steps // 3),
                          vocab=APP_LENS_VOCAB if model.cfg.d_vocab > 2 * APP_LENS_VOCAB else None)
    with writing(out) if writing is not None else nullcontext():
        result = train_tuned_lens(model, windows.to(model.W_E.device), cfg,
                                  on_step=lambda done: on_progress("training the tuned lens", done / steps))
        result.lens.save(out)
    on_progress("done", 1.0)
    return out


# ------------------------------------------------------------------------------ superposition


def importance_profile(n_features: int, decay: float) -> Tensor:
    """Return feature importances ``decay ** i`` (Elhage et al.'s geometric fall-off)."""
    return decay ** torch.arange(n_features, dtype=torch.float32)
