"""Direct logit attribution: the pieces plus the constant are the model's logit, at every granularity."""

from __future__ import annotations

import pytest
import torch
from helpers import LLAMA_TINY, tiny_cfg

from workbench.analysis import attribution as A
from workbench.errors import InputError


@pytest.fixture(params=[{}, LLAMA_TINY, dict(attn_only=True, d_mlp=0, unembed_bias=True)],
                ids=["gpt2", "llama", "attn-only-ubias"])
def model(request):
    from workbench import HookedGPT

    m = HookedGPT(tiny_cfg(**request.param)).eval()
    with torch.no_grad():  # nonzero biases and norm parameters, so the constant term is really tested
        for p in m.parameters():
            if p.ndim == 1:
                p.add_(torch.randn_like(p) * 0.1)
    return m


@pytest.mark.parametrize("granularity", ["layer", "head"])
def test_attributions_plus_constant_sum_to_the_logit(model, granularity):
    tokens = torch.randint(0, 50, (3, 9))
    logits = model(tokens).detach()
    for wrong in (None, 7):
        res = A.direct_logit_attribution(model, tokens, answer=5, wrong=wrong, granularity=granularity)
        expect = logits[:, -1, 5] - (0 if wrong is None else logits[:, -1, wrong])
        torch.testing.assert_close(res.logit, expect)
        torch.testing.assert_close(res.attrs.sum(0) + res.constant, expect, atol=1e-4, rtol=1e-5)
    n_heads = model.cfg.n_layers * model.cfg.n_heads
    assert sum(lbl.startswith("L") for lbl in res.labels) == (n_heads if granularity == "head" else 0)


def test_per_row_answers_and_positions(model):
    tokens = torch.randint(0, 50, (2, 6))
    ans = torch.tensor([3, 4])
    res = A.direct_logit_attribution(model, tokens, ans, pos=2, granularity="head")
    logits = model(tokens).detach()
    torch.testing.assert_close(res.attrs.sum(0) + res.constant, logits[[0, 1], 2, ans], atol=1e-4, rtol=1e-5)
    heads = A.head_attribution_grid(res, model.cfg.n_layers, model.cfg.n_heads, batch_index=1)
    frame = res.frame(1)
    assert heads[1, 2].item() == pytest.approx(frame.set_index("component").loc["L1H2", "attribution"])
    assert set(frame.kind) >= {"embed", "head"}


def test_heads_plus_bias_equal_the_layer(model):
    tokens = torch.randint(0, 50, (2, 6))
    by_layer = A.direct_logit_attribution(model, tokens, 3, granularity="layer")
    by_head = A.direct_logit_attribution(model, tokens, 3, granularity="head")
    fh = by_head.frame()
    fl = by_layer.frame().set_index("component")
    for layer in range(model.cfg.n_layers):
        attn = fh[(fh.layer == layer) & fh.kind.isin(["head", "attn_bias"])].attribution.sum()
        assert attn == pytest.approx(fl.loc[f"{layer}_attn_out", "attribution"], abs=1e-4)


def test_answers_must_be_one_token():
    import tokenizers

    from workbench import HookedGPT
    from workbench.tokenize import Tokenizer

    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel({f"w{i}": i for i in range(50)}, unk_token="w0"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    model = HookedGPT(tiny_cfg(), tokenizer=Tokenizer(tk)).eval()
    assert A.token_id(model, "w7") == 7
    with pytest.raises(InputError, match="2 tokens"):
        A.token_id(model, "w7 w8")
    with pytest.raises(InputError, match="outside the vocabulary"):
        A.token_id(model, 99)


@pytest.mark.smollm2
def test_smollm2_attribution_sums_to_logit(smollm2):
    tokens = smollm2.to_tokens("The Eiffel Tower is in the city of")
    res = A.direct_logit_attribution(smollm2, tokens, " Paris", " London", granularity="head")
    torch.testing.assert_close(res.attrs.sum(0) + res.constant, res.logit, atol=2e-3, rtol=1e-4)
    assert res.logit.item() > 0


def test_an_empty_answer_is_named_as_the_answer_not_the_prompt():
    """Issue 13: --answer '' was reported as 'the prompt is empty'."""
    from workbench.analysis.attribution import token_id
    from workbench.errors import InputError
    from workbench.zoo import load_model

    with pytest.raises(InputError, match="the answer is empty"):
        token_id(load_model("kjv-small"), "")
