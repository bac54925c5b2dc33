"""Plotly figure builders shared by the app and the analysis scripts.

Each builder is a pure function from an analysis result (a tensor, a NamedTuple or a DataFrame) to
a ``plotly.graph_objects.Figure``; nothing here computes an analysis or touches a model.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import numpy as np
import plotly.colors as pc
import plotly.graph_objects as go
import torch
from torch import Tensor

if TYPE_CHECKING:
    import pandas as pd

    from workbench.analysis.attribution import LogitAttribution
    from workbench.analysis.induction import CausalComposition
    from workbench.analysis.logit_lens import LensComparison, LensResult
    from workbench.analysis.patching import AblationResult, PatchResult

_DIVERGING = "RdBu"
_SEQUENTIAL = "Blues"


def _np(x: Tensor):
    return x.detach().float().cpu().numpy()


# ------------------------------------------------------------------------------------ token axes


def show_token(s: str) -> str:
    """Return a token's text with whitespace made visible (so ' the' and 'the' differ on screen)."""
    return s.replace(" ", "·").replace("\n", "↵").replace("\t", "→") or "∅"


def token_labels(str_tokens: Sequence[str], style: Literal["position", "rank"] = "position") -> list[str]:
    """Return one unique axis label per token, whitespace made visible: ``"3: ·Paris"`` (its position in
    a prompt) or ``"#1 ·Paris"`` (its rank in a list of vocabulary tokens).

    A token may repeat and may look like a number (the toy models' tokens are ids): the position or
    rank keeps the labels unique and never numeric, so a categorical axis keeps them in this order.
    """
    if style == "rank":
        return [f"#{i + 1} {show_token(t)}" for i, t in enumerate(str_tokens)]
    return [f"{i}: {show_token(t)}" for i, t in enumerate(str_tokens)]


def _position_labels(str_tokens: Sequence[str] | None, n_pos: int) -> list[str]:
    """Unique column labels ``"{i}: {token}"`` (just ``"{i}"`` without tokens): a token may repeat."""
    return token_labels(str_tokens) if str_tokens else [str(i) for i in range(n_pos)]


def category_axis(fig: go.Figure, axis: Literal["x", "y"], labels: Sequence[str], every_label: bool = True,
                  **where) -> go.Figure:
    """Return ``fig`` with one axis categorical, its categories in the order of ``labels``.

    Plotly guesses an axis type from the labels: token labels such as ``"5"`` or ``"final"`` after
    ``"29"`` would turn into numbers (hairline bars, a dropped row, digits sorted 0-9).
    ``every_label`` writes each label (plotly skips some on a crowded axis); ``where`` picks a
    subplot (``row=, col=``).
    """
    labels = list(labels)
    opts = dict(type="category", categoryorder="array", categoryarray=labels)
    if every_label:
        opts.update(tickmode="array", tickvals=labels, ticktext=labels)
    (fig.update_xaxes if axis == "x" else fig.update_yaxes)(**opts, **where)
    return fig


# ------------------------------------------------------------------------------------ colour


def _luminance(rgb: str) -> float:
    """Return the WCAG relative luminance of a ``"rgb(r, g, b)"`` or ``"#rrggbb"`` colour."""
    if rgb.startswith("#"):
        r, g, b = pc.hex_to_rgb(rgb)
    else:
        r, g, b = (float(v) for v in rgb[rgb.index("(") + 1: rgb.index(")")].split(",")[:3])

    def lin(c: float) -> float:
        c /= 255
        return c / 12.92 if c <= 0.03928 else ((c + 0.055) / 1.055) ** 2.4

    return 0.2126 * lin(r) + 0.7152 * lin(g) + 0.0722 * lin(b)


