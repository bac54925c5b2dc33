"""``workbench train-transcoders``: a transcoder for each chosen MLP of a model, trained together.

    workbench train-transcoders kjv-small --layers all                 # -> $WORKBENCH_HOME/transcoders/kjv-small
    workbench train-transcoders smollm2-135m --layers 0,3,5 --tokens 2000000 --out DIR
    workbench train-transcoders kjv-small --export-circuit-tracer DIR   # also write circuit-tracer's layout
    torchrun --nproc_per_node 2 -m workbench.cli train-transcoders kjv-small  # data-parallel (gloo on CPU)

One forward pass per step feeds every layer's trainer, so no activation store is written. The run
directory holds ``layer_L/`` (checkpoint, ``metrics.jsonl``, ``transcoder/`` in SAELens' layout) and
``set.json`` (recipe and evaluation); running the same command again resumes a killed run.
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from workbench.commands._args import ConfigFlags
from workbench.distributed import destroy_distributed, dist_info, init_distributed
from workbench.errors import InputError
from workbench.pipelines import (
    TranscoderRecipe,
    TranscoderSet,
    export_circuit_tracer,
    ship_transcoders,
    train_transcoders,
    transcoders_home,
)
from workbench.sae.model import ARCHITECTURES
from workbench.sae.transcoders import PRECISIONS, parse_layers
from workbench.zoo import load_model

#: One ``--flag`` per field of the recipe, its default and help taken from the field.
RECIPE_FLAGS = ConfigFlags(TranscoderRecipe, choices={"architecture": ARCHITECTURES, "precision": PRECISIONS,
                                                     "kl_precision": PRECISIONS})


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-transcoders",
        help="train a transcoder for every chosen MLP of a model (live activations, all layers at once)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("model", help="model name (`workbench models`) or checkpoint directory")
    p.add_argument("--layers", default="all", help="'all' or comma-separated layers such as 0,3,5 (default: all)")
    p.add_argument("--out", type=Path, default=None,
                   help="run directory (default: $WORKBENCH_HOME/transcoders/MODEL); resumed from when it holds a run")
    p.add_argument("--export-circuit-tracer", type=Path, default=None, metavar="DIR",
                   help="also write the set in circuit-tracer's layout (every layer, jumprelu/batchtopk/relu) to DIR")
    p.add_argument("--ship", action="store_true",
                   help="when done, copy the set (without checkpoints) to data/transcoders/MODEL with a card")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    RECIPE_FLAGS.add_to(p, title="recipe")
    p.set_defaults(func=cmd_train_transcoders)


def cmd_train_transcoders(args: argparse.Namespace) -> int:
    """Train, save and evaluate the set as the arguments say; print a JSON summary; return 0."""
    recipe = RECIPE_FLAGS.build(args)
    model = load_model(args.model).eval()
    layers = parse_layers(args.layers, model.cfg.n_layers)
    if args.export_circuit_tracer is not None and sorted(layers) != list(range(model.cfg.n_layers)):
        raise InputError("--export-circuit-tracer needs every layer (circuit-tracer loads one transcoder per layer); "
                         "use --layers all")
    out = args.out or transcoders_home(model.cfg.name or Path(args.model).name)
    # under torchrun each process forwards its share of every step's windows; rank 0 writes the files
    info = init_distributed("cpu")
    try:
        result = train_transcoders(model, layers, recipe, out, progress=not args.no_progress and info.rank == 0)
        if info.rank != 0:
            return 0
        return _report(args, model, recipe, out, result)
    finally:
        destroy_distributed()


def _report(args: argparse.Namespace, model, recipe: TranscoderRecipe, out: Path, result: TranscoderSet) -> int:
    """Print the run's JSON summary; export and ship the set when asked (rank 0 only)."""
    summary = {
        "out": str(out), "world_size": dist_info().world_size, "seconds": round(result.seconds, 1),
        "tokens_per_second": round(result.tokens_per_second, 1),
        "resumed": {str(k): v for k, v in result.resumed.items()},
        "per_layer": [{k: round(v, 4) if isinstance(v, float) else v for k, v in ev._asdict().items()}
                      for ev in result.per_layer],
        "whole": {k: round(v, 4) if isinstance(v, float) else v for k, v in result.whole._asdict().items()},
    }
    if args.export_circuit_tracer is not None:
        summary["circuit_tracer"] = str(export_circuit_tracer(out, args.export_circuit_tracer))
    if args.ship:
        command = reproduce_command(args.model, args.layers, recipe)
        summary["shipped"] = str(ship_transcoders(out, model.cfg.name or Path(args.model).name, command))
    print(json.dumps(summary, indent=2))
    return 0


def reproduce_command(model: str, layers: str, recipe: TranscoderRecipe) -> str:
    """The ``workbench train-transcoders`` line that trains ``recipe`` (flags only where it leaves a default)."""
    return shlex.join(["workbench", "train-transcoders", model, "--layers", layers, *RECIPE_FLAGS.argv(recipe)])
