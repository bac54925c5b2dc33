"""Native checkpoints and HF directories: round trips, and bad files that fail whole and clearly."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import LLAMA_TINY, tiny_cfg
from safetensors.torch import load_file, save_file

from workbench import HookedGPT
from workbench.errors import CheckpointError
from workbench.loading import from_hf, is_native_checkpoint, load_weights


@pytest.mark.parametrize("overrides", [{}, LLAMA_TINY, dict(attn_only=True, positional="sinusoidal")])
def test_native_round_trip(tmp_path, overrides):
    model = HookedGPT(tiny_cfg(**overrides)).eval()
    model.save(tmp_path)
    assert is_native_checkpoint(tmp_path)
    assert not list(tmp_path.glob("*.tmp"))
    again = HookedGPT.load(tmp_path)
    assert again.cfg == model.cfg
    for (k, a), (_, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert torch.equal(a, b), k
    assert again.blocks[0].attn.W_Q.transpose(1, 2).is_contiguous()  # memory layout restored
    tokens = torch.randint(0, 50, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(tokens), again(tokens))


def test_truncated_weights_fail_clearly(tmp_path):
    HookedGPT(tiny_cfg()).save(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        HookedGPT.load(tmp_path)


def test_corrupt_config_fails_clearly(tmp_path):
    HookedGPT(tiny_cfg()).save(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        HookedGPT.load(tmp_path)


def test_missing_extra_and_misshaped_tensors_are_named(tmp_path):
    model = HookedGPT(tiny_cfg())
    model.save(tmp_path)
    state = load_file(str(tmp_path / "model.safetensors"))
    state.pop("blocks.1.mlp.W_out")
    state["blocks.0.attn.W_Q"] = torch.zeros(4, 32, 9)
    state["blocks.9.surprise"] = torch.zeros(1)
    save_file(state, str(tmp_path / "model.safetensors"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError) as err:
        load_weights(model, state)
    msg = str(err.value)
    assert "blocks.1.mlp.W_out" in msg and "blocks.9.surprise" in msg and "blocks.0.attn.W_Q: (4, 32, 9)" in msg
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # nothing half-loaded


def test_checkpoint_from_a_different_config(tmp_path):
    HookedGPT(tiny_cfg(d_mlp=128)).save(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["config"]["d_mlp"] = 64
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="wrong shapes: .*mlp.W_in"):
        HookedGPT.load(tmp_path)


def test_hf_directory_with_tokenizer(tmp_path, hf_tokenizer_dir):
    import shutil

    import transformers

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100,
                                                              n_positions=16)).eval()
    hf.save_pretrained(tmp_path)
    for f in hf_tokenizer_dir.iterdir():
        shutil.copy(f, tmp_path)
    model = from_hf(tmp_path)
    assert model.tokenizer is not None
    assert model.to_str_tokens("t5 t6 t7") == ["t5", "t6", "t7"]
    tokens = model.to_tokens("t5 t6 t7")
    assert tokens.tolist() == [[5, 6, 7]]
    with torch.no_grad():
        torch.testing.assert_close(model(tokens), hf(tokens).logits, atol=1e-4, rtol=0)


def test_hub_id_without_network_says_what_to_bring(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CheckpointError, match="download its config.json, model.safetensors"):
        from_hf("someone/not-a-model-here")


def test_unsupported_hf_architecture():
    from workbench.errors import ConfigError
    from workbench.loading import config_from_hf

    with pytest.raises(ConfigError, match="'mistral' is not supported"):
        config_from_hf({"model_type": "mistral"})


def test_hf_state_dict_with_a_missing_or_an_unused_tensor():
    import transformers

    from workbench.loading import from_hf_state_dict

    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=100,
                                                              n_positions=16))
    sd = dict(hf.state_dict())
    assert from_hf_state_dict(hf.config, sd).cfg.n_layers == 1
    with pytest.raises(CheckpointError, match="does not use.*h.1.mlp.c_fc.weight"):
        from_hf_state_dict(hf.config, {**sd, "transformer.h.1.mlp.c_fc.weight": torch.zeros(32, 128)})
    del sd["transformer.h.0.ln_2.bias"]
    with pytest.raises(CheckpointError, match="lacks tensor 'transformer.h.0.ln_2.bias'"):
        from_hf_state_dict(hf.config, sd)


# ------------------------------------------- issue 13: config values that used to be tracebacks or 8+ GB


@pytest.mark.parametrize("text,message", [
    ("", "cannot be read as JSON"), ("{not json", "cannot be read as JSON"), ("[1, 2]", "holds a JSON list"),
])
def test_hf_config_json_empty_invalid_or_a_list_is_one_line(tmp_path, text, message):
    from workbench.loading import export_hf

    export_hf(HookedGPT(tiny_cfg()), tmp_path)
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(CheckpointError, match=message) as info:
        from_hf(tmp_path)
    assert "\n" not in str(info.value)


def test_native_config_json_that_is_a_list_is_one_line(tmp_path):
    HookedGPT(tiny_cfg()).save(tmp_path)
    (tmp_path / "config.json").write_text("[]")
    assert not is_native_checkpoint(tmp_path)
    with pytest.raises(CheckpointError, match="not a workbench checkpoint"):
        HookedGPT.load(tmp_path)


def test_gpt2_config_without_n_embd_names_the_key(tmp_path):
    from workbench.errors import ConfigError
    from workbench.loading import export_hf

    export_hf(HookedGPT(tiny_cfg()), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["n_embd"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="the HF gpt2 config lacks 'n_embd'"):
        from_hf(tmp_path)


def test_llama_config_without_attention_bias_is_read_as_no_bias():
    """HF Llama configs may leave attention_bias out (its default is False); it was refused as a bias mismatch."""
    from workbench.loading import config_from_hf

    cfg = config_from_hf({"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
                          "intermediate_size": 128, "vocab_size": 50, "max_position_embeddings": 32})
    assert cfg.use_bias is False


@pytest.mark.parametrize("field,value,message", [
    ("d_model", 10**9, r"wrong shapes|does not fit"),
    ("d_model", 1e9, r"d_model must be an integer, got 1000000000.0"),
    ("n_layers", 10**9, r"n_layers=1000000000 but the weights hold 2 layers"),
    ("norm_eps", -1, r"norm_eps must be a positive finite number"),
    ("d_vocab", "50", r"d_vocab must be an integer"),
])
def test_native_config_with_sizes_the_weights_do_not_have_allocates_nothing(tmp_path, field, value, message):
    import resource

    HookedGPT(tiny_cfg()).save(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    raw["config"][field] = value
    (tmp_path / "config.json").write_text(json.dumps(raw))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(CheckpointError, match=message) as info:
        HookedGPT.load(tmp_path)
    assert "\n" not in str(info.value)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # KiB


def test_hf_config_with_a_huge_hidden_size_is_refused_before_allocating(tmp_path):
    from workbench.loading import export_hf

    export_hf(HookedGPT(tiny_cfg()), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["n_embd"] = 10**9
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="does not fit its config|does not fit this model configuration"):
        from_hf(tmp_path)
