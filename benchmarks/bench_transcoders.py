"""Transcoder training on this machine: pairs vs the SAE trainer, the all-layers live trainer, skip vs plain.

    python -m benchmarks.bench_transcoders [--quick] [--part pairs|batchtopk|selection|live|skip|finetune ...]

- ``pairs``: ``train_sae`` on (x, y) pairs (a TopK transcoder, with and without the skip term) beside
  ``train_sae`` on single tensors (a TopK SAE) at the same shape (d_in 576, width 4608, k 32, batch
  4096), timed interleaved with the median kept. Target: the transcoder within 1.2x of the SAE.
- ``batchtopk``: a BatchTopK skip transcoder's training step at SmolLM2's live shape (d_in 576, width
  4608, k 32, batch 4064) through the sparse kernels and through the dense ``[batch, d_sae]`` step.
- ``selection``: a BatchTopK skip transcoder's training step at the documented recipe's shape (d_in 576, width
  2304, k 64, batch 4064) with its latents chosen from an fp32 and from a bf16 encoder matmul
  (``SAETrainConfig.precision``), timed interleaved.
- ``live``: SmolLM2-135M, all 30 layers trained at once from live activations
  (``workbench.pipelines.train_transcoders``, 32 windows of 128 tokens a step, BatchTopK with skip) for a
  few steps, at the issue's shape (8x = 4608 latents, k 32) and at the documented recipe's
  (``TranscoderRecipe``'s defaults: 4x = 2304 latents, k 64), the latter in fp32 and with
  ``precision="bf16"``, each beside the forward pass that feeds it alone (``live_pairs``) on the same
  windows: tokens/s of each, the forward pass's share of the trainer's time, and the recipe's training time
  projected at each of its rates.
- ``finetune``: SmolLM2-135M, the recipe's per-layer KL fine-tune (``finetune_on_kl``, 8 windows a step) of
  the layers ``--finetune-layers`` names, the model's passes in fp32 and under bf16 autocast
  (``KLFinetuneConfig.precision``), timed interleaved: seconds a step of each and the ratio.
- ``skip``: kjv-small, every layer, TopK k 32 (so L0 is the same by construction) without the skip
  term, with it from zero, and with it from the first batch's ridge fit, on the same tokens; held-out
  FVU and CE recovered per layer.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from benchmarks import interleaved_medians
from workbench.pipelines import TranscoderRecipe, token_windows, train_transcoders
from workbench.sae.model import SAE, SAEConfig
from workbench.sae.train import TrainConfig, train_sae
from workbench.sae.transcoders import live_pairs
from workbench.zoo import load_model

#: The shape the transcoders issue names for the live trainer's throughput (width 4096 there; 8 x 576 here).
ISSUE_SHAPE = dict(expansion=8, k=32)


def pairs(quick: bool) -> None:
    d_in, d_sae, k, batch, steps = 576, 4608, 32, 4096, 3
    repeats = 2 if quick else 5
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, d_in, generator=g) for _ in range(steps)]
    ys = [torch.randn(batch, d_in, generator=g) for _ in range(steps)]
    cfg = TrainConfig(total_steps=steps, lr=1e-4, progress=False, checkpoint_every=0, log_every=steps)
    sae = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k), seed=0)
    plain = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, d_out=d_in, apply_b_dec_to_input=False),
                seed=0)
    skip = SAE(SAEConfig(d_in=d_in, d_sae=d_sae, architecture="topk", k=k, d_out=d_in, apply_b_dec_to_input=False,
                         skip=True), seed=0)
    med = interleaved_medians({
        "sae": lambda: train_sae(sae, xs, cfg),
        "transcoder": lambda: train_sae(plain, list(zip(xs, ys)), cfg),
        "skip": lambda: train_sae(skip, list(zip(xs, ys)), cfg),
    }, repeats)
    tps = {name: steps * batch / seconds for name, seconds in med.items()}
    print(f"TopK training step: d_in {d_in}, width {d_sae}, k {k}, batch {batch}, float32, torch threads "
          f"{torch.get_num_threads()}, {repeats} interleaved repeats of {steps} steps (median)")
    print(f"  SAE (x -> x)                {tps['sae']:10.0f} tokens/s")
    print(f"  transcoder (x -> y)         {tps['transcoder']:10.0f} tokens/s   time / the SAE's: "
          f"{med['transcoder'] / med['sae']:.2f} x (target <= 1.2)")
    print(f"  skip transcoder             {tps['skip']:10.0f} tokens/s   {med['skip'] / med['sae']:.2f} x")


def _skip_transcoder_steps(d_sae: int, k: int, variants: dict[str, dict], quick: bool,
                           steps: int = 3) -> dict[str, float]:
    """Median seconds of ``steps`` training steps of a BatchTopK skip transcoder (d_in 576, batch 4064, SmolLM2's
    live batch) per variant of the training settings, timed interleaved on the same random pairs."""
    d_in, batch = 576, 4064
    g = torch.Generator().manual_seed(0)
    pairs_ = [(torch.randn(batch, d_in, generator=g), torch.randn(batch, d_in, generator=g)) for _ in range(steps)]
    shape = SAEConfig(d_in=d_in, d_sae=d_sae, architecture="batchtopk", k=k, d_out=d_in, apply_b_dec_to_input=False,
                      skip=True)
    runs = {}
    for name, settings in variants.items():
        cfg = TrainConfig(total_steps=steps, lr=1e-4, progress=False, checkpoint_every=0, log_every=steps, **settings)
        tc = SAE(shape, seed=0)
        runs[name] = lambda tc=tc, cfg=cfg: train_sae(tc, pairs_, cfg)
    repeats = 2 if quick else 5
    print(f"BatchTopK skip transcoder step: d_in {d_in}, width {d_sae}, k {k}, batch {batch} (SmolLM2's live batch), "
          f"torch threads {torch.get_num_threads()}, {repeats} interleaved repeats of {steps} steps (median)")
    return {name: seconds / steps for name, seconds in interleaved_medians(runs, repeats).items()}


def batchtopk(quick: bool) -> None:
    """BatchTopK skip transcoder steps at SmolLM2's shape: the sparse kernels against the dense [batch, d_sae] step."""
    med = _skip_transcoder_steps(4608, 32, {"sparse": {}, "dense": {"sparse_batchtopk": False}}, quick)
    for name, seconds in med.items():
        print(f"  {name:6s} {4064 / seconds:10.0f} tokens/s   {seconds * 1000:8.1f} ms/step")
    print(f"  dense / sparse time: {med['dense'] / med['sparse']:.2f} x")


