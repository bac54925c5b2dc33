"""Attribution graphs on a fixed set of 20 prompts per model: build, prune, score, check by intervention.

    python analyses/attribution_graphs.py [--models kjv-small smollm2-135m] [--transcoders kjv-small=DIR]
                                          [--max-features N] [--out DIR]

For each model with a transcoder set (``data/transcoders/<model>`` or ``--transcoders MODEL=DIR``; a
model without one is skipped with a message), and each of its 20 prompts (factual recall,
induction/copying, a KJV cliché):

1. the attribution graph through every layer's transcoder (Ameisen et al. 2025), its replacement and
   completeness scores (the Circuit Tracing paper reports 0.37 and 0.78 with per-layer transcoders;
   the issue's targets are >= 0.3 and >= 0.7);
2. pruning at node 0.8 / edge 0.98: how many times fewer feature and error nodes it keeps (target
   >= 10x) and how far the completeness falls (target: by at most 20%);
3. the check by intervention: every feature node of the graph (a random sample of at most
   ``--ablate`` per graph) is zeroed alone in the *real* model, and the Spearman correlation between
   the node's influence on the top logit and the size of the change in that logit is reported
   pooled over all graphs and as the mean over graphs (target >= 0.6; the paper reports 0.72).

Measured with the shipped kjv-small set (BatchTopK, 1024 latents, k 32, skip; 20 prompts, 865 feature
nodes on average): replacement 0.837, completeness 0.935; pruning keeps 45.8x fewer feature and
error nodes (least 20.4x) while completeness falls 14.9% (most 17.9%); Spearman 0.839 pooled, 0.818
mean per graph (least 0.696). kjv-small's MLPs move its loss little and the skip term is a linear
path, so these sit well above the paper's SmolLM2-sized figures.

Measured on SmolLM2 with the set trained by ``workbench train-transcoders smollm2-135m --layers all
--corpus kjv --k 64 --expansion 4 --dead-tokens 100000`` (``--transcoders
smollm2-135m=$WORKBENCH_HOME/transcoders/smollm2-135m-x4-k64``; 20 prompts, 18,541 feature nodes on
average, 10,784-37,402): replacement 0.583, completeness 0.874; Spearman 0.685 pooled, 0.679 mean per
graph (least 0.546); pruning keeps only 4.8x fewer feature and error nodes (least 4.0x; target 10x,
NOT met) while completeness falls 20.3% (most 22.7%; target 20%, NOT met). The set is dense (L0 65-196
per layer and position), so influence is spread over thousands of features: keeping 80% of it keeps
thousands of nodes. 50 min on 2 threads (12-524 s per graph, the slow ones while other jobs ran), peak
RSS 15.3 GB (the 15-token prompt's 37,402 features make a 5.6 GB adjacency matrix).

The same set with ``--max-features 7500`` (circuit-tracer's CLI budget): 11 min 40 s for the 20 graphs
(31 s each on average), peak RSS 2.65 GB; replacement 0.574, completeness 0.864; pruning keeps 3.1x fewer
feature and error nodes (least 2.5x) while completeness falls 21.0% (most 22.9%); Spearman 0.294 pooled,
0.296 mean per graph. The budget keeps the features that hold most of the influence (96% on "The capital
of France is"), and among those alone influence ranks the real effects less well: on that prompt the same
256 budget features give 0.407 with the budget graph's influence and 0.411 with the full graph's, while
a uniform sample of all 10,996 features gives 0.579. So the lower figure is the sampled population, not
the budget's rows (which equal the full graph's: ``tests/test_graph.py``). That check was a one-off
script: build the graph with and without ``max_feature_nodes=7500``, draw 256 of the budget graph's
features (``torch.randperm`` with seed 0), and compare ``spearman`` of ``logit_influence`` in each graph
against ``ablation_effects(...).abs()`` of those features (and of 256 drawn from the full graph).

The set retrained on 2026-12-06 (windows shuffled, four steps mixed, lr 4e-3, Adam beta2 0.99: top-1
agreement 0.474 against the x4-k64 set's 0.342; ``--transcoders smollm2-135m=$WORKBENCH_HOME/transcoders/
smollm2-135m --max-features 7500``): replacement 0.592, completeness 0.884; pruning keeps 2.7x fewer feature
and error nodes (least 2.2x) while completeness falls 21.0% (most 22.6%); Spearman 0.332 pooled, 0.353 mean
per graph. 24 min 47 s, peak RSS 2.61 GB (21-36 s a graph alone; 98-208 s while another job shared the CPU).
Better transcoders raised both scores a little and left pruning where it was: influence is still spread
over thousands of features.

The same set with its BatchTopK thresholds calibrated (``TranscoderRecipe.calibrate_windows``; 56-72
latents a row instead of 42-97; top-1 agreement 0.485; what ``$WORKBENCH_HOME/transcoders/smollm2-135m``
held before its KL fine-tune), ``--max-features 7500``: replacement 0.597, completeness 0.887; pruning
keeps 2.6x fewer feature and error nodes (least 2.2x) while completeness falls
21.1% (most 22.6%); Spearman 0.277 pooled, 0.285 mean per graph. 14 min 50 s, peak RSS 2.70 GB (21-85 s a
graph). More latents fire per position, so the budget keeps a smaller share of them and the sampled
population is narrower still.

These figures were measured on the set before its KL fine-tunes (``TranscoderRecipe.kl_steps`` and
``kl_joint_steps``, added on 2026-12-06 after them; ``workbench train-transcoders smollm2-135m --layers all
--kl-steps 0 --kl-joint-steps 0`` gives that set back from its checkpoints). The last paragraph gives the
fine-tuned set's.

The calibrated set without a budget (every active feature; ``--transcoders smollm2-135m=$WORKBENCH_HOME/
transcoders/smollm2-135m``, no ``--max-features``; 13,726-37,903 features, 23,631 on average): replacement
0.621, completeness 0.901; **Spearman 0.728 pooled, 0.714 mean per graph** (least 0.479; target 0.6 met, the
paper's 0.72); pruning keeps 4.5x fewer feature and error nodes (least 3.8x; target 10x, NOT met) while
completeness falls 20.4% (most 22.3%; target 20%, NOT met). 30 min 25 s (13-175 s a graph), peak RSS 15.5 GB.
So influence ranks the real ablation effects as well as the paper reports once every feature is a node;
what the per-layer set cannot do is concentrate that influence in a tenth of the nodes.

The set of the recipe documented until 2026-12-06's last change, KL fine-tuned per layer and then jointly in fp32
(``--kl-layers 1,22,23,24,25,26,27``; top-1 agreement 0.514 against 0.485; the same command, no budget;
13,743-37,801 features, 23,584 on average): replacement 0.616, completeness 0.900; **Spearman 0.736 pooled, 0.721
mean per graph** (least 0.515; target 0.6 met); pruning keeps 4.4x fewer feature and error nodes (least 3.8x;
target 10x, NOT met) while completeness falls 20.4% (most 22.2%; target 20%, NOT met). 42 min 09 s (29-206 s a
graph; the machine ran slower that evening), peak RSS 15.5 GB. The fine-tunes made the replacement model better at
predicting the next token and left the graphs' shape as it was: the per-layer set's influence stays spread over
thousands of features.

The set of the documented recipe since then (layers 24 and 25 tuned 250 and 350 steps, both fine-tunes under bf16;
top-1 0.516; the same command, no budget; 13,741-37,806 features, 23,590 on average): replacement 0.616,
completeness 0.900; **Spearman 0.730 pooled, 0.721 mean per graph** (least 0.453, the repeated-colours prompt;
target 0.6 met); pruning keeps 4.4x fewer feature and error nodes (least 3.8x; target 10x, NOT met) while
completeness falls 20.4% (most 22.2%; target 20%, NOT met). 38 min 18 s (25-182 s a graph), peak RSS 15.5 GB: the
same as the set before, within 0.006.

Output: ``report.html`` and ``report.json`` in ``--out`` (default
``$WORKBENCH_HOME/runs/reports/attribution-graphs``). kjv-small takes a minute or two.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # analyses/_common.py

from _common import load, log  # noqa: E402

from workbench.analysis import graph as G  # noqa: E402
from workbench.errors import WorkbenchError  # noqa: E402
from workbench.report import Report, report_dir  # noqa: E402

PROMPTS = {
    "kjv-small": [
        # KJV clichés
        "In the beginning God created the heaven and the",
        "And God said, Let there be",
        "And God saw the light, that it was",
        "Thus saith the",
        "And it came to pass, when",
        "Blessed are the poor in",
        "The LORD is my shepherd; I shall not",
        "For God so loved the",
        "Our Father which art in",
        "Verily, verily, I say unto",
        # factual recall within the Bible
        "Abraham begat Isaac; and Isaac begat",
        "the children of",
        "And Moses went up unto the mount of",
        "David the son of",
        "the king of Babylon, Nebuchadnez",
        # induction / copying
        "Shem, Ham, and Japheth. Shem, Ham, and",
        "Peleg and Reu and Serug. Peleg and Reu and",
        "the ark of the covenant of the LORD, and the ark of the",
        "Aaron and Hur stayed up his hands. Aaron and",
        "Gog and Magog, Gog and",
    ],
    "smollm2-135m": [
        "The capital of France is",
        "The capital of Japan is",
        "The Eiffel Tower is located in the city of",
        "Michael Jordan plays the sport of",
        "The opposite of hot is",
        "The chemical symbol for gold is",
        "Water freezes at zero degrees",
        "The largest planet in our solar system is",
        "The author of Romeo and Juliet is William",
        "The currency of the United Kingdom is the",
        "Alice and Bob went to the park. Alice gave a ball to",
        "one two three four five six seven",
        "Monday, Tuesday, Wednesday,",
        "The cat sat on the mat. The cat sat on the",
        "red green blue red green blue red green",
        "When Mary and John went to the store, John gave a drink to",
        "In the beginning God created the heaven and the",
        "And God said, Let there be",
        "The quick brown fox jumps over the lazy",
        "To be or not to be, that is the",
    ],
}


def spearman(x: torch.Tensor, y: torch.Tensor) -> float:
    """Spearman's rank correlation (ties broken by order, which the float values here rarely have)."""
    if x.numel() < 3:
        return float("nan")
    rx, ry = x.argsort().argsort().double(), y.argsort().argsort().double()
    rx, ry = rx - rx.mean(), ry - ry.mean()
    return float((rx * ry).sum() / (rx.norm() * ry.norm()).clamp_min(1e-30))


