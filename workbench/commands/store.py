"""``workbench cache`` (write an activation store), ``workbench eval-sae`` and ``workbench features``.

    workbench cache smollm2-135m --corpus pydocs --hooks blocks.6.hook_resid_post --tokens 200000 --out DIR
    torchrun --nproc-per-node 2 -m workbench.cli cache ...        # each rank writes its own shards
    workbench eval-sae SAE_DIR --store DIR                         # L0, FVU, CE loss recovered, KL
    workbench features SAE_DIR --store DIR --out REPORT_DIR        # per-latent dashboard statistics
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from workbench import paths
from workbench.commands.analysis import _write_json
from workbench.distributed import destroy_distributed, init_distributed, local_device
from workbench.errors import ConfigError
from workbench.locking import output_lock
from workbench.pipelines import cache_corpus
from workbench.sae.evaluate import EvalConfig, SpliceConfig, evaluate_sae
from workbench.sae.features import FeatureStatsConfig, feature_stats
from workbench.sae.io import CFG_FILE, load_sae
from workbench.store import ActivationStore, StoreConfig
from workbench.zoo import load_model


def cmd_cache(args: argparse.Namespace) -> int:
    # load_model leaves the model on the CPU unless asked; the group's backend follows that device.
    device = local_device(args.device or "cpu")
    info = init_distributed(device)
    out = Path(args.out) if args.out else paths.stores_dir() / f"{Path(str(args.model)).name}-{args.corpus}"
    cfg = StoreConfig(hooks=tuple(args.hooks), dtype=args.dtype, batch_windows=args.batch,
                      shard_tokens=args.shard_tokens, first_position=args.first_position)
    res = cache_corpus(args.model, args.corpus, out, cfg, tokens=args.tokens, n_ctx=args.n_ctx, device=device,
                       progress=not args.quiet).written
    if info.rank == 0:
        print(f"{out}: {res.n_rows} tokens x {len(cfg.hooks)} hook(s) ({cfg.dtype}); wrote {res.shards_written} "
              f"shard(s), kept {res.shards_skipped} from an earlier run, {res.seconds:.1f}s")
    destroy_distributed()
    return 0


def sae_dir(path: str | Path) -> Path:
    """Return the SAE directory a command line names: the SAE itself (``cfg.json`` in it) or a
    ``workbench train-sae`` run directory, whose SAE is in ``sae/`` (the README passes the run directory)."""
    path = Path(path)
    if not (path / CFG_FILE).is_file() and (path / "sae" / CFG_FILE).is_file():
        return path / "sae"
    return path  # load_sae says what is missing


def _load_for_eval(args: argparse.Namespace) -> tuple[Any, Any, Any, str]:
    store = ActivationStore.open(args.store)
    sae = load_sae(sae_dir(args.sae), device=args.device or "cpu")
    meta = getattr(sae, "metadata", {}) or {}
    hook = args.hook or meta.get("hook_name") or (store.hooks[0] if len(store.hooks) == 1 else None)
    if hook is None:
        raise ConfigError(f"the store holds several hooks {store.hooks} and the SAE names none; pass --hook")
    model_name = args.model or store.manifest.model.name
    if not model_name:
        raise ConfigError("the store does not name its model; pass --model")
    model = load_model(model_name, device=args.device)
    return model, sae, store, hook


def cmd_eval_sae(args: argparse.Namespace) -> int:
    model, sae, store, hook = _load_for_eval(args)
    ev = evaluate_sae(
        model, sae, store, hook,
        EvalConfig(max_rows=args.max_rows, splice=SpliceConfig(batch_windows=args.batch, max_windows=args.max_windows)),
    )
    numbers = ev.to_dict()
    _write_json(args.json, numbers)
    print(json.dumps(numbers, indent=2))
    return 0


def cmd_features(args: argparse.Namespace) -> int:
    with output_lock(args.out):  # taken before the slow part: a second writer of --out fails at once
        model, sae, store, hook = _load_for_eval(args)
        stats = feature_stats(sae, store, hook, FeatureStatsConfig(max_rows=args.max_rows, n_top=args.n_top),
                              model=model)
        stats.save(args.out)
    print(json.dumps(stats.summary(), indent=2))
    print(f"feature statistics written to {args.out}", file=sys.stderr)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("cache", help="write a model's activations for a corpus to an activation store")
    p.add_argument("model", help="zoo name or checkpoint path")
    p.add_argument("--corpus", default="pydocs", help="pydocs, kjv, or a .txt/.jsonl file (default pydocs)")
    p.add_argument("--hooks", nargs="+", required=True, help="hook names, e.g. blocks.6.hook_resid_post")
    p.add_argument("--tokens", type=int, required=True, help="tokens (rows) to store")
    p.add_argument("--out", help="store directory (default $WORKBENCH_HOME/stores/MODEL-CORPUS)")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--n-ctx", type=int, default=None, help="tokens per window (default min(model context, 128))")
    p.add_argument("--batch", type=int, default=8, help="windows per forward pass")
    p.add_argument("--shard-tokens", type=int, default=1 << 16, help="rows per shard (rounded to whole batches)")
    p.add_argument("--first-position", type=int, default=0, help="skip positions before this (1 drops a BOS)")
    p.add_argument("--device", default=None)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_cache)

    for name, func, help_text in (
        ("eval-sae", cmd_eval_sae, "evaluate an SAE on a store: L0, FVU, dead/dense, CE loss recovered, KL"),
        ("features", cmd_features, "per-latent dashboard statistics of an SAE over a store"),
    ):
        q = subparsers.add_parser(name, help=help_text)
        q.add_argument("sae", help="SAE directory (SAELens layout), or the train-sae run directory holding it in sae/")
        q.add_argument("--store", required=True, help="activation store directory")
        q.add_argument("--hook", default=None, help="hook (default: the SAE's metadata hook_name)")
        q.add_argument("--model", default=None, help="model (default: the one the store names)")
        q.add_argument("--max-rows", type=int, default=None, help="read at most this many store rows")
        q.add_argument("--device", default=None)
        if name == "eval-sae":
            q.add_argument("--batch", type=int, default=8, help="windows per spliced forward pass")
            q.add_argument("--max-windows", type=int, default=None, help="spliced losses on at most this many windows")
            q.add_argument("--json", default=None, help="also write the numbers to this file")
        else:
            q.add_argument("--out", required=True, help="directory for feature_stats.safetensors/json")
            q.add_argument("--n-top", type=int, default=16, help="top activating examples per latent")
        q.set_defaults(func=func)
