"""ActivationCache: the activations of one forward pass, and the standard ways to slice them.

Residual-stream stacks come back as a :class:`Stack` (a tensor with a leading ``component``
axis plus one label per component). Norms are not folded into the weights, so
:meth:`ActivationCache.apply_ln_to_stack` applies the cached scale *and* the norm's weight;
the norm's bias is a constant that belongs to no component. Hence, for the final position of
any prompt and any token ``t``::

    logit[t] == cache.logit_attrs(cache.decompose_resid().tensor, t).sum(0) + cache.logit_constant(t)
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, NamedTuple

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from workbench import padding
from workbench.errors import HookError, InputError
from workbench.hooks import NameFilter
from workbench.names import act_name, layer_of
from workbench.padding import Batch, gather_last, masked_mean

if TYPE_CHECKING:  # model.py reaches this module only at call time (HookedGPT.run_with_cache)
    from workbench.model import HookedGPT


class Stack(NamedTuple):
    """Residual-stream pieces stacked on a leading axis, with a label for each."""

    #: ``[component batch pos d_model]``
    tensor: Tensor
    labels: list[str]


class ActivationCache:
    """A mapping from hook names to cached activations, tied to the model that produced them."""

    def __init__(self, store: dict[str, Tensor], model: HookedGPT, attention_mask: Tensor | None = None):
        self.store = store
        self.model = model
        #: ``[batch pos]``, True at real tokens, for a padded batch (None: every position is real);
        #: see :meth:`last_real` and :meth:`mean_over_real`
        self.attention_mask = attention_mask

    # -- mapping behaviour --------------------------------------------------------------------

    def __getitem__(self, key: str | tuple) -> Tensor:
        """``cache["blocks.0.hook_resid_pre"]``, or TransformerLens' short form ``cache["resid_pre", 0]``."""
        name = act_name(*key) if isinstance(key, tuple) else act_name(key)
        try:
            return self.store[name]
        except KeyError:
            if name in self.model.hook_dict:
                raise HookError(f"{name!r} was not cached; include it in run_with_cache's names_filter") from None
            self.model.hook_point(name)  # raises with the nearest names
            raise

    def __contains__(self, name: str) -> bool:
        return name in self.store

    def __iter__(self) -> Iterator[str]:
        return iter(self.store)

    def __len__(self) -> int:
        return len(self.store)

    def keys(self):
        return self.store.keys()

    def items(self):
        return self.store.items()

    def to(self, device=None, dtype=None) -> ActivationCache:
        store = {k: v.to(device=device, dtype=dtype) for k, v in self.store.items()}
        return ActivationCache(store, self.model, self.attention_mask)

    # -- padded batches ---------------------------------------------------------------------------

    def last_real(self, key: str | tuple) -> Tensor:
        """Return an activation ``[batch pos ...]`` at each row's last real token: ``[batch ...]``."""
        return gather_last(self[key], self.attention_mask)

    def mean_over_real(self, key: str | tuple) -> Tensor:
        """Return the mean of an activation ``[batch pos ...]`` over every real token (padding left out)."""
        return masked_mean(self[key], self.attention_mask)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self.store)} activations)"

    # -- residual stream --------------------------------------------------------------------------

    def _n_layers(self, layer: int | None) -> int:
        n = self.model.cfg.n_layers
        if layer is None:
            return n
        if not 0 <= layer <= n:
            raise HookError(f"layer={layer} is outside [0, {n}]")
        return layer

    def accumulated_resid(self, layer: int | None = None, incl_mid: bool = False, apply_ln: bool = False) -> Stack:
        """Return the residual stream before each block up to ``layer`` (all blocks and the final
        resid_post when ``layer`` is None); ``incl_mid`` adds each block's resid_mid."""
        n = self._n_layers(layer)
        parts, labels = [], []
        for i in range(n):
            parts.append(self[act_name("resid_pre", i)])
            labels.append(f"{i}_pre")
            if incl_mid and not self.model.cfg.attn_only:
                parts.append(self[act_name("resid_mid", i)])
                labels.append(f"{i}_mid")
        if layer is None or layer == self.model.cfg.n_layers:
            parts.append(self[act_name("resid_post", self.model.cfg.n_layers - 1)])
            labels.append("final_post")
        stack = torch.stack(parts)
        return Stack(self.apply_ln_to_stack(stack) if apply_ln else stack, labels)

    def decompose_resid(self, layer: int | None = None, incl_embeds: bool = True, apply_ln: bool = False) -> Stack:
        """Return the additive pieces of the residual stream before ``layer``: embeddings, then each
        block's attention and MLP outputs. They sum to ``resid_pre`` of ``layer`` (the final
        resid_post when ``layer`` is None)."""
        n = self._n_layers(layer)
        parts, labels = [], []
        if incl_embeds:
            parts.append(self["hook_embed"])
            labels.append("embed")
            if "hook_pos_embed" in self.model.hook_dict:
                parts.append(self["hook_pos_embed"])
                labels.append("pos_embed")
        for i in range(n):
            parts.append(self[act_name("attn_out", i)])
            labels.append(f"{i}_attn_out")
            if not self.model.cfg.attn_only:
                parts.append(self[act_name("mlp_out", i)])
                labels.append(f"{i}_mlp_out")
        stack = torch.stack(torch.broadcast_tensors(*parts))
        return Stack(self.apply_ln_to_stack(stack) if apply_ln else stack, labels)

    def head_results(self, layer: int) -> Float[Tensor, "batch pos head d_model"]:
        """Return each head's write into the residual stream (``z @ W_O``; without ``b_O``)."""
        name = act_name("result", layer)
        if name in self.store:
            return self.store[name]
        z = self[act_name("z", layer)]
        W_O = self.model.blocks[layer].attn.W_O
        return torch.einsum("bphd,hdm->bphm", z, W_O.to(device=z.device, dtype=z.dtype))

    def stack_head_results(self, layer: int | None = None, apply_ln: bool = False) -> Stack:
        """Return every head's output before ``layer`` as components labelled ``L{l}H{h}``.

        The attention bias ``b_O`` belongs to no head: the heads of layer ``l`` plus
        ``model.blocks[l].attn.b_O`` sum to that layer's ``hook_attn_out``."""
        n = self._n_layers(layer)
        parts, labels = [], []
        for i in range(n):
            parts.append(self.head_results(i).permute(2, 0, 1, 3))
            labels += [f"L{i}H{h}" for h in range(self.model.cfg.n_heads)]
        stack = torch.cat(parts) if parts else torch.empty(0)
        return Stack(self.apply_ln_to_stack(stack) if apply_ln and parts else stack, labels)

    # -- norms and logits -----------------------------------------------------------------------------

    def _scale(self, layer: int | None, mlp_input: bool) -> Tensor:
        if layer is None or layer == self.model.cfg.n_layers:
            return self["ln_final.hook_scale"]
        return self[act_name("scale", layer, norm="ln2" if mlp_input else "ln1")]

    def _norm(self, layer: int | None, mlp_input: bool):
        if layer is None or layer == self.model.cfg.n_layers:
            return self.model.ln_final
        block = self.model.blocks[layer]
        return block.ln2 if mlp_input else block.ln1

    def apply_ln_to_stack(
        self,
        stack: Float[Tensor, "component batch pos d_model"],
        layer: int | None = None,
        mlp_input: bool = False,
    ) -> Float[Tensor, "component batch pos d_model"]:
        """Return each component as the norm at ``layer`` (the final norm when None) treats it:
        centred (LayerNorm), divided by the cached scale of the whole stream, times the norm's weight.

        This is linear in the components, so they still add up: ``sum == norm(resid) - bias``.
        """
        norm = self._norm(layer, mlp_input)
        scale = self._scale(layer, mlp_input).to(stack.dtype)
        if norm.kind == "layernorm":
            stack = stack - stack.mean(-1, keepdim=True)
        return stack / scale * norm.w.to(stack.dtype)

    def _token_directions(self, tokens: int | Tensor, incorrect_tokens: int | Tensor | None) -> Tensor:
        W_U = self.model.W_U
        directions = W_U[:, torch.as_tensor(tokens, device=W_U.device)]
        if incorrect_tokens is not None:
            directions = directions - W_U[:, torch.as_tensor(incorrect_tokens, device=W_U.device)]
        return directions  # [d_model] or [d_model batch]

    def logit_attrs(
        self,
        stack: Float[Tensor, "component batch pos d_model"],
        tokens: int | Tensor,
        incorrect_tokens: int | Tensor | None = None,
        pos: int = -1,
    ) -> Float[Tensor, "component batch"]:
        """Return each component's direct contribution to the logit of ``tokens`` (or to the logit
        difference ``tokens - incorrect_tokens``) at position ``pos``, through the final norm.

        ``tokens`` is one id or one id per batch row. The components plus :meth:`logit_constant`
        sum to the model's logit (difference)."""
        resid = self.apply_ln_to_stack(stack)[:, :, pos]  # [component batch d_model]
        directions = self._token_directions(tokens, incorrect_tokens).to(resid.dtype)
        if directions.ndim == 1:
            return resid @ directions
        return torch.einsum("cbd,db->cb", resid, directions)

    def logit_constant(
        self, tokens: int | Tensor, incorrect_tokens: int | Tensor | None = None
    ) -> Float[Tensor, " batch"] | Tensor:
        """Return what no component owns: the final norm's bias through W_U, plus b_U."""
        directions = self._token_directions(tokens, incorrect_tokens)
        const = torch.zeros(directions.shape[1:], dtype=directions.dtype, device=directions.device)
        if self.model.ln_final.b is not None:
            const = const + self.model.ln_final.b @ directions
        b_U = self.model.unembed.b_U
        if b_U is not None:
            const = const + b_U[torch.as_tensor(tokens, device=b_U.device)]
            if incorrect_tokens is not None:
                const = const - b_U[torch.as_tensor(incorrect_tokens, device=b_U.device)]
        return const


