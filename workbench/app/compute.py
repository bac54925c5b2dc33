"""Small pure computations behind the foundations and attention pages (no streamlit here).

These are the few analyses no library module covers yet (embedding neighbours and analogies,
head-type scores on one prompt, sampling filters); each is a plain function of tensors so it can
move into ``workbench/analysis/`` unchanged.
"""

from __future__ import annotations

from typing import NamedTuple

import pandas as pd
import torch
from jaxtyping import Float
from torch import Tensor

from workbench.errors import InputError


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
    from workbench.analysis.induction import masked_attention_score, score_masks

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


def nearest(unit: Float[Tensor, "d_vocab d_model"], direction: Float[Tensor, "d_model"], k: int,
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


def analogy(model, unit: Float[Tensor, "d_vocab d_model"], a: str, b: str, c: str, k: int = 10) -> tuple[Neighbours, list[str]]:
    """Return the tokens nearest ``E[b] - E[a] + E[c]`` ("a is to b as c is to ?") and the tokens used."""
    ids, labels = word_token_ids(model, [a, b, c])
    if len(ids) != 3:
        raise InputError("an analogy needs three words")
    W = unit
    direction = W[ids[1]] - W[ids[0]] + W[ids[2]]
    return nearest(W, direction, k, exclude=tuple(ids)), labels


def project_2d(vectors: Float[Tensor, "n d_model"], labels: list[str], method: str = "pca") -> pd.DataFrame:
    """Return 2-D coordinates of ``vectors`` by PCA or t-SNE (scikit-learn), with their labels."""
    from sklearn.decomposition import PCA
    from sklearn.manifold import TSNE

    X = vectors.detach().float().cpu().numpy()
    if X.shape[0] < 3:
        raise InputError(f"a projection needs at least 3 words, got {X.shape[0]}")
    if method == "pca":
        xy = PCA(n_components=2, random_state=0).fit_transform(X)
    elif method == "tsne":
        xy = TSNE(n_components=2, perplexity=min(30.0, (X.shape[0] - 1) / 3), init="pca", random_state=0).fit_transform(X)
    else:
        raise InputError(f"projection method {method!r} is not one of ('pca', 'tsne')")
    return pd.DataFrame({"x": xy[:, 0], "y": xy[:, 1], "token": labels})


# ------------------------------------------------------------------------------------ sampling


def sampling_probs(logits: Float[Tensor, "d_vocab"], temperature: float, top_k: int | None,
                   top_p: float | None) -> Float[Tensor, "d_vocab"]:
    """Return the next-token distribution after temperature, top-k and top-p (nucleus) filtering.

    Temperature 0 means greedy: all mass on the argmax.
    """
    logits = logits.float()
    if temperature <= 0:
        probs = torch.zeros_like(logits)
        probs[logits.argmax()] = 1.0
        return probs
    logits = logits / temperature
    if top_k is not None and 0 < top_k < logits.shape[-1]:
        kth = logits.topk(top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -float("inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_logits, order = logits.sort(descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        # keep the smallest prefix whose mass reaches top_p (the token that crosses it stays)
        drop = cum - sorted_logits.softmax(-1) >= top_p
        logits = logits.clone()
        logits[order[drop]] = -float("inf")
    return logits.softmax(-1)
