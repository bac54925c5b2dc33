"""Head scoring and activation patching on SmolLM2-135M: batched against the naive way, as ratios in one run.

    python -m benchmarks.bench_analysis [--quick] [--repeats N]

1. Scoring every head (previous-token, duplicate-token and induction scores) on repeated random
   tokens. ``batched``: ``induction.score_heads``, one forward pass over all prompts with hooks that
   reduce each layer's pattern to scores. ``per_prompt``: TransformerLens' ``detect_head`` loop, one
   ``run_with_cache`` per prompt scoring all heads of it. ``per_head``: one forward per head and
   prompt (``induction.score_heads_naive``); with 270 heads that is too slow to repeat, so one
   such forward is timed and multiplied by heads x prompts (an extrapolation, labelled as such).
2. A full residual-stream patching sweep (every layer x position) on the IOI prompt.
   ``batched``: ``patching.patch_residual``, each layer's position variants stacked on the batch
   axis and started from the cached residual of that layer. ``naive``: one hooked forward from the
   embedding per layer and position (``patching.patch_residual_naive``, as TransformerLens'
   patching module does it).

Timings are interleaved (A B A B ...) and the median is kept, so a busy machine slows every
contender alike; ratios are naive time over batched time.
"""

from __future__ import annotations

import argparse
import time

import torch

from benchmarks import interleaved_medians
from workbench.analysis import induction as I
from workbench.analysis import patching as P
from workbench.analysis.attribution import token_id
from workbench.names import act_name

CLEAN = "When Mary and John went to the store, John gave a drink to"
CORRUPT = "When Mary and John went to the store, Mary gave a drink to"


def score_per_prompt(model, tokens: torch.Tensor) -> torch.Tensor:
    """TransformerLens' detect_head loop: one cached forward per prompt, every head scored from it."""
    names = [act_name("pattern", i) for i in range(model.cfg.n_layers)]
    out = torch.zeros(model.cfg.n_layers, model.cfg.n_heads)
    for b in range(tokens.shape[0]):
        row = tokens[b: b + 1]
        _, cache = model.run_with_cache(row, names_filter=names)
        mask = I.induction_mask(row)
        for layer, name in enumerate(names):
            out[layer] += I.masked_attention_score(cache[name], mask)
    return out / tokens.shape[0]


def bench_heads(model, batch: int, seq_len: int, repeats: int) -> dict[str, float]:
    spec = I.default_spec(model, seq_len=seq_len, batch=batch)
    tokens = I.repeated_random_tokens(spec, model.cfg.d_vocab).tokens
    L, H = model.cfg.n_layers, model.cfg.n_heads
    one = tokens[:1]
    name = act_name("pattern", L // 2)
    fns = {
        "batched": lambda: I.score_heads(model, tokens),
        "per_prompt": lambda: score_per_prompt(model, tokens),
        "one_head_forward": lambda: model.run_with_cache(one, names_filter=[name]),
    }
    # same numbers from both real contenders (the per-head path is checked against the batched one in the tests)
    torch.testing.assert_close(score_per_prompt(model, tokens), I.score_heads(model, tokens).induction,
                               atol=1e-5, rtol=1e-4)
    with torch.inference_mode():
        med = interleaved_medians(fns, repeats)
    per_head = med["one_head_forward"] * L * H * tokens.shape[0]
    print(f"\nscoring all {L}x{H} heads, {tokens.shape[0]} prompts x {tokens.shape[1]} tokens, "
          f"{torch.get_num_threads()} threads, median of {repeats}")
    print(f"  batched (one pass)            {med['batched'] * 1000:9.1f} ms")
    print(f"  per prompt (detect_head)      {med['per_prompt'] * 1000:9.1f} ms   "
          f"{med['per_prompt'] / med['batched']:6.1f}x")
    print(f"  per head and prompt (extrap.) {per_head * 1000:9.1f} ms   {per_head / med['batched']:6.1f}x   "
          f"({L * H * tokens.shape[0]} forwards of {med['one_head_forward'] * 1000:.1f} ms)")
    return {"per_prompt_over_batched": med["per_prompt"] / med["batched"],
            "per_head_over_batched_extrapolated": per_head / med["batched"]}


def bench_patching(model, repeats: int) -> dict[str, float]:
    clean, corrupt = model.to_tokens(CLEAN), model.to_tokens(CORRUPT)
    metric = P.LogitDiff(token_id(model, " Mary"), token_id(model, " John"))
    fast = P.patch_residual(model, clean, corrupt, metric)
    slow = P.patch_residual_naive(model, clean, corrupt, metric)
    torch.testing.assert_close(fast.scores, slow, atol=2e-3, rtol=1e-3)  # the same sweep, fp32 summation order
    fns = {
        "batched": lambda: P.patch_residual(model, clean, corrupt, metric),
        "naive": lambda: P.patch_residual_naive(model, clean, corrupt, metric),
    }
    with torch.inference_mode():
        med = interleaved_medians(fns, repeats, warmup=0)
    L, n = model.cfg.n_layers, clean.shape[1]
    print(f"\nresidual patching sweep, {L} layers x {n} positions = {L * n} patched runs, "
          f"{torch.get_num_threads()} threads, median of {repeats}")
    print(f"  batched, from the cached residual  {med['batched'] * 1000:9.1f} ms")
    print(f"  naive, one forward per location    {med['naive'] * 1000:9.1f} ms   {med['naive'] / med['batched']:6.1f}x")
    return {"naive_over_batched": med["naive"] / med["batched"]}


def main(argv: list[str] | None = None) -> dict:
    from workbench.zoo import load_model

    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer prompts and repeats (a smoke run)")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    repeats = args.repeats or (1 if args.quick else 3)
    torch.manual_seed(0)
    model = load_model("smollm2-135m")
    t0 = time.perf_counter()
    out = {"heads": bench_heads(model, batch=2 if args.quick else 8, seq_len=20, repeats=repeats),
           "patching": bench_patching(model, repeats)}
    print(f"\n(total {time.perf_counter() - t0:.0f} s)")
    return out


if __name__ == "__main__":
    main()
