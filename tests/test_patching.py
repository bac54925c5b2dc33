"""Activation patching and ablation: batched sweeps agree with one hooked pass per location, and exact restores."""

from __future__ import annotations

import pytest
import torch
from helpers import LLAMA_TINY, tiny_cfg

from workbench import HookedGPT
from workbench.analysis import patching as P
from workbench.analysis.attribution import token_id
from workbench.errors import InputError
from workbench.names import act_name


@pytest.fixture(params=[{}, LLAMA_TINY], ids=["gpt2", "llama"])
def model(request):
    return HookedGPT(tiny_cfg(**request.param)).eval()


def _pair(batch=2, n=7):
    clean = torch.randint(0, 50, (batch, n))
    corrupt = clean.clone()
    corrupt[:, 2] = (corrupt[:, 2] + 11) % 50
    return clean, corrupt


def test_residual_sweep_matches_one_pass_per_location(model):
    clean, corrupt = _pair()
    metric = P.LogitDiff(torch.tensor([3, 4]), 5)
    fast = P.patch_residual(model, clean, corrupt, metric, chunk=5)  # chunks that split the variants
    naive = P.patch_residual_naive(model, clean, corrupt, metric)
    torch.testing.assert_close(fast.scores, naive, atol=1e-5, rtol=1e-5)
    # positions before the corruption carry nothing: patching them leaves the corrupted answer
    torch.testing.assert_close(fast.scores[:, :2], torch.full((2, 2), fast.corrupt), atol=1e-5, rtol=1e-5)


def test_whole_residual_patch_restores_the_clean_output_exactly(model):
    clean, corrupt = _pair()
    clean_logits = model(clean).detach()
    _, cache = model.run_with_cache(clean, names_filter=lambda n: n.endswith("resid_pre"))
    for layer in range(model.cfg.n_layers):
        with torch.no_grad():
            out = model.unembed_resid(model.run_blocks(cache[act_name("resid_pre", layer)].clone(), start=layer))
        torch.testing.assert_close(out, clean_logits, atol=1e-6, rtol=1e-6)
    metric = P.LogitDiff(3, 5)
    whole = P.patch_residual(model, clean, corrupt, metric, per_position=False)
    torch.testing.assert_close(whole.scores[:, 0], torch.full((model.cfg.n_layers,), whole.clean), atol=1e-5, rtol=0)
    torch.testing.assert_close(whole.normalized, torch.ones_like(whole.normalized), atol=1e-4, rtol=0)


def _hooked(model, tokens, name, fn, metric):
    with torch.no_grad():
        return float(metric(model.run_with_hooks(tokens, fwd_hooks=[(name, fn)])[:, -1]).mean())


def test_head_and_mlp_patching_match_hooked_runs(model):
    clean, corrupt = _pair()
    metric = P.LogitDiff(3, 5)
    _, cache = model.run_with_cache(clean)
    heads = P.patch_heads(model, clean, corrupt, metric, chunk=3)
    for layer, head in [(0, 1), (1, 3)]:
        name = act_name("z", layer)

        def fn(z, hook, head=head, name=name):
            z = z.clone()
            z[:, :, head] = cache[name][:, :, head]
            return z
        assert heads.scores[layer, head].item() == pytest.approx(_hooked(model, corrupt, name, fn, metric), abs=1e-5)
    for kind in ("mlp_out", "attn_out"):
        res = P.patch_outputs(model, clean, corrupt, metric, kind=kind)
        name = act_name(kind, 1)

        def fn(x, hook, name=name):
            x = x.clone()
            x[:, 4] = cache[name][:, 4]
            return x
        assert res.scores[1, 4].item() == pytest.approx(_hooked(model, corrupt, name, fn, metric), abs=1e-5)
        whole = P.patch_outputs(model, clean, corrupt, metric, kind=kind, per_position=False)
        assert whole.scores.shape == (2, 1)


