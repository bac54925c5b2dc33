"""Induction heads and head composition: what each head attends to, what it copies, what it reads.

- Attention scores (Olsson et al. 2022): previous-token, duplicate-token and induction
  (prefix-matching) scores, each the mean attention a query puts on the keys a mask marks,
  averaged over the queries that have such a key. Masks come from the tokens, so the same
  scores work on repeated random tokens and on any text.
- Copying score of each head's full OV circuit ``W_E W_V W_O W_U`` (Elhage et al. 2021): the sum
  of its eigenvalues over the sum of their magnitudes (+1 for a circuit that copies, -1 for one
  that suppresses). The nonzero eigenvalues of the ``d_vocab x d_vocab`` circuit are those of a
  ``d_head x d_head`` matrix, so this costs one ``d_model x d_model`` product for the whole model.
- Composition scores (Elhage et al. 2021) between every pair of heads in different layers, computed
  on the low-rank factors, and their causal version: remove an earlier head's (or layer's) output
  from a later layer's query, key or value input and measure how much each later head's score drops.
- In-context learning score: loss late in the context minus loss early.

Every function scores all heads in batched passes: hooks on the attention patterns reduce them to
scores as the forward pass produces them, so one pass scores every head of every layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

from workbench import padding
from workbench.errors import InputError
from workbench.model import HookedGPT, apply_rotary
from workbench.names import act_name
from workbench.padding import Batch

ScoreKind = Literal["previous_token", "duplicate_token", "induction"]
SCORE_KINDS: tuple[ScoreKind, ...] = ("previous_token", "duplicate_token", "induction")
CompositionKind = Literal["q", "k", "v"]


# --------------------------------------------------------------------------------------------- data


@dataclass(frozen=True)
class RepeatedTokensSpec:
    """Random token sequences shown twice: ``[BOS] r_1 .. r_L r_1 .. r_L``."""

    #: L, the length of the random part (each sequence has ``2 L`` tokens plus the BOS)
    seq_len: int = 20
    #: number of sequences
    batch: int = 8
    seed: int = 0
    #: random tokens are drawn uniformly from ``[low, high)``; ``high=None`` means the vocabulary size
    low: int = 1
    high: int | None = None
    #: put this id in front of every sequence (an attention sink); None for no BOS
    bos_token_id: int | None = None


class RepeatedTokens(NamedTuple):
    """A batch of twice-shown random sequences."""

    tokens: Int[Tensor, "batch pos"]
    #: L: ``tokens[:, t] == tokens[:, t - L]`` for every t in the second copy
    seq_len: int
    #: position of the first random token (1 with a BOS, else 0)
    start: int


def repeated_random_tokens(spec: RepeatedTokensSpec, d_vocab: int) -> RepeatedTokens:
    """Return ``spec.batch`` sequences of ``spec.seq_len`` random tokens, each shown twice."""
    high = d_vocab if spec.high is None else spec.high
    if not 0 <= spec.low < high <= d_vocab or high - spec.low < 2:
        raise InputError(f"token range [{spec.low}, {high}) does not fit the vocabulary [0, {d_vocab}); "
                         "give low < high <= d_vocab with at least two ids")
    if spec.seq_len < 2:
        raise InputError(f"seq_len={spec.seq_len} is too short to show induction; use at least 2")
    gen = torch.Generator().manual_seed(spec.seed)
    body = torch.randint(spec.low, high, (spec.batch, spec.seq_len), generator=gen)
    parts = [body, body]
    if spec.bos_token_id is not None:
        parts.insert(0, torch.full((spec.batch, 1), spec.bos_token_id, dtype=torch.long))
    return RepeatedTokens(torch.cat(parts, dim=1), spec.seq_len, int(spec.bos_token_id is not None))


def default_spec(model: HookedGPT, seq_len: int = 20, batch: int = 8, seed: int = 0) -> RepeatedTokensSpec:
    """Return a spec that suits ``model``: its tokenizer's BOS in front, special ids kept out of the draw."""
    tok = model.tokenizer
    bos = tok.bos_token_id if tok is not None and tok.add_bos else None
    d_vocab = model.cfg.d_vocab
    # Small vocabularies are synthetic (id 0 is BOS); big ones keep low ids, often special tokens, out.
    low = 1 if d_vocab <= 4096 else 1000
    high = min(d_vocab, 20000) if d_vocab > 4096 else d_vocab
    if tok is None and d_vocab <= 4096:
        bos = 0
    seq_len = min(seq_len, (model.cfg.n_ctx - 1) // 2)
    return RepeatedTokensSpec(seq_len=seq_len, batch=batch, seed=seed, low=low, high=high, bos_token_id=bos)


# -------------------------------------------------------------------------------------------- masks


def previous_token_mask(tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos pos"]:
    """Return ``mask[b, q, k] = (k == q - 1)``: where a previous-token head looks."""
    n = tokens.shape[1]
    eye = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril(-1).triu(-1)
    return eye.expand(tokens.shape[0], n, n)


def duplicate_token_mask(tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos pos"]:
    """Return ``mask[b, q, k] = (k < q and tokens[k] == tokens[q])``: earlier copies of the current token."""
    n = tokens.shape[1]
    earlier = torch.ones(n, n, dtype=torch.bool, device=tokens.device).tril(-1)
    return (tokens[:, :, None] == tokens[:, None, :]) & earlier


def induction_mask(tokens: Int[Tensor, "batch pos"]) -> Bool[Tensor, "batch pos pos"]:
    """Return ``mask[b, q, k] = (1 <= k <= q and tokens[k - 1] == tokens[q])``: the token after an
    earlier copy of the current token (prefix matching, Olsson et al. 2022)."""
    dup = duplicate_token_mask(tokens)  # [b q j] with j < q
    # key k = j + 1 for every earlier copy j; shifting the key axis right by one does it
    return F.pad(dup[:, :, :-1], (1, 0))


def score_masks(
    tokens: Int[Tensor, "batch pos"], attention_mask: Bool[Tensor, "batch pos"] | None = None
) -> dict[ScoreKind, Bool[Tensor, "batch pos pos"]]:
    """Return the three masks, keyed by score kind; in a padded batch, only real queries and real keys
    count (pad tokens would otherwise be each other's duplicates)."""
    masks = {
        "previous_token": previous_token_mask(tokens),
        "duplicate_token": duplicate_token_mask(tokens),
        "induction": induction_mask(tokens),
    }
    if attention_mask is not None:
        real = attention_mask[:, :, None] & attention_mask[:, None, :]
        masks = {k: m & real for k, m in masks.items()}
    return masks


def masked_attention_score(
    pattern: Float[Tensor, "batch head pos pos"], mask: Bool[Tensor, "batch pos pos"]
) -> Float[Tensor, " head"]:
    """Return each head's mean attention on the keys ``mask`` marks, over the queries that have one.

    A head that puts all its attention there scores 1.0; one that never does scores 0.0.
    """
    counted = mask.any(-1)  # [batch q]
    n = counted.sum()
    if n == 0:
        raise InputError("no query has a key the mask marks (no repeated tokens?); score needs repeats")
    on_mask = (pattern * mask[:, None].to(pattern.dtype)).sum(-1)  # [batch head q]
    return (on_mask * counted[:, None].to(pattern.dtype)).sum(dim=(0, 2)) / n


# ----------------------------------------------------------------------------------------- scoring


class HeadScores(NamedTuple):
    """Attention scores of every head on one batch, and the per-token loss of the same pass."""

    previous_token: Float[Tensor, "layer head"]
    duplicate_token: Float[Tensor, "layer head"]
    induction: Float[Tensor, "layer head"]
    #: next-token loss at each prediction position (``loss[:, p]`` predicts ``tokens[:, p + 1]``)
    loss: Float[Tensor, "batch pos"]

    def get(self, kind: ScoreKind) -> Float[Tensor, "layer head"]:
        return getattr(self, kind)


def next_token_loss(logits: Float[Tensor, "batch pos d_vocab"], tokens: Int[Tensor, "batch pos"]) -> Tensor:
    """Return the cross-entropy of each next-token prediction, ``[batch pos-1]``."""
    logp = logits[:, :-1].float().log_softmax(-1)
    return -logp.gather(-1, tokens[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def score_heads(model: HookedGPT, tokens: Int[Tensor, "batch pos"] | Batch, chunk: int = 64) -> HeadScores:
    """Return previous-token, duplicate-token and induction scores of every head, in one pass per chunk.

    Hooks on every ``attn.hook_pattern`` reduce the pattern to scores as soon as it is computed, so
    no pattern is kept and every head of every layer is scored by the same forward pass.
    A padded :class:`~workbench.padding.Batch` is scored on its real tokens only: each score is the
    mean over every real query that has a marked key, as if the prompts were scored one by one and
    pooled; ``loss`` is NaN where either token of a prediction is padding.
    """
    tokens, attention_mask = padding.unpack(tokens, None)
    tokens = model.check_tokens(tokens)
    attention_mask = padding.check_attention_mask(attention_mask, tokens)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    sums = {k: torch.zeros(L, H, dtype=torch.float64) for k in SCORE_KINDS}
    counts = dict.fromkeys(SCORE_KINDS, 0)
    losses = []
    for lo in range(0, tokens.shape[0], chunk):
        part = tokens[lo: lo + chunk]
        part_mask = None if attention_mask is None else attention_mask[lo: lo + chunk]
        masks = score_masks(part, part_mask)
        n_counted = {k: int(m.any(-1).sum()) for k, m in masks.items()}

        def reduce(pattern: Tensor, hook) -> None:
            layer = int(hook.name.split(".")[1])
            for k, m in masks.items():
                if n_counted[k]:
                    sums[k][layer] += masked_attention_score(pattern.float(), m).double().cpu() * n_counted[k]

        for k in SCORE_KINDS:
            counts[k] += n_counted[k]
        names = [act_name("pattern", i) for i in range(L)]
        logits = model.run_with_hooks(part, fwd_hooks=[(n, reduce) for n in names], attention_mask=part_mask)
        loss = next_token_loss(logits, part)
        if part_mask is not None:
            loss = loss.masked_fill(~(part_mask[:, :-1] & part_mask[:, 1:]), float("nan"))
        losses.append(loss.cpu())
    for k, c in counts.items():
        if c == 0:
            raise InputError(f"the tokens have no query for the {k} score (no repeated tokens?)")
    scores = {k: (sums[k] / counts[k]).float() for k in SCORE_KINDS}
    return HeadScores(**scores, loss=torch.cat(losses))


class RepeatLosses(NamedTuple):
    """Mean next-token loss on the first and second copy of repeated random tokens."""

    first: float
    second: float


def repeat_losses(loss: Float[Tensor, "batch pos"], seq: RepeatedTokens) -> RepeatLosses:
    """Return the mean loss predicting tokens of the first copy and of the second copy.

    Prediction position ``p`` predicts token ``p + 1``. The first copy's tokens (after the first,
    which nothing predicts) are random; the second copy's, except its first token, are predictable
    by induction.
    """
    s, L = seq.start, seq.seq_len
    first = loss[:, s: s + L - 1]  # predicts tokens s+1 .. s+L-1
    second = loss[:, s + L: s + 2 * L - 1]  # predicts tokens s+L+1 .. s+2L-1
    return RepeatLosses(float(first.mean()), float(second.mean()))


class ICLScore(NamedTuple):
    """In-context learning score (Olsson et al. 2022): loss late in the context minus loss early."""

    early_loss: float
    late_loss: float
    #: late minus early; negative when the model uses the context
    score: float
    #: mean loss at every prediction position
    per_position: Float[Tensor, " pos"]


@torch.no_grad()
def in_context_learning_score(
    model: HookedGPT, tokens: Int[Tensor, "batch pos"], early: int | None = None, late: int | None = None,
    chunk: int = 16,
) -> ICLScore:
    """Return the mean loss at prediction position ``late`` minus that at ``early``.

    Olsson et al. compare token 500 with token 50; the defaults scale that to the length given:
    ``early = pos // 10``, ``late = pos - 2``.
    """
    tokens = model.check_tokens(tokens)
    n = tokens.shape[1] - 1
    early = max(1, n // 10) if early is None else early
    late = n - 1 if late is None else late
    if not 0 <= early < late < n:
        raise InputError(f"need 0 <= early < late < {n} prediction positions, got early={early}, late={late}")
    loss = torch.cat([next_token_loss(model(tokens[i: i + chunk]), tokens[i: i + chunk]).cpu()
                      for i in range(0, tokens.shape[0], chunk)])
    per_pos = loss.mean(0)
    return ICLScore(float(per_pos[early]), float(per_pos[late]), float(per_pos[late] - per_pos[early]), per_pos)


# --------------------------------------------------------------------------------------- OV circuit


def copying_score(ov: Float[Tensor, "... n n"]) -> Float[Tensor, " ..."]:
    """Return ``sum(eigenvalues) / sum(|eigenvalues|)`` of square matrices: +1 copies, -1 suppresses."""
    eig = torch.linalg.eigvals(ov.double())
    return (eig.real.sum(-1) / eig.abs().sum(-1).clamp_min(1e-30)).to(ov.dtype)


def _norm_weight(norm, d_model: int, like: Tensor) -> Tensor:
    return norm.w.detach().to(like) if norm is not None else torch.ones(d_model).to(like)


def reading_weights(model: HookedGPT, which: Literal["Q", "K", "V"]) -> Float[Tensor, "layer head d_model d_head"]:
    """Return every head's W_Q, W_K or W_V with its layer's ln1 weight folded in (kv heads repeated
    over their query groups). The norm's centring and scale are left out, as in TransformerLens."""
    W = getattr(model, f"W_{which}").detach()
    group = model.cfg.n_heads // model.cfg.n_kv
    if which != "Q" and group > 1:
        W = W.repeat_interleave(group, dim=1)
    w = torch.stack([_norm_weight(b.ln1, model.cfg.d_model, W) for b in model.blocks])  # [layer d_model]
    return W * w[:, None, :, None]


@torch.no_grad()
def ov_copying_scores(model: HookedGPT) -> Float[Tensor, "layer head"]:
    """Return the copying score of each head's full OV circuit ``W_E ln1 W_V W_O ln_final W_U``.

    The ``d_vocab x d_vocab`` circuit ``A B`` (``A = W_E ln1 W_V``, ``B = W_O ln_final W_U``) has the
    same nonzero eigenvalues as the ``d_head x d_head`` matrix ``B A``, and zeros add nothing to
    either sum, so the score is computed on ``W_O (ln_final W_U W_E) ln1 W_V``.
    """
    W_E, W_U = model.W_E.detach().float(), model.W_U.detach().float()
    wf = _norm_weight(model.ln_final, model.cfg.d_model, W_U)
    middle = (wf[:, None] * W_U) @ W_E  # [d_model d_model]
    W_V = reading_weights(model, "V").float()
    W_O = model.W_O.detach().float()
    small = W_O @ middle @ W_V  # [layer head d_head d_head]
    return copying_score(small)


def full_ov_circuit(model: HookedGPT, layer: int, head: int) -> Float[Tensor, "d_vocab d_vocab"]:
    """Return one head's full OV circuit (for small vocabularies; the scores never build it)."""
    W_V = reading_weights(model, "V")[layer, head]
    wf = _norm_weight(model.ln_final, model.cfg.d_model, W_V)
    return model.W_E.detach() @ W_V @ model.W_O[layer, head].detach() @ (wf[:, None] * model.W_U.detach())


# -------------------------------------------------------------------------------------- composition


def _factors(model: HookedGPT, kind: CompositionKind) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Return (U1, V1, U2, V2): the earlier head's OV = U1 V1, the later head's matrix = U2 V2."""
    W_Q, W_K, W_V = (reading_weights(model, w).float() for w in ("Q", "K", "V"))
    W_O = model.W_O.detach().float()
    if kind == "q":  # the earlier head writes the later head's query: OV1 @ W_QK2
        U2, V2 = W_Q, W_K.transpose(-1, -2)
    elif kind == "k":  # ... its key: OV1 @ W_QK2^T
        U2, V2 = W_K, W_Q.transpose(-1, -2)
    elif kind == "v":  # ... its value: OV1 @ OV2
        U2, V2 = W_V, W_O
    else:
        raise InputError(f"composition kind {kind!r} is not one of 'q', 'k', 'v'")
    return W_V, W_O, U2, V2


@torch.no_grad()
def composition_scores(model: HookedGPT, kind: CompositionKind) -> Float[Tensor, "layer head layer head"]:
    """Return ``scores[l1, h1, l2, h2] = |A B|_F / (|A|_F |B|_F)`` with ``A`` the OV circuit of the
    earlier head (l1, h1) and ``B`` the later head's QK (kind q), QK transposed (k) or OV (v)
    circuit (Elhage et al. 2021); NaN where ``l1 >= l2``.

    Never builds a ``d_model x d_model`` matrix: with ``A = U1 V1`` and ``B = U2 V2`` the squared
    norm of ``A B`` is ``sum((C G2 C^T) * G1)`` for ``C = V1 U2`` and the Gram matrices
    ``G1 = U1^T U1``, ``G2 = V2 V2^T``, all ``d_head x d_head``.
    """
    U1, V1, U2, V2 = _factors(model, kind)
    L, H = U1.shape[:2]
    G1 = U1.transpose(-1, -2) @ U1  # [layer head dh dh]
    G1v = V1 @ V1.transpose(-1, -2)
    G2u = U2.transpose(-1, -2) @ U2
    G2 = V2 @ V2.transpose(-1, -2)
    norm1 = (G1 * G1v).sum((-1, -2)).clamp_min(0).sqrt()  # |U1 V1|_F
    norm2 = (G2u * G2).sum((-1, -2)).clamp_min(0).sqrt()
    out = torch.full((L, H, L, H), float("nan"))
    for l2 in range(1, L):  # a loop over layers; all head pairs of a layer pair are one batched product
        C = torch.einsum("ahij,cjk->ahcik", V1[:l2], U2[l2])  # [l1 h1 h2 dh dh]
        sq = ((C @ G2[l2][None, None]) @ C.transpose(-1, -2) * G1[:l2, :, None]).sum((-1, -2))
        out[:l2, :, l2] = sq.clamp_min(0).sqrt() / (norm1[:l2, :, None] * norm2[l2][None, None])
    return out


# ------------------------------------------------------------------------------ causal composition


class CausalComposition(NamedTuple):
    """How much each later head's score drops when an earlier component is removed from one of its inputs."""

    kind: CompositionKind
    #: labels of the removed components: ``L{l}`` (a layer's attention output) or ``L{l}H{h}`` (a head)
    sources: list[str]
    #: the layer of each source
    source_layers: list[int]
    #: each later head's score on the unchanged input
    clean: Float[Tensor, "layer head"]
    #: score with the source removed; NaN where the source is not in an earlier layer
    ablated: Float[Tensor, "source layer head"]

    @property
    def drop(self) -> Float[Tensor, "source layer head"]:
        return self.clean[None] - self.ablated


def _layer_pattern(model: HookedGPT, layer: int, x_q: Tensor, x_k: Tensor) -> Float[Tensor, "batch head pos pos"]:
    """Return layer ``layer``'s attention pattern with queries read from ``x_q`` and keys from ``x_k``."""
    block, cfg = model.blocks[layer], model.cfg
    attn = block.attn
    q = attn.project(block.ln1(x_q), "q")
    k = attn.project(block.ln1(x_k), "k")
    if cfg.positional == "rotary":
        tables = model.rotary(0, q.shape[1], q.dtype)
        q, k = apply_rotary(q, *tables), apply_rotary(k, *tables)
    if cfg.n_heads != cfg.n_kv:
        k = k.repeat_interleave(cfg.n_heads // cfg.n_kv, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(cfg.d_head)
    n = scores.shape[-1]
    future = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)
    return scores.masked_fill(future, float("-inf")).softmax(-1)


def _head_logit_effect(
    model: HookedGPT, layer: int, pattern: Tensor, x_v: Tensor, final_scale: Tensor, tokens: Tensor
) -> Float[Tensor, "batch head pos"]:
    """Return each head's direct effect on the logit of the next token at every query position."""
    block, cfg = model.blocks[layer], model.cfg
    attn = block.attn
    v = attn.project(block.ln1(x_v), "v")
    if cfg.n_heads != cfg.n_kv:
        v = v.repeat_interleave(cfg.n_heads // cfg.n_kv, dim=2)
    z = torch.einsum("bhqk,bkhd->bqhd", pattern, v)
    result = torch.einsum("bqhd,hdm->bqhm", z, attn.W_O)  # [batch q head d_model]
    wf = _norm_weight(model.ln_final, cfg.d_model, result)
    if model.ln_final.kind == "layernorm":
        result = result - result.mean(-1, keepdim=True)
    nxt = torch.cat([tokens[:, 1:], tokens[:, -1:]], dim=1)  # the last position has no target; masked later
    W_dir = (wf[:, None] * model.W_U)[:, nxt].permute(1, 2, 0)  # [batch q d_model]
    return torch.einsum("bqhm,bqm->bhq", result / final_scale[:, :, None, None], W_dir)


@torch.no_grad()
def causal_composition(
    model: HookedGPT,
    tokens: Int[Tensor, "batch pos"],
    kind: CompositionKind = "k",
    per: Literal["layer", "head"] = "layer",
    score: ScoreKind = "induction",
    chunk: int = 32,
    layers: list[int] | None = None,
) -> CausalComposition:
    """Return each head's score with an earlier layer's (or head's) output removed from one input.

    For ``kind`` q or k the later head's attention pattern is recomputed with the source's output
    subtracted from the residual stream its queries (q) or keys (k) read, the other side unchanged,
    and scored with ``score``'s mask. The value input does not change the pattern, so for ``kind`` v
    the score is the head's direct effect on the next token's logit (through the cached final norm
    scale) on the queries the mask counts, computed with the source removed from the values only.
    The ablated inputs of all sources are stacked on the batch axis (``chunk`` sources at a time).
    ``layers`` limits the later layers scored (default: every layer from 1); rows of the others stay NaN.
    """
    tokens = model.check_tokens(tokens)
    cfg = model.cfg
    L, H, B = cfg.n_layers, cfg.n_heads, tokens.shape[0]
    if kind not in ("q", "k", "v"):
        raise InputError(f"composition kind {kind!r} is not one of 'q', 'k', 'v'")
    if L < 2:
        raise InputError(f"causal composition needs at least two layers; this model has {L}")
    names = [act_name(n, i) for i in range(L) for n in ("resid_pre", "z", "attn_out")] + ["ln_final.hook_scale"]
    _, cache = model.run_with_cache(tokens, names_filter=names)
    mask = score_masks(tokens)[score]
    counted = mask.any(-1)  # [batch q]
    if kind == "v":  # the direct effect needs a next token: the last query has none
        counted[:, -1] = False
    n_counted = counted.sum().clamp_min(1)

    if per == "layer":
        sources = [f"L{i}" for i in range(L - 1)]
        src_layers = list(range(L - 1))

        def output(s: int) -> Tensor:
            return cache[act_name("attn_out", s)]
    elif per == "head":
        sources = [f"L{i}H{h}" for i in range(L - 1) for h in range(H)]
        src_layers = [i for i in range(L - 1) for _ in range(H)]
        results = {i: cache.head_results(i) for i in range(L - 1)}

        def output(s: int) -> Tensor:
            return results[s // H][:, :, s % H]
    else:
        raise InputError(f"per={per!r} is not one of 'layer', 'head'")

    def head_score(pattern: Tensor, x_v: Tensor, layer: int, n_rep: int) -> Tensor:  # -> [rep head]
        if kind == "v":
            scale = cache["ln_final.hook_scale"].squeeze(-1).repeat(n_rep, 1)
            per_q = _head_logit_effect(model, layer, pattern, x_v, scale, tokens.repeat(n_rep, 1))
        else:
            per_q = (pattern * mask.repeat(n_rep, 1, 1)[:, None]).sum(-1)  # [rep*batch head q]
        per_q = per_q * counted.repeat(n_rep, 1)[:, None]
        return per_q.view(n_rep, B, H, -1).sum((1, 3)) / n_counted

    later = list(range(1, L)) if layers is None else sorted(set(layers))
    if any(not 1 <= i < L for i in later):
        raise InputError(f"layers {later} must lie in [1, {L}): layer 0 has no earlier layer to compose with")
    clean = torch.full((L, H), float("nan"))
    ablated = torch.full((len(sources), L, H), float("nan"))
    for layer in later:
        resid = cache[act_name("resid_pre", layer)]
        clean[layer] = head_score(_layer_pattern(model, layer, resid, resid), resid, layer, 1)[0]
        earlier = [s for s, sl in enumerate(src_layers) if sl < layer]
        for lo in range(0, len(earlier), chunk):
            idx = earlier[lo: lo + chunk]
            removed = torch.cat([resid - output(s) for s in idx])  # [n_src*batch pos d_model]
            same = resid.repeat(len(idx), 1, 1)
            x_q, x_k = (removed, same) if kind == "q" else (same, removed) if kind == "k" else (same, same)
            pattern = _layer_pattern(model, layer, x_q, x_k)
            ablated[idx, layer] = head_score(pattern, removed if kind == "v" else same, layer, len(idx))
    return CausalComposition(kind, sources, src_layers, clean, ablated)


# --------------------------------------------------------------------------------------- reference


@torch.no_grad()
def score_heads_naive(model: HookedGPT, tokens: Int[Tensor, "batch pos"], kind: ScoreKind = "induction") -> Tensor:
    """Return one score per head the way TransformerLens' ``detect_head`` does: one forward pass
    with a cache per prompt and per head. Kept as the benchmarks' baseline and a test oracle."""
    L, H = model.cfg.n_layers, model.cfg.n_heads
    out = torch.zeros(L, H)
    n_counted = 0
    for b in range(tokens.shape[0]):
        row = tokens[b: b + 1]
        m = score_masks(row)[kind]
        c = int(m.any(-1).sum())
        n_counted += c
        for layer in range(L):
            for head in range(H):
                name = act_name("pattern", layer)
                _, cache = model.run_with_cache(row, names_filter=[name])
                if c:
                    out[layer, head] += masked_attention_score(cache[name][:, head: head + 1], m)[0] * c
    return out / max(n_counted, 1)
