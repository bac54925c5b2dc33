"""``workbench probe`` and ``workbench steer``: linear probes per layer, and generation along a direction.

    workbench probe smollm2-135m --dataset capitals                      # held-out accuracy per layer
    workbench probe smollm2-135m --dataset reviews.csv --position last --save runs/review-probe
    workbench probe kjv-small --dataset marked.jsonl --position '<<>>' --layers 1 2 --report DIR
    workbench steer smollm2-135m "My week at work was" --contrast sentiment --layer 12 -m 1 -m 2
    workbench steer smollm2-135m "The capital of France is" --direction runs/truth-probe -m 4 --answer " Paris" --wrong " Rome"
    workbench steer kjv-small "And he said" --sae RUN_DIR --feature 17 -m 20

``--dataset``: ``truth`` (capitals, sums and comparisons together), one family (``capitals``,
``arithmetic``, ``comparisons``), ``sentiment`` (short verdicts), or a ``.csv``/``.jsonl`` file of
``text,label`` rows read at ``--position`` (``last`` or a marker placed right after the token to read).
"""  # noqa: E501 (the example commands stay whole for copy-paste)

from __future__ import annotations

import argparse

from workbench import probe_plots
from workbench.analysis import probe_data as D
from workbench.analysis.attribution import token_id
from workbench.analysis.patching import LogitDiff
from workbench.commands.analysis import _load, _token, _write_json, _write_report
from workbench.commands.store import sae_dir
from workbench.errors import InputError
from workbench.locking import output_lock
from workbench.pipelines import token_windows
from workbench.report import Report
from workbench.sae.io import load_sae

# workbench.analysis.probes and .steering (which imports it) load pandas and scikit-learn's helpers: ~0.4 s of every
# `workbench` command's start-up (python -X importtime), so only `probe` and `steer` import them

BUILTIN_SETS = ("truth", "capitals", "arithmetic", "comparisons", "sentiment")


def dataset(spec: str, position: str = "last", seed: int = 0):
    """Return the probe dataset a ``--dataset`` argument names: a built-in set or a CSV/JSONL file."""
    if spec == "truth":
        return D.truth_dataset(seed=seed)
    if spec in D.FAMILIES:
        return D.truth_dataset((spec,), seed=seed)
    if spec == "sentiment":
        return D.sentiment_statements(seed)
    if spec.lower().endswith((".csv", ".jsonl", ".json")):
        return D.load_probe_dataset(spec, position=position)
    raise InputError(f"--dataset {spec!r} is neither a built-in set ({', '.join(BUILTIN_SETS)}) nor a .csv/.jsonl file")


def _cmd_probe(args: argparse.Namespace) -> int:
    if not args.save:
        return _probe(args)
    with output_lock(args.save):  # taken before the slow part: two runs never mix their files in one --save
        return _probe(args)


def _probe(args: argparse.Namespace) -> int:
    from workbench.analysis import probes as P
    model = _load(args.model)
    ds = dataset(args.dataset, args.position, args.seed)
    cfg = P.ProbeConfig(test_fraction=args.test_fraction, seed=args.seed, control=not args.no_control)
    n0, n1 = ds.check().counts()
    print(f"{args.model}: {len(ds)} examples of {ds.name} ({ds.label_names[0]}: {n0}, {ds.label_names[1]}: {n1}), "
          f"read at {ds.position!r}, hook {args.kind}")
    res = P.probe_model(model, ds, args.kind, args.layers, cfg)
    frame = res.frame()
    print(f"  {'layer':>5}  {'logistic':>8}  {'AUROC':>6}  {'mean-diff':>9}  {'control':>7}  {'select.':>7}  C")
    for row in frame.itertuples():
        print(f"  {row.layer:>5}  {row.accuracy:8.3f}  {row.auroc:6.3f}  {row.mean_diff_accuracy:9.3f}  "
              f"{row.control_accuracy:7.3f}  {row.selectivity:+7.3f}  {row.C:g}")
    b = res.best
    print(f"best: layer {frame.layer[b]} held-out accuracy {float(res.accuracy[b]):.3f}, selectivity "
          f"{float(res.selectivity[b]):+.3f} ({res.n_train} train / {res.n_test} held out)")
    if args.save:
        path = res.direction(b, args.method).save(args.save)
        print(f"{args.method} direction of {res.hooks[b]} saved to {path}")
    numbers = {"model": args.model, "dataset": ds.name, "position": ds.position, **frame.to_dict("list"),
               "best": b, "n_train": res.n_train, "n_test": res.n_test}
    _write_json(args.json, numbers)
    if args.report:
        report = Report(f"Probes: {ds.name} on {args.model}")
        report.text(f"{len(ds)} examples read at {ds.position!r} of {args.kind}; {res.n_test} held out.")
        report.figure(probe_plots.probe_accuracy_figure(res))
        report.table(frame.drop(columns=["hook"]))
        _write_report(report, args.report, numbers)
    return 0


