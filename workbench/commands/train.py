"""``workbench train NAME`` (reproduce a built-in model) and ``workbench corpora`` (list corpora)."""

from __future__ import annotations

import argparse
from dataclasses import fields
from pathlib import Path

from workbench import builtin
from workbench.commands._args import ConfigFlags
from workbench.corpora import list_corpora
from workbench.errors import CheckpointError
from workbench.train import RESUMABLE_CHANGES, LMTrainConfig


class _RecipeValue:
    """The default of every training flag: the recipe's own value stands (shown as such in ``--help``).
    Not a string: argparse would parse a string default with the flag's type."""

    def __repr__(self) -> str:
        return "the recipe's"


RECIPE = _RecipeValue()

#: LMTrainConfig's fields as overrides of the recipe's training settings, each flag's type, choices and
#: help taken from the field. Not offered: snapshot_steps (the recipe's; --steps drops those past the
#: end) and device (recipes train on the CPU, with the thread count that makes them reproducible).
TRAIN_FLAGS = ConfigFlags(LMTrainConfig, skip=("snapshot_steps", "device"),
                          defaults={f.name: RECIPE for f in fields(LMTrainConfig)
                                    if f.name not in ("snapshot_steps", "device")})


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a built-in model from scratch (reproduces the shipped checkpoint)",
        description="Train a built-in model (attn-only-2l, attn-only-1l, kjv-small) with its recipe. "
        "The same seed gives the same weights on the same machine; the run directory holds the final "
        "model, metrics.jsonl, snapshots, the model card and a checkpoint to resume from. The training "
        "flags override the recipe (--steps, --lr, ... change the result; --checkpoint-every, --log-every "
        "and the evaluation flags only change what is written).",
    )
    p.add_argument("name", help="built-in model name (see `workbench train --list`)", nargs="?")
    p.add_argument("--out", type=Path, default=None, help="run directory (default: $WORKBENCH_HOME/runs/NAME)")
    p.add_argument("--resume", action="store_true", help="continue from the checkpoint in the run directory")
    p.add_argument("--list", action="store_true", help="list the built-in models and exit")
    p.add_argument("--ship", action="store_true",
                   help="when the run completes, copy it into data/models/NAME (replacing the shipped model)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    TRAIN_FLAGS.add_to(p, "training (overrides of the recipe)")
    p.set_defaults(func=_train)

    c = subparsers.add_parser("corpora", help="list the named corpora for training")
    c.set_defaults(func=_corpora)


def train_overrides(args: argparse.Namespace) -> dict:
    """Return the LMTrainConfig fields the command line sets (the rest stay the recipe's)."""
    return {f.name: getattr(args, TRAIN_FLAGS.dest(f.name)) for f in TRAIN_FLAGS.fields()
            if getattr(args, TRAIN_FLAGS.dest(f.name)) is not RECIPE}


def _train(args: argparse.Namespace) -> int:
    if args.list or not args.name:
        for recipe in builtin.RECIPES.values():
            print(f"{recipe.name:14s} {recipe.description}")
        return 0 if args.list else 2
    overrides = train_overrides(args)
    steps = overrides.pop("steps", None)
    result = builtin.train_builtin(args.name, out_dir=args.out, steps=steps, resume=args.resume,
                                   progress=not args.no_progress, train_overrides=overrides)
    print(f"trained {args.name}: step {result.step}, train loss {result.train_loss:.4f}"
          + (f", validation loss {result.val_loss:.4f}" if result.val_loss is not None else ""))
    print(f"run directory: {result.out_dir}")
    # the shipped weights are the recipe's: compare only a run whose overrides leave the weights' trajectory alone
    if steps is None and set(overrides) <= RESUMABLE_CHANGES and not args.ship:
        try:
            diff = builtin.compare_with_shipped(args.name, result.out_dir)
        except CheckpointError as exc:
            print(f"not compared with the shipped model: {exc}")
        else:
            if diff is not None:
                same = "identical to" if diff == 0 else f"max |difference| {diff:.3g} from"
                print(f"weights {same} the shipped {builtin.BUILTIN_DIR / args.name}")
    if args.ship:
        print(f"shipped to {builtin.ship(args.name, result.out_dir)}")
    return 0


def _corpora(args: argparse.Namespace) -> int:
    for info in list_corpora():
        print(f"{info.name:8s} {info.description}\n{'':8s} source: {info.source}")
    print("any other NAME: a local .txt file (one document) or .jsonl file (a 'text' field a line)")
    return 0
