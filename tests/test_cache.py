"""ActivationCache: stacks add up, the final norm is applied exactly, attributions sum to logits."""

from __future__ import annotations

import pytest
import torch
from helpers import LLAMA_TINY, tiny_cfg

from workbench import HookedGPT
from workbench.errors import HookError


@pytest.fixture(params=["gpt2", "llama", "attn-only"], scope="module")
def run(request):
    torch.manual_seed(0)
    overrides = {"gpt2": dict(unembed_bias=True), "llama": LLAMA_TINY, "attn-only": dict(attn_only=True)}[request.param]
    model = HookedGPT(tiny_cfg(**overrides)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    tokens = torch.randint(0, 50, (2, 9))
    logits, cache = model.run_with_cache(tokens)
    return model, tokens, logits, cache


def test_decomposition_sums_to_the_residual(run):
    model, _, _, cache = run
    stack = cache.decompose_resid()
    torch.testing.assert_close(stack.tensor.sum(0), cache["blocks.1.hook_resid_post"], atol=1e-5, rtol=0)
    assert stack.labels[0] == "embed" and stack.labels[-1] in ("1_mlp_out", "1_attn_out")
    up_to_1 = cache.decompose_resid(layer=1)
    torch.testing.assert_close(up_to_1.tensor.sum(0), cache["resid_pre", 1], atol=1e-5, rtol=0)


def test_accumulated_resid(run):
    model, _, _, cache = run
    acc = cache.accumulated_resid(incl_mid=True)
    n = model.cfg.n_layers
    assert len(acc.labels) == acc.tensor.shape[0] == (n + 1 if model.cfg.attn_only else 2 * n + 1)
    torch.testing.assert_close(acc.tensor[-1], cache["blocks.1.hook_resid_post"])


def test_apply_ln_to_final_stack_reproduces_ln_final(run):
    model, _, _, cache = run
    stack = cache.accumulated_resid(apply_ln=True)
    normed = cache["ln_final.hook_normalized"] * model.ln_final.w
    torch.testing.assert_close(stack.tensor[-1], normed, atol=1e-5, rtol=0)


def test_head_results_plus_bias_equal_attn_out(run):
    model, _, _, cache = run
    heads = cache.stack_head_results()
    assert heads.labels[:2] == ["L0H0", "L0H1"] and len(heads.labels) == 2 * model.cfg.n_heads
    layer1 = heads.tensor[model.cfg.n_heads:].sum(0)
    b_O = model.blocks[1].attn.b_O
    torch.testing.assert_close(layer1 + (0 if b_O is None else b_O), cache["blocks.1.hook_attn_out"], atol=1e-5, rtol=0)


def test_logit_attributions_sum_to_the_logit(run):
    model, tokens, logits, cache = run
    stack = cache.decompose_resid()
    answer, wrong = torch.tensor([3, 7]), torch.tensor([11, 2])
    attrs = cache.logit_attrs(stack.tensor, answer)
    total = attrs.sum(0) + cache.logit_constant(answer)
    torch.testing.assert_close(total, logits[torch.arange(2), -1, answer], atol=1e-4, rtol=0)
    diff = cache.logit_attrs(stack.tensor, answer, wrong).sum(0) + cache.logit_constant(answer, wrong)
    expected = logits[torch.arange(2), -1, answer] - logits[torch.arange(2), -1, wrong]
    torch.testing.assert_close(diff, expected, atol=1e-4, rtol=0)


def test_run_with_cache_options(run):
    model, tokens, logits, _ = run
    resid, cache = model.run_with_cache(tokens, names_filter=lambda n: "resid" in n, stop_at_layer=1,
                                        dtype=torch.float16)
    assert set(cache.keys()) <= {"blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post"}
    assert cache["blocks.0.hook_resid_post"].dtype == torch.float16
    torch.testing.assert_close(resid, cache["blocks.0.hook_resid_post"].float(), atol=1e-2, rtol=1e-2)
    assert not resid.requires_grad and all(not t.requires_grad for t in cache.store.values())
    with pytest.raises(HookError, match="was not cached"):
        cache["blocks.0.attn.hook_pattern"]
    _, with_grad = model.run_with_cache(tokens, names_filter="blocks.1.hook_resid_pre", incl_grad=True)
    assert with_grad["blocks.1.hook_resid_pre"].requires_grad
    _, default = model.run_with_cache(tokens)
    assert "blocks.0.attn.hook_result" not in default  # opt-in
    _, opted = model.run_with_cache(tokens, names_filter=lambda n: n.endswith("hook_result"))
    assert opted["blocks.0.attn.hook_result"].shape == (2, 9, model.cfg.n_heads, model.cfg.d_model)
