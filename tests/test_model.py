"""HookedGPT properties: causality, configs, bad input, parameter counts, KV cache, dtype."""

from __future__ import annotations

import pytest
import torch
from helpers import LLAMA_TINY, tiny_cfg

from workbench import GPTConfig, HookedGPT, parameter_counts
from workbench.errors import ConfigError, InputError
from workbench.model import KVCache

ALL = {"gpt2": {}, "llama": LLAMA_TINY, "attn-only": dict(attn_only=True), "sinusoidal": dict(positional="sinusoidal"),
       "no-pos-rms": dict(positional="none", normalization="rmsnorm", tie_embeddings=True)}


@pytest.mark.parametrize("variant", list(ALL))
def test_causality(variant):
    model = HookedGPT(tiny_cfg(**ALL[variant])).eval()
    tokens = torch.randint(0, 50, (1, 12))
    changed = tokens.clone()
    changed[0, 7] = (tokens[0, 7] + 1) % 50
    with torch.no_grad():
        a, b = model(tokens), model(changed)
    assert torch.equal(a[:, :7], b[:, :7])
    assert not torch.allclose(a[:, 7:], b[:, 7:])


@pytest.mark.parametrize("variant", list(ALL))
def test_kv_cache_matches_full_forward(variant):
    model = HookedGPT(tiny_cfg(**ALL[variant])).eval()
    tokens = torch.randint(0, 50, (2, 10))
    kv = KVCache.empty(model.cfg, batch=2, max_pos=10)
    with torch.no_grad():
        full = model(tokens)
        parts = [model(tokens[:, :4], kv_cache=kv)] + [model(tokens[:, i:i + 1], kv_cache=kv) for i in range(4, 7)]
        parts.append(model(tokens[:, 7:], kv_cache=kv))  # a multi-token chunk after a filled cache
    torch.testing.assert_close(torch.cat(parts, dim=1), full, atol=1e-5, rtol=0)
    assert kv.pos == 10
    with pytest.raises(InputError, match="KV cache"):
        model(tokens[:, :1], kv_cache=kv)


def test_parameter_counts_gpt2_and_gpt3():
    gpt2 = parameter_counts(GPTConfig.gpt2_small())
    assert gpt2["total"] == 124_439_808
    gpt3 = parameter_counts(GPTConfig.gpt3_175b())
    assert gpt3["weights"] == 175_181_291_520
    assert gpt3["embedding"] == gpt3["unembedding"] == 617_558_016
    for part in ("attn_q", "attn_k", "attn_v", "attn_o"):
        assert gpt3[part] == 14_495_514_624
    assert gpt3["mlp_in"] == gpt3["mlp_out"] == 57_982_058_496


@pytest.mark.parametrize("variant", list(ALL))
def test_parameter_counts_match_the_module(variant):
    cfg = tiny_cfg(**ALL[variant])
    assert parameter_counts(cfg)["total"] == sum(p.numel() for p in HookedGPT(cfg).parameters())


def test_per_head_weights_are_views_of_fused_memory():
    model = HookedGPT(tiny_cfg(**LLAMA_TINY))
    attn = model.blocks[0].attn
    assert attn.W_Q.shape == (4, 32, 8) and attn.W_K.shape == (2, 32, 8) and attn.W_O.shape == (4, 8, 32)
    assert attn.W_Q.transpose(1, 2).is_contiguous()  # the F.linear layout, reshaped without a copy
    assert attn.W_O.permute(2, 0, 1).is_contiguous()
    with torch.no_grad():  # editing a head through its per-head view changes the model
        tokens = torch.randint(0, 50, (1, 6))
        before = model(tokens)
        attn.W_O[1] = 0
        assert not torch.allclose(model(tokens), before)
    assert model.W_Q.shape == (2, 4, 32, 8)


def test_tied_unembedding_is_the_embedding():
    model = HookedGPT(tiny_cfg(tie_embeddings=True))
    assert model.W_U.data_ptr() == model.W_E.data_ptr() and model.W_U.shape == (32, 50)
    assert "unembed.W_U" not in model.state_dict()


