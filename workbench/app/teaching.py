"""Teaching pages: BPE step by step, attention from scratch, nearly orthogonal directions, the KV
cache, and the architecture with the shapes of the current prompt. The computations live in
:mod:`workbench.teaching`, the figures in :mod:`workbench.teaching_plots`; these pages lay them out."""

from __future__ import annotations

import math

import pandas as pd
import streamlit as st
import torch

from workbench import teaching as T
from workbench import teaching_plots as P
from workbench.app import cached, ui
from workbench.app.sidebar import Selection

DEFAULT_BPE_TEXT = """The cat sat on the mat. The cat saw the rat, and the rat ran from the cat.
A lower tower, the lowest tower, a newer tower, the newest tower.
Café, crème brûlée and a naïve façade: déjà vu in the café.
東京 is Tokyo; 東京 has trains. Emoji are bytes too: 🙂🙂🙂.
def tokenize(text): return [token for token in text.split()]
The cat and the rat sat on the mat in the café in 東京."""
DEFAULT_SENTENCE = "The newest café in 東京 🙂"
#: longer training texts are cut: 300 merges of a 20,000-character text take about 2.5 s here
MAX_BPE_CHARS = 20_000


# ------------------------------------------------------------------------------------------- BPE


def _pieces(tokens: list[str]) -> list[tuple[str, str]]:
    return [(T.piece_text(t), " ".join(f"{b:02x}" for b in T.piece_bytes(t))) for t in tokens]


def bpe_page(sel: Selection) -> None:
    st.title("BPE step by step")
    st.caption("Byte-level BPE starts from the 256 bytes (plus an end-of-text token) and repeatedly merges the most "
               "frequent adjacent pair of tokens in the training text into a new token. Words are split first "
               "(GPT-2's rule: a leading space stays with its word), so merges never cross a word. Step through the "
               "merges below and watch the sentence's segmentation change.")
    text = st.text_area("Training text (one document a line)", DEFAULT_BPE_TEXT, key="bpe_text", height=150)
    c1, c2 = st.columns([1, 2])
    n_merges = c1.slider("Merges to learn", 1, 300, 50, key="bpe_merges")
    sentence = c2.text_input("Sentence to segment", DEFAULT_SENTENCE, key="bpe_sentence")
    if len(text) > MAX_BPE_CHARS:
        st.caption(f"The text has {len(text):,} characters; the first {MAX_BPE_CHARS:,} are used "
                   "(this trainer recounts every pair at every merge, which is plain but slow).")
        text = text[:MAX_BPE_CHARS]
    docs = [line for line in text.splitlines() if line.strip()]
    if not docs:
        st.info("Type some training text above.")
        return
    with st.spinner("Learning merges…"):
        trace = cached.bpe_trace(text, n_merges)
    if not trace.merges:
        st.warning("No pair occurs twice in this text, so BPE learns nothing: "
                   "give it a longer or more repetitive text.")
        return
    if len(trace.merges) < n_merges:
        st.caption(f"Only {len(trace.merges)} merges: after that no pair occurs twice (the trainer's min_frequency).")
    k = st.slider("After merge", 0, len(trace.merges), len(trace.merges), key="bpe_step")
    pairs = trace.merge_pairs()
    steps = [T.segment(sentence, pairs[:i]) for i in range(len(pairs) + 1)]
    tokens = steps[k]
    vocab = trace.merges[k - 1].vocab_size if k else len(trace.base_vocab)
    m1, m2, m3, m4 = st.columns(4)
    m1.metric("merges", k)
    m2.metric("vocabulary", vocab)
    m3.metric("tokens in the sentence", len(tokens))
    m4.metric("bytes in the sentence", len(sentence.encode("utf-8")))
    if k:
        m = trace.merges[k - 1]
        st.markdown(f"**Merge {k}:** `{P.visible(T.piece_text(m.pair[0]))}` + `{P.visible(T.piece_text(m.pair[1]))}` "
                    f"→ `{P.visible(T.piece_text(m.token))}` (id {m.token_id}), a pair seen **{m.count}** times.")
    else:
        st.markdown("**Before any merge:** one token per byte.")
    st.markdown(P.bpe_chips_html(_pieces(tokens)), unsafe_allow_html=True)
    st.caption("Each chip is one token, its UTF-8 bytes (hex) underneath. A character outside ASCII is several bytes, "
               "so it starts as several tokens (a half character shows as \\xNN) until merges glue its bytes together.")
    _oracle_check(docs, trace, k, sentence, steps)
    ui.plot(P.bpe_progress([len(s) for s in steps], [m.count for m in trace.merges], k), key="bpe_progress")
    left, right = st.columns(2)
    with left:
        st.subheader("Merges learned so far")
        rows = [{"step": m.step, "left": P.visible(T.piece_text(m.pair[0])),
                 "right": P.visible(T.piece_text(m.pair[1])), "new token": P.visible(T.piece_text(m.token)),
                 "id": m.token_id, "count": m.count, "vocabulary": m.vocab_size} for m in reversed(trace.merges[:k])]
        st.dataframe(pd.DataFrame(rows), hide_index=True, height=320)
    with right:
        st.subheader("Characters of several bytes")
        multi = sorted({c for c in sentence if len(c.encode("utf-8")) > 1}, key=sentence.index)
        if multi:
            st.dataframe(pd.DataFrame([{
                "character": c, "UTF-8 bytes": " ".join(f"{b:02x}" for b in c.encode("utf-8")),
                "byte characters": " ".join(T.byte_to_char()[b] for b in c.encode("utf-8")),
                "tokens now": len(T.segment(c, pairs[:k]))} for c in multi]), hide_index=True)
        else:
            st.caption("The sentence is pure ASCII: one byte per character.")


