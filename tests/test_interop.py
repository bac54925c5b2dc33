"""TransformerLens interop: workbench -> TransformerBridge -> workbench, checked hook by hook."""

from __future__ import annotations

import pytest
import torch
from helpers import LLAMA_TINY, tiny_cfg

from workbench import HookedGPT
from workbench.errors import InputError

try:
    import transformer_lens.model_bridge  # noqa: F401

    HAVE_TL = True
except ImportError:
    HAVE_TL = False
#: every test but the missing-package one needs TransformerLens 4.x (the optional `test` extra)
needs_tl = pytest.mark.skipif(not HAVE_TL, reason="TransformerLens 4.x is not installed (pip install -e '.[test]')")

# hooks both sides name the same way (TransformerLens' classic names plus the 4.x component hooks)
BLOCK_HOOKS = ["hook_resid_pre", "ln1.hook_scale", "ln1.hook_normalized", "attn.hook_q", "attn.hook_k", "attn.hook_v",
               "attn.hook_attn_scores", "attn.hook_pattern", "attn.hook_z", "hook_attn_out", "hook_resid_mid",
               "ln2.hook_normalized", "mlp.hook_in", "mlp.hook_pre", "mlp.hook_post", "mlp.hook_out", "hook_mlp_out",
               "hook_resid_post"]
TOP_HOOKS = ["hook_embed", "ln_final.hook_scale", "ln_final.hook_normalized", "unembed.hook_in", "unembed.hook_out"]


def _agree(model: HookedGPT, bridge, tokens: torch.Tensor, atol: float, rtol: float = 0.0,
           scaled: bool = False) -> int:
    """Check every common hook (and the logits) of the model and the bridge; return how many hooks were compared.
    ``scaled``: tolerances relative to each tensor's largest magnitude (max |diff| <= atol * max |value|), for a
    model whose activations reach ~1e3, where float32 itself rounds at ~1e-4."""
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens)
        tl_logits, tl_cache = bridge.run_with_cache(tokens)

    def close(theirs: torch.Tensor, ours: torch.Tensor, name: str) -> None:
        if scaled:
            diff, scale = float((theirs - ours).abs().max()), float(ours.abs().max())
            assert diff <= atol * scale, f"{name}: max |diff| {diff:.3g} > {atol:g} x max |value| {scale:.3g}"
        else:
            torch.testing.assert_close(theirs, ours, atol=atol, rtol=rtol, msg=name)

    close(tl_logits, logits, "logits")
    names = TOP_HOOKS + (["hook_pos_embed"] if model.cfg.positional == "learned" else [])
    names += [f"blocks.{layer}.{h}" for layer in range(model.cfg.n_layers) for h in BLOCK_HOOKS]
    for name in names:
        ours, theirs = cache[name], tl_cache[name]
        assert ours.shape == theirs.shape, name
        if name.endswith("hook_attn_scores"):  # masked keys: -inf here, the dtype's minimum there
            causal = torch.isfinite(ours)
            assert (theirs[~causal] < -1e30).all(), name
            ours, theirs = ours[causal], theirs[causal]
        close(theirs, ours, name)
    return len(names)


def _assert_same_weights(a: HookedGPT, b: HookedGPT) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@needs_tl
def test_kjv_small_round_trips_through_transformer_lens():
    from workbench import load_model

    model = load_model("kjv-small")
    bridge = model.to_transformer_lens()
    tokens = model.to_tokens("In the beginning God created the heaven and the earth.")
    assert _agree(model, bridge, tokens, atol=1e-5) == 5 + 1 + 18 * model.cfg.n_layers
    back = HookedGPT.from_transformer_lens(bridge)
    _assert_same_weights(model, back)
    assert back.tokenizer.encode("And God said") == model.tokenizer.encode("And God said")
    assert back.tokenizer.bos_token_id == model.tokenizer.bos_token_id
    assert back.tokenizer.add_bos == model.tokenizer.add_bos


@needs_tl
def test_llama_family_round_trips(hf_tokenizer_dir):
    from workbench.tokenize import Tokenizer

    torch.manual_seed(0)
    model = HookedGPT(tiny_cfg(**LLAMA_TINY, d_vocab=100), tokenizer=Tokenizer.load(hf_tokenizer_dir)).eval()
    bridge = model.to_transformer_lens()
    _agree(model, bridge, torch.randint(0, 100, (2, 11)), atol=1e-5)
    _assert_same_weights(model, HookedGPT.from_transformer_lens(bridge))


@needs_tl
@pytest.mark.smollm2
def test_smollm2_agrees_with_its_bridge(smollm2):
    bridge = smollm2.to_transformer_lens()
    tokens = smollm2.to_tokens("The capital of France is")
    # 545 hooks: worst max |diff| / max |value| 4.3e-6 (blocks.6.attn.hook_z); in absolute terms up to 2e-3 on
    # mlp.hook_out, whose values reach ~1e3 (float32 rounding there), 372 of 545 within 1e-5 absolute
    assert _agree(smollm2, bridge, tokens, atol=1e-5, scaled=True) == 5 + 18 * smollm2.cfg.n_layers
    _assert_same_weights(smollm2, HookedGPT.from_transformer_lens(bridge))


@needs_tl
def test_bad_inputs_are_clear_errors():
    with pytest.raises(InputError, match="needs the model's tokenizer"):
        HookedGPT(tiny_cfg()).to_transformer_lens()
    with pytest.raises(InputError, match="takes a TransformerLens 4.x TransformerBridge"):
        HookedGPT.from_transformer_lens(object())


def test_a_missing_transformer_lens_names_the_package_to_install(monkeypatch, hf_tokenizer_dir):
    import sys

    from workbench.errors import ConfigError
    from workbench.tokenize import Tokenizer

    monkeypatch.setitem(sys.modules, "transformer_lens.model_bridge", None)  # import fails as if not installed
    model = HookedGPT(tiny_cfg(d_vocab=100), tokenizer=Tokenizer.load(hf_tokenizer_dir))
    with pytest.raises(ConfigError, match=r"TransformerLens 4.x is not installed: `pip install 'transformer-lens>=4"):
        model.to_transformer_lens()


def test_export_hf_writes_the_models_special_tokens_and_tokenizer(tmp_path, hf_tokenizer_dir):
    """to_hf() used GPT-2's 50256 for BOS/EOS in a 100-token vocabulary and saved no tokenizer."""
    import transformers

    from workbench.loading import export_hf, from_hf
    from workbench.tokenize import Tokenizer

    torch.manual_seed(0)
    tok = Tokenizer.load(hf_tokenizer_dir)
    model = HookedGPT(tiny_cfg(d_vocab=100), tokenizer=tok).eval()
    hf = model.to_hf()
    assert (hf.config.bos_token_id, hf.config.eos_token_id) == (tok.bos_token_id, tok.eos_token_id) == (1, 2)
    assert HookedGPT(tiny_cfg(d_vocab=100)).to_hf().config.bos_token_id is None  # no tokenizer: no made-up id
    export_hf(model, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf", local_files_only=True)
    assert hf_tok("t5 t7 t9")["input_ids"][-3:] == [5, 7, 9]
    assert hf_tok.bos_token_id == 1 and hf_tok.eos_token_id == 2
    back = from_hf(tmp_path / "hf")
    _assert_same_weights(model, back)
    assert back.tokenizer.encode("t5 t7") == [5, 7]
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True).eval()
    tokens = torch.randint(0, 100, (1, 9))
    with torch.no_grad():
        torch.testing.assert_close(loaded(tokens).logits, model(tokens), atol=1e-5, rtol=0)
