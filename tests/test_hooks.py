"""Hook points: observe, replace, clean up on error, fire once each, fail clearly."""

from __future__ import annotations

import pytest
import torch
from helpers import LLAMA_TINY, tiny_cfg

from workbench import HookedGPT
from workbench.errors import HookError

CONFIGS = {
    "gpt2": tiny_cfg(),
    "llama": tiny_cfg(**LLAMA_TINY),
    "attn-only-sinusoidal": tiny_cfg(attn_only=True, positional="sinusoidal"),
}


@pytest.fixture(params=list(CONFIGS), scope="module")
def model(request):
    torch.manual_seed(0)
    return HookedGPT(CONFIGS[request.param]).eval()


def test_identity_hooks_change_nothing(model):
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 10))
    with torch.no_grad():
        plain = model(tokens)
        hooked = model.run_with_hooks(tokens, fwd_hooks=[(lambda n: True, lambda x, hook: x.clone())])
    # every hook is on, so attention takes the explicit path: equal up to float rounding
    torch.testing.assert_close(hooked, plain, atol=1e-5, rtol=0)
    assert not any(hp.active for hp in model.hook_dict.values())


def test_every_hook_fires_once_with_its_declared_shape(model):
    calls: dict[str, list[tuple]] = {}
    tokens = torch.randint(0, model.cfg.d_vocab, (3, 7))
    with torch.no_grad():
        model.run_with_hooks(tokens, fwd_hooks=[
            (lambda n: True, lambda x, hook: calls.setdefault(hook.name, []).append(tuple(x.shape)))
        ])
    declared = model.hook_shapes(batch=3, pos=7)
    assert set(calls) == set(model.hook_names()) == set(declared)
    cfg = model.cfg
    for name, shapes in calls.items():
        assert len(shapes) == 1, f"{name} fired {len(shapes)} times"
        assert shapes[0] == declared[name]
    assert declared["blocks.0.attn.hook_pattern"] == (3, cfg.n_heads, 7, 7)
    assert declared["blocks.0.attn.hook_k"] == (3, 7, cfg.n_kv, cfg.d_head)
    assert declared["blocks.1.attn.hook_result"] == (3, 7, cfg.n_heads, cfg.d_model)
    assert declared["ln_final.hook_scale"] == (3, 7, 1)
    assert ("blocks.0.attn.hook_rot_q" in declared) == (cfg.positional == "rotary")
    assert ("blocks.0.mlp.hook_post" in declared) == (not cfg.attn_only)


def test_exception_in_hook_leaves_no_hook(model):
    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(torch.zeros(1, 4, dtype=torch.long), fwd_hooks=[("blocks.1.hook_resid_pre", boom)])
    assert not any(hp.active for hp in model.hook_dict.values())


def test_nested_contexts_remove_only_their_own_hooks(model):
    seen = []
    outer = ("hook_embed", lambda x, hook: seen.append("outer"))
    inner = ("hook_embed", lambda x, hook: seen.append("inner"))
    tokens = torch.zeros(1, 3, dtype=torch.long)
    with model.hooks([outer]):
        with model.hooks([inner]):
            model(tokens)
        model(tokens)
    model(tokens)
    assert seen == ["outer", "inner", "outer"]


def test_unknown_hook_name_lists_nearest(model):
    with pytest.raises(HookError, match=r"blocks\.0\.hook_resid_pre"):
        model.run_with_hooks(torch.zeros(1, 3, dtype=torch.long),
                             fwd_hooks=[("blocks.0.hook_resid_pr", lambda x, h: None)])
    with pytest.raises(HookError, match="nearest"):
        model.run_with_cache(torch.zeros(1, 3, dtype=torch.long), names_filter=["blocks.0.attn.hook_patern"])


def test_wrong_shape_from_hook_names_hook_and_shapes(model):
    with pytest.raises(HookError, match=r"blocks\.0\.hook_resid_post.*\(1, 3, 5\).*\(1, 3, 32\)"):
        model.run_with_hooks(torch.zeros(1, 3, dtype=torch.long),
                             fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x[..., :5])])
    assert not any(hp.active for hp in model.hook_dict.values())


def test_replacing_an_activation_propagates_as_computed_by_hand():
    """Zero head 1's z in layer 0; hook_attn_out must equal z_without_head1 @ W_O + b_O."""
    torch.manual_seed(1)
    model = HookedGPT(tiny_cfg()).eval()
    tokens = torch.randint(0, 50, (2, 6))
    _, clean = model.run_with_cache(tokens)

    def ablate(z, hook):
        z = z.clone()
        z[:, :, 1] = 0
        return z

    with torch.no_grad(), model.hooks([("blocks.0.attn.hook_z", ablate)]):
        _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.hook_attn_out", "blocks.0.hook_resid_mid"])
    attn = model.blocks[0].attn
    z = clean["blocks.0.attn.hook_z"].clone()
    z[:, :, 1] = 0
    expected = torch.einsum("bphd,hdm->bpm", z, attn.W_O) + attn.b_O
    torch.testing.assert_close(cache["blocks.0.hook_attn_out"], expected, atol=1e-5, rtol=0)
    torch.testing.assert_close(cache["blocks.0.hook_resid_mid"], clean["blocks.0.hook_resid_pre"] + expected,
                               atol=1e-5, rtol=0)


