"""Direct logit attribution and activation patching on SmolLM2-135M, on an indirect-object prompt.

    python analyses/attribution_patching.py [--model smollm2-135m] [--out DIR]

The prompt (Wang et al. 2022's indirect object identification task)::

    clean:     "When Mary and John went to the store, John gave a drink to"   -> " Mary"
    corrupted: "When Mary and John went to the store, Mary gave a drink to"   -> " John"

The metric is logit(" Mary") - logit(" John") at the last position; both answers are single tokens
and the two prompts have the same number of tokens, so positions pair up one to one.

1. Direct logit attribution of the clean run: each layer's attention and MLP output, then each
   head, through the cached final-norm scale; the pieces plus the norm's bias term sum to the logit
   difference (checked).
2. Activation patching (denoising) from the clean run into the corrupted one: the residual stream
   at every layer and position, every head's output, and the attention and MLP outputs at every
   layer and position; each variant starts from the cached residual of the layer patched, and the
   variants of a layer run as one batch. Patching the whole clean residual at any layer restores
   the clean metric exactly (checked).
3. Zero ablation of every head on the clean prompt.

Output: ``report.html`` and ``report.json`` in ``--out`` (default
``$WORKBENCH_HOME/runs/reports/attribution-patching``). A few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # analyses/_common.py

from _common import log  # noqa: E402

from workbench import plots  # noqa: E402
from workbench.analysis import attribution as A  # noqa: E402
from workbench.analysis import patching as P  # noqa: E402
from workbench.report import Report, report_dir  # noqa: E402
from workbench.zoo import load_model  # noqa: E402

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"
ANSWER, WRONG = " Mary", " John"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--clean", default=CLEAN)
    p.add_argument("--corrupt", default=CORRUPT)
    p.add_argument("--answer", default=ANSWER)
    p.add_argument("--wrong", default=WRONG)
    p.add_argument("--top", type=int, default=15, help="components listed in the tables (default 15)")
    p.add_argument("--out", default=None,
                   help="report directory (default $WORKBENCH_HOME/runs/reports/attribution-patching)")
    return p.parse_args(argv)


def _top_rows(scores: torch.Tensor, n: int, key: str) -> list[dict]:
    """The ``n`` entries of a ``[layer head]`` tensor largest in magnitude."""
    flat = scores.flatten()
    idx = flat.abs().topk(min(n, flat.numel())).indices
    H = scores.shape[1]
    return [{"head": f"L{int(i) // H}H{int(i) % H}", key: float(flat[i])} for i in idx]


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    out = Path(args.out) if args.out else report_dir("attribution-patching")
    model = load_model(args.model)
    cfg = model.cfg
    clean, corrupt = model.to_tokens(args.clean), model.to_tokens(args.corrupt)
    answer, wrong = A.token_id(model, args.answer), A.token_id(model, args.wrong)
    strs = model.to_str_tokens(clean[0])
    metric = P.LogitDiff(answer, wrong)
    report = Report(f"Direct logit attribution and activation patching: {args.model}")
    report.text(__doc__.split("\n\n", 2)[2].split("Output:")[0])
    numbers: dict = {"model": args.model, "clean": args.clean, "corrupt": args.corrupt, "answer": args.answer,
                     "wrong": args.wrong, "str_tokens": strs}
    with torch.no_grad():
        probs = model(clean)[0, -1].softmax(-1)
    top = probs.topk(5)
    numbers["clean_top_tokens"] = [{"token": model.to_string([int(t)]), "prob": float(p)}
                                   for t, p in zip(top.indices, top.values)]
    log(f"{args.model}: clean top tokens {numbers['clean_top_tokens']}")

    # -- 1. direct logit attribution
    t0 = time.perf_counter()
    by_layer = A.direct_logit_attribution(model, clean, answer, wrong, granularity="layer")
    by_head = A.direct_logit_attribution(model, clean, answer, wrong, granularity="head")
    total = float(by_head.attrs[:, 0].sum() + by_head.constant[0])
    logit = float(by_head.logit[0])
    log(f"attribution in {time.perf_counter() - t0:.1f}s: logit difference {logit:.4f}; components + constant "
        f"{total:.4f}")
    grid = A.head_attribution_grid(by_head, cfg.n_layers, cfg.n_heads)
    numbers["attribution"] = {
        "logit_diff": logit, "constant": float(by_head.constant[0]), "sum_of_parts_plus_constant": total,
        "abs_error": abs(total - logit),
        "layer_labels": by_layer.labels, "layer_attrs": by_layer.attrs[:, 0],
        "head_labels": by_head.labels, "head_attrs": by_head.attrs[:, 0], "head_grid": grid,
        "top_heads": _top_rows(grid, args.top, "attribution"),
    }
    report.heading("Direct logit attribution")
    report.text(f"logit({args.answer!r}) - logit({args.wrong!r}) = {logit:.4f} on the clean prompt; the components "
                f"and the constant sum to {total:.4f} (difference {abs(total - logit):.1e}).")
    report.figure(plots.attribution_bars(by_layer, title="direct logit attribution by layer"))
    report.figure(plots.head_heatmap(grid, "direct logit attribution of each head", "logit diff", diverging=True))
    report.table(numbers["attribution"]["top_heads"], caption="heads with the largest direct effect")

    # -- 2. patching
    report.heading("Activation patching (clean into corrupted)")
    results = {}
    t0 = time.perf_counter()
    results["resid_pre"] = P.patch_residual(model, clean, corrupt, metric)
    results["z"] = P.patch_heads(model, clean, corrupt, metric)
    results["attn_out"] = P.patch_outputs(model, clean, corrupt, metric, kind="attn_out")
    results["mlp_out"] = P.patch_outputs(model, clean, corrupt, metric, kind="mlp_out")
    whole = P.patch_residual(model, clean, corrupt, metric, per_position=False)
    patch_s = time.perf_counter() - t0
    n_runs = cfg.n_layers * (3 * clean.shape[1] + cfg.n_heads + 1)
    restore_err = float((whole.scores[:, 0] - whole.clean).abs().max())
    log(f"patching: {n_runs} patched runs in {patch_s:.1f}s; clean {whole.clean:.4f}, corrupted {whole.corrupt:.4f}; "
        f"whole-residual patch restores the clean metric to {restore_err:.1e} at every layer")
    report.text(f"Metric: clean {whole.clean:.4f}, corrupted {whole.corrupt:.4f}. {n_runs} patched runs took "
                f"{patch_s:.1f} s. Patching the whole clean residual stream at any layer gives back the clean metric "
                f"(largest difference over the {cfg.n_layers} layers: {restore_err:.1e}).")
    for res in results.values():
        report.figure(plots.patching_heatmap(res, strs))
    numbers["patching"] = {
        "clean_metric": whole.clean, "corrupt_metric": whole.corrupt, "seconds": patch_s, "patched_runs": n_runs,
        "whole_residual_restore_max_abs_error": restore_err, "whole_residual_scores": whole.scores[:, 0],
        **{kind: {"scores": res.scores, "normalized": res.normalized} for kind, res in results.items()},
        "top_heads": _top_rows(results["z"].normalized, args.top, "fraction_restored"),
    }
    report.table(numbers["patching"]["top_heads"], caption="heads whose clean output restores the most")

    # -- 3. ablation
    t0 = time.perf_counter()
    abl = P.ablate(model, clean, metric, kind="z", method="zero")
    log(f"zero ablation of {cfg.n_layers * cfg.n_heads} heads in {time.perf_counter() - t0:.1f}s")
    report.heading("Zero ablation of each head (clean prompt)")
    report.figure(plots.ablation_heatmap(abl))
    numbers["zero_ablation"] = {"baseline": abl.baseline, "effect": abl.effect,
                                "top_heads": _top_rows(abl.effect, args.top, "change")}
    report.table(numbers["zero_ablation"]["top_heads"], caption="heads whose removal changes the metric most")

    report.numbers.update(numbers)
    paths = report.write(out)
    log(f"report: {paths.html}  numbers: {paths.json}")
    return report.numbers


if __name__ == "__main__":
    main()
