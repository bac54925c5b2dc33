"""Plotly figures (and token HTML) for the teaching and training-dynamics pages. No streamlit here.

Each builder takes tensors, lists or DataFrames and returns a ``go.Figure`` (or an HTML string);
the pages only place them. Matrices over tokens carry the tokens as axis labels.
"""

from __future__ import annotations

import html
import math

import pandas as pd
import plotly.graph_objects as go
from plotly.subplots import make_subplots
from torch import Tensor

PALETTE = ["#fde2e4", "#e2ece9", "#fff1e6", "#dfe7fd", "#e9f5db", "#f0efeb", "#fad2e1", "#cddafd", "#bee1e6"]


def visible(token: str) -> str:
    """Return a token with spaces and newlines made visible (· and ↵)."""
    return token.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥")


def token_axis(tokens: list[str]) -> list[str]:
    """Return unique axis labels ``"i: token"`` (plotly merges equal category labels)."""
    return [f"{i}: {visible(t)}" for i, t in enumerate(tokens)]


def matrix(values: Tensor, title: str, rows: list[str] | None = None, cols: list[str] | None = None,
           x_title: str = "", y_title: str = "", colorscale: str = "RdBu", zmid: float | None = 0.0,
           height: int = 380, text: bool = False) -> go.Figure:
    """Return a heatmap of a 2-D tensor with optional row/column labels (rows top to bottom); -inf shows blank."""
    z = values.detach().float().cpu()
    z = z.masked_fill(z.isinf(), float("nan")).tolist()
    fig = go.Figure(go.Heatmap(
        z=z, x=cols, y=rows, colorscale=colorscale, zmid=zmid,
        texttemplate="%{z:.2f}" if text else None,
        hovertemplate="row %{y}<br>col %{x}<br>%{z:.4g}<extra></extra>"))
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=50, b=10),
                      xaxis_title=x_title, yaxis_title=y_title)
    fig.update_yaxes(autorange="reversed")
    if rows is not None:
        fig.update_yaxes(type="category")
    if cols is not None:
        fig.update_xaxes(type="category")
    return fig


def pair(left: go.Figure, right: go.Figure, title: str, height: int = 420, shared_scale: bool = False) -> go.Figure:
    """Return two heatmaps side by side (their own titles become subplot titles).

    Each keeps its own colour scale unless ``shared_scale`` (for two views of the same quantity)."""
    fig = make_subplots(1, 2, subplot_titles=[left.layout.title.text, right.layout.title.text],
                        horizontal_spacing=0.22)
    for col, src in ((1, left), (2, right)):
        trace = src.data[0]
        axis = "coloraxis" if shared_scale or col == 1 else "coloraxis2"
        scale = dict(colorscale=trace.colorscale, cmid=trace.zmid,
                     colorbar=dict(x=1.0 if axis == "coloraxis2" or shared_scale else 0.40, xanchor="left",
                                   thickness=12, len=0.9))
        if shared_scale:
            zs = [v for f in (left, right) for row in f.data[0].z for v in row if v == v]
            scale.update(cmin=min(zs), cmax=max(zs))
        fig.update_layout({axis: scale})
        trace.update(coloraxis=axis)
        fig.add_trace(trace, 1, col)
        fig.update_yaxes(autorange="reversed", type="category", row=1, col=col)
        if trace.x is not None:
            fig.update_xaxes(type="category", row=1, col=col)
    fig.update_layout(title=title, height=height, margin=dict(l=10, r=10, t=70, b=10))
    return fig


# ------------------------------------------------------------------------------------------- BPE


def bpe_chips_html(pieces: list[tuple[str, str]]) -> str:
    """Return HTML chips for a segmentation: each ``(text, bytes hex)`` pair, the bytes underneath."""
    chips = []
    for i, (text, hexes) in enumerate(pieces):
        chips.append(
            f'<span style="display:inline-block;margin:2px;padding:2px 5px;border-radius:4px;'
            f'background:{PALETTE[i % len(PALETTE)]};color:#222;font-family:monospace;text-align:center">'
            f'{html.escape(visible(text))}<br>'
            f'<span style="font-size:65%;color:#555">{html.escape(hexes)}</span></span>')
    return "<div>" + "".join(chips) + "</div>"