def find_transcoders(name: str, given: dict[str, str]):
    """Return the transcoder set for ``name`` or None after saying why it is skipped."""
    spec = given.get(name, name)
    try:
        return G.load_transcoders(spec)
    except WorkbenchError as exc:
        log(f"skipping {name}: {exc}")
        return None


def study(name: str, model, transcoders, n_ablate: int, seed: int, max_features: int | None = None) -> dict:
    rows = []
    pooled_influence, pooled_effect = [], []
    gen = torch.Generator().manual_seed(seed)
    for prompt in PROMPTS[name]:
        t0 = time.perf_counter()
        graph = G.attribute(model, transcoders, prompt, max_feature_nodes=max_features)
        seconds = time.perf_counter() - t0
        pruned = G.prune(graph)
        full, kept = G.graph_scores(graph), G.graph_scores(graph, pruned)
        n_fe = graph.n_features + graph.n_errors
        kept_fe = int(pruned.node_mask[:n_fe].sum())
        influence = G.logit_influence(graph, 0)
        nodes = torch.randperm(graph.n_features, generator=gen)[:n_ablate].sort().values.tolist()
        effect = G.ablation_effects(model, transcoders, graph, nodes)
        inf = influence[nodes]
        rho = spearman(inf, effect.abs())
        pooled_influence.append(inf)
        pooled_effect.append(effect.abs())
        row = {"prompt": prompt, "top logit": graph.logit_label(0), "p": float(graph.logit_probs[0]),
               "tokens": graph.n_pos, "features": graph.n_features, "seconds": seconds,
               "replacement": full.replacement, "completeness": full.completeness,
               "replacement pruned": kept.replacement, "completeness pruned": kept.completeness,
               "feature+error nodes": n_fe, "kept": kept_fe, "reduction": n_fe / max(kept_fe, 1),
               "completeness drop": (full.completeness - kept.completeness) / max(full.completeness, 1e-9),
               "ablated": len(nodes), "spearman": rho}
        rows.append(row)
        log(f"{name} {prompt!r} -> {row['top logit']!r}: {graph.n_features} features, {seconds:.2f} s, replacement "
            f"{full.replacement:.3f} completeness {full.completeness:.3f}, pruned x{row['reduction']:.1f} "
            f"(completeness {kept.completeness:.3f}), spearman {rho:.3f}")
    mean = lambda key: statistics.fmean(r[key] for r in rows)  # noqa: E731
    finite = [r["spearman"] for r in rows if r["spearman"] == r["spearman"]]
    summary = {
        "prompts": len(rows), "replacement": mean("replacement"), "completeness": mean("completeness"),
        "replacement_pruned": mean("replacement pruned"), "completeness_pruned": mean("completeness pruned"),
        "reduction": mean("reduction"), "min_reduction": min(r["reduction"] for r in rows),
        "completeness_drop": mean("completeness drop"),
        "max_completeness_drop": max(r["completeness drop"] for r in rows),
        "spearman_pooled": spearman(torch.cat(pooled_influence), torch.cat(pooled_effect)),
        "spearman_mean": statistics.fmean(finite) if finite else float("nan"),
        "mean_seconds": mean("seconds"), "mean_features": mean("features"),
    }
    return {"summary": summary, "graphs": rows}


