"""Backward hooks and gradient caching (workbench/hooks.py), and attribution patching
(workbench/analysis/attribution_patching.py), on tiny models of both families."""

from __future__ import annotations

import threading

import pytest
import torch
from helpers import LLAMA_TINY, tiny_cfg

from workbench import HookedGPT
from workbench.errors import HookError

FAMILIES = {"gpt2": {}, "llama": LLAMA_TINY}


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    torch.manual_seed(0)
    return HookedGPT(tiny_cfg(**FAMILIES[request.param])).eval()


def _tokens(model, batch=2, pos=7, seed=1):
    return torch.randint(0, model.cfg.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(seed))


def _metric(logits):
    """A scalar that depends on every position's logits, so every hook gets a nonzero gradient."""
    return (logits[:, -1, 3] - logits[:, -1, 5]).sum() + 0.1 * logits[:, :, 7].pow(2).sum()


def _oracle_grads(model, tokens):
    """torch.autograd.grad of the metric with respect to every hook's activation, collected by plain
    forward hooks (not observe-only, so the pass takes the same explicit paths as a backward-hooked one)."""
    acts = {}

    def keep(x, hook):
        acts[hook.name] = x

    logits = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, keep)])
    names = list(acts)
    grads = torch.autograd.grad(_metric(logits), [acts[n] for n in names], allow_unused=True, materialize_grads=True)
    return dict(zip(names, grads))


def test_cached_gradients_equal_autograd_at_every_hook(model):
    tokens = _tokens(model)
    oracle = _oracle_grads(model, tokens)
    frozen = HookedGPT(model.cfg)
    frozen.load_state_dict(model.state_dict())
    frozen.eval().requires_grad_(False)  # gradients must reach activations even with frozen weights
    for m in (model, frozen):
        logits, cache = m.run_with_cache(tokens, names_filter=lambda n: True, incl_grad=True)
        _metric(logits).backward()
        assert set(oracle) == {n for n in model.hook_names()}
        for name, g in oracle.items():
            torch.testing.assert_close(cache[name + "_grad"], g, rtol=1e-5, atol=1e-6, msg=name)
        assert any(g.abs().sum() > 0 for g in oracle.values())
    model.zero_grad(set_to_none=True)


def test_backward_hook_replaces_the_gradient(model):
    tokens = _tokens(model)
    seen = {}

    def zero(grad, hook):
        return torch.zeros_like(grad)

    def record(grad, hook):
        seen[hook.name] = grad

    logits = model.run_with_hooks(tokens, bwd_hooks=[("blocks.1.hook_resid_pre", zero), ("hook_embed", record),
                                                     ("blocks.1.hook_resid_post", record)])
    _metric(logits).backward()  # after run_with_hooks returned: the hooks live on this run's graph
    model.zero_grad(set_to_none=True)
    assert seen["blocks.1.hook_resid_post"].abs().sum() > 0
    # every path from the embedding to the logits runs through blocks.1.hook_resid_pre
    assert torch.count_nonzero(seen["hook_embed"]) == 0


def test_backward_hooks_removed_on_exit_even_on_error(model):
    calls = []

    def record(grad, hook):
        calls.append(hook.name)

    with pytest.raises(RuntimeError, match="boom"):
        with model.hooks(bwd_hooks=[(lambda n: n.endswith("hook_z"), record)]):
            raise RuntimeError("boom")
    assert not any(hp.active for hp in model.hook_dict.values())
    with model.hooks(bwd_hooks=[("hook_embed", record)]):
        pass
    _metric(model(_tokens(model))).backward()  # a pass after the block: no hook of it fires
    model.zero_grad(set_to_none=True)
    assert calls == []


def test_backward_hooks_belong_to_their_thread(model):
    tokens = _tokens(model)
    calls = []
    entered, done = threading.Event(), threading.Event()

    def other():
        with model.hooks(bwd_hooks=[("hook_embed", lambda g, hook: calls.append("other"))]):
            entered.set()
            done.wait(10)

    t = threading.Thread(target=other)
    t.start()
    entered.wait(10)
    try:
        _metric(model(tokens)).backward()
    finally:
        done.set()
        t.join()
    model.zero_grad(set_to_none=True)
    assert calls == []


def test_backward_hook_returning_a_wrong_shape_is_an_error(model):
    logits = model.run_with_hooks(_tokens(model), bwd_hooks=[("hook_embed", lambda g, hook: g[:1])])
    with pytest.raises(HookError, match="hook_embed"):
        _metric(logits).backward()
    model.zero_grad(set_to_none=True)