def test_replacing_the_pattern_is_what_attention_uses():
    """Force layer 0 to attend uniformly: z must be the running mean of v."""
    model = HookedGPT(tiny_cfg()).eval()
    tokens = torch.randint(0, 50, (1, 5))

    def uniform(pattern, hook):
        causal = torch.ones_like(pattern).tril()
        return causal / causal.sum(-1, keepdim=True)

    with torch.no_grad():
        _ = model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.attn.hook_pattern", uniform)])
        with model.hooks([("blocks.0.attn.hook_pattern", uniform)]):
            _, cache = model.run_with_cache(tokens, names_filter=["blocks.0.attn.hook_v", "blocks.0.attn.hook_z"])
    v, z = cache["blocks.0.attn.hook_v"], cache["blocks.0.attn.hook_z"]
    running_mean = v.cumsum(1) / torch.arange(1, 6)[None, :, None, None]
    torch.testing.assert_close(z, running_mean, atol=1e-6, rtol=0)


@pytest.mark.parametrize("variant", ["gpt2", "llama"])
def test_a_replaced_norm_scale_is_what_the_norm_divides_by(variant):
    """Caching only observes the scale (the fused kernel runs); a hook that returns a new scale, or
    changes it in place, is what the norm divides by (freezing LayerNorm scales relies on this)."""
    model = HookedGPT(tiny_cfg(**({} if variant == "gpt2" else LLAMA_TINY))).eval()
    tokens = torch.randint(0, 50, (2, 9))
    scale, normalized = "blocks.1.ln2.hook_scale", "blocks.1.ln2.hook_normalized"
    with torch.no_grad():
        clean = model(tokens)
        logits, cache = model.run_with_cache(tokens, names_filter=[scale, normalized])
        torch.testing.assert_close(logits, clean, atol=1e-6, rtol=0)
        seen = {}

        def grab(x, hook):
            seen["normalized"] = x.clone()

        def in_place(s, hook):
            s.mul_(2)
            return s

        for double in (lambda s, hook: s * 2, in_place):
            model.run_with_hooks(tokens, fwd_hooks=[(scale, double), (normalized, grab)])
            torch.testing.assert_close(seen["normalized"], cache[normalized] / 2, atol=1e-6, rtol=1e-5)
        frozen = model.run_with_hooks(tokens, fwd_hooks=[(scale, lambda s, hook: cache[scale].clone())])
        torch.testing.assert_close(frozen, clean, atol=1e-5, rtol=0)
        assert not torch.allclose(model.run_with_hooks(tokens, fwd_hooks=[(scale, lambda s, hook: s * 3)]), clean)


def test_reset_hooks_removes_hooks_added_outside_the_context_manager():
    model = HookedGPT(tiny_cfg()).eval()
    tokens = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        clean = model(tokens)
        model.hook_point("blocks.0.hook_resid_post").add(lambda x, hook: x * 0)
        assert not torch.equal(model(tokens), clean)
        model.reset_hooks()
        assert not any(hp.active for hp in model.hook_dict.values())
        assert torch.equal(model(tokens), clean)


def test_torch_module_hooks_on_a_hook_point_still_fire(model):
    """An empty hook point skips nn.Module's call machinery, but not when torch-level hooks are registered."""
    tokens = torch.randint(0, model.cfg.d_vocab, (1, 6))
    seen = []
    point = model.hook_point("blocks.0.hook_resid_pre")
    handle = point.register_forward_hook(lambda mod, args, out: seen.append(("local", mod.name, tuple(out.shape))))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        handle.remove()
    assert seen == [("local", "blocks.0.hook_resid_pre", (1, 6, model.cfg.d_model))]
    seen.clear()
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, args, out: (seen.append(mod.name)
                                if getattr(mod, "name", "") == "blocks.0.hook_resid_post" else None))
    try:
        with torch.no_grad():
            model(tokens)
    finally:
        handle.remove()
    assert seen == ["blocks.0.hook_resid_post"]
    with torch.no_grad():
        model(tokens)  # and once removed, nothing fires
    assert seen == ["blocks.0.hook_resid_post"]


