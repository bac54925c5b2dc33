"""``workbench circuit``: a circuit for a task by attribution patching or edge attribution (EAP, EAP-IG).

    workbench circuit smollm2-135m --task ioi --method eap-ig --edges 1000
    workbench circuit smollm2-135m --task greater-than --method eap --edges 500 --greedy --json gt.json
    workbench circuit kjv-small --task pairs.jsonl --method atp --top 10
    workbench circuit smollm2-135m --task ioi --method eap-ig --edges 2000 --report runs/ioi
    workbench circuit smollm2-135m --task ioi --edges 2464 --refine 30   # then refine the circuit, same size

``--task`` is ``ioi``, ``greater-than`` (generated for the model's tokenizer) or a JSON/JSONL file
of ``{"clean", "corrupt", "answer", "wrong"}`` pairs. ``atp`` lists the heads and residual positions
whose patching AtP estimates to matter most; ``eap``/``eap-ig`` score every edge, keep ``--edges``
of them (top-n, or grown greedily from the logits) and report the circuit's faithfulness: the clean
run with every other edge patched to its corrupted value. ``--refine STEPS`` then improves the top-n
circuit by gradient steps on its own patched run (same size; see ``eap.refine_circuit``).
"""

from __future__ import annotations

import argparse
import time

from workbench import plots
from workbench.analysis import attribution_patching as AP
from workbench.analysis import eap as E
from workbench.analysis import tasks as T
from workbench.commands.analysis import _load, _write_json, _write_report
from workbench.errors import InputError
from workbench.report import Report


