"""Induction heads, copying and composition: hand-built oracles, tiny random models, the shipped toys, SmolLM2."""

from __future__ import annotations

import pytest
import torch
from helpers import LLAMA_TINY, tiny_cfg

from workbench.analysis import induction as I
from workbench.errors import InputError


def _seq(L=6, batch=2, d_vocab=50, seed=0):
    return I.repeated_random_tokens(I.RepeatedTokensSpec(seq_len=L, batch=batch, seed=seed, bos_token_id=0), d_vocab)


def _distinct_repeat(L=6):
    """BOS + L distinct tokens, twice: every mask has exactly the keys the textbook picture says."""
    body = torch.arange(1, L + 1)
    return torch.cat([torch.tensor([0]), body, body])[None], L


def _pattern_from_keys(keys: torch.Tensor, n: int) -> torch.Tensor:
    """A one-hot attention pattern ``[1 1 q k]`` with query q on key ``keys[q]``."""
    return torch.nn.functional.one_hot(keys, n).float()[None, None]


def test_perfect_patterns_score_exactly():
    tokens, L = _distinct_repeat()
    n = tokens.shape[1]
    q = torch.arange(n)
    # induction: every second-copy query looks at the token after its first copy; others at BOS
    induction_keys = torch.where(q > L, q - L + 1, torch.zeros_like(q))
    prev_keys = (q - 1).clamp(min=0)
    masks = I.score_masks(tokens)
    perfect_induction = _pattern_from_keys(induction_keys, n)
    perfect_prev = _pattern_from_keys(prev_keys, n)
    assert I.masked_attention_score(perfect_induction, masks["induction"]).item() == 1.0
    assert I.masked_attention_score(perfect_prev, masks["induction"]).item() == 0.0
    assert I.masked_attention_score(perfect_prev, masks["previous_token"]).item() == 1.0
    dup_keys = torch.where(q > L, q - L, torch.zeros_like(q))
    assert I.masked_attention_score(_pattern_from_keys(dup_keys, n), masks["duplicate_token"]).item() == 1.0
    # a head spread evenly over two keys, one of them right, scores one half
    half = 0.5 * (perfect_induction + _pattern_from_keys(torch.zeros_like(q), n))
    assert I.masked_attention_score(half, masks["induction"]).item() == pytest.approx(0.5)


def test_masks_on_repeated_tokens():
    tokens, L = _distinct_repeat(5)
    m = I.induction_mask(tokens)[0]
    for qpos in range(tokens.shape[1]):
        keys = m[qpos].nonzero().flatten().tolist()
        assert keys == ([qpos - L + 1] if qpos > L else [])
    assert I.previous_token_mask(tokens)[0, 3].nonzero().flatten().tolist() == [2]


def test_identity_ov_circuit_copies():
    eye = torch.eye(7)
    assert I.copying_score(eye).item() == pytest.approx(1.0)
    assert I.copying_score(-eye).item() == pytest.approx(-1.0)
    rot = torch.tensor([[0.0, -1.0], [1.0, 0.0]])  # eigenvalues +-i: neither copies nor suppresses
    assert I.copying_score(rot).item() == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize("arch", [{}, LLAMA_TINY], ids=["gpt2", "llama-gqa"])
def test_ov_scores_match_full_circuit(arch):
    from workbench import HookedGPT

    model = HookedGPT(tiny_cfg(**arch)).eval()
    fast = I.ov_copying_scores(model)
    for layer in range(2):
        for head in range(4):
            full = I.copying_score(I.full_ov_circuit(model, layer, head).detach())
            assert fast[layer, head].item() == pytest.approx(full.item(), abs=1e-4)


def test_ov_copying_of_a_built_identity_head():
    """A head whose W_V W_O is the identity in a model with W_U = W_E^T and orthonormal embeddings copies."""
    from workbench import HookedGPT

    model = HookedGPT(tiny_cfg(d_vocab=32, attn_only=True, d_mlp=0, tie_embeddings=True, n_heads=1)).eval()
    with torch.no_grad():
        model.embed.W_E.copy_(torch.linalg.qr(torch.randn(32, 32))[0])
        model.blocks[0].attn.W_V.copy_(torch.eye(32)[None])
        model.blocks[0].attn.W_O.copy_(torch.eye(32)[None])
    assert I.ov_copying_scores(model)[0, 0].item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("arch", [{}, LLAMA_TINY], ids=["gpt2", "llama-gqa"])
