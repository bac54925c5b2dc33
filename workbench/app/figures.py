"""Plotly figures for the app's pages that ``workbench.plots`` does not (yet) build. No streamlit here.

Each builder takes tensors or DataFrames and returns a ``go.Figure``; the pages only place them.
"""

from __future__ import annotations

import html

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

from workbench import plots
from workbench.analysis.logit_lens import LensComparison

#: a qualitative palette for token chips (light, so dark text stays readable)
TOKEN_COLOURS = ["#fde2e4", "#e2ece9", "#fff1e6", "#dfe7fd", "#e9f5db", "#f0efeb", "#fad2e1", "#cddafd", "#bee1e6"]


#: a token's text with whitespace made visible (so ' the' and 'the' differ on screen)
show_token = plots.show_token


def token_chips_html(str_tokens: list[str], ids: list[int]) -> str:
    """Return HTML showing each token as a coloured chip with its id underneath."""
    chips = []
    for i, (s, t) in enumerate(zip(str_tokens, ids)):
        colour = TOKEN_COLOURS[i % len(TOKEN_COLOURS)]
        chips.append(
            f'<span style="display:inline-block;margin:2px;padding:2px 4px;border-radius:4px;background:{colour};'
            f'color:#222;font-family:monospace;text-align:center">{html.escape(show_token(s))}'
            f'<br><span style="font-size:70%;color:#666">{t}</span></span>'
        )
    return "<div>" + "".join(chips) + "</div>"


def highlighted_tokens_html(str_tokens: list[str], values: list[float], vmax: float | None = None) -> str:
    """Return HTML of the tokens with a background whose strength follows ``values`` (for activations)."""
    top = vmax if vmax is not None else max([abs(v) for v in values] + [1e-9])
    spans = []
    for s, v in zip(str_tokens, values):
        alpha = min(1.0, abs(v) / top) if top > 0 else 0.0
        rgb = "255,120,0" if v >= 0 else "0,120,255"
        spans.append(
            f'<span title="{v:.3g}" style="background:rgba({rgb},{alpha:.2f});color:#222;font-family:monospace;'
            f'padding:0 1px">{html.escape(show_token(s))}</span>'
        )
    return "".join(spans)


