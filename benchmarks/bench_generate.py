"""SmolLM2-135M: generation tokens/s, cache-all prefill and load times, against HF transformers, in one run.

    python -m benchmarks.bench_generate [--quick] [--new-tokens 128] [--repeats 3] [--parts decode prefill load]

- decode: batch 1, greedy, N new tokens (no stop token) from a short prompt; HF ``generate`` on the
  model HF's own GGUF loader builds from the same file, vs. ``workbench.generate`` in float32 and
  in bfloat16. Interleaved repeats, medians.
- prefill: 4 x 256 tokens, HF's plain forward vs. the workbench's forward and its run_with_cache of
  every hook point.
- load: the first load of a fresh cache (dequantize the GGUF, write the native copy) vs. a second
  load (read the native copy), in a temporary WORKBENCH_HOME.

Decoding reads every weight once per token: fp32 SmolLM2 is 538 MB, so memory bandwidth bounds it.
The ``*_ceiling`` lines time only those reads: through torch's batch-1 ``F.linear`` (one core here),
through ``workbench.model.linear`` (the rows split over the threads, what the forward pass uses at
decode) and through a plain sum of every matrix (the streaming rate of all cores: no matrix-vector
kernel beats it). The gap between a ceiling and the real decode is per-token overhead: norms, rotary,
attention over the cache and about 80 small torch calls per layer.

Caching every hook keeps ~1.8 GB of fresh activations per 4 x 256 call. With glibc's default malloc
those blocks go back to the kernel when freed, so each call page-faults them in again (the prefill
lines print the minor page faults of one call); the benchmarks run with freed memory kept in the
process (``workbench.allocator``, as the workbench command and the app do), for HF and the workbench
alike. ``WORKBENCH_KEEP_FREED_MEMORY=0 python -m benchmarks.bench_generate --parts prefill`` shows
glibc's defaults.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable

import torch

from benchmarks import KEEPS_FREED_MEMORY, interleaved_medians

os.environ.setdefault("HF_HUB_OFFLINE", "1")
PROMPT = "The history of the printing press begins"
PARTS = ["decode", "prefill", "load"]


def _hf_smollm2():
    import transformers

    from workbench import zoo

    path = zoo.source_path(zoo.SMOLLM2)
    if not path.is_file():
        raise SystemExit(f"{path} is missing: run `workbench fetch smollm2-135m` first")
    hf = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    return hf, tok


def _weight_matrices(model) -> list[torch.Tensor]:
    """Return every weight matrix a decode step reads, in the ``[out in]`` layout the forward pass uses."""
    flat = []
    for block in model.blocks:
        attn, mlp = block.attn, block.mlp
        flat += [W.transpose(1, 2).reshape(-1, model.cfg.d_model) for W in (attn.W_Q, attn.W_K, attn.W_V)]
        flat.append(attn.W_O.permute(2, 0, 1).reshape(model.cfg.d_model, -1))
        flat += [W.T for W in (mlp.W_gate, mlp.W_in, mlp.W_out) if W is not None]
    flat.append(model.unembed.W_U.T)
    return flat


def _ceiling(model, product: Callable | None) -> Callable[[], None]:
    """Return a function doing one decode step's weight reads and nothing else.

    ``product`` (e.g. ``F.linear``) multiplies a batch-1 input by every weight matrix: the most
    tokens/s an implementation built on that kernel can reach in the model's dtype (attention, norms
    and Python overhead come on top). ``None`` only sums every matrix, which reads the same bytes at
    the machine's streaming rate on all threads: the cap for any matrix-vector kernel."""
    flat = _weight_matrices(model)
    inputs = {n: torch.randn(1, 1, n, dtype=flat[0].dtype) for n in {f.shape[1] for f in flat}}

    def run():
        for f in flat:
            product(inputs[f.shape[1]], f) if product is not None else f.sum()

    return run


