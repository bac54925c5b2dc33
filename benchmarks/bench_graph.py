"""Attribution graph speed: a whole graph, its batched backward passes and one plain forward pass, in one run.

    python -m benchmarks.bench_graph [--quick] [--transcoders DIR]
                                     [--smollm2 [--smollm2-transcoders DIR] [--max-features N]]

kjv-small (target: a graph in <= 5 s, so the app stays interactive): a 10-token prompt through the
shipped transcoder set (``data/transcoders/kjv-small``), or ``--transcoders DIR``, or, when neither
exists, a random TopK set of the training recipe's shape (d_sae 1024, k 32: as many active features
per token as a trained BatchTopK set; said so in the output). Timed interleaved with a plain forward
pass of the prompt and one batched backward pass of the replacement model (median of the repeats),
and reported: the graph's seconds, its number of backward passes, seconds per pass and per forward,
and their ratio.

``--smollm2`` (targets: a 10-token graph in <= 2 minutes and <= 2 GB, its pruned file and export
under 5 MB): builds the whole graph and reports its seconds, backward passes and peak RSS
(``ru_maxrss``, the process's high-water mark: model, transcoders and graph), then prunes it at the
defaults and writes the pruned graph and its circuit-tracer JSON. ``--smollm2-transcoders DIR`` names
a trained set (``workbench train-transcoders smollm2-135m ...``). With none given or shipped, a random
TopK set of the recipe's shape (d_sae 4608, k 32, 30 layers) gives the same number of active features
(9,600) and so of nodes and passes; the output says so.

Measured on 2026-12-07 with the documented SmolLM2 set (``--quick --smollm2 --smollm2-transcoders
$WORKBENCH_HOME/transcoders/smollm2-135m``; 28,411 active features on the prompt): with ``--max-features 7500``
the graph takes 50.8 s and peaks at 1,808 MiB (both targets met), and pruning keeps 3,112 features whose file
is 12.25 MiB (about 2.8M edges at 4 bytes each; NOT met) and whose circuit-tracer JSON is 210 MiB; with every
feature, 90.2 s and 4,371 MiB (the 3,149 MiB adjacency alone passes 2 GB; NOT met), pruned to 5,813 features
and 36.9 MiB.
"""

from __future__ import annotations

import argparse
import json
import resource
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import interleaved_medians
from workbench.analysis import graph as G
from workbench.errors import WorkbenchError
from workbench.sae.model import SAE, SAEConfig
from workbench.zoo import load_model

KJV_PROMPT = "And God said, Let there be light: and"
SMOL_PROMPT = "The capital of France is Paris, and the capital of"


def random_set(model, expansion: int = 8, k: int = 32) -> list[SAE]:
    d = model.cfg.d_model
    cfg = SAEConfig(d_in=d, d_sae=expansion * d, architecture="topk", k=k, apply_b_dec_to_input=False, d_out=d,
                    skip=True)
    out = []
    for layer in range(model.cfg.n_layers):
        tc = SAE(cfg, seed=layer).eval()
        tc.metadata = {"model_name": model.cfg.name}
        out.append(tc)
    return out


def _passes(model, tcs, tokens, batch: int):
    """Return (one backward pass, one forward pass of the replacement) as callables, on ``batch`` copies."""
    rec = G._record(model, tokens)
    with torch.no_grad():
        acts = [tc.encode(x) for tc, x in zip(tcs, rec.mlp_in)]
        errors = [y - tc(x).x_hat for tc, x, y in zip(tcs, rec.mlp_in, rec.mlp_out)]
    rep = G._Replacement(model, tcs, tokens, rec, acts, errors, batch)
    logit = int(rec.logits[-1].argmax())

    def backward() -> None:
        total = G._target_values(rep, [("logit", logit)] * batch, tcs, range(batch)).sum()  # one target per copy
        torch.autograd.grad(total, rep.sources(), retain_graph=True, allow_unused=True)

    def replacement_forward() -> None:
        G._Replacement(model, tcs, tokens, rec, acts, errors, batch)
    return backward, replacement_forward


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def kjv(args) -> None:
    model = load_model("kjv-small").requires_grad_(False)  # owned here: frozen, as the CLI does
    spec = args.transcoders or "kjv-small"
    try:
        tcs = G.check_transcoders(model, G.load_transcoders(spec))
        what = f"transcoder set {spec!r}"
    except WorkbenchError as exc:
        tcs = random_set(model)
        what = f"a RANDOM TopK set of the recipe's shape (no trained set: {exc})"
    tcs = [tc.requires_grad_(False) for tc in tcs]
    tokens = model.to_tokens(KJV_PROMPT)
    graph = G.attribute(model, tcs, tokens)
    batch = min(64, graph.settings["n_active_features"] + graph.n_logits)
    backward, rep_forward = _passes(model, tcs, tokens, batch)

    def forward() -> None:
        with torch.no_grad():
            model(tokens)

    t = interleaved_medians({"graph": lambda: G.attribute(model, tcs, tokens), "backward": backward,
                             "replacement forward": rep_forward, "forward": forward}, repeats=2 if args.quick else 5)
    passes = graph.settings["backward_passes"]
    print(f"kjv-small, {tokens.shape[1]}-token prompt {KJV_PROMPT!r}, {what}")
    print(f"  {graph.n_features} feature nodes, {graph.n_nodes} nodes; {passes} backward passes of {batch} rows")
    print(f"  graph:               {t['graph']:8.3f} s   (target <= 5 s: {'met' if t['graph'] <= 5 else 'NOT met'})")
    print(f"  one backward pass:   {t['backward'] * 1e3:8.1f} ms  = {t['backward'] / t['forward']:6.1f} x one forward")
    print(f"  replacement forward: {t['replacement forward'] * 1e3:8.1f} ms  = "
          f"{t['replacement forward'] / t['forward']:6.1f} x one forward ({batch} copies)")
    print(f"  plain forward:       {t['forward'] * 1e3:8.1f} ms  (1 x {tokens.shape[1]} tokens)")
    print(f"  peak RSS of this process so far: {_rss_mb():.0f} MiB")


