"""TransformerLens 4.x's TransformerBridge, wrapping the same HF model, agrees hook by hook."""

from __future__ import annotations

import os

import pytest
import torch
import transformers

from workbench.loading import from_hf

os.environ.setdefault("HF_HUB_OFFLINE", "1")
TransformerBridge = pytest.importorskip("transformer_lens.model_bridge").TransformerBridge

HOOKS = ["hook_resid_pre", "hook_resid_mid", "hook_resid_post", "attn.hook_pattern", "attn.hook_z", "mlp.hook_post",
         "hook_attn_out", "hook_mlp_out"]


def _bridge_and_model(hf, tokenizer_dir, tmp_path):
    model = from_hf(hf)  # first: the bridge wraps the HF modules in place
    hf.save_pretrained(tmp_path)  # the bridge reads the architecture from this config
    tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    bridge = TransformerBridge.boot_transformers(str(tmp_path), hf_model=hf, tokenizer=tokenizer)
    return bridge, model


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_hooks_agree_with_transformer_lens(kind, hf_tokenizer_dir, tmp_path):
    torch.manual_seed(0)
    if kind == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=100,
                                                                  n_positions=32))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=96,
            vocab_size=100, max_position_embeddings=64))
    hf.eval()
    bridge, model = _bridge_and_model(hf, hf_tokenizer_dir, tmp_path)
    tokens = torch.randint(0, 100, (2, 12))
    with torch.no_grad():
        tl_logits, tl_cache = bridge.run_with_cache(tokens)
        logits, cache = model.run_with_cache(tokens)
    torch.testing.assert_close(logits, tl_logits, atol=1e-4, rtol=0)
    compared = 0
    for layer in range(model.cfg.n_layers):
        for hook in HOOKS:
            name = f"blocks.{layer}.{hook}"
            ours, theirs = cache[name], tl_cache[name]
            assert ours.shape == theirs.shape, name
            torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4, msg=name)
            compared += 1
    assert compared == len(HOOKS) * model.cfg.n_layers
