"""Plotly figure of an attribution graph, shared by the app's circuit page and ``workbench graph --report``.

Nodes sit by layer (rows: token embeddings at the bottom, then each layer's features and errors, the
logits on top) and position (columns); several nodes of one (row, position) cell spread sideways in
order of influence. Edges are drawn as lines, blue for positive and red for negative weights.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, NamedTuple

import plotly.graph_objects as go

if TYPE_CHECKING:
    from workbench.analysis.graph import AttributionGraph, Pruned


class Layout(NamedTuple):
    """Where each shown node is drawn."""

    nodes: list[int]
    x: list[float]
    y: list[int]


def layout(graph: AttributionGraph, shown: Sequence[int], influence: Sequence[float] | None = None) -> Layout:
    """Return positions for the ``shown`` nodes: x = position (spread within a cell), y = row
    (0 tokens, 1..L the layers' features and errors, L + 1 the logits)."""
    cells: dict[tuple[int, int], list[int]] = {}
    for node in shown:
        kind = graph.node_kind(node)
        if kind == "feature":
            layer, pos, _ = graph.features[node].tolist()
            cell = (layer + 1, pos)
        elif kind == "error":
            layer, pos = divmod(node - graph.n_features, graph.n_pos)
            cell = (layer + 1, pos)
        elif kind == "token":
            cell = (0, node - graph.token_node(0))
        else:
            cell = (graph.n_layers + 1, graph.n_pos - 1)
        cells.setdefault(cell, []).append(node)
    nodes, xs, ys = [], [], []
    for (row, pos), members in cells.items():
        if influence is not None:
            members = sorted(members, key=lambda n: -influence[n])
        width = min(0.8, 0.12 * (len(members) - 1))
        for i, node in enumerate(members):
            offset = 0.0 if len(members) == 1 else -width / 2 + width * i / (len(members) - 1)
            nodes.append(node)
            xs.append(pos + offset)
            ys.append(row)
    return Layout(nodes, xs, ys)


_COLOURS = {"feature": "#4c78a8", "error": "#9d9d9d", "token": "#54a24b", "logit": "#f58518"}


def graph_figure(graph: AttributionGraph, pruned: Pruned, edge_threshold: float = 0.0,
                 labels: Mapping[int, str] | None = None, selected: int | None = None,
                 title: str = "attribution graph") -> go.Figure:
    """Return the pruned graph: kept nodes, and kept edges whose |weight| is at least ``edge_threshold``
    times the largest kept |weight|. ``labels`` names nodes (supernodes); ``selected`` is outlined."""
    shown = pruned.node_mask.nonzero().flatten().tolist()
    influence = pruned.influence.tolist()
    lay = layout(graph, shown, influence)
    where = {n: (x, y) for n, x, y in zip(lay.nodes, lay.x, lay.y)}
    A = graph.adjacency * pruned.edge_mask
    biggest = float(A.abs().max()) if A.numel() else 0.0
    targets, sources = (A.abs() >= max(edge_threshold * biggest, 1e-30)).nonzero(as_tuple=True)
    fig = go.Figure()
    for sign, colour in ((1, "rgba(76,120,168,0.45)"), (-1, "rgba(228,87,86,0.45)")):
        xs: list[float | None] = []
        ys: list[float | None] = []
        for t, s in zip(targets.tolist(), sources.tolist()):
            if s in where and t in where and (float(A[t, s]) > 0) == (sign > 0):
                xs += [where[s][0], where[t][0], None]
                ys += [where[s][1], where[t][1], None]
        fig.add_trace(go.Scatter(x=xs, y=ys, mode="lines", line=dict(color=colour, width=1), hoverinfo="skip",
                                 name="positive edges" if sign > 0 else "negative edges"))
    labels = labels or {}
    text = [labels.get(n, graph.node_label(n)) for n in lay.nodes]
    fig.add_trace(go.Scatter(
        x=lay.x, y=lay.y, mode="markers", name="nodes", text=text, customdata=lay.nodes,
        hovertemplate="%{text}<extra>node %{customdata}</extra>",
        marker=dict(size=[14 if n == selected else 9 for n in lay.nodes],
                    color=[_COLOURS[graph.node_kind(n)] for n in lay.nodes],
                    line=dict(width=[3 if n == selected else 0 for n in lay.nodes], color="black"))))
    rows = ["tokens", *[f"L{i}" for i in range(graph.n_layers)], "logits"]
    cols = [f"{i}: {t!r}" if graph.str_tokens else str(i) for i, t in enumerate(graph.str_tokens or range(graph.n_pos))]
    return fig.update_layout(
        title=title, height=120 + 90 * len(rows), template="plotly_white", showlegend=False,
        xaxis=dict(tickmode="array", tickvals=list(range(graph.n_pos)), ticktext=cols, title="position"),
        yaxis=dict(tickmode="array", tickvals=list(range(len(rows))), ticktext=rows, title="layer"))
