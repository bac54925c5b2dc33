"""Transcoder hook pairs, live pairs from one forward pass, and splice evaluation."""

from __future__ import annotations

import pytest
import torch
from helpers import LLAMA_TINY, tiny_cfg

from workbench import HookedGPT
from workbench.errors import ConfigError, HookError, InputError
from workbench.sae import transcoders as T
from workbench.sae.model import SAE, SAEConfig


def _tc(d=32, seed=0, zero=False):
    tc = SAE(SAEConfig(d_in=d, d_sae=64, architecture="relu", d_out=d, apply_b_dec_to_input=False, skip=True), seed=seed)
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
