"""The computations behind the teaching pages, written out step by step. Pure: no streamlit here.

- **BPE step by step**: a byte-level BPE trainer in plain Python that makes the same choices as
  the HF ``tokenizers`` trainer (most frequent adjacent pair; ties to the pair of smaller ids), so
  each merge, its count and a sentence's segmentation after it can be shown.
- **Attention from scratch**: X·Xᵀ, softmax and the weighted sum; then one real head's learned
  queries and keys, the causal mask, the √d_head scaling, equal to the model's ``hook_pattern``.
- **Nearly orthogonal directions**: pairwise angles of random unit vectors as the dimension grows.
- **KV cache**: what is cached per layer, how many bytes (formula and measured tensors), and the
  speed of generation with and without it.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from typing import NamedTuple

import torch
from jaxtyping import Float, Int
from tokenizers import pre_tokenizers
from torch import Tensor

from workbench.corpora import train_bpe
from workbench.errors import InputError
from workbench.generate import generate
from workbench.model import KVCache, apply_rotary
from workbench.names import act_name

# ----------------------------------------------------------------------------------- BPE, by hand


@lru_cache(maxsize=1)
def byte_to_char() -> dict[int, str]:
    """Return GPT-2's byte -> printable character table (byte-level BPE works on these characters).

    Printable Latin-1 bytes stand for themselves; the others (space, control bytes, ...) are moved
    to code points from 256 up, so every byte is one visible character: a space is ``Ġ``."""
    keep = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
            + list(range(ord("®"), ord("ÿ") + 1)))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


@lru_cache(maxsize=1)
def char_to_byte() -> dict[str, int]:
    """Return the inverse of :func:`byte_to_char`."""
    return {c: b for b, c in byte_to_char().items()}


def piece_bytes(piece: str) -> bytes:
    """Return the raw bytes a byte-level token stands for (``"Ġcaf"`` -> ``b" caf"``)."""
    table = char_to_byte()
    return bytes(table[c] for c in piece)


def piece_text(piece: str) -> str:
    """Return a byte-level token as readable text; bytes that end mid-character show as their hex."""
    raw = piece_bytes(piece)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "".join(chr(b) if b < 0x80 else f"\\x{b:02x}" for b in raw)


def pre_tokenize(text: str) -> list[str]:
    """Return the byte-level words of ``text`` (GPT-2's split regex, then bytes as characters).

    The split is the ``tokenizers`` ByteLevel pre-tokenizer's own, so merges never cross a word."""
    return [w for w, _ in pre_tokenizers.ByteLevel(add_prefix_space=False).pre_tokenize_str(text)]


class Merge(NamedTuple):
    """One BPE training step."""

    #: 1-based number of the merge
    step: int
    #: the two tokens merged (byte-level strings)
    pair: tuple[str, str]
    #: how often the pair occurred in the corpus (adjacent, counted in every word times its frequency)
    count: int
    #: the token it makes (``pair[0] + pair[1]``)
    token: str
    #: that token's id (ids 0: end-of-text, 1..256: the bytes, then the merges in order)
    token_id: int
    #: vocabulary size after this merge (a merge that rebuilds an existing token adds none)
    vocab_size: int


@dataclass(frozen=True)
class BPETrace:
    """A byte-level BPE trained merge by merge."""

    #: the merges in the order they were learned
    merges: list[Merge]
    #: the vocabulary before any merge: end-of-text, then the 256 byte characters (in the trainer's id order)
    base_vocab: list[str]
    #: distinct pre-tokenized words of the corpus and their counts
    words: dict[str, int]

    def merge_pairs(self, n: int | None = None) -> list[tuple[str, str]]:
        """Return the first ``n`` merged pairs (all when None)."""
        return [m.pair for m in self.merges[:n]]


END_OF_TEXT = "<|endoftext|>"


def train_bpe_steps(documents: list[str], n_merges: int, min_frequency: int = 2) -> BPETrace:
    """Return ``n_merges`` merges of byte-level BPE learned on ``documents``, each with its count.

    The choice at each step is the ``tokenizers`` trainer's (what :func:`workbench.corpora.train_bpe`
    uses): the adjacent pair with the highest count, counted over every word times its frequency;
    ties go to the pair whose token ids are smaller, ids being end-of-text 0, the byte characters
    in code-point order, then merged tokens in the order made. Pair counts are recounted from the
    words at every step (slow but plain; the library updates them incrementally). Stops early
    when no pair occurs ``min_frequency`` times.
    """
    if n_merges < 0:
        raise InputError(f"n_merges={n_merges}: ask for 0 or more merges")
    words = Counter(w for doc in documents for w in pre_tokenize(doc))
    base = [END_OF_TEXT] + sorted(byte_to_char().values(), key=ord)
    ids = {tok: i for i, tok in enumerate(base)}
    names = list(base)
    split = [[ids[c] for c in w] for w in words]
    counts = list(words.values())
    merges: list[Merge] = []
    for step in range(1, n_merges + 1):
        pairs: Counter = Counter()
        for symbols, n in zip(split, counts):
            for a, b in zip(symbols, symbols[1:]):
                pairs[a, b] += n
        if not pairs:
            break
        (a, b), count = max(pairs.items(), key=lambda kv: (kv[1], -kv[0][0], -kv[0][1]))
        if count < max(1, min_frequency):
            break
        token = names[a] + names[b]
        if token not in ids:
            ids[token] = len(names)
            names.append(token)
        new = ids[token]
        split = [_merge_ids(s, a, b, new) for s in split]
        merges.append(Merge(step, (names[a], names[b]), count, token, new, len(names)))
    return BPETrace(merges, base, dict(words))


def _merge_ids(symbols: list[int], a: int, b: int, new: int) -> list[int]:
    out, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and symbols[i] == a and symbols[i + 1] == b:
            out.append(new)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def segment(text: str, merges: list[tuple[str, str]]) -> list[str]:
    """Return ``text`` cut into byte-level tokens by applying ``merges`` (earliest learned first) in each word."""
    rank = {pair: i for i, pair in enumerate(merges)}
    out: list[str] = []
    for word in pre_tokenize(text):
        symbols = list(word)
        while len(symbols) > 1:
            best = min(zip(symbols, symbols[1:]), key=lambda p: rank.get(p, math.inf))
            if best not in rank:
                break
            merged, i = [], 0
            while i < len(symbols):
                if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
                    merged.append(symbols[i] + symbols[i + 1])
                    i += 2
                else:
                    merged.append(symbols[i])
                    i += 1
            symbols = merged
        out.extend(symbols)
    return out


class SegmentationStep(NamedTuple):
    """A sentence's tokens after some number of merges."""

    n_merges: int
    tokens: list[str]


def segmentations(text: str, trace: BPETrace) -> list[SegmentationStep]:
    """Return the sentence's segmentation before any merge and after each merge of ``trace``."""
    pairs = trace.merge_pairs()
    return [SegmentationStep(k, segment(text, pairs[:k])) for k in range(len(pairs) + 1)]


def library_segmentation(documents: list[str], vocab_size: int, text: str) -> list[str]:
    """Return ``text``'s byte-level tokens under a ``tokenizers`` BPE trained to ``vocab_size`` (the oracle)."""
    tok = train_bpe(documents, vocab_size=vocab_size)
    return tok.tok.encode(text, add_special_tokens=False).tokens


# ---------------------------------------------------------------------------- attention from scratch


class ScratchAttention(NamedTuple):
    """One head computed by hand, every intermediate kept (rows are queries, columns keys)."""

    #: what the head reads: the block's ln1 output (normalized residual, times w, plus b)
    X: Float[Tensor, "pos d_model"]
    #: X·Xᵀ: every token's dot product with every other (symmetric)
    XXt: Float[Tensor, "pos pos"]
    #: softmax of X·Xᵀ over each row, no mask, no scaling
    XXt_softmax: Float[Tensor, "pos pos"]
    #: that softmax times X: each token's weighted mix of all tokens
    mixed: Float[Tensor, "pos d_model"]
    #: the head's queries and keys, X·W_Q + b_Q, X·W_K + b_K (rotated by RoPE in rotary models)
    Q: Float[Tensor, "pos d_head"]
    K: Float[Tensor, "pos d_head"]
    #: Q·Kᵀ (not symmetric: queries and keys are different maps of X)
    QKt: Float[Tensor, "pos pos"]
    #: Q·Kᵀ / √d_head
    scaled: Float[Tensor, "pos pos"]
    #: scaled, with -inf above the diagonal (a token cannot look ahead)
    masked: Float[Tensor, "pos pos"]
    #: softmax of masked: the attention pattern (equals the model's hook_pattern for this head)
    pattern: Float[Tensor, "pos pos"]
    #: the same pattern without the √d_head scaling (sharper: the scores' spread grows with d_head)
    pattern_unscaled: Float[Tensor, "pos pos"]


def causal_mask(scores: Float[Tensor, "pos pos"], upto: int | None = None) -> Float[Tensor, "pos pos"]:
    """Return ``scores`` with the future masked to -inf in the first ``upto`` query rows (all rows when None)."""
    n = scores.shape[-1]
    future = torch.ones(n, n, dtype=torch.bool, device=scores.device).triu(1)
    if upto is not None:
        future[upto:] = False
    return scores.masked_fill(future, float("-inf"))


def attention_from_scratch(model, tokens: Int[Tensor, " pos"], layer: int, head: int) -> ScratchAttention:
    """Return one head's attention on ``tokens`` computed by hand from the model's weights.

    Only the head's input is taken from the model (the block's residual stream through ln1, read
    at ``ln1.hook_normalized``); queries, keys, scores, mask and softmax are computed here.
    """
    cfg = model.cfg
    if not 0 <= layer < cfg.n_layers or not 0 <= head < cfg.n_heads:
        raise InputError(f"layer {layer}, head {head}: this model has {cfg.n_layers} layers of {cfg.n_heads} heads")
    name = act_name("normalized", layer, norm="ln1")
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens[None], names_filter=[name], device="cpu", dtype=torch.float32)
        ln = model.blocks[layer].ln1
        attn = model.blocks[layer].attn
        X = cache[name][0] * ln.w.float().cpu() + (0 if ln.b is None else ln.b.float().cpu())
        kv = head // (cfg.n_heads // cfg.n_kv)  # grouped-query: the KV head this query head shares
        Q = X @ attn.W_Q[head].float().cpu()
        K = X @ attn.W_K[kv].float().cpu()
        if attn.b_Q is not None:
            Q, K = Q + attn.b_Q[head].float().cpu(), K + attn.b_K[kv].float().cpu()
        if cfg.positional == "rotary":
            cos, sin = (t.float().cpu() for t in model.rotary(0, len(tokens), torch.float32))  # [pos 1 d_head]
            Q, K = (apply_rotary(t[None, :, None], cos, sin)[0, :, 0] for t in (Q, K))
    XXt = X @ X.T
    QKt = Q @ K.T
    scaled = QKt / math.sqrt(cfg.d_head)
    masked = causal_mask(scaled)
    return ScratchAttention(X, XXt, XXt.softmax(-1), XXt.softmax(-1) @ X, Q, K, QKt, scaled, masked,
                            masked.softmax(-1), causal_mask(QKt).softmax(-1))


