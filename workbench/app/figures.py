"""Plotly figures for the app's pages that ``workbench.plots`` does not (yet) build. No streamlit here.

Each builder takes tensors or DataFrames and returns a ``go.Figure``; the pages only place them.
"""

from __future__ import annotations

import html

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
from jaxtyping import Float
from plotly.subplots import make_subplots
from torch import Tensor

#: a qualitative palette for token chips (light, so dark text stays readable)
TOKEN_COLOURS = ["#fde2e4", "#e2ece9", "#fff1e6", "#dfe7fd", "#e9f5db", "#f0efeb", "#fad2e1", "#cddafd", "#bee1e6"]


def show_token(s: str) -> str:
    """Return a token's text with whitespace made visible (so ' the' and 'the' differ on screen)."""
    return s.replace(" ", "·").replace("\n", "↵").replace("\t", "→") or "∅"


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


def token_ids_figure(str_tokens: list[str], ids: list[int]) -> go.Figure:
    """Return a bar chart of token ids by position (hover shows the token)."""
    labels = [f"{i}: {show_token(s)}" for i, s in enumerate(str_tokens)]
    fig = go.Figure(go.Bar(x=labels, y=ids, hovertext=[show_token(s) for s in str_tokens]))
    fig.update_layout(title="Token ids by position", xaxis_title="position: token", yaxis_title="id", height=320)
    return fig


