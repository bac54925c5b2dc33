"""Dashboard responsiveness on SmolLM2 after load: every page's time to first result, a new 20-token prompt,
and the page's controls switched one at a time.

    python -m benchmarks.bench_app [--model smollm2-135m] [--pages attention,logit-lens]

Drives each page of ``workbench.app.main.PAGES`` through Streamlit's AppTest (the page code the browser runs)
and counts forward passes (calls of ``HookedGPT.embed_tokens``): a new prompt must cost one pass; switching a
layer, head or position must cost none. It also records when each run showed a progress indicator (a spinner,
``st.progress`` or ``st.status``): a run that goes more than :data:`BLOCK_S` seconds with none is printed as a
problem (the browser would show nothing but Streamlit's small "Running" badge). Background jobs (a patching
sweep SmolLM2 only runs on a click, the quick SAE) show their own progress panel; their length is not part of
these figures. The SAE page draws features only when the runs directory holds an SAE for the model
(``python -m benchmarks.bench_quick_sae`` trains one).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import time

PROMPT = "The quick brown fox jumps over the lazy dog because it wanted to see what the farmer had left behind"
#: the longest a run may go without a progress indicator (seconds; the issue's bound)
BLOCK_S = 5.0
#: page url -> (its prompt box key or None, [(widget kind, key, value)] switched one at a time; a button's value
#: is ignored). Pages of ``main.PAGES`` missing here are timed to their first result only.
PAGES: dict[str, tuple[str | None, list[tuple[str, str, object]]]] = {
    "tokenizer": ("tok_prompt", []),
    "embeddings": (None, [("radio", "emb_method", "tsne"), ("slider", "emb_k", 20)]),
    "positions": (None, [("slider", "pos_n", 32)]),
    "sampling": ("samp_prompt", [("slider", "samp_t", 0.5), ("slider", "samp_k", 10), ("button", "samp_go", None)]),
    "architecture": (None, [("radio", "arch_scale", "linear")]),
    "attention": ("attn_prompt", [("slider", "attn_layer", 7), ("slider", "attn_head", 3)]),
    "induction": (None, [("slider", "ind_len", 10)]),
    "logit-lens": ("lens_prompt", [("slider", "lens_pos", 5), ("slider", "lens_k", 8)]),
    "attribution": ("attr_prompt", [("radio", "attr_granularity", "Heads"),
                                    ("text_input", "attr_corrupt", PROMPT.replace("fox", "dog")),
                                    ("button", "attr_patch_go", None)]),
    "sae": (None, [("slider", "sae_feature", 1), ("button", "steer_go", None)]),
    "superposition": (None, [("slider", "sup_sparsity", 0.8)]),
    "probes": (None, [("button", "probe_go", None), ("slider", "probe_layer", 3), ("slider", "steer_mult", 2.0)]),
    "dynamics": (None, []),
    "bpe": (None, [("slider", "bpe_merges", 100), ("slider", "bpe_step", 10)]),
    "attention-scratch": (None, [("slider", "scratch_layer", 3), ("slider", "scratch_head", 2)]),
    "orthogonal": (None, [("slider", "orth_n", 100)]),
    "kv-cache": (None, [("slider", "kv_step", 3), ("button", "kv_measure", None)]),
    "architecture-live": (None, [("selectbox", "archlive_block", 5)]),
}


def _script(url: str) -> None:
    from workbench.app.main import render_page

    render_page(url)


def _widget(at, kind: str, key: str):
    try:
        return getattr(at, kind)(key=key)
    except KeyError:
        return None


class _Indicators:
    """Record how much of a run the page covered with a progress indicator: time inside ``st.spinner`` blocks,
    and everything after the first ``st.progress``/``st.status`` (a bar stays up while its work goes on)."""

    def __init__(self) -> None:
        self.start = 0.0
        self.covered = 0.0
        self.bar_since: float | None = None

    def begin(self) -> None:
        self.start, self.covered, self.bar_since = time.perf_counter(), 0.0, None

    def uncovered(self) -> float:
        end = time.perf_counter()
        bar = end - self.bar_since if self.bar_since is not None else 0.0
        return max(0.0, end - self.start - self.covered - bar)

    def install(self) -> contextlib.ExitStack:
        import streamlit as st
        from streamlit.delta_generator import DeltaGenerator

        stack = contextlib.ExitStack()
        spinner, progress, status = st.spinner, st.progress, st.status
        dg_progress = DeltaGenerator.progress

        @contextlib.contextmanager
        def timed_spinner(*a, **k):
            t0 = time.perf_counter()
            try:
                with spinner(*a, **k):
                    yield
            finally:
                if self.bar_since is None:
                    self.covered += time.perf_counter() - t0

        def bar(fn):
            def shown(*a, **k):
                if self.bar_since is None:
                    self.bar_since = time.perf_counter()
                return fn(*a, **k)
            return shown

        for obj, name, new in ((st, "spinner", timed_spinner), (st, "progress", bar(progress)),
                               (st, "status", bar(status)), (DeltaGenerator, "progress", bar(dg_progress))):
            old = getattr(obj, name)
            setattr(obj, name, new)
            stack.callback(setattr, obj, name, old)
        return stack


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--pages", default="", help="comma-separated page urls (default: every page of the app)")
    parser.add_argument("--quick", action="store_true", help="accepted for `python -m benchmarks --quick`")
    args = parser.parse_args(argv)
    os.environ["WORKBENCH_APP_MODEL"] = args.model
    import logging

    from streamlit.testing.v1 import AppTest

    logging.getLogger("streamlit").setLevel(logging.ERROR)  # AppTest's "missing ScriptRunContext" notes

    from workbench.app.main import PAGES as APP_PAGES
    from workbench.model import HookedGPT

    passes = {"n": 0}
    embed = HookedGPT.embed_tokens

    def counting(self, *a, **k):
        passes["n"] += 1
        return embed(self, *a, **k)

    wanted = [p for p in args.pages.split(",") if p] or [p.url for p in APP_PAGES]
    HookedGPT.embed_tokens = counting
    shown = _Indicators()
    #: row -> (seconds, forward passes, seconds without a progress indicator)
    results: dict[str, tuple[float, int, float]] = {}
    problems: list[str] = []

    def timed(row: str, run) -> None:
        n0 = passes["n"]
        shown.begin()
        t0 = time.perf_counter()
        run()
        results[row] = (time.perf_counter() - t0, passes["n"] - n0, shown.uncovered())
        print(f"  {row:44s} {results[row][0]:6.2f} s   passes {results[row][1]:3d}   "
              f"no indicator {results[row][2]:5.2f} s", flush=True)

    print(f"\n{args.model}, a {PROMPT.count(' ') + 1}-word prompt (20 SmolLM2 tokens); {os.cpu_count()} CPUs, load "
          f"average {os.getloadavg()[0]:.1f} (a shared machine stretches every figure)", flush=True)
    with shown.install():
        try:
            timed("load the model", AppTest.from_function(_script, args=("architecture",), default_timeout=900).run)
            for url in wanted:
                prompt_key, controls = PAGES.get(url, (None, []))
                at = AppTest.from_function(_script, args=(url,), default_timeout=900)
                timed(f"{url}: first result", at.run)  # the page's default inputs
                if prompt_key and _widget(at, "text_input", prompt_key) is not None:
                    for i, text in enumerate([PROMPT, PROMPT.replace("fox", "cat")]):
                        timed(f"{url}: new prompt {i}", at.text_input(key=prompt_key).set_value(text).run)
                for kind, key, value in controls:
                    w = _widget(at, kind, key)
                    if w is None:
                        problems.append(f"{url}: no {kind} {key!r} on the page (it may need an SAE, a tokenizer, ...)")
                        continue
                    try:
                        if kind == "button":
                            timed(f"{url}: press {key}", lambda: w.click().run())
                        else:
                            timed(f"{url}: {key} -> {value}", lambda: w.set_value(value).run())
                    except ValueError as exc:  # a value this model's control does not offer
                        problems.append(f"{url}: {key} -> {value}: {exc}")
                if at.exception:
                    problems.append(f"{url}: {[e.value[:300] for e in at.exception]}")
                problems += [f"{url}: error box: {e.value[:200]}" for e in at.error]
        finally:
            HookedGPT.embed_tokens = embed
    slow = [(row, r) for row, r in results.items() if r[2] > BLOCK_S]
    problems += [f"{row}: {r[2]:.1f} s of its {r[0]:.1f} s without a progress indicator" for row, r in slow]
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")
    print(f"{len(results)} runs on {args.model}; the slowest: "
          + ", ".join(f"{row} {r[0]:.1f} s" for row, r in sorted(results.items(), key=lambda x: -x[1][0])[:5]))
    for p in problems:
        print(f"  problem: {p}")
    return results


if __name__ == "__main__":
    main()
