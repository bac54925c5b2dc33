"""Transcoder hook pairs, live pairs from one forward pass, and splice evaluation."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import LLAMA_TINY, tiny_cfg

from workbench import HookedGPT
from workbench.analysis.superposition import mmcs
from workbench.errors import ConfigError, DataError, HookError, InputError
from workbench.sae import transcoders as T
from workbench.sae.features import FeatureStatsConfig, feature_contexts, feature_stats
from workbench.sae.model import SAE, SAEConfig
from workbench.sae.train import TrainConfig, train_sae
from workbench.store import StoreConfig, open_store, write_store


def _tc(d=32, seed=0, zero=False):
    cfg = SAEConfig(d_in=d, d_sae=64, architecture="relu", d_out=d, apply_b_dec_to_input=False, skip=True)
    tc = SAE(cfg, seed=seed)
    if zero:
        with torch.no_grad():
            tc.W_dec.zero_()
    return tc.eval()


def test_only_an_mlps_input_output_pair_is_accepted():
    assert T.pair_layer("blocks.3.mlp.hook_in", "blocks.3.mlp.hook_out") == 3
    with pytest.raises(HookError, match="blocks.3.mlp.hook_in' -> 'blocks.3.mlp.hook_out"):
        T.pair_layer("blocks.3.ln2.hook_normalized", "blocks.3.hook_mlp_out")
    with pytest.raises(HookError, match="not the input/output pair"):
        T.pair_layer("blocks.1.mlp.hook_in", "blocks.2.mlp.hook_out")
    with pytest.raises(ConfigError, match="attention-only"):
        T.check_layers(HookedGPT(tiny_cfg(attn_only=True)), [0])
    with pytest.raises(InputError, match=r"layers \[5\] do not exist"):
        T.check_layers(HookedGPT(tiny_cfg()), [0, 5])
    assert T.parse_layers("all", 3) == [0, 1, 2] and T.parse_layers("0,2", 3) == [0, 2]
    with pytest.raises(InputError, match="comma-separated"):
        T.parse_layers("0-2", 3)


def test_live_pairs_are_the_mlps_inputs_and_outputs():
    torch.manual_seed(0)
    model = HookedGPT(tiny_cfg(n_layers=3, **LLAMA_TINY)).eval()
    windows = torch.randint(0, 50, (5, 9))
    batches = list(T.live_pairs(model, windows, [0, 2], batch_windows=2, first_position=1))
    assert len(batches) == 3 and set(batches[0]) == {0, 2}
    _, cache = model.run_with_cache(windows[:2])
    torch.testing.assert_close(batches[0][2].x, cache["blocks.2.mlp.hook_in"][:, 1:].reshape(-1, 32))
    torch.testing.assert_close(batches[0][2].y, cache["blocks.2.mlp.hook_out"][:, 1:].reshape(-1, 32))
    assert sum(b[0].x.shape[0] for b in batches) == 5 * 8


def test_live_pairs_under_bf16_autocast_come_back_fp32_and_close_to_fp32s():
    torch.manual_seed(0)
    model = HookedGPT(tiny_cfg(n_layers=3, **LLAMA_TINY)).eval()
    windows = torch.randint(0, 50, (4, 9))
    exact = next(T.live_pairs(model, windows, [0, 2], batch_windows=4, first_position=1))
    low = next(T.mixed_live_pairs(model, windows, [0, 2], 4, first_position=1, precision="bf16"))
    for layer in (0, 2):
        for name in ("x", "y"):
            a, b = getattr(exact[layer], name), getattr(low[layer], name)
            assert b.dtype == torch.float32 and b.shape == a.shape
            assert not torch.equal(a, b)  # it did run in bf16
            error = (a - b).pow(2).sum() / (a - a.mean(0)).pow(2).sum()
            assert error < 1e-3, (layer, name, float(error))
    # the model's own dtype is untouched
    assert model.embed.W_E.dtype == torch.float32
    with pytest.raises(ConfigError, match="precision='fp16' is unknown"):
        next(T.live_pairs(model, windows, [0], batch_windows=2, precision="fp16"))


def test_mixed_rows_cut_a_groups_rows_into_steps_that_each_read_most_of_its_windows():
    steps, b, r = 4, 3, 7
    index = T.mixed_rows(steps, b, r, seed=5, group=2)
    assert index.shape == (steps, b * r)
    assert sorted(index.reshape(-1).tolist()) == list(range(steps * b * r))  # every row once
    windows = index // r  # the window (group-wide) each row is taken from
    for j in range(steps):
        assert len(set(windows[j].tolist())) > 2 * b  # from most of the group's 12 windows, not its own 3
        for c in range(b):  # slot c of step j: rows of slot c's windows in the group's steps
            assert set((windows[j, c * r:(c + 1) * r] % b).tolist()) == {c}
    assert not torch.equal(index, T.mixed_rows(steps, b, r, seed=5, group=3))
    torch.testing.assert_close(index, T.mixed_rows(steps, b, r, seed=5, group=2), atol=0, rtol=0)
    # two processes holding slots 0-1 and 2-3 of b=4 take, together, what one process takes
    one = T.mixed_rows(steps, 4, r, seed=5, group=2)
    for rank in (0, 1):
        local = T.mixed_rows(steps, 2, r, seed=5, group=2, first_column=2 * rank)
        window, position = local // r, local % r  # local window t * 2 + c is window t * 4 + 2 * rank + c overall
        global_rows = ((window // 2) * 4 + 2 * rank + window % 2) * r + position
        torch.testing.assert_close(global_rows, one[:, rank * 2 * r:(rank + 1) * 2 * r], atol=0, rtol=0)


def test_mixed_live_pairs_are_the_same_tokens_in_both_hooks_and_resume_where_they_left_off():
    torch.manual_seed(0)
    model = HookedGPT(tiny_cfg(n_layers=2, **LLAMA_TINY)).eval()
    windows = torch.randint(0, 50, (10, 9))  # 5 steps of 2 windows: a group of 3 and one of 2
    plain = [b[1] for b in T.live_pairs(model, windows, [1], batch_windows=2, first_position=1)]
    mixed = [b[1] for b in T.mixed_live_pairs(model, windows, [1], 2, mix_steps=3, first_position=1, seed=4)]
    assert len(mixed) == 5 and all(m.x.shape == (16, 32) for m in mixed)
    x_all, y_all = torch.cat([p.x for p in plain]), torch.cat([p.y for p in plain])
    for m in mixed:  # each mixed row is one of the plain rows, its x and y together
        match = torch.cdist(m.x, x_all).argmin(dim=1)
        torch.testing.assert_close(m.x, x_all[match])
        torch.testing.assert_close(m.y, y_all[match])
    assert not torch.equal(mixed[0].x, plain[0].x)
    for start in (1, 3, 4):
        resumed = list(T.mixed_live_pairs(model, windows, [1], 2, mix_steps=3, first_position=1, seed=4,
                                          start_step=start))
        assert len(resumed) == 5 - start
        for a, b in zip(resumed, mixed[start:]):
            torch.testing.assert_close(a[1].x, b.x, atol=0, rtol=0)
    with pytest.raises(InputError, match="mix_steps=0"):
        next(T.mixed_live_pairs(model, windows, [1], 2, mix_steps=0))


def test_evaluation_of_a_transcoder_that_predicts_nothing_recovers_nothing():
    torch.manual_seed(0)
    model = HookedGPT(tiny_cfg(n_layers=2)).eval()
    windows = torch.randint(0, 50, (4, 12))
    empty = {0: _tc(zero=True), 1: _tc(seed=1, zero=True)}
    with torch.no_grad():
        for tc in empty.values():
            tc.W_skip.zero_()
    layers, whole = T.evaluate_transcoders(model, empty, windows, batch_windows=2)
    for ev in layers:
        assert ev.ce_spliced == pytest.approx(ev.ce_zero, abs=1e-6)
        assert ev.ce_loss_recovered == pytest.approx(0.0, abs=1e-5)
        assert ev.fvu == pytest.approx(1.0, rel=0.2)
    zeroed = model.run_with_hooks(windows, fwd_hooks=[(lambda n: n.endswith("mlp.hook_out"), lambda y, hook: y * 0)])
    logp = torch.log_softmax(zeroed[:, :-1], -1)
    ce = float(-logp.gather(-1, windows[:, 1:, None]).mean())
    assert whole.ce_replaced == pytest.approx(ce, abs=1e-5)
    assert 0 <= whole.top1_agreement <= 1 and whole.n_tokens == 4 * 11
    with pytest.raises(InputError, match="another model"):
        T.evaluate_transcoders(model, {0: _tc(d=16)}, windows)


def _stop_at_the_sixth_step(model, start, windows, cfg, out) -> None:
    """Run the fine-tune with the model's clean pass raising on its sixth call: a run killed in step 5, whose last
    checkpoint (every 2 steps) is step 4's."""
    real = model.run_with_cache
    calls = []

    def stop(*args, **kwargs):
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    model.run_with_cache = stop
    try:
        with pytest.raises(KeyboardInterrupt):
            T.finetune_on_kl(model, start, windows, cfg, out, log_every=1)
    finally:
        del model.run_with_cache


