"""Direct logit attribution: how much each layer, head and MLP writes directly into an answer's logit.

The residual stream at the last layer is a sum of pieces (embeddings, every attention and MLP
output). The final norm divides the whole stream by one cached scale, so through it each piece
adds its own share to a logit; the norm's bias and ``b_U`` are a constant no piece owns. The shares
plus that constant are the model's logit exactly (see :mod:`workbench.cache`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench import padding
from workbench.analysis.patching import LogitDiff
from workbench.errors import InputError
from workbench.names import act_name
from workbench.padding import Batch

if TYPE_CHECKING:
    import pandas as pd

    from workbench.model import HookedGPT

Granularity = Literal["layer", "head"]
TokenLike = int | str | Tensor


class LogitAttribution(NamedTuple):
    """Each component's direct contribution to a logit (or logit difference) at one position."""

    #: component labels: ``embed``, ``pos_embed``, ``{l}_attn_out``, ``{l}_mlp_out`` (layer granularity)
    #: or ``L{l}H{h}``, ``{l}_attn_bias``, ``{l}_mlp_out`` (head granularity)
    labels: list[str]
    attrs: Float[Tensor, "component batch"]
    #: what no component owns: the final norm's bias through W_U, plus b_U
    constant: Float[Tensor, " batch"]
    #: the model's own logit (difference), which ``attrs.sum(0) + constant`` equals
    logit: Float[Tensor, " batch"]
    #: the answer and (for a difference) the wrong token, per batch row
    answer: Int[Tensor, " batch"]
    wrong: Int[Tensor, " batch"] | None

    def frame(self, batch_index: int = 0) -> pd.DataFrame:
        """Return one row per component: label, layer, kind, head and attribution."""
        import pandas as pd  # ~0.5 s to import (python -X importtime); only this table needs it

        rows = []
        for label, value in zip(self.labels, self.attrs[:, batch_index].tolist()):
            layer, kind, head = _parse_label(label)
            rows.append({"component": label, "layer": layer, "kind": kind, "head": head, "attribution": value})
        return pd.DataFrame(rows)


def _parse_label(label: str) -> tuple[int | None, str, int | None]:
    if label in ("embed", "pos_embed"):
        return None, label, None
    if label.startswith("L") and "H" in label:
        layer, head = label[1:].split("H")
        return int(layer), "head", int(head)
    layer, kind = label.split("_", 1)
    return int(layer), {"attn_out": "attn", "mlp_out": "mlp", "attn_bias": "attn_bias"}[kind], None


def token_id(model: HookedGPT, token: int | str) -> int:
    """Return the id of one token given as an id or as text that must tokenize to exactly one token."""
    if isinstance(token, int):
        if not 0 <= token < model.cfg.d_vocab:
            raise InputError(f"token id {token} is outside the vocabulary [0, {model.cfg.d_vocab})")
        return token
    if not token:
        raise InputError("the answer is empty; give it as text that is one token (e.g. ' Paris') or as a token id")
    ids = model.to_tokens(token, prepend_bos=False)[0].tolist()
    if len(ids) != 1:
        pieces = model.to_str_tokens(ids)
        raise InputError(f"answer {token!r} is {len(ids)} tokens {pieces}, not one; pick an answer that is a single "
                         "token (often with a leading space, e.g. ' Paris')")
    return ids[0]


def _per_row(model: HookedGPT, token: TokenLike, batch: int) -> Int[Tensor, " batch"]:
    if isinstance(token, Tensor):
        t = token.reshape(-1).long()
        if t.numel() == 1:
            t = t.expand(batch)
        if t.numel() != batch:
            raise InputError(f"got {t.numel()} answer ids for {batch} prompts; give one, or one per prompt")
        return t
    return torch.full((batch,), token_id(model, token), dtype=torch.long)


@torch.no_grad()
def direct_logit_attribution(
    model: HookedGPT,
    tokens: Int[Tensor, "batch pos"] | Batch,
    answer: TokenLike,
    wrong: TokenLike | None = None,
    pos: int = -1,
    granularity: Granularity = "layer",
) -> LogitAttribution:
    """Return each component's direct contribution to ``answer``'s logit (minus ``wrong``'s) at ``pos``.

    ``granularity="head"`` splits each attention layer into its heads plus the layer's output bias.
    A padded :class:`~workbench.padding.Batch` is scored at ``pos`` counted from each row's last real
    token (``pos`` must then be negative), each row as its prompt alone.
    """
    if isinstance(tokens, Batch):
        if pos >= 0:
            raise InputError(f"pos={pos} in a padded batch names a column, not a token of every prompt; "
                             "give pos < 0, counted from each prompt's last token (-1: the last)")
        tokens = padding.left_aligned(tokens)  # column pos is then each row's own token
        batch = tokens.tokens.shape[0]
    else:
        tokens = model.check_tokens(tokens)
        batch = tokens.shape[0]
    ans = _per_row(model, answer, batch)
    wr = None if wrong is None else _per_row(model, wrong, batch)
    cfg = model.cfg
    names = ["hook_embed", "hook_pos_embed", "ln_final.hook_scale"]
    names += [act_name(k, i) for i in range(cfg.n_layers) for k in ("attn_out", "mlp_out", "z")]
    logits, cache = model.run_with_cache(tokens, names_filter=lambda n: n in names)
    if granularity == "layer":
        stack = cache.decompose_resid()
        parts, labels = stack.tensor, stack.labels
    elif granularity == "head":
        pieces, labels = [], []
        emb = cache.decompose_resid(layer=0)
        pieces.append(emb.tensor)
        labels += emb.labels
        for i in range(cfg.n_layers):
            heads = cache.head_results(i).permute(2, 0, 1, 3)
            pieces.append(heads)
            labels += [f"L{i}H{h}" for h in range(cfg.n_heads)]
            b_O = model.blocks[i].attn.b_O
            if b_O is not None:
                pieces.append(b_O.detach().to(heads).expand_as(heads[:1]))
                labels.append(f"{i}_attn_bias")
            if not cfg.attn_only:
                pieces.append(cache[act_name("mlp_out", i)][None])
                labels.append(f"{i}_mlp_out")
        parts = torch.cat(pieces)
    else:
        raise InputError(f"granularity={granularity!r} is not one of 'layer', 'head'")
    attrs = cache.logit_attrs(parts, ans, wr, pos=pos)
    constant = cache.logit_constant(ans, wr)
    logit = LogitDiff(ans, wr)(logits[:, pos])
    return LogitAttribution(labels, attrs, constant.expand(batch).clone(), logit, ans, wr)


def head_attribution_grid(result: LogitAttribution, n_layers: int, n_heads: int, batch_index: int = 0) -> Tensor:
    """Return the head attributions of a head-granularity result as a ``[layer head]`` grid."""
    grid = torch.full((n_layers, n_heads), float("nan"))
    for label, value in zip(result.labels, result.attrs[:, batch_index].tolist()):
        layer, kind, head = _parse_label(label)
        if kind == "head":
            grid[layer, head] = value
    return grid