def attention_heatmap(pattern: Float[Tensor, "q k"], str_tokens: list[str], title: str) -> go.Figure:
    """Return one head's attention pattern (rows: queries, columns: keys)."""
    labels = [f"{i}:{show_token(s)}" for i, s in enumerate(str_tokens)]
    fig = go.Figure(go.Heatmap(z=pattern.numpy(), x=labels, y=labels, colorscale="Blues", zmin=0, zmax=1,
                               hovertemplate="query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="key", yaxis_title="query", yaxis_autorange="reversed",
                      height=max(360, 18 * len(labels) + 120))
    return fig


def attention_grid(patterns: Float[Tensor, "layer head q k"], max_layers: int = 32) -> go.Figure:
    """Return a grid of every head's pattern: one row per layer, one column per head."""
    n_layers, n_heads = patterns.shape[:2]
    n_layers = min(n_layers, max_layers)
    fig = make_subplots(rows=n_layers, cols=n_heads, horizontal_spacing=0.005, vertical_spacing=0.005,
                        row_titles=[f"L{layer}" for layer in range(n_layers)],
                        column_titles=[f"H{h}" for h in range(n_heads)])
    for layer in range(n_layers):
        for h in range(n_heads):
            fig.add_trace(go.Heatmap(z=patterns[layer, h].numpy(), colorscale="Blues", zmin=0, zmax=1, showscale=False,
                                     hovertemplate=f"L{layer}H{h}<br>q %{{y}} k %{{x}}<br>%{{z:.2f}}<extra></extra>"),
                          row=layer + 1, col=h + 1)
    fig.update_xaxes(showticklabels=False)
    fig.update_yaxes(showticklabels=False, autorange="reversed")
    fig.update_layout(title="All heads (rows: layers, columns: heads)", height=max(300, 70 * n_layers + 80),
                      margin=dict(l=40, r=40, t=80, b=20))
    return fig


def head_score_heatmaps(scores: pd.DataFrame, columns: list[str]) -> go.Figure:
    """Return one layer x head heatmap per score column."""
    fig = make_subplots(rows=1, cols=len(columns), subplot_titles=columns, horizontal_spacing=0.06)
    for i, col in enumerate(columns):
        grid = scores.pivot(index="layer", columns="head", values=col)
        fig.add_trace(go.Heatmap(z=grid.values, x=[f"H{h}" for h in grid.columns], y=[f"L{l}" for l in grid.index],
                                 colorscale="Viridis", zmin=0, zmax=1, showscale=i == len(columns) - 1,
                                 hovertemplate=f"{col}<br>%{{y}} %{{x}}: %{{z:.3f}}<extra></extra>"),
                      row=1, col=i + 1)
    fig.update_yaxes(autorange="reversed")
    fig.update_layout(height=max(300, 16 * scores["layer"].nunique() + 140), title="Head-type scores on this prompt")
    return fig


def scatter_2d(points: pd.DataFrame, title: str) -> go.Figure:
    """Return labelled points in 2-D."""
    fig = px.scatter(points, x="x", y="y", text=points["token"].map(show_token), title=title)
    fig.update_traces(textposition="top center")
    fig.update_layout(height=480)
    return fig


def bar_tokens(labels: list[str], values: list[float], title: str, value_name: str) -> go.Figure:
    """Return a horizontal bar chart of tokens and a value (largest on top)."""
    fig = go.Figure(go.Bar(x=values[::-1], y=[show_token(s) for s in labels][::-1], orientation="h"))
    fig.update_layout(title=title, xaxis_title=value_name, height=max(260, 22 * len(labels) + 100))
    return fig


def matrix_heatmap(z: Float[Tensor, "a b"], title: str, x_title: str, y_title: str, colorscale: str = "RdBu",
                   symmetric: bool = True) -> go.Figure:
    """Return a plain heatmap of a matrix."""
    arr = z.detach().float().cpu().numpy()
    lim = float(abs(arr).max()) if symmetric and arr.size else None
    fig = go.Figure(go.Heatmap(z=arr, colorscale=colorscale, zmid=0 if symmetric else None,
                               zmin=-lim if lim else None, zmax=lim))
    fig.update_layout(title=title, xaxis_title=x_title, yaxis_title=y_title, yaxis_autorange="reversed", height=420)
    return fig


def rope_frequencies(inv_freq: Float[Tensor, "pair"], theta: float) -> go.Figure:
    """Return RoPE's rotation frequency and wavelength per dimension pair (log scale)."""
    wavelength = 2 * 3.141592653589793 / inv_freq
    fig = make_subplots(rows=1, cols=2, subplot_titles=["frequency (radians per position)", "wavelength (positions)"])
    fig.add_trace(go.Scatter(y=inv_freq.numpy(), mode="lines+markers", name="frequency"), row=1, col=1)
    fig.add_trace(go.Scatter(y=wavelength.numpy(), mode="lines+markers", name="wavelength"), row=1, col=2)
    fig.update_yaxes(type="log")
    fig.update_xaxes(title_text="dimension pair")
    fig.update_layout(title=f"RoPE frequencies (theta = {theta:g})", height=360, showlegend=False)
    return fig


def sampling_figure(labels: list[str], raw: list[float], filtered: list[float]) -> go.Figure:
    """Return the top tokens' probabilities before and after temperature / top-k / top-p."""
    shown = [show_token(s) for s in labels]
    fig = go.Figure([go.Bar(x=shown, y=raw, name="softmax(logits)"),
                     go.Bar(x=shown, y=filtered, name="after temperature, top-k, top-p")])
    fig.update_layout(barmode="group", title="Next-token distribution", yaxis_title="probability", height=380)
    return fig


def parameter_figure(table: pd.DataFrame) -> go.Figure:
    """Return parameter counts by component for several models (log scale), from a long-form table."""
    fig = px.bar(table, x="component", y="parameters", color="model", barmode="group", log_y=True,
                 title="Parameters by component")
    fig.update_layout(height=420)
    return fig


def architecture_diagram(cfg) -> go.Figure:
    """Return a block diagram of a GPTConfig: embeddings, the residual stream through the blocks, unembedding."""
    boxes: list[tuple[str, str]] = [("tokens", "#eeeeee")]
    pos = {"learned": "+ learned positions", "sinusoidal": "+ sinusoidal positions", "rotary": "(RoPE inside attention)",
           "none": "(no positions)"}[cfg.positional]
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