def run_with_cache(
    model: HookedGPT,
    tokens: Int[Tensor, "batch pos"] | Batch,
    names_filter: NameFilter = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    stop_at_layer: int | None = None,
    incl_grad: bool = False,
    attention_mask: Bool[Tensor, "batch pos"] | Int[Tensor, "batch pos"] | None = None,
) -> tuple[Tensor, ActivationCache]:
    """Return ``(output, cache)``: logits (or, with ``stop_at_layer=L``, ``blocks.L.hook_resid_pre``)
    and an :class:`ActivationCache` of the hooks ``names_filter`` selects. ``model.run_with_cache`` calls it.

    ``names_filter=None`` caches every hook except the opt-in ``attn.hook_result`` (a
    ``[batch pos head d_model]`` tensor per layer); name it to get it. Stored tensors are
    detached and the pass runs without autograd unless ``incl_grad=True``. ``device`` and
    ``dtype`` say where and how to keep the stored activations.

    With ``incl_grad=True`` the activations keep their graph and every backward pass through the
    output (``metric(out).backward()``) stores the gradient at each cached hook as
    ``cache[name + "_grad"]``, as TransformerLens does.
    """
    tokens, attention_mask = padding.unpack(tokens, attention_mask)
    tokens = model.check_tokens(tokens)
    mask = model.key_mask(tokens, attention_mask)  # None unless some position is padding
    if names_filter is None:
        names_filter = lambda name: not name.endswith("hook_result")  # noqa: E731
    store, fwd_hooks = model.caching_hooks(names_filter, device, dtype, incl_grad)
    bwd_hooks = model.grad_caching_hooks(store, names_filter, device, dtype) if incl_grad else []
    n_layers = model.cfg.n_layers
    if stop_at_layer is not None:
        if not -n_layers <= stop_at_layer <= n_layers:
            raise InputError(f"stop_at_layer={stop_at_layer} is outside [-{n_layers}, {n_layers}]")
        if stop_at_layer < 0:  # as in Python slicing: -1 stops before the last block
            stop_at_layer += n_layers
        # hooks past the stopping layer never fire; keep them out of the cache
        fwd_hooks = [(n, f) for n, f in fwd_hooks if _runs_before(n, stop_at_layer)]
        bwd_hooks = [(n, f) for n, f in bwd_hooks if _runs_before(n, stop_at_layer)]
    with torch.set_grad_enabled(incl_grad and torch.is_grad_enabled()), model.hooks(fwd_hooks, bwd_hooks):
        if stop_at_layer is None:
            out = model(tokens, attention_mask=mask)
        else:
            out = model.run_blocks(model.embed_tokens(tokens, 0, mask), stop=stop_at_layer, attention_mask=mask)
    # the cache remembers where the real tokens are, for analyses that average over positions
    return out, ActivationCache(store, model, mask)


def _runs_before(hook_name: str, stop: int) -> bool:
    """Return whether a hook fires when the forward pass stops before block ``stop``."""
    layer = layer_of(hook_name)
    return layer < stop if layer is not None else hook_name in ("hook_embed", "hook_pos_embed")
