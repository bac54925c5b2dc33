"""Figure builders (workbench.plots) carry the analysis numbers they are given, labelled; the report
writer produces a self-contained page and a JSON that round-trips the numbers."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from helpers import tiny_cfg

from workbench import plots
from workbench.analysis import attribution as A
from workbench.analysis import induction as I
from workbench.analysis import logit_lens as LL
from workbench.analysis import patching as P
from workbench.report import Report, jsonable


@pytest.fixture(scope="module")
def model():
    from workbench import HookedGPT

    torch.manual_seed(0)
    return HookedGPT(tiny_cfg(n_layers=3)).eval()


def test_head_scores_figure_one_panel_per_score(model):
    seq = I.repeated_random_tokens(I.RepeatedTokensSpec(seq_len=6, batch=2, bos_token_id=0), 50)
    s = I.score_heads(model, seq.tokens)
    fig = plots.head_scores_figure({k: s.get(k) for k in I.SCORE_KINDS})
    assert [t.type for t in fig.data] == ["heatmap"] * 3
    for trace, kind in zip(fig.data, I.SCORE_KINDS):
        np.testing.assert_allclose(np.asarray(trace.z), s.get(kind).numpy(), rtol=1e-6)
        assert (trace.zmin, trace.zmax) == (0, 1)
    assert [a.text for a in fig.layout.annotations] == list(I.SCORE_KINDS)
    fig = plots.loss_by_position_figure(s.loss, split=7)
    np.testing.assert_allclose(fig.data[0].y, s.loss.mean(0).numpy(), rtol=1e-6)


def test_top_heads_table_sorts_and_skips_nan():
    scores = torch.tensor([[float("nan"), 0.2], [0.9, 0.5]])
    rows = plots.top_heads_table(scores, n=3)
    assert rows == [{"layer": 1, "head": 0, "score": pytest.approx(0.9)}, {"layer": 1, "head": 1, "score": 0.5},
                    {"layer": 0, "head": 1, "score": pytest.approx(0.2)}]


def test_composition_figures(model):
    scores = I.composition_scores(model, "k")
    fig = plots.composition_figure(scores, later_layer=2)
    z = np.asarray(fig.data[0].z)
    assert z.shape == (2 * 4, 4) and list(fig.data[0].y)[:2] == ["L0H0", "L0H1"]
    np.testing.assert_allclose(z[5], scores[1, 1, 2].numpy(), rtol=1e-6)  # row L1H1
    seq = I.repeated_random_tokens(I.RepeatedTokensSpec(seq_len=6, batch=2, bos_token_id=0), 50)
    causal = I.causal_composition(model, seq.tokens, kind="k", per="layer")
    fig = plots.causal_composition_figure(causal, later_layer=1, normalized=False)
    assert list(fig.data[0].y) == ["L0"]  # only sources before the later layer
    np.testing.assert_allclose(np.asarray(fig.data[0].z)[0], causal.drop[0, 1].numpy(), rtol=1e-6)
    q = I.causal_composition(model, seq.tokens, kind="q", per="layer")
    fig = plots.composition_drop_figure([causal, q], layer=2, head=3)
    assert [t.name for t in fig.data] == ["removed from the key", "removed from the query"]
    assert list(fig.data[0].x) == ["L0", "L1"]
    np.testing.assert_allclose(fig.data[1].y, (q.drop[:, 2, 3] / q.clean[2, 3].abs()).numpy(), rtol=1e-5)


def test_lens_figures(model):
    tokens = torch.randint(0, 50, (1, 5))
    res = LL.logit_lens(model, tokens, k=2)
    fig = plots.lens_grid(res, ["a", "b", "c", "d", "e"], "top_prob", tokenizer_decode=lambda ids: f"t{ids[0]}")
    np.testing.assert_allclose(np.asarray(fig.data[0].z), res.top_probs[:, 0, :, 0].numpy(), rtol=1e-6)
    assert list(fig.data[0].y) == ["0", "1", "2", "final"] and list(fig.data[0].x)[1] == "1: b"
    assert fig.data[0].text[3][4] == f"t{int(res.top_tokens[3, 0, 4, 0])}"
    kl = plots.lens_grid(res, value="kl_to_final")
    np.testing.assert_allclose(np.asarray(kl.data[0].z), res.kl_to_final[:, 0].numpy(), rtol=1e-6)
    cmp = LL.LensComparison(["0", "1", "2"], torch.tensor([3.0, 2.0, 1.0]), torch.tensor([1.0, 0.5, 0.2]))
    fig = plots.lens_kl_figure(cmp)
    assert [t.name for t in fig.data] == ["logit lens", "tuned lens"]
    np.testing.assert_allclose(fig.data[1].y, [1.0, 0.5, 0.2])


def test_attribution_bars_top_by_magnitude(model):
    res = A.direct_logit_attribution(model, torch.randint(0, 50, (1, 6)), 3, 7, granularity="head")
    fig = plots.attribution_bars(res, top=4)
    values = res.attrs[:, 0]
    order = values.abs().argsort(descending=True)[:4]
    assert list(fig.data[0].x) == [res.labels[i] for i in order]
    np.testing.assert_allclose(fig.data[0].y, values[order].numpy(), rtol=1e-6)
    assert all(c == ("#2b6cb0" if v >= 0 else "#c53030") for c, v in zip(fig.data[0].marker.color, fig.data[0].y))
    grid = A.head_attribution_grid(res, 3, 4)
    fig = plots.head_heatmap(grid, diverging=True)
    assert fig.data[0].zmid == 0.0 and np.asarray(fig.data[0].z).shape == (3, 4)


def test_patching_and_ablation_heatmaps(model):
    clean = torch.randint(0, 50, (1, 5))
    corrupt = clean.clone()
    corrupt[0, 1] = (corrupt[0, 1] + 1) % 50
    metric = P.LogitDiff(3, 7)
    res = P.patch_residual(model, clean, corrupt, metric)
    fig = plots.patching_heatmap(res, ["a", "b", "c", "d", "e"])
    np.testing.assert_allclose(np.asarray(fig.data[0].z), res.normalized.numpy(), rtol=1e-5)
    assert list(fig.data[0].x)[0] == "0: a" and "fraction restored" in fig.layout.title.text
    heads = P.patch_heads(model, clean, corrupt, metric)
    fig = plots.patching_heatmap(heads, normalized=False)
    assert list(fig.data[0].x) == ["0", "1", "2", "3"] and fig.layout.xaxis.title.text == "head"
    np.testing.assert_allclose(np.asarray(fig.data[0].z), heads.scores.numpy(), rtol=1e-6)
    abl = P.ablate(model, clean, metric, kind="mlp_out")
    fig = plots.ablation_heatmap(abl)
    np.testing.assert_allclose(np.asarray(fig.data[0].z), abl.effect.numpy(), rtol=1e-6)


def test_one_heatmap_builder_serves_the_library_and_the_app():
    from workbench.app import figures

    z = torch.tensor([[0.2, -0.5, 0.1], [0.3, 0.0, -0.25]])
    fig = plots.heatmap(z, ["a", "b", "c"], ["r0", "r1"], "t", xlabel="col", ylabel="row")
    np.testing.assert_allclose(np.asarray(fig.data[0].z), z.numpy())
    assert fig.data[0].hovertemplate == "row %{y}<br>col %{x}<br>value %{z:.4g}<extra></extra>"
    assert fig.layout.yaxis.autorange == "reversed" and fig.layout.margin.l == 60 and fig.layout.height is None
    # the app's attention pattern: tokens on both axes, 0..1 in blues, its own hover line, plotly's margins
    fig = figures.attention_heatmap(torch.eye(3), ["a", " b", "\n"], "Layer 0, head 1")
    trace = fig.data[0]
    assert list(trace.x) == list(trace.y) == ["0: a", "1: ·b", "2: ↵"]  # plots.token_labels, as every token axis
    assert (trace.zmin, trace.zmax, trace.colorscale[0][1]) == (0, 1, "rgb(247,251,255)")  # Blues starts white
    assert trace.hovertemplate == "Layer 0, head 1<br>query %{y}<br>key %{x}<br>attention %{z:.3f}<extra></extra>"
    assert (fig.layout.title.text, fig.layout.xaxis.title.text, fig.layout.yaxis.title.text) == ("Layer 0, head 1",
                                                                                                 "key", "query")
    assert fig.layout.height == 360 and fig.layout.margin.l is None
    assert fig.layout.xaxis.type == "category" and fig.layout.yaxis.autorange == "reversed"
    # a plain matrix: symmetric scale around 0 by default, plotly's own hover
    fig = figures.matrix_heatmap(z, "W", "d_model", "position")
    trace = fig.data[0]
    assert (trace.zmid, trace.zmin, trace.zmax) == (0, -0.5, 0.5) and trace.hovertemplate is None
    assert (fig.layout.xaxis.title.text, fig.layout.yaxis.title.text, fig.layout.height) == ("d_model", "position", 420)
    fig = figures.matrix_heatmap(z.abs(), "W", "x", "y", colorscale="Viridis", symmetric=False)
    assert (fig.data[0].zmid, fig.data[0].zmin, fig.data[0].zmax) == (None, None, None)


def test_jsonable_turns_tensors_and_nan_into_json():
    out = jsonable({"t": torch.tensor([[1.0, float("nan")]]), "n": np.float32(2.5), 3: (1, float("inf")),
                    "s": "x"})
    assert out == {"t": [[1.0, None]], "n": 2.5, "3": [1, None], "s": "x"}
    json.dumps(out, allow_nan=False)


def test_report_writes_a_self_contained_page(tmp_path, model):
    report = Report("A <b>title</b>")
    report.heading("Scores").text("first paragraph\n\nsecond & last")
    evil = plots.head_heatmap(torch.zeros(2, 2), title="</script><script>alert(1)</script>")
    report.figure(evil, caption="caption <i>")
    report.figure(plots.head_heatmap(torch.ones(2, 2)))
    report.table([{"layer": 0, "score": 0.123456}, {"layer": 1, "score": math.nan}], caption="tbl")
    report.numbers["scores"] = torch.tensor([0.5, float("nan")])
    paths = report.write(tmp_path / "out")
    page = paths.html.read_text()
    assert "A &lt;b&gt;title&lt;/b&gt;" in page and "second &amp; last" in page and "caption &lt;i&gt;" in page
    assert page.count("Plotly.newPlot(") == 2 and "</script><script>alert" not in page
    assert page.count("<script>") == 3  # plotly.js once, then one per figure
    assert "cdn" not in page.split("<script>")[0].lower()
    assert "<td>0.1235</td>" in page and "<caption>tbl</caption>" in page
    assert json.loads(paths.json.read_text()) == {"title": "A <b>title</b>", "scores": [0.5, None]}
    # the figure spec survives the escaping as valid JSON-in-JS
    spec = page.split('<div class="fig"')[1].split('var f=')[1].split(';Plotly.newPlot')[0]
    assert json.loads(spec.replace("<\\/", "</"))["layout"]["title"]["text"].startswith("</script>")


# ------------------------------------------------------------------ readable, shareable figures (issue 12)


def test_token_axes_are_categorical_unique_and_keep_their_order():
    from workbench.app import figures

    # number-like tokens (the toy models' tokens are ids) and a repeat: still categories, in probability order
    tokens, probs = ["7", "1", "7 ", "3", "1"], [0.4, 0.3, 0.15, 0.1, 0.05]
    fig = figures.sampling_figure(tokens, probs, probs, ids=[7, 1, 9, 3, 11]).to_plotly_json()
    labels = list(fig["data"][0]["x"])
    assert fig["layout"]["xaxis"]["type"] == "category" and len(set(labels)) == len(labels) == 5
    assert list(fig["layout"]["xaxis"]["categoryarray"]) == labels and labels[0] == "#1 7" and labels[2] == "#3 7·"
    assert list(fig["layout"]["xaxis"]["tickvals"]) == labels  # every bar labelled
    bars = figures.bar_tokens(tokens, probs, "Nearest tokens", "cosine").to_plotly_json()
    assert bars["layout"]["yaxis"]["type"] == "category" and bars["layout"]["yaxis"]["autorange"] == "reversed"
    assert list(bars["layout"]["yaxis"]["categoryarray"]) == list(bars["data"][0]["y"])  # first on top
    effects = figures.logit_effects_figure(["5", "6"], [2.0, 1.0], ["5", "8"], [-1.0, -2.0], 3).to_plotly_json()
    for axis in ("yaxis", "yaxis2"):
        assert effects["layout"][axis]["type"] == "category"
    ids = figures.token_ids_figure(["0", "17", "17"], [0, 17, 17]).to_plotly_json()
    assert ids["layout"]["xaxis"]["type"] == "category" and list(ids["data"][0]["x"]) == ["0: 0", "1: 17", "2: 17"]


def test_lens_grid_is_readable(model):
    tokens = torch.randint(0, 50, (1, 5))
    res = LL.logit_lens(model, tokens, k=5)
    fig = plots.lens_grid(res, ["a", "b", "c", "d", "e"], "target_prob", tokenizer_decode=lambda ids: f"t{ids[0]}")
    heat, cells = fig.data
    assert fig.layout.xaxis.type == fig.layout.yaxis.type == "category"
    assert list(fig.layout.yaxis.categoryarray) == ["0", "1", "2", "final"]
    # each cell's text: black or white, whichever contrasts more with the cell's colour (WCAG >= 4.5)
    z = np.asarray(heat.z, dtype=float)
    fills = __import__("plotly.colors", fromlist=["x"]).sample_colorscale("Viridis",
                                                                         np.nan_to_num(z).flatten().tolist())
    colours = list(cells.textfont.color)
    assert len(colours) == z.size and set(colours) <= {"#000000", "#ffffff"}
    for fill, colour, v in zip(fills, colours, z.flatten()):
        if np.isfinite(v):
            assert plots.contrast_ratio(fill, colour) >= 4.5, (fill, colour)
        else:
            assert colour == "#000000"  # a blank (NaN) cell shows the white background
    assert plots.contrast_ratio("#fde725", "#000000") > plots.contrast_ratio("#fde725", "#ffffff")  # no white on yellow
    assert cells.meta == plots.NO_EXPORT and cells.hoverinfo == "skip"
    # the hover: top-k tokens and the target's probability and rank
    hover = heat.customdata[3][1]
    assert "P(target)" in hover and f"t{int(res.top_tokens[3, 0, 1, 0])}" in hover and hover.count(",") >= 4
    assert "%{customdata}" in heat.hovertemplate
    # a subset of layers keeps the final row
    sub = plots.lens_grid(res, value="entropy", layers=[1])
    assert list(sub.data[0].y) == ["1", "final"] and np.asarray(sub.data[0].z).shape == (2, 5)


def test_rank_chart_keeps_the_final_row():
    from workbench.app import figures

    labels = [str(i) for i in range(30)] + ["final"]
    fig = figures.rank_across_layers(labels, list(range(31)), [0.1] * 31, " Paris", "position 3").to_plotly_json()
    for axis in ("xaxis", "xaxis2"):
        assert fig["layout"][axis]["type"] == "category" and fig["layout"][axis]["categoryarray"][-1] == "final"
    assert list(fig["data"][0]["x"])[-1] == "final"


def test_attention_figures_label_every_token_and_open_a_head():
    from workbench.app import figures

    n = 12
    tokens = [f"t{i % 3}" for i in range(n)]  # repeats: labels stay unique by position
    fig = figures.attention_heatmap(torch.eye(n), tokens, "Layer 1, head 2")
    labels = list(fig.data[0].y)
    assert len(set(labels)) == n and list(fig.layout.yaxis.tickvals) == labels  # every query labelled
    assert fig.data[0].hovertemplate.startswith("Layer 1, head 2<br>query %{y}<br>key %{x}")
    patterns = torch.rand(3, 4, n, n)
    grid = figures.attention_grid(patterns, tokens, range(1, 3))
    heat, targets = grid.data
    assert len(set(heat.x)) == len(heat.x) and len(set(heat.y)) == len(heat.y)
    assert heat.y[0] == "L1 query 0: t0" and heat.x[n + 1 + 2] == "H1 key 2: t2"
    np.testing.assert_allclose(np.asarray(heat.z, dtype=float)[0, n + 1:2 * n + 1], patterns[1, 1, 0].numpy(),
                               rtol=1e-6)
    assert [list(c) for c in targets.customdata] == [[layer, h] for layer in (1, 2) for h in range(4)]
    assert targets.meta == plots.NO_EXPORT and "click to open" in targets.hovertemplate


def test_figure_data_exports_as_csv_and_json():
    from workbench.app import figures

    fig = plots.heatmap(torch.tensor([[1.0, 2.0], [3.0, 4.0]]), ["a", "b"], ["r0", "r1"], "grid")
    frame = plots.figure_frame(fig)
    assert list(frame.columns[:4]) == ["trace", "y", "x", "z"] and len(frame) == 4
    assert frame.loc[(frame.y == "r1") & (frame.x == "a"), "z"].item() == 3.0
    bars = figures.sampling_figure(["x", "y"], [0.6, 0.4], [1.0, 0.0])
    frame = plots.figure_frame(bars)
    assert set(frame.trace) == {"softmax(logits)", "after temperature, top-k, top-p"} and len(frame) == 4
    data = json.loads(plots.figure_json(bars))
    assert data["title"] == "Next-token distribution" and data["data"][0] == {"trace": "softmax(logits)", "x": "#1 x",
                                                                             "y": 0.6}
    # decoration (cell text, click targets) is not data
    res = LL.logit_lens(__import__("workbench").HookedGPT(tiny_cfg(n_layers=1)).eval(), torch.randint(0, 50, (1, 3)))
    grid = plots.lens_grid(res, tokenizer_decode=lambda ids: str(ids[0]))
    assert set(plots.figure_frame(grid).trace) == {"heatmap 0"} and len(plots.figure_frame(grid)) == 2 * 3


def test_text_helpers_tell_no_small_lies():
    from types import SimpleNamespace

    from workbench.app import figures

    assert figures.count_noun(1, "token") == "1 token" and figures.count_noun(49152, "token") == "49,152 tokens"
    assert figures.nats(-1e-9) == "0.00" and figures.nats(-0.5) == "-0.50" and figures.nats(1.234) == "1.23"
    html = figures.generated_text_html("Prompt *", "**bold** _x_\n\n# not a heading")
    assert "**" not in html and "&#42;&#42;bold&#42;&#42;" in html
    assert "\n" not in html and "<b>Prompt &#42;</b>" in html
    # a byte-level token that holds part of a character: its bytes, not the replacement glyph
    vocab = {1: "Ġæ", 2: "Ĺ", 3: "æľ¬"}
    tok = SimpleNamespace(tok=SimpleNamespace(id_to_token=vocab.get))
    assert figures.token_texts(tok, [1, 2, 3], [" \ufffd", "\ufffd", "本"]) == [" \\xe6", "\\x97", "本"]
    assert figures.weak_head_note({"layer": 1, "head": 2, "score": 0.03}).startswith("No head reaches")
    assert figures.weak_head_note({"layer": 1, "head": 2, "score": 0.9}) is None


def test_feature_card_is_one_standalone_html_file():
    from workbench.app import figures

    figs = [figures.density_histogram([-2.0, -3.0, -1.5], 0),
            figures.logit_effects_figure(["a"], [1.0], ["b"], [-1.0], 0)]
    page = figures.feature_card_html("tiny · latent 0", {"density": "1.0%"}, figs, "<div>context <b>x</b></div>")
    assert page.startswith("<!DOCTYPE html>") and "<title>tiny · latent 0</title>" in page
    import re

    assert page.count("Plotly.newPlot") == 2 and not re.search(r"<script[^>]*\bsrc=", page)  # nothing fetched: offline
    assert page.count("* plotly.js v") == 1 and len(page) > 1_000_000  # plotly.js embedded, once
    assert "Feature density" in page and "Logit effects of latent 0" in page and "context <b>x</b>" in page


def test_latent_browser_opens_on_a_live_word_latent_and_searches():
    from workbench.app import figures

    density = torch.tensor([0.0, 0.5, 0.01, 0.01, 1e-6, 0.02])
    max_act = torch.tensor([0.0, 9.0, 8.0, 3.0, 20.0, 2.0])
    fires_on = ["", " the", "   ", " Moses", " x", "\n"]
    raises = ["", "·a ·b", "·c", "·Aaron ·Moses", "·y", "·z"]
    table = figures.latent_table(density, max_act, fires_on, raises)
    # 0 dead, 1 too dense, 2 fires on whitespace, 4 too rare: the strongest of the rest
    assert figures.opening_latent(table) == 3
    assert list(figures.find_latents(table).latent) == [4, 1, 2, 3, 5]  # dead hidden, strongest first
    assert list(figures.find_latents(table, hide_dead=False, order="latent").latent) == [0, 1, 2, 3, 4, 5]
    assert list(figures.find_latents(table, " moses").latent) == [3]  # its top token, case-insensitive
    assert list(figures.find_latents(table, "aaron").latent) == [3]  # a token it raises
    assert list(figures.find_latents(table, "2").latent) == [2]  # a number: that latent
    assert figures.opening_latent(figures.latent_table(torch.zeros(3), torch.zeros(3), [""] * 3, [""] * 3)) == 0
