"""Logit lens and tuned lens on the small KJV language model and SmolLM2-135M, held out.

    python analyses/logit_lens.py [--models kjv-small smollm2-135m] [--out DIR]

For each model:

1. the logit lens on a prompt: the residual stream entering every block, decoded through the final
   norm and the unembedding (top token, probability of the actual next token, KL to the output);
2. a tuned lens (Belrose et al. 2023): one affine translator per block, initialised to the
   identity and trained on cached residuals of corpus windows to minimise KL(final output || lens),
   each layer keeping its translator only where it beats the identity on a validation split;
3. held-out KL(final || lens) per layer, logit lens beside tuned lens, on windows that neither the
   training nor the validation saw; and the tuned lens on the same prompt.

The small text LM is ``kjv-small`` (trained by the project on the King James Bible); if its
checkpoint is not shipped in data/models yet, the script says so and goes on with the others.
SmolLM2's 49152-token vocabulary makes every decoded layer cost a large matmul, so its lens is
trained briefly (60 steps) on the KL over the batch's 1024 likeliest tokens (``--vocab``; evaluation is always
over the whole vocabulary). Output: ``report.html`` and ``report.json`` in ``--out`` (default
``$WORKBENCH_HOME/runs/reports/logit-lens``); the trained lenses are saved beside them. A few
minutes on a laptop CPU.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))  # analyses/_common.py

from _common import log, study_models  # noqa: E402

from workbench import plots  # noqa: E402
from workbench.analysis import logit_lens as LL  # noqa: E402
from workbench.pipelines import token_windows  # noqa: E402
from workbench.report import Report, report_dir  # noqa: E402


@dataclass(frozen=True)
class Plan:
    """How each model is studied: corpus, prompt and a training budget that fits a laptop CPU."""

    corpus: str
    prompt: str
    n_ctx: int
    train_windows: int
    held_out: int
    lens: LL.TunedLensConfig


PLANS = {
    "kjv-small": Plan("kjv", "And God said unto Moses, I AM THAT I AM: and he said, Thus shalt thou say unto the",
                      n_ctx=64, train_windows=512, held_out=64,
                      lens=LL.TunedLensConfig(steps=300, lr=1e-3, batch_size=16, eval_every=50, val_fraction=0.1)),
    "smollm2-135m": Plan("pydocs", "The Python interpreter reads a file and executes the statements in it. A module is",
                         n_ctx=32, train_windows=82, held_out=4,
                         lens=LL.TunedLensConfig(steps=60, lr=3e-3, batch_size=4, eval_every=60, val_fraction=2 / 82,
                                                 vocab=1024)),
}
DEFAULT_PLAN = PLANS["kjv-small"]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=list(PLANS), help="zoo names or checkpoint paths")
    p.add_argument("--steps", type=int, default=None, help="override every model's training steps")
    p.add_argument("--vocab", type=int, default=None, help="override the training vocabulary restriction (0: none)")
    p.add_argument("--out", default=None, help="report directory (default $WORKBENCH_HOME/runs/reports/logit-lens)")
    return p.parse_args(argv)


def study(name: str, model, plan: Plan, args: argparse.Namespace, out: Path, report: Report) -> dict:
    lens_cfg = plan.lens
    if args.steps is not None:
        lens_cfg = LL.TunedLensConfig(**{**lens_cfg.__dict__, "steps": args.steps, "eval_every": args.steps})
    if args.vocab is not None:
        lens_cfg = LL.TunedLensConfig(**{**lens_cfg.__dict__, "vocab": args.vocab or None})
    tokens = model.to_tokens(plan.prompt)
    strs = model.to_str_tokens(tokens[0])
    decode = lambda ids: model.to_string(ids)  # noqa: E731
    logit = LL.logit_lens(model, tokens)

    n_ctx = min(plan.n_ctx, model.cfg.n_ctx)
    windows = token_windows(model, plan.corpus, n_ctx, plan.train_windows + plan.held_out)
    train, held = windows[: plan.train_windows], windows[plan.train_windows:]
    log(f"{name}: training a tuned lens on {len(train)} windows of {n_ctx} tokens of {plan.corpus} "
        f"({lens_cfg.steps} steps of {lens_cfg.batch_size}, vocabulary {lens_cfg.vocab or 'all'})")
    t0 = time.perf_counter()
    trained = LL.train_tuned_lens(model, train, lens_cfg)
    train_s = time.perf_counter() - t0
    lens_dir = trained.lens.save(out / f"tuned-lens-{Path(name).name}")
    t0 = time.perf_counter()
    cmp = LL.compare_lenses(model, trained.lens, held)
    eval_s = time.perf_counter() - t0
    log(f"{name}: trained in {train_s:.0f}s, evaluated {len(held)} held-out windows in {eval_s:.0f}s; "
        f"mean KL logit lens {float(cmp.logit_kl.mean()):.3f}, tuned lens {float(cmp.tuned_kl.mean()):.3f}")
    tuned = LL.tuned_lens(model, trained.lens, tokens)
    better = (cmp.tuned_kl <= cmp.logit_kl + 1e-6)

    report.heading(name)
    report.text(f"Prompt: {plan.prompt!r}. Each row decodes the residual stream entering that block; the last row "
                "is the model's output.")
    report.figure(plots.lens_grid(logit, strs, "top_prob", tokenizer_decode=decode,
                                  title=f"{name}: logit lens, top token and its probability"))
    report.figure(plots.lens_grid(logit, strs, "kl_to_final", title=f"{name}: logit lens, KL(final || lens)"))
    report.text(f"Tuned lens trained for {lens_cfg.steps} steps of {lens_cfg.batch_size} windows of {n_ctx} tokens of "
                f"{plan.corpus} ({train_s:.0f} s; KL over {lens_cfg.vocab or 'all'} tokens while training); "
                f"translators kept at the identity after validation: {trained.reset_layers or 'none'}. "
                f"Held out ({len(held)} windows): mean KL {float(cmp.logit_kl.mean()):.3f} nats for the logit lens, "
                f"{float(cmp.tuned_kl.mean()):.3f} for the tuned lens; tuned <= logit at "
                f"{int(better.sum())} of {len(better)} layers.")
    report.figure(plots.lens_kl_figure(cmp, title=f"{name}: held-out KL(final || lens) by layer"))
    report.table([{"layer": lbl, "logit lens KL": a, "tuned lens KL": b}
                  for lbl, a, b in zip(cmp.labels, cmp.logit_kl.tolist(), cmp.tuned_kl.tolist())],
                 caption=f"{name}: held-out KL per layer (nats)")
    report.figure(plots.lens_grid(tuned, strs, "top_prob", tokenizer_decode=decode,
                                  title=f"{name}: tuned lens, top token and its probability"))
    last = -1
    return {
        "prompt": plan.prompt, "str_tokens": strs, "corpus": plan.corpus, "n_ctx": n_ctx,
        "train_windows": len(train), "held_out_windows": len(held), "lens_config": lens_cfg.__dict__,
        "train_seconds": train_s, "lens_dir": lens_dir, "layers": cmp.labels,
        "held_out_logit_kl": cmp.logit_kl, "held_out_tuned_kl": cmp.tuned_kl,
        "tuned_at_most_logit_every_layer": bool(better.all()),
        "validation_logit_kl": trained.val_kl_logit, "validation_tuned_kl": trained.val_kl_tuned,
        "reset_layers": trained.reset_layers, "train_losses": trained.losses,
        "prompt_logit_lens_kl_last_position": logit.kl_to_final[:, 0, last],
        "prompt_tuned_lens_kl_last_position": tuned.kl_to_final[:, 0, last],
        "prompt_top_token_last_position": {
            "logit": [decode([int(t)]) for t in logit.top_tokens[:, 0, last, 0]],
            "tuned": [decode([int(t)]) for t in tuned.top_tokens[:, 0, last, 0]],
        },
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.manual_seed(0)
    out = Path(args.out) if args.out else report_dir("logit-lens")
    report = Report("Logit lens and tuned lens, held out")
    report.text(__doc__.split("\n\n", 2)[2].split("The small text LM")[0])
    return study_models(report, args.models,
                        lambda name, model: study(name, model, PLANS.get(name, DEFAULT_PLAN), args, out, report), out)


if __name__ == "__main__":
    main()
