"""A TopK SAE on a SmolLM2-135M residual-stream layer: cache, train, evaluate, feature report.

    python analyses/sae_smollm2.py [--layer 3] [--tokens 24576] [--d-sae 2048] [--k 32] [--out DIR]
    python analyses/sae_smollm2.py --model kjv-small --corpus kjv --layer 1 --d-sae 768   # the small KJV LM

Steps (each resumable: rerunning the same command after a kill continues where it stopped):

1. cache ``blocks.{layer}.hook_resid_post`` for ``--tokens`` tokens of the Python documentation
   corpus into an activation store (the forward pass stops after that layer);
2. train a TopK SAE (AuxK against dead latents) on shuffled batches streamed from the store;
3. evaluate it: L0, FVU, dead/dense fractions over the store, and CE loss recovered / KL / delta
   loss with the reconstruction spliced into the full model, on held-out windows;
4. compute feature statistics in one pass over the store and write ``report.html`` (plotly
   figures, top contexts with per-token activations, logit effects, neighbours) and
   ``report.json`` (all numbers).

Output goes to ``--out`` (default ``$WORKBENCH_HOME/runs/sae-smollm2-L{layer}``). The defaults run
in a few minutes on a laptop CPU; raise ``--tokens``/``--steps`` for a better SAE.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import sys
import time
from pathlib import Path

import plotly.graph_objects as go
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # analyses/_common.py

from _common import log  # noqa: E402

from workbench import paths  # noqa: E402
from workbench.pipelines import SAERecipe, cache_windows, token_windows, train_sae_on_store  # noqa: E402
from workbench.sae.evaluate import EvalConfig, SpliceConfig, evaluate_sae, spliced_metrics  # noqa: E402
from workbench.sae.features import FeatureStats, FeatureStatsConfig, feature_contexts, feature_stats  # noqa: E402
from workbench.sae.io import load_sae  # noqa: E402
from workbench.sae.model import SAE  # noqa: E402
from workbench.sae.train import SAETrainConfig  # noqa: E402
from workbench.store import ActivationStore, ReaderConfig, StoreConfig  # noqa: E402
from workbench.zoo import load_model  # noqa: E402

MODEL = "smollm2-135m"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=MODEL, help="any zoo model with a tokenizer, e.g. kjv-small (with --corpus kjv)")
    p.add_argument("--layer", type=int, default=3)
    p.add_argument("--corpus", default="pydocs")
    p.add_argument("--tokens", type=int, default=24_576, help="tokens to cache for training")
    p.add_argument("--n-ctx", type=int, default=64)
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows for the spliced losses")
    p.add_argument("--d-sae", type=int, default=2048)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=512)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--report-features", type=int, default=12, help="features shown in the report")
    p.add_argument("--out", default=None)
    return p.parse_args(argv)


# -------------------------------------------------------------------------------------- report


def _token_html(model, ids: list[int], acts: list[float], focus: int, scale: float) -> str:
    pieces = []
    for i, (t, a) in enumerate(zip(ids, acts)):
        text = html.escape(model.tokenizer.decode([t])).replace("\n", "⏎")
        alpha = 0.0 if scale <= 0 else min(1.0, max(0.0, a / scale))
        border = "border-bottom:2px solid #c00;" if i == focus else ""
        pieces.append(
            f'<span title="{a:.3f}" style="background:rgba(255,120,0,{alpha:.2f});{border}white-space:pre">'
            f'{text}</span>'
        )
    return "".join(pieces)


def _tok_list(model, ids, values) -> str:
    return ", ".join(f"<code>{html.escape(repr(model.tokenizer.decode([int(i)])))}</code> {float(v):+.2f}"
                     for i, v in zip(ids, values))


def pick_features(stats: FeatureStats, n: int, seed: int = 0) -> list[int]:
    """Return ``n`` live, not-dense features at random (a fair sample, not the prettiest ones)."""
    ok = ((stats.density > 0) & (stats.density < stats.dense_threshold)).nonzero().squeeze(1)
    perm = torch.randperm(ok.numel(), generator=torch.Generator().manual_seed(seed))
    return sorted(ok[perm[:n]].tolist())


def write_report(out: Path, model, sae: SAE, store: ActivationStore, hook: str, stats: FeatureStats,
                 numbers: dict, features: list[int]) -> None:
    figs = []
    live = stats.density[stats.density > 0]
    fig = go.Figure(go.Histogram(x=torch.log10(live).tolist(), nbinsx=50))
    fig.update_layout(title=f"Feature density (log10 firing frequency), {live.numel()} live of {stats.d_sae}",
                      xaxis_title="log10 density", yaxis_title="features", height=320)
    figs.append(fig)
    metrics_path = out / "train" / "metrics.jsonl"
    if metrics_path.exists():
        rows = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        if rows and "mse" in rows[0]:
            fig = go.Figure()
            fig.add_scatter(x=[r["step"] for r in rows], y=[r.get("fvu", r["mse"]) for r in rows],
                            name="fvu" if "fvu" in rows[0] else "mse")
            fig.update_layout(title="Training curve", xaxis_title="step", yaxis_type="log", height=300)
            figs.append(fig)
    parts = [
        "<html><head><meta charset='utf-8'><title>SAE report</title>",
        "<style>body{font-family:sans-serif;max-width:1100px;margin:auto} td,th{padding:2px 8px} "
        ".ctx{font-family:monospace;font-size:12px;margin:2px 0} "
        ".feat{border-top:1px solid #ccc;margin-top:16px}</style>",
        "</head><body>",
        f"<h1>TopK SAE on {numbers['model']} <code>{hook}</code></h1>",
        "<table>" + "".join(f"<tr><th align=left>{k}</th><td>{v:.4g}</td></tr>" if isinstance(v, float)
                            else f"<tr><th align=left>{k}</th><td>{v}</td></tr>"
                            for k, v in numbers["evaluation"].items()) + "</table>",
    ]
    for i, fig in enumerate(figs):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0)))
    edges = stats.hist_edges
    centers = ((edges[:-1] * edges[1:]).sqrt()).tolist()
    for f in features:
        parts.append(f"<div class='feat'><h2>Feature {f}</h2>")
        parts.append(
            f"<p>density {float(stats.density[f]):.4%}, mean active {float(stats.mean_active[f]):.3f}, "
            f"max {float(stats.max_act[f]):.3f}</p>"
        )
        counts = stats.hist_counts[f]
        nz = counts.nonzero().squeeze(1)
        if nz.numel():
            lo, hi = int(nz.min()), int(nz.max()) + 1
            fig = go.Figure(go.Bar(x=centers[lo:hi], y=counts[lo:hi].tolist()))
            fig.update_layout(title=f"Feature {f}: activation histogram", xaxis_type="log", height=250,
                              margin=dict(t=40, b=30))
            parts.append(fig.to_html(full_html=False, include_plotlyjs=False))
        if stats.logit_top_ids is not None:
            promotes = _tok_list(model, stats.logit_top_ids[f], stats.logit_top_values[f])
            suppresses = _tok_list(model, stats.logit_bottom_ids[f], stats.logit_bottom_values[f])
            parts.append(f"<p><b>promotes</b> {promotes}</p>")
            parts.append(f"<p><b>suppresses</b> {suppresses}</p>")
        if stats.neighbour_ids is not None:
            nb = ", ".join(f"{int(i)} ({float(c):.2f})" for i, c in zip(stats.neighbour_ids[f], stats.neighbour_cos[f]))
            parts.append(f"<p><b>nearest features</b> (decoder cosine): {nb}</p>")
        scale = float(stats.max_act[f])
        top_rows = [int(r) for r in stats.top_rows[f] if r >= 0][:6]
        parts.append("<h3>Top activations</h3>")
        for ctx in feature_contexts(sae, store, hook, f, top_rows, before=16, after=4):
            tokens_html = _token_html(model, ctx.tokens, ctx.acts, ctx.focus, scale)
            parts.append(f"<div class='ctx'>{ctx.value:6.2f} | {tokens_html}</div>")
        qrows = stats.quantile_rows(f, n_quantiles=4)
        if qrows:
            parts.append("<h3>Quantile samples</h3>")
            ctxs = feature_contexts(sae, store, hook, f, [r for _, r, _ in qrows], before=16, after=4)
            for (q, _, _), ctx in zip(qrows, ctxs):
                parts.append(f"<div class='ctx'>q{q:.2f} {ctx.value:5.2f} | "
                             f"{_token_html(model, ctx.tokens, ctx.acts, ctx.focus, scale)}</div>")
        parts.append("</div>")
    parts.append("</body></html>")
    (out / "report.html").write_text("\n".join(parts))


# -------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hook = f"blocks.{args.layer}.hook_resid_post"
    name = "smollm2" if args.model == MODEL else args.model
    out = Path(args.out) if args.out else paths.runs_dir() / f"sae-{name}-L{args.layer}"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    torch.manual_seed(0)

    log(f"loading {args.model}")
    model = load_model(args.model)
    n_ctx, first = args.n_ctx, 1  # position 0 of a window is an attention sink with an outsized norm
    n_train = math.ceil(args.tokens / (n_ctx - first))
    windows = token_windows(model, args.corpus, n_ctx, n_train + args.eval_windows)
    train_windows, eval_windows = windows[:n_train], windows[n_train:]

    log(f"1/4 caching {hook} for {n_train} windows x {n_ctx - first} tokens")
    t = time.perf_counter()
    store, res = cache_windows(model, train_windows, out / "store",
                               StoreConfig(hooks=(hook,), batch_windows=16, shard_tokens=8192, first_position=first),
                               model_name=args.model, progress=True)
    cache_s = time.perf_counter() - t

    log(f"2/4 training a TopK SAE d_sae={args.d_sae} k={args.k} for {args.steps} steps")
    t = time.perf_counter()
    run = train_sae_on_store(store, hook, SAERecipe(architecture="topk", d_sae=args.d_sae, k=args.k),
                             SAETrainConfig(total_steps=args.steps, lr=args.lr, warmup_steps=20, checkpoint_every=200),
                             out / "train", reader=ReaderConfig(batch_size=args.batch_size, buffer_rows=16384,
                                                                block_rows=256, seed=0),
                             dataset=args.corpus, sae_dir=out / "sae")
    result = run.train
    train_s = time.perf_counter() - t
    sae = load_sae(run.sae_dir)  # evaluate what was saved, as a user would load it

    log("3/4 evaluating (reconstruction over the store, spliced losses on held-out windows)")
    t = time.perf_counter()
    ev = evaluate_sae(model, sae, store, hook, EvalConfig(batch_size=2048, splice=SpliceConfig(max_windows=4)))
    held_out = spliced_metrics(model, sae, hook, eval_windows, SpliceConfig(batch_windows=8, first_position=first))
    eval_s = time.perf_counter() - t

    log("4/4 feature statistics and report")
    t = time.perf_counter()
    stats = feature_stats(sae, store, hook, FeatureStatsConfig(batch_size=2048), model=model)
    stats.save(out / "features")
    feats = pick_features(stats, args.report_features)
    # the spliced losses' token count is of held-out predictions, not of the store's rows
    spliced = {("spliced_n_tokens" if k == "n_tokens" else k): v for k, v in held_out._asdict().items()}
    evaluation = {**ev.reconstruction.summary(), **spliced}
    numbers = {
        "model": args.model, "hook": hook, "corpus": args.corpus,
        "store": {"tokens": res.n_rows, "n_ctx": n_ctx, "first_position": first, "path": str(out / "store")},
        "sae": sae.cfg.to_dict(),
        "train": {"steps": result.steps, "tokens": result.tokens, "last_metrics": result.last_metrics},
        "evaluation": evaluation,
        "evaluation_on_training_windows": ev.splice._asdict(),
        "features": stats.summary(),
        "report_features": {
            str(f): {
                "density": float(stats.density[f]),
                "max_act": float(stats.max_act[f]),
                "top_tokens": [model.tokenizer.decode([int(store.tokens()[r])])
                               for r in stats.top_rows[f] if r >= 0][:8],
                "promotes": None if stats.logit_top_ids is None
                else [model.tokenizer.decode([int(i)]) for i in stats.logit_top_ids[f]],
                "neighbours": None if stats.neighbour_ids is None else stats.neighbour_ids[f].tolist(),
            }
            for f in feats
        },
        "seconds": {"cache": cache_s, "train": train_s, "evaluate": eval_s},
    }
    write_report(out, model, sae, store, hook, stats, numbers, feats)
    numbers["seconds"]["report"] = time.perf_counter() - t
    numbers["seconds"]["total"] = time.perf_counter() - t0
    (out / "report.json").write_text(json.dumps(numbers, indent=1))
    log(f"done in {numbers['seconds']['total']:.0f}s: CE loss recovered {held_out.ce_loss_recovered:.3f} "
        f"(held out), L0 {ev.reconstruction.l0:.1f}, FVU {ev.reconstruction.fvu:.3f}; report in {out / 'report.html'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
