"""Ragged batches: prompts of different lengths padded to one length, and where their real tokens are.

    batch = model.to_batch(["The capital of France is", "Hello"])      # left-padded by default
    logits = model(batch)                                               # or model(tokens, attention_mask=mask)
    last = gather_last(logits, batch.attention_mask)                    # each row's last real token

Conventions (those of HF transformers): ``attention_mask`` is True (or 1) at real tokens and False
at padding. The model never attends to a padded key, and counts positions from each row's first
real token, so a padded row gives the same activations at its real positions as the prompt run
alone. What the model computes *at* padded positions is meaningless but finite (a padded query
attends to itself only); :func:`masked_mean` and :func:`gather_last` keep it out of results.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from workbench.errors import InputError

PaddingSide = Literal["left", "right"]


class Batch(NamedTuple):
    """Token ids padded to one length, and which of them are real. Model calls take it for ``tokens``."""

    #: token ids; padded positions hold the tokenizer's pad token
    tokens: Int[Tensor, "batch pos"]
    #: True at real tokens, False at padding
    attention_mask: Bool[Tensor, "batch pos"]

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        """Number of real tokens in each row."""
        return self.attention_mask.sum(-1)


def pad(ids: list[list[int]], pad_id: int, padding_side: PaddingSide = "left", device=None) -> Batch:
    """Return ``ids`` (one list of token ids per prompt) padded with ``pad_id`` to the longest one."""
    if padding_side not in ("left", "right"):
        raise InputError(f"padding_side={padding_side!r}: choose 'left' or 'right'")
    if not ids:
        raise InputError("no prompts to pad; give at least one")
    empty = [i for i, row in enumerate(ids) if len(row) == 0]
    if empty:
        raise InputError(f"prompt {empty[0]} is empty; give at least one token of text per prompt")
    width = max(len(row) for row in ids)
    tokens = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for i, row in enumerate(ids):
        span = slice(width - len(row), width) if padding_side == "left" else slice(0, len(row))
        tokens[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = True
    return Batch(tokens.to(device), mask.to(device))


def unpack(tokens: Tensor | Batch, attention_mask: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Return ``(tokens, attention_mask)`` from either a :class:`Batch` or the two given apart."""
    if isinstance(tokens, Batch):
        if attention_mask is not None:
            raise InputError("got a Batch and an attention_mask; the Batch carries its own mask, pass one or the other")
        return tokens.tokens, tokens.attention_mask
    return tokens, attention_mask