def contrast_ratio(a: str, b: str) -> float:
    """Return the WCAG contrast ratio of two colours (1 to 21; body text wants 4.5 or more)."""
    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def text_colours(z, colorscale: str, zmin: float, zmax: float) -> list[list[str]]:
    """Return, per cell of ``z``, black or white, whichever contrasts more with the cell's colour (black
    on a NaN cell, which plotly leaves blank: the white plot background shows through)."""
    z = np.asarray(z, dtype=float)
    span = (zmax - zmin) or 1.0
    t = np.clip(np.nan_to_num((z - zmin) / span, nan=0.0), 0.0, 1.0)
    fills = pc.sample_colorscale(colorscale, t.flatten().tolist())
    out = ["#000000" if contrast_ratio(f, "#000000") >= contrast_ratio(f, "#ffffff") else "#ffffff" for f in fills]
    out = ["#000000" if np.isnan(v) else c for v, c in zip(z.flatten(), out)]
    return [out[i * z.shape[1]:(i + 1) * z.shape[1]] for i in range(z.shape[0])]


# ------------------------------------------------------------------------------------ export


#: a trace with ``meta={"export": False}`` is decoration (cell text, click targets), not data
NO_EXPORT = {"export": False}


def figure_frame(fig: go.Figure) -> pd.DataFrame:
    """Return the data a figure shows as one long table: a row per point (per cell for heatmaps), with
    the trace's name and its x, y, z and text. Decoration traces (``meta == NO_EXPORT``) are left out."""
    import pandas as pd  # here, not at the top: ~0.5 s to import (python -X importtime); only this needs it

    frames = []
    for i, tr in enumerate(fig.data):
        if tr.meta == NO_EXPORT:
            continue
        name = getattr(tr, "name", None) or f"{tr.type} {i}"
        z = getattr(tr, "z", None)
        if z is not None and np.ndim(z) == 2:
            z = np.asarray(z, dtype=float)
            n_y, n_x = z.shape
            xs = list(tr.x) if tr.x is not None else list(range(n_x))
            ys = list(tr.y) if tr.y is not None else list(range(n_y))
            rows = {"trace": name, "y": np.repeat(ys, n_x), "x": np.tile(xs, n_y), "z": z.flatten()}
            if tr.text is not None and np.shape(tr.text) == z.shape:
                rows["text"] = np.asarray(tr.text, dtype=object).flatten()
            frames.append(pd.DataFrame(rows))
            continue
        cols = {}
        for field in ("x", "y", "text", "customdata"):  # customdata: e.g. the token ids behind the labels
            value = getattr(tr, field, None)
            if value is not None and not isinstance(value, str) and (field != "customdata" or np.ndim(value) == 1):
                cols[field] = list(value)
        n = max((len(v) for v in cols.values()), default=0)
        if n:
            cols = {k: v for k, v in cols.items() if len(v) == n}
            frames.append(pd.DataFrame({"trace": [name] * n, **cols}))
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["trace"])


def figure_json(fig: go.Figure) -> str:
    """Return the figure's title and data (as :func:`figure_frame`) as JSON records."""
    title = fig.layout.title.text if fig.layout.title is not None else None
    frame = figure_frame(fig)
    return json.dumps({"title": title, "data": json.loads(frame.to_json(orient="records"))}, indent=1)


#: the library's heatmap margins: tighter than plotly's default, which leaves room for long titles
_HEATMAP_MARGIN = dict(l=60, r=20, t=50, b=50)


def heatmap(z, x, y, title: str, colorscale: str = _SEQUENTIAL, zmid: float | None = None, text=None,
            xlabel: str = "", ylabel: str = "", colorbar: str = "", zmin=None, zmax=None, *,
            hover: str | None = "value %{z:.4g}", height: int | None = None,
            margin: dict | None = _HEATMAP_MARGIN) -> go.Figure:
    """Return a labelled heatmap of the matrix ``z``: rows ``y`` top to bottom, columns ``x`` (None: indices).

    ``hover`` is the hover's last line, after "ylabel y" and "xlabel x" (None: plotly's default
    hover); ``height=None`` and ``margin=None`` leave plotly's defaults.
    """
    if isinstance(z, Tensor):
        z = _np(z)
    trace = go.Heatmap(
        z=z, x=x, y=y, colorscale=colorscale, zmid=zmid, zmin=zmin, zmax=zmax,
        colorbar=dict(title=colorbar) if colorbar else None,
        text=text, texttemplate="%{text}" if text is not None else None,
        hovertemplate=f"{ylabel} %{{y}}<br>{xlabel} %{{x}}<br>{hover}<extra></extra>" if hover is not None else None,
    )
    fig = go.Figure(trace)
    layout = dict(title=title, xaxis_title=xlabel, yaxis_title=ylabel, yaxis_autorange="reversed")
    if margin is not None:
        layout["margin"] = margin
    if height is not None:
        layout["height"] = height
    fig.update_layout(**layout)
    return fig