def model_pattern(model, tokens: Int[Tensor, " pos"], layer: int, head: int) -> Float[Tensor, "pos pos"]:
    """Return the model's own ``hook_pattern`` of one head on ``tokens`` (CPU, float32)."""
    name = act_name("pattern", layer)
    with torch.inference_mode():
        _, cache = model.run_with_cache(tokens[None], names_filter=[name], device="cpu", dtype=torch.float32)
    return cache[name][0, head]


def row_entropy(pattern: Float[Tensor, "pos pos"]) -> Float[Tensor, " pos"]:
    """Return each row's entropy in nats (0: all attention on one key)."""
    p = pattern.clamp_min(1e-30)
    return -(pattern * p.log()).sum(-1)


# ----------------------------------------------------------------------- nearly orthogonal directions


def pairwise_angles(n: int, d: int, seed: int = 0) -> Float[Tensor, " pairs"]:
    """Return the angles in degrees between every pair of ``n`` random unit vectors in ``d`` dimensions."""
    if n < 2 or d < 1:
        raise InputError(f"need n >= 2 vectors in d >= 1 dimensions, got n={n}, d={d}")
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, d, generator=g, dtype=torch.float64)
    v = v / v.norm(dim=-1, keepdim=True)
    i, j = torch.triu_indices(n, n, 1)
    cos = (v @ v.T)[i, j].clamp(-1, 1)
    return torch.rad2deg(torch.arccos(cos)).float()