def verdicts(s: dict) -> list[str]:
    def check(ok: bool) -> str:
        return "met" if ok else "NOT met"

    return [
        f"mean replacement score {s['replacement']:.3f} (target >= 0.3, paper 0.37): "
        f"{check(s['replacement'] >= 0.3)}",
        f"mean completeness score {s['completeness']:.3f} (target >= 0.7, paper 0.78): "
        f"{check(s['completeness'] >= 0.7)}",
        f"pruning keeps {s['reduction']:.1f}x fewer feature and error nodes on average "
        f"(least {s['min_reduction']:.1f}x; target >= 10x): {check(s['min_reduction'] >= 10)}",
        f"completeness falls by {100 * s['completeness_drop']:.1f}% on average "
        f"(most {100 * s['max_completeness_drop']:.1f}%; target <= 20%): {check(s['max_completeness_drop'] <= 0.2)}",
        f"Spearman(influence on the top logit, |real ablation effect|) pooled {s['spearman_pooled']:.3f}, mean per "
        f"graph {s['spearman_mean']:.3f} (target >= 0.6, paper 0.72): {check(s['spearman_pooled'] >= 0.6)}",
    ]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    ap.add_argument("--transcoders", nargs="*", default=[], metavar="MODEL=DIR",
                    help="a transcoder set for a model (default: the shipped data/transcoders/MODEL)")
    ap.add_argument("--ablate", type=int, default=128, help="feature nodes ablated per graph (a random sample)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-features", type=int, default=None, metavar="N",
                    help="feature budget per graph, chosen by influence (default: every active feature; a 15-token "
                         "SmolLM2 prompt then needs ~15 GB)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args(argv)
    given = dict(s.split("=", 1) for s in args.transcoders)

    report = Report("Attribution graphs: scores, pruning and interventions")
    report.text("Each prompt's graph through every layer's transcoder (nodes: active features, error nodes, token "
                "embeddings, the top logits; edges: direct effects with attention patterns and norm scales frozen). "
                "Scores as in Ameisen et al. 2025; pruning at node 0.8 / edge 0.98; the Spearman correlation is "
                "between each feature node's influence on the top logit and the change in that logit when the "
                "feature is zeroed in the real model.")
    report.numbers["models"], report.numbers["skipped"] = {}, {}
    for name in args.models:
        transcoders = find_transcoders(name, given)
        if transcoders is None:
            report.numbers["skipped"][name] = "no transcoder set (train one with `workbench train-transcoders`)"
            report.text(f"{name}: skipped, no transcoder set in this checkout.")
            continue
        model = load(name)
        if model is None:
            report.numbers["skipped"][name] = "model not available"
            report.text(f"{name}: skipped, the model is not available.")
            continue
        result = study(name, model, transcoders, args.ablate, args.seed, args.max_features)
        report.numbers["models"][name] = result
        report.heading(name)
        for line in verdicts(result["summary"]):
            report.text(line)
            log(f"{name}: {line}")
        report.table(result["graphs"], caption=f"{name}: one row per prompt")
    paths = report.write(args.out or report_dir("attribution-graphs"))
    log(f"report: {paths.html}  numbers: {paths.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
