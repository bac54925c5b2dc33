"""Text generation: greedy and sampled decoding over a preallocated KV cache, with streaming.

    out = generate(model, "The capital of France is", max_new_tokens=8)        # greedy
    out.texts[0]                                                                 # ' Paris. ...'
    out = generate(model, prompt, 64, temperature=0.8, top_p=0.95, seed=0)      # sampled, reproducible
    for event in stream_generate(model, prompt, 64):                             # for the app
        print(event.text, end="")

Prompts of different lengths (a list of texts, or a left-padded :class:`~workbench.padding.Batch`)
are left-padded and generated together: every row continues from its last real token, with its own
positions, and gives the tokens it would give alone.

``model.generate(...)`` is the same function. Hooks attached to the model (``with model.hooks(...)``
or ``fwd_hooks=``) fire on every forward pass of the generation: once over the whole prompt, then
once per new token (the decode steps see ``pos == 1``).

Why it is fast: the prompt goes through the model once and fills a KV cache preallocated for
``prompt + max_new_tokens`` positions; every later step feeds one token. The loop runs under
``torch.inference_mode``, writes tokens into a preallocated buffer (no concatenation), samples from
the last position only and never re-tokenizes. Text is decoded only at the end (or, streaming,
incrementally).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from workbench import padding
from workbench.errors import InputError
from workbench.model import KVCache
from workbench.padding import Batch

FinishReason = Literal["stop_token", "max_new_tokens"]
Prompt = str | Sequence[str] | Sequence[int] | Tensor | Batch


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is picked from the logits of the last position."""

    #: 0 picks the most likely token (greedy, deterministic); > 0 samples from softmax(logits / temperature)
    temperature: float = 0.0
    #: sample only among the k most likely tokens (None: all)
    top_k: int | None = None
    #: sample only from the smallest set of tokens whose probabilities add up to top_p (None: all)
    top_p: float | None = None
    #: seeds a private generator, so the same seed gives the same sample (None: torch's global RNG)
    seed: int | None = None

    def __post_init__(self) -> None:
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise InputError(f"temperature must be a finite number >= 0 (0 means greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise InputError(f"top_k must be a positive number of tokens, got {self.top_k}")
        if self.top_p is not None and not 0 < self.top_p <= 1:
            raise InputError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class GenerationOutput:
    """The result of :func:`generate`."""

    #: prompt followed by the generated tokens; a row that stopped early is padded with its stop token
    tokens: Int[Tensor, "batch pos"]
    #: number of prompt positions at the start of every row
    prompt_len: int
    #: each row's generated text, up to (not including) its stop token; None if the model has no tokenizer
    texts: list[str] | None
    #: why each row ended
    finish_reasons: list[FinishReason]
    #: generated tokens per row, stop token included
    n_generated: list[int]
    #: ``[batch pos]``, True at real tokens, for prompts of different lengths (left-padded); None otherwise
    attention_mask: Tensor | None = None

    @property
    def new_tokens(self) -> Int[Tensor, "batch new"]:
        return self.tokens[:, self.prompt_len:]


class StreamEvent(NamedTuple):
    """One generated token, as :func:`stream_generate` yields it."""

    token: int
    #: text completed by this token (may be "" while a multi-byte character is still incomplete)
    text: str
    #: set on the last event only
    finish_reason: FinishReason | None


# ---------------------------------------------------------------------------------------- sampling


def next_token_probs(logits: Float[Tensor, "batch d_vocab"], cfg: SamplingConfig) -> Float[Tensor, "batch d_vocab"]:
    """Return the distribution the next token is drawn from: temperature, then top-k, then top-p.

    Greedy (temperature 0) puts all the mass on the argmax."""
    if cfg.greedy:
        return F.one_hot(logits.argmax(dim=-1), logits.shape[-1]).float()
    return _filtered_logits(logits, cfg).softmax(dim=-1)


def sample_next(
    logits: Float[Tensor, "batch d_vocab"], cfg: SamplingConfig, generator: torch.Generator | None = None
) -> Int[Tensor, " batch"]:
    """Return the next token of every row from last-position logits, as ``cfg`` says."""
    if torch.isnan(logits).any():
        raise InputError(
            "the model's next-token logits hold NaN, so there is nothing to sample from; its weights (or a hook) "
            "produced them: check the checkpoint with a forward pass, or remove the hook"
        )
    if cfg.greedy:
        return logits.argmax(dim=-1)
    return torch.multinomial(_filtered_logits(logits, cfg).softmax(dim=-1), 1, generator=generator).squeeze(-1)


def _filtered_logits(logits: Float[Tensor, "batch d_vocab"], cfg: SamplingConfig) -> Float[Tensor, "batch d_vocab"]:
    """Return logits / temperature with the tokens top-k and top-p exclude set to -inf."""
    logits = logits.float()
    # shifted so the largest is 0 first: a tiny temperature then sends the others to -inf, never inf - inf = NaN
    # (and a temperature below float32's smallest normal, which would round to 0, is clamped to it)
    logits = (logits - logits.amax(dim=-1, keepdim=True)) / max(cfg.temperature, torch.finfo(torch.float32).tiny)
    if cfg.top_k is not None and cfg.top_k < logits.shape[-1]:
        kth = torch.topk(logits, cfg.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if cfg.top_p is not None and cfg.top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(dim=-1)
        # drop a token when the tokens before it already cover top_p (the most likely always stays)
        drop = probs.cumsum(dim=-1) - probs >= cfg.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    return logits


# --------------------------------------------------------------------------------------- the loop


def _prompt_tokens(model, prompt: Prompt, prepend_bos: bool | None
                   ) -> tuple[Int[Tensor, "batch pos"], Tensor | None]:
    """Return the prompt's token ids and, for prompts of different lengths, its (left-padded) attention mask."""
    device = model.embed.W_E.device
    if isinstance(prompt, Batch):
        return _left_padded(prompt)
    if isinstance(prompt, str) or (isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[0], str)):
        if isinstance(prompt, str) and not prompt:
            raise InputError("the prompt is empty; give at least one token of text")
        return _left_padded(model.to_batch(prompt, padding_side="left", prepend_bos=prepend_bos))
    if isinstance(prompt, Tensor):
        tokens = prompt.to(device)
    else:
        tokens = torch.tensor(list(prompt), dtype=torch.long, device=device)
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.shape[1] == 0:
        raise InputError(f"the prompt is empty (token shape {tuple(tokens.shape)}); give at least one token")
    return tokens.long(), None


def _left_padded(batch: Batch) -> tuple[Int[Tensor, "batch pos"], Tensor | None]:
    """Return a batch's tokens and mask (None without padding), refusing right padding: new tokens are
    written after the last column, so every row's last real token must be there."""
    tokens = batch.tokens.long()
    if tokens.ndim == 1:
        tokens = tokens[None]
    mask = padding.check_attention_mask(batch.attention_mask, tokens)
    if mask is None:
        return tokens, None
    padding.check_rows_have_tokens(mask)
    if not bool((mask[:, 1:] >= mask[:, :-1]).all()):
        raise InputError(
            "generation needs left padding (padding before each prompt), got padding after a real token; "
            "use model.to_batch(texts, padding_side='left')"
        )
    return tokens, mask


def _stop_ids(model, stop_tokens: Sequence[int | str] | None) -> list[int]:
    if stop_tokens is None:  # default: the tokenizer's end-of-sequence token
        tok = model.tokenizer
        return [tok.eos_token_id] if tok is not None and tok.eos_token_id is not None else []
    ids = []
    for s in stop_tokens:
        if isinstance(s, str):
            if model.tokenizer is None:
                raise InputError(f"stop token {s!r} given as text, but the model has no tokenizer; give its id")
            i = model.tokenizer.tok.token_to_id(s)
            if i is None:
                raise InputError(f"stop token {s!r} is not a single token of this vocabulary; give a token id")
            ids.append(int(i))
        else:
            if not 0 <= int(s) < model.cfg.d_vocab:
                raise InputError(f"stop token id {s} is outside the vocabulary [0, {model.cfg.d_vocab})")
            ids.append(int(s))
    return ids


def _check_length(model, prompt_len: int, max_new_tokens: int) -> None:
    n_ctx = model.cfg.n_ctx
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if prompt_len > n_ctx:
        raise InputError(
            f"the prompt is {prompt_len} tokens, longer than the model's context of {n_ctx}; shorten it"
        )
    if prompt_len + max_new_tokens > n_ctx:
        raise InputError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) exceeds the model's context of "
            f"{n_ctx}; ask for at most {n_ctx - prompt_len} new tokens or shorten the prompt"
        )