def head_heatmap(scores: Tensor, title: str = "head scores", colorbar: str = "score",
                 diverging: bool = False) -> go.Figure:
    """Return a ``[layer head]`` heatmap (layers down, heads across)."""
    L, H = scores.shape
    return heatmap(_np(scores), [str(h) for h in range(H)], [str(i) for i in range(L)], title,
                   _DIVERGING if diverging else _SEQUENTIAL, 0.0 if diverging else None,
                   xlabel="head", ylabel="layer", colorbar=colorbar)


def head_scores_figure(scores: dict[str, Tensor], title: str = "attention head scores") -> go.Figure:
    """Return side-by-side ``[layer head]`` heatmaps, one per named score, on a shared 0..1 scale."""
    from plotly.subplots import make_subplots  # ~0.2 s to import (python -X importtime); only this needs it

    names = list(scores)
    fig = make_subplots(rows=1, cols=len(names), subplot_titles=names, horizontal_spacing=0.06)
    for i, name in enumerate(names):
        z = scores[name]
        fig.add_trace(go.Heatmap(z=_np(z), x=[str(h) for h in range(z.shape[1])],
                                 y=[str(li) for li in range(z.shape[0])], colorscale=_SEQUENTIAL, zmin=0, zmax=1,
                                 showscale=i == len(names) - 1,
                                 hovertemplate="layer %{y} head %{x}: %{z:.3f}<extra></extra>"), 1, i + 1)
        fig.update_yaxes(autorange="reversed", title_text="layer" if i == 0 else None, row=1, col=i + 1)
        fig.update_xaxes(title_text="head", row=1, col=i + 1)
    fig.update_layout(title=title, margin=dict(l=60, r=20, t=70, b=50))
    return fig


def composition_figure(scores: Tensor, later_layer: int, title: str = "") -> go.Figure:
    """Return the composition scores ``[layer head layer head]`` into one later layer as an
    (earlier head) x (later head) heatmap."""
    L, H = scores.shape[:2]
    z = scores[:later_layer, :, later_layer].reshape(later_layer * H, H)
    y = [f"L{li}H{h}" for li in range(later_layer) for h in range(H)]
    return heatmap(_np(z), [f"L{later_layer}H{h}" for h in range(H)], y,
                   title or f"composition into layer {later_layer}", _SEQUENTIAL,
                   xlabel="later head", ylabel="earlier head", colorbar="score")


def causal_composition_figure(result: CausalComposition, later_layer: int, normalized: bool = True) -> go.Figure:
    """Return the drop of each later head's score per removed source, as a (source) x (head) heatmap."""
    keep = [i for i, sl in enumerate(result.source_layers) if sl < later_layer]
    drop = result.drop[keep, later_layer]
    if normalized:
        drop = drop / result.clean[later_layer].abs().clamp_min(1e-9)[None]
    H = drop.shape[1]
    what = {"q": "query", "k": "key", "v": "value"}[result.kind]
    return heatmap(_np(drop), [f"L{later_layer}H{h}" for h in range(H)], [result.sources[i] for i in keep],
                   f"score drop when a source is removed from the {what} input" + (" (fraction)" if normalized else ""),
                   _DIVERGING, 0.0, xlabel="later head", ylabel="removed source", colorbar="drop")