def _oracle_check(docs: list[str], trace: T.BPETrace, k: int, sentence: str, steps: list[list[str]]) -> None:
    """Say whether the HF `tokenizers` trainer, asked for the same vocabulary, segments the sentence the same way."""
    vocab = trace.merges[k - 1].vocab_size if k else len(trace.base_vocab)
    # the library stops at the first merge that reaches the vocabulary size (a merge may rebuild a known token)
    first = next((m.step for m in trace.merges if m.vocab_size == vocab), 0) if k else 0
    library = T.library_segmentation(docs, vocab, sentence)
    if library == steps[first]:
        st.success(f"Same segmentation as the `tokenizers` library's BPE trained on this text to {vocab} tokens "
                   f"({first} merges).")
    else:
        st.error(f"The `tokenizers` library trained to {vocab} tokens segments it differently: "
                 + " | ".join(P.visible(T.piece_text(t)) for t in library))


# ---------------------------------------------------------------------------- attention from scratch


def attention_scratch_page(sel: Selection) -> None:
    st.title("Attention from scratch")
    model = cached.model(sel.key)
    cfg = model.cfg
    st.caption("The worked example: every token scores every other with a dot product, the scores become weights "
               "with a softmax, and each token's output is the weighted sum. Then the same with a real head's learned "
               "queries and keys, the causal mask and the 1/√d_head scaling — "
               "which is exactly what the model computes.")
    default = "The cat sat on the mat. The cat" if model.tokenizer is not None else "0 17 42 5 33 9 17 42 5 33"
    text, enc = ui.prompt(sel.key, model, "scratch_prompt", default=default)
    if len(enc.ids) < 2:
        st.info("Attention needs at least two tokens to choose between: type a longer prompt.")
        return
    if len(enc.ids) > 24:
        st.caption(f"{len(enc.ids)} tokens: the matrices get crowded past about 20.")
    c1, c2 = st.columns(2)
    layer = c1.slider("Layer", 0, cfg.n_layers - 1, 0, key="scratch_layer") if cfg.n_layers > 1 else 0
    head = c2.slider("Head", 0, cfg.n_heads - 1, 0, key="scratch_head") if cfg.n_heads > 1 else 0
    with ui.guard(), st.spinner("Computing…"):
        a, real = cached.scratch_attention(sel.key, text, layer, head)
    labels = P.token_axis(enc.str_tokens)
    n = len(labels)

    st.header("1 · Dot products between tokens: X·Xᵀ")
    st.markdown(f"**X** is what the head reads: the residual stream entering block {layer}, through its norm — one row "
                f"per token, {cfg.d_model} numbers each. **X·Xᵀ** holds every pair's dot product: large when two "
                "tokens point the same way. It is symmetric (token i scores j as j scores i).")
    ui.plot(P.matrix(a.X, "X: one row per token", labels, None, "d_model", "token", height=320), key="scratch_X")
    ui.plot(P.pair(P.matrix(a.XXt, "X·Xᵀ", labels, labels), P.matrix(a.XXt_softmax, "softmax(X·Xᵀ), row by row",
                                                                       labels, labels, colorscale="Blues", zmid=None),
                   "Scores, then weights"),
            key="scratch_xxt")
    asym_x = float((a.XXt - a.XXt.T).abs().max())
    st.caption(f"max |X·Xᵀ − (X·Xᵀ)ᵀ| = {asym_x:.2g} (symmetric up to rounding). Each row of the softmax sums to 1: "
               "it says how much of each token a token takes. Without learned maps, every token mostly takes itself.")
    ui.plot(P.matrix(a.mixed, "softmax(X·Xᵀ)·X: each token's weighted mix of all tokens", labels, None, "d_model",
                     "token", height=320), key="scratch_mixed")

    st.header("2 · Learned queries and keys: Q·Kᵀ")
    st.markdown(f"A head first maps X two ways: queries **Q = X·W_Q** (what a token looks for) and keys **K = X·W_K** "
                f"(what it offers), {cfg.d_head} numbers each (d_head). Query i against key j is not key i against "
                "query j, so **Q·Kᵀ is not symmetric**.")
    ui.plot(P.pair(P.matrix(a.Q, "Q = X·W_Q", labels, None), P.matrix(a.K, "K = X·W_K", labels, None),
                   f"Layer {layer}, head {head}: queries and keys", height=360), key="scratch_qk")
    asym_q = float((a.QKt - a.QKt.T).abs().max())
    ui.plot(P.matrix(a.QKt, "Q·Kᵀ (rows: queries, columns: keys)", labels, labels, "key", "query"), key="scratch_qkt")
    st.caption(f"max |Q·Kᵀ − (Q·Kᵀ)ᵀ| = {asym_q:.3g}, against {asym_x:.2g} for X·Xᵀ.")

    st.header("3 · The causal mask, row by row")
    upto = st.slider("Mask the future of the first rows", 0, n, n, key="scratch_mask")
    st.markdown("A language model predicts the next token, so a token may not look ahead: the scores above the "
                "diagonal are set to −∞ (blank here) before the softmax, which turns them into weight 0.")
    partial = T.causal_mask(a.scaled, upto=upto)
    ui.plot(P.pair(P.matrix(partial, f"scaled scores, future masked in rows 0–{upto - 1}" if upto else
                            "scaled scores, nothing masked yet", labels, labels),
                   P.matrix(partial.softmax(-1), "softmax of each row", labels, labels, colorscale="Blues", zmid=None),
                   "Applying the causal mask"), key="scratch_mask_fig")

    st.header("4 · Scaling by √d_head")
    seen = torch.ones_like(a.QKt, dtype=torch.bool).tril()  # the scores a query may use
    raw_std, scaled_std = float(a.QKt[seen].std()), float(a.scaled[seen].std())
    st.markdown(f"A dot product of two d_head-dimensional vectors with unit-variance entries has variance d_head, so "
                f"scores grow with the head size, and a softmax of large scores puts almost all weight on one key "
                f"(its gradient vanishes). Dividing by √d_head = {math.sqrt(cfg.d_head):.2f} "
                "keeps them near unit scale.")
    ui.plot(P.pair(P.matrix(a.pattern_unscaled, "softmax(mask(Q·Kᵀ)): unscaled", labels, labels, colorscale="Blues",
                            zmid=None),
                   P.matrix(a.pattern, "softmax(mask(Q·Kᵀ / √d_head)): scaled", labels, labels, colorscale="Blues",
                            zmid=None), "Without and with the scaling", shared_scale=True), key="scratch_scale")
    e1, e2, e3 = st.columns(3)
    e1.metric("score spread (std), unscaled", f"{raw_std:.3g}")
    e2.metric("score spread (std), scaled", f"{scaled_std:.3g}")
    entropy_unscaled = float(T.row_entropy(a.pattern_unscaled).mean())
    entropy_scaled = float(T.row_entropy(a.pattern).mean())
    e3.metric("mean row entropy, unscaled → scaled", f"{entropy_unscaled:.2f} → {entropy_scaled:.2f} nats")

    st.header("5 · The same head in the model")
    diff = float((a.pattern - real).abs().max())
    ui.plot(P.pair(P.matrix(a.pattern, "from scratch (this page)", labels, labels, colorscale="Blues", zmid=None),
                   P.matrix(real, f"the model's blocks.{layer}.attn.hook_pattern", labels, labels, colorscale="Blues",
                            zmid=None), f"Layer {layer}, head {head}: by hand and in the model", shared_scale=True),
            key="scratch_real")
    st.metric("largest difference from the model's pattern", f"{diff:.1e}")
    if diff < 1e-4:
        st.success("The hand computation reproduces the model's attention pattern.")
    else:
        st.warning(f"The hand computation differs from the model by {diff:.2g} (lower precision dtypes round more).")


