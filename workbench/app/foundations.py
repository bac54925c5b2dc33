"""Foundations pages: tokenizer, embeddings, positional encodings, sampling, architecture."""

from __future__ import annotations

import pandas as pd
import streamlit as st
import torch

from workbench import generate
from workbench.app import cached, compute, figures, share, ui
from workbench.app.dynamics import across_training
from workbench.app.sidebar import Selection
from workbench.model import GPTConfig, parameter_counts, rotary_tables, sinusoidal_table


def tokenizer_page(sel: Selection) -> None:
    st.title("Tokenizer")
    model = cached.model(sel.key)
    st.caption("How a text becomes token ids: each chip is one token (· marks a space, ↵ a newline), its id below. "
               "A token holding part of a multi-byte character shows its bytes (\\xe6\\x97).")
    default = ("Tokenizers split text into pieces: café, naïve, 1234567, def f(x): return x**2"
               if model.tokenizer is not None else None)
    _, enc = ui.prompt(sel.key, model, "tok_prompt", label="Text", default=default)
    shown = figures.token_texts(model.tokenizer, enc.ids, enc.str_tokens)
    st.markdown(figures.token_chips_html(shown, enc.ids), unsafe_allow_html=True)
    n_chars = sum(len(s) for s in enc.str_tokens)
    c1, c2, c3 = st.columns(3)
    c1.metric("tokens", len(enc.ids))
    c2.metric("characters", n_chars)
    c3.metric("characters per token", f"{n_chars / max(1, len(enc.ids)):.2f}")
    share.plot(figures.token_ids_figure(shown, enc.ids), key="tok_ids")
    if model.tokenizer is not None:
        bos = model.tokenizer.bos_token_id
        st.caption(f"Vocabulary: {model.tokenizer.vocab_size:,} tokens. BOS id {bos}, "
                   f"{'prepended' if model.tokenizer.add_bos else 'not prepended'} to plain text by this model.")


def embeddings_page(sel: Selection) -> None:
    st.title("Embeddings")
    model = cached.model(sel.key)
    unit = cached.unit_embeddings(sel.key)
    st.caption("Each token id indexes one row of W_E. Similar tokens get similar rows (cosine similarity).")
    left, right = st.columns(2)
    with left:
        st.subheader("Nearest neighbours")
        default_word = " king" if model.tokenizer is not None else "5"
        word = st.text_input("Token", value=default_word, key="emb_word", bind=share.URL)
        k = st.slider("How many", 5, 30, 10, key="emb_k", bind=share.URL)
        with ui.guard():
            ids, labels = compute.word_token_ids(model, [word]) if word.strip() or word else ([], [])
        if ids:
            nb = compute.nearest(unit, unit[ids[0]], k + 1, exclude=())
            rows = [(compute.token_label(model, i), c) for i, c in zip(nb.ids, nb.cosine) if i != ids[0]][:k]
            st.caption(f"Using token {figures.show_token(labels[0])!r} (id {ids[0]})")
            share.plot(figures.bar_tokens([r[0] for r in rows], [r[1] for r in rows], "Nearest tokens", "cosine",
                                          ids=[i for i in nb.ids if i != ids[0]][:k]), key="emb_neighbours")
    with right:
        st.subheader("Analogy arithmetic")
        st.caption("a is to b as c is to ?  — the tokens nearest E[b] − E[a] + E[c]")
        defaults = (" man", " king", " woman") if model.tokenizer is not None else ("1", "2", "3")
        a = st.text_input("a", defaults[0], key="emb_a", bind=share.URL)
        b = st.text_input("b", defaults[1], key="emb_b", bind=share.URL)
        c = st.text_input("c", defaults[2], key="emb_c", bind=share.URL)
        with ui.guard():
            nb, used = compute.analogy(model, unit, a, b, c, k=10)
        st.caption("Tokens used: " + ", ".join(repr(figures.show_token(s)) for s in used))
        st.dataframe(pd.DataFrame({"token": [figures.show_token(compute.token_label(model, i)) for i in nb.ids],
                                   "cosine": nb.cosine}), hide_index=True)
    st.subheader("2-D projection")
    default_words = ("king queen man woman prince princess Paris France London England Berlin Germany one two "
                     "three four five cat dog horse cow red green blue" if model.tokenizer is not None
                     else " ".join(str(i) for i in range(1, min(model.cfg.d_vocab, 25))))
    words = st.text_area("Words (first token of each)", default_words, key="emb_words", bind=share.URL)
    c1, c2 = st.columns(2)
    method = c1.radio("Method", ["pca", "tsne"], horizontal=True, key="emb_method", bind=share.URL,
                      format_func=lambda m: {"pca": "PCA", "tsne": "t-SNE"}[m])
    spaced = model.tokenizer is not None and c2.checkbox(
        "Each word with a leading space", True, key="emb_space", bind=share.URL,
        help="Mid-sentence words are tokens that start with a space (· on the plot): ' queen' is one token "
             "where 'queen' may split into pieces")
    with ui.guard(), st.spinner("Projecting…"):
        points, split = _projection(model, words, method, spaced)
    if split:
        st.caption("Not one token each, so the plot shows their first piece: "
                   + ", ".join(f"{figures.show_token(w)!r} → {' + '.join(repr(figures.show_token(p)) for p in ps)}"
                               for w, ps in split[:8]) + (" …" if len(split) > 8 else ""))
    share.plot(figures.scatter_2d(points, f"Token embeddings, {method.upper()} (scikit-learn)"), key="emb_projection")

    across_training(sel, "embeddings")  # a slider over the training snapshots, where the model has them