def loss_by_position_figure(loss: Tensor, split: int | None = None, title: str = "loss by position") -> go.Figure:
    """Return mean next-token loss per position (``loss [batch pos]`` or ``[pos]``), with an optional
    marker where the repeat starts."""
    y = loss.float().mean(0) if loss.ndim == 2 else loss.float()
    fig = go.Figure(go.Scatter(x=list(range(len(y))), y=_np(y), mode="lines+markers", name="loss"))
    if split is not None:
        fig.add_vline(x=split - 0.5, line_dash="dash", annotation_text="repeat starts")
    fig.update_layout(title=title, xaxis_title="prediction position", yaxis_title="loss (nats)")
    return fig


def lens_grid(result: LensResult, str_tokens: Sequence[str] | None = None, value: str = "target_prob",
              batch_index: int = 0, tokenizer_decode=None, title: str | None = None, *,
              layers: Sequence[int] | None = None, k_hover: int = 5, cell_chars: int = 8) -> go.Figure:
    """Return a layer x position heatmap of one lens field (``target_prob``, ``entropy``,
    ``kl_to_final``, ``top_prob``) with the top token written in each cell when ``tokenizer_decode``
    (ids -> strings) is given.

    ``layers`` picks rows (indices into ``result.labels``; the ``final`` row is always kept). The cell
    text is drawn in black or white, whichever contrasts more with the cell (a text trace marked
    :data:`NO_EXPORT`); ``trace.text`` keeps each cell's full top token. The hover names the layer
    and position, the value, the target's probability and rank, and the top ``k_hover`` tokens.
    """
    n_rows = len(result.labels)
    rows = list(range(n_rows)) if layers is None else sorted({int(i) for i in layers if 0 <= i < n_rows} | {n_rows - 1})
    if value == "top_prob":
        z = result.top_probs[rows, batch_index, :, 0]
    else:
        z = getattr(result, value)[rows, batch_index]
    z = _np(z)
    n_pos = z.shape[1]
    x = _position_labels(str_tokens, n_pos)
    y = [result.labels[r] for r in rows]
    decode = tokenizer_decode or (lambda ids: str(ids[0]))
    top_ids = result.top_tokens[rows, batch_index, :, :k_hover].tolist()
    top_ps = result.top_probs[rows, batch_index, :, :k_hover].tolist()
    t_prob = result.target_prob[rows, batch_index].tolist()
    t_rank = result.target_rank[rows, batch_index].tolist()
    hover = []
    for r in range(len(rows)):
        line = []
        for p in range(n_pos):
            tops = ", ".join(f"{decode([i])} {q:.2f}" for i, q in zip(top_ids[r][p], top_ps[r][p]))
            target = ("no target" if t_rank[r][p] < 0 or np.isnan(t_prob[r][p])
                      else f"P(target) {t_prob[r][p]:.3f}, rank {t_rank[r][p]}")
            line.append(f"{target}<br>top {len(top_ids[r][p])}: {tops}")
        hover.append(line)
    text = None
    if tokenizer_decode is not None:
        text = [[tokenizer_decode([int(row[p][0])]) for p in range(n_pos)] for row in top_ids]
    colorscale, zmin, zmax = {"target_prob": ("Viridis", 0, 1), "top_prob": ("Viridis", 0, 1)}.get(
        value, ("Magma", None, None))
    fig = heatmap(z, x, y, title or f"lens: {value}", colorscale, text=text, xlabel="position (input token)",
                  ylabel="layer", colorbar=value, zmin=zmin, zmax=zmax,
                  hover=f"{value} %{{z:.3f}}<br>%{{customdata}}", height=max(380, 24 * len(rows) + 200))
    fig.data[0].update(customdata=hover, texttemplate=None)
    if text is not None:
        finite = z[np.isfinite(z)]
        lo = zmin if zmin is not None else (float(finite.min()) if finite.size else 0.0)
        hi = zmax if zmax is not None else (float(finite.max()) if finite.size else 1.0)
        colours = text_colours(z, colorscale, lo, hi)
        short = [[t if len(t) <= cell_chars else t[:cell_chars - 1] + "…" for t in row] for row in text]
        fig.add_trace(go.Scatter(
            x=[x[p] for _ in rows for p in range(n_pos)], y=[label for label in y for _ in range(n_pos)],
            mode="text", text=[t for row in short for t in row], textfont=dict(size=11, color=sum(colours, [])),
            hoverinfo="skip", showlegend=False, meta=NO_EXPORT, name="cell text"))
    category_axis(fig, "x", x, every_label=len(x) <= 64)
    category_axis(fig, "y", y)
    fig.update_yaxes(autorange="reversed")
    return fig