def test_kl_fine_tune_lowers_the_spliced_loss_resumes_exactly_and_gives_the_model_no_gradient(tmp_path):
    """Each layer's transcoder, spliced in alone, is fine-tuned on the KL to the real model: held-out CE with it
    spliced in falls for every layer. The model's weights get no gradient and the transcoders passed in are left
    as they were. A run stopped after its checkpoint resumes to the weights of an unbroken run; a checkpoint of
    other settings is not resumed."""
    torch.manual_seed(0)
    model = HookedGPT(tiny_cfg(n_layers=3, **LLAMA_TINY)).eval()
    windows = torch.randint(0, 50, (24, 12))
    names = [f"blocks.{layer}.{h}" for layer in range(3) for h in ("hook_resid_mid", "mlp.hook_out")]
    logits, cache = model.run_with_cache(windows[:4], names_filter=names)
    for layer in range(3):  # the real MLP output through the later blocks only: the model's own logits
        spliced = T.spliced_logits(model, layer, cache[f"blocks.{layer}.hook_resid_mid"],
                                   cache[f"blocks.{layer}.mlp.hook_out"], first_position=1)
        torch.testing.assert_close(spliced, logits[:, 1:], atol=1e-5, rtol=0)

    from workbench.pipelines import token_windows
    from workbench.zoo import load_model

    model = load_model("kjv-small").eval()  # a trained model, whose MLPs matter
    windows = token_windows(model, "kjv", 16, 24)
    start = {0: _tc(d=128, seed=0), 2: _tc(d=128, seed=2)}  # random: spliced in, worse than the MLP zeroed
    kept = {layer: tc.W_dec.clone() for layer, tc in start.items()}
    cfg = T.KLFinetuneConfig(steps=8, batch_windows=2, lr=1e-2, checkpoint_every=2)
    before = T.evaluate_transcoders(model, start, windows[16:], first_position=1)[0]
    tuned = T.finetune_on_kl(model, start, windows[:16], cfg, tmp_path / "whole", log_every=1)
    after = T.evaluate_transcoders(model, tuned.transcoders, windows[16:], first_position=1)[0]
    for b, a in zip(before, after):  # layer 0: 6.88 -> 4.72 (clean 4.03), layer 2: 4.21 -> 4.04 (clean 4.03)
        assert a.ce_spliced < b.ce_spliced - 0.1, (b, a)
    assert all(p.grad is None for p in model.parameters())
    assert all(torch.equal(start[layer].W_dec, kept[layer]) for layer in start)
    assert [h["step"] for h in tuned.history[0]] == list(range(8)) and tuned.resumed_from is None
    for tc in tuned.transcoders.values():
        torch.testing.assert_close(tc.W_dec.norm(dim=-1), torch.ones(64))

    _stop_at_the_sixth_step(model, start, windows[:16], cfg, tmp_path / "stopped")
    # a checkpoint written before KLFinetuneConfig had its `joint`, `precision` and `layer_steps` fields (so without
    # them) is the same fine-tune
    from workbench.runs import read_checkpoint, write_checkpoint

    state_path = tmp_path / "stopped" / "finetune" / "state.pt"
    state = read_checkpoint(state_path, "cpu")
    fingerprint = json.loads(state["fingerprint"])
    for added in ("joint", "precision", "layer_steps"):
        del fingerprint["settings"][added]
    write_checkpoint(state_path, {**state, "fingerprint": json.dumps(fingerprint)})
    resumed = T.finetune_on_kl(model, start, windows[:16], cfg, tmp_path / "stopped", log_every=1)
    assert resumed.resumed_from == 4 and resumed.history == tuned.history
    for layer in start:
        for name, tensor in tuned.transcoders[layer].state_dict().items():
            torch.testing.assert_close(resumed.transcoders[layer].state_dict()[name], tensor, atol=0, rtol=0)
    other = T.finetune_on_kl(model, start, windows[:16], T.KLFinetuneConfig(steps=8, batch_windows=2, lr=5e-3),
                             tmp_path / "stopped")
    assert other.resumed_from is None  # another learning rate: started over from the weights passed in
    with pytest.raises(InputError, match=r"needs \[>= 16, >= 3\] token windows"):
        T.finetune_on_kl(model, start, windows[:10], cfg)
    with pytest.raises(ConfigError, match="lr=0"):
        T.KLFinetuneConfig(steps=2, lr=0)
    with pytest.raises(ConfigError, match="precision='fp16' is unknown"):
        T.KLFinetuneConfig(steps=2, precision="fp16")


