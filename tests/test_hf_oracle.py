"""Logits agree with HF transformers on the same (random) weights, and to_hf() round-trips."""

from __future__ import annotations

import pytest
import torch
import transformers

from workbench import HookedGPT
from workbench.loading import from_hf

GPT2_CONFIGS = {
    "gpt2-tied": dict(n_embd=64, n_layer=2, n_head=4, vocab_size=97, n_positions=32),
    "gpt2-untied-relu": dict(n_embd=48, n_layer=3, n_head=3, vocab_size=61, n_positions=16, n_inner=80,
                             activation_function="relu", tie_word_embeddings=False),
}
LLAMA_CONFIGS = {
    "llama-gqa-untied": dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                             intermediate_size=96, vocab_size=97, max_position_embeddings=64,
                             tie_word_embeddings=False),
    "llama-gqa-tied": dict(hidden_size=48, num_hidden_layers=3, num_attention_heads=6, num_key_value_heads=2,
                           intermediate_size=64, vocab_size=61, max_position_embeddings=32, tie_word_embeddings=True,
                           rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "llama-mha-headdim": dict(hidden_size=40, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                              head_dim=16, intermediate_size=64, vocab_size=61, max_position_embeddings=32),
}


def _hf_model(kind: str, kwargs: dict):
    torch.manual_seed(0)
    if kind == "gpt2":
        model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**kwargs))
    else:
        model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs))
    with torch.no_grad():  # HF initialises norms to exactly 1 and biases to 0; perturb so they matter
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


CASES = [("gpt2", k, v) for k, v in GPT2_CONFIGS.items()] + [("llama", k, v) for k, v in LLAMA_CONFIGS.items()]


@pytest.mark.parametrize("kind,label,kwargs", CASES, ids=[c[1] for c in CASES])
def test_logits_match_hf(kind, label, kwargs):
    hf = _hf_model(kind, kwargs)
    model = from_hf(hf)
    n_ctx = model.cfg.n_ctx
    tokens = torch.randint(0, model.cfg.d_vocab, (3, n_ctx))
    with torch.no_grad():
        expected = hf(tokens).logits
        got = model(tokens)
        cached, _ = model.run_with_cache(tokens)  # the explicit attention path
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(cached, expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("kind,label,kwargs", CASES, ids=[c[1] for c in CASES])
def test_to_hf_round_trip(kind, label, kwargs, tmp_path):
    hf = _hf_model(kind, kwargs)
    model = from_hf(hf)
    back = model.to_hf()
    assert type(back) is type(hf)
    for name, tensor in hf.state_dict().items():
        torch.testing.assert_close(back.state_dict()[name], tensor, atol=0, rtol=0, msg=name)
    # and through an HF directory on disk
    back.save_pretrained(tmp_path)
    again = HookedGPT.from_hf(tmp_path)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(again(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def test_parameter_count_matches_hf():
    from workbench import parameter_counts

    for kind, _, kwargs in CASES:
        hf = _hf_model(kind, kwargs)
        model = from_hf(hf)
        hf_total = sum(p.numel() for p in hf.parameters())  # HF counts a tied matrix once
        assert parameter_counts(model.cfg)["total"] == hf_total == sum(p.numel() for p in model.parameters())