def selection(quick: bool) -> None:
    """The recipe shape's training step with the latents chosen from an fp32 and from a bf16 matmul."""
    med = _skip_transcoder_steps(2304, 64, {"fp32": {}, "bf16": {"precision": "bf16"}}, quick)
    print("  (the documented recipe's shape)")
    for name, seconds in med.items():
        print(f"  latents chosen in {name}: {seconds * 1000:8.1f} ms a step")
    print(f"  fp32 / bf16 time: {med['fp32'] / med['bf16']:.2f} x")


def live(quick: bool) -> None:
    try:
        model = load_model("smollm2-135m").eval()
    except Exception as exc:  # noqa: BLE001 - a machine without the model skips this part, saying why
        print(f"live: SmolLM2-135M not available ({exc}); run `make fetch`")
        return
    steps = 1 if quick else 3
    layers = list(range(model.cfg.n_layers))
    documented = TranscoderRecipe()
    shapes = (("the issue's shape", ISSUE_SHAPE), ("the documented recipe's shape", {}),
              ("the documented recipe's shape, precision bf16", {"precision": "bf16"}))
    for name, shape in shapes:
        recipe = TranscoderRecipe(**{**shape, "tokens": steps * 32 * 127, "eval_windows": 1, "checkpoint_every": 0,
                                     "calibrate_windows": 0})
        windows = token_windows(model, recipe.corpus, recipe.n_ctx, steps * recipe.batch_windows)
        t0 = time.perf_counter()
        for _ in live_pairs(model, windows, layers, recipe.batch_windows, recipe.first_position,
                            precision=recipe.precision):
            pass
        forward = time.perf_counter() - t0
        with tempfile.TemporaryDirectory() as tmp:
            result = train_transcoders(model, layers, recipe, tmp, progress=False)
        rows = steps * recipe.rows_per_step()
        print(f"SmolLM2-135M, all {len(layers)} layers from live activations, {name}: {steps} steps of "
              f"{recipe.batch_windows} x {recipe.n_ctx} tokens, width {recipe.expansion * model.cfg.d_model}, "
              f"{recipe.architecture} k {recipe.k}, skip")
        print(f"  forward pass alone (60 hooks)  {rows / forward:10.0f} tokens/s")
        print(f"  trainer (forward + 30 layers)  {result.tokens_per_second:10.0f} tokens/s (each layer sees them all)")
        print(f"  forward pass's share of the trainer's time: {forward / result.seconds:.2f}")
        if name != shapes[0][0]:
            full = documented.tokens / result.tokens_per_second
            print(f"  the documented recipe's training ({documented.tokens:,} tokens a layer) projected at this "
                  f"rate: {full / 60:.0f} min (its fine-tunes come on top; target for all of it <= 2 h)")


