"""Sharing a view: each figure with plotly's mode bar (PNG download) and its data as CSV and JSON
(built only when a download button is pressed).

A page's controls live in the URL through Streamlit's own ``bind="query-params"`` (:data:`URL`) on
each widget: a copied link reopens the same view, and a stale or edited value is dropped by Streamlit
(the model and the prompt are the sidebar's)."""

from __future__ import annotations

import re

import plotly.graph_objects as go
import streamlit as st

from workbench import plots

#: pass as ``bind=`` to a page's widgets (with a ``key``, which names the URL parameter)
URL = "query-params"

#: plotly's mode bar always shown, its camera button saving a 2x PNG named after the chart
MODE_BAR = {"displayModeBar": True, "displaylogo": False,
            "toImageButtonOptions": {"format": "png", "scale": 2}}
_CONFIG = MODE_BAR


def _file_stem(fig: go.Figure, key: str | None) -> str:
    title = fig.layout.title.text if fig.layout.title is not None and fig.layout.title.text else (key or "figure")
    return re.sub(r"[^A-Za-z0-9]+", "-", title).strip("-").lower()[:60] or "figure"


def plot(fig: go.Figure, key: str, *, on_select: str = "ignore", selection_mode=("points", "box")):
    """Place a plotly figure at full width with CSV and JSON downloads of its data underneath; return
    the chart's selection state when ``on_select="rerun"``."""
    stem = _file_stem(fig, key)
    config = {**_CONFIG, "toImageButtonOptions": {**_CONFIG["toImageButtonOptions"], "filename": stem}}
    state = st.plotly_chart(fig, width="stretch", key=key, config=config, on_select=on_select,
                            selection_mode=selection_mode)
    row = st.container(horizontal=True, gap="small")
    row.download_button("CSV", lambda: plots.figure_frame(fig).to_csv(index=False), file_name=f"{stem}.csv",
                       mime="text/csv", key=f"{key}_csv", on_click="ignore", icon=":material/download:",
                       type="tertiary", help="This chart's data as a table (PNG: the camera in the chart's toolbar)")
    row.download_button("JSON", lambda: plots.figure_json(fig), file_name=f"{stem}.json", mime="application/json",
                       key=f"{key}_json", on_click="ignore", icon=":material/download:", type="tertiary")
    return state