class AngleStats(NamedTuple):
    """The spread of random pairwise angles in one dimension."""

    d: int
    mean: float
    std: float
    #: (180/π)/√d: the standard deviation predicted for large d (cos θ is about N(0, 1/d))
    predicted_std: float
    #: fraction of pairs within 90° ± 5°
    within_5: float
    #: the pair closest to parallel or anti-parallel, as a distance from 90° (degrees)
    worst: float


def angle_stats(angles: Float[Tensor, " pairs"], d: int) -> AngleStats:
    """Return mean, spread and extremes of the angles of :func:`pairwise_angles`."""
    off = (angles - 90).abs()
    return AngleStats(d, float(angles.mean()), float(angles.std()), math.degrees(1 / math.sqrt(d)),
                      float((off <= 5).float().mean()), float(off.max()))


def directions_that_fit(d: int, epsilon: float) -> float:
    """Return about how many random directions in ``d`` dimensions keep every pair's |cos| below ``epsilon``.

    A pair's |cos| exceeds ε with probability about 2·exp(-d ε²/2); n random vectors make n²/2
    pairs, so they stay almost orthogonal while n² exp(-d ε²/2) < 1: n ≈ exp(d ε²/4) (the
    Johnson-Lindenstrauss count; exponential in d). Returned as a float (it overflows int quickly)."""
    return math.exp(d * epsilon**2 / 4)