def test_head_query_key_patching_per_position_matches_hooked_runs(model):
    """patch_heads patches q/k/v (keys and values per K/V head) and one (position, head) at a time."""
    clean, corrupt = _pair()
    metric = P.LogitDiff(3, 5)
    _, cache = model.run_with_cache(clean)
    for kind in ("q", "k", "v"):
        n_heads = model.cfg.n_heads if kind == "q" else model.cfg.n_kv
        whole = P.patch_heads(model, clean, corrupt, metric, kind=kind, chunk=3, layers=[1])
        per_pos = P.patch_heads(model, clean, corrupt, metric, kind=kind, per_position=True, chunk=5)
        assert whole.scores.shape == (1, n_heads) and whole.kind == kind
        assert per_pos.scores.shape == (model.cfg.n_layers, clean.shape[1], n_heads)
        name = act_name(kind, 1)
        head = n_heads - 1

        def every_pos(x, hook, name=name, head=head):
            x = x.clone()
            x[:, :, head] = cache[name][:, :, head]
            return x

        def at_4(x, hook, name=name, head=head):
            x = x.clone()
            x[:, 4, head] = cache[name][:, 4, head]
            return x
        assert whole.scores[0, head].item() == pytest.approx(_hooked(model, corrupt, name, every_pos, metric), abs=1e-5)
        assert per_pos.scores[1, 4, head].item() == pytest.approx(_hooked(model, corrupt, name, at_4, metric), abs=1e-5)
        # positions before the corruption carry nothing
        torch.testing.assert_close(per_pos.scores[:, :2], torch.full_like(per_pos.scores[:, :2], per_pos.corrupt),
                                   atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="kind='resid_pre'"):
        P.patch_heads(model, clean, corrupt, metric, kind="resid_pre")



def test_ablations_match_hooked_runs(model):
    tokens = torch.randint(0, 50, (3, 6))
    metric = P.LogitDiff(3)
    _, cache = model.run_with_cache(tokens)
    zero = P.ablate(model, tokens, metric, kind="z", method="zero")
    mean = P.ablate(model, tokens, metric, kind="z", method="mean")
    name = act_name("z", 1)

    def zero_fn(z, hook):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    def mean_fn(z, hook):
        z = z.clone()
        z[:, :, 2] = cache[name][:, :, 2].mean(dim=(0, 1))
        return z
    assert zero.scores[1, 2].item() == pytest.approx(_hooked(model, tokens, name, zero_fn, metric), abs=1e-5)
    assert mean.scores[1, 2].item() == pytest.approx(_hooked(model, tokens, name, mean_fn, metric), abs=1e-5)
    mlp = P.ablate(model, tokens, metric, kind="mlp_out", method="zero")
    mlp_name = act_name("mlp_out", 0)
    expect = _hooked(model, tokens, mlp_name, lambda x, hook: torch.zeros_like(x), metric)
    assert mlp.scores[0, 0].item() == pytest.approx(expect, abs=1e-5)
    assert mlp.effect.shape == (2, 1)


def test_errors():
    model = HookedGPT(tiny_cfg(attn_only=True, d_mlp=0)).eval()
    with pytest.raises(InputError, match="same token length"):
        P.patch_residual(model, torch.zeros(1, 5, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long),
                         P.LogitDiff(1))
    with pytest.raises(InputError, match="attention-only"):
        P.patch_outputs(model, *_pair(), P.LogitDiff(1), kind="mlp_out")
    with pytest.raises(InputError, match="outside"):
        P.patch_residual(model, *_pair(), P.LogitDiff(1), layers=[5])


@pytest.mark.smollm2
def test_smollm2_patching_restores_clean(smollm2):
    clean = smollm2.to_tokens("The Eiffel Tower is in the city of")
    corrupt = smollm2.to_tokens("The Colosseum is in the city of")
    if clean.shape != corrupt.shape:
        pytest.skip("prompts tokenize to different lengths")
    metric = P.LogitDiff(token_id(smollm2, " Paris"), token_id(smollm2, " Rome"))
    res = P.patch_residual(smollm2, clean, corrupt, metric, per_position=False, layers=[0, 15, 29])
    assert res.clean > 0 > res.corrupt
    torch.testing.assert_close(res.scores[:, 0], torch.full((3,), res.clean), atol=1e-3, rtol=0)


def test_identical_clean_and_corrupted_prompts_have_no_normalized_table(model):
    """Issue 13: the same prompt twice gave a table of +-inf and NaN; now the undefined fraction is an InputError."""
    clean, _ = _pair()
    res = P.patch_residual(model, clean, clean.clone(), P.LogitDiff(3, 5))
    assert res.clean == res.corrupt and torch.isfinite(res.scores).all()
    with pytest.raises(InputError, match="the clean and corrupted runs give the same metric"):
        res.normalized