def _projection(model, words: str, method: str, spaced: bool):
    """Return the 2-D points of the first token of each word (with a leading space when ``spaced``) and
    the words that are more than one token, with their pieces.

    Computed here, not in ``cached.projection`` (which splits the words on whitespace, so it cannot
    keep a leading space): a PCA of a few dozen rows takes milliseconds, a t-SNE a fraction of a second.
    """
    listed = [(" " + w if spaced else w) for w in words.split()]
    split = []
    for w in listed:
        ids, pieces = compute.encode_no_bos(model, w)
        if len(ids) > 1:
            split.append((w, pieces))
    ids, labels = compute.word_token_ids(model, listed)
    points = compute.project_2d(model.embed.W_E[ids].detach().float().cpu(), labels, method)
    return points, split


def positional_page(sel: Selection) -> None:
    st.title("Positional encodings")
    model = cached.model(sel.key)
    cfg = model.cfg
    n = st.slider("Positions shown", 8, min(cfg.n_ctx, 512), min(cfg.n_ctx, 64), key="pos_n", bind=share.URL)
    st.caption(f"This model uses **{cfg.positional}** positions.")
    if cfg.positional == "learned":
        W_pos = model.pos_embed.W_pos[:n].detach().float().cpu()
        share.plot(figures.matrix_heatmap(W_pos, "Learned W_pos (this model)", "d_model", "position"),
                   key="pos_learned")
        unit = compute.unit_rows(W_pos)
        share.plot(figures.matrix_heatmap(unit @ unit.T, "Cosine similarity between learned positions", "position",
                                          "position"), key="pos_cos")
    if cfg.positional == "rotary":
        d_head = cfg.d_head
        inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, d_head, 2).float() / d_head))
        share.plot(figures.rope_frequencies(inv_freq, cfg.rope_theta), key="rope_freq")
        cos, _ = rotary_tables(n, d_head, cfg.rope_theta)
        share.plot(figures.matrix_heatmap(cos[:, : d_head // 2], "RoPE cos(position × frequency), per dimension pair",
                                          "dimension pair", "position"), key="rope_cos")
    d_ref = cfg.d_model if cfg.d_model % 2 == 0 else cfg.d_model + 1
    table = sinusoidal_table(n, d_ref)
    share.plot(figures.matrix_heatmap(table, f"Sinusoidal encoding (Vaswani et al.), d_model {d_ref}"
                                   + (" — this model's" if cfg.positional == "sinusoidal" else " — for comparison"),
                                   "d_model", "position"), key="pos_sin")


def sampling_page(sel: Selection) -> None:
    st.title("Sampling")
    model = cached.model(sel.key)
    text, enc = ui.prompt(sel.key, model, "samp_prompt",
                          default="The capital of France is" if model.tokenizer is not None else None)
    c1, c2, c3 = st.columns(3)
    temperature = c1.slider("Temperature (0 = greedy)", 0.0, 2.0, 1.0, 0.05, key="samp_t", bind=share.URL)
    top_k = c2.slider("top-k (0 = off)", 0, 100, 0, key="samp_k", bind=share.URL)
    top_p = c3.slider("top-p (1 = off)", 0.05, 1.0, 1.0, 0.05, key="samp_p", bind=share.URL)
    with st.spinner("Running the model…"):  # one pass per prompt (cached); the sliders only re-filter it
        logits = cached.next_token_logits(sel.key, text)
    raw = logits.softmax(-1)
    filtered = compute.sampling_probs(logits, temperature, top_k or None, top_p if top_p < 1 else None)
    order = raw.topk(min(20, raw.shape[0])).indices.tolist()
    labels = [compute.token_label(model, i) for i in order]
    share.plot(figures.sampling_figure(labels, raw[order].tolist(), filtered[order].tolist(), ids=order),
               key="samp_dist")
    kept = int((filtered > 0).sum())
    entropy = max(0.0, float(-(filtered[filtered > 0] * filtered[filtered > 0].log()).sum()))
    st.caption(f"{figures.count_noun(kept, 'token')} can be sampled; entropy {figures.nats(entropy)} nats.")
    st.subheader("Generate")
    g1, g2 = st.columns(2)
    n_new = g1.slider("New tokens", 1, 64, 24, key="samp_new", bind=share.URL)
    seed = g2.number_input("Seed", 0, 2**31 - 1, 0, key="samp_seed", bind=share.URL)
    if st.button("Generate", key="samp_go"):
        out = st.empty()
        pieces: list[str] = []
        with ui.guard(), st.spinner(f"Generating {figures.count_noun(n_new, 'token')}…"):
            for event in generate.stream_generate(model, torch.tensor(enc.ids), n_new, temperature=temperature,
                                                  top_k=top_k or None, top_p=top_p if top_p < 1 else None,
                                                  seed=int(seed), stop_tokens=[]):
                pieces.append(event.text if model.tokenizer is not None else f" {event.token}")
                out.markdown(figures.generated_text_html("".join(enc.str_tokens), "".join(pieces)),
                             unsafe_allow_html=True)
        st.session_state["samp_last"] = "".join(pieces)


def architecture_page(sel: Selection) -> None:
    st.title("Architecture")
    model = cached.model(sel.key)
    cfg = model.cfg
    share.plot(figures.architecture_diagram(cfg), key="arch_diagram")
    compare = st.multiselect("Compare with", ["GPT-2 small", "GPT-3 175B"], ["GPT-2 small", "GPT-3 175B"],
                             key="arch_compare")
    configs = {cfg.name or sel.name: cfg}
    if "GPT-2 small" in compare:
        configs["GPT-2 small"] = GPTConfig.gpt2_small()
    if "GPT-3 175B" in compare:
        configs["GPT-3 175B"] = GPTConfig.gpt3_175b()
    rows = []
    for name, c in configs.items():
        for component, count in parameter_counts(c).items():
            rows.append({"model": name, "component": component, "parameters": count})
    table = pd.DataFrame(rows)
    shown = table[(table.parameters > 0) & ~table.component.isin(["total", "weights"])]
    scale = st.radio("Scale", ["log", "linear"], horizontal=True, key="arch_scale", bind=share.URL)
    share.plot(figures.parameter_figure(shown, log=scale == "log"), key="arch_params")
    wide = table.pivot(index="component", columns="model", values="parameters").loc[
        lambda t: t.index.isin(parameter_counts(cfg).keys())]
    st.dataframe(wide.style.format("{:,}"))
    actual = sum(p.numel() for p in model.parameters())
    st.caption(f"This model's loaded parameters: {actual:,} (the table counts {parameter_counts(cfg)['total']:,}).")
    with st.expander("Configuration"):
        st.json(cfg.to_dict())