def test_a_joint_kl_fine_tune_lowers_the_loss_with_every_mlp_replaced_and_resumes_exactly(tmp_path):
    """``joint=True`` splices every transcoder in at once and tunes them together: held-out CE of the model with
    every chosen MLP replaced falls, the model gets no gradient, each layer logs its own FVU beside the shared KL,
    and the stage checkpoints in its own directory (``finetune_joint``), from which a stopped run resumes to the
    weights of an unbroken one."""
    from workbench.pipelines import token_windows
    from workbench.zoo import load_model

    model = load_model("kjv-small").eval()
    windows = token_windows(model, "kjv", 16, 24)
    start = {0: _tc(d=128, seed=0), 2: _tc(d=128, seed=2)}
    cfg = T.KLFinetuneConfig(steps=8, batch_windows=2, lr=1e-2, checkpoint_every=2, joint=True)
    before = T.evaluate_transcoders(model, start, windows[16:], first_position=1)[1]
    tuned = T.finetune_on_kl(model, start, windows[:16], cfg, tmp_path / "whole", log_every=1)
    after = T.evaluate_transcoders(model, tuned.transcoders, windows[16:], first_position=1)[1]
    assert after.ce_replaced < before.ce_replaced - 0.3, (before, after)  # 6.91 -> 5.02 (clean 4.03)
    assert after.kl < before.kl
    assert all(p.grad is None for p in model.parameters())
    assert (tmp_path / "whole" / "finetune_joint" / "state.pt").exists()
    assert not (tmp_path / "whole" / "finetune").exists()
    for step in range(8):  # one shared KL a step, each layer's own FVU
        assert tuned.history[0][step]["kl"] == tuned.history[2][step]["kl"]
        assert tuned.history[0][step]["fvu"] != tuned.history[2][step]["fvu"]

    _stop_at_the_sixth_step(model, start, windows[:16], cfg, tmp_path / "stopped")
    resumed = T.finetune_on_kl(model, start, windows[:16], cfg, tmp_path / "stopped", log_every=1)
    assert resumed.resumed_from == 4 and resumed.history == tuned.history
    for layer in start:
        for name, tensor in tuned.transcoders[layer].state_dict().items():
            torch.testing.assert_close(resumed.transcoders[layer].state_dict()[name], tensor, atol=0, rtol=0)