def lens_kl_figure(comparison: LensComparison, title: str = "KL(final || lens) by layer, held out") -> go.Figure:
    """Return the per-layer KL of the logit lens and the tuned lens as two lines (log scale)."""
    fig = go.Figure()
    fig.add_trace(go.Scatter(x=comparison.labels, y=_np(comparison.logit_kl), mode="lines+markers", name="logit lens"))
    fig.add_trace(go.Scatter(x=comparison.labels, y=_np(comparison.tuned_kl), mode="lines+markers", name="tuned lens"))
    # one tick per power of ten: plotly's default log ticks read "5, 2, 1, 5, 2, 0.1"
    fig.update_layout(title=title, xaxis_title="layer (resid_pre)", yaxis_title="KL (nats)", yaxis_type="log",
                      yaxis_dtick=1)
    return category_axis(fig, "x", comparison.labels, every_label=len(comparison.labels) <= 40)


def attribution_bars(result: LogitAttribution | pd.DataFrame, batch_index: int = 0, top: int | None = None,
                     title: str = "direct logit attribution") -> go.Figure:
    """Return one bar per component (largest ``top`` by magnitude if given, else in model order)."""
    frame = result if hasattr(result, "columns") else result.frame(batch_index)
    if top is not None:
        frame = frame.reindex(frame.attribution.abs().sort_values(ascending=False).index[:top])
    colors = ["#2b6cb0" if v >= 0 else "#c53030" for v in frame.attribution]
    fig = go.Figure(go.Bar(x=list(frame.component), y=list(frame.attribution), marker_color=colors,
                           hovertemplate="%{x}: %{y:.4f}<extra></extra>"))
    fig.update_layout(title=title, xaxis_title="component", yaxis_title="logit contribution")
    return fig


def patching_heatmap(result: PatchResult, str_tokens: Sequence[str] | None = None, normalized: bool = True,
                     title: str | None = None) -> go.Figure:
    """Return a patching result as a heatmap: layer x position, layer x head, or a single column per layer."""
    z = result.normalized if normalized else result.scores
    L, C = z.shape
    if result.kind == "z":
        x, xlabel = [str(h) for h in range(C)], "head"
    elif C == 1:
        x, xlabel = ["all positions"], ""
    else:
        x = _position_labels(str_tokens, C)
        xlabel = "position"
    name = {"resid_pre": "residual stream", "attn_out": "attention output", "mlp_out": "MLP output", "z": "head output"}
    return heatmap(_np(z), x, [str(i) for i in range(L)],
                   title or f"patching the clean {name[result.kind]}" + (" (fraction restored)" if normalized else ""),
                   _DIVERGING, 0.0, xlabel=xlabel, ylabel="layer",
                   colorbar="restored" if normalized else "metric")


def ablation_heatmap(result: AblationResult, title: str | None = None) -> go.Figure:
    """Return the metric change of each ablated component as a layer x head (or layer) heatmap."""
    z = result.effect
    x = [str(h) for h in range(z.shape[1])] if result.kind == "z" else [result.kind]
    return heatmap(_np(z), x, [str(i) for i in range(z.shape[0])],
                   title or f"{result.method} ablation: change of the metric", _DIVERGING, 0.0,
                   xlabel="head" if result.kind == "z" else "", ylabel="layer", colorbar="change")


