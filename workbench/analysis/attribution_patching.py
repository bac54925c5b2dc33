"""Attribution patching (AtP): activation patching's effects estimated from one backward pass.

Patching a node ``n`` from a source run into a base run changes a metric by about
``(a_n(source) - a_n(base)) . dm/da_n(base)``, a first-order Taylor expansion (Nanda 2023; Syed et
al. 2023). Two forward passes (source and base) and one backward pass give the estimate for every
node at once: the residual stream per (layer, position), every head's output (``hook_z``) and its
query, key and value inputs, and every MLP neuron, per position.

Direction: ``"denoise"`` (the default, as :mod:`workbench.analysis.patching`) estimates patching
the clean activation into the corrupted run (base = corrupted, gradients there); ``"noise"`` the
corrupted activation into the clean run.

AtP* (Kramar et al. 2024) fixes the worst failure of the linear estimate: a query or key whose
patch moves a saturated attention softmax has a near-zero gradient yet a large effect. With
``qk_fix=True`` the attention pattern is recomputed exactly for each query and key patch and only
the step from the pattern to the metric is linearized.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal, NamedTuple

import torch
from jaxtyping import Float, Int
from torch import Tensor

from workbench.analysis.patching import Metric, PatchResult, _check_pair
from workbench.errors import InputError
from workbench.names import act_name

if TYPE_CHECKING:
    from workbench.model import HookedGPT

Direction = Literal["denoise", "noise"]


@dataclass(frozen=True)
class AtPConfig:
    """How attribution patching estimates its effects."""

    #: ``denoise``: clean activations into the corrupted run; ``noise``: corrupted into the clean run
    direction: Direction = "denoise"
    #: AtP*: recompute the attention softmax for query and key patches instead of linearizing it
    qk_fix: bool = False
    #: position whose logits the metric reads
    answer_pos: int = -1


class AtPResult(NamedTuple):
    """Estimated change of the (batch-mean) metric from patching each node alone, base -> source.

    Each entry estimates ``metric(base with node n from source) - metric(base)``."""

    config: AtPConfig
    #: the residual stream entering each block, per position
    resid: Float[Tensor, "layer pos"]
    #: each head's output (``hook_z``), per position
    z: Float[Tensor, "layer pos head"]
    #: each head's query (``hook_q``), per position
    q: Float[Tensor, "layer pos head"]
    #: each key/value head's key and value (``hook_k``, ``hook_v``; grouped heads are shared), per position
    k: Float[Tensor, "layer pos kv_head"]
    v: Float[Tensor, "layer pos kv_head"]
    #: every MLP neuron (``mlp.hook_post``), per position; ``d_mlp = 0`` for attention-only models
    neurons: Float[Tensor, "layer pos d_mlp"]
    #: each layer's attention and MLP output (``hook_attn_out``, ``hook_mlp_out``; zeros without MLPs), per position
    attn_out: Float[Tensor, "layer pos"]
    mlp_out: Float[Tensor, "layer pos"]
    #: metric of the clean and the corrupted run (batch means)
    clean: float
    corrupt: float

    @property
    def heads(self) -> Float[Tensor, "layer head"]:
        """Each head's output patched at every position at once (first order: the sum over positions),
        comparable with :func:`workbench.analysis.patching.patch_heads` minus its base metric."""
        return self.z.sum(1)


def metric_value(metric: Metric, logits: Float[Tensor, "batch d_vocab"]) -> Float[Tensor, ""]:
    """Return the metric of answer-position logits as one number (the mean over prompts).

    A metric gives one number per prompt (``[batch]``) or one number; anything else is an error
    that names the shape, since a gradient needs a scalar."""
    values = metric(logits)
    if not isinstance(values, Tensor):
        raise InputError(f"the metric returned a {type(values).__name__}; it must return a tensor: one number per "
                         f"prompt [batch={logits.shape[0]}] or a scalar")
    if values.ndim > 1 or (values.ndim == 1 and values.shape[0] != logits.shape[0]):
        raise InputError(f"the metric returned shape {tuple(values.shape)}; expected one number per prompt "
                         f"[{logits.shape[0]}] or a scalar (reduce over any other axis inside the metric)")
    return values.float().mean()


def _names(model: HookedGPT, kinds: tuple[str, ...]) -> list[str]:
    return [act_name(kind, layer) for layer in range(model.cfg.n_layers) for kind in kinds]


def _kinds(model: HookedGPT, qk_fix: bool) -> tuple[str, ...]:
    kinds = ("resid_pre", "q", "k", "v", "z", "attn_out") + (() if model.cfg.attn_only else ("post", "mlp_out"))
    if qk_fix:
        rotary = model.cfg.positional == "rotary"
        kinds += ("rot_q", "rot_k") if rotary else ()
        kinds += ("attn_scores", "pattern")
    return kinds


def attribution_patch(
    model: HookedGPT,
    clean: Int[Tensor, "batch pos"],
    corrupt: Int[Tensor, "batch pos"],
    metric: Metric,
    config: AtPConfig = AtPConfig(),
) -> AtPResult:
    """Return AtP's estimate of the effect of patching every node alone (see the module docstring).

    ``metric`` maps answer-position logits ``[batch d_vocab]`` to one number per prompt; the
    estimates are for its mean over the batch of prompt pairs."""
    if config.direction not in ("denoise", "noise"):
        raise InputError(f"direction={config.direction!r} is not one of 'denoise', 'noise'")
    clean, corrupt = _check_pair(model, clean, corrupt)
    source, base = (clean, corrupt) if config.direction == "denoise" else (corrupt, clean)
    names = _names(model, _kinds(model, config.qk_fix))
    with torch.no_grad():
        src_logits, src_cache = model.run_with_cache(source, names_filter=names)
        src_m = float(metric_value(metric, src_logits[:, config.answer_pos]))
    with torch.enable_grad():
        # the gradients come from the backward hooks run_with_cache(incl_grad=True) attaches
        base_logits, base_cache = model.run_with_cache(base, names_filter=names, incl_grad=True)
        value = metric_value(metric, base_logits[:, config.answer_pos])
        grad_names = [n for n in names if not n.endswith(("hook_attn_scores", "hook_rot_q", "hook_rot_k"))]
        grads = torch.autograd.grad(value, [base_cache[n] for n in grad_names], allow_unused=True,
                                    materialize_grads=True)
    grad = dict(zip(grad_names, grads))
    base_m = float(value.detach())

    def estimate(kind: str, layer: int) -> Tensor:
        """Sum of (source - base) * gradient over the activation's last axis and the batch (the gradient
        is of the batch mean, so the sum over prompts is already the mean effect)."""
        name = act_name(kind, layer)
        diff = src_cache[name].float() - base_cache[name].detach().float()
        return (diff * grad[name].float()).sum(-1).sum(0)

    L = model.cfg.n_layers
    resid = torch.stack([estimate("resid_pre", i) for i in range(L)])
    z = torch.stack([estimate("z", i) for i in range(L)])
    if config.qk_fix:
        q, k = zip(*[_qk_star(model, i, src_cache, base_cache, grad) for i in range(L)])
        q, k = torch.stack(q), torch.stack(k)
    else:
        q = torch.stack([estimate("q", i) for i in range(L)])
        k = torch.stack([estimate("k", i) for i in range(L)])
    v = torch.stack([estimate("v", i) for i in range(L)])
    if model.cfg.attn_only:
        neurons = torch.zeros(L, clean.shape[1], 0)
    else:
        # neurons: each element of hook_post is one node; no sum over the last axis
        neurons = torch.stack([
            ((src_cache[act_name("post", i)].float() - base_cache[act_name("post", i)].detach().float())
             * grad[act_name("post", i)].float()).sum(0)
            for i in range(L)
        ])
    attn_out = torch.stack([estimate("attn_out", i) for i in range(L)])
    mlp_out = (torch.zeros_like(attn_out) if model.cfg.attn_only
               else torch.stack([estimate("mlp_out", i) for i in range(L)]))
    clean_m, corrupt_m = (src_m, base_m) if config.direction == "denoise" else (base_m, src_m)
    return AtPResult(config, resid.cpu(), z.cpu(), q.cpu(), k.cpu(), v.cpu(), neurons.cpu(), attn_out.cpu(),
                     mlp_out.cpu(), clean_m, corrupt_m)


def as_patch_result(result: AtPResult, kind: str):
    """AtP's estimates in the shape of an exact patching sweep (:class:`workbench.analysis.patching.PatchResult`):
    the base run's metric plus each node's estimated effect, so the same plots and normalisation apply."""
    est = {"resid_pre": result.resid, "attn_out": result.attn_out, "mlp_out": result.mlp_out, "z": result.heads}
    if kind not in est:
        raise InputError(f"kind={kind!r} is not one of {sorted(est)}")
    base = result.corrupt if result.config.direction == "denoise" else result.clean
    return PatchResult(kind, base + est[kind], result.clean, result.corrupt)


def _qk_star(model: HookedGPT, layer: int, src_cache, base_cache, grad) -> tuple[Tensor, Tensor]:
    """AtP*'s query and key estimates for one layer: ``[pos head]`` and ``[pos kv_head]``.

    For a query at position t the row t of the scores is recomputed with the source query; for a key
    at position s the column s with the source key (for every query head that reads it). The new
    softmax minus the old, dotted with the gradient at the pattern, is the estimate: exact through
    the softmax, linear after it."""
    cfg = model.cfg
    rotary = cfg.positional == "rotary"
    qn, kn = ("rot_q", "rot_k") if rotary else ("q", "k")
    q_src, k_src = src_cache[act_name(qn, layer)].float(), src_cache[act_name(kn, layer)].float()
    q_base = base_cache[act_name(qn, layer)].detach().float()
    k_base = base_cache[act_name(kn, layer)].detach().float()
    scores = base_cache[act_name("attn_scores", layer)].detach().float()  # [batch head q k], masked with -inf
    pattern = base_cache[act_name("pattern", layer)].detach().float()
    g_pattern = grad[act_name("pattern", layer)].float()
    group = cfg.n_heads // cfg.n_kv
    # repeat each key head for the query heads of its group: [batch pos head d_head]
    k_base_h, k_src_h = (t.repeat_interleave(group, dim=2) for t in (k_base, k_src))
    scale = 1 / math.sqrt(cfg.d_head)
    P = scores.shape[-1]
    causal = torch.ones(P, P, dtype=torch.bool, device=scores.device).tril()

    # queries: every row recomputed with the source query at that position
    new_rows = torch.einsum("bqhd,bkhd->bhqk", q_src, k_base_h) * scale
    new_rows = new_rows.masked_fill(~causal, float("-inf"))
    q_est = ((new_rows.softmax(-1) - pattern) * g_pattern).sum(-1).sum(0)  # [head q]

    # keys: for each key position s, column s recomputed with the source key
    new_cols = torch.einsum("bqhd,bkhd->bhqk", q_base, k_src_h) * scale  # [batch head q s]
    new_cols = new_cols.masked_fill(~causal, float("-inf"))
    idx = torch.arange(P, device=scores.device)
    variants = scores[:, :, :, None, :].repeat(1, 1, 1, P, 1)  # [batch head q s k]: variant s
    variants[:, :, :, idx, idx] = new_cols
    changed = (variants.softmax(-1) - pattern[:, :, :, None, :]) * g_pattern[:, :, :, None, :]
    k_est = changed.nan_to_num().sum((-1, 2)).sum(0)  # [head s]
    k_est = k_est.view(cfg.n_kv, group, P).sum(1)  # the query heads of a group share the key
    return q_est.T, k_est.T
