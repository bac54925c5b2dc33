"""The teaching computations (workbench.teaching, workbench.snapshots) against their oracles: the
`tokenizers` BPE trainer, the model's own hook_pattern and KV-cache tensors, the angle formula."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import LLAMA_TINY, tiny_cfg

from workbench import teaching as T

BASE = ["The cat sat on the mat. The dog sat on the log; the cat saw the dog.",
        "Café crème, naïve façade: 東京 and 東京 again, 🙂🙂, déjà vu, déjà vu.",
        "def f(x): return x**2  # the same sentence, the same tokens, again and again"]
DOCS = BASE * 2  # every pair twice at least: 60 merges before the min_frequency of 2 stops the trainer


def _library_merges(tok) -> list[tuple[str, str]]:
    merges = json.loads(tok.tok.to_str())["model"]["merges"]
    return [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in merges]


@pytest.mark.parametrize("k", [0, 1, 7, 30, 60])
def test_bpe_after_k_merges_equals_tokenizers_trained_with_k_merges(k):
    from workbench.corpora import train_bpe

    trace = T.train_bpe_steps(DOCS, 60)
    assert len(trace.merges) == 60
    vocab = trace.merges[k - 1].vocab_size if k else 257
    tok = train_bpe(DOCS, vocab_size=vocab)
    assert _library_merges(tok) == trace.merge_pairs(k)
    for sentence in ["The cat saw the café: 東京 🙂", DOCS[1], "unseen wörds ΩΩΩ"]:
        assert T.segment(sentence, trace.merge_pairs(k)) == tok.tok.encode(sentence, add_special_tokens=False).tokens
        assert T.library_segmentation(DOCS, vocab, sentence) == T.segment(sentence, trace.merge_pairs(k))


def test_bpe_ties_break_like_tokenizers_on_random_texts():
    import random

    from workbench.corpora import train_bpe

    rng = random.Random(0)
    for _ in range(5):
        docs = ["".join(rng.choice("abc é") for _ in range(rng.randint(30, 120))) for _ in range(3)]
        trace = T.train_bpe_steps(docs, 25)
        tok = train_bpe(docs, vocab_size=trace.merges[-1].vocab_size)
        assert _library_merges(tok) == trace.merge_pairs()[: len(_library_merges(tok))]


def test_bpe_steps_counts_and_bytes():
    trace = T.train_bpe_steps(["aaab aaab aaab"], 3, min_frequency=1)
    first = trace.merges[0]
    # words: "aaab" and "Ġaaab" twice: ('a','a') occurs twice in each word, 3 words -> 6
    assert first.pair == ("a", "a") and first.count == 6 and first.token_id == 257 and first.vocab_size == 258
    assert len(trace.base_vocab) == 257 and trace.words == {"aaab": 1, "Ġaaab": 2}
    assert T.piece_bytes("Ġcaf") == b" caf"
    e_acute = [T.byte_to_char()[b] for b in "é".encode()]  # two bytes, two characters before any merge
    assert T.segment("é", []) == e_acute and [T.piece_text(c) for c in e_acute] == ["\\xc3", "\\xa9"]
    steps = T.segmentations("aaab", trace)
    assert [len(s.tokens) for s in steps] == [4, 3, 2, 1] and steps[-1].tokens == ["aaab"]


def _model(**overrides):
    from workbench import HookedGPT

    torch.manual_seed(0)
    return HookedGPT(tiny_cfg(**overrides)).eval()


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_attention_from_scratch_equals_hook_pattern(family):
    model = _model(**(LLAMA_TINY if family == "llama" else {}))
    tokens = torch.tensor([3, 14, 15, 9, 26, 5, 3, 14, 15])
    for layer in range(model.cfg.n_layers):
        for head in range(model.cfg.n_heads):
            a = T.attention_from_scratch(model, tokens, layer, head)
            torch.testing.assert_close(a.pattern, T.model_pattern(model, tokens, layer, head), atol=1e-5, rtol=0)
    torch.testing.assert_close(a.XXt, a.XXt.T, atol=1e-5, rtol=1e-5)  # X·Xᵀ is symmetric ...
    assert (a.QKt - a.QKt.T).abs().max() > 1e-2  # ... Q·Kᵀ is not
    assert torch.isinf(a.masked.triu(1)[a.masked.triu(1) != 0]).all() and (a.pattern.triu(1) == 0).all()
    torch.testing.assert_close(a.pattern.sum(-1), torch.ones(len(tokens)))
    torch.testing.assert_close(a.mixed, a.XXt_softmax @ a.X)
    torch.testing.assert_close(a.scaled, a.QKt / math.sqrt(model.cfg.d_head))
    # without the scaling the softmax is sharper: lower entropy in every row that has a choice
    assert (T.row_entropy(a.pattern_unscaled)[1:] < T.row_entropy(a.pattern)[1:]).all()
    half = T.causal_mask(a.scaled, upto=3)
    assert torch.isinf(half[:3]).any() and not torch.isinf(half[3:]).any()


def test_angles_mean_90_and_spread_shrinks_as_one_over_sqrt_d():
    stats = [T.angle_stats(T.pairwise_angles(300, d), d) for d in (10, 100, 1000)]
    for s in stats:
        assert s.mean == pytest.approx(90, abs=0.5)
        assert s.std == pytest.approx(s.predicted_std, rel=0.1)
    assert stats[0].std > stats[1].std > stats[2].std
    assert stats[0].std / stats[2].std == pytest.approx(math.sqrt(100), rel=0.15)
    assert T.directions_that_fit(400, 0.2) == pytest.approx(math.exp(4))


def test_kv_cache_bytes_and_contents_match_the_model():
    from workbench.names import act_name

    model = _model(**LLAMA_TINY)  # grouped-query: 2 KV heads for 4 query heads
    prompt = torch.tensor([1, 2, 3, 4, 5])
    out = T.decode_with_cache(model, prompt, 6)
    assert out.cache.pos == 5 + 5  # the last new token is sampled, never fed back
    assert T.measured_cache_bytes(out.cache) == T.kv_cache_bytes(model.cfg, 11) == 2 * 2 * 2 * 11 * 8 * 4
    greedy = model.generate(prompt, 6, use_cache=False, stop_tokens=[]).tokens[0]
    assert out.tokens.tolist() == greedy.tolist()
    # what the cache holds is what a full forward pass computes for the keys (after RoPE) and values
    names = [act_name(k, 1) for k in ("rot_k", "v")]
    _, cache = model.run_with_cache(out.tokens[None, :10], names_filter=names)
    torch.testing.assert_close(out.cache.keys[1][0].transpose(0, 1)[:10], cache[names[0]][0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.cache.values[1][0].transpose(0, 1)[:10], cache[names[1]][0], atol=1e-5, rtol=0)
    for use in (True, False):
        times = T.step_times(model, prompt, 6, use_cache=use)
        assert len(times) == 6 and min(times) > 0
    timing = T.time_generation(model, prompt, 4, use_cache=True)
    assert timing.n_new == 4 and timing.seconds > 0 and timing.tokens_per_s > 0


def test_snapshot_loader_and_dynamics(tmp_path):
    from workbench import HookedGPT
    from workbench import snapshots as S

    model = _model()
    model.save(tmp_path)
    for step, seed in ((0, 1), (100, 2)):
        m = HookedGPT(model.cfg, init=False)
        m.init_weights(seed)
        m.save(tmp_path / "snapshots" / f"step_{step:06d}")
    snaps = S.list_snapshots(tmp_path)
    assert [s.step for s in snaps] == [0, 100] and S.step_of(snaps[1].path) == 100
    loaded = [S.load_snapshot(s.path) for s in snaps]
    frames = S.embedding_frames([m.embed.W_E.detach() for m in loaded], [0, 100], [1, 2, 3, 4, 5])
    assert frames.coords.shape == (2, 5, 2) and 0 < frames.explained <= 1
    assert frames.coords[-1].mean(0).abs().max() < 1e-5  # the final frame is centred on its own mean
    heads = S.snapshot_heads(loaded[1], 100, seq_len=6)
    assert heads.induction.shape == (2, 4) and heads.pattern.shape == (2, 4, 13, 13)
    assert len(heads.lens_repeat) == 3 and heads.lens_repeat[-1] == pytest.approx(heads.loss_repeat, abs=1e-5)
    assert S.phase_change([0, 100, 200], [0.1, 0.2, 0.8]) == (100, 200)
    assert S.list_snapshots(tmp_path / "nowhere") == []


def test_lr_schedule_matches_the_logged_learning_rate():
    from workbench import snapshots as S
    from workbench.builtin import BUILTIN_DIR

    log = S.training_log(BUILTIN_DIR / "attn-only-2l")
    if log.empty:
        pytest.skip("attn-only-2l is not shipped in data/models")
    rows = log.dropna(subset=["lr"])
    cfg = S.recipe_train_config("attn-only-2l")
    assert S.lr_schedule(cfg, rows.step.tolist()) == pytest.approx(rows.lr.tolist(), rel=1e-9)
    assert S.recipe_train_config("no-such-model") is None


def test_attn_only_2l_snapshots_show_the_phase_change():
    from workbench import snapshots as S
    from workbench.builtin import BUILTIN_DIR

    snaps = S.list_snapshots(BUILTIN_DIR / "attn-only-2l")
    if len(snaps) < 10:
        pytest.skip("attn-only-2l's snapshots are not shipped in data/models")
    heads = [S.snapshot_heads(S.load_snapshot(s.path), s.step, seq_len=20, batch=4) for s in snaps]
    best = [float(h.induction[1].max()) for h in heads]
    before, after = S.phase_change([h.step for h in heads], best)
    assert 200 <= before < after <= 1000  # the shipped run's phase change comes near step 500
    i = [h.step for h in heads].index(after)
    assert best[i] - best[i - 1] > 0.1 and best[0] < 0.2 < 0.4 < best[-1]