def _start(model, prompt: Prompt, max_new_tokens: int, stop_tokens, prepend_bos: bool | None
           ) -> tuple[Int[Tensor, "batch pos"], int, list[int], Tensor | None]:
    """Return the preallocated token buffer (prompt in front), the prompt length, the stop ids and the
    buffer's attention mask (None when no prompt is padded)."""
    prompt_tokens, prompt_mask = _prompt_tokens(model, prompt, prepend_bos)
    batch, prompt_len = prompt_tokens.shape
    _check_length(model, prompt_len, max_new_tokens)
    stops = _stop_ids(model, stop_tokens)
    buf = torch.empty(batch, prompt_len + max_new_tokens, dtype=torch.long, device=prompt_tokens.device)
    buf[:, :prompt_len] = prompt_tokens
    mask = None
    if prompt_mask is not None:  # generated tokens are all real
        mask = torch.ones(buf.shape, dtype=torch.bool, device=buf.device)
        mask[:, :prompt_len] = prompt_mask.to(buf.device)
    return buf, prompt_len, stops, mask


def _decode_steps(
    model, tokens: Int[Tensor, "batch pos"], max_new_tokens: int, cfg: SamplingConfig, use_cache: bool,
    mask: Tensor | None = None,
) -> Iterator[Int[Tensor, " batch"]]:
    """Yield the next token of every row, step by step; the caller writes it into ``tokens``' buffer.

    ``tokens`` is the whole preallocated buffer ``[batch, prompt_len + max_new_tokens]`` with the
    prompt in front; step ``i`` may read positions ``< prompt_len + i`` only. ``mask`` (left-padded
    prompts) covers the whole buffer; the KV cache remembers the prompt's part.
    """
    batch, total = tokens.shape
    prompt_len = total - max_new_tokens
    generator = None
    if cfg.seed is not None:
        generator = torch.Generator(device=tokens.device).manual_seed(cfg.seed)
    if use_cache:
        dtype = model.embed.W_E.dtype
        kv = KVCache.empty(model.cfg, batch, total, device=tokens.device, dtype=dtype)
        prompt_mask = None if mask is None else mask[:, :prompt_len]
        logits = model(tokens[:, :prompt_len], kv_cache=kv, attention_mask=prompt_mask)[:, -1]
        for i in range(max_new_tokens):
            nxt = sample_next(logits, cfg, generator)
            yield nxt
            if i + 1 < max_new_tokens:
                cur = prompt_len + i
                logits = model(tokens[:, cur: cur + 1], kv_cache=kv)[:, -1]
    else:
        for i in range(max_new_tokens):
            seen = prompt_len + i
            logits = model(tokens[:, :seen], attention_mask=None if mask is None else mask[:, :seen])
            logits = logits[:, -1]
            yield sample_next(logits, cfg, generator)