# ----------------------------------------------------------------------- nearly orthogonal directions

DIMENSIONS = [2, 3, 10, 30, 100, 300, 1000, 3000]


def orthogonal_page(sel: Selection) -> None:
    st.title("Nearly orthogonal directions")
    model = cached.model(sel.key)
    st.caption("Draw random unit vectors in d dimensions and measure the angle between every pair. In 2-D angles are "
               "spread evenly; as d grows they crowd around 90°, with a spread of about (180/π)/√d degrees. A space "
               "with d dimensions has only d exactly orthogonal directions, but exponentially many nearly orthogonal "
               "ones (Johnson–Lindenstrauss).")
    c1, c2 = st.columns([1, 2])
    n = c1.slider("Random vectors", 20, 400, 200, 10, key="orth_n")
    options = sorted(set(DIMENSIONS + [model.cfg.d_model]))
    dims = c2.multiselect("Dimensions d", options, [3, 10, 100, 1000], key="orth_dims")
    if not dims:
        st.info("Choose at least one dimension.")
        return
    dims = sorted(dims)
    angles = {d: T.pairwise_angles(n, d, seed=0) for d in dims}
    stats = [T.angle_stats(angles[d], d) for d in dims]
    ui.plot(P.angle_histograms(angles), key="orth_hist")
    table = pd.DataFrame({"d": [s.d for s in stats], "mean (°)": [s.mean for s in stats],
                          "std (°)": [s.std for s in stats],
                          "(180/π)/√d (°)": [s.predicted_std for s in stats],
                          "within 90° ± 5°": [s.within_5 for s in stats],
                          "farthest from 90° (°)": [s.worst for s in stats]})
    left, right = st.columns([3, 2])
    with left:
        ui.plot(P.spread_by_dimension(table), key="orth_spread")
    with right:
        st.dataframe(table.style.format({"mean (°)": "{:.2f}", "std (°)": "{:.2f}", "(180/π)/√d (°)": "{:.2f}",
                                         "within 90° ± 5°": "{:.1%}", "farthest from 90° (°)": "{:.1f}"}),
                     hide_index=True)
        st.caption(f"{n * (n - 1) // 2:,} pairs per dimension. The mean stays at 90°; the spread shrinks like 1/√d "
                   "(for large d, cos θ is about normal with variance 1/d).")
    st.subheader("How many almost-orthogonal directions fit")
    eps = st.slider("Allowed |cos θ| (0.2 is 90° ± 11.5°)", 0.02, 0.5, 0.2, 0.01, key="orth_eps")
    fit = [{"d": d, "angle band": f"90° ± {math.degrees(math.asin(eps)):.1f}°",
            "random directions that fit (≈ exp(d·ε²/4))": _count(T.directions_that_fit(d, eps))}
           for d in sorted(set(DIMENSIONS + [model.cfg.d_model]))]
    st.dataframe(pd.DataFrame(fit), hide_index=True)
    st.markdown(f"This is why a model can store more features than it has dimensions (this model: d_model = "
                f"{model.cfg.d_model}): features as nearly orthogonal directions interfere only a little, as long as "
                "few are active at once — **superposition**. See the [Superposition](superposition) page for a toy "
                "model that does it, and the [SAE features](sae) page for pulling such directions back out of a "
                "real residual stream.")