def test_layers_with_their_own_step_counts_take_them_and_the_others_are_unchanged(tmp_path):
    """``layer_steps`` gives layer 2 twelve steps beside layer 0's eight: layer 0 ends bit for bit where a plain
    eight-step run of both layers leaves it (each layer steps on its own KL, on its own schedule), layer 2
    takes four steps more on later windows, and a run stopped in step 5 resumes to the same weights."""
    from workbench.pipelines import token_windows
    from workbench.zoo import load_model

    model = load_model("kjv-small").eval()
    windows = token_windows(model, "kjv", 16, 24)
    start = {0: _tc(d=128, seed=0), 2: _tc(d=128, seed=2)}
    plain = T.finetune_on_kl(model, start, windows[:16], T.KLFinetuneConfig(steps=8, batch_windows=2, lr=1e-2))
    cfg = T.KLFinetuneConfig(steps=8, batch_windows=2, lr=1e-2, checkpoint_every=2, layer_steps=((2, 12),))
    own = T.finetune_on_kl(model, start, windows, cfg, tmp_path / "whole", log_every=1)
    assert own.steps == {0: 8, 2: 12}
    assert [h["step"] for h in own.history[0]] == list(range(8))
    assert [h["step"] for h in own.history[2]] == list(range(12))
    for name, tensor in plain.transcoders[0].state_dict().items():
        torch.testing.assert_close(own.transcoders[0].state_dict()[name], tensor, atol=0, rtol=0)
    assert not torch.equal(own.transcoders[2].W_dec, plain.transcoders[2].W_dec)
    _stop_at_the_sixth_step(model, start, windows, cfg, tmp_path / "stopped")
    resumed = T.finetune_on_kl(model, start, windows, cfg, tmp_path / "stopped", log_every=1)
    assert resumed.resumed_from == 4
    for layer in start:
        for name, tensor in own.transcoders[layer].state_dict().items():
            torch.testing.assert_close(resumed.transcoders[layer].state_dict()[name], tensor, atol=0, rtol=0)
    with pytest.raises(InputError, match=r"needs \[>= 24, >= 3\] token windows"):
        T.finetune_on_kl(model, start, windows[:16], cfg)
    with pytest.raises(InputError, match="layer_steps names layer 1"):
        T.finetune_on_kl(model, start, windows, T.KLFinetuneConfig(steps=8, batch_windows=2, layer_steps=((1, 4),)))
    with pytest.raises(ConfigError, match="per-layer only"):
        T.KLFinetuneConfig(steps=8, joint=True, layer_steps=((2, 12),))
    with pytest.raises(ConfigError, match="at least 1"):
        T.KLFinetuneConfig(steps=8, layer_steps=((2, 0),))