def bpe_progress(n_tokens: list[int], counts: list[int], current: int) -> go.Figure:
    """Return the sentence's token count after each number of merges, beside each merge's pair count."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    fig.add_trace(go.Scatter(x=list(range(len(n_tokens))), y=n_tokens, name="tokens in the sentence",
                             mode="lines+markers", line_shape="hv"), secondary_y=False)
    fig.add_trace(go.Bar(x=list(range(1, len(counts) + 1)), y=counts, name="count of the merged pair",
                         opacity=0.35), secondary_y=True)
    fig.add_vline(x=current, line_dash="dot", line_color="#c44")
    fig.update_layout(title="The sentence's tokens after each merge", height=340, margin=dict(l=10, r=10, t=50, b=10),
                      xaxis_title="merges learned", legend=dict(orientation="h", y=-0.25))
    fig.update_yaxes(title_text="tokens", secondary_y=False)
    fig.update_yaxes(title_text="pair count", secondary_y=True, tickformat="d", showgrid=False)
    return fig


# ------------------------------------------------------------------------------- random directions


def angle_histograms(angles: dict[int, Tensor]) -> go.Figure:
    """Return overlaid histograms (probability density) of pairwise angles, one per dimension."""
    fig = go.Figure()
    for d, a in angles.items():
        fig.add_trace(go.Histogram(x=a.tolist(), name=f"d = {d}", histnorm="probability density", opacity=0.55,
                                   xbins=dict(start=0, end=180, size=1)))
    fig.add_vline(x=90, line_dash="dot", line_color="#444")
    fig.update_layout(title="Angles between random unit vectors", barmode="overlay", height=380,
                      xaxis_title="angle (degrees)", yaxis_title="density", margin=dict(l=10, r=10, t=50, b=10))
    return fig


def spread_by_dimension(stats: pd.DataFrame) -> go.Figure:
    """Return the measured standard deviation of the angles against (180/π)/√d, on log axes."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=stats.d, y=stats["std (°)"], name="measured", mode="markers+lines"))
    fig.add_trace(go.Scatter(x=stats.d, y=stats["(180/π)/√d (°)"], name="(180/π)/√d", mode="lines",
                             line=dict(dash="dash")))
    fig.update_layout(title="Spread of the angles as d grows", height=340, margin=dict(l=10, r=10, t=50, b=10),
                      xaxis_title="d", yaxis_title="standard deviation (degrees)")
    fig.update_xaxes(type="log")
    fig.update_yaxes(type="log")
    return fig


# ---------------------------------------------------------------------------------------- KV cache


def kv_memory(lengths: list[int], formula: list[float], measured: tuple[int, float] | None, title: str) -> go.Figure:
    """Return the KV cache's size by context length (the formula), with the measured cache as a point (MiB)."""
    fig = go.Figure(go.Scatter(x=lengths, y=formula, name="2·layers·kv_heads·positions·d_head·bytes",
                               mode="lines"))
    if measured is not None:
        fig.add_trace(go.Scatter(x=[measured[0]], y=[measured[1]], name="measured (this decode's tensors)",
                                 mode="markers", marker=dict(size=12, symbol="x", color="#c44")))
    fig.update_layout(title=title, height=340, xaxis_title="context length (positions)", yaxis_title="MiB",
                      margin=dict(l=10, r=10, t=50, b=10), legend=dict(orientation="h", y=-0.25))
    return fig


def step_timings(with_cache: list[float], without: list[float], prompt_len: int) -> go.Figure:
    """Return the milliseconds of each decoding step with and without the KV cache."""
    fig = go.Figure()
    for name, ts in (("with the KV cache", with_cache), ("without (the whole sequence again)", without)):
        fig.add_trace(go.Scatter(x=list(range(len(ts))), y=[t * 1e3 for t in ts], name=name, mode="lines+markers"))
    fig.update_layout(title="Time of each decoding step", height=340, margin=dict(l=10, r=10, t=50, b=10),
                      xaxis_title=f"step (0 = the {prompt_len}-token prompt's pass)", yaxis_title="ms",
                      legend=dict(orientation="h", y=-0.3))
    return fig


# -------------------------------------------------------------------------------------- architecture


def block_flow(rows: list[tuple[str, str, int, bool]], title: str) -> go.Figure:
    """Return a top-to-bottom diagram of the hook points of one block.

    ``rows``: ``(label, shape text, parameters of the part that produces it, is a residual-stream point)``."""
    fig = go.Figure()
    n = len(rows)
    for i, (label, shape, params, resid) in enumerate(rows):
        y = n - i
        colour = "#fde2e4" if resid else "#dfe7fd"
        fig.add_shape(type="rect", x0=0, x1=6, y0=y - 0.38, y1=y + 0.38, fillcolor=colour, line=dict(color="#888"))
        fig.add_annotation(x=3, y=y, text=f"<b>{html.escape(label)}</b>", showarrow=False,
                           font=dict(size=12, color="#222"))
        fig.add_annotation(x=6.3, y=y, text=shape, showarrow=False, xanchor="left",
                           font=dict(size=12, family="monospace"))
        if params:
            fig.add_annotation(x=-0.3, y=y, text=f"{params:,} params", showarrow=False, xanchor="right",
                               font=dict(size=11, color="#555"))
        if i:
            fig.add_annotation(x=3, y=y + 0.38, ax=3, ay=y + 0.62, xref="x", yref="y", axref="x", ayref="y",
                               showarrow=True, arrowhead=2, text="")
    fig.update_xaxes(visible=False, range=[-3.2, 11])
    fig.update_yaxes(visible=False, range=[0.4, n + 0.6])
    fig.update_layout(title=title, height=46 * n + 90, margin=dict(l=10, r=10, t=50, b=10), plot_bgcolor="white")
    return fig


