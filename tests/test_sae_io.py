"""SAEs on disk in SAELens' layout, read back the way SAELens 6.x reads them.

SAELens itself stays out of the environment (it pins transformer-lens below 4), so its loader is
replayed here from its source: ``json.load(cfg.json)``, ``safe_open(sae_weights.safetensors)``
cast to ``cfg["dtype"]``, a strict ``load_state_dict`` into the class ``cfg["architecture"]``
names, and that class's encode/decode (``StandardSAE``, ``TopKSAE``, ``JumpReLUSAE``).
"""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

from workbench.errors import CheckpointError
from workbench.sae.io import SAELENS_FORMAT_VERSION, load_log_feature_density, load_sae, save_sae
from workbench.sae.model import SAE, SAEConfig

pytestmark = pytest.mark.usefixtures("one_thread")

#: SAELens 6.x ``SAEConfig`` fields (sae_lens/saes/sae.py), and the extra ones per architecture.
BASE_FIELDS = {"d_in", "d_sae", "dtype", "device", "apply_b_dec_to_input", "normalize_activations",
               "reshape_activations", "metadata", "architecture"}
EXTRA_FIELDS = {"standard": set(), "jumprelu": set(), "topk": {"k", "rescale_acts_by_decoder_norm"}}
STATE_KEYS = {"standard": {"W_enc", "W_dec", "b_enc", "b_dec"}, "topk": {"W_enc", "W_dec", "b_enc", "b_dec"},
              "jumprelu": {"W_enc", "W_dec", "b_enc", "b_dec", "threshold"}}
DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def saelens_read(path):
    """SAELens' sae_lens_disk_loader + read_sae_components_from_disk, minus SAELens."""
    cfg = json.loads((path / "cfg.json").read_text())
    state = {}
    with safe_open(str(path / "sae_weights.safetensors"), framework="pt", device="cpu") as f:
        for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
            state[key] = f.get_tensor(key).to(DTYPES[cfg["dtype"]])
    return cfg, state


def saelens_forward(cfg, state, x):
    """SAELens' encode then decode for the architecture ``cfg`` names (inference classes)."""
    sae_in = x - state["b_dec"] * cfg["apply_b_dec_to_input"]
    hidden_pre = sae_in @ state["W_enc"] + state["b_enc"]
    if cfg["architecture"] == "standard":
        acts = F.relu(hidden_pre)
    elif cfg["architecture"] == "topk":
        if cfg.get("rescale_acts_by_decoder_norm"):
            hidden_pre = hidden_pre * state["W_dec"].norm(dim=-1)
        top = hidden_pre.topk(cfg["k"], dim=-1)
        acts = torch.zeros_like(hidden_pre).scatter(-1, top.indices, F.relu(top.values))
    else:  # jumprelu: ReLU, then the per-latent threshold mask
        acts = F.relu(hidden_pre) * (hidden_pre > state["threshold"])
    W_dec = state["W_dec"]
    if cfg.get("rescale_acts_by_decoder_norm"):  # TopKSAE.decode: acts / ||W_dec|| before W_dec
        W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)
    return acts @ W_dec + state["b_dec"], acts


def _trained_like(arch: str, normalize: bool) -> SAE:
    """An SAE with every parameter non-trivial (and a non-unit input scale when ``normalize``)."""
    cfg = SAEConfig(d_in=12, d_sae=40, architecture=arch, k=5,
                    normalize_activations="expected_average_only_in" if normalize else "none")
    sae = SAE(cfg, seed=3)
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        sae.W_enc.add_(0.3 * torch.randn(sae.W_enc.shape, generator=g))
        sae.b_enc.copy_(0.2 * torch.randn(40, generator=g))
        sae.b_dec.copy_(torch.randn(12, generator=g))
        if arch in ("jumprelu", "batchtopk"):
            sae.threshold.copy_(0.3 * torch.rand(40, generator=g) + 0.05)
        if normalize:
            sae.norm_scale.fill_(2.7)
    sae.metadata = {"model_name": "tiny", "hook_name": "blocks.0.hook_resid_post", "context_size": 16}
    return sae.eval()


@pytest.mark.parametrize("arch,saelens_arch", [("relu", "standard"), ("topk", "topk"),
                                               ("jumprelu", "jumprelu"), ("batchtopk", "jumprelu")])
