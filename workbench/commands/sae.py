"""``workbench train-sae``: train a sparse autoencoder on an activation store or synthetic data.

    workbench train-sae --store DIR --hook blocks.3.hook_resid_post --architecture topk --k 32
    workbench train-sae --synthetic --architecture relu --steps 3000      # ground-truth benchmark
    torchrun --nproc_per_node 2 -m workbench.cli train-sae ...            # data parallel

The run directory (``--out``) holds ``metrics.jsonl``, ``checkpoint/`` (resumed from when the
same command runs again) and ``sae/`` in SAELens' layout. (``eval-sae`` is in ``commands/store.py``.)
The SAE, training and synthetic-data flags are the fields of ``SAERecipe``, ``SAETrainConfig`` and
``SyntheticConfig``, with their defaults and documentation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from workbench.analysis.superposition import SyntheticConfig
from workbench.commands._args import ConfigFlags
from workbench.distributed import destroy_distributed, init_distributed, local_device
from workbench.errors import ConfigError
from workbench.pipelines import SAERecipe, SAERunResult, train_sae_on_store, train_sae_on_synthetic
from workbench.sae.train import SAETrainConfig
from workbench.store import ReaderConfig

#: --architecture, --d-sae, --expansion, --k, --normalize
SAE_FLAGS = ConfigFlags(SAERecipe, names={"normalize_activations": "normalize"})
#: --steps (default 1000: SAETrainConfig leaves total_steps to the caller), --lr, ... --no-progress; the fields
#: for skip transcoders only (``workbench train-transcoders``) get no flag here
TRAIN_FLAGS = ConfigFlags(SAETrainConfig, names={"total_steps": "steps"}, defaults={"total_steps": 1000},
                          skip=("skip_init", "latent_init_scale", "skip_lr_scale"))
#: --synthetic-d-in, --synthetic-features, --synthetic-active (the seed is --seed)
SYNTHETIC_FLAGS = ConfigFlags(SyntheticConfig, only=("d_in", "n_features", "mean_active"),
                              names={"d_in": "synthetic_d_in", "n_features": "synthetic_features",
                                     "mean_active": "synthetic_active"})


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-sae",
        help="train a sparse autoencoder on an activation store (or synthetic features)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_argument_group("data")
    src.add_argument("--store", type=Path, help="activation store directory (from `workbench cache`)")
    src.add_argument("--hook", help="hook in the store to train on (default: the store's only hook)")
    src.add_argument("--synthetic", action="store_true", help="train on known sparse features instead")
    SYNTHETIC_FLAGS.add_to(src)
    SAE_FLAGS.add_to(p, title="SAE")
    tr = p.add_argument_group("training")
    tr.add_argument("--batch-size", type=int, default=ReaderConfig.batch_size,
                    help="global batch (split over torchrun processes)")
    TRAIN_FLAGS.add_to(tr)
    tr.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    tr.add_argument("--out", type=Path, help="run directory (default: $WORKBENCH_HOME/runs/sae-...)")
    tr.add_argument("--no-resume", action="store_true", help="start over even if --out holds a checkpoint")
    p.set_defaults(func=cmd_train_sae)


def cmd_train_sae(args: argparse.Namespace) -> int:
    """Train an SAE as the arguments say; print a JSON summary; return 0."""
    if bool(args.store) == bool(args.synthetic):
        raise ConfigError("give exactly one data source: --store DIR (with --hook) or --synthetic")
    recipe, train_cfg = SAE_FLAGS.build(args), TRAIN_FLAGS.build(args)
    device = local_device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    info = init_distributed(device)
    extra: dict[str, Any] = {}
    if args.synthetic:
        synthetic = SYNTHETIC_FLAGS.build(args, seed=train_cfg.seed)
        found = train_sae_on_synthetic(synthetic, recipe, train_cfg, args.out, batch_size=args.batch_size,
                                       device=device, resume=not args.no_resume)
        run, extra["mmcs"] = found.run, found.mmcs
    else:
        run = train_sae_on_store(args.store, args.hook, recipe, train_cfg, args.out,
                                 reader=ReaderConfig(batch_size=args.batch_size, seed=train_cfg.seed),
                                 device=device, resume=not args.no_resume)
    if info.rank == 0:
        print(json.dumps({**summary(run, info.world_size), **extra}, indent=2))
    destroy_distributed()
    return 0


def summary(run: SAERunResult, world_size: int) -> dict[str, Any]:
    """The JSON summary ``train-sae`` prints: where the run went, how far it got, its last metrics."""
    result = run.train
    return {
        "out": str(run.run_dir),
        "sae": str(run.sae_dir),
        "steps": result.steps,
        "tokens": result.tokens,
        "resumed_from": result.resumed_from,
        "world_size": world_size,
        **{k: v for k, v in result.last_metrics.items() if k not in ("step", "tokens")},
    }