# -------------------------------------------------------------------------------------- KV cache


def kv_cache_bytes(cfg, n_pos: int, batch: int = 1, bytes_per_value: int = 4) -> int:
    """Return the KV cache's size: 2 (K and V) × layers × batch × kv heads × positions × d_head × bytes."""
    return 2 * cfg.n_layers * batch * cfg.n_kv * n_pos * cfg.d_head * bytes_per_value


def measured_cache_bytes(cache) -> int:
    """Return the bytes a :class:`workbench.model.KVCache`'s tensors actually hold."""
    return sum(t.numel() * t.element_size() for t in [*cache.keys, *cache.values])


class CachedDecode(NamedTuple):
    """A greedy continuation decoded with a KV cache, and the cache at the end."""

    #: prompt and new tokens
    tokens: Int[Tensor, " pos"]
    prompt_len: int
    #: the cache after the last step (``cache.pos`` positions filled)
    cache: object


def decode_with_cache(model, prompt: Int[Tensor, " pos"], n_new: int) -> CachedDecode:
    """Return ``n_new`` greedy tokens after ``prompt`` and the KV cache that produced them.

    The cache is preallocated for every position; step ``s`` writes position ``prompt_len + s - 1``
    and reads the rows before it, which never change: the page slices it to show each step."""
    total = len(prompt) + n_new
    if total > model.cfg.n_ctx:
        raise InputError(f"prompt ({len(prompt)}) + {n_new} new tokens exceed the context of {model.cfg.n_ctx}")
    device = model.embed.W_E.device
    buf = torch.empty(total, dtype=torch.long, device=device)
    buf[: len(prompt)] = prompt.to(device)
    kv = KVCache.empty(model.cfg, 1, total, device=device, dtype=model.embed.W_E.dtype)
    with torch.inference_mode():
        logits = model(buf[None, : len(prompt)], kv_cache=kv)[0, -1]
        for i in range(n_new):
            cur = len(prompt) + i
            buf[cur] = logits.argmax()
            if i + 1 < n_new:
                logits = model(buf[None, cur: cur + 1], kv_cache=kv)[0, -1]
    return CachedDecode(buf.cpu(), len(prompt), kv)


class GenerationTiming(NamedTuple):
    """Wall time of one greedy generation."""

    use_cache: bool
    n_new: int
    seconds: float

    @property
    def tokens_per_s(self) -> float:
        return self.n_new / self.seconds if self.seconds > 0 else float("inf")


def time_generation(model, prompt: Int[Tensor, " pos"], n_new: int, use_cache: bool, repeats: int = 1
                    ) -> GenerationTiming:
    """Return the best wall time of ``repeats`` greedy generations of ``n_new`` tokens (with or without the cache)."""
    best = math.inf
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        generate(model, prompt.to(model.embed.W_E.device), n_new, use_cache=use_cache, stop_tokens=[])
        best = min(best, time.perf_counter() - t0)
    return GenerationTiming(use_cache, n_new, best)


def step_times(model, prompt: Int[Tensor, " pos"], n_new: int, use_cache: bool) -> list[float]:
    """Return the wall time of each greedy decoding step (the prompt's pass first), with or without a KV cache.

    Without the cache step ``i`` runs the whole ``prompt + i`` tokens again, so its time grows with the
    length; with it every step after the first runs one token."""
    device = model.embed.W_E.device
    total = len(prompt) + n_new
    if total > model.cfg.n_ctx:
        raise InputError(f"prompt ({len(prompt)}) + {n_new} new tokens exceed the context of {model.cfg.n_ctx}")
    buf = torch.empty(1, total, dtype=torch.long, device=device)
    buf[0, : len(prompt)] = prompt.to(device)
    kv = KVCache.empty(model.cfg, 1, total, device=device, dtype=model.embed.W_E.dtype) if use_cache else None
    times = []
    with torch.inference_mode():
        for i in range(n_new):
            cur = len(prompt) + i
            t0 = time.perf_counter()
            if kv is None:
                logits = model(buf[:, :cur])
            else:
                logits = model(buf[:, :cur] if i == 0 else buf[:, cur - 1: cur], kv_cache=kv)
            buf[0, cur] = logits[0, -1].argmax()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - t0)
    return times
