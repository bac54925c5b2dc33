"""Analysis subcommands: induction heads, logit and tuned lens, direct logit attribution, patching.

    workbench induction attn-only-2l                              # head scores, losses, top heads
    workbench lens smollm2-135m "The capital of France is"        # top tokens per layer at one position
    workbench tuned-lens train kjv-small --corpus kjv --out DIR   # train, save, evaluate held out
    workbench tuned-lens eval kjv-small DIR --corpus kjv
    workbench attribute smollm2-135m "The Eiffel Tower is in the city of" --answer " Paris" --wrong " Rome"
    workbench patch smollm2-135m "The Eiffel Tower is in the city of" "The Colosseum is in the city of" \\
        --answer " Paris" --wrong " Rome"

Each prints a readable table; ``--json FILE`` also writes the numbers, ``--report DIR`` an HTML
report with the figures (``report.html``) beside the numbers (``report.json``).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from workbench import plots
from workbench.analysis import attribution as A
from workbench.analysis import induction as I
from workbench.analysis import logit_lens as LL
from workbench.analysis import patching as P
from workbench.errors import InputError
from workbench.locking import output_lock
from workbench.pipelines import token_windows
from workbench.report import Report, jsonable
from workbench.zoo import load_model


def _load(name: str):
    return load_model(name)


def _write_json(path: str | None, numbers: dict) -> None:
    if path:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        # named by process: two runs writing one --json each rename a whole file (the last one wins)
        tmp = target.with_name(f".{target.stem}.{os.getpid()}{target.suffix}.tmp")
        try:  # a full disk leaves no half-written file under the name asked for
            tmp.write_text(json.dumps(jsonable(numbers), indent=2))
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        print(f"numbers written to {path}")


def _write_report(report, directory: str | None, numbers: dict) -> None:
    """Write ``report`` with ``numbers`` beside its figures into ``directory`` (nothing when None)."""
    if directory:
        report.numbers.update(numbers)
        paths = report.write(directory)
        print(f"report written to {paths.html} (numbers in {paths.json.name})")


def _fmt_heads(rows: list[dict]) -> str:
    return ", ".join(f"L{r['layer']}H{r['head']} {r['score']:.3f}" for r in rows)


def _grid(values: torch.Tensor, columns: list[str], row_name: str = "layer", fmt: str = "{:7.3f}") -> str:
    """Return a ``[row col]`` tensor as a fixed-width text table (rows numbered, columns labelled)."""
    width = max(7, max((len(c) for c in columns), default=0))
    width = min(width, 10)
    lines = [f"{row_name:>5} " + " ".join(f"{c[:width]:>{width}}" for c in columns)]
    for i, row in enumerate(values.tolist()):
        lines.append(f"{i:>5} " + " ".join(f"{fmt.format(v):>{width}}" for v in row))
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ induction


def _cmd_induction(args: argparse.Namespace) -> int:
    model = _load(args.model)
    spec = I.default_spec(model, seq_len=args.seq_len, batch=args.batch, seed=args.seed)
    seq = I.repeated_random_tokens(spec, model.cfg.d_vocab)
    scores = I.score_heads(model, seq.tokens)
    losses = I.repeat_losses(scores.loss, seq)
    copying = I.ov_copying_scores(model)
    heads = [f"H{h}" for h in range(model.cfg.n_heads)]
    print(f"{args.model}: {spec.batch} sequences of {spec.seq_len} random tokens shown twice")
    print(f"loss on the first copy {losses.first:.3f}, on the second copy {losses.second:.3f} (nats)")
    print("induction score of every head:")
    print(_grid(scores.induction, heads))
    numbers = {"model": args.model, "seq_len": spec.seq_len, "batch": spec.batch, "seed": spec.seed,
               "loss_first": losses.first, "loss_second": losses.second}
    for kind in I.SCORE_KINDS:
        top = plots.top_heads_table(scores.get(kind), args.top)
        print(f"top {kind} heads: {_fmt_heads(top)}")
        numbers[kind] = scores.get(kind)
        numbers[f"top_{kind}"] = top
    induction_top = plots.top_heads_table(scores.induction, args.top)
    print("OV copying score of the top induction heads: "
          + ", ".join(f"L{r['layer']}H{r['head']} {float(copying[r['layer'], r['head']]):+.2f}" for r in induction_top))
    numbers["ov_copying"] = copying
    _write_json(args.json, numbers)
    if args.report:
        report = Report(f"Induction heads: {args.model}")
        report.text(f"{spec.batch} sequences of {spec.seq_len} random token ids in [{spec.low}, {spec.high}), each "
                    f"shown twice. Loss on the first copy {losses.first:.3f} nats, on the second {losses.second:.3f}.")
        report.figure(plots.head_scores_figure({k: scores.get(k) for k in I.SCORE_KINDS}),
                      caption="mean attention on the previous token, on earlier copies of the current token, and on "
                              "the token after an earlier copy (induction), per head")
        report.figure(plots.loss_by_position_figure(scores.loss, split=seq.start + spec.seq_len),
                      caption="next-token loss by prediction position; the repeat is predictable by induction")
        report.figure(plots.head_heatmap(copying, "OV copying score", diverging=True))
        report.table(induction_top, caption="top induction heads")
        _write_report(report, args.report, numbers)
    return 0


# ----------------------------------------------------------------------------------------------- lens


def _cmd_lens(args: argparse.Namespace) -> int:
    model = _load(args.model)
    tokens = model.to_tokens(args.prompt)
    if args.tuned:
        result = LL.tuned_lens(model, LL.TunedLens.load(args.tuned, model), tokens, k=args.k)
    else:
        result = LL.logit_lens(model, tokens, k=args.k)
    strs = model.to_str_tokens(tokens[0])
    if not -len(strs) <= args.pos < len(strs):
        raise InputError(f"--pos {args.pos} is outside the prompt's {len(strs)} tokens; use 0..{len(strs) - 1} or "
                         "a negative index from the end")
    pos = args.pos % len(strs)
    name = "tuned" if args.tuned else "logit"
    print(f"{name} lens at position {pos} ({strs[pos]!r}): top {args.k} next tokens per layer")
    print(f"  {'layer':>5}  {'entropy':>7}  {'KL':>6}  top tokens")
    for li, label in enumerate(result.labels):
        tops = ", ".join(f"{model.to_string([int(t)])!r} {float(p):.2f}" for t, p in
                         zip(result.top_tokens[li, 0, pos], result.top_probs[li, 0, pos]))
        print(f"  {label:>5}  {float(result.entropy[li, 0, pos]):7.2f}  "
              f"{float(result.kl_to_final[li, 0, pos]):6.3f}  {tops}")
    frame = LL.lens_frame(result, strs)
    numbers = {"model": args.model, "prompt": args.prompt, "lens": name, "str_tokens": strs, **frame.to_dict("list")}
    _write_json(args.json, numbers)
    if args.report:
        decode = lambda ids: model.to_string(ids)  # noqa: E731
        report = Report(f"{name.capitalize()} lens: {args.model}")
        report.text(f"Prompt: {args.prompt!r}. Row l decodes the residual stream entering block l through the final "
                    "norm and the unembedding; the last row is the model's output.")
        report.figure(plots.lens_grid(result, strs, "top_prob", tokenizer_decode=decode,
                                      title="top next token and its probability"))
        report.figure(plots.lens_grid(result, strs, "target_prob", title="probability of the actual next token"))
        report.figure(plots.lens_grid(result, strs, "kl_to_final", title="KL(final output || lens), nats"))
        _write_report(report, args.report, numbers)
    return 0


def _windows(model, corpus: str, n_ctx: int, n: int) -> torch.Tensor:
    return token_windows(model, corpus, min(n_ctx, model.cfg.n_ctx), n)


def _comparison_report(title: str, cmp, numbers: dict, directory: str | None) -> None:
    if not directory:
        return
    report = Report(title)
    report.figure(plots.lens_kl_figure(cmp))
    report.table([{"layer": lbl, "logit lens KL": a, "tuned lens KL": b}
                  for lbl, a, b in zip(cmp.labels, cmp.logit_kl.tolist(), cmp.tuned_kl.tolist())])
    _write_report(report, directory, numbers)


def _cmd_tuned_train(args: argparse.Namespace) -> int:
    with output_lock(args.out):  # one writer per --out: a second run fails at once instead of mixing files
        return _tuned_train(args)


def _tuned_train(args: argparse.Namespace) -> int:
    model = _load(args.model)
    windows = _windows(model, args.corpus, args.n_ctx, args.windows + args.held_out)
    train, held = windows[: args.windows], windows[args.windows:]
    cfg = LL.TunedLensConfig(steps=args.steps, lr=args.lr, batch_size=args.batch_size, seed=args.seed)
    out = LL.train_tuned_lens(model, train, cfg, progress=True)
    out.lens.save(args.out)
    cmp = LL.compare_lenses(model, out.lens, held)
    print(f"tuned lens saved to {args.out}; held-out KL(final || lens) on {args.held_out} windows:")
    _print_comparison(cmp)
    numbers = {"model": args.model, "corpus": args.corpus, "layers": cmp.labels, "logit_kl": cmp.logit_kl,
               "tuned_kl": cmp.tuned_kl, "reset_layers": out.reset_layers, "losses": out.losses}
    _write_json(args.json, numbers)
    _comparison_report(f"Tuned lens vs logit lens: {args.model}", cmp, numbers, args.report)
    return 0


def _print_comparison(cmp) -> None:
    print(f"  {'layer':>5}  {'logit lens':>10}  {'tuned lens':>10}")
    for label, a, b in zip(cmp.labels, cmp.logit_kl.tolist(), cmp.tuned_kl.tolist()):
        print(f"  {label:>5}  {a:10.4f}  {b:10.4f}")


def _cmd_tuned_eval(args: argparse.Namespace) -> int:
    model = _load(args.model)
    lens = LL.TunedLens.load(args.lens, model)
    held = _windows(model, args.corpus, args.n_ctx, args.skip + args.held_out)[args.skip:]
    cmp = LL.compare_lenses(model, lens, held)
    _print_comparison(cmp)
    numbers = {"model": args.model, "corpus": args.corpus, "layers": cmp.labels, "logit_kl": cmp.logit_kl,
               "tuned_kl": cmp.tuned_kl}
    _write_json(args.json, numbers)
    _comparison_report(f"Tuned lens vs logit lens: {args.model}", cmp, numbers, args.report)
    return 0


# --------------------------------------------------------------------------------- attribution, patching


def _token(text: str | None):
    """An answer given on the command line: digits are a token id, anything else is text."""
    if text is None:
        return None
    return int(text) if text.isdigit() else text


def _cmd_attribute(args: argparse.Namespace) -> int:
    model = _load(args.model)
    tokens = model.to_tokens(args.prompt)
    granularity = "head" if args.heads else "layer"
    res = A.direct_logit_attribution(model, tokens, _token(args.answer), _token(args.wrong), granularity=granularity)
    what = f"logit({args.answer!r})" + (f" - logit({args.wrong!r})" if args.wrong is not None else "")
    print(f"{what} = {float(res.logit[0]):.4f} = sum of {len(res.labels)} components "
          f"{float(res.attrs[:, 0].sum()):.4f} + constant {float(res.constant[0]):.4f}")
    frame = res.frame()
    top = frame.reindex(frame.attribution.abs().sort_values(ascending=False).index[: args.top])
    print(f"  {'component':>14}  attribution   (largest {len(top)} by magnitude)")
    for row in top.itertuples():
        print(f"  {row.component:>14}  {row.attribution:+.4f}")
    numbers = {"model": args.model, "prompt": args.prompt, "answer": args.answer, "wrong": args.wrong,
               "labels": res.labels, "attrs": res.attrs[:, 0], "constant": res.constant[0], "logit": res.logit[0]}
    _write_json(args.json, numbers)
    if args.report:
        report = Report(f"Direct logit attribution: {args.model}")
        report.text(f"Prompt {args.prompt!r}; {what} = {float(res.logit[0]):.4f}, of which the final norm's bias and "
                    f"b_U give {float(res.constant[0]):.4f} and the components the rest.")
        report.figure(plots.attribution_bars(res, top=args.top if args.heads else None))
        if args.heads:
            grid = A.head_attribution_grid(res, model.cfg.n_layers, model.cfg.n_heads)
            report.figure(plots.head_heatmap(grid, "direct logit attribution per head", "logit", diverging=True))
        report.table(top, caption="largest components")
        _write_report(report, args.report, numbers)
    return 0


def _cmd_patch(args: argparse.Namespace) -> int:
    model = _load(args.model)
    clean, corrupt = model.to_tokens(args.clean), model.to_tokens(args.corrupt)
    metric = P.LogitDiff(A.token_id(model, _token(args.answer)),
                         None if args.wrong is None else A.token_id(model, _token(args.wrong)))
    strs = model.to_str_tokens(clean[0])
    if args.what == "resid":
        res = P.patch_residual(model, clean, corrupt, metric)
        cols = strs
    elif args.what == "heads":
        res = P.patch_heads(model, clean, corrupt, metric)
        cols = [f"H{h}" for h in range(model.cfg.n_heads)]
    else:
        res = P.patch_outputs(model, clean, corrupt, metric, kind=f"{args.what}_out")
        cols = strs
    print(f"metric: clean {res.clean:.4f}, corrupted {res.corrupt:.4f}; fraction of the difference restored by each "
          "patch:")
    print(_grid(res.normalized, [c.strip() or repr(c) for c in cols], fmt="{:7.2f}"))
    numbers = {"model": args.model, "clean_prompt": args.clean, "corrupt_prompt": args.corrupt, "what": args.what,
               "kind": res.kind, "clean": res.clean, "corrupt": res.corrupt, "scores": res.scores,
               "normalized": res.normalized, "columns": cols}
    _write_json(args.json, numbers)
    if args.report:
        report = Report(f"Activation patching: {args.model}")
        report.text(f"Clean {args.clean!r}, corrupted {args.corrupt!r}; metric logit({args.answer!r})"
                    + (f" - logit({args.wrong!r})" if args.wrong is not None else "")
                    + f": clean {res.clean:.4f}, corrupted {res.corrupt:.4f}.")
        report.figure(plots.patching_heatmap(res, strs))
        _write_report(report, args.report, numbers)
    return 0


# ------------------------------------------------------------------------------------------ register


def _outputs(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", metavar="FILE", help="also write the numbers to this JSON file")
    p.add_argument("--report", metavar="DIR", help="also write report.html (figures) and report.json here")


#: `tuned-lens train`'s default training and held-out windows (`eval` skips both by default)
_LENS_WINDOWS, _LENS_HELD_OUT = 256, 32


def register(subparsers) -> None:
    p = subparsers.add_parser("induction", help="score every head for previous-token/duplicate/induction attention")
    p.add_argument("model", help="zoo name, checkpoint directory or .gguf file")
    p.add_argument("--seq-len", type=int, default=24, help="random tokens per copy (default 24)")
    p.add_argument("--batch", type=int, default=8, help="number of sequences (default 8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--top", type=int, default=5, help="heads to list per score (default 5)")
    _outputs(p)
    p.set_defaults(func=_cmd_induction)

    p = subparsers.add_parser("lens", help="logit lens (or a trained tuned lens) on a prompt")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--tuned", metavar="DIR", help="directory of a tuned lens (from `workbench tuned-lens train`)")
    p.add_argument("--k", type=int, default=3, help="top tokens shown per layer (default 3)")
    p.add_argument("--pos", type=int, default=-1, help="position to show (default -1, the last)")
    _outputs(p)
    p.set_defaults(func=_cmd_lens)

    p = subparsers.add_parser("tuned-lens", help="train or evaluate a tuned lens")
    sub = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    t = sub.add_parser("train", help="train a tuned lens on a corpus and compare it with the logit lens held out")
    t.add_argument("model")
    t.add_argument("--corpus", default="pydocs", help="pydocs, kjv or a .txt/.jsonl file (default pydocs)")
    t.add_argument("--out", required=True, help="directory to save the lens in")
    t.add_argument("--n-ctx", type=int, default=64, help="tokens per window (default 64)")
    t.add_argument("--windows", type=int, default=_LENS_WINDOWS, help=f"training windows (default {_LENS_WINDOWS})")
    t.add_argument("--held-out", type=int, default=_LENS_HELD_OUT,
                   help=f"held-out windows after them (default {_LENS_HELD_OUT})")
    t.add_argument("--steps", type=int, default=300)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--batch-size", type=int, default=8)
    t.add_argument("--seed", type=int, default=0)
    _outputs(t)
    t.set_defaults(func=_cmd_tuned_train)
    e = sub.add_parser("eval", help="held-out KL of a saved tuned lens beside the logit lens")
    e.add_argument("model")
    e.add_argument("lens", help="directory of the lens")
    e.add_argument("--corpus", default="pydocs")
    e.add_argument("--n-ctx", type=int, default=64)
    skip = _LENS_WINDOWS + _LENS_HELD_OUT
    e.add_argument("--skip", type=int, default=skip,
                   help=f"windows to skip first (training + held-out windows of `train`'s defaults: {skip})")
    e.add_argument("--held-out", type=int, default=_LENS_HELD_OUT)
    _outputs(e)
    e.set_defaults(func=_cmd_tuned_eval)

    p = subparsers.add_parser("attribute", help="direct logit attribution of each layer (or head) to an answer")
    p.add_argument("model")
    p.add_argument("prompt")
    p.add_argument("--answer", required=True, help="the answer token (text like ' Paris', or an id)")
    p.add_argument("--wrong", help="attribute the logit difference answer - wrong")
    p.add_argument("--heads", action="store_true", help="split attention layers into heads")
    p.add_argument("--top", type=int, default=15, help="components listed (default 15)")
    _outputs(p)
    p.set_defaults(func=_cmd_attribute)

    p = subparsers.add_parser("patch", help="activation patching from a clean prompt into a corrupted one")
    p.add_argument("model")
    p.add_argument("clean", help="the clean prompt")
    p.add_argument("corrupt", help="the corrupted prompt (same number of tokens)")
    p.add_argument("--answer", required=True, help="the clean answer token (text or id)")
    p.add_argument("--wrong", help="metric is logit(answer) - logit(wrong) (default: logit(answer))")
    p.add_argument("--what", choices=["resid", "heads", "attn", "mlp"], default="resid",
                   help="what to patch (default: residual stream per layer and position)")
    _outputs(p)
    p.set_defaults(func=_cmd_patch)