def _count(x: float) -> str:
    if x < 1e6:
        return f"{x:,.0f}"
    return f"10^{math.log10(x):.0f}" if math.isfinite(x) and x < 1e300 else "more than 10^300"


# ------------------------------------------------------------------------------------------ KV cache


def kv_cache_page(sel: Selection) -> None:
    st.title("KV cache")
    model = cached.model(sel.key)
    cfg = model.cfg
    st.caption("Generating token by token, each new token needs the keys and values of every earlier token in every "
               "layer. Those never change once computed, so the model keeps them — the KV cache — and each step "
               "computes one new row per layer instead of re-running the whole sequence.")
    default = "The capital of France is" if model.tokenizer is not None else "0 17 42 5 33 9 17 42"
    text, enc = ui.prompt(sel.key, model, "kv_prompt", default=default)
    room = cfg.n_ctx - len(enc.ids)
    if room < 2:
        st.warning("The prompt fills the model's context: shorten it to leave room for new tokens.")
        return
    n_new = st.slider("New tokens", 2, min(32, room), min(12, room), key="kv_new")
    with ui.guard(), st.spinner("Decoding…"):
        dec = cached.cached_decode(sel.key, text, n_new)
    labels = P.token_axis(_token_strings(model, dec.tokens.tolist()))
    st.markdown("**Greedy continuation:** " + " ".join(f"`{lab}`" for lab in labels[dec.prompt_len:]))

    st.subheader("What is cached, step by step")
    c1, c2, c3 = st.columns(3)
    step = c1.slider("Decoding step (0 = the prompt's pass)", 0, n_new - 1, 0, key="kv_step")
    layer = c2.slider("Layer", 0, cfg.n_layers - 1, 0, key="kv_layer") if cfg.n_layers > 1 else 0
    kv_head = c3.slider("KV head", 0, cfg.n_kv - 1, 0, key="kv_head") if cfg.n_kv > 1 else 0
    filled = dec.prompt_len + step
    fed = labels[:filled] if step == 0 else [labels[filled - 1]]
    fed_text = f"the prompt, {dec.prompt_len} tokens" if step == 0 else fed[0]
    st.caption(f"Step {step}: the model is fed {fed_text}, "
               f"writes {dec.prompt_len if step == 0 else 1} new row(s) into every layer's K and V, and reads all "
               f"{filled} rows to predict {labels[filled]}. Rows written at earlier steps stay as they were.")
    K = dec.cache.keys[layer][0, kv_head, :filled].float().cpu()
    V = dec.cache.values[layer][0, kv_head, :filled].float().cpu()
    ui.plot(P.pair(P.matrix(K, "keys K", labels[:filled], None), P.matrix(V, "values V", labels[:filled], None),
                   f"Layer {layer}, KV head {kv_head}: the cache after step {step} ({filled} positions × d_head "
                   f"{cfg.d_head})", height=max(300, 22 * filled + 120)), key="kv_contents")
    el = dec.cache.keys[0].element_size()
    st.dataframe(pd.DataFrame([{"layer": i, "K shape (allocated)": str(list(dec.cache.keys[i].shape)),
                                "V shape (allocated)": str(list(dec.cache.values[i].shape)),
                                "filled positions": filled,
                                "bytes (K+V, filled)": 2 * filled * cfg.n_kv * cfg.d_head * el}
                               for i in range(cfg.n_layers)]), hide_index=True, height=min(400, 36 * cfg.n_layers + 40))

    st.subheader("Memory by context length")
    per_token = T.kv_cache_bytes(cfg, 1, bytes_per_value=el)
    lengths = [int(x) for x in torch.linspace(1, cfg.n_ctx, 64).round().unique().tolist()]
    measured = T.measured_cache_bytes(dec.cache)
    ui.plot(P.kv_memory(lengths, [T.kv_cache_bytes(cfg, n, bytes_per_value=el) / 2**20 for n in lengths],
                        (dec.cache.max_pos, measured / 2**20),
                        f"KV cache of {cfg.name or sel.name} ({sel.dtype}, batch 1)"),
            key="kv_memory")
    m1, m2, m3 = st.columns(3)
    m1.metric("per token", P.fmt_bytes(per_token))
    m2.metric(f"measured ({dec.cache.max_pos} positions)", P.fmt_bytes(measured))
    m3.metric(f"full context ({cfg.n_ctx})", P.fmt_bytes(T.kv_cache_bytes(cfg, cfg.n_ctx, bytes_per_value=el)))
    gqa = (f"; grouped-query attention shares each KV head among {cfg.n_heads // cfg.n_kv} query heads"
           if cfg.n_kv < cfg.n_heads else "")
    agree = measured == T.kv_cache_bytes(cfg, dec.cache.max_pos, bytes_per_value=el)
    st.caption(f"2 (K and V) × {cfg.n_layers} layers × {cfg.n_kv} KV heads × d_head {cfg.d_head} × {el} bytes = "
               f"{per_token:,} bytes per token" + gqa
               + ". The formula and the measured tensors agree" + (" exactly." if agree else " — no: they differ."))

    st.subheader("Speed, with and without the cache")
    n_time = st.slider("Tokens to generate for the timing", 4, min(64, room), min(24, room), key="kv_time_n")
    if st.button("Measure", key="kv_measure"):
        prompt = torch.tensor(enc.ids)
        with st.spinner("Timing…"):
            # best of two runs each: the first run also warms the allocator
            st.session_state["kv_timing"] = (sel.key, text, [T.time_generation(model, prompt, n_time, use, repeats=2)
                                                             for use in (True, False)])
            st.session_state["kv_steps"] = [T.step_times(model, prompt, n_time, use) for use in (True, False)]
    timing = st.session_state.get("kv_timing")
    if timing and timing[:2] == (sel.key, text):
        with_cache, without = timing[2]
        t1, t2, t3 = st.columns(3)
        t1.metric("with the cache", f"{with_cache.tokens_per_s:,.1f} tokens/s")
        t2.metric("without (recompute everything)", f"{without.tokens_per_s:,.1f} tokens/s")
        t3.metric("speed-up", f"{without.seconds / with_cache.seconds:.2f}×")
        st.caption(f"{with_cache.n_new} greedy tokens after a {len(enc.ids)}-token prompt, best of two runs, measured "
                   "just now. Without the cache, step i re-runs all prompt + i tokens, so the cost grows with the "
                   "square of the length; the gap widens with longer generations and bigger models.")
        steps = st.session_state.get("kv_steps")
        if steps:
            ui.plot(P.step_timings(steps[0], steps[1], len(enc.ids)), key="kv_step_times")
    else:
        st.caption("Press Measure to time greedy generation both ways on this prompt.")


