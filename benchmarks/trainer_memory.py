"""Where the live transcoder trainer's memory goes: resident set against live tensors, step by step.

    python -m benchmarks.trainer_memory [--layers 16] [--steps 5] [--model smollm2-135m]

Trains ``--layers`` transcoders of the SmolLM2 recipe's memory-heavy shape (expansion 4, BatchTopK k 64)
from live activations for ``--steps`` steps in a temporary directory, without the final evaluation,
while a thread samples the resident set every 50 ms and sums the live tensors (through ``gc``) every
second. It prints the resident set once the model is loaded, the training peak, the live tensors near
it, and how many heap trims the trainer's :class:`workbench.allocator.GrowthTrimmer` made and their
time. Not part of ``python -m benchmarks``: it measures
memory, not a speed ratio, and takes minutes.

Measured with it here before the recipe mixed the rows of several steps (so with ``--mix-steps 1``; 2-core
CPU, the trimmer's 1 GB margin and a queue of one batch per layer):
16 layers, training peak 4.28 GB (highest sample 4.13 GB with 2.29 GB of live tensors; 12 trims, 1.3 s);
30 layers, 7.31 GB (7.28 GB with 4.26 GB live; 26 trims, 3.5 s). Repeated runs differ by ~0.5 GB.
Before the trimmer and with a queue of two, the same measurement (an equivalent script, run on
46b012e) gave 9.14 GB for 30 layers; ``/usr/bin/time -v workbench train-transcoders smollm2-135m
--layers all --corpus kjv --k 64 --expansion 4 --dead-tokens 100000 --tokens 20320`` (with the
evaluation) peaks at 9.5 GB on 46b012e and 7.5 GB after.
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import threading
import time

import torch

import workbench.allocator as allocator
import workbench.pipelines as P
from workbench.allocator import resident_bytes
from workbench.zoo import load_model

GiB = 1 << 30


class _StopBeforeEvaluation(Exception):
    pass


def _live_tensor_bytes() -> int:
    storages = {}
    for obj in gc.get_objects():
        try:
            if isinstance(obj, torch.Tensor):
                st = obj.untyped_storage()
                storages[st.data_ptr()] = st.nbytes()
        except Exception:  # noqa: BLE001 - tensors without storage (meta, sparse views)
            continue
    return sum(storages.values())


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--layers", type=int, default=16, help="layers 0..N-1")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--mix-steps", type=int, default=P.TranscoderRecipe.mix_steps,
                    help="steps whose rows are mixed (one forward pass each group); the figures above: 1")
    args = ap.parse_args(argv)

    samples: list[tuple[float, int]] = []
    live: list[tuple[int, int]] = []
    marks: dict[str, float] = {}
    trims = {"n": 0, "seconds": 0.0}
    stop = threading.Event()

    def sample() -> None:
        i = 0
        while not stop.is_set():
            samples.append((time.perf_counter(), resident_bytes() or 0))
            i += 1
            if i % 20 == 0 and "loaded" in marks and "trained" not in marks:
                live.append((resident_bytes() or 0, _live_tensor_bytes()))
            time.sleep(0.05)

    release = allocator.release_freed_memory

    def timed_release() -> bool:
        t = time.perf_counter()
        try:
            return release()
        finally:
            trims["n"] += 1
            trims["seconds"] += time.perf_counter() - t

    def stop_before_evaluation(*_a, **_k):
        marks["trained"] = time.perf_counter()
        raise _StopBeforeEvaluation

    allocator.release_freed_memory = timed_release  # GrowthTrimmer calls it through the module
    evaluate = P.evaluate_transcoders
    P.evaluate_transcoders = stop_before_evaluation
    threading.Thread(target=sample, daemon=True).start()
    try:
        model = load_model(args.model)
        marks["loaded"] = time.perf_counter()
        recipe = P.TranscoderRecipe(corpus="kjv", k=64, expansion=4, dead_tokens=100_000, mix_steps=args.mix_steps,
                                    tokens=args.steps * P.TranscoderRecipe().rows_per_step())
        with tempfile.TemporaryDirectory() as tmp:
            try:
                P.train_transcoders(model, list(range(args.layers)), recipe, tmp, progress=False)
            except _StopBeforeEvaluation:
                pass
    finally:
        stop.set()
        allocator.release_freed_memory = release
        P.evaluate_transcoders = evaluate

    def peak(a: float, b: float) -> float:
        return max((r for t, r in samples if a <= t <= b), default=0) / GiB

    top = max(live, default=(0, 0))
    print(f"{args.model}, {args.layers} layers, {args.steps} steps")
    trained = peak(marks["loaded"], marks["trained"])
    print(f"  loaded: {peak(0, marks['loaded']):.2f} GB; training peak {trained:.2f} GB "
          f"in {marks['trained'] - marks['loaded']:.0f} s")
    print(f"  highest sampled resident set {top[0] / GiB:.2f} GB with {top[1] / GiB:.2f} GB of live tensors")
    print(f"  heap trims: {trims['n']} taking {trims['seconds']:.1f} s")


if __name__ == "__main__":
    main()
