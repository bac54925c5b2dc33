"""Activation-store write throughput against forward-only throughput, as ratios in one run.

    python -m benchmarks.bench_store [--quick] [--model smollm2-135m]

The store's job is a forward pass up to the last hook it needs plus writing the activations
(cast, NaN check, checksum, fsync, rename). Its throughput (tokens/s) is compared with

- ``forward_to_layer``: the same forward pass, stopped at the same layer, writing nothing (the
  floor: what caching cannot avoid), and
- ``forward_full``: a plain full forward pass (what a cacher that ignores ``stop_at_layer`` pays).

Timings are interleaved (A B C A B C ...) and the median is kept, so a busy machine slows every
contender alike. Target: store >= 0.85 x forward_to_layer.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

import torch

from benchmarks import interleaved_medians
from workbench.model import GPTConfig, HookedGPT
from workbench.store import StoreConfig, stop_layer, write_store


def run(model: HookedGPT, hooks: tuple[str, ...], n_windows: int, n_ctx: int, batch: int, dtype: str,
        repeats: int) -> dict[str, float]:
    windows = torch.randint(0, model.cfg.d_vocab, (n_windows, n_ctx), generator=torch.Generator().manual_seed(0))
    stop = stop_layer(hooks)
    root = Path(tempfile.mkdtemp(prefix="bench_store_"))
    cfg = StoreConfig(hooks=hooks, dtype=dtype, batch_windows=batch, shard_tokens=batch * n_ctx * 4)
    counter = [0]

    def store() -> None:
        counter[0] += 1
        out = root / f"s{counter[0]}"
        write_store(model, windows, out, cfg)
        shutil.rmtree(out)

    @torch.no_grad()
    def forward_to_layer() -> None:
        for b0 in range(0, n_windows, batch):
            tokens = windows[b0 : b0 + batch]
            if stop is None:
                model(tokens)
            else:
                model.run_blocks(model.embed_tokens(model.check_tokens(tokens)), stop=stop)

    @torch.no_grad()
    def forward_full() -> None:
        for b0 in range(0, n_windows, batch):
            model(windows[b0 : b0 + batch])

    try:
        med = interleaved_medians(
            {"store": store, "forward_to_layer": forward_to_layer, "forward_full": forward_full}, repeats
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n_tokens = n_windows * n_ctx
    return {k: n_tokens / v for k, v in med.items()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller run (seconds)")
    parser.add_argument("--model", default=None, help="a zoo model instead of the random 8-layer GPT-2-style model")
    parser.add_argument("--layer", type=int, default=None, help="hook layer (default: the middle)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    args = parser.parse_args(argv)

    if args.model:
        from workbench.zoo import load_model

        model = load_model(args.model)
        label = args.model
    else:
        cfg = GPTConfig(d_model=512, n_layers=8, n_heads=8, d_head=64, d_mlp=2048, d_vocab=8192, n_ctx=256)
        torch.manual_seed(0)
        model = HookedGPT(cfg).eval()
        label = "random GPT-2-style d512 L8"
    layer = args.layer if args.layer is not None else model.cfg.n_layers // 2
    hooks = (f"blocks.{layer}.hook_resid_post", f"blocks.{layer}.mlp.hook_post")
    n_windows, n_ctx, repeats = (16, 128, 3) if args.quick else (64, 128, 5)
    tps = run(model, hooks, n_windows, n_ctx, batch=8, dtype=args.dtype, repeats=repeats)
    print(f"activation store vs forward: {label}, hooks {', '.join(hooks)}, {args.dtype}, "
          f"{n_windows}x{n_ctx} tokens, torch threads {torch.get_num_threads()}")
    for name, value in tps.items():
        print(f"  {name:18s} {value:10.0f} tokens/s")
    ratio = tps["store"] / tps["forward_to_layer"]
    print(f"  store / forward_to_layer = {ratio:.3f}  (target >= 0.85)")
    print(f"  store / forward_full     = {tps['store'] / tps['forward_full']:.3f}")


if __name__ == "__main__":
    main()