def decode(new_tokens: int, repeats: int) -> dict[str, float]:
    """Return tokens/s of HF generate and workbench generate (fp32, bf16), greedy, batch 1."""
    from workbench import load_model
    from workbench.generate import generate
    from workbench.model import linear

    hf, tok = _hf_smollm2()
    wb = load_model("smollm2-135m")
    wb_bf16 = load_model("smollm2-135m", dtype=torch.bfloat16)
    ids = wb.to_tokens(PROMPT)
    assert torch.equal(ids, tok(PROMPT, return_tensors="pt").input_ids), "tokenizers disagree"

    def hf_generate():
        return hf.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tok.eos_token_id)

    outs = {}
    fns = {
        "hf_generate_fp32": lambda: outs.__setitem__("hf", hf_generate()),
        "wb_generate_fp32": lambda: outs.__setitem__("wb", generate(wb, ids, new_tokens, stop_tokens=[]).tokens),
        "wb_generate_bf16": lambda: generate(wb_bf16, ids, new_tokens, stop_tokens=[]),
    }
    ceilings = {
        "F.linear_ceiling_fp32": _ceiling(wb, torch.nn.functional.linear),
        "wb.linear_ceiling_fp32": _ceiling(wb, linear),
        "read_ceiling_fp32": _ceiling(wb, None),
        "F.linear_ceiling_bf16": _ceiling(wb_bf16, torch.nn.functional.linear),
    }
    for name, one_pass in ceilings.items():  # timed as new_tokens passes, so the rates compare directly
        fns[name] = lambda one_pass=one_pass: [one_pass() for _ in range(new_tokens)]
    with torch.inference_mode():
        med = interleaved_medians(fns, repeats)
    same = int((outs["hf"][0, ids.shape[1]:] == outs["wb"][0, ids.shape[1]:]).cumprod(0).sum())
    print(f"\ndecode: SmolLM2-135M, batch 1, greedy, {new_tokens} new tokens, {torch.get_num_threads()} threads, "
          f"median of {repeats}")
    base = new_tokens / med["hf_generate_fp32"]
    rates = {}
    for name, seconds in med.items():
        rates[name] = new_tokens / seconds
        print(f"  {name:22s} {rates[name]:7.1f} tokens/s   {rates[name] / base:5.2f}x HF")
    print(f"  greedy tokens identical to HF's for the first {same} of {new_tokens}\n"
          "  *_ceiling: per token only one batch-1 product with every weight matrix (F.linear: torch's kernel; "
          "wb.linear: the workbench's split one), or only a sum over them (read: the machine's streaming rate)")
    return rates


def prefill(repeats: int, batch: int = 4, pos: int = 256) -> dict[str, float]:
    """Return HF forward, workbench forward and run_with_cache (every hook) times relative to HF."""
    from workbench import load_model

    hf, _ = _hf_smollm2()
    wb = load_model("smollm2-135m")
    tokens = torch.randint(0, wb.cfg.d_vocab, (batch, pos), generator=torch.Generator().manual_seed(0))
    fns = {
        "hf_forward": lambda: hf(tokens),
        "wb_forward": lambda: wb(tokens),
        "wb_cache_all": lambda: wb.run_with_cache(tokens),
    }
    with torch.inference_mode():
        med = interleaved_medians(fns, repeats)
        faults = {}  # minor page faults of one more call each: memory the kernel had to map and zero anew
        for name, fn in fns.items():
            before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            fn()
            faults[name] = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    allocator = "freed memory kept (workbench.allocator)" if KEEPS_FREED_MEMORY else "glibc's default malloc"
    print(f"\nprefill: SmolLM2-135M, {batch} x {pos}, fp32, median of {repeats}, {allocator}")
    for name, seconds in med.items():
        print(f"  {name:14s} {seconds * 1000:8.1f} ms   {seconds / med['hf_forward']:5.2f}x HF forward   "
              f"{faults[name]:8d} page faults")
    return {name: seconds / med["hf_forward"] for name, seconds in med.items()}


def load_times() -> dict[str, float]:
    """Return seconds for a first load (convert the GGUF) and a second load (native copy), fresh home."""
    from workbench import paths, zoo

    src = zoo.source_path(zoo.SMOLLM2)
    old = os.environ.get("WORKBENCH_HOME")
    with tempfile.TemporaryDirectory() as home:
        os.environ["WORKBENCH_HOME"] = home
        try:
            shutil.copyfile(src, paths.downloads_dir() / src.name)  # as if fetched: no network in the timing
            t0 = time.perf_counter()
            zoo.load_model("smollm2-135m", progress=False)
            first = time.perf_counter() - t0
            seconds = []
            for _ in range(3):
                t0 = time.perf_counter()
                zoo.load_model("smollm2-135m", progress=False)
                seconds.append(time.perf_counter() - t0)
            second = statistics.median(seconds)
        finally:
            if old is None:
                os.environ.pop("WORKBENCH_HOME", None)
            else:
                os.environ["WORKBENCH_HOME"] = old
    print(f"\nload: first (verify + dequantize + write native copy) {first:.2f} s, "
          f"later (native safetensors) {second:.2f} s: {first / second:.1f}x faster")
    return {"first_s": first, "second_s": second}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="16 new tokens, 1 repeat (a smoke run)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=PARTS, help="which parts to run (default: all)")
    args = parser.parse_args(argv)
    new, repeats = (16, 1) if args.quick else (args.new_tokens, args.repeats)
    run = {"decode": lambda: decode(new, repeats), "prefill": lambda: prefill(repeats), "load": load_times}
    return {part: run[part]() for part in args.parts}


if __name__ == "__main__":
    main()