def _token_strings(model, ids: list[int]) -> list[str]:
    if model.tokenizer is None:
        return [str(i) for i in ids]
    return model.tokenizer.str_tokens(ids)


# ----------------------------------------------------------------------------- live architecture

#: which parameters produce each hook point (the module whose output the hook sees)
_MAKERS = {
    "ln1.hook_scale": (), "ln1.hook_normalized": ("ln1.w", "ln1.b"),
    "attn.hook_q": ("attn.W_Q", "attn.b_Q"), "attn.hook_k": ("attn.W_K", "attn.b_K"),
    "attn.hook_v": ("attn.W_V", "attn.b_V"), "hook_attn_out": ("attn.W_O", "attn.b_O"),
    "ln2.hook_normalized": ("ln2.w", "ln2.b"),
    "mlp.hook_pre": ("mlp.W_gate", "mlp.b_gate"), "mlp.hook_pre_linear": ("mlp.W_in", "mlp.b_in"),
    "hook_mlp_out": ("mlp.W_out", "mlp.b_out"),
}
_AXES = {
    "hook_resid_pre": "batch pos d_model", "hook_resid_mid": "batch pos d_model",
    "hook_resid_post": "batch pos d_model", "hook_attn_out": "batch pos d_model", "hook_mlp_out": "batch pos d_model",
    "ln1.hook_scale": "batch pos 1", "ln2.hook_scale": "batch pos 1",
    "ln1.hook_normalized": "batch pos d_model", "ln2.hook_normalized": "batch pos d_model",
    "attn.hook_q": "batch pos head d_head", "attn.hook_k": "batch pos kv_head d_head",
    "attn.hook_v": "batch pos kv_head d_head", "attn.hook_rot_q": "batch pos head d_head",
    "attn.hook_rot_k": "batch pos kv_head d_head", "attn.hook_attn_scores": "batch head query key",
    "attn.hook_pattern": "batch head query key", "attn.hook_z": "batch pos head d_head",
    "attn.hook_result": "batch pos head d_model", "mlp.hook_in": "batch pos d_model", "mlp.hook_pre": "batch pos d_mlp",
    "mlp.hook_pre_linear": "batch pos d_mlp", "mlp.hook_post": "batch pos d_mlp", "mlp.hook_out": "batch pos d_model",
}


