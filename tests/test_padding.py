"""Ragged batches: a padded row computes what its prompt computes alone, and what HF computes with its mask."""

from __future__ import annotations

import pytest
import torch
import transformers

from workbench.errors import InputError
from workbench.loading import from_hf
from workbench.model import GPTConfig, HookedGPT, KVCache
from workbench.padding import Batch, gather_last, last_positions, masked_mean, pad

LENGTHS = list(range(1, 41))  # the acceptance range


def _hf(kind: str):
    torch.manual_seed(0)
    if kind == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(
            n_embd=32, n_layer=2, n_head=4, vocab_size=61, n_positions=48, bos_token_id=1, eos_token_id=2))
    else:  # grouped-query attention and RoPE
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(
            hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
            vocab_size=61, max_position_embeddings=48, bos_token_id=1, eos_token_id=2))
    with torch.no_grad():  # norms at exactly 1 and biases at 0 would hide mistakes
        for p in hf.parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return hf.eval()


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def family(request):
    hf = _hf(request.param)
    return hf, from_hf(hf)


@pytest.fixture(scope="module")
def prompts():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(3, 61, (n,), generator=gen).tolist() for n in LENGTHS]


def _real(x: torch.Tensor, row: int, batch: Batch) -> torch.Tensor:
    """Row ``row`` of a ``[batch pos ...]`` activation at its real positions."""
    return x[row][batch.attention_mask[row]]


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_rows_equal_prompts_alone_at_every_hook(family, prompts, side, one_thread):
    _, model = family
    batch = pad(prompts, pad_id=0, padding_side=side)
    worst: dict[str, float] = {}
    with torch.no_grad():
        worst["logits (SDPA path)"] = 0.0
        logits = model(batch)
        _, cache = model.run_with_cache(batch)  # the explicit attention path (the pattern is cached)
        assert torch.isfinite(logits).all() and torch.isfinite(cache["ln_final.hook_scale"]).all()  # padding too
        for row, prompt in enumerate(prompts):
            alone_logits, alone = model.run_with_cache(torch.tensor([prompt]))
            pairs = [("logits (SDPA path)", _real(logits, row, batch), alone_logits[0])]
            keep = batch.attention_mask[row]
            for name, act in cache.items():
                if name.endswith(("hook_attn_scores", "hook_pattern")):  # [batch head query key]
                    pairs.append((name, act[row][:, keep][:, :, keep], alone[name][0]))
                else:
                    pairs.append((name, _real(act, row, batch), alone[name][0]))
            for name, got, expected in pairs:
                assert got.shape == expected.shape, name
                # -inf (masked scores) minus -inf is NaN: equal, so not a difference; -inf vs a number is inf
                diff = (got - expected).abs().nan_to_num(nan=0.0).max().item()
                worst[name] = max(worst.get(name, 0.0), diff)
    assert len(worst) == len(cache) + 1
    bad = {name: d for name, d in worst.items() if not d <= 1e-5}
    assert not bad, f"largest differences from the prompts run alone: {bad}"


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_logits_equal_hf_with_attention_mask(family, prompts, side, one_thread):
    hf, model = family
    batch = pad(prompts, pad_id=0, padding_side=side)
    # HF's own generate() passes position ids counted from the first real token; its forward
    # counts them from column 0 unless told (GPT-2's learned positions would then shift)
    position_ids = (batch.attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(batch.tokens, attention_mask=batch.attention_mask.long(), position_ids=position_ids).logits
        got, _ = model.run_with_cache(batch, names_filter=["blocks.0.attn.hook_pattern"])
        got_sdpa = model(batch.tokens, attention_mask=batch.attention_mask)
    keep = batch.attention_mask
    torch.testing.assert_close(got[keep], expected[keep], atol=1e-4, rtol=0)
    torch.testing.assert_close(got_sdpa[keep], expected[keep], atol=1e-4, rtol=0)


def test_kv_cache_continues_a_padded_prompt(family, prompts):
    """Prefill a left-padded batch into a KV cache, then feed tokens one by one: each row's logits equal
    the unpadded prompt plus those tokens run alone."""
    _, model = family
    some = [prompts[i] for i in (0, 6, 19)]
    batch = pad(some, pad_id=0, padding_side="left")
    extra = torch.randint(3, 61, (3, 4))
    kv = KVCache.empty(model.cfg, 3, batch.tokens.shape[1] + 4)
    with torch.no_grad():
        model(batch, kv_cache=kv)
        steps = torch.stack([model(extra[:, i: i + 1], kv_cache=kv)[:, -1] for i in range(4)], dim=1)
        for row, prompt in enumerate(some):
            alone = model(torch.cat([torch.tensor(prompt), extra[row]])[None])[0, -4:]
            torch.testing.assert_close(steps[row], alone, atol=1e-5, rtol=0)


def test_unpadded_mask_takes_the_mask_free_path(family):
    _, model = family
    tokens = torch.randint(0, 61, (2, 7))
    with torch.no_grad():
        assert torch.equal(model(tokens, attention_mask=torch.ones(2, 7, dtype=torch.long)), model(tokens))


# -- bad input ------------------------------------------------------------------------------------


def test_mask_of_the_wrong_shape_is_refused(family):
    _, model = family
    with pytest.raises(InputError, match=r"attention_mask has shape \(2, 5\) but the tokens have \(2, 6\)"):
        model(torch.zeros(2, 6, dtype=torch.long), attention_mask=torch.ones(2, 5, dtype=torch.bool))


def test_row_of_padding_only_is_refused(family):
    _, model = family
    mask = torch.tensor([[1, 1, 1], [0, 0, 0]])
    with pytest.raises(InputError, match="row 1 of the batch is all padding"):
        model(torch.zeros(2, 3, dtype=torch.long), attention_mask=mask)
    with pytest.raises(InputError, match="row 1 of the batch is all padding"):
        model.run_with_cache(torch.zeros(2, 3, dtype=torch.long), attention_mask=mask)


def test_non_binary_mask_and_batch_plus_mask_are_refused(family):
    _, model = family
    tokens = torch.zeros(1, 3, dtype=torch.long)
    with pytest.raises(InputError, match="0/1"):
        model(tokens, attention_mask=torch.tensor([[1, 2, 1]]))
    with pytest.raises(InputError, match="pass one or the other"):
        model(Batch(tokens, torch.ones(1, 3, dtype=torch.bool)), attention_mask=torch.ones(1, 3, dtype=torch.bool))


# -- tokenizers and helpers -----------------------------------------------------------------------------------


def _word_tokenizer(pad_token_id=None, eos=2, bos=1):
    from tokenizers import Tokenizer as HFTok
    from tokenizers import models, pre_tokenizers

    from workbench.tokenize import Tokenizer

    tk = HFTok(models.WordLevel({f"t{i}": i for i in range(61)}, unk_token="t0"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return Tokenizer(tk, bos_token_id=bos, eos_token_id=eos, add_bos=False, pad_token_id=pad_token_id)


def _tiny_model(tokenizer) -> HookedGPT:
    cfg = GPTConfig(d_model=32, n_layers=2, n_heads=4, d_mlp=64, d_vocab=61, n_ctx=16)
    return HookedGPT(cfg, tokenizer=tokenizer)


@pytest.mark.parametrize("side", ["left", "right"])
def test_to_batch_pads_with_the_pad_token(side):
    model = _tiny_model(_word_tokenizer(pad_token_id=3))
    batch = model.to_batch(["t10 t11 t12", "t20"], padding_side=side)
    if side == "left":
        assert batch.tokens.tolist() == [[10, 11, 12], [3, 3, 20]]
        assert batch.attention_mask.tolist() == [[True] * 3, [False, False, True]]
    else:
        assert batch.tokens.tolist() == [[10, 11, 12], [20, 3, 3]]
    assert batch.lengths.tolist() == [3, 1]
    with pytest.raises(InputError, match="model.to_batch"):  # to_tokens keeps refusing ragged prompts, and says why
        model.to_tokens(["t10 t11 t12", "t20"])


def test_tokenizer_without_pad_token_says_which_token_pads():
    model = _tiny_model(_word_tokenizer(pad_token_id=None, eos=2))
    with pytest.warns(UserWarning, match=r"no pad token; padding with its EOS token 't2' \(id 2\)"):
        batch = model.to_batch(["t10 t11", "t20"])
    assert batch.tokens[1, 0] == 2
    bare = _tiny_model(_word_tokenizer(pad_token_id=None, eos=None, bos=None))
    with pytest.raises(InputError, match="no pad, EOS or BOS token"):
        bare.to_batch(["t10 t11", "t20"])


def test_bad_padding_side_and_empty_prompt_are_refused():
    model = _tiny_model(_word_tokenizer(pad_token_id=3))
    with pytest.raises(InputError, match="padding_side='middle'"):
        model.to_batch(["t1"], padding_side="middle")
    with pytest.raises(InputError, match="prompt 1 is empty"):
        model.to_batch(["t1", ""])


def test_pad_token_survives_save_and_load(tmp_path):
    from workbench.tokenize import Tokenizer

    _word_tokenizer(pad_token_id=3).save(tmp_path)
    assert Tokenizer.load(tmp_path).pad_token_id == 3


def test_gather_last_and_masked_mean():
    mask = torch.tensor([[False, True, True], [True, False, False]])
    x = torch.arange(6.0).reshape(2, 3)
    assert last_positions(mask).tolist() == [2, 0]
    assert gather_last(x, mask).tolist() == [2.0, 3.0]
    assert gather_last(x, None).tolist() == [2.0, 5.0]
    assert masked_mean(x, mask).item() == pytest.approx((1 + 2 + 3) / 3)
    scores = torch.tensor([[float("-inf"), 1.0, 2.0], [4.0, float("-inf"), 0.0]])  # -inf at padding stays out
    assert masked_mean(scores, mask, dims=(1,)).tolist() == [1.5, 4.0]


def test_cache_knows_where_the_real_tokens_are(family, prompts):
    _, model = family
    some = [prompts[i] for i in (2, 9, 30)]
    for side in ("left", "right"):
        batch = pad(some, pad_id=0, padding_side=side)
        with torch.no_grad():
            _, cache = model.run_with_cache(batch, names_filter=["blocks.1.hook_resid_post"])
            alone = [model.run_with_cache(torch.tensor([p]), names_filter=["blocks.1.hook_resid_post"])[1]
                     for p in some]
        assert torch.equal(cache.attention_mask, batch.attention_mask)
        name = "blocks.1.hook_resid_post"
        torch.testing.assert_close(cache.last_real(name), torch.stack([c[name][0, -1] for c in alone]),
                                   atol=1e-5, rtol=0)
        pooled = torch.cat([c[name][0] for c in alone]).mean(0)  # every real token counts once
        torch.testing.assert_close(cache.mean_over_real(name), pooled, atol=1e-5, rtol=0)


# -- generation ------------------------------------------------------------------------------------------


def test_batched_greedy_generation_of_ragged_prompts_equals_one_by_one(family, prompts, one_thread):
    from workbench.generate import generate

    _, model = family
    some = [prompts[i] for i in (0, 3, 17, 39)]
    batch = pad(some, pad_id=0, padding_side="left")
    out = generate(model, batch, max_new_tokens=6, stop_tokens=[])
    no_cache = generate(model, batch, max_new_tokens=6, stop_tokens=[], use_cache=False)
    assert torch.equal(out.tokens, no_cache.tokens)
    assert torch.equal(out.attention_mask[:, : out.prompt_len], batch.attention_mask)
    for row, prompt in enumerate(some):
        alone = generate(model, torch.tensor(prompt), max_new_tokens=6, stop_tokens=[])
        assert out.new_tokens[row].tolist() == alone.new_tokens[0].tolist(), f"prompt of length {len(prompt)}"


def test_generate_takes_texts_of_different_lengths():
    model = _tiny_model(_word_tokenizer(pad_token_id=3))
    texts = ["t10 t11 t12 t13 t14", "t20", "t30 t31"]
    out = model.generate(texts, max_new_tokens=5, stop_tokens=[])
    for row, text in enumerate(texts):
        alone = model.generate(text, max_new_tokens=5, stop_tokens=[])
        assert out.texts[row] == alone.texts[0]
        assert out.new_tokens[row].tolist() == alone.new_tokens[0].tolist()


def test_right_padding_in_generation_is_refused(family, prompts):
    from workbench.generate import generate

    _, model = family
    batch = pad([prompts[0], prompts[4]], pad_id=0, padding_side="right")
    with pytest.raises(InputError, match="generation needs left padding"):
        generate(model, batch, max_new_tokens=2)


# -- analyses on a ragged IOI-like set ------------------------------------------------------------------------


def _ioi_set():
    """'BOS When A and B went, B gave it to' with names of one to three tokens: clean prompts, their corrupted
    twins (the second B replaced by a name C of the same length) and the answer (A's first token) and wrong
    (B's first token) ids. Token ids stand in for words: the model is random, the equalities are exact."""
    gen = torch.Generator().manual_seed(2)
    name = lambda n: torch.randint(20, 61, (n,), generator=gen).tolist()  # noqa: E731
    clean, corrupt, answer, wrong = [], [], [], []
    for a_len, b_len in [(1, 1), (2, 1), (1, 3), (3, 2), (2, 2), (1, 2)]:
        a, b, c = name(a_len), name(b_len), name(b_len)
        head = [1, 4, *a, 5, *b, 6, 7]
        clean.append(head + [*b, 8, 9, 10])
        corrupt.append(head + [*c, 8, 9, 10])
        answer.append(a[0])
        wrong.append(b[0])
    return clean, corrupt, torch.tensor(answer), torch.tensor(wrong)


@pytest.mark.parametrize("side", ["left", "right"])
def test_head_scores_on_a_ragged_set_pool_the_prompts_scores(family, side, one_thread):
    from workbench.analysis.induction import SCORE_KINDS, score_heads, score_masks

    _, model = family
    clean, _, _, _ = _ioi_set()
    batched = score_heads(model, pad(clean, pad_id=0, padding_side=side))
    sums = {k: 0.0 for k in SCORE_KINDS}
    counts = dict.fromkeys(SCORE_KINDS, 0)
    for prompt in clean:
        tokens = torch.tensor([prompt])
        alone = score_heads(model, tokens)
        for k, m in score_masks(tokens).items():
            n = int(m.any(-1).sum())  # queries that count for this score
            sums[k] = sums[k] + alone.get(k) * n
            counts[k] += n
    for k in SCORE_KINDS:
        torch.testing.assert_close(batched.get(k), sums[k] / counts[k], atol=1e-5, rtol=0, msg=k)
    n_predictions = sum(len(p) - 1 for p in clean)
    assert int((~batched.loss.isnan()).sum()) == n_predictions  # pad predictions are NaN, real ones are not


@pytest.mark.parametrize("side", ["left", "right"])
def test_logit_lens_on_a_ragged_set_equals_each_prompt(family, side, one_thread):
    from workbench.analysis.logit_lens import logit_lens

    _, model = family
    clean, _, _, _ = _ioi_set()
    batch = pad(clean, pad_id=0, padding_side=side)
    lens = logit_lens(model, batch)
    kl_sum, n_tokens = 0.0, 0
    for row, prompt in enumerate(clean):
        alone = logit_lens(model, torch.tensor([prompt]))
        keep = batch.attention_mask[row]
        for field in ("top_tokens", "target_rank"):
            assert torch.equal(getattr(lens, field)[:, row][:, keep], getattr(alone, field)[:, 0]), field
        for field in ("top_probs", "target_prob", "entropy", "kl_to_final"):
            torch.testing.assert_close(getattr(lens, field)[:, row][:, keep], getattr(alone, field)[:, 0],
                                       atol=1e-5, rtol=0, equal_nan=True, msg=field)
        kl_sum = kl_sum + alone.kl_to_final[:, 0].sum(-1)
        n_tokens += len(prompt)
    pooled = torch.stack([masked_mean(lens.kl_to_final[i], batch.attention_mask) for i in range(len(lens.labels))])
    torch.testing.assert_close(pooled, kl_sum / n_tokens, atol=1e-6, rtol=0)
    assert (lens.target_rank[:, ~batch.attention_mask] == -1).all()  # no target at padding


@pytest.mark.parametrize("side", ["left", "right"])
def test_patching_on_a_ragged_set_equals_the_prompts_averaged(family, side, one_thread):
    from workbench.analysis.patching import LogitDiff, ablate, patch_heads, patch_outputs

    _, model = family
    clean, corrupt, answer, wrong = _ioi_set()
    clean_b, corrupt_b = pad(clean, 0, side), pad(corrupt, 0, side)
    batched = {
        "heads": patch_heads(model, clean_b, corrupt_b, LogitDiff(answer, wrong)),
        "attn_out": patch_outputs(model, clean_b, corrupt_b, LogitDiff(answer, wrong), kind="attn_out",
                                  per_position=False),
        "ablate_zero": ablate(model, clean_b, LogitDiff(answer, wrong), method="zero"),
        "ablate_mean": ablate(model, clean_b, LogitDiff(answer, wrong), method="mean"),
    }
    # the mean ablation's mean is pooled over every real token of the set; each prompt gets that set as its
    # reference, padded wider and with another pad id, so that a mean which counted padding would differ
    extra = (5, 0) if side == "left" else (0, 5)
    wider = Batch(torch.nn.functional.pad(clean_b.tokens, extra, value=9),
                  torch.nn.functional.pad(clean_b.attention_mask, extra, value=False))
    per_prompt = {k: [] for k in batched}
    for i in range(len(clean)):
        c, x, metric = torch.tensor([clean[i]]), torch.tensor([corrupt[i]]), LogitDiff(answer[i], wrong[i])
        per_prompt["heads"].append(patch_heads(model, c, x, metric))
        per_prompt["attn_out"].append(patch_outputs(model, c, x, metric, kind="attn_out", per_position=False))
        per_prompt["ablate_zero"].append(ablate(model, c, metric, method="zero"))
        per_prompt["ablate_mean"].append(ablate(model, c, metric, method="mean", reference=wider))
    for key, result in batched.items():
        expected = torch.stack([r.scores for r in per_prompt[key]]).mean(0)
        torch.testing.assert_close(result.scores, expected, atol=1e-5, rtol=0, msg=key)
    for field in ("clean", "corrupt"):
        assert getattr(batched["heads"], field) == pytest.approx(
            sum(getattr(r, field) for r in per_prompt["heads"]) / len(clean), abs=1e-5)


def test_patching_refuses_prompts_padded_differently(family):
    from workbench.analysis.patching import LogitDiff, patch_heads

    _, model = family
    clean, corrupt, answer, wrong = _ioi_set()
    with pytest.raises(InputError, match="padded differently"):
        patch_heads(model, pad(clean, 0, "left"), pad(corrupt[1:] + corrupt[:1], 0, "left"), LogitDiff(answer, wrong))


def test_run_with_hooks_takes_a_batch(family, prompts):
    _, model = family
    batch = pad([prompts[2], prompts[11]], pad_id=0, padding_side="left")
    seen = {}

    def record(x, hook):
        seen[hook.name] = x.clone()

    name = "blocks.1.hook_resid_post"
    with torch.no_grad():
        logits = model.run_with_hooks(batch, fwd_hooks=[(name, record)])
        _, alone = model.run_with_cache(torch.tensor([prompts[2]]), names_filter=[name])
    torch.testing.assert_close(_real(seen[name], 0, batch), alone[name][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(logits, model(batch), atol=0, rtol=0)


@pytest.mark.parametrize("side", ["left", "right"])
def test_direct_logit_attribution_on_a_ragged_set_equals_each_prompt(family, side, one_thread):
    from workbench.analysis.attribution import direct_logit_attribution

    _, model = family
    clean, _, answer, wrong = _ioi_set()
    batch = pad(clean, pad_id=0, padding_side=side)
    for granularity in ("layer", "head"):
        got = direct_logit_attribution(model, batch, answer, wrong, granularity=granularity)
        for row, prompt in enumerate(clean):
            alone = direct_logit_attribution(model, torch.tensor([prompt]), answer[row], wrong[row],
                                             granularity=granularity)
            assert got.labels == alone.labels
            torch.testing.assert_close(got.attrs[:, row], alone.attrs[:, 0], atol=1e-5, rtol=0)
            torch.testing.assert_close(got.logit[row], alone.logit[0], atol=1e-5, rtol=0)
    with pytest.raises(InputError, match="pos=2 in a padded batch"):
        direct_logit_attribution(model, batch, answer, wrong, pos=2)


# -- SmolLM2: a real tokenizer and real prompts ------------------------------------------------------------------


IOI_TEXTS = [
    "When Mary and John went to the store, John gave a drink to",
    "When Aurelia and Bob went to the park, Bob handed a ball to",
    "After the meeting, Kwame and Siobhan walked home, and Siobhan gave a book to",
    "Then Tom and Ann talked, and Ann said goodbye to",
]


@pytest.mark.smollm2
def test_smollm2_ragged_ioi_prompts_equal_each_prompt_alone(smollm2, one_thread):
    batch = smollm2.to_batch(IOI_TEXTS)  # SmolLM2's tokenizer names no pad token: EOS stands in, with a warning
    assert len(set(batch.lengths.tolist())) == len(IOI_TEXTS)  # really ragged
    with torch.no_grad():
        logits = smollm2(batch)
        for row, text in enumerate(IOI_TEXTS):
            alone = smollm2(smollm2.to_tokens(text))[0]
            # logits of ~20 in fp32 and matmuls of other shapes: 1e-4 absolute plus relative, as tests/test_interop.py
            torch.testing.assert_close(_real(logits, row, batch), alone, atol=1e-4, rtol=1e-4)
    out = smollm2.generate(IOI_TEXTS, max_new_tokens=4, stop_tokens=[])
    for row, text in enumerate(IOI_TEXTS):
        assert out.texts[row] == smollm2.generate(text, max_new_tokens=4, stop_tokens=[]).texts[0]


@pytest.mark.parametrize("side", ["left", "right"])
def test_lens_kl_of_a_ragged_set_is_the_token_weighted_mean(family, side, one_thread):
    from workbench.analysis.logit_lens import lens_kl

    _, model = family
    clean, _, _, _ = _ioi_set()
    batched = lens_kl(model, pad(clean, 0, side), chunk=4)  # chunks of the batch are weighted by their real tokens
    per_prompt = torch.stack([lens_kl(model, torch.tensor([p])) * len(p) for p in clean]).sum(0)
    torch.testing.assert_close(batched, per_prompt / sum(len(p) for p in clean), atol=1e-6, rtol=1e-5)
