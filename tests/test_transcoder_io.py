"""Transcoders as SAE configs: the forward arithmetic, SAELens' layout and circuit-tracer's layout."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from workbench.errors import CheckpointError, ConfigError, InputError
from workbench.sae.circuit_tracer import load_circuit_tracer, save_circuit_tracer
from workbench.sae.io import load_sae, save_sae
from workbench.sae.model import SAE, SAEConfig


def _transcoder(architecture="relu", skip=True, d_in=12, d_out=10, d_sae=24, seed=0) -> SAE:
    cfg = SAEConfig(d_in=d_in, d_sae=d_sae, architecture=architecture, k=4, apply_b_dec_to_input=False, d_out=d_out,
                    skip=skip)
    tc = SAE(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():  # every parameter away from its initial value, so a dropped one shows
        for p in tc.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
        if architecture in ("jumprelu", "batchtopk"):
            tc.threshold.copy_(torch.rand(d_sae, generator=g) * 0.05)
    return tc.eval()


def test_config_says_what_a_transcoder_needs():
    with pytest.raises(ConfigError, match="apply_b_dec_to_input=False"):
        SAEConfig(d_in=4, d_sae=8, k=2, d_out=4)
    with pytest.raises(ConfigError, match="for transcoders"):
        SAEConfig(d_in=4, d_sae=8, k=2, skip=True)
    with pytest.raises(ConfigError, match="d_out=0"):
        SAEConfig(d_in=4, d_sae=8, k=2, d_out=0, apply_b_dec_to_input=False)
    assert SAEConfig(d_in=4, d_sae=8, k=2).out_dim == 4
    assert SAEConfig(d_in=4, d_sae=8, k=2, d_out=6, apply_b_dec_to_input=False).out_dim == 6


def test_forward_is_decoder_plus_skip():
    tc = _transcoder()
    x = torch.randn(5, 12)
    out = tc(x)
    latents = torch.relu(x @ tc.W_enc + tc.b_enc)
    torch.testing.assert_close(out.latents, latents)
    torch.testing.assert_close(out.x_hat, latents @ tc.W_dec + tc.b_dec + x @ tc.W_skip.T)
    assert out.x_hat.shape == (5, 10)
    fresh = SAE(SAEConfig(d_in=12, d_sae=8, architecture="relu", d_out=10, apply_b_dec_to_input=False, skip=True))
    assert fresh.W_skip.abs().sum() == 0


@pytest.mark.parametrize("architecture,skip,name", [("relu", False, "transcoder"), ("relu", True, "skip_transcoder"),
                                                    ("jumprelu", True, "jumprelu_skip_transcoder"),
                                                    ("batchtopk", False, "jumprelu_transcoder"),
                                                    ("topk", True, "topk_skip_transcoder")])
def test_saelens_layout_round_trips(tmp_path, architecture, skip, name):
    tc = _transcoder(architecture, skip)
    tc.metadata = {"hook_name": "blocks.1.mlp.hook_in", "hook_name_out": "blocks.1.mlp.hook_out"}
    save_sae(tc, tmp_path / "tc")
    cfg = json.loads((tmp_path / "tc" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_out"], cfg["hook_name_out"]) == (name, 10, "blocks.1.mlp.hook_out")
    back = load_sae(tmp_path / "tc")
    assert back.cfg == tc.cfg
    x = torch.randn(7, 12)
    torch.testing.assert_close(back(x).x_hat, tc(x).x_hat, atol=1e-6, rtol=0)


@pytest.mark.parametrize("architecture", ["relu", "jumprelu", "batchtopk"])
def test_circuit_tracer_layout_round_trips(tmp_path, architecture):
    layers = [_transcoder(architecture, skip=True, d_in=12, d_out=12, seed=s) for s in range(3)]
    save_circuit_tracer(layers, tmp_path / "set", model_name="kjv-small")
    config = yaml.safe_load((tmp_path / "set" / "config.yaml").read_text())
    assert (config["model_kind"], config["feature_input_hook"], config["feature_output_hook"]) == (
        "transcoder_set", "mlp.hook_in", "mlp.hook_out")
    assert [t["layer"] for t in config["transcoders"]] == [0, 1, 2]
    state = load_file(str(tmp_path / "set" / "layer_1.safetensors"))
    assert state["W_enc"].shape == (24, 12) and state["W_dec"].shape == (24, 12) and state["W_skip"].shape == (12, 12)
    assert ("activation_function.threshold" in state) == (architecture != "relu")
    back, _ = load_circuit_tracer(tmp_path / "set")
    x = torch.randn(9, 12)
    for ours, theirs in zip(layers, back):
        torch.testing.assert_close(theirs(x).x_hat, ours(x).x_hat, atol=1e-6, rtol=0)
        torch.testing.assert_close(theirs(x).latents, ours(x).latents, atol=1e-6, rtol=0)


def test_circuit_tracer_bad_sets_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="TopK transcoder"):
        save_circuit_tracer([_transcoder("topk")], tmp_path / "a", model_name="m")
    with pytest.raises(InputError, match="every layer or in none"):
        save_circuit_tracer([_transcoder(skip=True), _transcoder(skip=False)], tmp_path / "b", model_name="m")
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").iterdir())  # nothing half-written
    save_circuit_tracer([_transcoder(), _transcoder(seed=1)], tmp_path / "c", model_name="m")
    data = (tmp_path / "c" / "layer_1.safetensors").read_bytes()
    (tmp_path / "c" / "layer_1.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        load_circuit_tracer(tmp_path / "c")
    (tmp_path / "c" / "layer_1.safetensors").unlink()
    (tmp_path / "c" / "layer_2.safetensors").write_bytes(data)
    with pytest.raises(CheckpointError, match=r"found layers \[0, 2\]"):
        load_circuit_tracer(tmp_path / "c")
    with pytest.raises(CheckpointError, match="no config.yaml"):
        load_circuit_tracer(tmp_path)


def test_d_in_d_out_mismatches_on_load_name_the_tensor_and_shapes(tmp_path):
    save_sae(_transcoder(skip=True), tmp_path / "tc")
    cfg_path = tmp_path / "tc" / "cfg.json"
    cfg = json.loads(cfg_path.read_text())
    cfg_path.write_text(json.dumps({**cfg, "d_out": 11}))  # the weights map 12 -> 10
    with pytest.raises(CheckpointError, match=r"W_dec has shape \(24, 10\).*d_out=11"):
        load_sae(tmp_path / "tc")
    save_circuit_tracer([_transcoder(d_in=12, d_out=12, seed=s) for s in range(2)], tmp_path / "ct", model_name="m")
    layer = tmp_path / "ct" / "layer_1.safetensors"
    state = load_file(str(layer))
    save_file({**state, "W_skip": torch.zeros(12, 10)}, str(layer))
    with pytest.raises(CheckpointError, match=r"W_skip has shape \(12, 10\), expected \(12, 12\)"):
        load_circuit_tracer(tmp_path / "ct")