def block_rows(model, shapes: dict[str, tuple[int, ...]], layer: int) -> list[dict]:
    """Return one row per hook point of a block, in firing order: name, shape, axes, parameters that produce it."""
    block = model.blocks[layer]
    params = dict(block.named_parameters())
    gated = model.cfg.gated_mlp
    rows = []
    for name, shape in shapes.items():
        prefix = f"blocks.{layer}."
        if not name.startswith(prefix):
            continue
        local = name[len(prefix):]
        makers = _MAKERS.get(local, ())
        if local == "mlp.hook_pre" and not gated:
            makers = ("mlp.W_in", "mlp.b_in")
        count = sum(params[p].numel() for p in makers if p in params)
        axes = _AXES.get(local, "")
        rows.append({"hook": name, "shape": "[" + ", ".join(str(s) for s in shape) + "]", "axes": axes,
                     "parameters": count, "residual": local.startswith("hook_resid")})
    return rows


def architecture_live_page(sel: Selection) -> None:
    st.title("Architecture, live")
    model = cached.model(sel.key)
    cfg = model.cfg
    st.caption("One block of the loaded model with the shapes flowing through it on your prompt (every hook point, "
               "in the order it fires, from one forward pass) and the parameters of the part that produces each.")
    text, enc = ui.prompt(sel.key, model, "archlive_prompt")
    layer = st.selectbox("Block", list(range(cfg.n_layers)), key="archlive_block") if cfg.n_layers > 1 else 0
    with ui.guard(), st.spinner("Running the model…"):
        shapes = cached.hook_shapes_on(sel.key, text)
    rows = block_rows(model, shapes, layer)
    sums = {"hook_resid_mid": " = resid_pre + attn_out",
            "hook_resid_post": " = resid_pre + attn_out" if cfg.attn_only else " = resid_mid + mlp_out"}
    flow = [(local + sums.get(local, ""), f"{r['shape']}  {r['axes']}", r["parameters"], r["residual"])
            for r in rows for local in [r["hook"].split(".", 2)[2]]]
    ui.plot(P.block_flow(flow, f"Block {layer} on a {len(enc.ids)}-token prompt"), key="archlive_flow")
    st.caption("Red: the residual stream; blue: inside the block. Parameters sit beside the hook point whose values "
               "they produce (a norm's gain and bias are applied just after its hook_normalized). attn.hook_result "
               "(each head's output in d_model) is computed only when someone looks, as here.")
    block_params = {name: p.numel() for name, p in model.blocks[layer].named_parameters()}
    total_block = sum(block_params.values())
    parts = {"embedding W_E": model.embed.W_E.numel(),
             {"learned": "positions W_pos", "sinusoidal": "positions (sinusoidal: a fixed table)",
              "rotary": "positions (RoPE: rotations, no parameters)"}.get(cfg.positional, "positions (none)"):
                 sum(p.numel() for p in model.pos_embed.parameters()) if hasattr(model, "pos_embed") else 0,
             f"block {layer}": total_block, f"all {cfg.n_layers} blocks": sum(p.numel() for b in model.blocks
                                                                             for p in b.parameters()),
             "final norm": sum(p.numel() for p in model.ln_final.parameters()),
             "unembedding W_U" + (" (tied to W_E: no new parameters)" if cfg.tie_embeddings else ""):
                 0 if cfg.tie_embeddings else sum(p.numel() for p in model.unembed.parameters())}
    total = sum(p.numel() for p in model.parameters())
    m1, m2, m3 = st.columns(3)
    m1.metric(f"parameters in block {layer}", f"{total_block:,}")
    m2.metric("parameters in the model", f"{total:,}")
    m3.metric("share of one block", f"{total_block / max(1, total):.1%}")
    left, right = st.columns(2)
    with left:
        st.subheader(f"Block {layer}'s weights")
        st.dataframe(pd.DataFrame([{"weight": n, "shape": str(list(model.blocks[layer].get_parameter(n).shape)),
                                    "parameters": c} for n, c in block_params.items()]).style.format(
            {"parameters": "{:,}"}), hide_index=True)
    with right:
        st.subheader("The whole model")
        st.dataframe(pd.DataFrame([{"part": k, "parameters": v} for k, v in parts.items()]).style.format(
            {"parameters": "{:,}"}), hide_index=True)
    with st.expander("Every hook point of this block"):
        st.dataframe(pd.DataFrame(rows).drop(columns="residual"), hide_index=True)
