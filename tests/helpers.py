"""Small builders shared by tests (import with `from helpers import ...`)."""

from __future__ import annotations


def tiny_cfg(**overrides):
    """A 2-layer d_model-32 config; GPT-2 shaped unless overridden."""
    from workbench import GPTConfig

    base = dict(d_model=32, n_layers=2, n_heads=4, d_mlp=64, d_vocab=50, n_ctx=24, name="tiny")
    base.update(overrides)
    return GPTConfig(**base)


LLAMA_TINY = dict(positional="rotary", normalization="rmsnorm", act_fn="silu", gated_mlp=True, use_bias=False,
                  n_kv_heads=2)
