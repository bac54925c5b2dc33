"""Truth probes across SmolLM2's layers, and steering it along a sentiment direction.

    python analyses/probes_steering.py [--models smollm2-135m] [--steer-layer 12] [--out DIR]

For each model:

1. Truth probes. The workbench writes true and false statements of three kinds (capitals of 80
   countries in three templates, sums of numbers below 20, comparisons of numbers below 100), each fact
   with its true and a false answer, and reads the residual stream after every block at the closing
   period. Per layer: a logistic probe (its regularisation C picked by cross-validated selectivity on the
   training split, ``--choose-C-by``) and a mean-difference probe,
   held-out accuracy and AUROC on a stratified quarter of the statements, and the control task of
   Hewitt & Liang (each token type, here the period and the token before it, gets a random label; a
   probe of the task probe's capacity learns it): selectivity is task accuracy minus control accuracy.
   Probes are trained on each family alone and on all three together.
2. Steering. A contrast set of short verdicts ("The movie was wonderful." / "... terrible.") gives a
   sentiment direction at one layer two ways: the mean difference of the two classes (contrastive
   activation addition) and a logistic probe's unit direction scaled by the class gap along it. Each is
   added, times a multiplier, at every position of held-out negative prompts ("I hated the album last
   week. Honestly, it was"); the target measure is logit(" great") - logit(" terrible") of the next
   token, compared with the gap between the positive and the negative prompts, and the side effect is
   KL(plain || steered) per token on Python documentation the vector never saw. Greedy generations
   with and without steering are shown side by side.

Output: ``report.html`` and ``report.json`` in ``--out`` (default
``$WORKBENCH_HOME/runs/reports/probes-steering``), the best truth probe's direction and the residuals read
(reused by a rerun on the same statements) beside them. Reading SmolLM2's residuals dominates: 16 minutes
of wall time on a 2-core machine shared with other jobs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # analyses/_common.py

from _common import log, study_models  # noqa: E402

from workbench import probe_plots  # noqa: E402
from workbench.analysis import probes as P  # noqa: E402
from workbench.analysis import steering as S  # noqa: E402
from workbench.analysis.patching import LogitDiff  # noqa: E402
from workbench.analysis.probe_data import (  # noqa: E402
    CAPITALS,
    FAMILIES,
    MIN_PER_CLASS,
    ProbeDataset,
    known_capitals,
    read_positions,
    sentiment_statements,
    truth_dataset,
)
from workbench.pipelines import token_windows  # noqa: E402
from workbench.report import Report, report_dir  # noqa: E402

THINGS = ("movie", "restaurant", "holiday", "concert", "novel", "hotel", "match", "play", "lecture", "album",
          "museum", "game")
MULTIPLIERS = (0.0, 0.25, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0)
GENERATION_PROMPTS = ("I went to the new restaurant in town yesterday, and", "My week at work was")
#: the statement sets probed: the capitals the model knows, all capitals, each other family, all together
SETS = ("known", "capitals", "arithmetic", "comparisons", "all")
#: the regularisation strengths cross-validation picks from (weaker probes than ProbeConfig's default reach, as
#: selectivity asks for)
CS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 1e-1, 1.0)
TARGETS = {"best_accuracy": 0.80, "selectivity": 0.2, "fraction_of_gap": 0.5, "max_kl": 0.5}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["smollm2-135m"], help="zoo names or checkpoint paths")
    p.add_argument("--steer-layer", type=int, default=None, help="layer to steer at (default: 40%% of the depth)")
    p.add_argument("--per-family", type=int, default=100, help="sums and comparisons generated (default 100 each)")
    p.add_argument("--out", default=None,
                   help="report directory (default $WORKBENCH_HOME/runs/reports/probes-steering)")
    p.add_argument("--choose-C-by", choices=["selectivity", "accuracy"], default="selectivity",
                   help="how cross-validation picks each probe's C (default selectivity; the other is reported beside)")
    p.add_argument("--skip-steering", action="store_true", help="truth probes only")
    p.add_argument("--compare", action="store_true", help="also train every probe with C chosen the other way")
    p.add_argument("--sets", nargs="+", choices=list(SETS), default=list(SETS),
                   help="statement sets to probe (default all; 'known' is the capitals the model knows)")
    return p.parse_args(argv)


def _subset(acts: torch.Tensor, ds: ProbeDataset, types: list, keep: list[bool]):
    idx = [i for i, k in enumerate(keep) if k]
    return acts[:, idx], [ds.labels[i] for i in idx], [types[i] for i in idx]


def _country(text: str) -> str | None:
    return next((c for c, _ in CAPITALS if f"of {c} " in text or f"of {c}." in text), None)


def truth_probes(name: str, model, args, out: Path, report: Report) -> dict:
    ds = truth_dataset(FAMILIES, n_per_family=args.per_family, seed=0)
    known = {c for c, _ in known_capitals(model)}
    hooks = P.probe_hooks(model, "resid_post")
    t0 = time.perf_counter()
    reads = read_positions(model, ds)
    acts = _cached_activations(out / f"truth-activations-{Path(name).name}.safetensors", ds,
                               lambda: P.collect_activations(model, reads, hooks))
    log(f"{name}: residuals of {len(ds)} statements at {len(hooks)} layers in {time.perf_counter() - t0:.0f}s; "
        f"the model knows {len(known)} of {len(CAPITALS)} capitals")
    sets = {"capitals known to the model": [g == "capitals" and _country(t) in known
                                            for t, g in zip(ds.texts, ds.groups)],
            **{f: [g == f for g in ds.groups] for f in FAMILIES}, "all": [True] * len(ds)}
    chosen = {"known": "capitals known to the model"}
    sets = {k: v for k, v in sets.items() if k in {chosen.get(x, x) for x in args.sets}}
    results: dict[str, P.LayerProbes] = {}
    other_choice = "accuracy" if args.choose_C_by == "selectivity" else "selectivity"
    others: dict[str, P.LayerProbes] = {}  # the same probes with C picked the other way, for comparison
    for key, keep in sets.items():
        t0 = time.perf_counter()
        a, y, types = _subset(acts, ds, reads.types, keep)
        if min(y.count(0), y.count(1)) < MIN_PER_CLASS:
            log(f"{name}: {key}: {y.count(0)} false and {y.count(1)} true statements, too few to probe; skipped")
            continue
        res = P.train_probes(a, y, hooks, types, P.ProbeConfig(seed=0, Cs=CS, choose_C_by=args.choose_C_by))
        res.meta = {"model": name, "dataset": f"truth:{key}", "position": "last (the period)",
                    "label_names": ["false", "true"], "d_model": model.cfg.d_model, "C_chosen_by": args.choose_C_by}
        results[key] = res
        if args.compare:
            others[key] = P.train_probes(a, y, hooks, types, P.ProbeConfig(seed=0, Cs=CS, choose_C_by=other_choice))
        for how, r in ((args.choose_C_by, res), (other_choice, others.get(key))):
            if r is None:
                continue
            b = r.best
            log(f"{name}: {key}: {len(y)} statements, C by {how}: best layer {b} held-out accuracy "
                f"{float(r.accuracy[b]):.3f} (mean-difference {float(r.mean_diff_accuracy[b]):.3f}), control "
                f"{float(r.control_accuracy[b]):.3f}, selectivity {float(r.selectivity[b]):.3f}")
        log(f"({time.perf_counter() - t0:.0f}s)")

    report.heading(f"{name}: truth probes")
    report.text(f"{len(ds)} statements ({', '.join(f'{g}: {ds.groups.count(g)}' for g in FAMILIES)}), half true; "
                f"read at the closing period after every block; a quarter of each set held out. Chance is 0.5. "
                f"'Capitals known to the model': the statements about the {len(known)} of {len(CAPITALS)} countries "
                "whose capital SmolLM2 ranks first among all the capitals after 'The capital of X is' (the known-facts "
                "filter of Meng et al. 2022): a probe cannot read the truth of a fact the model does not hold.")
    summary = []
    for key in results:
        for how, res in ((args.choose_C_by, results[key]), (other_choice, others.get(key))):
            if res is None:
                continue
            b = res.best
            summary.append({"statements": key, "C chosen by": how, "best layer": b, "accuracy": float(res.accuracy[b]),
                            "AUROC": float(res.auroc[b]), "mean-diff accuracy": float(res.mean_diff_accuracy[b]),
                            "control accuracy": float(res.control_accuracy[b]),
                            "selectivity": float(res.selectivity[b]),
                            "best selectivity (any layer)": float(res.selectivity.max()), "n test": res.n_test})
    report.text(f"Each logistic probe's regularisation C is chosen by 3-fold cross-validation on the training split, "
                f"by {args.choose_C_by} among C = {', '.join(f'{c:g}' for c in CS)} (Hewitt & Liang advise the "
                "selective probe among capacities that read the task), and the control probe uses the same C."
                + (f" The rows chosen by {other_choice} show what the other choice gives." if args.compare else ""))
    report.table(summary, caption="best layer (highest held-out logistic accuracy) per statement family")
    for key in [k for k in ("capitals known to the model", "capitals", "all") if k in results]:
        report.figure(probe_plots.probe_accuracy_figure(results[key], f"{name}: truth probes on {key} statements, "
                                                                     "held-out accuracy by layer"))
    head = next(k for k in ("capitals known to the model", "capitals", *FAMILIES, "all") if k in results)
    report.table(results[head].frame().drop(columns=["hook"]), caption=f"{head}: every layer")
    best = results[head]
    direction = best.direction(best.best)
    direction.save(out / f"truth-direction-{Path(name).name}")
    keep = [g == "capitals" for g in ds.groups]
    proj = acts[best.best][torch.tensor(keep)] @ direction.vector
    report.figure(probe_plots.projection_figure(proj, [lbl for lbl, k in zip(ds.labels, keep) if k],
                                                ("false", "true"), f"{name}: all capital statements projected on the "
                                                f"layer-{best.best} truth direction of {head}"))

    def numbers(r: P.LayerProbes) -> dict:
        return {"accuracy": r.accuracy, "auroc": r.auroc, "mean_diff_accuracy": r.mean_diff_accuracy,
                "control_accuracy": r.control_accuracy, "selectivity": r.selectivity, "C": r.C,
                "best_layer": r.best, "n_train": r.n_train, "n_test": r.n_test}

    return {key: numbers(r) for key, r in results.items()} | {
        f"C by {other_choice}": {key: numbers(r) for key, r in others.items()}, "Cs": CS,
        "C_chosen_by": args.choose_C_by, "known_countries": sorted(known)}


def _cached_activations(path: Path, ds: ProbeDataset, compute) -> torch.Tensor:
    """Return the activations saved at ``path`` for exactly these texts, else ``compute()`` them and save them (a
    rerun of the probes then skips the model: reading SmolLM2's residuals is most of the truth-probe time)."""
    import hashlib

    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256("\n".join(ds.texts).encode()).hexdigest()
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            same = (f.metadata() or {}).get("texts_sha256") == digest
        if same:
            return load_file(str(path))["acts"]
    acts = compute()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({"acts": acts.contiguous()}, str(path), metadata={"texts_sha256": digest})
    return acts


def steering_study(name: str, model, args, report: Report) -> dict:
    layer = args.steer_layer if args.steer_layer is not None else round(0.4 * model.cfg.n_layers)
    contrast = sentiment_statements()
    t0 = time.perf_counter()
    mean_diff = S.contrast_vector(model, contrast, layer)
    probes = P.probe_model(model, contrast, layers=[layer], cfg=P.ProbeConfig(seed=0))
    probe_vec = S.from_probe(probes.direction(0))
    cosine = float(torch.nn.functional.cosine_similarity(mean_diff.vector, probe_vec.vector, dim=0))
    pos = [f"I loved the {t} last week. Honestly, it was" for t in THINGS]
    neg = [f"I hated the {t} last week. Honestly, it was" for t in THINGS]
    reference = ProbeDataset(neg + pos, [0] * len(neg) + [1] * len(pos), label_names=("negative", "positive"))
    tid = lambda s: int(model.to_tokens(s)[0, -1])  # noqa: E731
    target = LogitDiff(tid(" great"), tid(" terrible"))
    unrelated = token_windows(model, "pydocs", min(64, model.cfg.n_ctx), 8)
    curves = {}
    for label, vec in (("mean difference", mean_diff), ("logistic probe direction", probe_vec)):
        curves[label] = S.steering_curve(model, vec, MULTIPLIERS, neg, target, reference, unrelated)
    log(f"{name}: steering at layer {layer}: class gap {curves['mean difference'].gap:.2f}; "
        + "; ".join(f"{k}: " + ", ".join(f"x{r['multiplier']:g} {r['fraction_of_gap']:.2f}/{r['kl_nats_per_token']:.3f}"
                                          for r in c.rows()) for k, c in curves.items())
        + f" ({time.perf_counter() - t0:.0f}s)")
    generations = []
    for prompt in GENERATION_PROMPTS:
        row = {"prompt": prompt}
        for m in (0.0, 1.0, 2.0):
            out = S.steered_generation(model, prompt, mean_diff, m, max_new_tokens=24, stop_tokens=[])
            row[f"x{m:g}"] = out.steered.texts[0]
        generations.append(row)

    report.heading(f"{name}: steering along sentiment, layer {layer}")
    md = curves["mean difference"]
    report.text(f"Contrast set: {len(contrast)} verdicts, half positive, read at the period of "
                f"blocks.{layer}.hook_resid_post. "
                f"Mean-difference vector norm {mean_diff.meta['norm']:.1f} (the residual there has mean norm "
                f"{mean_diff.meta['resid_norm']:.1f}); the logistic probe there reads sentiment with held-out accuracy "
                f"{float(probes.accuracy[0]):.3f} (mean-difference probe {float(probes.mean_diff_accuracy[0]):.3f}); "
                f"cosine between the two directions {cosine:.3f}. Target measure logit(' great') - logit(' terrible') "
                f"on {len(neg)} held-out negative prompts: unsteered {md.baseline:.2f}; positive "
                f"prompts {md.class_means[1]:.2f}, negative {md.class_means[0]:.2f} "
                f"(gap {md.gap:.2f}). KL over {unrelated.numel()} tokens of Python documentation.")
    report.figure(probe_plots.steering_curve_figure(curves,
                                                    f"{name}: steering strength vs side effect (layer {layer})"))
    for key, c in curves.items():
        report.table(c.rows(), caption=f"{key}: per multiplier")
    report.table(generations, caption="greedy continuations, steered along the mean difference at multiplier 0, 1, 2")
    reach = {k: c.reaching(TARGETS["fraction_of_gap"], TARGETS["max_kl"]) for k, c in curves.items()}
    return {"layer": layer, "cosine_mean_diff_vs_probe": cosine, "probe_accuracy": float(probes.accuracy[0]),
            "mean_diff_probe_accuracy": float(probes.mean_diff_accuracy[0]),
            "vector_norm": mean_diff.meta["norm"], "resid_norm": mean_diff.meta["resid_norm"],
            "curves": {k: {"rows": c.rows(), "class_means": c.class_means, "gap": c.gap, "baseline": c.baseline}
                       for k, c in curves.items()},
            "smallest_multiplier_reaching_half_gap_with_kl_below_0.5": reach, "generations": generations}


def study(name: str, model, args, out: Path, report: Report) -> dict:
    numbers = {"truth": truth_probes(name, model, args, out, report)}
    if not args.skip_steering:
        numbers["steering"] = steering_study(name, model, args, report)
    reach = numbers.get("steering", {}).get("smallest_multiplier_reaching_half_gap_with_kl_below_0.5", {})
    numbers["acceptance"] = {"C_chosen_by": args.choose_C_by}
    for key, label in (("capitals known to the model", "known_capitals"), ("capitals", "all_capitals"),
                       ("all", "all_families")):
        if key in numbers["truth"]:
            r = numbers["truth"][key]
            numbers["acceptance"][f"{label}_best_layer"] = r["best_layer"]
            numbers["acceptance"][f"{label}_best_accuracy"] = float(r["accuracy"][r["best_layer"]])
            numbers["acceptance"][f"{label}_selectivity_at_best"] = float(r["selectivity"][r["best_layer"]])
    numbers["acceptance"] |= {
        "steering_reaches_half_gap_with_kl_below_0.5": {k: v is not None for k, v in reach.items()},
        "targets": TARGETS}
    report.heading("Acceptance figures")
    report.table([{"figure": k, "value": v} for k, v in numbers["acceptance"].items() if k != "targets"],
                 caption=f"targets: best accuracy >= {TARGETS['best_accuracy']}, "
                         f"selectivity >= {TARGETS['selectivity']}, steering >= {TARGETS['fraction_of_gap']} "
                         f"of the gap with KL < {TARGETS['max_kl']} nats/token")
    return numbers


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    np.random.seed(0)
    out = Path(args.out) if args.out else report_dir("probes-steering")
    report = Report("Linear probes and steering vectors")
    report.text(__doc__.split("\n\n", 2)[2].split("Output:")[0])
    return study_models(report, args.models, lambda name, model: study(name, model, args, out, report), out)


if __name__ == "__main__":
    main()
