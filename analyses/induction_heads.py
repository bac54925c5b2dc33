"""Induction heads on attn-only-2l, attn-only-1l and SmolLM2-135M: scores, composition, loss on repeats.

    python analyses/induction_heads.py [--models attn-only-2l attn-only-1l smollm2-135m] [--out DIR]

For each model, on random token sequences shown twice (Olsson et al. 2022):

1. previous-token, duplicate-token and induction (prefix-matching) scores of every head, from one
   batched forward pass with hooks on the attention patterns;
2. the next-token loss on the first and the second copy (an induction circuit makes the second
   copy predictable), and the copying score of every head's OV circuit;
3. for models with two or more layers, the composition scores between heads (Elhage et al. 2021)
   and the causal test: remove an earlier layer's (and, on the toys, each earlier head's) output
   from a later head's key input, or from its query input, and measure the drop of its induction
   score. An induction head built by K-composition with a previous-token head loses its score when
   the previous-token information is removed from its keys, not from its queries;
4. for SmolLM2 also the in-context-learning score on real text (loss late in the context minus
   loss early).

A model that is not available (a built-in toy not yet trained and shipped in data/models) is
skipped with a message. Output: ``report.html`` (figures) and ``report.json`` (every number) in
``--out`` (default ``$WORKBENCH_HOME/runs/reports/induction-heads``). A few minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # analyses/_common.py

from _common import log, study_models  # noqa: E402

from workbench import plots  # noqa: E402
from workbench.analysis import induction as I  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.pipelines import token_windows  # noqa: E402
from workbench.report import Report, report_dir  # noqa: E402

MODELS = ("attn-only-2l", "attn-only-1l", "smollm2-135m")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), help="zoo names or checkpoint paths")
    p.add_argument("--seq-len", type=int, default=24, help="random tokens per copy (default 24)")
    p.add_argument("--batch", type=int, default=32, help="sequences for the toy models (default 32)")
    p.add_argument("--big-batch", type=int, default=8, help="sequences for models with > 4 layers (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=10, help="induction heads listed per model (default 10)")
    p.add_argument("--out", default=None,
                   help="report directory (default $WORKBENCH_HOME/runs/reports/induction-heads)")
    return p.parse_args(argv)


def _head(label_layer: int, head: int) -> str:
    return f"L{label_layer}H{head}"


def study(name: str, model, args: argparse.Namespace, report: Report) -> dict:
    cfg = model.cfg
    big = cfg.n_layers > 4
    spec = I.default_spec(model, seq_len=args.seq_len, batch=args.big_batch if big else args.batch, seed=args.seed)
    seq = I.repeated_random_tokens(spec, cfg.d_vocab)
    t0 = time.perf_counter()
    scores = I.score_heads(model, seq.tokens)
    losses = I.repeat_losses(scores.loss, seq)
    copying = I.ov_copying_scores(model)
    top = plots.top_heads_table(scores.induction, args.top)
    for row in top:
        row["previous_token"] = float(scores.previous_token[row["layer"], row["head"]])
        row["ov_copying"] = float(copying[row["layer"], row["head"]])
    log(f"{name}: scored {cfg.n_layers}x{cfg.n_heads} heads in {time.perf_counter() - t0:.1f}s; loss first copy "
        f"{losses.first:.3f}, second {losses.second:.3f}; top induction {top[0]}")
    numbers: dict = {
        "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
        "data": {"seq_len": spec.seq_len, "batch": spec.batch, "seed": spec.seed, "low": spec.low, "high": spec.high,
                 "bos": spec.bos_token_id},
        "loss_first_copy": losses.first, "loss_second_copy": losses.second,
        "loss_ratio_second_to_first": losses.second / losses.first,
        "previous_token": scores.previous_token, "duplicate_token": scores.duplicate_token,
        "induction": scores.induction, "ov_copying": copying, "top_induction_heads": top,
        "top_previous_token_heads": plots.top_heads_table(scores.previous_token, 5),
        "n_heads_induction_above_0.3": int((scores.induction > 0.3).sum()),
    }

    report.heading(name)
    report.text(f"{spec.batch} sequences of {spec.seq_len} random token ids in [{spec.low}, {spec.high}), each shown "
                f"twice{' after a BOS' if spec.bos_token_id is not None else ''}. Mean next-token loss on the first "
                f"copy {losses.first:.3f} nats, on the second copy {losses.second:.3f} nats "
                f"({losses.second / losses.first:.1%} of the first).")
    report.figure(plots.head_scores_figure({k: scores.get(k) for k in I.SCORE_KINDS}, title=f"{name}: head scores"))
    report.figure(plots.loss_by_position_figure(scores.loss, split=seq.start + spec.seq_len,
                                                title=f"{name}: loss by position"))
    report.table(top, caption=f"{name}: top induction heads (score, previous-token score, OV copying score)")
    report.figure(plots.head_heatmap(copying, f"{name}: OV copying score", diverging=True),
                  caption="+1: the head's OV circuit copies the token it attends to into the output; "
                          "-1: it suppresses it")

    if cfg.n_layers >= 2:
        numbers.update(composition(name, model, seq, scores, per="head" if not big else "layer", report=report))
    if big:
        numbers["in_context_learning"] = icl(model, report, name)
    return numbers


def composition(name: str, model, seq, scores, per: str, report: Report) -> dict:
    """Weights-only composition scores and the causal K- vs Q-composition test of the top induction head."""
    t0 = time.perf_counter()
    flat = scores.induction[1:].flatten()  # layer 0 has nothing earlier to compose with
    best = int(flat.argmax())
    layer, head = 1 + best // model.cfg.n_heads, best % model.cfg.n_heads
    # only the top induction head's layer: every later layer would cost ~n_layers times as much
    k = I.causal_composition(model, seq.tokens, kind="k", per=per, layers=[layer])
    q = I.causal_composition(model, seq.tokens, kind="q", per=per, layers=[layer])
    weights_k = I.composition_scores(model, "k")
    log(f"{name}: causal composition ({per}s) in {time.perf_counter() - t0:.1f}s")
    clean = float(k.clean[layer, head])
    keep = [i for i, sl in enumerate(k.source_layers) if sl < layer]
    k_drop, q_drop = k.drop[keep, layer, head], q.drop[keep, layer, head]
    top_k, top_q = int(k_drop.argmax()), int(q_drop.argmax())
    out = {
        "composition_head": _head(layer, head), "composition_head_clean_score": clean,
        "causal_sources": [k.sources[i] for i in keep],
        "causal_k_drop": k_drop, "causal_q_drop": q_drop,
        "max_k_drop": float(k_drop[top_k]), "max_k_drop_source": k.sources[keep[top_k]],
        "max_q_drop": float(q_drop[top_q]), "max_q_drop_source": q.sources[keep[top_q]],
        "k_composition_weights_into_head": weights_k[:layer, :, layer, head],
    }
    if per == "head":  # also the whole earlier layer (for the 2-layer toy: all of layer 0)
        k_layer = I.causal_composition(model, seq.tokens, kind="k", per="layer", layers=[layer])
        q_layer = I.causal_composition(model, seq.tokens, kind="q", per="layer", layers=[layer])
        out["layer0_removed_from_keys_drop"] = float(k_layer.drop[0, layer, head])
        out["layer0_removed_from_queries_drop"] = float(q_layer.drop[0, layer, head])
        layer0_k, layer0_q = out["layer0_removed_from_keys_drop"], out["layer0_removed_from_queries_drop"]
        log(f"{name}: removing layer 0 from L{layer}H{head}'s keys drops its induction score {clean:.3f} by "
            f"{layer0_k:.3f}; from its queries by {layer0_q:.3f}")
        report.text(f"Causal composition into {_head(layer, head)} (induction score {clean:.3f}): removing all of "
                    f"layer 0's output from its key input drops the score by {layer0_k:.3f}, "
                    f"from its query input by {layer0_q:.3f}. The largest single-head "
                    f"drop through the keys is {out['max_k_drop']:.3f} ({out['max_k_drop_source']}), through the "
                    f"queries {out['max_q_drop']:.3f} ({out['max_q_drop_source']}).")
    else:
        report.text(f"Causal composition into {_head(layer, head)} (induction score {clean:.3f}): removing one earlier "
                    f"layer's attention output from its key input drops the score by up to {out['max_k_drop']:.3f} "
                    f"({out['max_k_drop_source']}); from its query input by up to {out['max_q_drop']:.3f} "
                    f"({out['max_q_drop_source']}).")
    report.figure(plots.composition_drop_figure([k, q], layer, head))
    report.figure(plots.causal_composition_figure(k, layer))
    report.figure(plots.composition_figure(weights_k, layer, title=f"{name}: K-composition scores (weights only) "
                                                                   f"into layer {layer}"))
    return out


def icl(model, report: Report, name: str, n_ctx: int = 128, windows: int = 8) -> dict | None:
    """In-context learning score on Python documentation text (None when the corpus cannot be read)."""
    try:
        tokens = token_windows(model, "pydocs", min(n_ctx, model.cfg.n_ctx), windows)
    except WorkbenchError as exc:
        log(f"{name}: no in-context-learning score ({exc})")
        return None
    res = I.in_context_learning_score(model, tokens)
    report.figure(plots.loss_by_position_figure(res.per_position, title=f"{name}: loss by position on Python docs"),
                  caption=f"in-context learning score: loss at position {len(res.per_position) - 1} minus loss at "
                          f"position {max(1, len(res.per_position) // 10)} = {res.score:+.3f} nats")
    return {"early_loss": res.early_loss, "late_loss": res.late_loss, "score": res.score,
            "per_position": res.per_position, "windows": windows, "n_ctx": tokens.shape[1]}


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    out = Path(args.out) if args.out else report_dir("induction-heads")
    report = Report("Induction heads: attention scores, composition and loss on repeated tokens")
    report.text(__doc__.split("\n\n", 2)[2].split("A model that")[0])
    return study_models(report, args.models, lambda name, model: study(name, model, args, report), out)


if __name__ == "__main__":
    main()
