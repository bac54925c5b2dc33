"""workbench.gguf: llama GGUF files -> HF-named state dict, config and tokenizer.

Oracles: HF transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``) on a tiny GGUF
written here by ``gguf.GGUFWriter`` the way llama.cpp's converter writes one (Q/K rows permuted,
shapes reversed, some tensors Q8_0), and on the real SmolLM2 file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from workbench.errors import CheckpointError

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


def write_tiny_gguf(path: Path, arch: str = "llama", quantize: bool = True, tie: bool = False):
    """Write a tiny llama GGUF as llama.cpp's converter would; return (path, hf_model, tokens)."""
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
        if quantize and arr.ndim == 2 and ("ffn" in g or "attn_v" in g or "attn_q" in g):
            w.add_tensor(g, gguf.quantize(arr, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            w.add_tensor(g, arr)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path, hf, tokens


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf")


@pytest.fixture(scope="module")
def hf_from_tiny_gguf(tiny_gguf):
    """HF's own GGUF loader on the tiny file: the oracle for mapping, dequantization and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = tiny_gguf[0]
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return model, tok


def test_unpermute_inverts_llama_cpp_permutation_and_matches_hf():
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    from workbench.gguf import permute_qk, unpermute_qk

    w = torch.randn(6 * 16, 40)
    assert torch.equal(unpermute_qk(permute_qk(w, 6), 6), w)
    assert not torch.equal(permute_qk(w, 6), w)
    hf = LlamaTensorProcessor()._reverse_permute_weights(permute_qk(w, 6).numpy(), 6, 6)
    assert np.array_equal(hf, w.numpy())


def test_state_dict_and_config_match_hf_gguf_loader(tiny_gguf, hf_from_tiny_gguf):
    from workbench.gguf import read_gguf

    ckpt = read_gguf(tiny_gguf[0])
    hf_model, _ = hf_from_tiny_gguf
    hf_sd = hf_model.state_dict()
    assert set(ckpt.state_dict) == set(hf_sd)
    for name, t in ckpt.state_dict.items():
        assert t.dtype == torch.float32 and t.shape == hf_sd[name].shape, name
        torch.testing.assert_close(t, hf_sd[name], rtol=0, atol=0, msg=name)
    c, h = ckpt.hf_config, hf_model.config
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "vocab_size", "tie_word_embeddings"):
        assert getattr(c, key) == getattr(h, key), key
    # Q8_0 really was dequantized (not bit-equal to the float weights the file was made from)
    original = tiny_gguf[1].state_dict()["model.layers.0.mlp.up_proj.weight"]
    got = ckpt.state_dict["model.layers.0.mlp.up_proj.weight"]
    assert not torch.equal(got, original) and torch.allclose(got, original, atol=2e-3)
    # Q/K (only K is stored unquantized) come back in HF's row order
    torch.testing.assert_close(ckpt.state_dict["model.layers.1.self_attn.k_proj.weight"],
                               tiny_gguf[1].state_dict()["model.layers.1.self_attn.k_proj.weight"], rtol=0, atol=0)


def test_model_from_gguf_matches_hf_logits(tiny_gguf, hf_from_tiny_gguf):
    from workbench.zoo import load_model

    model = load_model(tiny_gguf[0])
    hf_model, hf_tok = hf_from_tiny_gguf
    ids = torch.tensor([hf_tok(TINY_TEXT[:60]).input_ids])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf_model(ids).logits, rtol=1e-4, atol=1e-4)


def test_tokenizer_matches_hf_gguf_tokenizer(tiny_gguf, hf_from_tiny_gguf):
    from workbench.gguf import read_tokenizer

    tok = read_tokenizer(tiny_gguf[0])
    _, hf_tok = hf_from_tiny_gguf
    for text in [TINY_TEXT, "  two  spaces\tand\ttabs\n\n", "<|endoftext|>fox<|endoftext|>", "ünïcödé 🤖🤖", "x"]:
        assert tok.encode(text) == hf_tok(text).input_ids, text
        assert tok.decode(tok.encode(text)) == text
    assert tok.add_bos is False and tok.eos_token_id == 0


def test_truncated_gguf_is_a_clear_error(tiny_gguf, tmp_path):
    from workbench.gguf import read_gguf

    data = tiny_gguf[0].read_bytes()
    for cut in (len(data) - 100, len(data) // 2, 2000, 10):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(CheckpointError, match="truncated|corrupt"):
            read_gguf(bad)


def test_not_a_gguf_and_missing_file(tmp_path):
    from workbench.gguf import read_gguf

    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"PK\x03\x04 definitely a zip")
    with pytest.raises(CheckpointError, match="not a GGUF file"):
        read_gguf(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        read_gguf(tmp_path / "missing.gguf")


def test_unsupported_architecture_is_named(tmp_path):
    from workbench.gguf import read_gguf

    path, _, _ = write_tiny_gguf(tmp_path / "falcon.gguf", arch="falcon", quantize=False)
    with pytest.raises(CheckpointError, match="'falcon' is not supported.*llama"):
        read_gguf(path)


def test_tied_embeddings_have_no_lm_head(tmp_path):
    from workbench.gguf import read_gguf

    path, hf, _ = write_tiny_gguf(tmp_path / "tied.gguf", quantize=False, tie=True)
    ckpt = read_gguf(path)
    assert ckpt.hf_config.tie_word_embeddings and "lm_head.weight" not in ckpt.state_dict


# ------------------------------------------------------------------------------------ real SmolLM2


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name,
                                                 dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    return model, tok


SMOLLM2_PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "Once upon a time, in a land far away, there lived a",
    "<|im_start|>user\nWhat is 12 * 7?<|im_end|>\n<|im_start|>assistant\n",
]

TOKENIZER_SAMPLE = [
    "Hello, world!", "   leading and trailing spaces   ", "tabs\tand\t\ttabs\r\nwindows newlines\n\n\n",
    "naïve café résumé — “smart quotes” ‘x’ …", "日本語のテキストと中文文本 한국어", "emoji 🤖🚀👩‍💻 and flags 🇫🇷",
    "def f(x: int) -> int:\n    return x ** 2  # square\n\tpass\n", "if (a != b && c >= 0) { x[i] = y->z; }",
    "phone 555-0123, year 2024, pi 3.14159, 1e-10, 0xFF, 1,000,000", "'s 're 've 'll 'd 'm 't DON'T",
    "<|im_start|>system\nYou are helpful<|im_end|>", "<|endoftext|><repo_name>x<file_sep>",
    "\u00a0non-breaking\u200bzero-width\u2028line-sep", "    " * 10 + "deep indent", "a" * 200,
]


@pytest.mark.smollm2
def test_smollm2_logits_match_hf_gguf_loader(smollm2, hf_smollm2):
    hf_model, hf_tok = hf_smollm2
    for prompt in SMOLLM2_PROMPTS:
        ids = torch.tensor([hf_tok(prompt).input_ids])
        assert smollm2.to_tokens(prompt).tolist() == ids.tolist()
        with torch.inference_mode():
            ours, theirs = smollm2(ids), hf_model(ids).logits
        torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-3, msg=prompt)
        assert ours[0, -1].argmax() == theirs[0, -1].argmax()


@pytest.mark.smollm2
def test_smollm2_tokenizer_matches_hf(smollm2, hf_smollm2):
    _, hf_tok = hf_smollm2
    tok = smollm2.tokenizer
    assert tok.add_bos is False and tok.bos_token_id == 1 and tok.eos_token_id == 2
    for text in TOKENIZER_SAMPLE:
        ids = tok.encode(text)
        assert ids == hf_tok(text).input_ids, text
        assert tok.decode(ids) == hf_tok.decode(ids) == text
    joined = "\n".join(TOKENIZER_SAMPLE)
    assert tok.encode(joined) == hf_tok(joined).input_ids
