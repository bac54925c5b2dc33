"""Dashboard responsiveness on SmolLM2 after load: a new 20-token prompt, and switching a control.

    python -m benchmarks.bench_app [--model smollm2-135m]

Drives the attention and logit-lens pages through Streamlit's AppTest (the page code the browser
runs) and counts forward passes (calls of ``HookedGPT.embed_tokens``): a new prompt must cost one
pass and answer in under 2 s; switching layer, head or position must cost none.
"""

from __future__ import annotations

import argparse
import os
import time

PROMPT = "The quick brown fox jumps over the lazy dog because it wanted to see what the farmer had left behind"
PAGES = [("attention", "attn_prompt", [("attn_layer", 7), ("attn_head", 3)]),
         ("logit-lens", "lens_prompt", [("lens_pos", 5), ("lens_k", 8)])]


def _script(url: str) -> None:
    from workbench.app.main import render_page

    render_page(url)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--quick", action="store_true", help="accepted for `python -m benchmarks --quick`")
    args = parser.parse_args(argv)
    os.environ["WORKBENCH_APP_MODEL"] = args.model
    from streamlit.testing.v1 import AppTest

    from workbench.model import HookedGPT

    passes = {"n": 0}
    embed = HookedGPT.embed_tokens

    def counting(self, *a, **k):
        passes["n"] += 1
        return embed(self, *a, **k)

    HookedGPT.embed_tokens = counting
    results = {}
    try:
        for url, prompt_key, controls in PAGES:
            at = AppTest.from_function(_script, args=(url,), default_timeout=300)
            at.run()  # loads the model (cached for the next pages) and draws the default prompt
            for i, text in enumerate([PROMPT, PROMPT.replace("fox", "cat")]):
                n0, t0 = passes["n"], time.perf_counter()
                at.text_input(key=prompt_key).set_value(text).run()
                results[f"{url} new prompt {i}"] = (time.perf_counter() - t0, passes["n"] - n0)
            for key, value in controls:
                n0, t0 = passes["n"], time.perf_counter()
                at.slider(key=key).set_value(value).run()
                results[f"{url} {key} -> {value}"] = (time.perf_counter() - t0, passes["n"] - n0)
            if at.exception:
                raise SystemExit(f"{url}: {[e.value for e in at.exception]}")
    finally:
        HookedGPT.embed_tokens = embed
    print(f"\n{args.model}, a {PROMPT.count(' ') + 1}-word prompt (20 SmolLM2 tokens), model already loaded")
    for what, (seconds, n) in results.items():
        print(f"  {what:32s} {seconds:6.2f} s   forward passes {n}")
    return results


if __name__ == "__main__":
    main()
