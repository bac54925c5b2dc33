"""Hook names, built in one place.

``act_name("resid_pre", 3)`` gives ``"blocks.3.hook_resid_pre"``; the short kinds are those of
TransformerLens (``resid_pre resid_mid resid_post attn_out mlp_out q k v rot_q rot_k
attn_scores pattern z result pre pre_linear post scale normalized``), plus ``embed``,
``pos_embed`` and the final norm's ``ln_final.hook_scale`` / ``ln_final.hook_normalized``.
"""

from __future__ import annotations

from typing import Literal

BLOCK = {"resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"}
ATTN = {"q", "k", "v", "rot_q", "rot_k", "attn_scores", "pattern", "z", "result"}
MLP = {"pre", "pre_linear", "post"}
NORM = {"scale", "normalized"}


def act_name(kind: str, layer: int | None = None, norm: Literal["ln1", "ln2", "ln_final"] | None = None) -> str:
    """Return the full hook name for a short kind and a layer (``norm`` picks ln1/ln2 for norm hooks)."""
    if kind.startswith(("blocks.", "hook_", "ln_final.", "unembed.")):
        return kind  # already a full name
    if kind in ("embed", "pos_embed"):
        return f"hook_{kind}"
    if kind in NORM and (norm == "ln_final" or layer is None):
        return f"ln_final.hook_{kind}"
    if layer is None:
        raise ValueError(f"hook kind {kind!r} needs a layer")
    if kind in BLOCK:
        return f"blocks.{layer}.hook_{kind}"
    if kind in ATTN:
        return f"blocks.{layer}.attn.hook_{kind}"
    if kind in MLP:
        return f"blocks.{layer}.mlp.hook_{kind}"
    if kind in NORM:
        return f"blocks.{layer}.{norm or 'ln1'}.hook_{kind}"
    raise ValueError(f"unknown hook kind {kind!r}; known: {sorted(BLOCK | ATTN | MLP | NORM | {'embed', 'pos_embed'})}")


def layer_of(name: str) -> int | None:
    """Return the block index in a hook name, or None for hooks outside the blocks."""
    if name.startswith("blocks."):
        return int(name.split(".")[1])
    return None