def finetune(quick: bool, layers: str = "24,26") -> None:
    """The per-layer KL fine-tune's step in fp32 and with the model under bf16 autocast, timed interleaved."""
    from workbench.sae.transcoders import KLFinetuneConfig, finetune_on_kl, parse_layers

    try:
        model = load_model("smollm2-135m").eval()
    except Exception as exc:  # noqa: BLE001 - a machine without the model skips this part, saying why
        print(f"finetune: SmolLM2-135M not available ({exc}); run `make fetch`")
        return
    steps, repeats = (2, 1) if quick else (3, 3)
    chosen = parse_layers(layers, model.cfg.n_layers)
    recipe = TranscoderRecipe()
    windows = token_windows(model, recipe.corpus, recipe.n_ctx, steps * recipe.kl_windows)
    shape = SAEConfig(d_in=model.cfg.d_model, d_sae=recipe.expansion * model.cfg.d_model, architecture="batchtopk",
                      k=recipe.k, d_out=model.cfg.d_model, apply_b_dec_to_input=False, skip=True)
    start = {layer: SAE(shape, seed=layer) for layer in chosen}  # the step's cost does not depend on the weights
    runs = {precision: lambda precision=precision: finetune_on_kl(model, start, windows, KLFinetuneConfig(
        steps, recipe.kl_windows, recipe.kl_lr, first_position=recipe.first_position, precision=precision))
        for precision in ("fp32", "bf16")}
    med = interleaved_medians(runs, repeats)
    print(f"SmolLM2-135M per-layer KL fine-tune of layers {layers}: {recipe.kl_windows} windows of {recipe.n_ctx} "
          f"tokens a step, {repeats} interleaved repeats of {steps} steps (median), torch threads "
          f"{torch.get_num_threads()}")
    for name, seconds in med.items():
        print(f"  model in {name}: {seconds / steps:6.2f} s a step")
    print(f"  fp32 / bf16 time: {med['fp32'] / med['bf16']:.2f} x")


def skip(quick: bool) -> None:
    model = load_model("kjv-small").eval()
    tokens = 100_000 if quick else 400_000
    variants = {"plain": dict(skip=False), "skip, W_skip from 0": dict(skip=True, skip_init="zero"),
                "skip, ridge init": dict(skip=True, skip_init="ridge")}
    results = {}
    for name, kw in variants.items():
        recipe = TranscoderRecipe(tokens=tokens, architecture="topk", k=32, eval_windows=32, **kw)
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = train_transcoders(model, list(range(model.cfg.n_layers)), recipe, tmp, progress=False)
    print(f"kjv-small, every layer, TopK k 32 (L0 32 by construction), {tokens:,} tokens, "
          "the same held-out 32 windows; "
          f"every variant's encoder starts scaled (latent_init_scale {TranscoderRecipe.latent_init_scale}):")
    print("  layer   " + "   ".join(f"FVU {name}" for name in variants) + "   |   CE recovered, same order")
    for evs in zip(*(res.per_layer for res in results.values())):
        print(f"  {evs[0].layer:5d}   " + "   ".join(f"{ev.fvu:.4f}" for ev in evs) + "   |   "
              + "   ".join(f"{ev.ce_loss_recovered:.3f}" for ev in evs))
    for name, res in results.items():
        print(f"  every MLP replaced ({name}): CE {res.whole.ce_replaced:.4f} vs {res.whole.ce_clean:.4f}, "
              f"top-1 agreement {res.whole.top1_agreement:.3f}")


PARTS = {"pairs": pairs, "batchtopk": batchtopk, "selection": selection, "live": live, "skip": skip,
         "finetune": finetune}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and steps")
    parser.add_argument("--part", action="append", choices=sorted(PARTS), help="run only these parts (default: all)")
    parser.add_argument("--finetune-layers", default="24,26", help="the layers the finetune part fine-tunes")
    args = parser.parse_args(argv)
    for name in args.part or list(PARTS):
        if name == "finetune":
            finetune(args.quick, args.finetune_layers)
        else:
            PARTS[name](args.quick)


if __name__ == "__main__":
    main()
