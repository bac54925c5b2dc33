"""Plotly figures for probes and steering, shared by the app page, the CLI reports and the analysis script."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from workbench.names import layer_of

if TYPE_CHECKING:
    from torch import Tensor

    from workbench.analysis.probes import LayerProbes
    from workbench.analysis.steering import SteeringCurve


def probe_accuracy_figure(result: LayerProbes, title: str = "probe accuracy by layer (held out)") -> go.Figure:
    """Return held-out accuracy per layer of the logistic and mean-difference probes, the control task and
    the selectivity (task minus control), with chance at 0.5."""
    x = [layer_of(h) if layer_of(h) is not None else h for h in result.hooks]
    fig = go.Figure()
    for name, values, dash in (("logistic probe", result.accuracy, None),
                               ("mean-difference probe", result.mean_diff_accuracy, "dot"),
                               ("control task (logistic)", result.control_accuracy, "dash"),
                               ("selectivity (logistic - control)", result.selectivity, "dashdot")):
        fig.add_trace(go.Scatter(x=x, y=values.tolist(), mode="lines+markers", name=name, line=dict(dash=dash)))
    fig.add_hline(y=0.5, line=dict(color="grey", width=1, dash="dot"), annotation_text="chance")
    return fig.update_layout(title=title, xaxis_title="layer", yaxis_title="accuracy", height=420,
                             yaxis=dict(range=[min(-0.1, float(result.selectivity.min()) - 0.05), 1.02]))


def projection_figure(projections: Tensor, labels: Sequence[int], label_names: Sequence[str] = ("0", "1"),
                      title: str = "examples projected on the direction") -> go.Figure:
    """Return overlaid histograms of each class's projections on a direction."""
    fig = go.Figure()
    values = projections.tolist()
    for c in (0, 1):
        fig.add_trace(go.Histogram(x=[v for v, y in zip(values, labels) if y == c], name=str(label_names[c]),
                                   opacity=0.6, nbinsx=40))
    return fig.update_layout(barmode="overlay", title=title, xaxis_title="projection", yaxis_title="examples",
                             height=360)


def steering_curve_figure(curves: Mapping[str, SteeringCurve], title: str = "steering strength vs side effect",
                          fraction: float = 0.5, max_kl: float = 0.5) -> go.Figure:
    """Return, per multiplier, the shift of the target measure as a fraction of the class gap and the KL per token
    on unrelated text, one line per steering vector, with the acceptance thresholds drawn."""
    fig = make_subplots(rows=1, cols=2, subplot_titles=("target measure: fraction of the class gap",
                                                        "side effect: KL(plain || steered), nats/token"))
    for i, (name, curve) in enumerate(curves.items()):
        color = f"hsl({(i * 137) % 360},60%,45%)"
        fig.add_trace(go.Scatter(x=curve.multipliers, y=curve.fraction_of_gap.tolist(), mode="lines+markers", name=name,
                                 line=dict(color=color), legendgroup=name), row=1, col=1)
        fig.add_trace(go.Scatter(x=curve.multipliers, y=curve.kl.tolist(), mode="lines+markers", name=name,
                                 line=dict(color=color), legendgroup=name, showlegend=False), row=1, col=2)
    fig.add_hline(y=fraction, line=dict(color="grey", dash="dot"), row=1, col=1)
    fig.add_hline(y=max_kl, line=dict(color="grey", dash="dot"), row=1, col=2)
    fig.update_xaxes(title_text="multiplier")
    return fig.update_layout(title=title, height=420)
