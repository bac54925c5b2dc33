"""Activation patching and ablation, batched.

Patching (denoising): run the corrupted prompt, put one clean activation in its place (the residual
stream at one layer and position, one head's output, one MLP output) and see how much of the clean
answer comes back. Ablation: replace one head's or MLP's output by zero or by its mean.

Every patched run that differs only from layer ``L`` on starts from the cached residual stream
before block ``L`` (``model.run_blocks(resid, start=L)``) instead of from the embedding, and all
the variants of one layer (every position, or every head) are stacked on the batch axis: one batched
pass per layer instead of one pass per patch location. Only the answer position is unembedded.

Prompts of different lengths: pass :class:`~workbench.padding.Batch` es (``model.to_batch(texts)``)
for the clean and corrupted prompts, padded alike (the same real positions in both). The answer
position ``-1`` is then each row's last real token, the mean ablation's mean leaves padding out,
and per-position columns are the columns of the padded batch.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench import padding
from workbench.errors import InputError
from workbench.names import act_name
from workbench.padding import Batch

if TYPE_CHECKING:
    from workbench.model import HookedGPT

#: A metric maps answer-position logits ``[... batch d_vocab]`` to one number per prompt ``[... batch]``.
Metric = Callable[[Tensor], Tensor]
PatchKind = Literal["resid_pre", "attn_out", "mlp_out", "z", "q", "k", "v"]
#: per-head activations :func:`patch_heads` patches: each head's output ``z`` or its query, key or value
#: (keys and values per K/V head in grouped-query models)
HeadKind = Literal["z", "q", "k", "v"]
AblationMethod = Literal["zero", "mean"]


class LogitDiff:
    """Metric: logit of ``answer`` minus logit of ``wrong`` (just the answer's logit when ``wrong`` is None)."""

    def __init__(self, answer: int | Tensor, wrong: int | Tensor | None = None):
        self.answer = torch.as_tensor(answer).long()
        self.wrong = None if wrong is None else torch.as_tensor(wrong).long()

    def _pick(self, logits: Tensor, ids: Tensor) -> Tensor:
        ids = ids.to(logits.device)
        if ids.ndim == 0:
            return logits[..., ids]
        return logits.gather(-1, ids.expand(logits.shape[:-1])[..., None]).squeeze(-1)

    def __call__(self, logits: Float[Tensor, "... batch d_vocab"]) -> Float[Tensor, "... batch"]:
        out = self._pick(logits, self.answer)
        return out if self.wrong is None else out - self._pick(logits, self.wrong)


class PatchResult(NamedTuple):
    """The metric after each patch, with the clean and corrupted runs' metric for reference."""

    kind: PatchKind
    #: metric of each patched run, averaged over the prompts: ``[layer pos]`` (per position),
    #: ``[layer head]`` (heads), ``[layer pos head]`` (heads per position) or ``[layer 1]`` (whole
    #: activation at each layer)
    scores: Float[Tensor, "layer ..."]
    clean: float
    corrupt: float

    @property
    def normalized(self) -> Float[Tensor, "layer ..."]:
        """``(patched - corrupt) / (clean - corrupt)``: 1 where the patch restores the clean answer, 0 where it does
        nothing.

        Undefined (an InputError) when the clean and corrupted runs give the same metric, e.g. identical prompts."""
        if self.clean == self.corrupt:
            raise InputError(
                f"the clean and corrupted runs give the same metric ({self.clean:.4g}), so the fraction a patch "
                "restores is undefined; give a corrupted prompt that changes the answer (or read the raw scores)"
            )
        return (self.scores - self.corrupt) / (self.clean - self.corrupt)


class AblationResult(NamedTuple):
    """The metric with each component ablated, beside the unablated metric."""

    kind: PatchKind
    method: AblationMethod
    #: ``[layer head]`` for heads (``z``), ``[layer 1]`` for MLP or attention outputs
    scores: Float[Tensor, "layer col"]
    baseline: float

    @property
    def effect(self) -> Float[Tensor, "layer col"]:
        """Change of the metric caused by the ablation (negative: the component helped)."""
        return self.scores - self.baseline


def _tokens_and_mask(model: HookedGPT, tokens: Tensor | Batch) -> tuple[Tensor, Tensor | None]:
    """Return checked token ids and their attention mask (None when nothing is padding)."""
    tokens, mask = padding.unpack(tokens, None)
    tokens = model.check_tokens(tokens)
    return tokens, padding.check_attention_mask(mask, tokens)


def _check_pair(model: HookedGPT, clean: Tensor, corrupt: Tensor) -> tuple[Tensor, Tensor]:
    clean, corrupt, mask = _check_padded_pair(model, clean, corrupt)
    if mask is not None:
        raise InputError("this analysis takes prompts of one length, not a padded batch; run each length group apart")
    return clean, corrupt


def _check_padded_pair(model: HookedGPT, clean: Tensor | Batch, corrupt: Tensor | Batch
                       ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Return the clean and corrupted token ids and their common attention mask (None: no padding)."""
    (clean, clean_mask), (corrupt, corrupt_mask) = _tokens_and_mask(model, clean), _tokens_and_mask(model, corrupt)
    if clean.shape != corrupt.shape:
        raise InputError(f"clean tokens {tuple(clean.shape)} ({clean.shape[0]} prompt(s) of {clean.shape[-1]} "
                         f"tokens) and corrupted tokens {tuple(corrupt.shape)} ({corrupt.shape[0]} of "
                         f"{corrupt.shape[-1]}) differ in shape; patching pairs positions one to one, so pick prompts "
                         "of the same token length")
    same = (clean_mask is None and corrupt_mask is None) or (
        clean_mask is not None and corrupt_mask is not None and torch.equal(clean_mask, corrupt_mask))
    if not same:
        raise InputError("the clean and corrupted prompts are padded differently; patching pairs positions one to "
                         "one, so each clean prompt and its corrupted twin need the same token length")
    return clean, corrupt, clean_mask


def _at_answer(x: Float[Tensor, "batch pos ..."], answer_pos: int, mask: Tensor | None) -> Float[Tensor, "batch ..."]:
    """``x`` at the answer position; ``-1`` in a padded batch is each row's last real token."""
    if mask is not None and answer_pos == -1:
        return padding.gather_last(x, mask)
    return x[:, answer_pos]


def _cache(model: HookedGPT, tokens: Tensor, kinds: tuple[str, ...], answer_pos: int, metric: Metric,
           mask: Tensor | None = None):
    names = [act_name(k, i) for i in range(model.cfg.n_layers) for k in kinds]
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, names_filter=names, attention_mask=mask)
    return cache, float(metric(_at_answer(logits, answer_pos, mask)).float().mean())


def _run_variants(
    model: HookedGPT,
    layer: int,
    resid: Float[Tensor, "batch pos d_model"],
    n_variants: int,
    answer_pos: int,
    metric: Metric,
    edit: Callable[[Tensor, Tensor], Tensor] | None,
    hook: str | None,
    chunk: int,
    mask: Tensor | None = None,
) -> Float[Tensor, " variant"]:
    """Return the mean metric of ``n_variants`` runs from block ``layer``, each with its own edit.

    ``edit(act, variant_ids)`` gets the activation at ``hook`` for a stack of variants
    (``[n*batch ...]``, variant-major) and returns it edited; with ``hook=None`` it edits the
    residual stream entering block ``layer``.
    """
    B = resid.shape[0]
    out = []
    per_chunk = max(1, chunk // B)
    for lo in range(0, n_variants, per_chunk):
        ids = torch.arange(lo, min(lo + per_chunk, n_variants))
        x = resid.repeat(len(ids), 1, 1)
        x_mask = None if mask is None else mask.repeat(len(ids), 1)
        hooks = []
        if hook is None:
            x = edit(x, ids)
        else:
            hooks = [(hook, lambda act, hook, ids=ids: edit(act, ids))]
        with torch.no_grad(), model.hooks(hooks):
            final = model.run_blocks(x, start=layer, attention_mask=x_mask)
            logits = model.unembed_resid(_at_answer(final, answer_pos, x_mask))
        out.append(metric(logits.view(len(ids), B, -1)).float().mean(-1))
    return torch.cat(out)


def _positions_edit(source: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Variant ``i`` takes position ``i`` from ``source`` (``[batch pos ...]``)."""
    def edit(act: Tensor, ids: Tensor) -> Tensor:
        act = act.clone(memory_format=torch.contiguous_format)
        view = act.view(len(ids), source.shape[0], *act.shape[1:])
        view[torch.arange(len(ids)), :, ids] = source[:, ids].transpose(0, 1).to(act)
        return act
    return edit


def _whole_edit(source: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    def edit(act: Tensor, ids: Tensor) -> Tensor:
        return source.to(act).repeat(len(ids), *([1] * (act.ndim - 1)))
    return edit


def _heads_edit(source: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Variant ``i`` takes head ``i``'s ``z`` (``[batch pos head d_head]``) from ``source``, at every position."""
    def edit(act: Tensor, ids: Tensor) -> Tensor:
        act = act.clone(memory_format=torch.contiguous_format)
        view = act.view(len(ids), source.shape[0], *act.shape[1:])  # [v batch pos head d_head]
        view[torch.arange(len(ids)), :, :, ids] = source[:, :, ids].permute(2, 0, 1, 3).to(act)
        return act
    return edit


def _positions_heads_edit(source: Tensor) -> Callable[[Tensor, Tensor], Tensor]:
    """Variant ``i`` takes (position ``i // head``, head ``i % head``) of ``source`` (``[batch pos head d_head]``)."""
    n_heads = source.shape[2]

    def edit(act: Tensor, ids: Tensor) -> Tensor:
        act = act.clone(memory_format=torch.contiguous_format)
        view = act.view(len(ids), source.shape[0], *act.shape[1:])  # [v batch pos head d_head]
        pos, head = ids // n_heads, ids % n_heads
        view[torch.arange(len(ids)), :, pos, head] = source[:, pos, head].transpose(0, 1).to(act)
        return act
    return edit


def _layers(model: HookedGPT, layers: list[int] | None) -> list[int]:
    n = model.cfg.n_layers
    layers = list(range(n)) if layers is None else list(layers)
    bad = [i for i in layers if not 0 <= i < n]
    if bad:
        raise InputError(f"layers {bad} are outside [0, {n})")
    return layers


@torch.no_grad()
def patch_residual(
    model: HookedGPT,
    clean: Int[Tensor, "batch pos"] | Batch,
    corrupt: Int[Tensor, "batch pos"] | Batch,
    metric: Metric,
    per_position: bool = True,
    answer_pos: int = -1,
    layers: list[int] | None = None,
    chunk: int = 256,
) -> PatchResult:
    """Return the metric after patching the clean residual stream (``resid_pre``) into the corrupted run.

    ``per_position``: one patch per layer and position (``scores [layer pos]``); otherwise the whole
    residual stream of each layer (``scores [layer 1]``, which equals the clean metric).
    Rows follow ``layers`` (default: every block).
    """
    clean, corrupt, mask = _check_padded_pair(model, clean, corrupt)
    clean_cache, clean_m = _cache(model, clean, ("resid_pre",), answer_pos, metric, mask)
    corrupt_cache, corrupt_m = _cache(model, corrupt, ("resid_pre",), answer_pos, metric, mask)
    rows = []
    for layer in _layers(model, layers):
        name = act_name("resid_pre", layer)
        source, base = clean_cache[name], corrupt_cache[name]
        n_var = clean.shape[1] if per_position else 1
        edit = _positions_edit(source) if per_position else _whole_edit(source)
        rows.append(_run_variants(model, layer, base, n_var, answer_pos, metric, edit, None, chunk, mask))
    return PatchResult("resid_pre", torch.stack(rows), clean_m, corrupt_m)


@torch.no_grad()
def patch_outputs(
    model: HookedGPT,
    clean: Int[Tensor, "batch pos"] | Batch,
    corrupt: Int[Tensor, "batch pos"] | Batch,
    metric: Metric,
    kind: Literal["attn_out", "mlp_out"] = "mlp_out",
    per_position: bool = True,
    answer_pos: int = -1,
    chunk: int = 256,
) -> PatchResult:
    """Return the metric after patching each layer's clean attention or MLP output into the corrupted
    run, per position (``[layer pos]``) or whole (``[layer 1]``)."""
    if kind == "mlp_out" and model.cfg.attn_only:
        raise InputError("this model is attention-only: it has no MLP outputs to patch; use kind='attn_out'")
    if kind not in ("attn_out", "mlp_out"):
        raise InputError(f"kind={kind!r} is not one of 'attn_out', 'mlp_out'")
    clean, corrupt, mask = _check_padded_pair(model, clean, corrupt)
    clean_cache, clean_m = _cache(model, clean, (kind,), answer_pos, metric, mask)
    corrupt_cache, corrupt_m = _cache(model, corrupt, ("resid_pre",), answer_pos, metric, mask)
    rows = []
    for layer in range(model.cfg.n_layers):
        source = clean_cache[act_name(kind, layer)]
        n_var = clean.shape[1] if per_position else 1
        edit = _positions_edit(source) if per_position else _whole_edit(source)
        base = corrupt_cache[act_name("resid_pre", layer)]
        rows.append(_run_variants(model, layer, base, n_var, answer_pos, metric, edit, act_name(kind, layer), chunk,
                                  mask))
    return PatchResult(kind, torch.stack(rows), clean_m, corrupt_m)


@torch.no_grad()
def patch_heads(
    model: HookedGPT,
    clean: Int[Tensor, "batch pos"] | Batch,
    corrupt: Int[Tensor, "batch pos"] | Batch,
    metric: Metric,
    answer_pos: int = -1,
    chunk: int = 256,
    kind: HeadKind = "z",
    per_position: bool = False,
    layers: list[int] | None = None,
) -> PatchResult:
    """Return the metric after patching each head's clean activation into the corrupted run.

    ``kind``: the head's output ``z`` (default), or its query ``q``, key ``k`` or value ``v`` (keys
    and values per K/V head in grouped-query models: patching one changes every query head sharing
    it). Each head is patched at every position at once (``scores [layer head]``), or with
    ``per_position`` at one position at a time (``scores [layer pos head]``). Rows follow ``layers``
    (default: every block)."""
    if kind not in ("z", "q", "k", "v"):
        raise InputError(f"kind={kind!r} is not one of 'z', 'q', 'k', 'v'")
    clean, corrupt, mask = _check_padded_pair(model, clean, corrupt)
    layers = _layers(model, layers)
    names = [act_name(kind, layer) for layer in layers]
    logits, clean_cache = model.run_with_cache(clean, names_filter=names, attention_mask=mask)
    clean_m = float(metric(_at_answer(logits, answer_pos, mask)).float().mean())
    corrupt_cache, corrupt_m = _cache(model, corrupt, ("resid_pre",), answer_pos, metric, mask)
    rows = []
    for layer, name in zip(layers, names):
        source = clean_cache[name]
        n_heads = source.shape[2]
        n_var = n_heads * (clean.shape[1] if per_position else 1)
        edit = _positions_heads_edit(source) if per_position else _heads_edit(source)
        base = corrupt_cache[act_name("resid_pre", layer)]
        row = _run_variants(model, layer, base, n_var, answer_pos, metric, edit, name, chunk, mask)
        rows.append(row.view(clean.shape[1], n_heads) if per_position else row)
    return PatchResult(kind, torch.stack(rows), clean_m, corrupt_m)


@torch.no_grad()
def ablate(
    model: HookedGPT,
    tokens: Int[Tensor, "batch pos"] | Batch,
    metric: Metric,
    kind: Literal["z", "attn_out", "mlp_out"] = "z",
    method: AblationMethod = "zero",
    reference: Int[Tensor, "batch pos"] | Batch | None = None,
    answer_pos: int = -1,
    chunk: int = 256,
) -> AblationResult:
    """Return the metric with each head (``kind="z"``, ``[layer head]``) or each layer's attention or
    MLP output (``[layer 1]``) replaced by zero or by its mean.

    The mean is taken over the batch and positions of ``reference`` (default: ``tokens``), so it is
    the component's typical output, independent of position.
    """
    if method not in ("zero", "mean"):
        raise InputError(f"method={method!r} is not one of 'zero', 'mean'")
    if kind == "mlp_out" and model.cfg.attn_only:
        raise InputError("this model is attention-only: it has no MLP outputs to ablate")
    tokens, mask = _tokens_and_mask(model, tokens)
    cache, base_m = _cache(model, tokens, ("resid_pre", kind), answer_pos, metric, mask)
    ref_mask = mask
    if method == "mean" and reference is not None:
        reference, ref_mask = _tokens_and_mask(model, reference)
        ref_cache, _ = _cache(model, reference, (kind,), answer_pos, metric, ref_mask)
    else:
        ref_cache = cache
    rows = []
    for layer in range(model.cfg.n_layers):
        name = act_name(kind, layer)
        act = cache[name]
        if method == "zero":
            source = torch.zeros_like(act)
        else:
            source = padding.masked_mean(ref_cache[name].float(), ref_mask).to(act).expand_as(act)
        base = cache[act_name("resid_pre", layer)]
        if kind == "z":
            rows.append(_run_variants(model, layer, base, model.cfg.n_heads, answer_pos, metric,
                                      _heads_edit(source), name, chunk, mask))
        else:
            rows.append(_run_variants(model, layer, base, 1, answer_pos, metric, _whole_edit(source), name, chunk,
                                      mask))
    return AblationResult(kind, method, torch.stack(rows), base_m)


# --------------------------------------------------------------------------------------- reference


@torch.no_grad()
def patch_residual_naive(
    model: HookedGPT, clean: Tensor, corrupt: Tensor, metric: Metric, answer_pos: int = -1
) -> Float[Tensor, "layer pos"]:
    """Return the per-position residual patching sweep the way TransformerLens' patching module does
    it: one full forward pass from the embedding per layer and position. The benchmarks' baseline
    and a test oracle."""
    clean, corrupt, mask = _check_padded_pair(model, clean, corrupt)
    if mask is not None:
        raise InputError("patch_residual_naive takes prompts of one length; use patch_residual for a padded batch")
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("hook_resid_pre"))
    out = torch.zeros(model.cfg.n_layers, clean.shape[1])
    for layer in range(model.cfg.n_layers):
        name = act_name("resid_pre", layer)
        for p in range(clean.shape[1]):
            def hook(x, hook, p=p, name=name):
                x = x.clone()
                x[:, p] = cache[name][:, p]
                return x
            logits = model.run_with_hooks(corrupt, fwd_hooks=[(name, hook)])
            out[layer, p] = metric(logits[:, answer_pos]).float().mean()
    return out