def top_heads_table(scores: Tensor, n: int = 10) -> list[dict]:
    """Return the ``n`` highest-scoring heads of a ``[layer head]`` tensor as rows for tables and JSON."""
    flat = torch.nan_to_num(scores.float(), nan=float("-inf")).flatten()
    top = flat.topk(min(n, flat.numel()))
    H = scores.shape[1]
    return [{"layer": int(i) // H, "head": int(i) % H, "score": float(v)} for v, i in zip(top.values, top.indices)]


def composition_drop_figure(results: Sequence[CausalComposition], layer: int, head: int,
                            normalized: bool = True) -> go.Figure:
    """Return, for one later head, the drop of its score per removed source, one bar group per kind
    (the K- against Q-composition comparison of an induction head)."""
    fig = go.Figure()
    what = {"q": "query", "k": "key", "v": "value"}
    for res in results:
        keep = [i for i, sl in enumerate(res.source_layers) if sl < layer]
        drop = res.drop[keep, layer, head]
        if normalized:
            drop = drop / max(abs(float(res.clean[layer, head])), 1e-9)
        fig.add_trace(go.Bar(x=[res.sources[i] for i in keep], y=_np(drop), name=f"removed from the {what[res.kind]}",
                             hovertemplate="%{x}: %{y:.3f}<extra></extra>"))
    title = f"L{layer}H{head}: score drop when a source is removed" + (" (fraction)" if normalized else "")
    fig.update_layout(title=title,
                      xaxis_title="removed source", yaxis_title="drop", barmode="group")
    return fig


def circuit_diagram(graph, keep: Tensor, scores: Tensor, max_edges: int = 300, title: str | None = None) -> go.Figure:
    """Return a circuit diagram: upstream nodes by layer (rows, input at the bottom, logits at the top) and head
    (columns, the MLP on the right), one line per edge (the strongest ``max_edges``), blue positive, red negative.

    ``graph`` is an :class:`workbench.analysis.eap.Graph`; ``keep`` and ``scores`` are its ``[up down]``
    circuit mask and edge scores (the CLI's report and the patching page's circuit view draw it)."""

    def up_xy(u: int) -> tuple[float, float]:
        if u == 0:
            return (graph.n_heads / 2, -1)
        layer, i = divmod(u - 1, graph.n_heads + int(graph.has_mlp))
        return (float(i) + (0.5 if i == graph.n_heads else 0), layer)

    def down_xy(d: int) -> tuple[float, float]:
        owner = graph.owner(d)
        if owner is None:
            return (graph.n_heads / 2, graph.n_layers)
        x, y = up_xy(owner)
        return (x, y - 0.15)  # an input sits just below the node it feeds

    pairs = keep.nonzero().tolist()
    pairs.sort(key=lambda p: -abs(float(scores[p[0], p[1]])))
    fig = go.Figure()
    top = max((abs(float(scores[u, d])) for u, d in pairs), default=1.0) or 1.0
    for u, d in pairs[:max_edges]:
        s = float(scores[u, d])
        (x0, y0), (x1, y1) = up_xy(u), down_xy(d)
        fig.add_trace(go.Scatter(x=[x0, x1], y=[y0, y1], mode="lines", hoverinfo="text",
                                 text=graph.edge_name(u, d) + f" {s:+.4f}",
                                 line=dict(width=0.5 + 3 * abs(s) / top, color="royalblue" if s > 0 else "crimson")))
    used = sorted({u for u, _ in pairs[:max_edges]})
    xs, ys = zip(*[up_xy(u) for u in used]) if used else ((), ())
    fig.add_trace(go.Scatter(x=list(xs) + [graph.n_heads / 2], y=list(ys) + [graph.n_layers], mode="markers+text",
                             text=[graph.upstream[u] for u in used] + ["logits"], textposition="top center",
                             marker=dict(size=8, color="black"), hoverinfo="text"))
    title = title or "circuit: edge width by |score|; blue positive, red negative score"
    fig.update_layout(showlegend=False, title=title,
                      xaxis=dict(title="head (MLP on the right)"), yaxis=dict(title="layer"),
                      height=max(400, 30 * graph.n_layers), template="plotly_white")
    return fig