def _cmd_circuit(args: argparse.Namespace) -> int:
    if args.edges < 0:
        raise InputError(f"--edges {args.edges} must be >= 0")
    if args.prompts < 1:
        raise InputError(f"--prompts {args.prompts} must be >= 1")
    model = _load(args.model).eval().requires_grad_(False)
    task = T.load_task(model, args.task, n=args.prompts, seed=args.seed)
    n = task.clean.shape[0]
    print(f"{args.model}: task {task.name}, {n} pairs of {task.clean.shape[1]} tokens; e.g. {task.clean_text[0]!r} / "
          f"{task.corrupt_text[0]!r}")
    t0 = time.perf_counter()
    numbers: dict = {"model": args.model, "task": task.name, "method": args.method, "n_pairs": n}
    if args.method == "atp":
        res = AP.attribution_patch(model, task.clean, task.corrupt, task.metric, AP.AtPConfig(qk_fix=args.qk_fix))
        seconds = time.perf_counter() - t0
        gap = res.clean - res.corrupt
        H = model.cfg.n_heads
        flat = res.heads.flatten()
        top = flat.abs().topk(min(args.top, flat.numel())).indices
        rows = [{"head": f"L{int(i) // H}H{int(i) % H}", "atp": float(flat[i]), "fraction": float(flat[i]) / gap}
                for i in top]
        print(f"metric: clean {res.clean:.4f}, corrupted {res.corrupt:.4f}; AtP in {seconds:.2f} s "
              "(estimated change from patching each head's clean output into the corrupted run)")
        print(f"  {'head':>8}  {'AtP':>9}  {'of gap':>7}")
        for r in rows:
            print(f"  {r['head']:>8}  {r['atp']:+9.4f}  {r['fraction']:+7.3f}")
        numbers.update(clean=res.clean, corrupt=res.corrupt, seconds=seconds, heads=rows,
                       resid=res.resid.tolist(), qk_fix=args.qk_fix)
        _write_json(args.json, numbers)
        if args.report:
            report = Report(f"Attribution patching: {args.model}, {task.name}")
            report.figure(plots.head_heatmap(res.heads / gap, "AtP estimate of each head (fraction of the gap)",
                                             "fraction", diverging=True))
            report.table(rows, caption="heads with the largest estimates")
            _write_report(report, args.report, numbers)
        return 0

    config = E.EAPConfig(method=args.method, steps=args.steps, batch_size=args.batch_size)
    res = E.edge_attribution(model, task.clean, task.corrupt, task.metric, config)
    score_s = time.perf_counter() - t0
    if args.refine and (args.greedy or args.prune):
        raise InputError("--refine starts from the top-n circuit; leave out --greedy and --prune")
    if args.refine < 0:
        raise InputError(f"--refine {args.refine} must be >= 0")
    keep = E.greedy_circuit(res, args.edges) if args.greedy else E.top_n_circuit(res, args.edges, prune=args.prune)
    t1 = time.perf_counter()
    if args.refine:
        refined = E.refine_circuit(model, task.clean, task.corrupt, task.metric, res, args.edges, steps=args.refine,
                                   batch_size=args.batch_size)
        keep, faith = refined.keep, refined.faithfulness
        print(f"refined in {args.refine} steps ({time.perf_counter() - t1:.1f} s): faithfulness "
              f"{refined.history[0]:.3f} -> {faith.faithfulness:.3f}, {refined.swapped} edges swapped")
        numbers.update(refine_history=refined.history, refine_swapped=refined.swapped)
    else:
        (faith,) = E.faithfulness(model, task.clean, task.corrupt, task.metric, [keep], batch_size=args.batch_size)
    faith_s = time.perf_counter() - t1
    graph = res.graph
    edges = [(graph.edge_name(u, d), float(res.scores[u, d])) for u, d in keep.nonzero().tolist()]
    edges.sort(key=lambda e: -abs(e[1]))
    print(f"{args.method} over {graph.n_edges} edges in {score_s:.1f} s; circuit of {faith.n_edges} edges "
          f"({100 * faith.n_edges / graph.n_edges:.2f}%, {'greedy from the logits' if args.greedy else 'top-n'})")
    print(f"metric: clean {faith.clean:.4f}, corrupted {faith.corrupt:.4f}, circuit {faith.circuit:.4f}; "
          f"faithfulness {faith.faithfulness:.3f} (evaluated in {faith_s:.1f} s)")
    print(f"  {'score':>9}  edge")
    for name, score in edges[: args.top]:
        print(f"  {score:+9.4f}  {name}")
    nodes = sorted({graph.upstream[u] for u, _ in keep.nonzero().tolist()})
    numbers.update(clean=faith.clean, corrupt=faith.corrupt, circuit=faith.circuit, faithfulness=faith.faithfulness,
                   n_edges=faith.n_edges, n_edges_total=graph.n_edges, seconds_scores=score_s,
                   seconds_faithfulness=faith_s, steps=args.steps if args.method == "eap-ig" else None,
                   greedy=args.greedy, prune=args.prune, edges=edges, nodes=nodes)
    _write_json(args.json, numbers)
    if args.report:
        report = Report(f"Circuit ({args.method}): {args.model}, {task.name}")
        report.text(f"{faith.n_edges} of {graph.n_edges} edges; faithfulness {faith.faithfulness:.3f} (clean "
                    f"{faith.clean:.4f}, corrupted {faith.corrupt:.4f}, circuit {faith.circuit:.4f}).")
        report.figure(plots.circuit_diagram(graph, keep, res.scores, max_edges=300))
        report.table([{"edge": e, "score": s} for e, s in edges[:50]], caption="the circuit's strongest edges")
        _write_report(report, args.report, numbers)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("circuit", help="a task's circuit by attribution patching or edge attribution (EAP-IG)")
    p.add_argument("model", help="zoo name, checkpoint directory or .gguf file")
    p.add_argument("--task", default="ioi", help="ioi, greater-than, or a .json/.jsonl file of pairs (default ioi)")
    p.add_argument("--method", choices=("atp", "eap", "eap-ig"), default="eap-ig")
    p.add_argument("--edges", type=int, default=1000, help="edges in the circuit (default 1000)")
    p.add_argument("--greedy", action="store_true", help="grow the circuit from the logits instead of top-n")
    p.add_argument("--prune", action="store_true",
                   help="top-n: drop dangling edges (no kept path from the input or to the logits) and fill their "
                        "places from further down the ranking (the circuit may end a few edges short of --edges)")
    p.add_argument("--refine", type=int, default=0, metavar="STEPS",
                   help="then refine the top-n circuit by STEPS gradient steps on its own patched run, keeping its "
                        "size (eap.refine_circuit; one forward and backward pass over the pairs per step)")
    p.add_argument("--prompts", type=int, default=20, help="pairs generated for ioi / greater-than (default 20)")
    p.add_argument("--steps", type=int, default=5, help="EAP-IG interpolation steps m (default 5)")
    p.add_argument("--qk-fix", action="store_true", help="atp: AtP*'s recomputed softmax for queries and keys")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward/backward pass (default 8)")
    p.add_argument("--top", type=int, default=20, help="edges or heads to list (default 20)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", metavar="FILE", help="also write the numbers to this JSON file")
    p.add_argument("--report", metavar="DIR", help="also write report.html (a circuit diagram) and report.json here")
    p.set_defaults(func=_cmd_circuit)