# ------------------------------------------------------------------------------ training dynamics


def embedding_scatter(coords: Tensor, labels: list[str], step: int, bounds: tuple[float, float, float, float],
                      title: str | None = None, axes: tuple[str, str] = ("PC 1", "PC 2")) -> go.Figure:
    """Return token embeddings at one step (default: in the final snapshot's PCA frame, fixed axes across steps)."""
    x, y = coords[:, 0].tolist(), coords[:, 1].tolist()
    fig = go.Figure(go.Scatter(x=x, y=y, mode="markers+text", text=labels, textposition="top center",
                               marker=dict(size=7, color=list(range(len(labels))), colorscale="Viridis"),
                               hovertemplate="%{text}<br>(%{x:.2f}, %{y:.2f})<extra></extra>"))
    x0, x1, y0, y1 = bounds
    fig.update_layout(title=title or f"Token embeddings at step {step} (axes: the final model's two principal "
                                     "components)",
                      height=460, margin=dict(l=10, r=10, t=50, b=10), xaxis_title=axes[0], yaxis_title=axes[1])
    fig.update_xaxes(range=[x0, x1])
    fig.update_yaxes(range=[y0, y1])
    return fig


def scores_over_steps(steps: list[int], series: dict[str, list[float]], step: int, title: str,
                      y_title: str = "score") -> go.Figure:
    """Return lines of per-snapshot values with a marker line at the chosen step."""
    fig = go.Figure()
    for name, ys in series.items():
        fig.add_trace(go.Scatter(x=steps, y=ys, name=name, mode="lines+markers"))
    fig.add_vline(x=step, line_dash="dot", line_color="#c44")
    fig.update_layout(title=title, height=360, xaxis_title="training step", yaxis_title=y_title,
                      margin=dict(l=10, r=10, t=50, b=10), legend=dict(orientation="h", y=-0.3))
    return fig


def loss_and_lr(log: pd.DataFrame, schedule: tuple[list[int], list[float]] | None, step: int | None) -> go.Figure:
    """Return the training (and validation) loss by step, the learning rate on a second axis."""
    fig = make_subplots(specs=[[{"secondary_y": True}]])
    for col, name in (("loss", "training loss"), ("val_loss", "validation loss")):
        if col in log.columns:
            part = log.dropna(subset=[col])
            fig.add_trace(go.Scatter(x=part.step, y=part[col], name=name, mode="lines"), secondary_y=False)
    if "lr" in log.columns:
        part = log.dropna(subset=["lr"])
        fig.add_trace(go.Scatter(x=part.step, y=part.lr, name="learning rate (logged)", mode="markers",
                                 marker=dict(size=4, color="#999")), secondary_y=True)
    if schedule is not None:
        fig.add_trace(go.Scatter(x=schedule[0], y=schedule[1], name="learning rate (warmup + cosine, as trained)",
                                 mode="lines", line=dict(dash="dash", color="#777")), secondary_y=True)
    if step is not None:
        fig.add_vline(x=step, line_dash="dot", line_color="#c44")
    fig.update_layout(title="Loss and learning-rate schedule", height=380, margin=dict(l=10, r=10, t=50, b=10),
                      xaxis_title="training step", legend=dict(orientation="h", y=-0.3))
    fig.update_yaxes(title_text="loss (nats)", secondary_y=False)
    fig.update_yaxes(title_text="learning rate", secondary_y=True, tickformat=".1e", rangemode="tozero",
                     showgrid=False)
    return fig


def padded_range(values: Tensor, pad: float = 0.08) -> tuple[float, float]:
    """Return ``(min, max)`` of ``values`` widened by ``pad`` of the span on each side."""
    lo, hi = float(values.min()), float(values.max())
    span = (hi - lo) or 1.0
    return lo - pad * span, hi + pad * span


def fmt_bytes(n: float) -> str:
    """Return a byte count in KiB / MiB / GiB."""
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:,.2f} {unit}"
    return f"{int(n)} B"


def degrees(x: float) -> str:
    return f"{x:.2f}°" if math.isfinite(x) else "—"