def test_hooks_belong_to_the_thread_that_attached_them():
    """Two threads share one model: each forward pass sees only its own thread's hooks.

    Thread A holds a destructive hook open (inside ``hooks()``) while thread B runs plain and cached
    passes, which must equal a quiet run exactly; then A's own pass inside the block is still hooked."""
    import threading

    model = HookedGPT(tiny_cfg(**LLAMA_TINY)).eval()
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 9))
    with torch.no_grad():
        quiet = model(tokens)
        _, quiet_cache = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
    attached, done = threading.Event(), threading.Event()
    seen: dict[str, torch.Tensor] = {}

    def steer():
        with torch.no_grad(), model.hooks([(lambda n: n.endswith("hook_resid_post"), lambda x, hook: x * 0 + 100.0),
                                           ("blocks.1.attn.hook_pattern", lambda p, hook: torch.ones_like(p))]):
            attached.set()
            done.wait(timeout=30)
            seen["steered"] = model(tokens)

    def read():
        attached.wait(timeout=30)
        with torch.no_grad():
            seen["plain"] = model(tokens)
            seen["active"] = torch.tensor(any(hp.active for hp in model.hook_dict.values()))
            _, cache = model.run_with_cache(tokens, names_filter="blocks.1.attn.hook_pattern")
            seen["pattern"] = cache["blocks.1.attn.hook_pattern"]
        done.set()

    threads = [threading.Thread(target=steer), threading.Thread(target=read)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not seen["active"].item()
    assert torch.equal(seen["plain"], quiet)
    assert torch.equal(seen["pattern"], quiet_cache["blocks.1.attn.hook_pattern"])
    assert not torch.allclose(seen["steered"], quiet)  # A's hooks did fire in A's own pass
    assert not any(hp.active for hp in model.hook_dict.values())


def test_nested_blocks_closing_out_of_order_keep_the_inner_hooks():
    """Generators may close ``hooks()`` blocks out of order; each removes exactly its own hooks."""
    model = HookedGPT(tiny_cfg()).eval()
    point = model.hook_point("blocks.0.hook_resid_post")
    f, g = (lambda x, hook: None), (lambda x, hook: None)
    outer, inner = model.hooks([(point.name, f)]), model.hooks([(point.name, g)])
    outer.__enter__()
    inner.__enter__()
    assert point.fns == (f, g)
    outer.__exit__(None, None, None)
    assert point.fns == (g,)
    inner.__exit__(None, None, None)
    assert point.fns == () and not point.active


def test_clear_run_hooks_drops_what_an_abandoned_block_left():
    from workbench.hooks import clear_run_hooks

    model = HookedGPT(tiny_cfg()).eval()

    def stream():
        with model.hooks([("blocks.0.hook_resid_post", lambda x, hook: x * 0)]):
            yield 1
            yield 2

    gen = stream()
    next(gen)  # paused inside the block: this thread now carries the hook
    assert model.hook_point("blocks.0.hook_resid_post").active
    clear_run_hooks()
    assert not any(hp.active for hp in model.hook_dict.values())
    gen.close()  # its finally then finds nothing of its own to remove, and says nothing
    assert not any(hp.active for hp in model.hook_dict.values())


def test_bad_hook_functions_are_one_line_errors():
    model = HookedGPT(tiny_cfg()).eval()
    tokens = torch.randint(0, 50, (1, 5))
    with pytest.raises(HookError, match="not a function"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", "x * 2")])
    with pytest.raises(HookError, match=r"float64 tensor .* expected torch.float32"):
        model.run_with_hooks(tokens, fwd_hooks=[("blocks.0.hook_resid_post", lambda x, hook: x.double())])
    assert not any(hp.active for hp in model.hook_dict.values())


def test_mlp_and_unembed_in_out_hooks_hold_what_the_module_reads_and_writes():
    """mlp.hook_in is ln2's output after its weight (not ln2.hook_normalized); the out hooks equal the writes."""
    torch.manual_seed(0)
    model = HookedGPT(tiny_cfg(**LLAMA_TINY)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # norm weights away from 1, so the two inputs differ
        tokens = torch.randint(0, model.cfg.d_vocab, (2, 7))
        logits, cache = model.run_with_cache(tokens)
    block = model.blocks[1]
    torch.testing.assert_close(cache["blocks.1.mlp.hook_in"], cache["blocks.1.ln2.hook_normalized"] * block.ln2.w)
    assert not torch.allclose(cache["blocks.1.mlp.hook_in"], cache["blocks.1.ln2.hook_normalized"])
    torch.testing.assert_close(cache["blocks.1.mlp.hook_out"], cache["blocks.1.hook_mlp_out"], atol=0, rtol=0)
    torch.testing.assert_close(cache["unembed.hook_out"], logits, atol=0, rtol=0)
    torch.testing.assert_close(cache["unembed.hook_in"], cache["ln_final.hook_normalized"] * model.ln_final.w)
    _, stopped = model.run_with_cache(tokens, stop_at_layer=1)
    assert "unembed.hook_in" not in stopped and "hook_embed" in stopped