def check_attention_mask(
    attention_mask: Tensor | None, tokens: Int[Tensor, "batch pos"]
) -> Bool[Tensor, "batch pos"] | None:
    """Return the mask as booleans shaped like ``tokens``, or None when there is no padding at all
    (so an unpadded batch takes the mask-free path, as fast as before masks existed)."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor):
        raise InputError(f"attention_mask must be a tensor, got {type(attention_mask).__name__}")
    if attention_mask.ndim == 1 and tokens.shape[0] == 1:
        attention_mask = attention_mask[None]
    if tuple(attention_mask.shape) != tuple(tokens.shape):
        raise InputError(
            f"attention_mask has shape {tuple(attention_mask.shape)} but the tokens have {tuple(tokens.shape)}; "
            "give one entry per token (True/1 at real tokens, False/0 at padding), e.g. from model.to_batch(texts)"
        )
    if attention_mask.dtype is not torch.bool:
        if attention_mask.is_floating_point() or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise InputError("attention_mask must hold booleans or 0/1 integers (1 at real tokens, 0 at padding)")
        attention_mask = attention_mask.bool()
    attention_mask = attention_mask.to(tokens.device)
    return None if bool(attention_mask.all()) else attention_mask


def check_rows_have_tokens(key_mask: Bool[Tensor, "batch key"]) -> None:
    """Refuse a row with no real token: nothing to attend to, and no position to count from."""
    empty = (~key_mask.any(-1)).nonzero().flatten()
    if len(empty):
        raise InputError(
            f"row {int(empty[0])} of the batch is all padding (attention_mask all False); drop it or give it a token"
        )


def position_ids(key_mask: Bool[Tensor, "batch key"], n_pos: int) -> Int[Tensor, "batch pos"]:
    """Return the position of each of the last ``n_pos`` keys, counted from its row's first real token.

    Padded positions get the position of the real token before them (0 before any): a valid table
    index whose value never reaches a real token."""
    return (key_mask.cumsum(-1)[:, -n_pos:] - 1).clamp_(min=0)


def attention_mask_4d(key_mask: Bool[Tensor, "batch key"], n_pos: int) -> Bool[Tensor, "batch 1 pos key"]:
    """Return which keys each of the last ``n_pos`` queries may attend to: causal, real keys only.

    A query always sees itself, so a padded query (which has no real key before it under left
    padding) gets a finite pattern instead of a softmax over nothing (NaN); real queries are
    unaffected, their own key being real."""
    n_keys = key_mask.shape[-1]
    query_at = torch.arange(n_keys - n_pos, n_keys, device=key_mask.device)[:, None]
    key_at = torch.arange(n_keys, device=key_mask.device)
    causal = key_at <= query_at  # [pos key]
    return (causal & key_mask[:, None, None, :]) | (key_at == query_at)


def attention_bias(
    key_mask: Bool[Tensor, "batch key"], n_pos: int, dtype: torch.dtype
) -> Float[Tensor, "batch 1 pos key"]:
    """Return :func:`attention_mask_4d` as the attention layers add it to their scores: 0 where a
    query may attend, -inf where not (built once per forward pass, shared by every layer)."""
    allowed = attention_mask_4d(key_mask, n_pos)
    return torch.zeros(allowed.shape, dtype=dtype, device=key_mask.device).masked_fill_(~allowed, float("-inf"))


# -- where the real tokens are: for analyses ----------------------------------------------------------


def last_positions(attention_mask: Bool[Tensor, "batch pos"]) -> Int[Tensor, " batch"]:
    """Return the index of each row's last real token."""
    at = torch.arange(attention_mask.shape[-1], device=attention_mask.device)
    return torch.where(attention_mask.bool(), at, -1).amax(-1)


def left_aligned(batch: Batch) -> Batch:
    """Return ``batch`` re-padded on the left, so that column ``-k`` is every row's k-th real token
    from its end (a left-padded batch comes back unchanged)."""
    mask = batch.attention_mask.bool()
    if bool((mask[:, 1:] >= mask[:, :-1]).all()):
        return batch
    rows = [row[keep].tolist() for row, keep in zip(batch.tokens, mask)]
    pad_id = int(batch.tokens[~mask][0])
    return pad(rows, pad_id, "left", device=batch.tokens.device)


def gather_last(
    x: Float[Tensor, "batch pos ..."], attention_mask: Bool[Tensor, "batch pos"] | None
) -> Float[Tensor, "batch ..."]:
    """Return ``x`` at each row's last real token (``x[:, -1]`` when there is no mask)."""
    if attention_mask is None:
        return x[:, -1]
    idx = last_positions(attention_mask).to(x.device)
    return x[torch.arange(x.shape[0], device=x.device), idx]


def masked_mean(
    x: Float[Tensor, "batch pos ..."], attention_mask: Bool[Tensor, "batch pos"] | None, dims: tuple[int, ...] = (0, 1)
) -> Tensor:
    """Return the mean of ``x`` over real tokens only, along ``dims`` (a subset of the batch and pos axes)."""
    if attention_mask is None:
        return x.mean(dim=dims)
    real = attention_mask.to(x.device).bool().reshape(*attention_mask.shape, *([1] * (x.ndim - 2))).expand_as(x)
    # where, not a product: a padded position may hold -inf (attention scores) and -inf * 0 is NaN
    return torch.where(real, x, 0).sum(dim=dims) / real.sum(dim=dims)