def _vector(model, args):
    from workbench.analysis import steering as S

    given = [x for x in (args.contrast, args.direction, args.sae) if x]
    if len(given) != 1:
        raise InputError("give exactly one of --contrast DATASET, --direction DIR (a saved probe) "
                         "or --sae DIR --feature N")
    if args.direction:
        from workbench.analysis.probes import ProbeDirection

        d = ProbeDirection.load(args.direction)
        d.check_width(model.cfg.d_model)
        return S.from_probe(d)
    if args.sae:
        if args.feature is None:
            raise InputError("--sae needs --feature N (the latent whose decoder row steers)")
        # default hook: where the decoder writes (a transcoder's output hook, else the SAE's own), from its metadata
        return S.from_sae_feature(load_sae(sae_dir(args.sae)), args.feature, args.hook)
    if args.layer is None:
        raise InputError(f"--contrast needs --layer L (0..{model.cfg.n_layers - 1})")
    return S.contrast_vector(model, dataset(args.contrast, args.position), args.layer, args.kind)


def _cmd_steer(args: argparse.Namespace) -> int:
    from workbench.analysis import steering as S
    model = _load(args.model)
    vec = _vector(model, args).check(model)
    multipliers = args.multiplier or [1.0]
    target = None
    if args.answer is not None:
        target = LogitDiff(token_id(model, _token(args.answer)),
                           None if args.wrong is None else token_id(model, _token(args.wrong)))
    windows = None
    if args.kl_windows:
        windows = token_windows(model, args.corpus, min(64, model.cfg.n_ctx), args.kl_windows)
    print(f"steering vector: {vec.source} at {vec.hook}, norm {float(vec.vector.norm()):.2f}")
    rows = []
    for m in [0.0, *multipliers]:
        out = S.steered_generation(model, args.prompt, vec, m, args.max_new_tokens, temperature=args.temperature,
                                   seed=args.seed) if m else None
        text = out.steered.texts[0] if out else model.generate(args.prompt, args.max_new_tokens,
                                                                temperature=args.temperature, seed=args.seed).texts[0]
        row = {"multiplier": m, "text": text}
        if target is not None:
            row["measure"] = float(S.measure(model, [args.prompt], target, vec.hooks(m))[0])
        if windows is not None:
            row["kl_nats_per_token"] = S.kl_on_text(model, windows, vec.hooks(m))
        rows.append(row)
        extra = "".join(f"  {k} {row[k]:.3f}" for k in ("measure", "kl_nats_per_token") if k in row)
        print(f"x{m:g}:{extra}\n  {args.prompt}{text}")
    _write_json(args.json, {"model": args.model, "prompt": args.prompt, "hook": vec.hook, "source": vec.source,
                            "rows": rows})
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("probe", help="linear probes on every layer: held-out accuracy, control task, direction")
    p.add_argument("model", help="zoo name, checkpoint directory or .gguf file")
    p.add_argument("--dataset", default="truth", help=f"{', '.join(BUILTIN_SETS)}, or a .csv/.jsonl file of text,label "
                                                      "(default truth)")
    p.add_argument("--position", default="last", help="'last' (default) or a marker put right after the token to read")
    p.add_argument("--kind", default="resid_post", help="hook kind to probe (default resid_post)")
    p.add_argument("--layers", type=int, nargs="+", default=None, help="layers to probe (default: all)")
    p.add_argument("--test-fraction", type=float, default=0.25, help="held-out fraction (default 0.25)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-control", action="store_true", help="skip the control task")
    p.add_argument("--save", metavar="DIR", help="save the best layer's direction (and metadata) here")
    p.add_argument("--method", choices=["logistic", "mean_diff"], default="logistic", help="direction saved")
    p.add_argument("--json", metavar="FILE", help="also write the numbers to this JSON file")
    p.add_argument("--report", metavar="DIR", help="also write report.html and report.json here")
    p.set_defaults(func=_cmd_probe)

    p = subparsers.add_parser("steer", help="generate with and without a steering vector (contrast set, probe or SAE)")
    p.add_argument("model")
    p.add_argument("prompt")
    src = p.add_argument_group("the vector (one of)")
    src.add_argument("--contrast", metavar="DATASET", help="mean difference of a labelled set (as probe's --dataset)")
    src.add_argument("--direction", metavar="DIR", help="a direction saved by `workbench probe --save`")
    src.add_argument("--sae", metavar="DIR", help="an SAE or transcoder (SAELens layout, or its train-sae run "
                                                  "directory); with --feature N")
    p.add_argument("--feature", type=int, help="the SAE latent")
    p.add_argument("--hook", help="the hook the SAE's decoder writes to (default: from its metadata; a transcoder's "
                                  "output hook)")
    p.add_argument("--layer", type=int, help="layer of the contrast vector")
    p.add_argument("--kind", default="resid_post", help="hook kind of the contrast vector (default resid_post)")
    p.add_argument("--position", default="last", help="read position of a contrast file ('last' or a marker)")
    p.add_argument("-m", "--multiplier", type=float, action="append", help="multiplier (repeatable; default 1)")
    p.add_argument("-n", "--max-new-tokens", type=int, default=32)
    p.add_argument("-t", "--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--answer", help="also print logit(answer) [- logit(wrong)] after the prompt at each multiplier")
    p.add_argument("--wrong")
    p.add_argument("--kl-windows", type=int, default=8, help="windows of --corpus for the KL side effect (0: skip)")
    p.add_argument("--corpus", default="pydocs", help="unrelated text for the KL (default pydocs)")
    p.add_argument("--json", metavar="FILE", help="also write the texts and numbers to this JSON file")
    p.set_defaults(func=_cmd_steer)