@pytest.mark.parametrize(
    "overrides,match",
    [(dict(d_model=30, n_heads=4), "not divisible by n_heads"),
     (dict(n_heads=6, n_kv_heads=4, d_head=8), "not a multiple of n_kv_heads"),
     (dict(positional="rotary", d_head=7), "even d_head"),
     (dict(act_fn="swish"), "act_fn"),
     (dict(d_mlp=0), "d_mlp must be positive")],
)
def test_configs_that_cannot_work(overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny_cfg(**overrides)


def test_bad_tokens():
    model = HookedGPT(tiny_cfg())
    with pytest.raises(InputError, match="exceed the model's context of 24"):
        model(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(InputError, match="token id 50 is outside the vocabulary"):
        model(torch.tensor([[1, 50]]))
    with pytest.raises(InputError, match="token id -1"):
        model(torch.tensor([[-1, 3]]))
    with pytest.raises(InputError, match="integers"):
        model(torch.zeros(1, 3))
    with pytest.raises(InputError, match="pos >= 1"):
        model(torch.zeros(1, 0, dtype=torch.long))


def test_config_round_trip_and_unknown_fields():
    cfg = tiny_cfg(**LLAMA_TINY)
    assert GPTConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match="unknown GPTConfig fields"):
        GPTConfig.from_dict({**cfg.to_dict(), "n_layer": 3})


def test_bfloat16_forward_runs_close_to_float32():
    model = HookedGPT(tiny_cfg(**LLAMA_TINY)).eval()
    tokens = torch.randint(0, 50, (1, 8))
    with torch.no_grad():
        ref = model(tokens)
        low = model.to(torch.bfloat16)(tokens).float()
    assert (low - ref).abs().max() < 0.05 * ref.abs().max() + 0.05


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("shape", [(1, 1), (1,), (), (3,), (2, 4), (2, 2, 2)])
def test_linear_splits_few_rows_and_matches_f_linear(shape, two_threads, monkeypatch):
    import torch.nn.functional as F

    from workbench.fastpath import linear

    g = torch.Generator().manual_seed(0)
    W, b = torch.randn(512, 160, generator=g), torch.randn(512, generator=g)
    x = torch.randn(*shape, 160, generator=g)
    expected = F.linear(x, W, b)
    monkeypatch.setattr(F, "linear", lambda *a: pytest.fail("a few fp32 rows must take the split path"))
    out = linear(x, W, b)
    assert out.shape == expected.shape
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", ["many rows", "small weight", "bfloat16", "strided weight", "odd rows", "one thread"])
def test_linear_falls_back_to_f_linear(case, two_threads, monkeypatch):
    import torch.nn.functional as F

    from workbench import fastpath

    W, x = torch.randn(512, 160), torch.randn(1, 1, 160)
    if case == "many rows":
        x = torch.randn(1, fastpath.SPLIT_MAX_ROWS + 1, 160)
    elif case == "small weight":
        W = torch.randn(16, 160)
    elif case == "bfloat16":
        W, x = W.bfloat16(), x.bfloat16()
    elif case == "strided weight":
        W = torch.randn(512, 320)[:, ::2]
    elif case == "odd rows":
        W = torch.randn(511, 160)
    else:
        torch.set_num_threads(1)
    calls = []
    real = F.linear
    monkeypatch.setattr(F, "linear", lambda *a: calls.append(1) or real(*a))
    out = fastpath.linear(x, W)
    assert calls == [1]
    assert torch.equal(out, real(x, W))


def test_kv_cache_decode_through_the_split_path_matches_full_forward(two_threads, monkeypatch):
    from workbench import fastpath

    monkeypatch.setattr(fastpath, "SPLIT_MIN_WEIGHTS", 0)  # tiny weights take the decode path too
    model = HookedGPT(tiny_cfg(**LLAMA_TINY)).eval()
    tokens = torch.randint(0, 50, (1, 9))
    kv = KVCache.empty(model.cfg, batch=1, max_pos=9)
    with torch.no_grad():
        full = model(tokens)
        steps = [model(tokens[:, :3], kv_cache=kv)] + [model(tokens[:, i:i + 1], kv_cache=kv) for i in range(3, 9)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)


def test_rotary_is_hf_rotate_half_bit_for_bit():
    from workbench.model import apply_rotary

    model = HookedGPT(tiny_cfg(**LLAMA_TINY))
    d_head = model.cfg.d_head
    x = torch.randn(2, 5, 3, d_head)
    cos = model.rotary_cos[4:9]
    sin = torch.cat([-model.rotary_sin[4:9, : d_head // 2], model.rotary_sin[4:9, d_head // 2:]], -1)
    # HF Llama's formula with the plain sin table (rotary_sin keeps rotate-half's sign folded in)
    rotate_half = torch.cat([-x[..., d_head // 2:], x[..., : d_head // 2]], dim=-1)
    expected = x * cos[:, None] + rotate_half * sin[:, None]
    assert torch.equal(apply_rotary(x, *model.rotary(4, 5, x.dtype)), expected)


def test_attention_project_gives_what_hook_q_k_v_see():
    model = HookedGPT(tiny_cfg(**LLAMA_TINY)).eval()
    tokens = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        _, cache = model.run_with_cache(tokens)
        block = model.blocks[1]
        x = block.ln1(cache["blocks.1.hook_resid_pre"])
        for which in "qkv":
            torch.testing.assert_close(block.attn.project(x, which), cache[f"blocks.1.attn.hook_{which}"])
    with pytest.raises(InputError, match="'q', 'k' or 'v'"):
        block.attn.project(x, "o")


def test_a_batch_of_zero_rows_and_unknown_token_ids_are_input_errors():
    """Issue 13: 0 rows was a RuntimeError from min(); an id past the vocabulary decoded silently to ''."""
    from helpers import tiny_cfg

    from workbench import HookedGPT
    from workbench.errors import InputError
    from workbench.zoo import load_model

    with pytest.raises(InputError, match=r"batch, pos >= 1, got \(0, 3\)"):
        HookedGPT(tiny_cfg())(torch.zeros(0, 3, dtype=torch.long))
    tok = load_model("kjv-small").tokenizer
    n = tok.tok.get_vocab_size(with_added_tokens=True)
    assert tok.decode([0, n - 1]) is not None
    for bad in ([n], [-1], [5, 10**6]):
        with pytest.raises(InputError, match="outside this tokenizer's vocabulary"):
            tok.decode(bad)
    with pytest.raises(InputError, match="outside this tokenizer's vocabulary"):
        tok.str_tokens([n])
