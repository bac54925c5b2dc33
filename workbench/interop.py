"""Moving a model between the workbench and TransformerLens 4.x, in one call each way.

``to_transformer_lens(model)`` gives a TransformerLens ``TransformerBridge`` over the same weights
and tokenizer, built offline from the model's own HF export (:func:`workbench.loading.export_hf`);
``from_transformer_lens(bridge)`` reads a bridge back into a :class:`~workbench.model.HookedGPT`
through the HF model it wraps. Both families convert (GPT-2 and Llama shaped configs). The hook
names are TransformerLens' own, so a cache from either side is indexed the same way.

TransformerLens is an optional dependency (the ``test`` extra installs it): without it these
functions say which package to install.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from workbench.errors import ConfigError, InputError
from workbench.loading import export_hf, from_hf_state_dict, to_hf
from workbench.model import HookedGPT
from workbench.tokenize import Tokenizer

if TYPE_CHECKING:  # pragma: no cover
    from transformer_lens.model_bridge import TransformerBridge

_EXTRA = ("TransformerLens 4.x is not installed: `pip install 'transformer-lens>=4.3,<5'` "
          "(or `pip install -e '.[test]'` in a checkout)")


def _bridge_class():
    try:
        from transformer_lens.model_bridge import TransformerBridge  # optional (test extra)
    except ImportError as exc:
        raise ConfigError(_EXTRA) from exc
    return TransformerBridge


@contextmanager
def _offline():
    """Keep transformers and the hub client off the network while the bridge boots from a local directory."""
    saved = {k: os.environ.get(k) for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    os.environ.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def to_transformer_lens(model: HookedGPT) -> TransformerBridge:
    """Return a TransformerLens 4.x ``TransformerBridge`` over a copy of ``model``'s weights and tokenizer.

    The model is exported to HF (``to_hf``) in a temporary directory, which the bridge reads its
    architecture and tokenizer from; the bridge then wraps the exported HF modules. The model needs
    a tokenizer (the bridge tokenizes strings): load one with it, or attach ``model.tokenizer``.
    """
    TransformerBridge = _bridge_class()
    if model.tokenizer is None:
        raise InputError("to_transformer_lens needs the model's tokenizer (the bridge is built with one); "
                         "load the model with its tokenizer or set model.tokenizer")
    import transformers  # optional dependency (test extra)

    hf = to_hf(model)  # a fresh HF model: the bridge wraps its modules in place
    with tempfile.TemporaryDirectory(prefix="workbench-tl-") as directory, _offline():
        export_hf(model, directory)
        tokenizer = transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
        bridge = TransformerBridge.boot_transformers(directory, hf_model=hf, tokenizer=tokenizer,
                                                     device=str(model.embed.W_E.device))
    return bridge


def _unwrapped_state_dict(hf) -> dict[str, Tensor]:
    """Return the HF model's own state dict from under the bridge's wrappers.

    The bridge replaces HF modules in place by components that keep the original as
    ``_original_component`` and add views of their own (split q/k/v, an ``lm_head.bias``); strip the
    wrapper names and keep exactly the keys the plain HF class has."""
    with torch.device("meta"):
        wanted = set(type(hf)(hf.config).state_dict())
    out: dict[str, Tensor] = {}
    extra: dict[str, Tensor] = {}
    for key, value in hf.state_dict().items():
        key = key.replace("._original_component", "")
        (out if key in wanted else extra)[key] = value.detach()
    bias = extra.get("lm_head.bias")
    if bias is not None and bool(bias.any()):
        raise InputError("the bridge's unembedding has a nonzero bias, which its HF model class cannot hold; "
                         "convert a bridge whose weights were not processed")
    return out


def from_transformer_lens(bridge: Any) -> HookedGPT:
    """Return a :class:`HookedGPT` with the weights and tokenizer of a TransformerLens ``TransformerBridge``.

    The bridge's wrapped HF model is converted by the workbench's HF loader (GPT-2 and Llama
    families), so any model TransformerLens booted from HF and the workbench can read converts.
    TransformerLens 3.x's ``HookedTransformer`` keeps no HF model and processes its weights on load
    (folded norms, centred writes); export it with ``model.state_dict()`` untouched by processing
    and load through HF instead.
    """
    hf = getattr(bridge, "original_model", None)
    if hf is None or not hasattr(hf, "config"):
        raise InputError(
            f"from_transformer_lens takes a TransformerLens 4.x TransformerBridge, got {type(bridge).__name__}; "
            "for a 3.x HookedTransformer, save its HF model (or load the same HF checkpoint) and use HookedGPT.from_hf")
    if getattr(bridge, "_weights_processed", False):
        raise InputError("this bridge's weights were processed (process_weights: folded norms, centred writes), so "
                         "they no longer match its HF model; convert a bridge booted without processing")
    tokenizer = getattr(bridge, "tokenizer", None)
    if tokenizer is not None and not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.from_hf(tokenizer)
    model = from_hf_state_dict(hf.config, _unwrapped_state_dict(hf), tokenizer)
    if model.tokenizer is not None:  # the BOS convention export_hf recorded (HF tokenizers keep no such flag)
        model.tokenizer.add_bos = bool(getattr(bridge.tokenizer, "init_kwargs", {}).get("add_bos_token", False))
    return model.to(next(hf.parameters()).device)