def test_batched_scores_match_one_pass_per_head(arch):
    from workbench import HookedGPT

    model = HookedGPT(tiny_cfg(**arch)).eval()
    seq = _seq(L=8, batch=3)
    fast = I.score_heads(model, seq.tokens, chunk=2)
    for kind in I.SCORE_KINDS:
        torch.testing.assert_close(fast.get(kind), I.score_heads_naive(model, seq.tokens, kind), atol=1e-6, rtol=0)
    logits = model(seq.tokens)
    torch.testing.assert_close(fast.loss, I.next_token_loss(logits, seq.tokens).detach())


def _composition_oracle(model, kind):
    W_Q, W_K, W_V = (I.reading_weights(model, w) for w in "QKV")
    W_O = model.W_O.detach()
    OV = W_V @ W_O
    QK = W_Q @ W_K.transpose(-1, -2)
    right = {"q": QK, "k": QK.transpose(-1, -2), "v": OV}[kind]
    a, b = OV[0, :, None], right[1][None]
    return torch.linalg.matrix_norm(a @ b) / (torch.linalg.matrix_norm(a) * torch.linalg.matrix_norm(b))


@pytest.mark.parametrize("kind", ["q", "k", "v"])
def test_composition_scores_match_dense_products(kind):
    from workbench import HookedGPT

    model = HookedGPT(tiny_cfg(**LLAMA_TINY)).eval()
    scores = I.composition_scores(model, kind)
    torch.testing.assert_close(scores[0, :, 1], _composition_oracle(model, kind), atol=1e-5, rtol=1e-4)
    assert scores[1, :, 0].isnan().all() and scores[1, :, 1].isnan().all()


def test_causal_composition_agrees_with_hooks():
    """Removing a source from the key input equals patching hook_k with keys computed without it."""
    from workbench import HookedGPT
    from workbench.names import act_name

    model = HookedGPT(tiny_cfg(n_layers=3)).eval()
    seq = _seq(L=6, batch=2)
    res = I.causal_composition(model, seq.tokens, kind="k", per="head")
    _, cache = model.run_with_cache(seq.tokens)
    mask = I.induction_mask(seq.tokens)
    src, layer = 5, 2  # L1H1 removed from layer 2's keys
    removed = cache[act_name("resid_pre", layer)] - cache.head_results(1)[:, :, 1]
    block = model.blocks[layer]
    k_new = block.attn.project(block.ln1(removed), "k")
    with model.hooks([(act_name("k", layer), lambda k, hook: k_new)]):
        _, c2 = model.run_with_cache(seq.tokens, names_filter=[act_name("pattern", layer)])
    expect = I.masked_attention_score(c2[act_name("pattern", layer)], mask)
    assert res.sources[src] == "L1H1"
    torch.testing.assert_close(res.ablated[src, layer], expect, atol=1e-5, rtol=0)
    torch.testing.assert_close(res.clean[layer], I.masked_attention_score(cache[act_name("pattern", layer)], mask))
    assert res.ablated[2 * 4:, 1].isnan().all()  # layer-2 heads never feed layer 1


def test_causal_composition_of_chosen_layers_matches_all_layers():
    from workbench import HookedGPT

    model = HookedGPT(tiny_cfg(n_layers=3)).eval()
    seq = _seq(L=6, batch=2)
    full = I.causal_composition(model, seq.tokens, kind="q", per="head")
    one = I.causal_composition(model, seq.tokens, kind="q", per="head", layers=[2])
    torch.testing.assert_close(one.ablated[:, 2], full.ablated[:, 2])
    torch.testing.assert_close(one.clean[2], full.clean[2])
    assert one.ablated[:, 1].isnan().all() and one.clean[1].isnan().all()
    with pytest.raises(InputError, match="layer 0 has no earlier layer"):
        I.causal_composition(model, seq.tokens, layers=[0])


