"""Toy models of superposition (Elhage et al. 2022): geometry across sparsity, and a phase diagram.

    python analyses/superposition_toy.py [--out DIR] [--steps 3000]

Three studies, each trained from scratch (about a minute on one CPU core in all):

1. Five features in two dimensions (importance 0.9^i) at feature probabilities 1 ... 0.01: the
   dense model keeps the two most important features on orthogonal axes and drops the rest; as
   features get sparse it packs them as antipodal pairs, then a pentagon (five corners, 72 degrees
   apart, 2/5 of a dimension each).
2. Twenty features in five dimensions: dimensions per feature (d_hidden / ||W||_F^2) against
   1 / (1 - sparsity), for the ReLU model and the linear one (which never goes below 1).
3. Phase diagram for one extra feature beside a feature of importance 1, in one dimension: is it
   ignored, given the dimension alone, or stored in superposition, as a function of its relative
   importance and the features' density.

Writes ``report.html`` and ``report.json`` to ``--out`` (default
``$WORKBENCH_HOME/runs/reports/superposition_toy``).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import plotly.graph_objects as go
import torch
from plotly.subplots import make_subplots

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # analyses/_common.py

from _common import log  # noqa: E402

from workbench.analysis.superposition import (  # noqa: E402
    PHASE_NAMES,
    ToyConfig,
    ToyTrainConfig,
    phase_diagram,
    toy_geometry,
    train_toy_model,
)
from workbench.report import Report, report_dir  # noqa: E402


def polar_gaps(W: torch.Tensor) -> list[float]:
    """Angles (degrees) between circularly adjacent represented feature directions in 2-d."""
    keep = W.norm(dim=0) > 0.5
    if keep.sum() < 2:
        return []
    theta = torch.sort(torch.atan2(W[1, keep], W[0, keep])).values
    return torch.rad2deg(torch.diff(torch.cat([theta, theta[:1] + 2 * math.pi]))).tolist()


def geometry_study(report: Report, train: ToyTrainConfig) -> None:
    probabilities = [1.0, 0.3, 0.1, 0.03, 0.01]
    importance = 0.9 ** torch.arange(5.0)
    cfg = ToyConfig(n_features=5, d_hidden=2, n_instances=len(probabilities))
    model = train_toy_model(cfg, torch.tensor(probabilities)[:, None], importance, train)
    geo = toy_geometry(model)
    W = model.W.detach()
    fig = make_subplots(rows=1, cols=len(probabilities), subplot_titles=[f"p = {p:g}" for p in probabilities])
    colors = [f"rgba(30,90,200,{0.35 + 0.65 * float(i)})" for i in importance]
    rows = []
    for j, p in enumerate(probabilities):
        for f in range(5):
            x, y = W[j, :, f].tolist()
            fig.add_scatter(x=[0, x], y=[0, y], mode="lines+markers", line=dict(color=colors[f], width=3),
                            marker=dict(size=[0, 8]), name=f"feature {f}", showlegend=j == 0, legendgroup=str(f),
                            row=1, col=j + 1)
        fig.update_xaxes(range=[-1.4, 1.4], row=1, col=j + 1)
        fig.update_yaxes(range=[-1.4, 1.4], scaleanchor=f"x{j + 1 if j else ''}", row=1, col=j + 1)
        gaps = polar_gaps(W[j])
        rows.append({
            "feature probability": p,
            "represented": int(geo.n_represented[j]),
            "norms": " ".join(f"{v:.2f}" for v in geo.norms[j].tolist()),
            "fractional dim.": " ".join(f"{v:.2f}" for v in geo.fractional_dimensionality[j].tolist()),
            "dims / feature": float(geo.dimensions_per_feature[j]),
            "adjacent angles": " ".join(f"{g:.0f}" for g in gaps),
            "bias": " ".join(f"{v:+.2f}" for v in model.b.detach()[j].tolist()),
        })
    fig.update_layout(height=330,
                      title="Columns of W (feature directions in the 2-d hidden space); darker = more important")
    report.heading("1. Five features in two dimensions")
    report.text(
        "Each panel is one model, trained with every feature present with probability p (importance 0.9^i). "
        "Dense: two features on orthogonal axes, the others dropped. Sparse: all five, in superposition."
    )
    report.figure(fig)
    report.table(rows, caption="Geometry per sparsity (fractional dimensionality: 1 a whole dimension, "
                               "1/2 an antipodal pair, 2/5 a pentagon corner)")
    report.numbers["five_in_two"] = rows


def dimensionality_study(report: Report, train: ToyTrainConfig) -> None:
    probabilities = torch.logspace(0, -2.3, 10)
    curves = {}
    for nonlinear in (True, False):
        cfg = ToyConfig(n_features=20, d_hidden=5, n_instances=len(probabilities), nonlinear=nonlinear)
        model = train_toy_model(cfg, probabilities[:, None], 0.9 ** torch.arange(20.0), train)
        geo = toy_geometry(model)
        curves["ReLU" if nonlinear else "linear"] = geo
    fig = go.Figure()
    x = (1 / probabilities).tolist()
    for name, geo in curves.items():
        fig.add_scatter(x=x, y=geo.dimensions_per_feature.tolist(), mode="lines+markers", name=name)
    for frac in (1, 1 / 2, 2 / 5, 1 / 3):
        fig.add_hline(y=frac, line_dash="dot", line_color="#999")
    fig.update_layout(xaxis_type="log", xaxis_title="1 / (1 - sparsity) = 1 / feature probability",
                      yaxis_title="dimensions per feature (d_hidden / ||W||_F^2)", height=380,
                      title="20 features in 5 dimensions")
    report.heading("2. Dimensions per feature against sparsity")
    report.text("The linear model stays at one dimension per represented feature whatever the sparsity; the ReLU "
                "model falls below one as features get sparse (dotted: 1, 1/2, 2/5, 1/3).")
    report.figure(fig)
    report.numbers["dimensions_per_feature"] = {
        "feature_probability": probabilities.tolist(),
        **{name: geo.dimensions_per_feature.tolist() for name, geo in curves.items()},
        **{f"{name}_represented": geo.n_represented.tolist() for name, geo in curves.items()},
    }


def phase_study(report: Report, train: ToyTrainConfig, size: int, restarts: int) -> None:
    importance = torch.logspace(-1, 1, size)
    density = torch.logspace(0, -2, size)
    pd = phase_diagram(importance, density, train=train, restarts=restarts)
    fig = go.Figure(go.Heatmap(
        z=pd.phase.tolist(), x=importance.tolist(), y=density.tolist(), zmin=0, zmax=2,
        colorscale=[[0, "#ddd"], [0.5, "#4a90d9"], [1, "#d9534f"]],
        colorbar=dict(tickvals=[0, 1, 2], ticktext=list(PHASE_NAMES)),
        text=[[PHASE_NAMES[int(v)] for v in row] for row in pd.phase.tolist()], hoverinfo="x+y+text",
    ))
    fig.update_layout(xaxis_type="log", yaxis_type="log", xaxis_title="relative importance of the extra feature",
                      yaxis_title="feature density (1 - sparsity)", height=420,
                      title="One extra feature, two features in one dimension")
    report.heading("3. Phase diagram")
    report.text("Grey: the extra feature is not represented; blue: it gets the dimension alone; red: both features "
                "share the dimension (superposition, as an antipodal pair). Superposition needs sparsity. "
                f"Each cell keeps the best of {restarts} initialisations.")
    report.figure(fig)
    report.numbers["phase_diagram"] = {"relative_importance": importance.tolist(), "density": density.tolist(),
                                       "phase": pd.phase.tolist(), "phase_names": list(PHASE_NAMES)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=None)
    p.add_argument("--steps", type=int, default=3000)
    p.add_argument("--phase-size", type=int, default=9, help="grid points per phase-diagram axis")
    p.add_argument("--restarts", type=int, default=4, help="phase diagram: initialisations per cell, best loss kept")
    args = p.parse_args(argv)
    torch.set_num_threads(1)  # toy tensors: threads only add synchronisation
    out = Path(args.out) if args.out else report_dir("superposition_toy")
    train = ToyTrainConfig(steps=args.steps, batch_size=512, lr=1e-2, seed=0)
    report = Report("Toy models of superposition")
    report.text("Elhage et al. (2022): x_hat = ReLU(W^T W x + b), features uniform in [0, 1] and present with "
                "probability p, loss weighted by importance. Every model here is trained from scratch by "
                "workbench.analysis.superposition.")
    t0 = time.perf_counter()
    log("1/3 five features in two dimensions")
    geometry_study(report, train)
    log("2/3 dimensions per feature")
    dimensionality_study(report, train)
    log("3/3 phase diagram")
    phase_study(report, train, args.phase_size, args.restarts)
    report.numbers["seconds"] = time.perf_counter() - t0
    report.numbers["train"] = {"steps": train.steps, "batch_size": train.batch_size, "lr": train.lr}
    paths = report.write(out)
    log(f"done in {report.numbers['seconds']:.0f}s: {paths.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