def smollm2(args) -> None:
    """A whole 10-token SmolLM2 graph: seconds, passes, peak RSS; then pruning, the pruned file and the export."""
    try:
        model = load_model("smollm2-135m").requires_grad_(False)
    except WorkbenchError as exc:
        print(f"smollm2-135m: skipped ({exc})")
        return
    tokens = model.to_tokens(SMOL_PROMPT)[:, :10]
    if args.smollm2_transcoders:  # asked for by name: a missing or wrong set is an error, not a random stand-in
        tcs = G.check_transcoders(model, G.load_transcoders(args.smollm2_transcoders))
        what = f"the trained set {args.smollm2_transcoders}"
    else:
        try:
            tcs = G.check_transcoders(model, G.load_transcoders("smollm2-135m"))
            what = "the shipped SmolLM2 set"
        except WorkbenchError:
            tcs = None
    if tcs is None:
        tcs = random_set(model, expansion=8)
        what = (f"a RANDOM TopK set of the recipe's shape ({tcs[0].cfg.d_sae} latents, k {tcs[0].cfg.k}, "
                f"{len(tcs)} layers; no trained SmolLM2 set here): as many active features as the recipe's")
    tcs = [tc.requires_grad_(False) for tc in tcs]
    rss0 = _rss_mb()
    t0 = time.perf_counter()
    graph = G.attribute(model, tcs, tokens, batch_size=args.batch_size, max_feature_nodes=args.max_features)
    seconds = time.perf_counter() - t0
    rss_graph = _rss_mb()
    print(f"smollm2-135m, 10 tokens, {what}")
    n_active = graph.settings["n_active_features"]
    budget = "" if args.max_features is None else f" (budget {args.max_features} of {n_active})"
    print(f"  graph: {seconds:.1f} s (target <= 120 s), {graph.n_features} feature nodes{budget}, "
          f"{graph.n_nodes} nodes, {graph.settings['backward_passes']} backward passes of {args.batch_size} rows")
    print(f"  peak RSS {rss_graph:.0f} MiB (target <= 2 GiB = 2048 MiB: {'met' if rss_graph <= 2048 else 'NOT met'}); "
          f"{rss0:.0f} MiB before (model + transcoders); the adjacency is {graph.n_nodes ** 2 * 4 / 2**20:.0f} MiB")
    del model, tcs  # as `workbench graph` does before pruning
    t0 = time.perf_counter()
    pruned = G.prune(graph)
    small = G.subgraph(graph, pruned)
    with tempfile.TemporaryDirectory() as tmp:
        path = small.save(Path(tmp) / "pruned.safetensors")
        size = path.stat().st_size
        export = Path(tmp) / "pruned.json"
        export.write_text(json.dumps(G.to_circuit_tracer_json(graph, pruned)))
        json_size = export.stat().st_size
    print(f"  pruned at 0.8/0.98 in {time.perf_counter() - t0:.1f} s: {small.n_features} features, {small.n_nodes} "
          f"nodes; file {size / 2**20:.2f} MiB, circuit-tracer JSON {json_size / 2**20:.2f} MiB (target < 5 MiB: "
          f"{'met' if max(size, json_size) < 5 * 2**20 else 'NOT met'}); peak RSS so far {_rss_mb():.0f} MiB")
    if small.n_features == 0:
        print("  (no feature survives pruning: random transcoders explain nothing, so the errors carry the influence; "
              "the pruned-size target needs a trained set to mean anything)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats")
    parser.add_argument("--transcoders", help="kjv-small transcoder set (default: the shipped one)")
    parser.add_argument("--smollm2", action="store_true", help="also build a 10-token SmolLM2 graph (minutes)")
    parser.add_argument("--smollm2-transcoders", metavar="DIR",
                        help="SmolLM2 transcoder set (default: a shipped `smollm2-135m` set, else a random one), e.g. "
                             "$WORKBENCH_HOME/transcoders/smollm2-135m-x4-k64 from `workbench train-transcoders`")
    parser.add_argument("--max-features", type=int, default=None, metavar="N",
                        help="SmolLM2: feature budget (circuit-tracer's CLI uses 7500; default: every active feature)")
    parser.add_argument("--batch-size", type=int, default=64, help="target rows per backward pass (SmolLM2)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    kjv(args)
    if args.smollm2:
        smollm2(args)


if __name__ == "__main__":
    main()