@pytest.mark.parametrize("normalize", [False, True])
def test_saelens_reads_the_same_sae(tmp_path, arch, saelens_arch, normalize):
    sae = _trained_like(arch, normalize)
    density = torch.log10(torch.rand(40, generator=torch.Generator().manual_seed(5)) + 1e-3)
    save_sae(sae, tmp_path, log_feature_density=density)

    cfg, state = saelens_read(tmp_path)
    assert cfg["architecture"] == saelens_arch
    assert set(cfg) == BASE_FIELDS | EXTRA_FIELDS[saelens_arch]  # SAELens filters unknown fields; none needed
    assert cfg["d_in"] == 12 and cfg["d_sae"] == 40 and cfg["dtype"] == "float32" and cfg["device"] == "cpu"
    assert cfg["normalize_activations"] == "none" and cfg["reshape_activations"] == "none"
    assert cfg["apply_b_dec_to_input"] is True
    if saelens_arch == "topk":
        assert cfg["k"] == 5 and cfg["rescale_acts_by_decoder_norm"] is False
    meta = cfg["metadata"]
    assert meta["sae_lens_version"] == SAELENS_FORMAT_VERSION  # >= 6: no pre-6.0 config conversion
    assert meta["model_name"] == "tiny" and meta["hook_name"] == "blocks.0.hook_resid_post"
    # strict load_state_dict: exactly these keys, these shapes, the dtype cfg.json names
    assert set(state) == STATE_KEYS[saelens_arch]
    assert state["W_enc"].shape == (12, 40) and state["W_dec"].shape == (40, 12)
    assert state["b_enc"].shape == (40,) and state["b_dec"].shape == (12,)
    if "threshold" in state:
        assert state["threshold"].shape == (40,)
    with safe_open(str(tmp_path / "sae_weights.safetensors"), framework="pt") as f:
        assert all(f.get_slice(k).get_dtype() == "F32" for k in f.keys())  # noqa: SIM118
    # sparsity.safetensors: {"sparsity": [d_sae]} log10 densities
    with safe_open(str(tmp_path / "sparsity.safetensors"), framework="pt") as f:
        assert list(f.keys()) == ["sparsity"]
        torch.testing.assert_close(f.get_tensor("sparsity"), density)

    # the function SAELens computes is the workbench SAE's (input scale folded into the weights)
    x = 3.0 * torch.randn(64, 12, generator=torch.Generator().manual_seed(6))
    x_hat, acts = saelens_forward(cfg, state, x)
    ours = sae(x)
    torch.testing.assert_close(x_hat, ours.x_hat, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(acts != 0, ours.latents != 0)
    assert (acts != 0).any()

    # and the workbench reads its own files back to the same SAE
    back = load_sae(tmp_path)
    assert back.cfg.architecture == arch and back.cfg.k == (5 if arch in ("topk", "batchtopk") else SAEConfig.k)
    torch.testing.assert_close(back(x).x_hat, ours.x_hat, atol=1e-5, rtol=1e-5)
    assert back.metadata["hook_name"] == "blocks.0.hook_resid_post"
    torch.testing.assert_close(load_log_feature_density(tmp_path), density)


def test_loads_what_saelens_writes(tmp_path):
    """A directory as SAELens 6.x's save_model leaves it: cfg.json from SAEConfig.to_dict(), extra
    cfg fields, a decoder-norm-rescaled TopK, no workbench record beside it."""
    g = torch.Generator().manual_seed(0)
    state = {"W_enc": torch.randn(8, 24, generator=g), "W_dec": torch.randn(24, 8, generator=g) * 3,
             "b_enc": torch.randn(24, generator=g), "b_dec": torch.randn(8, generator=g)}
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "sae_weights.safetensors"))
    cfg = {"architecture": "topk", "d_in": 8, "d_sae": 24, "dtype": "float32", "device": "cpu", "k": 3,
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "rescale_acts_by_decoder_norm": True,
           "metadata": {"sae_lens_version": "6.54.0", "model_name": "gpt2", "hook_name": "blocks.1.hook_resid_pre"}}
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    sae = load_sae(tmp_path)
    x = torch.randn(30, 8, generator=g)
    expected, _ = saelens_forward(cfg, state, x)
    torch.testing.assert_close(sae(x).x_hat, expected, atol=1e-5, rtol=1e-5)
    assert sae.cfg.k == 3 and sae.metadata["model_name"] == "gpt2"
    assert load_log_feature_density(tmp_path) is None


def test_bad_sae_directories_are_clear_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not an SAE directory"):
        load_sae(tmp_path)
    save_sae(_trained_like("jumprelu", False), tmp_path / "j")
    cfg = json.loads((tmp_path / "j" / "cfg.json").read_text())
    (tmp_path / "j" / "cfg.json").write_text(json.dumps({**cfg, "d_in": 13}))
    with pytest.raises(CheckpointError, match=r"W_enc has shape \(12, 40\).*d_in=13"):
        load_sae(tmp_path / "j")
    (tmp_path / "j" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated"}))
    with pytest.raises(CheckpointError, match="architecture 'gated' is not supported"):
        load_sae(tmp_path / "j")
    (tmp_path / "j" / "cfg.json").write_text(json.dumps({**cfg, "reshape_activations": "hook_z"}))
    with pytest.raises(CheckpointError, match="hook_z"):
        load_sae(tmp_path / "j")
    (tmp_path / "j" / "cfg.json").write_text(json.dumps(cfg))
    weights = tmp_path / "j" / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:-64])  # truncated
    with pytest.raises(CheckpointError, match="corrupt"):
        load_sae(tmp_path / "j")
    nan = _trained_like("relu", False)
    with torch.no_grad():
        nan.W_dec[3, 2] = float("nan")
    with pytest.raises(CheckpointError, match="NaN/Inf"):
        save_sae(nan, tmp_path / "nan")
    assert not (tmp_path / "nan" / "sae_weights.safetensors").exists()


def test_sae_config_from_dict_takes_ours_and_saelens_keys_and_refuses_others(tmp_path):
    """SAEConfig.from_dict raises on an unknown key, as GPTConfig.from_dict does (it used to drop it silently)."""
    from workbench.errors import ConfigError

    cfg = SAEConfig(d_in=16, d_sae=64, architecture="topk", k=4)
    assert SAEConfig.from_dict(cfg.to_dict()) == cfg
    sae = SAE(cfg, seed=0)
    save_sae(sae, tmp_path / "sae")
    saelens_cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())  # our cfg.json, in SAELens' layout
    assert SAEConfig.from_dict(saelens_cfg) == SAEConfig(d_in=16, d_sae=64, architecture="topk", k=4)
    with pytest.raises(ConfigError, match=r"unknown SAEConfig fields \['d_sea'\]"):
        SAEConfig.from_dict({**cfg.to_dict(), "d_sea": 64})
    # the shipped transcoders still load (their cfg.json carries SAELens' transcoder keys)
    from workbench.pipelines import load_transcoder_set

    assert sorted(load_transcoder_set("kjv-small")) == [0, 1, 2, 3]
