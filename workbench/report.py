"""A small report writer: one self-contained HTML page of figures, text and tables, plus a JSON of numbers.

plotly.js is inlined once, from the installed plotly package, so the page works offline and
no CDN is involved::

    report = Report("Induction heads on attn-only-2l")
    report.text("What was measured and how.")
    report.figure(fig, caption="Induction score of each head")
    report.numbers["loss_second_half"] = 0.31
    paths = report.write("runs/induction")   # -> report.html, report.json
"""

from __future__ import annotations

import datetime as _dt
import html
import json
import math
from pathlib import Path
from typing import Any, NamedTuple

from workbench import paths

HTML_FILE = "report.html"
JSON_FILE = "report.json"


def report_dir(name: str) -> Path:
    """Return the default directory of a named report: ``$WORKBENCH_HOME/runs/reports/<name>``."""
    return paths.runs_dir() / "reports" / name


class ReportPaths(NamedTuple):
    html: Path
    json: Path


def jsonable(x: Any) -> Any:
    """Return ``x`` with tensors, numpy values, tuples and NaNs turned into plain JSON values."""
    if hasattr(x, "tolist") and not isinstance(x, (str, bytes)):
        return jsonable(x.tolist())
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN or infinity
    if isinstance(x, Path):
        return str(x)
    return x


class Report:
    """Collects sections in order; :meth:`write` renders them."""

    def __init__(self, title: str):
        self.title = title
        #: everything numeric the report states, written to the JSON file
        self.numbers: dict[str, Any] = {}
        self._sections: list[str] = []

    def heading(self, text: str) -> Report:
        self._sections.append(f"<h2>{html.escape(text)}</h2>")
        return self

    def text(self, text: str) -> Report:
        """Add a paragraph (plain text; blank lines start new paragraphs)."""
        for para in text.strip().split("\n\n"):
            self._sections.append(f"<p>{html.escape(para.strip())}</p>")
        return self

    def figure(self, fig, caption: str = "") -> Report:
        """Add a plotly figure (its JSON spec; rendered by the one inlined plotly.js)."""
        div_id = f"fig{len(self._sections)}"
        # "</" inside a string (a token like "</script>") would end the script element early
        spec = fig.to_json().replace("</", "<\\/")
        block = (f'<div class="fig" id="{div_id}"></div>'
                 f'<script>(function(){{var f={spec};Plotly.newPlot("{div_id}",f.data,f.layout,'
                 f'{{responsive:true}});}})();</script>')
        if caption:
            block += f'<p class="caption">{html.escape(caption)}</p>'
        self._sections.append(block)
        return self

    def table(self, rows: list[dict] | Any, caption: str = "", max_rows: int = 50) -> Report:
        """Add a table from a list of dicts or a DataFrame."""
        if hasattr(rows, "to_dict"):
            rows = rows.to_dict("records")
        rows = list(rows)[:max_rows]
        if not rows:
            return self
        cols = list(rows[0])

        def cell(v: Any) -> str:
            return f"{v:.4g}" if isinstance(v, float) else html.escape(str(v))

        head = "".join(f"<th>{html.escape(str(c))}</th>" for c in cols)
        body = "".join("<tr>" + "".join(f"<td>{cell(r.get(c))}</td>" for c in cols) + "</tr>" for r in rows)
        cap = f"<caption>{html.escape(caption)}</caption>" if caption else ""
        self._sections.append(f"<table>{cap}<thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        return self

    def render(self) -> str:
        # plotly: ~70 ms to import (python -X importtime), and only rendering needs it
        from plotly.offline import get_plotlyjs

        style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;color:#222}"
                 "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;"
                 "text-align:right}caption{text-align:left;font-style:italic}.caption{color:#555;font-size:.9em}"
                 ".fig{width:100%;min-height:420px}")
        stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
        return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(self.title)}</title>"
                f"<style>{style}</style><script>{get_plotlyjs()}</script></head><body>"
                f"<h1>{html.escape(self.title)}</h1><p class='caption'>written {stamp}</p>"
                + "\n".join(self._sections) + "</body></html>")

    def write(self, directory: str | Path) -> ReportPaths:
        """Write ``report.html`` and ``report.json`` into ``directory`` (created if needed)."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        html_path, json_path = directory / HTML_FILE, directory / JSON_FILE
        html_path.write_text(self.render(), encoding="utf-8")
        json_path.write_text(json.dumps({"title": self.title, **jsonable(self.numbers)}, indent=2), encoding="utf-8")
        return ReportPaths(html_path, json_path)