@pytest.mark.parametrize("joint", [False, True], ids=["per-layer", "joint"])
def test_a_bf16_kl_fine_tune_runs_the_model_under_autocast_and_still_lowers_the_loss(joint):
    """``precision="bf16"`` runs the model's passes under bfloat16 autocast (a step 1.77x faster on SmolLM2's
    layers 24 and 26, the same CE recovered), while the transcoders stay fp32: the loss falls as in fp32, the weights
    differ from an fp32 run's (autocast took effect) and the model gets no gradient."""
    from workbench.pipelines import token_windows
    from workbench.zoo import load_model

    model = load_model("kjv-small").eval()
    windows = token_windows(model, "kjv", 16, 24)
    start = {0: _tc(d=128, seed=0), 2: _tc(d=128, seed=2)}
    runs = {precision: T.finetune_on_kl(model, start, windows[:16], T.KLFinetuneConfig(
        steps=8, batch_windows=2, lr=1e-2, joint=joint, precision=precision)).transcoders
        for precision in ("fp32", "bf16")}
    ev = {name: T.evaluate_transcoders(model, tcs, windows[16:], first_position=1)
          for name, tcs in (("start", start), *runs.items())}
    # per-layer, spliced CE: layer 0 6.88 -> 4.718 fp32 / 4.717 bf16, layer 2 4.21 -> 4.043 / 4.041;
    # joint, every MLP replaced: 6.91 -> 5.019 / 5.017
    if joint:
        assert ev["bf16"][1].ce_replaced < ev["start"][1].ce_replaced - 0.3, ev
        assert ev["bf16"][1].ce_replaced == pytest.approx(ev["fp32"][1].ce_replaced, abs=0.1)
    else:
        for b, a, f in zip(ev["start"][0], ev["bf16"][0], ev["fp32"][0]):
            assert a.ce_spliced < b.ce_spliced - 0.1, (b, a)
            assert a.ce_spliced == pytest.approx(f.ce_spliced, abs=0.1)
    for layer in start:
        assert all(p.dtype == torch.float32 for p in runs["bf16"][layer].parameters())
        assert not torch.equal(runs["bf16"][layer].W_enc, runs["fp32"][layer].W_enc)
    assert all(p.grad is None for p in model.parameters())


def test_a_transcoder_recovers_planted_features_through_a_linear_map(one_thread):
    """x = sparse features along known input directions (an orthonormal basis, so the encoder is identifiable:
    data spanning only part of the space would leave the rest of each encoder column at its random start);
    y = a known linear map of x into fewer dimensions, so the features' images are in superposition.
    The encoder should find the input directions and the decoder their images (no skip term: it could
    learn the whole map itself)."""
    n_features = d_in = 32
    d_out = 24
    g = torch.Generator().manual_seed(0)
    inputs = torch.linalg.qr(torch.randn(d_in, n_features, generator=g)).Q.T  # [n_features, d_in]
    W = torch.randn(d_out, d_in, generator=g) / d_in**0.5
    outputs = inputs @ W.T  # each feature's image: what the decoder should learn

    def batches(start: int):
        step = start
        while True:
            gs = torch.Generator().manual_seed(1000 + step)
            present = torch.rand(512, n_features, generator=gs) < 3 / n_features
            x = (present * (0.5 + torch.rand(512, n_features, generator=gs))) @ inputs
            yield x, x @ W.T
            step += 1

    tc = SAE(SAEConfig(d_in=d_in, d_sae=64, architecture="batchtopk", k=3, apply_b_dec_to_input=False, d_out=d_out),
             seed=0)
    train_sae(tc, batches, TrainConfig(total_steps=300, lr=1e-2, dead_tokens=5000, progress=False))
    assert mmcs(tc.W_dec, outputs) >= 0.95
    assert mmcs(tc.W_enc.T, inputs) >= 0.95
    untrained = SAE(tc.cfg, seed=1)
    assert mmcs(untrained.W_dec, outputs) < 0.8 and mmcs(untrained.W_enc.T, inputs) < 0.8  # the score of no learning


