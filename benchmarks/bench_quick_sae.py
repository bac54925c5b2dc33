"""The app's quick SAE (SAE page, "Train a quick SAE") on SmolLM2: wall time and the fraction of latents that
never fire on its store, for the page's defaults with the trainer's dead-latent window (10M tokens: AuxK never
engages in a few hundred steps) and with the quick SAE's own (``compute.quick_dead_tokens``).

    python -m benchmarks.bench_quick_sae [--model smollm2-135m] [--home DIR] [--steps 300]

Trains into ``--home`` (default: a fresh directory under /tmp with the user's model directory linked in), so the
user's runs are left alone; pass that home to ``bench_app`` (``WORKBENCH_HOME=DIR``) to time the SAE page on it.
The dead fraction is the one the page shows (``workbench.sae.features.feature_stats`` over the whole store).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--home", default="", help="workbench home to train in (default: a new one under /tmp)")
    parser.add_argument("--steps", type=int, default=300, help="training steps (the page's default: 300)")
    parser.add_argument("--tokens", type=int, default=16_384, help="tokens cached (the page's default)")
    parser.add_argument("--sizes", default="4096,2048", help="latent counts to compare (the page's default: 4096)")
    parser.add_argument("--k", type=int, default=16)
    parser.add_argument("--quick", action="store_true", help="a small run: 64 steps, 4096 tokens, one size")
    args = parser.parse_args(argv)
    if args.quick:
        args.steps, args.tokens, args.sizes = 64, 4096, "1024"
    from workbench import paths

    user_models = paths.models_dir()
    home = Path(args.home or tempfile.mkdtemp(prefix="wb-quick-sae-"))
    (home / "models").mkdir(parents=True, exist_ok=True)
    link = home / "models" / args.model
    if not link.exists() and (user_models / args.model).is_dir():
        link.symlink_to(user_models / args.model, target_is_directory=True)
    os.environ["WORKBENCH_HOME"] = str(home)

    import torch

    from workbench import load_model
    from workbench.app import choices, compute
    from workbench.sae.features import FeatureStatsConfig, feature_stats
    from workbench.sae.io import load_sae
    from workbench.store import open_store

    model = load_model(choices.model_source(args.model), progress=False)
    layer = model.cfg.n_layers // 2  # the page's default layer
    print(f"\n{args.model} layer {layer}, {args.tokens} tokens of {compute.quick_sae_corpus(args.model)}, "
          f"k={args.k}, {args.steps} steps, home {home}", flush=True)
    results = {}
    for d_sae in [int(s) for s in args.sizes.split(",")]:
        for label, dead in (("trainer's window (10M tokens)", 10_000_000), ("quick window", None)):
            t0, c0 = time.perf_counter(), time.process_time()
            out = compute.train_quick_sae(model, args.model, layer, args.tokens, d_sae, args.k, args.steps,
                                          dead_tokens=dead)
            seconds, cpu = time.perf_counter() - t0, time.process_time() - c0
            sae = load_sae(out.sae_dir)
            store = open_store(out.store_dir)
            with torch.inference_mode():
                stats = feature_stats(sae, store, f"blocks.{layer}.hook_resid_post",
                                      FeatureStatsConfig(batch_size=1024))
            window = compute.quick_dead_tokens(store.n_rows) if dead is None else dead
            results[(d_sae, label)] = (seconds, stats.dead_fraction, out.metrics)
            fvu = out.metrics.get("fvu", out.metrics.get("explained_variance"))
            print(f"  d_sae {d_sae:5d}, {label:30s} dead window {window:>10,} tokens: {seconds:6.1f} s wall, "
                  f"{cpu:6.1f} s CPU (the first run caches the store), dead {stats.dead_fraction:6.1%} of {d_sae}, "
                  f"last metrics: mse {out.metrics.get('mse', float('nan')):.4g}, fvu {fvu}", flush=True)
    return results


if __name__ == "__main__":
    main()
