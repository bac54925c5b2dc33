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


# -- attribution patching ------------------------------------------------------------------------

from workbench.analysis import attribution_patching as AP  # noqa: E402
from workbench.analysis import patching as P  # noqa: E402
from workbench.errors import InputError  # noqa: E402


def _exact_single(model, base, source, name, index, metric):
    """Metric of ``base`` with ``act[:, index]`` taken from ``source``'s run (one node, by hand)."""
    with torch.no_grad():
        _, cache = model.run_with_cache(source, names_filter=name)

        def put(x, hook):
            x = x.clone()
            x[(slice(None), *index)] = cache[name][(slice(None), *index)]
            return x

        logits = model.run_with_hooks(base, fwd_hooks=[(name, put)])
    return float(metric(logits[:, -1]).mean())


def _pair(model, seed=3):
    clean = _tokens(model, batch=3, pos=6, seed=seed)
    corrupt = clean.clone()
    corrupt[:, 2] = (corrupt[:, 2] + 7) % model.cfg.d_vocab
    return clean, corrupt


def test_atp_heads_match_exact_patching_on_a_near_linear_model(model):
    clean, corrupt = _pair(model)
    metric = P.LogitDiff(3, 5)
    atp = AP.attribution_patch(model, clean, corrupt, metric)
    exact = P.patch_heads(model, clean, corrupt, metric)
    effect = exact.scores - exact.corrupt
    assert atp.clean == pytest.approx(exact.clean, abs=1e-5) and atp.corrupt == pytest.approx(exact.corrupt, abs=1e-5)
    # a randomly initialised model is nearly linear around its activations: first order is close
    torch.testing.assert_close(atp.heads, effect, atol=0.05 * float(effect.abs().max()), rtol=0.05)
    # the residual at the swapped token carries the whole embedding change, through the norm: less linear
    res = P.patch_residual(model, clean, corrupt, metric)
    corr = torch.corrcoef(torch.stack([atp.resid.flatten(), (res.scores - res.corrupt).flatten()]))[0, 1]
    assert corr > 0.95
    assert atp.neurons.shape == (model.cfg.n_layers, 6, model.cfg.d_mlp)
    for kind in ("attn_out", "mlp_out"):
        exact_out = P.patch_outputs(model, clean, corrupt, metric, kind=kind)
        shown = AP.as_patch_result(atp, kind)
        corr = torch.corrcoef(torch.stack([shown.normalized.flatten(), exact_out.normalized.flatten()]))[0, 1]
        assert corr > 0.95, kind
    assert atp.k.shape == (model.cfg.n_layers, 6, model.cfg.n_kv)


def test_atp_noise_direction_is_the_mirror(model):
    clean, corrupt = _pair(model)
    metric = P.LogitDiff(3, 5)
    layer, pos, head = 1, 4, 2
    exact = _exact_single(model, clean, corrupt, act_name_z := f"blocks.{layer}.attn.hook_z", (pos, head), metric)
    atp = AP.attribution_patch(model, clean, corrupt, metric, AP.AtPConfig(direction="noise"))
    assert float(atp.z[layer, pos, head]) == pytest.approx(exact - atp.clean, abs=0.05 * abs(exact - atp.clean) + 1e-6)
    assert act_name_z


def test_atp_star_fixes_saturated_queries_and_keys():
    """With sharp attention (W_Q scaled up) the linear estimate of a query/key patch misses; AtP*'s
    recomputed softmax gets close to the exact effect."""
    torch.manual_seed(0)
    model = HookedGPT(tiny_cfg(**LLAMA_TINY)).eval()
    with torch.no_grad():
        for b in model.blocks:
            b.attn.W_Q.mul_(60)
            b.attn.W_O.mul_(20)
    clean, corrupt = _pair(model, seed=5)
    metric = P.LogitDiff(3, 5)
    lin = AP.attribution_patch(model, clean, corrupt, metric)
    star = AP.attribution_patch(model, clean, corrupt, metric, AP.AtPConfig(qk_fix=True))
    torch.testing.assert_close(star.z, lin.z)  # only queries and keys change
    errs = {"lin": [], "star": []}
    for kind, n in (("q", model.cfg.n_heads), ("k", model.cfg.n_kv)):
        for layer in range(model.cfg.n_layers):
            for pos in range(clean.shape[1]):
                for h in range(n):
                    exact = _exact_single(model, corrupt, clean, f"blocks.{layer}.attn.hook_{kind}", (pos, h), metric)
                    effect = exact - lin.corrupt
                    errs["lin"].append(abs(float(getattr(lin, kind)[layer, pos, h]) - effect))
                    errs["star"].append(abs(float(getattr(star, kind)[layer, pos, h]) - effect))
    assert sum(errs["star"]) < 0.5 * sum(errs["lin"]), (sum(errs["star"]), sum(errs["lin"]))


def test_atp_bad_input(model):
    clean, corrupt = _pair(model)
    with pytest.raises(InputError, match="differ in shape"):
        AP.attribution_patch(model, clean, corrupt[:, :5], P.LogitDiff(3, 5))
    with pytest.raises(InputError, match=r"metric returned shape \(3, 50\)"):
        AP.attribution_patch(model, clean, corrupt, lambda logits: logits)


def test_patching_page_attribution_mode(app_home, monkeypatch):
    """The attribution page's AtP mode draws its estimate for the tiny app model: at the corrupted token of
    block 0, patching the residual restores everything, and AtP's first-order estimate says so too (nearly)."""
    pytest.importorskip("streamlit")
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("WORKBENCH_HOME", str(app_home))
    monkeypatch.setenv("WORKBENCH_APP_MODEL", "tiny-lm")

    def script():
        from workbench.app.main import render_page

        render_page("attribution")

    at = AppTest.from_function(script, default_timeout=60)
    at.run()
    at.radio(key="attr_method").set_value("Attribution patching (AtP)").run()
    assert not at.exception, [e.value for e in at.exception]
    from test_app_pages import arr, fig_titled

    z = arr(fig_titled(at, "patching the clean residual stream")["data"][0]["z"])
    assert max(float(v) for v in z[0]) > 0.5  # the swapped token's residual in block 0 carries most of the effect
    at.selectbox(key="attr_patch").set_value("z").run()
    assert not at.exception, [e.value for e in at.exception]
