"""workbench.generate: greedy and sampled decoding with a preallocated KV cache, stop tokens, hooks,
streaming, and bad input. SmolLM2 checks the real thing: " Paris" after "The capital of France is"."""

from __future__ import annotations

import pytest
import torch
from helpers import LLAMA_TINY, tiny_cfg

from workbench import HookedGPT
from workbench.errors import InputError
from workbench.generate import SamplingConfig, generate, sample_next, stream_generate

FAMILIES = {"gpt2": {}, "llama": LLAMA_TINY}


@pytest.fixture(scope="module", params=list(FAMILIES))
def model(request):
    torch.manual_seed(0)
    # a larger init scale makes the random model's greedy choices vary with the context
    m = HookedGPT(tiny_cfg(**FAMILIES[request.param], n_ctx=40)).eval()
    with torch.no_grad():
        m.embed.W_E.mul_(8)
    return m


def _prompt(batch=2, pos=5, seed=1):
    return torch.randint(0, 50, (batch, pos), generator=torch.Generator().manual_seed(seed))


def test_kv_cache_generation_equals_full_recompute(model):
    prompt = _prompt()
    cached = generate(model, prompt, 30, stop_tokens=[])
    full = generate(model, prompt, 30, stop_tokens=[], use_cache=False)
    assert torch.equal(cached.tokens, full.tokens)
    assert cached.tokens.shape == (2, 35)
    assert torch.equal(cached.tokens[:, :5], prompt)
    assert len(set(cached.new_tokens[0].tolist())) > 3  # the check is not vacuous: the model does not loop on one token
    assert cached.finish_reasons == ["max_new_tokens"] * 2 and cached.n_generated == [30, 30]


def test_greedy_is_the_argmax_of_each_step(model):
    prompt = _prompt(batch=1)
    out = generate(model, prompt, 6, stop_tokens=[])
    with torch.no_grad():
        logits = model(out.tokens)
    # every generated token is the argmax of the full forward at the position before it
    assert torch.equal(logits[0, 4:-1].argmax(-1), out.tokens[0, 5:])


def test_sampling_is_reproducible_with_a_seed(model):
    prompt = _prompt()
    a = generate(model, prompt, 12, temperature=1.5, seed=7, stop_tokens=[])
    b = generate(model, prompt, 12, temperature=1.5, seed=7, stop_tokens=[])
    c = generate(model, prompt, 12, temperature=1.5, seed=8, stop_tokens=[])
    greedy = generate(model, prompt, 12, stop_tokens=[])
    assert torch.equal(a.tokens, b.tokens)
    assert not torch.equal(a.tokens, c.tokens)
    assert not torch.equal(a.tokens, greedy.tokens)
    # top_k=1 and a tiny top_p leave only the most likely token: greedy again, whatever the temperature
    assert torch.equal(generate(model, prompt, 12, temperature=2.0, top_k=1, seed=3, stop_tokens=[]).tokens,
                       greedy.tokens)
    assert torch.equal(generate(model, prompt, 12, temperature=2.0, top_p=1e-6, seed=3, stop_tokens=[]).tokens,
                       greedy.tokens)


def test_top_k_and_top_p_restrict_the_support():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0, -1.0]]).repeat(4000, 1)
    gen = torch.Generator().manual_seed(0)
    picked = sample_next(logits, SamplingConfig(temperature=1.0, top_k=3), gen)
    assert set(picked.tolist()) == {0, 1, 2}
    probs = logits[0].softmax(-1)  # 0.64, 0.24, 0.087, ...: top_p 0.85 keeps the first two, 0.9 the first three
    assert set(sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.85), gen).tolist()) == {0, 1}
    assert set(sample_next(logits, SamplingConfig(temperature=1.0, top_p=0.9), gen).tolist()) == {0, 1, 2}
    # with no filter the frequencies follow softmax(logits / T)
    freq = torch.bincount(sample_next(logits, SamplingConfig(temperature=1.0), gen), minlength=6).float() / 4000
    torch.testing.assert_close(freq, probs, atol=0.03, rtol=0)


def test_stop_tokens_end_each_row_on_its_own(model):
    prompt = _prompt()
    free = generate(model, prompt, 10, stop_tokens=[])
    stop = int(free.new_tokens[0, 2])  # row 0 produces it as its third token
    out = generate(model, prompt, 10, stop_tokens=[stop])
    first_hit = [row.tolist().index(stop) + 1 if stop in row.tolist() else None for row in free.new_tokens]
    assert out.n_generated[0] == first_hit[0] <= 3
    assert out.finish_reasons[0] == "stop_token"
    if first_hit[1] is None:
        assert out.finish_reasons[1] == "max_new_tokens" and out.n_generated[1] == 10
    # up to its stop token each row is what it was without stopping
    for row, n in enumerate(out.n_generated):
        assert torch.equal(out.new_tokens[row, :n], free.new_tokens[row, :n])