def token_ids_figure(str_tokens: list[str], ids: list[int], value_name: str = "id",
                     title: str = "Token ids by position") -> go.Figure:
    """Return a bar per position of a prompt (token ids by default): a categorical axis of the tokens."""
    labels = plots.token_labels(str_tokens)
    fig = go.Figure(go.Bar(x=labels, y=ids, hovertemplate=f"%{{x}}<br>{value_name} %{{y}}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="position: token", yaxis_title=value_name, height=320)
    return plots.category_axis(fig, "x", labels, every_label=len(labels) <= 64)


def attention_heatmap(pattern: Float[Tensor, "q k"], str_tokens: list[str], title: str) -> go.Figure:
    """Return one head's attention pattern (rows: queries, columns: keys), every token labelled on
    both axes; the hover names the head (``title``), the query and the key."""
    labels = plots.token_labels(str_tokens)
    fig = plots.heatmap(pattern, labels, labels, title, "Blues", zmin=0, zmax=1, xlabel="key", ylabel="query",
                        height=max(360, 18 * len(labels) + 140), margin=None)
    fig.data[0].hovertemplate = f"{title}<br>query %{{y}}<br>key %{{x}}<br>attention %{{z:.3f}}<extra></extra>"
    plots.category_axis(fig, "x", labels)
    plots.category_axis(fig, "y", labels)
    return fig.update_yaxes(autorange="reversed")


def head_name(layer: int, head: int) -> str:
    return f"L{layer}H{head}"


def attention_grid(patterns: Float[Tensor, "layer head q k"], str_tokens: list[str] | None = None,
                   layers: range | None = None) -> go.Figure:
    """Return a grid of heads' patterns (one row per layer of ``layers``, one column per head) as one
    tiled heatmap, with a click target (a square marker, trace 1) at each tile's centre whose
    ``customdata`` is ``[layer, head]``.

    One trace, not a subplot per head: SmolLM2's 270 heads as subplots take seconds to build and draw.
    Each row and column has its own category label (``"L3 query 4: ·cat"``, ``"H2 key 1: ·The"``), so
    the hover names the head, the query and the key without a per-cell hover table.
    """
    n_layers, n_heads, n, _ = patterns.shape
    layers = layers if layers is not None else range(n_layers)
    toks = plots.token_labels(str_tokens) if str_tokens else [str(i) for i in range(n)]
    gap = 1
    tiles = np.full((len(layers) * (n + gap), n_heads * (n + gap)), np.nan, dtype=np.float32)
    grid = patterns[list(layers)].float().numpy()
    for r_i in range(len(layers)):
        for h in range(n_heads):
            r, c = r_i * (n + gap), h * (n + gap)
            tiles[r:r + n, c:c + n] = grid[r_i, h]
    x = [f"H{h} key {toks[j]}" if j < n else f"H{h} |" for h in range(n_heads) for j in range(n + gap)]
    y = [f"L{layer} query {toks[i]}" if i < n else f"L{layer} —" for layer in layers for i in range(n + gap)]
    fig = go.Figure(go.Heatmap(z=tiles, x=x, y=y, colorscale="Blues", zmin=0, zmax=1, showscale=False,
                               hoverongaps=False, xgap=0, ygap=0,
                               hovertemplate="%{y}<br>%{x}<br>attention %{z:.3f}<extra></extra>"))
    centre = n // 2
    fig.add_trace(go.Scatter(
        x=[x[h * (n + gap) + centre] for _ in layers for h in range(n_heads)],
        y=[y[r_i * (n + gap) + centre] for r_i in range(len(layers)) for _ in range(n_heads)],
        customdata=[[layer, h] for layer in layers for h in range(n_heads)], mode="markers",
        marker=dict(symbol="square-open", size=11, color="rgba(197,48,48,0.6)", line=dict(width=2)),
        hovertemplate="L%{customdata[0]}H%{customdata[1]}: click to open<extra></extra>", showlegend=False,
        meta=plots.NO_EXPORT, name="open a head"))
    fig.update_xaxes(type="category", categoryorder="array", categoryarray=x, tickmode="array",
                     tickvals=[x[h * (n + gap) + centre] for h in range(n_heads)],
                     ticktext=[f"H{h}" for h in range(n_heads)], side="top", showgrid=False, zeroline=False)
    fig.update_yaxes(type="category", categoryorder="array", categoryarray=y, tickmode="array",
                     tickvals=[y[r_i * (n + gap) + centre] for r_i in range(len(layers))],
                     ticktext=[f"L{layer}" for layer in layers], autorange="reversed", showgrid=False,
                     zeroline=False)
    # about square tiles on a ~1200 px wide page without scaleanchor, which would leave the height unused
    tile_px = min(160, max(60, 1100 // n_heads))
    fig.update_layout(title="All heads (rows: layers, columns: heads; click a head's marker to open it)",
                      height=max(300, tile_px * len(layers) + 110), margin=dict(l=40, r=20, t=90, b=20),
                      plot_bgcolor="white")
    return fig


def scatter_2d(points: pd.DataFrame, title: str) -> go.Figure:
    """Return labelled points in 2-D."""
    fig = px.scatter(points, x="x", y="y", text=points["token"].map(show_token), title=title)
    fig.update_traces(textposition="top center")
    fig.update_layout(height=480)
    return fig


def bar_tokens(labels: list[str], values: list[float], title: str, value_name: str,
               ids: list[int] | None = None) -> go.Figure:
    """Return a horizontal bar chart of ranked vocabulary tokens and a value, first on top (a
    categorical axis: ``"#1 ·queen"``; the hover adds the token id when ``ids`` are given)."""
    fig = go.Figure(_ranked_bar(labels, values, value_name, ids))
    fig.update_layout(title=title, xaxis_title=value_name, height=max(260, 22 * len(labels) + 100))
    return plots.category_axis(fig, "y", plots.token_labels(labels, "rank")).update_yaxes(autorange="reversed")


def _ranked_bar(labels: list[str], values: list[float], value_name: str, ids: list[int] | None = None,
                **bar) -> go.Bar:
    """Return one horizontal bar trace of ranked tokens (labels as :func:`plots.token_labels` ranks)."""
    shown = plots.token_labels(labels, "rank")
    hover = f"%{{y}}<br>{value_name} %{{x:.4g}}" + ("<br>id %{customdata}" if ids is not None else "")
    return go.Bar(x=values, y=shown, orientation="h", customdata=ids, hovertemplate=hover + "<extra></extra>", **bar)


def matrix_heatmap(z: Float[Tensor, "a b"], title: str, x_title: str, y_title: str, colorscale: str = "RdBu",
                   symmetric: bool = True) -> go.Figure:
    """Return a plain heatmap of a matrix."""
    arr = z.detach().float().cpu().numpy()
    lim = float(abs(arr).max()) if symmetric and arr.size else None
    return plots.heatmap(arr, None, None, title, colorscale, zmid=0 if symmetric else None,
                         zmin=-lim if lim else None, zmax=lim, xlabel=x_title, ylabel=y_title, hover=None,
                         height=420, margin=None)


def rope_frequencies(inv_freq: Float[Tensor, " pair"], theta: float) -> go.Figure:
    """Return RoPE's rotation frequency and wavelength per dimension pair (log scale)."""
    wavelength = 2 * 3.141592653589793 / inv_freq
    fig = make_subplots(rows=1, cols=2, subplot_titles=["frequency (radians per position)", "wavelength (positions)"])
    fig.add_trace(go.Scatter(y=inv_freq.numpy(), mode="lines+markers", name="frequency"), row=1, col=1)
    fig.add_trace(go.Scatter(y=wavelength.numpy(), mode="lines+markers", name="wavelength"), row=1, col=2)
    fig.update_yaxes(type="log")
    fig.update_xaxes(title_text="dimension pair")
    fig.update_layout(title=f"RoPE frequencies (theta = {theta:g})", height=360, showlegend=False)
    return fig


def sampling_figure(labels: list[str], raw: list[float], filtered: list[float],
                    ids: list[int] | None = None) -> go.Figure:
    """Return the top tokens' probabilities before and after temperature / top-k / top-p, in the
    order given (by probability), on a categorical axis (``"#1 ·Paris"``): digits stay in that order."""
    shown = plots.token_labels(labels, "rank")
    hover = "%{x}<br>%{fullData.name}: %{y:.4f}" + ("<br>id %{customdata}" if ids is not None else "")
    fig = go.Figure([go.Bar(x=shown, y=raw, name="softmax(logits)", customdata=ids,
                            hovertemplate=hover + "<extra></extra>"),
                     go.Bar(x=shown, y=filtered, name="after temperature, top-k, top-p", customdata=ids,
                            hovertemplate=hover + "<extra></extra>")])
    fig.update_layout(barmode="group", title="Next-token distribution", yaxis_title="probability", height=380,
                      xaxis_title="token (rank by probability)")
    return plots.category_axis(fig, "x", shown)


def parameter_figure(table: pd.DataFrame, log: bool = True) -> go.Figure:
    """Return parameter counts by component for several models (log scale), from a long-form table."""
    fig = px.bar(table, x="component", y="parameters", color="model", barmode="group", log_y=log,
                 title="Parameters by component")
    fig.update_layout(height=420)
    return fig


def architecture_diagram(cfg) -> go.Figure:
    """Return a block diagram of a GPTConfig: embeddings, the residual stream through the blocks, unembedding."""
    boxes: list[tuple[str, str]] = [("tokens", "#eeeeee")]
    pos = {"learned": "+ learned positions", "sinusoidal": "+ sinusoidal positions",
           "rotary": "(RoPE inside attention)", "none": "(no positions)"}[cfg.positional]
    boxes.append((f"embed W_E [{cfg.d_vocab}, {cfg.d_model}] {pos}", "#dfe7fd"))
    norm = "LayerNorm" if cfg.normalization == "layernorm" else "RMSNorm"
    attn = f"{norm} → attention: {cfg.n_heads} heads × d_head {cfg.d_head}"
    if cfg.n_kv != cfg.n_heads:
        attn += f" ({cfg.n_kv} KV heads)"
    mlp = None if cfg.attn_only else (
        f"{norm} → MLP {cfg.d_model}→{cfg.d_mlp}→{cfg.d_model} ({'gated ' if cfg.gated_mlp else ''}{cfg.act_fn})")
    shown_layers = list(range(cfg.n_layers)) if cfg.n_layers <= 4 else [0, 1, None, cfg.n_layers - 1]
    for layer in shown_layers:
        if layer is None:
            boxes.append((f"⋮ {cfg.n_layers - 3} more blocks ⋮", "#ffffff"))
            continue
        boxes.append((f"block {layer}: {attn}  (+= residual)", "#fde2e4"))
        if mlp:
            boxes.append((f"block {layer}: {mlp}  (+= residual)", "#e2ece9"))
    boxes.append((f"final {norm}", "#f0efeb"))
    tied = " (tied to W_E)" if cfg.tie_embeddings else ""
    boxes.append((f"unembed W_U [{cfg.d_model}, {cfg.d_vocab}]{tied} → logits", "#dfe7fd"))
    fig = go.Figure()
    n = len(boxes)
    for i, (label, colour) in enumerate(boxes):
        y = n - i
        fig.add_shape(type="rect", x0=0, x1=10, y0=y - 0.4, y1=y + 0.4, fillcolor=colour, line=dict(color="#888"))
        fig.add_annotation(x=5, y=y, text=label, showarrow=False, font=dict(size=12, color="#222"))
        if i:
            fig.add_annotation(x=5, y=y + 0.4, ax=5, ay=y + 0.6, xref="x", yref="y", axref="x", ayref="y",
                               showarrow=True, arrowhead=2, text="")
    fig.add_shape(type="line", x0=10.4, x1=10.4, y0=1.5, y1=n - 0.5, line=dict(color="#c44", width=3))
    fig.add_annotation(x=10.6, y=n / 2 + 0.5, text="residual stream", textangle=90, showarrow=False,
                       font=dict(color="#c44"))
    fig.update_xaxes(visible=False, range=[-0.5, 11.2])
    fig.update_yaxes(visible=False, range=[0.3, n + 0.7])
    fig.update_layout(title=f"Architecture of {cfg.name or 'this model'}", height=60 * n + 80,
                      margin=dict(l=10, r=10, t=50, b=10), plot_bgcolor="white")
    return fig


# ------------------------------------------------------------------------------------ induction


def dynamics_figure(steps: list[int], max_induction: list[list[float]], max_prev: list[list[float]],
                    loss_first: list[float], loss_repeat: list[float]) -> go.Figure:
    """Return induction scores and per-copy losses across training snapshots (the phase change)."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["best head score per layer", "loss on repeated random tokens"])
    n_layers = len(max_induction[0]) if max_induction else 0
    for layer in range(n_layers):
        fig.add_trace(go.Scatter(x=steps, y=[p[layer] for p in max_induction], mode="lines+markers",
                                 name=f"induction, layer {layer}"), row=1, col=1)
        fig.add_trace(go.Scatter(x=steps, y=[p[layer] for p in max_prev], mode="lines+markers", line_dash="dot",
                                 name=f"previous token, layer {layer}"), row=1, col=1)
    fig.add_trace(go.Scatter(x=steps, y=loss_first, mode="lines+markers", name="loss, first copy"), row=1, col=2)
    fig.add_trace(go.Scatter(x=steps, y=loss_repeat, mode="lines+markers", name="loss, repeat"), row=1, col=2)
    fig.update_xaxes(title_text="training step")
    fig.update_yaxes(title_text="score", range=[0, 1.02], row=1, col=1)
    fig.update_yaxes(title_text="loss (nats)", row=1, col=2)
    fig.update_layout(title="Training dynamics across snapshots", height=420)
    return fig


def metrics_figure(metrics: pd.DataFrame, columns: list[str]) -> go.Figure:
    """Return training-log curves (``metrics.jsonl`` columns) against the step."""
    fig = go.Figure()
    for col in columns:
        rows = metrics[["step", col]].dropna()
        fig.add_trace(go.Scatter(x=rows["step"], y=rows[col], mode="lines", name=col))
    fig.update_layout(title="Training log", xaxis_title="step", height=380)
    return fig


# ------------------------------------------------------------------------------------ logit lens


def rank_across_layers(labels: list[str], rank: list[int], prob: list[float], token: str, pos_label: str) -> go.Figure:
    """Return the target token's rank (log scale) and probability at one position, layer by layer."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["rank (0 = top prediction)", "probability"])
    fig.add_trace(go.Scatter(x=labels, y=[r + 1 for r in rank], mode="lines+markers", name="rank + 1",
                             customdata=rank, hovertemplate="layer %{x}: rank %{customdata}<extra></extra>"),
                  row=1, col=1)
    fig.add_trace(go.Scatter(x=labels, y=prob, mode="lines+markers", name="probability"), row=1, col=2)
    fig.update_yaxes(type="log", title_text="rank + 1", row=1, col=1)
    fig.update_yaxes(range=[0, 1], row=1, col=2)
    fig.update_xaxes(title_text="layer (resid_pre; final = the output)")
    fig.update_layout(title=f"Target {show_token(token)!r} across layers at {pos_label}", height=360, showlegend=False)
    for col in (1, 2):  # categorical: "final" after "29" is a row, not a number plotly drops
        plots.category_axis(fig, "x", labels, every_label=len(labels) <= 40, row=1, col=col)
    return fig


# ------------------------------------------------------------------------------------------ SAEs


def density_histogram(log10_density, feature: int | None = None) -> go.Figure:
    """Return the histogram of every latent's log10 firing density, with one latent marked."""
    values = np.asarray(log10_density, dtype=float)
    fig = go.Figure(go.Histogram(x=values[np.isfinite(values)], nbinsx=50, name="latents"))
    if feature is not None and np.isfinite(values[feature]):
        fig.add_vline(x=float(values[feature]), line_color="#c44", annotation_text=f"latent {feature}")
    fig.update_layout(title="Feature density (all latents)", xaxis_title="log10 fraction of tokens it fires on",
                      yaxis_title="latents", height=320)
    return fig


def activation_histogram(edges, counts, feature: int) -> go.Figure:
    """Return one latent's activation histogram on log-spaced bins."""
    edges = np.asarray(edges, dtype=float)
    centres = np.sqrt(edges[:-1] * edges[1:])
    counts = np.asarray(counts)
    keep = counts > 0
    fig = go.Figure(go.Bar(x=centres[keep], y=counts[keep], width=(edges[1:] - edges[:-1])[keep]))
    # 1-2-5 ticks written out: plotly's log ticks label 0.2 .. 0.9 as bare digits "2 .. 9"
    shown = centres[keep]
    lo, hi = (float(shown.min()), float(shown.max())) if shown.size else (1.0, 1.0)
    ticks = [m * 10.0 ** e for e in range(int(np.floor(np.log10(lo))) - 1, int(np.ceil(np.log10(hi))) + 1)
             for m in (1, 2, 5) if lo / 2 <= m * 10.0 ** e <= hi * 2]
    fig.update_xaxes(type="log", title_text="activation", tickvals=ticks, ticktext=[f"{t:g}" for t in ticks])
    fig.update_layout(title=f"Activations of latent {feature} where it fires", yaxis_title="tokens", height=320)
    return fig


def logit_effects_figure(top: list[str], top_values: list[float], bottom: list[str], bottom_values: list[float],
                         feature: int) -> go.Figure:
    """Return the tokens a latent's decoder direction raises and lowers most."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=["raises", "lowers"], horizontal_spacing=0.15)
    fig.add_trace(_ranked_bar(top, top_values, "logit effect", marker_color="#2b6cb0", name="raises"), row=1, col=1)
    fig.add_trace(_ranked_bar(bottom, bottom_values, "logit effect", marker_color="#c53030", name="lowers"),
                  row=1, col=2)
    fig.update_layout(title=f"Logit effects of latent {feature}", showlegend=False,
                      height=max(300, 22 * len(top) + 120))
    plots.category_axis(fig, "y", plots.token_labels(top, "rank"), row=1, col=1)
    plots.category_axis(fig, "y", plots.token_labels(bottom, "rank"), row=1, col=2)
    return fig.update_yaxes(autorange="reversed")


# ------------------------------------------------------------------------------------ superposition


def toy_geometry_figure(W: Float[Tensor, "d_hidden feature"], importance: list[float]) -> go.Figure:
    """Return the feature directions of a toy model: arrows in the plane when d_hidden is 2, else
    ``W^T W`` (features' overlaps) as a heatmap."""
    W = W.detach().float().cpu()
    if W.shape[0] == 2:
        fig = go.Figure()
        top = max(importance) or 1.0
        for i in range(W.shape[1]):
            x, y = float(W[0, i]), float(W[1, i])
            shade = 0.25 + 0.75 * importance[i] / top
            fig.add_trace(go.Scatter(x=[0, x], y=[0, y], mode="lines+markers+text", text=["", f"f{i}"],
                                     textposition="top center",
                                     line=dict(width=3, color=f"rgba(60,60,200,{shade:.2f})"), name=f"feature {i}",
                                     hovertemplate=f"feature {i}<br>(%{{x:.2f}}, %{{y:.2f}})<extra></extra>"))
        lim = max(1.1, float(W.abs().max()) * 1.15)
        fig.update_xaxes(range=[-lim, lim], zeroline=True)
        fig.update_yaxes(range=[-lim, lim], scaleanchor="x", scaleratio=1, zeroline=True)
        fig.update_layout(title="Feature directions W_i in the 2-D hidden space (darker: more important)", height=480,
                          showlegend=False)
        return fig
    return matrix_heatmap(W.T @ W, "WᵀW: each feature's overlap with every other", "feature", "feature")


def toy_norms_figure(norms: list[float], fractional: list[float]) -> go.Figure:
    """Return each feature's norm ||W_i||, coloured by its fractional dimensionality."""
    fig = go.Figure(go.Bar(x=[f"f{i}" for i in range(len(norms))], y=norms,
                           marker=dict(color=fractional, colorscale="Viridis", cmin=0, cmax=1,
                                       colorbar=dict(title="dims / feature")),
                           hovertemplate="%{x}: norm %{y:.2f}<br>dimensionality %{marker.color:.2f}<extra></extra>"))
    fig.update_layout(title="Feature norms (colour: fractional dimensionality)", yaxis_title="||W_i||", height=340)
    return fig


# ------------------------------------------------------------------------------------------ text


def count_noun(n: int, singular: str, plural: str | None = None) -> str:
    """Return ``"1 token"`` / ``"3 tokens"``: a count with its noun in the right number."""
    return f"{n:,} {singular if n == 1 else (plural or singular + 's')}"


def nats(x: float, digits: int = 2) -> str:
    """Return ``x`` to ``digits`` places with no ``-0.00`` (a zero entropy computed as -1e-9)."""
    shown = f"{x:.{digits}f}"
    return shown[1:] if shown.startswith("-") and float(shown) == 0 else shown


def _byte_decoder() -> dict[str, int]:
    """Return GPT-2's byte-level alphabet backwards: the printable stand-in of each byte -> the byte."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


_BYTES = _byte_decoder()


def token_bytes(tokenizer, token_id: int) -> bytes | None:
    """Return the bytes a byte-level BPE token stands for (None when the vocabulary is not byte-level)."""
    piece = tokenizer.tok.id_to_token(int(token_id))
    if piece is None or not all(ch in _BYTES for ch in piece):
        return None
    return bytes(_BYTES[ch] for ch in piece)


def token_texts(tokenizer, ids: list[int], str_tokens: list[str]) -> list[str]:
    """Return each token as text, or as its bytes (``\\xe6\\x97``) where it holds part of a multi-byte
    character and decodes on its own to the replacement glyph."""
    out = []
    for t, s in zip(ids, str_tokens):
        raw = token_bytes(tokenizer, t) if tokenizer is not None and "\ufffd" in s else None
        if raw is None:
            out.append(s)
            continue
        text = raw.decode("utf-8", errors="backslashreplace")
        out.append(text)
    return out


_MARKDOWN_SPECIALS = {c: f"&#{ord(c)};" for c in "*_`~#[]\\|$+-!{}()"}


def plain_text_html(text: str) -> str:
    """Return ``text`` as HTML that no markdown renderer reinterprets (``**`` stays two asterisks)."""
    escaped = html.escape(text, quote=True)
    escaped = "".join(_MARKDOWN_SPECIALS.get(c, c) for c in escaped)
    return escaped.replace("\n", "<br>")


def generated_text_html(prompt: str, generated: str) -> str:
    """Return a prompt (bold) and its continuation as plain text in one HTML block (whitespace kept)."""
    return (f'<div style="white-space:pre-wrap;line-height:1.5"><b>{plain_text_html(prompt)}</b>'
            f"{plain_text_html(generated)}</div>")


# ------------------------------------------------------------------------------------ logit lens


def lens_kl_on_prompt(logit, tuned) -> go.Figure:
    """Return the per-layer KL(final || lens) of the logit and a tuned lens, averaged over the prompt's
    positions (two :class:`~workbench.analysis.logit_lens.LensResult` of the same prompt)."""
    comparison = LensComparison(list(logit.labels[:-1]), logit.kl_to_final[:-1, 0].mean(-1),
                                tuned.kl_to_final[:-1, 0].mean(-1))
    return plots.lens_kl_figure(comparison, title="KL(final output ‖ lens) by layer, mean over this prompt")


# ------------------------------------------------------------------------------------------ SAEs


def feature_card_html(title: str, facts: dict[str, str], figs: list[go.Figure], contexts_html: str) -> str:
    """Return one SAE latent's card as a standalone HTML page: its numbers, its figures (plotly.js
    embedded once, so the file opens offline) and its top activating contexts."""
    parts = []
    for i, fig in enumerate(figs):
        # plotly's own look: outside the app, the app's ("streamlit") default template draws bars black
        fig = go.Figure(fig).update_layout(template="plotly_white")
        parts.append(fig.to_html(full_html=False, include_plotlyjs=i == 0, config={"displaylogo": False}))
    rows = "".join(f"<tr><th>{html.escape(k)}</th><td>{html.escape(v)}</td></tr>" for k, v in facts.items())
    return (
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>body{{font-family:sans-serif;margin:24px;max-width:1100px}}"
        "th{text-align:left;padding-right:16px}td{font-family:monospace}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><table>{rows}</table>{''.join(parts)}"
        f"<h2>Top activating contexts</h2>{contexts_html}</body></html>\n"
    )


# ------------------------------------------------------------------------------------ induction

#: an induction score (mean attention to the token after an earlier copy) below this is no evidence of an
#: induction head: a head attending uniformly over ~40 earlier tokens already scores about 0.025
INDUCTION_THRESHOLD = 0.3


def weak_head_note(best: dict, threshold: float = INDUCTION_THRESHOLD, kind: str = "induction") -> str | None:
    """Return a caveat when the best head's score is below ``threshold`` (None when it is above): the
    "best" head of a model without one is only the least bad."""
    if best["score"] >= threshold:
        return None
    article = "an" if kind[:1] in "aeiou" else "a"
    return (f"No head reaches {article} {kind} score of {threshold:g}: L{best['layer']}H{best['head']} is only the "
            f"highest, at {best['score']:.2f}, so this model shows no clear {kind} head on these sequences.")


# ------------------------------------------------------------------------------------ SAE latents

#: the opening latent's density range: rarer ones are noise-like, denser ones fire on everything
OPENING_DENSITY = (1e-4, 0.05)
LATENT_ORDERS = {"max_act": "strongest activation", "density": "density", "latent": "index"}


def latent_table(density: Tensor, max_act: Tensor, fires_on: list[str], raises: list[str]) -> pd.DataFrame:
    """Return one row per latent: its index, density, max activation, the token of its top activation
    (``fires_on``) and the tokens its decoder raises most (``raises``), for browsing and search."""
    return pd.DataFrame({"latent": range(len(fires_on)), "density": density.float().cpu().numpy(),
                         "max act": max_act.float().cpu().numpy(), "fires most on": [show_token(t) for t in fires_on],
                         "raises": raises})


def opening_latent(table: pd.DataFrame) -> int:
    """Return the latent a browser opens on: a live one in :data:`OPENING_DENSITY` whose top activation is
    on a token that is not whitespace, strongest first (else the strongest live latent, else 0)."""
    live = table[table.density > 0]
    if live.empty:
        return 0
    lo, hi = OPENING_DENSITY
    blank = live["fires most on"].str.strip("·↵→∅ ").eq("")
    good = live[(live.density >= lo) & (live.density <= hi) & ~blank]
    pick = good if not good.empty else live
    return int(pick.sort_values("max act", ascending=False).latent.iloc[0])


def find_latents(table: pd.DataFrame, query: str = "", hide_dead: bool = True, order: str = "max_act") -> pd.DataFrame:
    """Return the latents to list: live ones only when ``hide_dead``, those whose top token or raised tokens
    contain ``query`` (case-insensitive; a number finds that latent), sorted by ``order`` (a
    :data:`LATENT_ORDERS` key)."""
    shown = table[table.density > 0] if hide_dead else table
    q = query.strip()
    if q:
        if q.isdigit():
            shown = shown[shown.latent == int(q)]
        else:
            needle = show_token(q).lower()
            hit = shown["fires most on"].str.lower().str.contains(needle, regex=False) | shown["raises"].str.lower(
            ).str.contains(needle, regex=False)
            shown = shown[hit]
    column = {"max_act": "max act", "density": "density", "latent": "latent"}[order]
    return shown.sort_values(column, ascending=order == "latent", kind="stable")