def test_causal_value_composition_is_the_heads_direct_effect():
    from workbench import HookedGPT

    model = HookedGPT(tiny_cfg()).eval()
    seq = _seq(L=6, batch=2)
    res = I.causal_composition(model, seq.tokens, kind="v", per="layer")
    _, cache = model.run_with_cache(seq.tokens)
    heads = cache.head_results(1).permute(2, 0, 1, 3)  # [head batch pos d_model]
    n = seq.tokens.shape[1]
    attrs = torch.stack([cache.logit_attrs(heads, seq.tokens[:, p + 1], pos=p) for p in range(n - 1)], -1)
    counted = I.induction_mask(seq.tokens).any(-1)[:, :-1]
    torch.testing.assert_close(res.clean[1], (attrs * counted).sum((1, 2)) / counted.sum(), atol=1e-5, rtol=1e-4)


def test_errors_name_the_problem():
    from workbench import HookedGPT

    model = HookedGPT(tiny_cfg(n_layers=1)).eval()
    with pytest.raises(InputError, match="two layers"):
        I.causal_composition(model, _seq().tokens)
    with pytest.raises(InputError, match="vocabulary"):
        I.repeated_random_tokens(I.RepeatedTokensSpec(high=500), 50)
    with pytest.raises(InputError, match="repeated"):
        I.score_heads(model, torch.arange(1, 10)[None])


# ------------------------------------------------------------------------------------- shipped toys


@pytest.fixture(scope="session")
def toy_models():
    from workbench.builtin import BUILTIN_DIR
    from workbench.model import HookedGPT

    out = {}
    for name in ("attn-only-2l", "attn-only-1l"):
        d = BUILTIN_DIR / name
        # shipped with the project: a missing checkpoint is a failure, not a skip
        assert (d / "config.json").is_file(), f"built-in checkpoint {d} is missing; `workbench train {name} --ship`"
        out[name] = HookedGPT.load(d).eval()
    return out


def _toy_seq(seed=1):
    return I.repeated_random_tokens(I.RepeatedTokensSpec(seq_len=24, batch=16, seed=seed, bos_token_id=0), 64)


def test_attn_only_2l_has_induction_and_previous_token_heads(toy_models):
    model = toy_models["attn-only-2l"]
    seq = _toy_seq()
    s = I.score_heads(model, seq.tokens)
    assert s.induction[1].max() > 0.5, s.induction
    assert s.previous_token[0].max() > 0.5, s.previous_token
    assert s.induction[1].max() > 2 * s.induction[0].max()
    losses = I.repeat_losses(s.loss, seq)
    assert losses.second < 0.5 * losses.first
    k = I.causal_composition(model, seq.tokens, kind="k", per="layer")
    q = I.causal_composition(model, seq.tokens, kind="q", per="layer")
    top = int(s.induction[1].argmax())
    k_drop, q_drop = k.drop[0, 1, top].item(), q.drop[0, 1, top].item()
    assert k_drop > 0.5 * k.clean[1, top].item()
    assert k_drop > 3 * abs(q_drop), (k_drop, q_drop)
    # the weights-only K-composition of the top induction head is highest with a previous-token head
    comp = I.composition_scores(model, "k")[0, :, 1, top]
    assert int(comp.argmax()) == int(s.previous_token[0].argmax())


def test_attn_only_1l_has_no_induction_head(toy_models):
    model = toy_models["attn-only-1l"]
    seq = _toy_seq()
    s = I.score_heads(model, seq.tokens)
    assert s.induction.max() < 0.2, s.induction
    losses = I.repeat_losses(s.loss, seq)
    assert losses.second > 0.7 * losses.first


@pytest.mark.smollm2
def test_smollm2_induction_heads(smollm2):
    spec = I.default_spec(smollm2, seq_len=24, batch=2)
    seq = I.repeated_random_tokens(spec, smollm2.cfg.d_vocab)
    s = I.score_heads(smollm2, seq.tokens)
    assert s.induction.max() > 0.4, s.induction.max()
    assert (s.induction > 0.3).sum() >= 2
    losses = I.repeat_losses(s.loss, seq)
    assert losses.second < 0.3 * losses.first, losses