def generate(
    model,
    prompt: Prompt,
    max_new_tokens: int = 32,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_tokens: Sequence[int | str] | None = None,
    use_cache: bool = True,
    prepend_bos: bool | None = None,
    fwd_hooks: Sequence = (),
) -> GenerationOutput:
    """Return the prompt continued by up to ``max_new_tokens`` tokens.

    ``prompt``: text, a list of texts (of any lengths: they are left-padded), a left-padded
    :class:`~workbench.padding.Batch`, token ids ``[pos]`` or ``[batch pos]``. BOS: text is tokenized
    with the tokenizer's ``add_bos`` (SmolLM2: no BOS) unless ``prepend_bos`` says otherwise; token ids
    are used as given. ``temperature=0`` (the default) is greedy; otherwise sample with ``top_k`` /
    ``top_p``, reproducibly when ``seed`` is set.
    ``stop_tokens``: ids or token strings that end a row (None: the tokenizer's EOS; ``[]``: none).
    ``use_cache=False`` recomputes the whole sequence every step (slow; for checking the cache).
    ``fwd_hooks``: ``[(name_or_filter, fn)]`` attached for the whole generation.
    """
    cfg = SamplingConfig(temperature, top_k, top_p, seed)
    buf, prompt_len, stops, mask = _start(model, prompt, max_new_tokens, stop_tokens, prepend_bos)
    batch = buf.shape[0]
    stop_t = torch.tensor(stops, dtype=torch.long, device=buf.device) if stops else None
    done = torch.zeros(batch, dtype=torch.bool, device=buf.device)
    n_gen = torch.full((batch,), max_new_tokens, dtype=torch.long, device=buf.device)
    hooks = model.hooks(fwd_hooks) if fwd_hooks else nullcontext()
    written = prompt_len
    with torch.inference_mode(), hooks:
        for i, nxt in enumerate(_decode_steps(model, buf, max_new_tokens, cfg, use_cache, mask)):
            if stop_t is not None:
                # a finished row keeps repeating the token it stopped on (it is never looked at)
                nxt = torch.where(done, buf[:, prompt_len + i - 1] if i else nxt, nxt)
                hit = torch.isin(nxt, stop_t) & ~done
                n_gen = torch.where(hit, i + 1, n_gen)
                done |= hit
            buf[:, prompt_len + i] = nxt
            written = prompt_len + i + 1
            if stop_t is not None and bool(done.all()):
                break
    tokens = buf[:, :written].clone()
    reasons: list[FinishReason] = ["stop_token" if d else "max_new_tokens" for d in done.tolist()]
    n_list = [min(int(n), written - prompt_len) for n in n_gen.tolist()]
    texts = None
    if model.tokenizer is not None:
        texts = []
        for row, n, reason in zip(tokens.tolist(), n_list, reasons):
            new = row[prompt_len: prompt_len + n]
            if reason == "stop_token":
                new = new[:-1]
            texts.append(model.tokenizer.decode(new))
    out_mask = None if mask is None else mask[:, :written].clone()
    return GenerationOutput(tokens, prompt_len, texts, reasons, n_list, out_mask)


