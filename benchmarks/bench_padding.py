"""Ragged batches: 32 prompts of lengths 8..64 as one padded batch vs. the same prompts one at a time.

    python -m benchmarks.bench_padding [--quick] [--models attn-only-2l kjv-small smollm2-135m] [--repeats 5]
        [--device cpu] [--threads N]

Forward with cache: ``model.run_with_cache`` of the left-padded batch (``model.to_batch``'s shape:
token ids plus attention mask) against 32 calls of ``run_with_cache`` on each prompt alone, timed in
rotation (medians). attn-only-2l and kjv-small cache every hook; SmolLM2-135M caches each block's ``hook_resid_post``
(every hook of 32 x 64 positions would be ~4 GB). Before timing, the last real token's logits of
every row are checked against the prompt run alone (the max difference is printed).

The padded batch computes 32 x 64 = 2048 positions for 1,152 real tokens (56% useful), so its gain
is the per-call overhead it saves (Python, hooks, kernel launches) minus the padding it computes:
large for a small model or on a GPU, smaller for a compute-bound model on a few CPU cores. On a
busy shared CPU, several torch threads make every small op wait for a descheduled thread, which
costs the 32 separate passes far more than the one batched pass: ``--threads 1`` is the fairer
figure there.
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import interleaved_medians
from workbench.padding import gather_last, pad

N_PROMPTS, MIN_LEN, MAX_LEN = 32, 8, 64


def ragged_prompts(d_vocab: int, seed: int = 0) -> list[list[int]]:
    """Return 32 prompts of random token ids, lengths spread evenly over 8..64."""
    gen = torch.Generator().manual_seed(seed)
    lengths = torch.linspace(MIN_LEN, MAX_LEN, N_PROMPTS).round().long().tolist()
    return [torch.randint(3, d_vocab, (n,), generator=gen).tolist() for n in lengths]


def compare(name: str, repeats: int, device: str) -> dict[str, float]:
    from workbench.zoo import load_model

    model = load_model(name, device=device).eval()
    prompts = ragged_prompts(model.cfg.d_vocab)
    batch = pad(prompts, pad_id=0, padding_side="left", device=device)
    alone = [torch.tensor([p], device=device) for p in prompts]
    names = None if model.cfg.d_model <= 256 else (lambda n: n.endswith("hook_resid_post"))
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)

    def ragged_batch():
        model.run_with_cache(batch, names_filter=names)
        sync()

    def one_by_one():
        for tokens in alone:
            model.run_with_cache(tokens, names_filter=names)
        sync()

    with torch.inference_mode():
        batched_last = gather_last(model(batch), batch.attention_mask)
        alone_last = torch.cat([model(t)[:, -1] for t in alone])
        diff = (batched_last - alone_last).abs().max().item()
        med = interleaved_medians({"one_by_one": one_by_one, "ragged_batch": ragged_batch}, repeats)
    real = sum(len(p) for p in prompts)
    print(f"\n{name} on {device} ({torch.get_num_threads()} threads): {N_PROMPTS} prompts of {MIN_LEN}..{MAX_LEN} "
          f"tokens ({real} real of {batch.tokens.numel()} padded positions), run_with_cache "
          f"({'every hook' if names is None else 'hook_resid_post of each block'}), median of {repeats}")
    print(f"  last-token logits, batch vs alone: max |diff| {diff:.2e}")
    for label, seconds in med.items():
        print(f"  {label:<14} {seconds * 1e3:9.1f} ms   {med['one_by_one'] / seconds:5.2f}x one-by-one")
    return med


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="kjv-small only, 3 repeats")
    parser.add_argument("--models", nargs="+", default=["attn-only-2l", "kjv-small", "smollm2-135m"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    models, repeats = (["kjv-small"], 3) if args.quick else (args.models, args.repeats)
    for name in models:
        compare(name, repeats, args.device)


if __name__ == "__main__":
    main()
