"""Tiny llama GGUF files written the way llama.cpp's converter writes them (tests import these)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

TINY_TEXT = (
    "The quick brown fox jumps over the lazy dog. def add(a, b):\n    return a + b\n"
    "Numbers 12345 and 3.14159; naïve café 日本 🤖. " * 3
)


def _train_bpe(vocab_size: int = 320):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator([TINY_TEXT] * 4, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    return tokens, merges


def tiny_hf_llama(vocab: int, tie: bool = False, seed: int = 0):
    """A random 2-layer HF Llama with GQA (no download)."""
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=64, rms_norm_eps=1e-5,
        tie_word_embeddings=tie, rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # norms away from 1 so a mix-up of norm weights shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def write_tiny_gguf(path: Path, arch: str = "llama", quantize: bool = True, tie: bool = False,
                    metadata: dict | None = None, mangle=None):
    """Write a tiny llama GGUF as llama.cpp's converter would; return (path, hf_model, tokens).

    ``metadata``: key -> (value, gguf.GGUFValueType) written over the converter's fields (broken files
    for tests); ``mangle(name, array) -> array`` changes a tensor before it is written."""
    import gguf

    from workbench.gguf import permute_qk

    tokens, merges = _train_bpe()
    hf = tiny_hf_llama(len(tokens), tie=tie)
    c = hf.config
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(c.num_hidden_layers)
    w.add_context_length(c.max_position_embeddings)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_rope_dimension_count(c.head_dim)
    w.add_vocab_size(len(tokens))
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t == "<|endoftext|>" else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_bos_token_id(0)
    w.add_eos_token_id(0)
    w.add_add_bos_token(False)
    sd = {k: v.detach().clone() for k, v in hf.state_dict().items()}
    names = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight"}
    if not tie:
        names["lm_head.weight"] = "output.weight"
    from workbench.gguf import _BLOCK_NAMES

    for layer in range(c.num_hidden_layers):
        for g, h in _BLOCK_NAMES.items():
            names[h.format(L=layer)] = f"blk.{layer}.{g}"
    for hf_name_, g in names.items():
        t = sd[hf_name_]
        if hf_name_.endswith("q_proj.weight"):
            t = permute_qk(t, c.num_attention_heads)
        elif hf_name_.endswith("k_proj.weight"):
            t = permute_qk(t, c.num_key_value_heads)
        arr = t.numpy().astype(np.float32)
        if mangle is not None:
            arr = mangle(g, arr)
        if quantize and arr.ndim == 2 and ("ffn" in g or "attn_v" in g or "attn_q" in g):
            q8 = gguf.GGMLQuantizationType.Q8_0
            w.add_tensor(g, gguf.quantize(arr, q8), raw_dtype=q8)
        else:
            w.add_tensor(g, arr)
    for key, (value, vtype) in (metadata or {}).items():
        w.add_key_value(key, value, vtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, hf, tokens