def test_hooks_fire_during_generation(model):
    prompt = _prompt(batch=1)
    calls = []

    def count(x, hook):
        calls.append(x.shape[1])

    generate(model, prompt, 4, stop_tokens=[], fwd_hooks=[("blocks.0.hook_resid_post", count)])
    assert calls == [5, 1, 1, 1]  # the prompt once, then one position per step (the KV cache)

    def steer(x, hook):
        return x + 5 * model.embed.W_E[7]

    steered = generate(model, prompt, 6, stop_tokens=[], fwd_hooks=[("blocks.1.hook_resid_post", steer)])
    plain = generate(model, prompt, 6, stop_tokens=[])
    assert not torch.equal(steered.tokens, plain.tokens)
    assert not model.hook_dict["blocks.1.hook_resid_post"].active  # removed afterwards


def test_stream_yields_the_same_tokens(model):
    prompt = _prompt(batch=1)
    events = list(stream_generate(model, prompt, 8, stop_tokens=[]))
    assert [e.token for e in events] == generate(model, prompt, 8, stop_tokens=[]).new_tokens[0].tolist()
    assert [e.finish_reason for e in events] == [None] * 7 + ["max_new_tokens"]


def test_bad_input(model):
    with pytest.raises(InputError, match="longer than the model's context of 40"):
        generate(model, torch.zeros(1, 41, dtype=torch.long), 1)
    with pytest.raises(InputError, match="at most 30 new tokens"):
        generate(model, torch.zeros(1, 10, dtype=torch.long), 31)
    with pytest.raises(InputError, match="empty"):
        generate(model, torch.zeros(1, 0, dtype=torch.long), 3)
    with pytest.raises(InputError, match="temperature"):
        generate(model, _prompt(), 3, temperature=-1)
    with pytest.raises(InputError, match="outside the vocabulary"):
        generate(model, _prompt(), 3, stop_tokens=[50])
    with pytest.raises(InputError, match="no tokenizer"):
        generate(model, "text", 3)
    with pytest.raises(InputError, match="one prompt"):
        next(stream_generate(model, _prompt(batch=2), 3))


@pytest.mark.smollm2
def test_smollm2_says_paris(smollm2):
    out = generate(smollm2, "The capital of France is", 8)
    assert out.texts[0].startswith(" Paris"), out.texts
    with pytest.raises(InputError, match="empty"):
        generate(smollm2, "", 3)
    too_long = "word " * (smollm2.cfg.n_ctx + 10)
    with pytest.raises(InputError, match="longer than the model's context"):
        generate(smollm2, too_long, 1)


@pytest.mark.smollm2
def test_smollm2_kv_cache_equals_recompute_and_stops_at_eos(smollm2):
    prompt = "def fibonacci(n):"
    a = generate(smollm2, prompt, 8, stop_tokens=[])
    b = generate(smollm2, prompt, 8, stop_tokens=[], use_cache=False)
    assert torch.equal(a.tokens, b.tokens)
    text = "".join(e.text for e in stream_generate(smollm2, prompt, 8, stop_tokens=[]))
    assert text == a.texts[0]
    # the instruct model ends its answer with <|im_end|>; that is its EOS, the default stop token
    chat = "<|im_start|>user\nSay hi.<|im_end|>\n<|im_start|>assistant\n"
    out = generate(smollm2, chat, 48)
    assert out.finish_reasons == ["stop_token"] and "<|im_end|>" not in out.texts[0]


def test_tiny_temperature_samples_the_argmax_and_nan_logits_are_an_input_error():
    """Issue 13: T=1e-300 used to give inf - inf = NaN probabilities; NaN logits crashed torch.multinomial."""
    from workbench.errors import InputError
    from workbench.generate import SamplingConfig, sample_next

    logits = torch.tensor([[1.0, 3.0, 2.0], [0.5, -1.0, 0.25]])
    picked = sample_next(logits, SamplingConfig(temperature=1e-300, top_p=0.9), torch.Generator().manual_seed(0))
    assert picked.tolist() == [1, 0]
    with pytest.raises(InputError, match="logits hold NaN"):
        sample_next(torch.full((1, 3), float("nan")), SamplingConfig(temperature=1.0))
    for bad in (float("nan"), float("inf"), -1.0):
        with pytest.raises(InputError, match="temperature must be a finite number >= 0"):
            SamplingConfig(temperature=bad)
