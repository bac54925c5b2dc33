"""``workbench graph``: an attribution graph of a prompt through a transcoder set (Ameisen et al. 2025).

    workbench graph kjv-small "And God said, Let there be" --transcoders kjv-small
    workbench graph kjv-small "In the beginning God" --transcoders runs/tc --target " created" --top 5
    workbench graph kjv-small "And the LORD" --transcoders kjv-small --out g.safetensors --export g.json --report DIR

Prints the graph's size, its replacement and completeness scores before and after pruning, and the
strongest paths from a token (or error) to the top logit. ``--transcoders`` is a directory written by
``workbench train-transcoders`` or the name of a shipped set (``data/transcoders/NAME``).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from contextlib import ExitStack
from pathlib import Path

from workbench.analysis import graph as G
from workbench.commands.analysis import _load, _write_json, _write_report
from workbench.errors import ConfigError, InputError
from workbench.locking import output_lock


def _lock_outputs(stack: ExitStack, args: argparse.Namespace) -> None:
    """Hold one lock per output file (``DIR/.NAME.lock``) for the whole command, taken before the slow part:
    a second ``workbench graph`` writing the same file fails at once (OutputLockedError names the holder)
    instead of racing the first one's rename. Different files in one directory do not exclude each other."""
    for flag in ("out", "out_pruned", "export", "json"):
        value = getattr(args, flag)
        if not value:
            continue
        path = Path(value)
        if path.is_dir():
            raise ConfigError(f"--{flag.replace('_', '-')} {value} is a directory; give a file name")
        stack.enter_context(output_lock(path.parent if str(path.parent) else Path("."), f".{path.name}.lock"))


def _write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename: a killed writer leaves the old file
    (or none), never half of the new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        raise ConfigError(f"cannot write {path}: {exc.strerror or exc}; choose a writable path") from None
    finally:
        tmp.unlink(missing_ok=True)


def _cmd_graph(args: argparse.Namespace) -> int:
    for name in ("node_threshold", "edge_threshold"):  # before the slow part, so a typo fails at once
        value = getattr(args, name)
        if not 0 < value <= 1:
            raise InputError(f"--{name.replace('_', '-')} {value} must lie in (0, 1]")
    with ExitStack() as stack:
        _lock_outputs(stack, args)
        return _build_and_write(args)