def stream_generate(
    model,
    prompt: Prompt,
    max_new_tokens: int = 32,
    *,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    stop_tokens: Sequence[int | str] | None = None,
    prepend_bos: bool | None = None,
    fwd_hooks: Sequence = (),
) -> Iterator[StreamEvent]:
    """Yield the generated tokens of one prompt as they come, each with the text it completes.

    Same arguments and the same tokens as :func:`generate` (batch 1 only). The stop token, if one is
    reached, is yielded last with empty text and ``finish_reason="stop_token"``.
    """
    cfg = SamplingConfig(temperature, top_k, top_p, seed)
    buf, prompt_len, stop_list, mask = _start(model, prompt, max_new_tokens, stop_tokens, prepend_bos)
    if buf.shape[0] != 1:
        raise InputError(f"stream_generate takes one prompt, got a batch of {buf.shape[0]}; use generate()")
    stops = set(stop_list)
    tok = model.tokenizer
    new_ids: list[int] = []
    emitted = ""
    # inference_mode/hooks are entered per step: a generator may be paused (and abandoned) between
    # events, and must not leave grad mode or hooks changed for the caller meanwhile
    steps = _decode_steps(model, buf, max_new_tokens, cfg, use_cache=True, mask=mask)
    for i in range(max_new_tokens):
        with torch.inference_mode(), model.hooks(fwd_hooks) if fwd_hooks else nullcontext():
            nxt = next(steps)
        token = int(nxt[0])
        buf[0, prompt_len + i] = token
        last = i + 1 == max_new_tokens
        if token in stops:
            yield StreamEvent(token, "", "stop_token")
            return
        new_ids.append(token)
        text = ""
        if tok is not None:
            full = tok.decode(new_ids)
            # hold back an incomplete UTF-8 character (decoded as U+FFFD) until its last byte arrives
            if not full.endswith("\ufffd") or last:
                text, emitted = full[len(emitted):], full
        yield StreamEvent(token, text, "max_new_tokens" if last else None)
