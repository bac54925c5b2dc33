"""workbench.gguf: llama GGUF files -> HF-named state dict, config and tokenizer.

Oracles: HF transformers' own GGUF loader (``from_pretrained(dir, gguf_file=...)``) on a tiny GGUF
written here by ``gguf.GGUFWriter`` the way llama.cpp's converter writes one (Q/K rows permuted,
shapes reversed, some tensors Q8_0), and on the real SmolLM2 file.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf_files import TINY_TEXT, write_tiny_gguf

from workbench.errors import CheckpointError


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


# --------------------------------------------------------------- issue 13: hostile metadata, one line each


def _u32(value):
    import gguf

    return (value, gguf.GGUFValueType.UINT32)


def _f32(value):
    import gguf

    return (value, gguf.GGUFValueType.FLOAT32)


@pytest.mark.parametrize("metadata,message", [
    ({"llama.block_count": _u32(10**9)}, r"block_count=1000000000 but the file holds tensors of 2 blocks"),
    ({"llama.attention.head_count": _u32(0)}, r"head_count=0; a model needs at least one head"),
    ({"llama.attention.head_count_kv": _u32(3)}, r"head_count=4 is not a multiple of head_count_kv=3"),
    ({"llama.attention.layer_norm_rms_epsilon": _f32(-1.0)}, r"layer_norm_rms_epsilon=-1.0 must be a positive"),
    ({"llama.embedding_length": _u32(10**9)}, r"tensor shapes disagree with the metadata"),
    ({"llama.feed_forward_length": _u32(0)}, r"feed_forward_length=0 must be at least 1"),
])
def test_gguf_metadata_that_disagrees_with_its_tensors_is_one_line(tmp_path, metadata, message):
    import resource

    from workbench.gguf import read_gguf

    path, _, _ = write_tiny_gguf(tmp_path / "bad.gguf", quantize=False, metadata=metadata)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=message) as info:
        read_gguf(path)
    assert "\n" not in str(info.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB: nothing huge allocated


def test_gguf_with_a_short_attn_q_is_one_line(tmp_path):
    from workbench.gguf import read_gguf

    path, _, _ = write_tiny_gguf(tmp_path / "short.gguf", quantize=False,
                                 mangle=lambda name, a: a[:-2] if name == "blk.1.attn_q.weight" else a)
    with pytest.raises(CheckpointError, match=r"blk.1.attn_q.weight \(62, 64\) \(metadata implies \(64, 64\)\)"):
        read_gguf(path)


def test_gguf_with_a_huge_context_loads_with_rope_tables_built_to_the_length_used(tmp_path):
    """context_length=2^32-1 used to allocate 34 GB of RoPE tables at load; they now grow to what a pass uses."""
    import resource

    from workbench.zoo import load_model

    path, _, _ = write_tiny_gguf(tmp_path / "long.gguf", quantize=False,
                                 metadata={"llama.context_length": _u32(2**32 - 1)})
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    model = load_model(path)
    with torch.no_grad():
        logits = model(torch.zeros(1, 5, dtype=torch.long))
    assert model.cfg.n_ctx == 2**32 - 1 and torch.isfinite(logits).all()
    assert model.rotary_cos.shape[0] <= 4096
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 500_000  # KiB