def _build_and_write(args: argparse.Namespace) -> int:
    # this process owns both: frozen, autograd keeps no activations for weight gradients (see attribute)
    model = _load(args.model).requires_grad_(False)
    transcoders = {layer: tc.requires_grad_(False) for layer, tc in G.load_transcoders(args.transcoders).items()}
    t0 = time.perf_counter()
    graph = G.attribute(model, transcoders, args.prompt, max_feature_nodes=args.max_features,
                        target=G.target_token(model, args.target) if args.target is not None else None,
                        batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    del model, transcoders  # not needed past here: pruning a SmolLM2 graph gets their ~1.2 GB
    pruned = G.prune(graph, args.node_threshold, args.edge_threshold)
    full, kept = G.graph_scores(graph), G.graph_scores(graph, pruned)
    n_kept, n_edges = int(pruned.node_mask.sum()), int(pruned.edge_mask.sum())
    print(f"{args.model}: {graph.n_pos} tokens, {graph.n_features} active features "
          f"({graph.settings['n_active_features']} before the budget), {graph.n_logits} logit nodes; "
          f"built in {seconds:.2f} s ({graph.settings['backward_passes']} batched backward passes)")
    top = ", ".join(f"{graph.logit_label(i)!r} {float(p):.3f}" for i, p in enumerate(graph.logit_probs))
    print(f"top logits: {top}")
    print(f"pruned at node {args.node_threshold} / edge {args.edge_threshold}: {n_kept} of {graph.n_nodes} nodes, "
          f"{n_edges} of {int((graph.adjacency != 0).sum())} edges")
    print(f"replacement score {full.replacement:.3f} (pruned {kept.replacement:.3f}), "
          f"completeness {full.completeness:.3f} (pruned {kept.completeness:.3f})")
    logit = 0
    if args.target is not None:
        logit = graph.logit_tokens.tolist().index(graph.settings["target"])
    paths = G.top_paths(graph, pruned, logit=logit, k=args.top)
    print(f"strongest paths to {graph.logit_label(logit)!r} "
          "(strength: product of each edge's share of its target's input)")
    print(f"  {'strength':>9}  path")
    rows = []
    for p in paths:
        text = " -> ".join(graph.node_label(n) for n in p.nodes)
        rows.append({"strength": p.strength, "path": text})
        print(f"  {p.strength:+9.4f}  {text}")
    if args.out:
        print(f"graph written to {graph.save(args.out)}")
    if args.out_pruned:
        small = G.subgraph(graph, pruned)
        print(f"pruned graph ({small.n_nodes} nodes) written to {small.save(args.out_pruned)}")
    if args.export:
        data = G.to_circuit_tracer_json(graph, pruned, slug=args.model, node_threshold=args.node_threshold)
        _write_text_atomic(Path(args.export), json.dumps(data))
        print(f"circuit-tracer graph JSON written to {args.export} "
              f"({len(data['nodes'])} nodes, {len(data['links'])} links)")
    numbers = {"model": args.model, "prompt": args.prompt, "tokens": graph.str_tokens, "seconds": seconds,
               "n_features": graph.n_features, "n_nodes": graph.n_nodes, "n_nodes_pruned": n_kept,
               "n_edges_pruned": n_edges, "logits": [graph.logit_label(i) for i in range(graph.n_logits)],
               "logit_probs": graph.logit_probs, "replacement": full.replacement, "completeness": full.completeness,
               "replacement_pruned": kept.replacement, "completeness_pruned": kept.completeness,
               "paths": rows, "settings": graph.settings}
    _write_json(args.json, numbers)
    if args.report:
        from workbench import graph_plots
        from workbench.report import Report

        report = Report(f"Attribution graph: {args.model}")
        report.text(f"Prompt {args.prompt!r} through the transcoders {args.transcoders!r}: {graph.n_features} active "
                    f"features; pruned to {n_kept} of {graph.n_nodes} nodes. Replacement score "
                    f"{full.replacement:.3f}, completeness {full.completeness:.3f} (pruned: {kept.replacement:.3f}, "
                    f"{kept.completeness:.3f}).")
        report.figure(graph_plots.graph_figure(graph, pruned, edge_threshold=0.05,
                                               title="pruned graph (edges above 5% of the largest)"))
        report.table(rows, caption=f"strongest paths to {graph.logit_label(logit)!r}")
        _write_report(report, args.report, numbers)
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("graph", help="attribution graph of a prompt through transcoder features")
    p.add_argument("model", help="zoo name, checkpoint directory or .gguf file")
    p.add_argument("prompt")
    p.add_argument("--transcoders", required=True, metavar="DIR|NAME",
                   help="a set from `workbench train-transcoders` or a shipped set's name")
    p.add_argument("--target", help="explain this next token (one token of text) besides the top logits")
    p.add_argument("--max-features", type=int, help="keep at most this many feature nodes, by influence")
    p.add_argument("--node-threshold", type=float, default=0.8, help="pruning: influence share of nodes kept (0.8)")
    p.add_argument("--edge-threshold", type=float, default=0.98, help="pruning: influence share of edges kept (0.98)")
    p.add_argument("--top", type=int, default=10, help="paths to list (default 10)")
    p.add_argument("--batch-size", type=int, default=64, help="target rows per backward pass (default 64)")
    p.add_argument("--out", metavar="FILE", help="save the graph (one .safetensors file)")
    p.add_argument("--out-pruned", metavar="FILE", help="save only the pruned graph (kept features and edges)")
    p.add_argument("--export", metavar="FILE", help="write circuit-tracer's graph JSON (for Neuronpedia-style viewers)")
    p.add_argument("--json", metavar="FILE", help="also write the numbers to this JSON file")
    p.add_argument("--report", metavar="DIR", help="also write report.html (the graph) and report.json here")
    p.set_defaults(func=_cmd_graph)