def _store(model, tmp_path, hooks):
    windows = torch.randint(0, 50, (6, 9), generator=torch.Generator().manual_seed(0))
    write_store(model, windows, tmp_path / "store", StoreConfig(hooks=tuple(hooks), batch_windows=2, first_position=1))
    return open_store(tmp_path / "store")


def test_store_pairs_are_one_token_each_and_a_store_missing_a_hook_is_refused(tmp_path):
    torch.manual_seed(0)
    model = HookedGPT(tiny_cfg(n_layers=2)).eval()
    store = _store(model, tmp_path, ["blocks.1.mlp.hook_in", "blocks.1.mlp.hook_out", "blocks.0.mlp.hook_in"])
    x, y = next(iter(T.store_pairs(store, 1, batch_size=16)(0)))
    # the MLP applied to each x row gives its y row: the rows are the same tokens
    torch.testing.assert_close(model.blocks[1].mlp(x[None])[0], y, atol=1e-5, rtol=1e-5)
    with pytest.raises(DataError, match=r"lacks \['blocks.0.mlp.hook_out'\]"
                                        r".*--hooks blocks.0.mlp.hook_in,blocks.0.mlp.hook_out"):
        T.store_pairs(store, 0, batch_size=16)


def test_nan_in_either_stream_stops_training_with_a_clear_error(tmp_path):
    tc = _tc()
    good = torch.randn(8, 32)
    for x, y, which in ((good.clone(), good.clone(), "x"), (good.clone(), good.clone(), "y")):
        (x if which == "x" else y)[3, 5] = float("nan")
        with pytest.raises(DataError, match="NaN/Inf"):
            train_sae(tc, [(x, y)], TrainConfig(total_steps=1, progress=False), tmp_path / which)
        assert not (tmp_path / which / "checkpoint").exists()  # nothing half-written


def test_feature_statistics_of_a_transcoder_read_its_input_and_promote_logits_through_its_decoder(tmp_path):
    torch.manual_seed(0)
    model = HookedGPT(tiny_cfg(n_layers=2)).eval()
    store = _store(model, tmp_path, ["blocks.1.mlp.hook_in"])
    tc = _tc()
    tc.metadata = {"hook_name": "blocks.1.mlp.hook_in", "hook_name_out": "blocks.1.mlp.hook_out"}
    stats = feature_stats(tc, store, "blocks.1.mlp.hook_in", FeatureStatsConfig(n_logits=3, n_neighbours=2),
                          model=model)
    x = store.acts("blocks.1.mlp.hook_in")
    lat = tc.encode(x)
    torch.testing.assert_close(stats.density, (lat > 0).float().mean(0))
    torch.testing.assert_close(stats.top_values[:, 0], lat.max(0).values.clamp_min(0))
    # the logits a latent promotes: its decoder row (in the MLP's output space = the residual) through ln_final and W_U
    d = tc.W_dec.detach()
    effects = ((d - d.mean(-1, keepdim=True)) * model.ln_final.w) @ model.unembed.W_U
    torch.testing.assert_close(stats.logit_top_values, effects.topk(3, dim=-1).values, atol=1e-5, rtol=1e-5)
    best = int(stats.density.argmax())
    ctx = feature_contexts(tc, store, "blocks.1.mlp.hook_in", best, [int(stats.top_rows[best, 0])])
    assert ctx[0].value == pytest.approx(float(stats.top_values[best, 0]), rel=1e-5)


def test_nan_in_the_models_mlp_stream_stops_live_pairs_naming_the_layer_and_windows():
    torch.manual_seed(0)
    model = HookedGPT(tiny_cfg(n_layers=2)).eval()
    with torch.no_grad():
        model.blocks[1].mlp.W_out[0, 0] = float("nan")
    windows = torch.randint(0, 50, (4, 9))
    pairs = T.live_pairs(model, windows, [0, 1], batch_windows=2)
    with pytest.raises(DataError, match=r"layer 1's MLP input or output holds NaN/Inf in windows 0..1"):
        next(pairs)
