"""How the order of the training rows changes one transcoder: corpus order, shuffled windows, mixed steps.

    python -m benchmarks.transcoder_order [--layer 3] [--orders corpus,windows,mixed] [--lr 2e-3 4e-3]
                                          [--adam-beta2 0.999 0.99] [--epochs 2] [--decay-fraction 0]
                                          [--expansion 4 8] [--k 64 128]

Reads one layer's (MLP input, MLP output) pairs once, in corpus order, from the windows
``workbench train-transcoders`` would train on (``--tokens`` of the corpus, 32-window steps; the
recipe's fields are ``TranscoderRecipe``'s defaults with ``expansion=4, k=64, dead_tokens=100_000``,
the SmolLM2 set's shape). It keeps them in memory (float16, 2.3 GB for 1M tokens), then for each
order, learning rate and Adam beta2 trains that layer's transcoder with the settings the pipeline gives
(:func:`workbench.pipelines.transcoder_configs`) on the same rows in that order, and evaluates it
spliced into the model on the held-out windows (FVU, L0, CE loss recovered, the CE gap in nats):

- ``corpus``: the windows one after another (``--no-shuffle --mix-steps 1``, how sets were trained
  before the recipe had these fields);
- ``windows``: the windows in the recipe's seeded random order (``--mix-steps 1``);
- ``mixed``: that order, with the rows of ``--mix-steps`` steps mixed as the live trainer mixes them
  (:func:`workbench.sae.transcoders.mixed_rows`).

``--epochs`` reads the same rows again, each epoch in its own seeded order, as the recipe's ``epochs``
does; ``--decay-fraction`` replaces the pipeline's (0.3: the last 30% of the steps decay linearly to 0),
so that ``--epochs 2 --decay-fraction 0`` holds the peak learning rate for twice the recipe's steps.
``--expansion`` and ``--k`` try other widths and sparsities (every combination; default the set's 4 and 64).

Not part of ``python -m benchmarks``: it compares training recipes, not speeds, and takes minutes
(a layer's rows: ~2 min for SmolLM2's layer 3; each training ~1 min on this 2-core CPU).

Measured here with ``--orders corpus,windows,mixed --lr 2e-3 --adam-beta2 0.999`` (the recipe's beta2 then;
SmolLM2, layer 3, 1M tokens of kjv; 7 min):
held-out FVU 0.577 / 0.474 / 0.467 and CE loss recovered 0.767 / 0.870 / 0.868 (CE gap 0.034 / 0.019 /
0.019 nats). The shuffled window order does most of it; mixing four steps adds a little.

``--layer 26 --orders mixed --lr 4e-3 --expansion 4 8 --k 64 128`` (27 min; reading layer 26's rows takes
12.5 of them): CE loss recovered 0.770 / 0.759 / 0.805 / 0.790 for expansion 4 k 64 / 4 k 128 / 8 k 64 /
8 k 128 (held-out FVU 0.346 / 0.334 / 0.322 / 0.304; training 67 / 82 / 118 / 133 s). ``--layer 1 --orders
mixed --lr 4e-3 --expansion 4 8``: 0.849 / 0.873 (FVU 0.237 / 0.194; 53 / 84 s).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import torch

import workbench.pipelines as P
from workbench.sae.model import SAE
from workbench.sae.train import train_sae
from workbench.sae.transcoders import evaluate_transcoders, live_pairs, mixed_rows
from workbench.train import TrainingDivergedError
from workbench.zoo import load_model


def order_index(order: str, recipe: P.TranscoderRecipe, n_windows: int) -> torch.Tensor:
    """The rows (numbered in corpus order) each step trains on, one step after another, for ``order``."""
    rows_per_window = recipe.n_ctx - recipe.first_position
    position = torch.arange(rows_per_window)
    windows = P.window_order(dataclasses.replace(recipe, shuffle=order != "corpus"), n_windows)
    rows = (windows[:, None] * rows_per_window + position).reshape(-1)
    if order != "mixed" or recipe.mix_steps == 1:
        return rows
    b, per_group = recipe.batch_windows, recipe.batch_windows * recipe.mix_steps * rows_per_window
    parts = []
    for group, g0 in enumerate(range(0, rows.numel(), per_group)):
        chunk = rows[g0:g0 + per_group]
        steps = chunk.numel() // (b * rows_per_window)
        parts.append(chunk[mixed_rows(steps, b, rows_per_window, recipe.seed, group).reshape(-1)])
    return torch.cat(parts)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--corpus", default="kjv")
    ap.add_argument("--layer", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=1_000_000)
    ap.add_argument("--orders", default="corpus,windows,mixed")
    ap.add_argument("--lr", type=float, nargs="+", default=[2e-3])
    ap.add_argument("--adam-beta2", type=float, nargs="+", default=[P.TranscoderRecipe.adam_beta2])
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--decay-fraction", type=float, default=None,
                    help="the learning rate's decay phase (default: the pipeline's)")
    ap.add_argument("--mix-steps", type=int, default=4)
    ap.add_argument("--expansion", type=int, nargs="+", default=[4])
    ap.add_argument("--k", type=int, nargs="+", default=[64])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = load_model(args.model).eval()
    base = P.TranscoderRecipe(corpus=args.corpus, tokens=args.tokens, expansion=4, k=64, dead_tokens=100_000,
                              mix_steps=args.mix_steps, epochs=args.epochs, checkpoint_every=0)
    n_train = base.steps_per_epoch() * base.batch_windows
    windows = P.token_windows(model, base.corpus, base.n_ctx, n_train + base.eval_windows)
    t0 = time.perf_counter()
    xs, ys = [], []
    for batch in live_pairs(model, windows[:n_train], [args.layer], base.batch_windows, base.first_position):
        xs.append(batch[args.layer].x.half())
        ys.append(batch[args.layer].y.half())
    x, y = torch.cat(xs), torch.cat(ys)
    del xs, ys
    print(f"layer {args.layer}: {x.shape[0]:,} rows read in {time.perf_counter() - t0:.0f} s", flush=True)
    rows = base.rows_per_step()
    for order in args.orders.split(","):
        index = order_index(order, base, n_train)
        for lr, beta2, width, k in [(lr, beta2, width, k) for lr in args.lr for beta2 in args.adam_beta2
                                    for width in args.expansion for k in args.k]:
            recipe = dataclasses.replace(base, lr=lr, adam_beta2=beta2, expansion=width, k=k)
            shape = {"expansion": width, "k": k}
            sae_cfg, train_cfg = P.transcoder_configs(recipe, model.cfg.d_model)
            if args.decay_fraction is not None:
                train_cfg = dataclasses.replace(train_cfg, decay_fraction=args.decay_fraction)
            tc = SAE(sae_cfg, seed=recipe.seed + args.layer)

            def batches(start: int, index: torch.Tensor = index):
                for step in range(start, train_cfg.total_steps):
                    chosen = index[step * rows:(step + 1) * rows]
                    yield x[chosen].float(), y[chosen].float()

            t0 = time.perf_counter()
            try:
                result = train_sae(tc, batches, train_cfg)
            except TrainingDivergedError as exc:  # a recipe that blows up is a result here, not a crash
                print(json.dumps({"layer": args.layer, "order": order, "lr": lr, "adam_beta2": beta2, **shape,
                                  "diverged": str(exc).split(";")[0]}), flush=True)
                continue
            seconds = time.perf_counter() - t0
            [ev], _ = evaluate_transcoders(model, {args.layer: tc.eval()}, windows[n_train:],
                                           first_position=recipe.first_position)
            print(json.dumps({"layer": args.layer, "order": order, "lr": lr, "adam_beta2": beta2, **shape,
                              "epochs": recipe.epochs, "train_s": round(seconds, 1),
                              "last_train_fvu": round(result.last_metrics["fvu"], 4),
                              "fvu": round(ev.fvu, 4), "l0": round(ev.l0, 1),
                              "ce_gap": round(ev.ce_spliced - ev.ce_clean, 4),
                              "ce_loss_recovered": round(ev.ce_loss_recovered, 3)}), flush=True)


if __name__ == "__main__":
    main()
